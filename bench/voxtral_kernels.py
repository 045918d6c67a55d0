"""Voxtral backend kernels: encoder + prefill per window, decode per token.

Random weights, nothing downloaded: the full-size ``VoxtralConfig()`` (3B,
bfloat16 on CUDA) with a random rank-64 LoRA on the Evoxtral targets, written
in the old transformers 4.5x key layout and loaded through the backend's
exact adapter loader. For every batch size it times

- prep: building prompt ids and log-mel features, ours (direct, on the
  device) against the reference ``processor.apply_transcription_request``
  (in-memory WAV round-trip, features on the CPU);
- prefill: one forward pass over B prompts of one 30 s window each (audio
  encoder, projector and the language model's prefill), per call and per
  window;
- decode: per generated token, from ``generate`` forced to N and to 1 new
  tokens: (t_N - t_1) / (N - 1);
- end to end: prep + generate(N) for our path (merged and unmerged) and the
  reference path (processor + generate on the unmerged peft model);
- slots: the merged model through the slot decoder
  (``model.voxtral.static_cache``; CUDA graphs on CUDA): prefill is one
  admit (features, encoder, prefill, first token), decode per token is
  (t_N - t_1) / (N - 1) over N - 1 steps, end to end is t_N;
- lookahead: the same decoder (the same compiled steps) with
  ``model.voxtral.lookahead`` (each step launched before the host reads the
  one before); t_N includes the one step launched past the last, so its
  decode per token is high by about 1 / (N - 1);
- draft80: the slot decoder with ``stream.draft``, each job's draft being
  80 % of its own first N greedy tokens (a final whose last partial
  predicted that much): prefill is the admit that keeps them, end to end the
  same N tokens; decode per token is over the steps left.

``--paths`` picks which of these run. ``--profile FILE`` also breaks the
merged prefill down, at the ``--profile-batches`` sizes, into its parts
(audio encoder, projector, the language model's prefill over the embedded
prompt; each timed alone) and, under ``torch.profiler``, each part's kernel
time and launches beside its wall time: a part whose kernels take far less
than its wall time is bound by the host launching them, not by the GPU. On
CUDA it also times the encoder replayed as CUDA graphs and the whole prefill
with it (``model.voxtral.encoder_graphs``), side by side, and the same with
the encoder's layers compiled (``model.voxtral.encoder_compile``: a copy of
the tower, so the eager rows stay eager; compiling is timed and left out of
the rows; ``--compile-backend`` picks its backend and ``--profile-compiled``
adds these rows off CUDA). Where a prefill bucket holds the batch (1, 2 or
4 rows), it adds the whole prefill with the prompt prefill replayed too
(``model.voxtral.prefill_graphs``). The file also gets the whole prefill's
top operators.

``--tiny`` runs the same code on the tiny test checkpoint on the CPU, so the
script is tested without a GPU; its numbers mean nothing. ``--layers N``
keeps every full-size width and cuts both towers to N layers: every path
at the real shapes (grouped key/value heads, head size, projector,
vocabulary) on a CPU (``--device cpu``), before a GPU session; its numbers
mean nothing either.

Usage::

    python bench/voxtral_kernels.py                    # CUDA, full size
    python bench/voxtral_kernels.py --batches 1,8 --new-tokens 64 --json out.json
    python bench/voxtral_kernels.py --batches 1,8 --paths merged --profile prefill.md
    python bench/voxtral_kernels.py --tiny             # CPU smoke run
    python bench/voxtral_kernels.py --device cpu --layers 1 --batches 1,2   # real shapes, CPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from evoxtral_stream.config import VoxtralConfig, load_config
from evoxtral_stream.engine.backends.base import Job, one_line
from evoxtral_stream.engine.backends.voxtral.adapter import attach_adapter
from evoxtral_stream.engine.backends.voxtral.backend import (
    DEFAULT_ADAPTER,
    LoadedModel,
    VoxtralBackend,
    load_tokenizer,
)
from evoxtral_stream.engine.backends.voxtral.encoder import (
    EncoderGraphs,
    compile_layers,
    eager_encoder,
    embed_prompts,
    encoder_parts,
    submodule,
)
from evoxtral_stream.engine.backends.voxtral.prefill import PrefillGraphs
from evoxtral_stream.engine.backends.voxtral.prompt import PromptSpec
from evoxtral_stream.engine.backends.voxtral.resolve import Resolved
from evoxtral_stream.engine.backends.voxtral.slots import SlotDecoder
from evoxtral_stream.engine.backends.voxtral.tiny import (
    tiny_voxtral_config,
    write_feature_extractor,
    write_lora_adapter,
    write_tekken,
)

__all__ = ["PATHS", "Part", "Row", "main", "profile_prefill", "run"]

Audio = npt.NDArray[np.float32]
PATHS = ("unmerged", "reference", "merged", "slots", "lookahead", "draft80")


@dataclass(frozen=True)
class Row:
    """Timings for one (mode, batch size), in milliseconds."""

    mode: str
    batch: int
    prep_ms: float
    prefill_ms: float
    prefill_per_window_ms: float
    decode_per_token_ms: float
    end_to_end_ms: float
    new_tokens: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` in ms, after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _audio(batch: int, seconds: float, seed: int = 0) -> list[Audio]:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    # 16-bit values, as the engine's PCM16 sources give.
    return [
        (np.round(rng.standard_normal(n) * 0.1 * 32768).clip(-32768, 32767) / 32768).astype(
            np.float32
        )
        for _ in range(batch)
    ]


def _build(config: Any, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    from transformers import VoxtralForConditionalGeneration

    torch.manual_seed(seed)
    cls: Any = VoxtralForConditionalGeneration
    with torch.device(device):
        model: Any = cls._from_config(config, dtype=dtype)
    model.eval()
    return model  # type: ignore[no-any-return]


def _backend(
    model: nn.Module,
    peft: nn.Module | None,
    spec: PromptSpec,
    tokenizer: Any,
    device: torch.device,
    cfg: VoxtralConfig,
) -> VoxtralBackend:
    here = Resolved("bench", Path("."), "folder")
    loaded = LoadedModel(
        model=model,
        peft=peft,
        tokenizer=tokenizer,
        spec=spec,
        device=device,
        dtype=next(model.parameters()).dtype,
        adapters=(DEFAULT_ADAPTER,),
        merged=peft is None,
        base=here,
        adapter=here,
    )
    return VoxtralBackend(loaded, cfg)


def _measure(
    label: str,
    backend: VoxtralBackend,
    batch: list[Audio],
    new_tokens: int,
    repeats: int,
    prep: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    kernels: bool = True,
) -> Row:
    """Time one path; ``prep`` (the reference) replaces the direct inputs.

    Without ``kernels`` only prep and end to end are timed (NaN elsewhere).
    """
    device = backend.loaded.device
    model: Any = backend.model
    spec = backend.spec

    def direct() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, masks = spec.left_padded([len(a) for a in batch])
        ids = torch.tensor(rows, device=device)
        mask = torch.tensor(masks, device=device)
        return ids, mask, backend.features(batch).to(backend.loaded.dtype)

    make = prep or direct
    ids, mask, feats = make()
    ids, mask, feats = ids.to(device), mask.to(device), feats.to(device, backend.loaded.dtype)
    n_windows = feats.shape[0]

    def prefill() -> None:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, input_features=feats, logits_to_keep=1)

    def generate(n: int) -> Callable[[], object]:
        def go() -> object:
            with torch.inference_mode(), backend.use_adapter(None):
                return model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    input_features=feats,
                    do_sample=False,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    pad_token_id=spec.pad,
                    eos_token_id=spec.eos,
                )

        return go

    def end_to_end() -> None:
        i, m, f = make()
        with torch.inference_mode(), backend.use_adapter(None):
            model.generate(
                input_ids=i.to(device),
                attention_mask=m.to(device),
                input_features=f.to(device, backend.loaded.dtype),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=spec.pad,
                eos_token_id=spec.eos,
            )

    nan = float("nan")
    with backend.use_adapter(None):
        prep_ms = _time(make, device, repeats)
        prefill_ms = _time(prefill, device, repeats) if kernels else nan
        t_n = _time(generate(new_tokens), device, repeats) if kernels else nan
        t_1 = _time(generate(1), device, repeats) if kernels else nan
        e2e = _time(end_to_end, device, repeats)
    per_token = (t_n - t_1) / max(1, new_tokens - 1)
    return Row(
        mode=label,
        batch=len(batch),
        prep_ms=prep_ms,
        prefill_ms=prefill_ms,
        prefill_per_window_ms=prefill_ms / n_windows,
        decode_per_token_ms=per_token,
        end_to_end_ms=e2e,
        new_tokens=new_tokens,
    )


def _measure_slots(backend: VoxtralBackend, batch: list[Audio], new_tokens: int,
                   repeats: int, label: str = "slots", draft_share: float = 0.0) -> Row:
    """Time the slot decoder (continuous batching over the fixed-shape cache;
    on CUDA its steps are CUDA graphs): admit is features + encoder + prefill,
    a step one token for every row. ``backend`` must budget more than
    ``new_tokens`` per row and hold EOS back.

    With ``draft_share``, each job's draft is that share of its own first
    ``new_tokens`` greedy tokens: the prefill keeps them all, so the same
    ``new_tokens`` take that many steps fewer (``stream.draft`` when the last
    partial predicted that share of the final).
    """
    device = backend.loaded.device
    backend.warm_up(len(batch))  # compiling and capturing is not timed
    kept = int(draft_share * new_tokens)
    drafts: list[tuple[int, ...]] = [()] * len(batch)
    if kept:
        # The rows' own first tokens, from the same decoder (generate with a
        # static cache would compile a model of its own).
        backend.admit([Job(i, a) for i, a in enumerate(batch)])
        for _ in range(kept - 1):
            backend.step()
        own = {r.job.key: tuple(r.tokens) for r in backend.decoder.rows}
        backend.abort()
        drafts = [own[i] for i in range(len(batch))]

    def jobs() -> list[Job]:
        return [Job(i, a, draft=d) for i, (a, d) in enumerate(zip(batch, drafts, strict=True))]

    def tokens(n: int) -> Callable[[], object]:
        def go() -> object:
            backend.admit(jobs())  # the first token (and the draft's) come from the prefill
            for _ in range(n - 1 - kept):
                backend.step()
            return backend.abort()

        return go

    prefill_ms = _time(tokens(kept + 1), device, repeats)
    t_n = _time(tokens(new_tokens), device, repeats)
    return Row(
        mode=label,
        batch=len(batch),
        prep_ms=float("nan"),
        prefill_ms=prefill_ms,
        prefill_per_window_ms=prefill_ms / sum(backend.spec.windows(len(a)) for a in batch),
        decode_per_token_ms=(t_n - prefill_ms) / max(1, new_tokens - 1 - kept),
        end_to_end_ms=t_n,
        new_tokens=new_tokens,
    )


@dataclass(frozen=True)
class Part:
    """One part of the merged prefill at one batch size: wall time (median,
    synchronised) and, under ``torch.profiler`` on CUDA, its kernels."""

    part: str
    batch: int
    windows: int
    wall_ms: float
    kernel_ms: float
    """Summed device time of its kernels and copies (NaN on the CPU)."""
    launches: int
    """Device kernels and copies launched (0 on the CPU)."""


def _kernels(fn: Callable[[], object], device: torch.device) -> tuple[float, int, Any]:
    """One profiled call of ``fn`` (already warm): device ms, launches, profiler."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    if not cuda:
        return float("nan"), 0, prof
    on_device = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return sum(e.time_range.elapsed_us() for e in on_device) / 1000, len(on_device), prof


def profile_prefill(backend: VoxtralBackend, batches: Sequence[int], audio_s: float,
                    repeats: int, log: Callable[[str], None],
                    compiled: Mapping[str, Any] | None = None,
                    on_batch: Callable[[list[Part], str], None] | None = None,
                    ) -> tuple[list[Part], str]:
    """The merged prefill broken into its parts, each timed alone (see the
    module docstring); returns the rows and the whole prefill's top operators
    at the last batch. ``compiled`` (``torch.compile`` options) adds the
    rows of a copy of the encoder with compiled layers; ``on_batch`` gets
    the rows and table so far after each batch (a run cut short keeps them)."""
    parts: list[Part] = []
    top = ""
    tower: nn.Module | None = None
    if compiled is not None:
        tower = copy.deepcopy(encoder_parts(backend.model)[0])
        try:
            compile_layers(tower, **compiled)
        except Exception as e:  # an unknown backend, say: the other rows still count
            log(f"profile: no compiled encoder: {one_line(e)}")
            tower = None
    prefill: PrefillGraphs | None = None
    if backend.loaded.device.type == "cuda":
        # model.voxtral.prefill_graphs on the same model; captured per batch.
        prefill = VoxtralBackend(backend.loaded, dataclasses.replace(
            backend._cfg, encoder_graphs=True, prefill_graphs=True)).prefill_graphs
    for b in batches:
        more, top = _profile_batch(backend, _audio(b, audio_s), repeats, tower, log, prefill)
        for part in more:
            log(_fmt_part(part))
        parts += more
        if on_batch is not None:
            on_batch(parts, top)
    return parts, top


def _profile_batch(backend: VoxtralBackend, audio: list[Audio], repeats: int,
                   compiled_tower: nn.Module | None, log: Callable[[str], None],
                   prefill: PrefillGraphs | None = None) -> tuple[list[Part], str]:
    device = backend.loaded.device
    model: Any = backend.model
    tower, projector = encoder_parts(model)
    text = submodule(model, "language_model")
    width = int(model.config.audio_config.intermediate_size)
    rows, masks = backend.spec.left_padded([len(a) for a in audio])
    ids = torch.tensor(rows, device=device)
    mask = torch.tensor(masks, device=device)
    feats = backend.features(audio).to(backend.loaded.dtype)
    with torch.inference_mode():
        hidden = tower(feats, return_dict=True).last_hidden_state
        embeds = model.get_input_embeddings()(ids)

    def encoder() -> object:
        with torch.inference_mode():
            return tower(feats, return_dict=True)

    def project() -> object:
        with torch.inference_mode():
            return projector(hidden.reshape(-1, width))

    def language() -> object:
        with torch.inference_mode():
            return text(inputs_embeds=embeds, attention_mask=mask, use_cache=True)

    def whole() -> object:
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask, input_features=feats,
                         logits_to_keep=1)

    todo: list[tuple[str, Callable[[], object]]] = [
        ("encoder", encoder), ("projector", project), ("language model", language),
        ("whole prefill", whole)]
    if device.type == "cuda":
        # model.voxtral.encoder_graphs: the same parts with the encoder replayed.
        todo += _graph_parts(model, tower, feats, ids, mask, "", prefill, log)
    if compiled_tower is not None:
        todo += _compiled_parts(model, compiled_tower, feats, ids, mask, log, prefill)
    parts: list[Part] = []
    top = ""
    for name, fn in todo:
        wall = _time(fn, device, repeats)
        kernel_ms, launches, prof = _kernels(fn, device)
        parts.append(Part(name, len(audio), int(feats.shape[0]), wall, kernel_ms, launches))
        if name == "whole prefill":
            key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            top = prof.key_averages().table(sort_by=key, row_limit=25)
    return parts, top


def _compiled_parts(model: Any, tower: nn.Module, feats: torch.Tensor, ids: torch.Tensor,
                    mask: torch.Tensor, log: Callable[[str], None],
                    prefill: PrefillGraphs | None = None,
                    ) -> list[tuple[str, Callable[[], object]]]:
    """The encoder with compiled layers (``model.voxtral.encoder_compile``),
    compiled for these windows first; on CUDA also replayed as CUDA graphs,
    alone and in the whole prefill. A compile that fails (no C compiler for
    Triton on the machine, say) is logged and adds no row: the batch's other
    rows still count."""
    device = feats.device
    run = eager_encoder(tower)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            run(feats)
        _sync(device)
    except Exception as e:
        log(f"profile {len(feats)} windows: no compiled encoder: {one_line(e)}")
        return []
    spent = time.perf_counter() - start
    log(f"profile {len(feats)} windows: encoder layers compiled in {spent:.1f} s")

    def encoder() -> object:
        with torch.inference_mode():
            return run(feats)

    todo: list[tuple[str, Callable[[], object]]] = [("encoder, compiled", encoder)]
    if device.type == "cuda":
        todo += _graph_parts(model, tower, feats, ids, mask, "compiled ", prefill, log)
    return todo


def _graph_parts(model: Any, tower: nn.Module, feats: torch.Tensor, ids: torch.Tensor,
                 mask: torch.Tensor, what: str, prefill: PrefillGraphs | None = None,
                 log: Callable[[str], None] = print,
                 ) -> list[tuple[str, Callable[[], object]]]:
    """``tower`` replayed as CUDA graphs (captured now), alone and in the
    whole prefill, its rows named with ``what``; with ``prefill``, also the
    whole prefill with the prompt prefill replayed too, where a bucket holds
    the batch (``model.voxtral.prefill_graphs``)."""
    graphs = EncoderGraphs(tower)
    try:
        graphs.capture(feats[0], len(feats))
    except Exception as e:  # the batch's other rows still count
        log(f"profile {len(feats)} windows: no {what}encoder graphs: {one_line(e)}")
        return []

    def encoder_graph() -> object:
        return graphs(feats)

    def whole_graph() -> object:
        with torch.inference_mode():
            return model(inputs_embeds=embed_prompts(model, ids, feats, graphs),
                         attention_mask=mask, logits_to_keep=1)

    todo: list[tuple[str, Callable[[], object]]] = [
        (f"encoder, {what}graph", encoder_graph), (f"prefill, {what}encoder graph", whole_graph)]
    if prefill is None or prefill.bucket(len(ids), int(ids.shape[1])) is None:
        return todo
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    try:
        start = time.perf_counter()
        prefill.capture(len(ids))
        if not prefill.enabled:
            raise RuntimeError("the capture failed (see the log)")
        log(f"profile {len(ids)} rows: prefill graphs captured in "
            f"{time.perf_counter() - start:.1f} s")
    except Exception as e:  # the other rows still count
        log(f"profile {len(ids)} rows: no prefill graphs: {type(e).__name__}: {e}")
        return todo

    def whole_graphs() -> object:
        with torch.inference_mode():
            return prefill(embed_prompts(model, ids, feats, graphs), mask, pos)

    return [*todo, (f"prefill, {what}encoder + prefill graphs", whole_graphs)]


def _fmt_part(p: Part) -> str:
    head = f"profile B={p.batch:<3} {p.part:>22}: wall {p.wall_ms:8.2f} ms"
    if math.isnan(p.kernel_ms):
        return head
    busy = p.kernel_ms / p.wall_ms if p.wall_ms > 0 else float("nan")
    return f"{head}  kernels {p.kernel_ms:8.2f} ms ({busy:4.0%} of wall) in {p.launches} launches"


def profile_markdown(parts: Sequence[Part], top: str, device: str) -> str:
    lines = [
        f"# Merged prefill, part by part ({device})",
        "",
        "Each part timed alone (median wall time, synchronised) and profiled once: its "
        "kernels' summed device time and launches. Kernels far below the wall time mean "
        "the host's launches, not the GPU, set the pace.",
        "",
        "| batch | windows | part | wall | kernels | kernels / wall | launches |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in parts:
        busy = p.kernel_ms / p.wall_ms if p.wall_ms > 0 else float("nan")
        kernels = "–" if math.isnan(p.kernel_ms) else f"{p.kernel_ms:.2f} ms"
        share = "–" if math.isnan(busy) else f"{busy:.0%}"
        lines.append(f"| {p.batch} | {p.windows} | {p.part} | {p.wall_ms:.2f} ms | {kernels} "
                     f"| {share} | {p.launches} |")
    lines += ["", "Top operators of the whole prefill at the largest batch:", "", "```",
              top.rstrip(), "```", ""]
    return "\n".join(lines)


def run(
    *,
    tiny: bool,
    batches: Sequence[int],
    new_tokens: int,
    audio_s: float,
    rank: int,
    repeats: int,
    reference: bool,
    device_name: str | None = None,
    log: Callable[[str], None] = print,
    layers: int | None = None,
    budget_s: float | None = None,
    on_row: Callable[[list[Row]], None] | None = None,
    paths: Sequence[str] = PATHS,
    profile_batches: Sequence[int] = (),
    on_profile: Callable[[list[Part], str], None] | None = None,
    profile_compiled: Mapping[str, Any] | None = None,
) -> list[Row]:
    """Run the measurements of ``paths`` and return the rows (also logged as
    they come).

    ``on_row`` gets the rows so far after each one. With ``profile_batches``,
    :func:`profile_prefill` runs on the merged model right after the merge
    and ``on_profile`` gets its rows and table (``profile_compiled``: its
    ``compiled`` rows' options); a profile that fails is
    logged and the rows go on. With ``budget_s``, a
    measurement that would start past that many seconds after the call is
    skipped (logged, no row): the smallest batches of every path come first,
    so a budget cut drops the largest batches.
    """
    t_begin = time.perf_counter()
    device = torch.device(device_name or ("cpu" if tiny else "cuda"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = load_config().model.voxtral
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="voxtral-bench-") as tmp:
        folder = Path(tmp)
        write_tekken(folder / "tekken.json")
        write_feature_extractor(folder)
        config = tiny_voxtral_config(full=not tiny, layers=None if tiny else layers)
        # config.json lets AutoTokenizer pick mistral-common for the processor.
        config.save_pretrained(str(folder))
        tokenizer = load_tokenizer(folder)
        spec = PromptSpec.from_tokenizer(tokenizer, "en")
        processor: Any = None
        if reference:
            from transformers import VoxtralProcessor

            proc_cls: Any = VoxtralProcessor
            processor = proc_cls.from_pretrained(str(folder))

        t0 = time.perf_counter()
        model = _build(config, device, dtype, seed=0)
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"model: {n_params / 1e9:.2f}B parameters, {device} {dtype}, "
            f"built in {time.perf_counter() - t0:.1f} s"
        )
        # The adapter goes through the real loader: written in the old key
        # layout, mapped, verified.
        cpu_model: Any = model
        pairs = write_lora_adapter(
            cpu_model, folder / "lora", rank=rank, alpha=2 * rank, scale=0.01, old_layout=True
        )
        n_lora = sum(a.numel() + b.numel() for a, b in pairs.values())
        peft_model: Any = attach_adapter(model, folder / "lora", DEFAULT_ADAPTER)
        peft_model.to(device)
        log(f"LoRA: rank {rank}, {len(pairs)} modules, {n_lora / 1e6:.1f}M parameters")
        unmerged = _backend(peft_model.get_base_model(), peft_model, spec, tokenizer, device, cfg)

        def reference_prep(batch: list[Audio]) -> Callable[[], Any]:
            def go() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                out = processor.apply_transcription_request(
                    audio=batch,
                    model_id="mistralai/Voxtral-Mini-3B-2507",
                    language="en",
                    sampling_rate=16000,
                    format=["wav"] * len(batch),
                )
                return (
                    out["input_ids"].to(device),
                    out["attention_mask"].to(device),
                    out["input_features"].to(device, dtype),
                )

            return go

        def over(what: str, share: float) -> bool:
            spent = time.perf_counter() - t_begin
            if budget_s is None or spent < share * budget_s:
                return False
            log(f"{what}: skipped (time budget {share * budget_s:g} s of {budget_s:g} s "
                f"for this path, {spent:.0f} s used)")
            return True

        def add(row: Row) -> None:
            rows.append(row)
            log(_fmt(row))
            if on_row is not None:
                on_row(rows)

        # Each path has its share of the budget, so that a slow one (the
        # unmerged paths at large batches) cannot starve the ones after it.
        for b in batches:
            audio = _audio(b, audio_s)
            if "unmerged" in paths and not over(f"unmerged B={b}", 0.4):
                add(_measure("unmerged", unmerged, audio, new_tokens, repeats))
            if reference and "reference" in paths and not over(f"reference B={b}", 0.4):
                add(_measure("reference", unmerged, audio, new_tokens, repeats,
                             prep=reference_prep(audio), kernels=False))
        merged_model: Any = peft_model.merge_and_unload(progressbar=False, safe_merge=False)
        merged = _backend(merged_model, None, spec, tokenizer, device, cfg)
        if profile_batches and not over("profile", 1.0):
            try:
                profile_prefill(merged, profile_batches, audio_s, repeats, log,
                                profile_compiled, on_profile)
            except Exception as e:  # the rows after it still count
                log(f"profile failed: {type(e).__name__}: {e}")
        for b in batches:
            if "merged" in paths and not over(f"merged B={b}", 0.6):
                add(_measure("merged", merged, _audio(b, audio_s), new_tokens, repeats))
        if not {"slots", "lookahead", "draft80"} & set(paths):
            return rows
        # Last: static_cache switches the model's text attention to grouped SDPA.
        slot_cfg = dataclasses.replace(cfg, static_cache=True, min_new_tokens=new_tokens + 8)
        slots = VoxtralBackend(merged.loaded, slot_cfg)
        slots.force_tokens = True
        decoder = slots.decoder
        assert isinstance(decoder, SlotDecoder)
        # One decoder, so both run the same compiled steps (compiled once).
        for label, share in (("slots", 0.75), ("lookahead", 0.9)):
            decoder.lookahead = label == "lookahead"
            for b in batches:
                if label in paths and not over(f"{label} B={b}", share):
                    add(_measure_slots(slots, _audio(b, audio_s), new_tokens, repeats, label))
        # A final whose last partial predicted 80 % of it (Whisper tiny.en's
        # finals: 81 %, bench/RESULTS.md).
        decoder.lookahead = False
        for b in batches:
            if "draft80" in paths and not over(f"draft80 B={b}", 1.0):
                add(_measure_slots(slots, _audio(b, audio_s), new_tokens, repeats, "draft80",
                                   draft_share=0.8))
    return rows


def _fmt(r: Row) -> str:
    return (
        f"{r.mode:>9} B={r.batch:<3} prep {r.prep_ms:8.2f} ms  prefill {r.prefill_ms:8.2f} ms "
        f"({r.prefill_per_window_ms:7.2f}/window)  decode {r.decode_per_token_ms:7.2f} ms/token  "
        f"end-to-end({r.new_tokens} tok) {r.end_to_end_ms:9.1f} ms"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--tiny", action="store_true", help="tiny checkpoint on the CPU (smoke test)")
    ap.add_argument("--layers", type=int, default=None,
                    help="full-size widths with this many layers per tower (shape check)")
    ap.add_argument(
        "--device", default=None, help="torch device (default cuda, or cpu with --tiny)"
    )
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (1,8,32,64)")
    ap.add_argument("--new-tokens", type=int, default=None, help="forced new tokens (default 64)")
    ap.add_argument("--audio-s", type=float, default=10.0, help="seconds of audio per request")
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    ap.add_argument("--no-reference", action="store_true", help="skip the processor path")
    ap.add_argument("--json", type=Path, default=None,
                    help="also write the rows here (after each one)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no measurement past this many seconds (each path has its "
                         "share: unmerged and reference 40%%, merged 60%%, slots 75%%, "
                         "lookahead 90%%, draft80 all)")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help="comma-separated paths to time (default all: %(default)s)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="also break the merged prefill down into its parts (markdown here)")
    ap.add_argument("--profile-batches", default="1",
                    help="batch sizes of the profile (default %(default)s)")
    ap.add_argument("--profile-compiled", action=argparse.BooleanOptionalAction, default=None,
                    help="profile the encoder with compiled layers too (default: on CUDA)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of those layers (default %(default)s)")
    args = ap.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    if unknown := sorted(set(paths) - set(PATHS)):
        ap.error(f"--paths: unknown {', '.join(unknown)} (known: {', '.join(PATHS)})")
    if args.layers is not None and (args.tiny or args.layers < 1):
        ap.error("--layers N (N >= 1) cuts the full-size model; it does not go with --tiny")
    if (
        not args.tiny
        and (args.device or "cuda").startswith("cuda")
        and not torch.cuda.is_available()
    ):
        print("no CUDA device: run with --tiny for the CPU smoke test")
        return 2
    default_batches = "1,2" if args.tiny else "1,8,32,64"
    batches = [int(x) for x in (args.batches or default_batches).split(",")]
    new_tokens = args.new_tokens or (4 if args.tiny else 64)
    repeats = args.repeats or (1 if args.tiny else 3)
    meta = {
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available() and not args.tiny
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "tiny": args.tiny,
        "layers": args.layers,
        "audio_s": args.audio_s,
        "argv": list(argv) if argv is not None else sys.argv[1:],
    }

    def write(rows: list[Row]) -> None:
        if args.json is not None:
            args.json.write_text(
                json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2)
            )

    def write_profile(parts: list[Part], top: str) -> None:
        if args.profile is not None:
            args.profile.write_text(profile_markdown(parts, top, str(meta["device"])))

    rows = run(
        tiny=args.tiny,
        batches=batches,
        new_tokens=new_tokens,
        audio_s=args.audio_s,
        rank=4 if args.tiny and args.rank == 64 else args.rank,
        repeats=repeats,
        reference=not args.no_reference,
        device_name=args.device,
        budget_s=args.budget_s,
        on_row=write,
        layers=args.layers,
        paths=paths,
        profile_batches=[int(x) for x in args.profile_batches.split(",")]
        if args.profile is not None else [],
        on_profile=write_profile,
        profile_compiled={"backend": args.compile_backend}
        if (args.profile_compiled if args.profile_compiled is not None
            else not args.tiny and (args.device or "cuda").startswith("cuda"))
        else None,
    )
    write(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
