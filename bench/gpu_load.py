"""GPU load: N live streams at real-time pace through the real engine, per mode.

Builds the full-size Voxtral architecture (``VoxtralConfig()``, bfloat16 on
CUDA) with random weights and a random rank-64 LoRA loaded through the
engine's adapter loader (the same construction as ``bench/voxtral_kernels.py``,
whose functions it imports), or loads real weights with ``--base`` and
``--adapter``. ``--tiny`` runs the tiny test checkpoint on the CPU instead: it
proves the harness, its numbers mean nothing.

For every (mode, stream count) it runs one *level*: a fresh :class:`Engine`
and :class:`CaptionServer` on loopback with one WebSocket subscriber of every
stream, and N simulated live streams that push 16 kHz PCM16 at real-time
pace (``--chunk-ms`` chunks from one pacing task, each stream at its own
phase) for ``--seconds``, then close (a drain: every final is awaited, at most
``--drain-s``). Each stream's audio is the bundled espeak sample cut into its
sentences, separated by silences as long as the sentences on average (speech
about half of the time) and entered at a random offset, so the VAD segments
it and the streams are not in lockstep. Random weights never stop by
themselves, so every request generates exactly its token budget
(``VoxtralBackend.force_tokens``): ``max(min_new_tokens,
ceil(tokens_per_second x seconds))``, 8 tokens per second of audio by default.
The models are built once per process: the merged one serves every level of
our modes, an unmerged copy (built only when asked for) the reference.

Modes:

- ``continuous`` / ``batch``: our path (merged LoRA, direct prompt and
  features) with ``worker.batching`` set to that mode;
- ``slots``: continuous batching over the fixed-shape slot cache
  (``model.voxtral.static_cache = true``; on CUDA its decode steps are CUDA
  graphs, compiled by the worker's warm-up, which the warm-up level pays);
- ``lookahead``: ``slots`` with ``model.voxtral.lookahead = true`` (each
  decode step launched before the host reads the one before);
- ``reference``: the seed's own usage code behind the engine's ``Backend``
  protocol: the unmerged ``PeftModel``, ``processor.apply_transcription_request``
  and one ``generate`` per request (``worker.batching = "batch"``,
  ``worker.max_batch = 1``), forced to the same token budget, in an engine
  without our latency features (``stream.prefix_reuse = "off"``,
  ``stream.pause_partial = false``, no drafts): each final is decoded when
  the end of speech is decided, as the seed would.

Columns (one row per mode x streams):

- finals: expected (finals the streams' sessions requested) / lost (expected,
  neither received by the subscriber nor failed: must be 0) / failed (the
  decode failed, even where the merger then closed the segment with a final
  caption of the text shown, or the final arrived after the drain deadline,
  when the harness fails the rest on purpose so a level cannot run on
  forever);
- final p50 / p95: end-of-speech decision -> final caption *received by the
  WebSocket subscriber*, computed from receive time: the decision is the
  ``Stream.push`` (or ``close``) call after which the stream's session had
  requested one more final; its wall time is taken right before that call,
  which is when the engine stamps the request. The engine's own ``latency``
  field (decision -> decoded) is in the JSON as ``final_field_p95``. Failed
  finals count as infinite. Every stream is closed at the same moment, and
  each one in the middle of a sentence (about half) then flushes it as a
  final: a burst that live traffic, whose streams end at different times,
  does not make, and about one final in six at 20 s per stream, so the p95
  is partly that burst's tail. Those finals stay in the columns (the engine
  must serve them); the JSON has their count, ``finals_at_close``, and the
  p95 of the others, ``final_p95_live``: the steady state's figure;
- partial age p95: receive time of a partial minus the time at which its last
  audio sample (its ``end``) was pushed (infinite when partials were asked
  for and none arrived);
- partials: partial captions received; dropped: partial requests that never
  became a caption because the worker superseded or cancelled them or its
  inbox refused them (``superseded + cancelled + partials_refused``);
- GPU busy: the worker's time inside the backend (``WorkerStats.busy_s``,
  plus the call still running when the live phase ends, ``call_s``) over
  the wall time of the live phase (not a hardware utilisation counter: on
  the CPU it is the model thread's share all the same, and in the
  ``lookahead`` mode a step returns with the next one already launched, so
  up to a step of device work per call runs outside that time);
- tokens/s: tokens generated (``tokens_generated`` of the backend) by the
  backend calls that started in the live phase, over the time from its
  start to the end of the last of them (``tokens_window_s`` in the JSON). A
  generate counts its tokens only when it returns, so the call still
  running when the audio ends is waited for, not left out; the worker
  makes one call at a time, so no later call's tokens are in the count.
  Where that call raised (the drain deadline failed it, say) the window
  ends at its start instead: its tokens are lost to any count;
- vs ref: where a reference row exists at the same stream count, this row's
  p95 final latency and tokens/s divided by the reference's: "∞" where
  only this row's p95 is infinite (or only the reference generated no
  token), "0 (ref ∞)" where only the reference's p95 is, "–" where there is
  nothing to compare (no reference, or both infinite, or both none);
- loop lag: p95 of how late the pacing task woke up (event-loop congestion);
- the percentiles are numpy's (linear interpolation) over every value
  behind them, however few: for the finals n is expected - lost, for the
  partial age the partials received. Under 20 values p95 lies between the
  two largest (of 3 finals, 0.1 x the second + 0.9 x the largest), so at
  one stream it is about the worst of a few finals, not a tail estimate;
  it is infinite once its rank reaches a failure (one of 20 is enough);
- status: "✓ targets" when the level met every target (p95 final <= 500 ms,
  p95 partial age <= 1.5 s, no final lost or failed), else what went wrong
  (a measuring subscriber that failed or lost its connection is named: its
  finals count as lost, and the level as not measured).

A summary follows the table: per mode, the most streams within every target
and the peak tokens/s, as ratios to the reference's.

A level that raises (out of memory, say) becomes an error row and the run
goes on. Results are written after every level (``--json``, ``--markdown``,
``--plot``) so a run cut short keeps what it measured; ``--budget-s`` skips
the levels that would not fit in the time left.

Usage::

    python bench/gpu_load.py --streams 25,50,100,150 --seconds 30 \\
        --modes continuous,batch,reference --reference-streams 1,5,10 \\
        --json out.json --markdown out.md --plot out.png
    python bench/gpu_load.py --tiny --streams 2 --seconds 8 --modes batch,reference
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from websockets.asyncio.client import connect

from evoxtral_stream.audio.sources import read_audio_file
from evoxtral_stream.config import Config, VoxtralConfig, load_config, parse_override
from evoxtral_stream.data import sample_path
from evoxtral_stream.engine.backends.base import Backend, one_line
from evoxtral_stream.engine.backends.voxtral.adapter import attach_adapter
from evoxtral_stream.engine.backends.voxtral.backend import (
    DEFAULT_ADAPTER,
    VoxtralBackend,
    load_model,
    load_tokenizer,
)
from evoxtral_stream.engine.backends.voxtral.prompt import PromptSpec
from evoxtral_stream.engine.backends.voxtral.slots import SlotDecoder
from evoxtral_stream.engine.backends.voxtral.tiny import (
    tiny_voxtral_config,
    write_feature_extractor,
    write_lora_adapter,
    write_tekken,
)
from evoxtral_stream.engine.engine import Engine, Stream
from evoxtral_stream.events import SAMPLE_RATE, DecodeFailure, Int16Array, RequestKind
from evoxtral_stream.server.app import CaptionServer

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
import voxtral_kernels as kernels  # noqa: E402

__all__ = ["MODES", "ReferenceBackend", "Row", "main", "run"]

MODES = ("continuous", "slots", "lookahead", "batch", "reference")
OUR_MODES = ("continuous", "slots", "lookahead", "batch")
SLOT_MODES = ("slots", "lookahead")
MODEL_ID = "mistralai/Voxtral-Mini-3B-2507"
TARGET_FINAL_P95_S = 0.5
TARGET_PARTIAL_AGE_P95_S = 1.5

Audio = npt.NDArray[np.float32]
log = logging.getLogger("gpu_load")


# --- results ------------------------------------------------------------------


@dataclass
class Row:
    """One level: a mode at a stream count. Times in seconds."""

    mode: str
    streams: int
    status: str = "ok"
    audio_s: float = 0.0
    speech_fraction: float = math.nan
    finals_expected: int = 0
    finals_received: int = 0
    finals_lost: int = 0
    finals_failed: int = 0
    final_p50: float = math.nan
    final_p95: float = math.nan
    final_max: float = math.nan
    final_field_p95: float = math.nan
    finals_at_close: int = 0
    final_p95_live: float = math.nan
    partial_age_p50: float = math.nan
    partial_age_p95: float = math.nan
    partials_requested: int = 0
    partials: int = 0
    partials_dropped: int = 0
    superseded: int = 0
    cancelled: int = 0
    partials_refused: int = 0
    decode_errors: int = 0
    gpu_busy_pct: float = math.nan
    tokens: int = 0
    tokens_per_s: float = math.nan
    tokens_window_s: float = math.nan
    live_s: float = math.nan
    drain_s: float = math.nan
    loop_lag_p95_ms: float = math.nan
    peak_gpu_mem_gib: float = math.nan
    final_p95_vs_ref: float = math.nan
    tokens_per_s_vs_ref: float = math.nan
    backend_calls: dict[str, int] = field(default_factory=dict)
    worker: dict[str, Any] = field(default_factory=dict)

    @property
    def meets_targets(self) -> bool:
        """Every target of the issue met at this level (finals never dropped)."""
        age_ok = (self.partials_requested == 0
                  or (self.partials > 0 and self.partial_age_p95 <= TARGET_PARTIAL_AGE_P95_S))
        return (self.status == "ok" and self.finals_expected > 0 and self.finals_lost == 0
                and self.finals_failed == 0 and self.final_p95 <= TARGET_FINAL_P95_S
                and age_ok)


def _pct(values: Sequence[float], q: float) -> float:
    """Percentile; NaN when empty, infinite when the rank falls on a failure."""
    if not values:
        return math.nan
    finite = [v for v in values if not math.isinf(v)]
    if not finite:
        return math.inf
    # A stand-in for infinity that interpolation can use; any weight on it
    # (a result past the largest finite value) means the rank touches a failure.
    big = 1e12
    arr = np.asarray([big if math.isinf(v) else v for v in values], dtype=np.float64)
    out = float(np.percentile(arr, q))
    return math.inf if out > max(finite) else out


# --- speech -------------------------------------------------------------------


def sentences(audio: Int16Array, *, min_gap_s: float = 0.5) -> list[Int16Array]:
    """Cut speech at its pauses (runs of near-silent 30 ms frames)."""
    frame = SAMPLE_RATE * 30 // 1000
    n = len(audio) // frame
    rms = np.sqrt(np.mean(audio[: n * frame].astype(np.float64).reshape(n, frame) ** 2, axis=1))
    loud = rms > max(40.0, 0.02 * float(rms.max()))
    out: list[Int16Array] = []
    start: int | None = None
    quiet = 0
    margin = int(0.1 * SAMPLE_RATE)
    need = int(min_gap_s * 1000 / 30)
    for i, on in enumerate(np.append(loud, [False] * (need + 1))):
        if on:
            if start is None:
                start = i
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet >= need:
                end = i - quiet + 1
                a = max(0, start * frame - margin)
                b = min(len(audio), end * frame + margin)
                out.append(audio[a:b].copy())
                start, quiet = None, 0
    return out


def stream_audio(parts: Sequence[Int16Array], seconds: float, rng: np.random.Generator,
                 speech_fraction: float = 0.5) -> tuple[Int16Array, float]:
    """``seconds`` of sentences separated by silences, entered at a random offset.

    Each silence is as long as the sentence before it times
    ``(1 - f) / f`` (f = ``speech_fraction``), +-40 % at random, and at least
    0.8 s so the VAD ends the segment. Returns the audio and its speech share.
    """
    total = int(seconds * SAMPLE_RATE)
    lead = int(rng.uniform(0.0, 8.0) * SAMPLE_RATE)
    pieces: list[Int16Array] = []
    length = 0
    while length < total + lead:
        s = parts[int(rng.integers(len(parts)))]
        gap_s = max(0.8, len(s) / SAMPLE_RATE * (1 - speech_fraction) / speech_fraction
                    * rng.uniform(0.6, 1.4))
        gap = np.zeros(int(gap_s * SAMPLE_RATE), np.int16)
        pieces += [s, gap]
        length += len(s) + len(gap)
    # Mark speech samples to measure the share inside the window taken.
    voiced = np.concatenate([np.full(len(p), i % 2 == 0) for i, p in enumerate(pieces)])
    audio = np.concatenate(pieces)[lead : lead + total]
    share = float(np.mean(voiced[lead : lead + total])) if total else 0.0
    return audio.astype(np.int16), share


# --- models ---------------------------------------------------------------------


class ReferenceBackend:
    """The seed's usage code as an engine :class:`Backend`.

    For every request: ``processor.apply_transcription_request`` (in-memory
    WAV, features on the CPU) and one ``generate`` on the unmerged
    ``PeftModel``, with the same token budget as our path (``budget``), forced
    when ``force`` (random weights never stop). As in
    ``bench/voxtral_kernels.py``'s reference path.
    """

    name = "reference"

    def __init__(self, peft_model: nn.Module, processor: Any, budget: Callable[[int], int],
                 device: torch.device, dtype: torch.dtype, *, spec: PromptSpec,
                 language: str = "en", force: bool = True) -> None:
        self.peft = peft_model
        self.processor = processor
        self.budget = budget
        self.device = device
        self.dtype = dtype
        self.spec = spec
        self.language = language
        self.force = force
        self.tokens_generated = 0

    @property
    def model(self) -> nn.Module:
        """The transformers model under the peft wrapper."""
        peft: Any = self.peft
        return peft.get_base_model()  # type: ignore[no-any-return]

    def transcribe(self, batch: Sequence[Audio]) -> list[str]:
        texts = []
        for audio in batch:
            arr = np.asarray(audio, dtype=np.float32)
            if not len(arr):
                texts.append("")
                continue
            n = self.budget(len(arr))
            inputs = self.processor.apply_transcription_request(
                audio=[arr],
                model_id=MODEL_ID,
                language=self.language,
                sampling_rate=SAMPLE_RATE,
                format=["wav"],
            )
            ids = inputs["input_ids"].to(self.device)
            peft: Any = self.peft
            with torch.inference_mode():
                out = peft.generate(
                    input_ids=ids,
                    attention_mask=inputs["attention_mask"].to(self.device),
                    input_features=inputs["input_features"].to(self.device, self.dtype),
                    do_sample=False,
                    max_new_tokens=n,
                    min_new_tokens=n if self.force else 0,
                    pad_token_id=self.spec.pad,
                    eos_token_id=self.spec.eos,
                )
            new = out[:, ids.shape[1] :]
            row = new[0].tolist()
            self.tokens_generated += row.index(self.spec.eos) if self.spec.eos in row else len(row)
            texts.append(str(self.processor.batch_decode(new, skip_special_tokens=True)[0]).strip())
        return texts


@dataclass
class Models:
    """What the levels run on; ``reference`` is made only when asked for."""

    device: torch.device
    dtype: torch.dtype
    ours: VoxtralBackend | None
    reference: ReferenceBackend | None
    description: str
    slots: VoxtralBackend | None = None
    """The merged model again, with the slot cache (modes ``slots`` and
    ``lookahead``)."""


def _budget_rule(backend: VoxtralBackend) -> Callable[[int], int]:
    return backend.max_new_tokens


def _plain(cfg: VoxtralConfig) -> VoxtralConfig:
    """``cfg`` without our levers (the reference path's settings)."""
    return dataclasses.replace(cfg, static_cache=False, lookahead=False,
                               encoder_graphs=False, encoder_compile=False,
                               prefill_graphs=False)


def build_models(args: argparse.Namespace, modes: Sequence[str], folder: Path,
                 say: Callable[[str], None]) -> Models:
    """Build (or load) the merged model for our modes and the reference path.

    Random weights: the full-size ``VoxtralConfig()`` (or the tiny one) built
    on the device with ``voxtral_kernels._build``; a random LoRA in the old
    key layout written once and attached by the engine's loader to each copy.
    """
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    want_ours = any(m in OUR_MODES for m in modes)
    want_ref = "reference" in modes
    # `--set model.voxtral.KEY=VALUE` reaches our models (the levels' engines
    # are handed them ready); the reference stays the seed's plain path.
    base_cfg = load_config(overrides=dict(
        parse_override(item) for item in args.set or [] if item.startswith("model."))).model
    vcfg = dataclasses.replace(base_cfg.voxtral, device=str(device),
                               dtype="float32" if dtype == torch.float32 else "bfloat16")
    t0 = time.perf_counter()
    ours: VoxtralBackend | None = None
    reference: ReferenceBackend | None = None
    if args.base:
        vcfg = dataclasses.replace(vcfg, base=args.base, adapter=args.adapter or "",
                                   merge_lora=True)
        if want_ours:
            ours = VoxtralBackend(load_model(vcfg, base_cfg.language, merge=True), vcfg)
        if want_ref:
            from transformers import VoxtralProcessor

            loaded = load_model(vcfg, base_cfg.language, merge=False)
            if loaded.peft is None:
                raise SystemExit("--reference needs an adapter (--adapter): it runs the PeftModel")
            budget = VoxtralBackend(loaded, _plain(vcfg))
            proc_cls: Any = VoxtralProcessor
            processor = proc_cls.from_pretrained(str(loaded.base.path))
            reference = ReferenceBackend(loaded.peft, processor, _budget_rule(budget), device,
                                         loaded.dtype, spec=loaded.spec,
                                         language=base_cfg.language, force=not args.no_force)
        what = f"real weights: base {args.base}, adapter {args.adapter or '(none)'}"
    else:
        write_tekken(folder / "tekken.json")
        write_feature_extractor(folder)
        config = tiny_voxtral_config(full=not args.tiny)
        config.save_pretrained(str(folder))  # lets the processor find mistral-common
        tokenizer = load_tokenizer(folder)
        spec = PromptSpec.from_tokenizer(tokenizer, base_cfg.language)
        rank = args.rank or (4 if args.tiny else 64)
        lora = folder / "lora"

        def peft_copy() -> nn.Module:
            model = kernels._build(config, device, dtype, seed=args.seed)
            if not (lora / "adapter_model.safetensors").exists():
                cpu_view: Any = model
                write_lora_adapter(cpu_view, lora, rank=rank, alpha=2 * rank, scale=0.01,
                                   old_layout=True)
            peft: Any = attach_adapter(model, lora, DEFAULT_ADAPTER)
            peft.to(device)
            peft.eval()
            return peft  # type: ignore[no-any-return]

        if want_ours:
            peft_ours: Any = peft_copy()
            merged = peft_ours.merge_and_unload(progressbar=False, safe_merge=False)
            ours = kernels._backend(merged, None, spec, tokenizer, device, vcfg)
            n_params = sum(p.numel() for p in merged.parameters())
        if want_ref:
            from transformers import VoxtralProcessor

            peft_ref: Any = peft_copy()
            unmerged = kernels._backend(peft_ref.get_base_model(), peft_ref, spec, tokenizer,
                                        device, _plain(vcfg))
            n_params = sum(p.numel() for p in peft_ref.get_base_model().parameters())
            proc_cls = VoxtralProcessor
            processor = proc_cls.from_pretrained(str(folder))
            reference = ReferenceBackend(peft_ref, processor, _budget_rule(unmerged), device,
                                         dtype, spec=spec, language=base_cfg.language,
                                         force=not args.no_force)
        what = (f"random weights, {'tiny' if args.tiny else 'full-size'} VoxtralConfig "
                f"({n_params / 1e9:.2f}B parameters), random rank-{rank} LoRA")
    slots: VoxtralBackend | None = None
    if ours is not None:
        ours.force_tokens = not args.no_force
        if any(m in SLOT_MODES for m in modes):
            # Same weights; static_cache also switches the language model to
            # grouped SDPA, which equals sdpa eagerly (the other modes). The
            # slots and lookahead modes share it, and so its compiled steps;
            # run_level switches lookahead.
            slots = VoxtralBackend(ours.loaded, dataclasses.replace(ours._cfg, static_cache=True))
            slots.force_tokens = ours.force_tokens
    desc = f"{what}; {device} {str(dtype).removeprefix('torch.')}"
    say(f"models ready in {time.perf_counter() - t0:.1f} s: {desc}")
    return Models(device, dtype, ours, reference, desc, slots)


def _backend_for(models: Models, mode: str) -> Backend:
    backend = {"reference": models.reference, "slots": models.slots,
               "lookahead": models.slots}.get(mode, models.ours)
    if mode in SLOT_MODES:
        assert isinstance(backend, VoxtralBackend)
        decoder = backend.decoder
        assert isinstance(decoder, SlotDecoder)
        decoder.lookahead = mode == "lookahead"
    assert backend is not None
    return backend


def _torch_model(backend: Backend) -> nn.Module:
    model = backend.model if isinstance(backend, VoxtralBackend | ReferenceBackend) else None
    assert model is not None
    return model


def _tokens(backend: Backend) -> int:
    return int(getattr(backend, "tokens_generated", 0))


class _DrainDeadline(RuntimeError):
    """Raised by a backend call (or inside an eager model) once a level's
    drain deadline passed."""


class _Abort:
    """A level's drain-deadline switch: once armed, every backend call fails.

    ``check`` sits in the backend's entry points (see :func:`_count_calls`),
    so a call in flight finishes and the next one fails. Where the model
    runs eagerly a forward pre-hook on its input embeddings fails the call
    in flight too (a long ``generate`` ends at its next token). The slot
    modes get no hook, since their steps are compiled and dynamo guards on
    every hook of the model: adding, removing or arming one recompiles
    every bucket's step (on an H200 about 14 s each for the full-size
    model, during the measured level). Other modes sharing that model
    remove theirs when their level ends, so the slot steps see the model
    as it was compiled.
    """

    def __init__(self) -> None:
        self.armed = False

    def check(self) -> None:
        if self.armed:
            raise _DrainDeadline("gpu_load: drain deadline passed, failing the rest")

    @contextlib.contextmanager
    def hooked(self, model: nn.Module | None) -> Iterator[None]:
        """The forward pre-hook on ``model``'s input embeddings while inside (None: none)."""
        if model is None:
            yield
            return

        def hook(module: nn.Module, inputs: object) -> None:
            self.check()

        emb: Any = model
        handle = emb.get_input_embeddings().register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()


@dataclass(frozen=True)
class _Mark:
    """The backend at one moment: the time, its token count, and the call
    running then (``(call, its start, the token count at its start)``), if any."""

    t: float
    tokens: int
    running: tuple[int, float, int] | None


class _CallLog:
    """When the backend's calls start and end, and its token count at each.

    The wrappers of :func:`_count_calls` call :meth:`enter` and :meth:`exit`
    on the model thread (a call made inside another, ``transcribe`` inside
    ``transcribe_jobs`` say, is part of it); :meth:`mark` and
    :meth:`window_end` are read from the event loop's thread. The worker
    makes one call at a time, so the tokens counted when a call returns are
    exactly those generated up to then.
    """

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self._depth = threading.local()
        self._calls = 0
        self._running: tuple[int, float, int] | None = None
        self._watched = -1
        self._watched_end: tuple[float, int, bool] | None = None

    def enter(self) -> None:
        depth = getattr(self._depth, "n", 0)
        self._depth.n = depth + 1
        if depth:
            return
        with self._lock:
            self._calls += 1
            self._running = (self._calls, time.monotonic(), _tokens(self._backend))

    def exit(self, ok: bool) -> None:
        self._depth.n -= 1
        if self._depth.n:
            return
        with self._lock:
            if self._running is not None and self._running[0] == self._watched:
                self._watched_end = (time.monotonic(), _tokens(self._backend), ok)
            self._running = None

    def mark(self) -> _Mark:
        """Now; the call running now is watched for :meth:`window_end`."""
        with self._lock:
            if self._running is not None:
                self._watched = self._running[0]
            return _Mark(time.monotonic(), _tokens(self._backend), self._running)

    def window_end(self, mark: _Mark) -> tuple[float, int]:
        """The end of the window of the calls started by ``mark`` and its token
        count then: ``mark`` itself when no call was running, else the end of
        the call running then, or its start if it raised or has not returned
        (what it generated is lost, or not known yet)."""
        if mark.running is None:
            return mark.t, mark.tokens
        with self._lock:
            end = self._watched_end if self._watched == mark.running[0] else None
        if end is not None and end[2]:
            return end[0], end[1]
        return mark.running[1], mark.running[2]


@contextlib.contextmanager
def _count_calls(backend: Backend, profiler: _Profiler | None = None,
                 abort: _Abort | None = None, log: _CallLog | None = None
                 ) -> Iterator[dict[str, int]]:
    """Count the backend entry points the worker uses (instance-level wrappers);
    each first checks ``abort``, then is timed by ``log``."""
    counts: dict[str, int] = {}
    wrapped: list[str] = []
    for name in ("transcribe", "transcribe_jobs", "admit", "step"):
        fn = getattr(backend, name, None)
        if fn is None:
            continue
        counts[name] = 0

        def wrapper(*a: Any, _fn: Any = fn, _name: str = name, **k: Any) -> Any:
            counts[_name] += 1
            if abort is not None:
                abort.check()
            if profiler is not None:
                profiler.tick()
            if log is None:
                return _fn(*a, **k)
            log.enter()
            ok = False
            try:
                out = _fn(*a, **k)
                ok = True
                return out
            finally:
                log.exit(ok)

        setattr(backend, name, wrapper)
        wrapped.append(name)
    try:
        yield counts
    finally:
        for name in wrapped:
            with contextlib.suppress(AttributeError):
                delattr(backend, name)


# --- one level ----------------------------------------------------------------------


@dataclass
class _Sim:
    """One simulated live stream: its audio and what the pacing recorded."""

    handle: Stream
    audio: Int16Array
    phase: float
    pos: int = 0
    chunk_ends: list[int] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)
    final_ready: list[float] = field(default_factory=list)
    live_finals: int | None = None
    """Finals requested before the stream was closed (None: still open); the
    rest flushed the segment open at the close."""
    failed_finals: set[int] = field(default_factory=set)
    """Segments whose final decode failed (the merger may still close such a
    segment with a final caption: the text its partials had shown)."""

    def watch_failures(self) -> None:
        """Record in :attr:`failed_finals` each failed final of the stream,
        as its session is told of it."""
        session: Any = self.handle.session
        told = session.on_result

        def on_result(result: Any) -> None:
            if isinstance(result, DecodeFailure) and result.kind is RequestKind.FINAL:
                self.failed_finals.add(result.segment)
            told(result)

        session.on_result = on_result

    def note_finals(self, t: float) -> None:
        requested = self.handle.session.stats().finals_requested
        while len(self.final_ready) < requested:
            self.final_ready.append(t)

    def pushed_at(self, sample: int) -> float:
        """When the chunk holding ``sample`` was pushed (NaN if never)."""
        i = bisect.bisect_left(self.chunk_ends, sample + 1)
        return self.chunk_times[i] if i < len(self.chunk_times) else math.nan


@dataclass
class _Received:
    """What the subscriber saw."""

    finals: dict[tuple[str, int], tuple[float, float | None]] = field(default_factory=dict)
    partials: list[tuple[str, float, float]] = field(default_factory=list)
    errors: set[tuple[str, int]] = field(default_factory=set)
    error_count: int = 0
    ended: int = 0
    duplicate_finals: int = 0
    closed: bool = False
    all_ended: asyncio.Event = field(default_factory=asyncio.Event)


async def _subscribe(port: int, n_streams: int, got: _Received,
                     ready: asyncio.Event) -> None:
    async with connect(f"ws://127.0.0.1:{port}/v1/captions", max_size=None,
                       open_timeout=60) as ws:
        await ws.recv()  # hello
        ready.set()
        async for raw in ws:
            t = time.monotonic()
            msg = json.loads(raw)
            kind = msg.get("type")
            if kind == "caption":
                if msg["final"]:
                    key = (msg["stream"], int(msg["segment"]))
                    if key in got.finals:
                        got.duplicate_finals += 1
                    got.finals[key] = (t, msg.get("latency"))
                else:
                    got.partials.append((msg["stream"], float(msg["end"]), t))
            elif kind == "error":
                got.error_count += 1
                if msg.get("segment") is not None:
                    got.errors.add((msg["stream"], int(msg["segment"])))
            elif kind == "stream.ended":
                got.ended += 1
                if got.ended >= n_streams:
                    got.all_ended.set()
    got.closed = True


def _level_config(args: argparse.Namespace, mode: str, n_streams: int) -> Config:
    overrides: dict[str, object] = {
        "server.port": 0,
        "server.host": "127.0.0.1",
        # The subscriber is measuring, not being tested for slowness.
        "server.subscriber_queue": 1_000_000,
        "server.max_streams": max(100, n_streams + 10),
        "journal.enabled": False,
        "mqtt.enabled": False,
    }
    if mode == "reference":
        overrides |= {"worker.batching": "batch", "worker.max_batch": 1,
                      "stream.prefix_reuse": "off", "stream.pause_partial": False,
                      "stream.draft": False}
    else:
        overrides["worker.batching"] = "continuous" if mode in SLOT_MODES else mode
        if args.max_batch:
            overrides["worker.max_batch"] = args.max_batch
        if args.prefix_reuse:
            overrides["stream.prefix_reuse"] = args.prefix_reuse
    for item in args.set or []:
        key, value = parse_override(item)
        if mode == "reference" and key in ("worker.batching", "worker.max_batch",
                                           "stream.prefix_reuse", "stream.pause_partial",
                                           "stream.draft"):
            continue
        overrides[key] = value
    return load_config(overrides=overrides)


async def _pace(sims: list[_Sim], chunk: int, tick_s: float, t_start: float,
                lags: list[float]) -> None:
    """Push every stream's chunks when due, from one task, until all are done."""
    planned = t_start
    while True:
        now = time.monotonic()
        lags.append(max(0.0, now - planned))
        pending = False
        for sim in sims:
            while sim.pos < len(sim.audio):
                due = t_start + sim.phase + (sim.pos + chunk) / SAMPLE_RATE
                if due > now:
                    pending = True
                    break
                end = min(len(sim.audio), sim.pos + chunk)
                t = time.monotonic()
                sim.handle.push(sim.audio[sim.pos : end])
                sim.chunk_ends.append(end)
                sim.chunk_times.append(t)
                sim.note_finals(t)
                sim.pos = end
        if not pending:
            return
        nxt = min(t_start + s.phase + (s.pos + chunk) / SAMPLE_RATE
                  for s in sims if s.pos < len(s.audio))
        planned = max(nxt, now + tick_s) if nxt > now else now
        await asyncio.sleep(max(0.0, planned - time.monotonic()))


async def run_level(models: Models, mode: str, n_streams: int, args: argparse.Namespace,
                    *, seed: int, profile_to: Path | None = None,
                    say: Callable[[str], None] = print) -> Row:
    """Run ``n_streams`` live streams for ``args.seconds`` in ``mode``; one row."""
    cfg = _level_config(args, mode, n_streams)
    backend = _backend_for(models, mode)
    model = _torch_model(backend)
    abort = _Abort()
    timeline = _CallLog(backend)
    rng = np.random.default_rng(seed)
    parts = sentences(read_audio_file(sample_path()))
    chunk = int(args.chunk_ms * SAMPLE_RATE / 1000)
    row = Row(mode=mode, streams=n_streams, audio_s=args.seconds)
    cuda = models.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(models.device)
    got = _Received()
    lags: list[float] = []
    quiet = logging.getLogger("evoxtral_stream.engine")
    level = quiet.level
    abort_t = math.inf
    sub_failure = ""
    profiler = (_Profiler(profile_to, f"{mode}, {n_streams} streams", cuda)
                if profile_to is not None else None)
    try:
        # Slot modes run compiled steps: no hook on their model (see _Abort).
        with abort.hooked(None if mode in SLOT_MODES else model), \
                _count_calls(backend, profiler, abort, timeline) as calls:
            async with Engine(cfg, backend) as engine, CaptionServer(engine, cfg.server) as server:
                ready = asyncio.Event()
                sub = asyncio.ensure_future(_subscribe(server.port, n_streams, got, ready))
                await asyncio.wait_for(ready.wait(), 60)
                # The worker's warm-up (slot modes: recording this thread's CUDA
                # graphs of the steps compiled before the first level) is not
                # part of the level.
                t_wait = time.monotonic()
                while not engine.stats().worker.ready:
                    if time.monotonic() - t_wait > 900:
                        raise RuntimeError("the model worker was not ready after 900 s")
                    await asyncio.sleep(0.02)
                shares = []
                sims = []
                for i in range(n_streams):
                    audio, share = stream_audio(parts, args.seconds, rng)
                    shares.append(share)
                    handle = engine.open_stream(f"s{i:03d}", source="gpu_load")
                    sims.append(_Sim(handle, audio, float(rng.uniform(0, chunk / SAMPLE_RATE))))
                    sims[-1].watch_failures()
                row.speech_fraction = float(np.mean(shares))
                tok0 = _tokens(backend)
                t_start = time.monotonic()
                if profiler is not None:
                    half = args.seconds / 2
                    profiler.window = (t_start + half, t_start + half + min(args.profile_s, half))
                await _pace(sims, chunk, args.tick_ms / 1000, t_start, lags)
                t_live = time.monotonic()
                live = engine.stats()
                row.live_s = t_live - t_start
                # A generate counts its tokens when it returns: the call
                # running now is waited for (it ends during the drain).
                at_live = timeline.mark()
                # busy_s grows when a backend call ends: add the one running now.
                row.gpu_busy_pct = 100 * (live.worker.busy_s + live.worker.call_s) / row.live_s

                async def close(sim: _Sim) -> None:
                    t = time.monotonic()
                    sim.live_finals = len(sim.final_ready)
                    closing = asyncio.ensure_future(sim.handle.close())
                    await asyncio.sleep(0)  # close() runs up to its first await: the flush
                    sim.note_finals(t)
                    await closing

                closing = asyncio.ensure_future(asyncio.gather(*(close(s) for s in sims)))
                try:
                    await asyncio.wait_for(asyncio.shield(closing), args.drain_s)
                except TimeoutError:
                    abort_t = time.monotonic()
                    abort.armed = True
                    # The failures that follow are on purpose: one line says so.
                    quiet.setLevel(logging.CRITICAL)
                    say(f"  {mode} x{n_streams}: drain passed {args.drain_s:g} s; "
                        "failing the requests left")
                    await asyncio.wait_for(closing, 120)
                # A subscriber that died will not see the rest end.
                ended = asyncio.ensure_future(got.all_ended.wait())
                await asyncio.wait({ended, sub}, timeout=30,
                                   return_when=asyncio.FIRST_COMPLETED)
                ended.cancel()
                row.drain_s = time.monotonic() - t_live
                stats = engine.stats()
            died = sub.exception() if sub.done() and not sub.cancelled() else None
            if died is not None:
                sub_failure = f"subscriber failed: {one_line(died)[:160]}"
            elif got.closed and not got.all_ended.is_set():
                sub_failure = "subscriber's connection closed before every stream ended"
            sub.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sub
    finally:
        quiet.setLevel(level)
        if profiler is not None:
            profiler.stop()
    # The engine has stopped its worker: the call running at t_live is over.
    t_end, tok_end = timeline.window_end(at_live)
    row.tokens = tok_end - tok0
    row.tokens_window_s = t_end - t_start
    row.tokens_per_s = row.tokens / row.tokens_window_s
    row.backend_calls = dict(calls)
    row.worker = asdict(stats.worker)
    row.superseded = stats.worker.superseded
    row.cancelled = int(getattr(stats.worker, "cancelled", 0))
    row.partials_refused = stats.partials_refused
    row.partials_dropped = row.superseded + row.cancelled + row.partials_refused
    row.decode_errors = got.error_count
    row.loop_lag_p95_ms = 1000 * _pct(lags, 95)
    if cuda:
        row.peak_gpu_mem_gib = torch.cuda.max_memory_allocated(models.device) / 2**30
    _score(row, sims, got, abort_t)
    notes = [sub_failure] if sub_failure else []
    if abort_t < math.inf:
        notes.append(f"overloaded: drain passed {args.drain_s:g} s")
    if mode in ("continuous", *SLOT_MODES) and row.backend_calls.get("step", 0) == 0:
        notes.append("continuous batching not engaged (the worker never called step)")
    if profiler is not None:
        notes.append("profiled (figures distorted)")
    if got.duplicate_finals:
        notes.append(f"{got.duplicate_finals} duplicate finals")
    if row.decode_errors and abort_t == math.inf:
        notes.append(f"{row.decode_errors} decode errors")
    if notes:
        row.status = "; ".join(notes)
    return row


def _score(row: Row, sims: list[_Sim], got: _Received, abort_t: float) -> None:
    """Latencies, partial ages and the fate of every expected final."""
    finals: list[float] = []
    fields: list[float] = []
    live: list[float] = []
    for sim in sims:
        sid = sim.handle.id
        for seg, ready in enumerate(sim.final_ready):
            row.finals_expected += 1
            n = len(finals)
            seen = got.finals.get((sid, seg))
            if seen is not None:
                row.finals_received += 1
                recv, field_latency = seen
                if recv >= abort_t or seg in sim.failed_finals:
                    row.finals_failed += 1
                    finals.append(math.inf)
                else:
                    finals.append(recv - ready)
                    if field_latency is not None:
                        fields.append(float(field_latency))
            elif seg in sim.failed_finals or (sid, seg) in got.errors or abort_t < math.inf:
                row.finals_failed += 1
                finals.append(math.inf)
            else:
                row.finals_lost += 1
            if sim.live_finals is not None and seg >= sim.live_finals:
                row.finals_at_close += 1
            else:
                live += finals[n:]
    ages = []
    by_id = {s.handle.id: s for s in sims}
    for sid, end, recv in got.partials:
        owner = by_id.get(sid)
        if owner is None:
            continue
        sample = max(0, round(end * SAMPLE_RATE) - 9)  # `end` is rounded to 1 ms
        pushed = owner.pushed_at(sample)
        if not math.isnan(pushed):
            ages.append(recv - pushed)
    row.partials = len(got.partials)
    row.partials_requested = sum(s.handle.session.stats().partials_requested for s in sims)
    row.final_p50 = _pct(finals, 50)
    row.final_p95 = _pct(finals, 95)
    row.final_max = max(finals, default=math.nan)
    row.final_field_p95 = _pct(fields, 95)
    row.final_p95_live = _pct(live, 95)
    row.partial_age_p50 = _pct(ages, 50)
    row.partial_age_p95 = _pct(ages, 95)
    if row.partials_requested and not ages:
        # Partials were asked for and none was ever shown: infinitely stale.
        row.partial_age_p50 = row.partial_age_p95 = math.inf


class _Profiler:
    """torch.profiler over a time window, started and stopped on the model thread.

    The profiler records the operators of the thread that starts it, and only
    that thread can stop it (torch 2.11 raises, 2.13 returns an empty table),
    so the backend wrappers (on the worker thread) call :meth:`tick` before
    each entry: the first inside the window starts it, the first after it
    stops it and writes the table. :meth:`stop` at the level's end, from
    another thread, writes only why there is no table.
    """

    def __init__(self, path: Path, label: str, cuda: bool) -> None:
        self.path = path
        self.label = label
        self.cuda = cuda
        self.window = (math.inf, math.inf)
        self._prof: Any = None
        self._thread: threading.Thread | None = None
        self._done = False

    def tick(self) -> None:
        now = time.monotonic()
        if self._done:
            return
        if self._prof is None and self.window[0] <= now < self.window[1]:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
            self._thread = threading.current_thread()
        elif self._prof is not None and now >= self.window[1]:
            self.stop()

    def stop(self) -> None:
        if self._done or self._prof is None:
            return
        self._done = True
        if threading.current_thread() is not self._thread:
            # Still ended here, or torch 2.11 crashes when the process exits.
            with contextlib.suppress(Exception):
                self._prof.__exit__(None, None, None)
            self.path.write_text(
                f"# torch.profiler: {self.label}: not recorded: there was no backend call "
                "on the model thread after the window, and only that thread can stop the "
                "profiler (profile a busier level)\n")
            return
        self._prof.__exit__(None, None, None)
        key = "cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = self._prof.key_averages().table(sort_by=key, row_limit=40)
        span = self.window[1] - self.window[0]
        self.path.write_text(f"# torch.profiler: {self.label}, {span:.1f} s of the live "
                             f"phase on the model thread, sorted by {key}\n\n{table}\n")


# --- the run --------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def plan(modes: Sequence[str], streams: Sequence[int], reference_streams: Sequence[int]
         ) -> list[tuple[str, int]]:
    """Levels in run order: ascending stream count, modes in the given order."""
    levels = [(m, n) for m in modes for n in (reference_streams if m == "reference" else streams)]
    order = {m: i for i, m in enumerate(modes)}
    return sorted(levels, key=lambda lv: (lv[1], order[lv[0]]))


def add_ratios(rows: list[Row]) -> None:
    """p95 final latency and tokens/s relative to the reference at the same count."""
    refs = {r.streams: r for r in rows if r.mode == "reference" and r.status != "skipped"}
    for r in rows:
        ref = refs.get(r.streams)
        if ref is None or r.mode == "reference":
            continue
        r.final_p95_vs_ref = _ratio(r.final_p95, ref.final_p95)
        r.tokens_per_s_vs_ref = _ratio(r.tokens_per_s, ref.tokens_per_s)


def _ratio(a: float, b: float) -> float:
    """``a / b``; infinite where only ``a`` is (every final failed beside a
    reference that measured) or ``b`` is 0 and ``a`` is not; NaN where there
    is nothing to compare (either NaN, both infinite, both 0)."""
    if math.isnan(a) or math.isnan(b) or (math.isinf(a) and math.isinf(b)):
        return math.nan
    if math.isinf(b):
        return 0.0  # the reference failed (infinite p95): shown as "0 (ref ∞)"
    if math.isinf(a):
        return math.inf
    if b == 0:
        return math.nan if a == 0 else math.inf
    return a / b


def capacity(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Per mode: most streams within every target, and the peak tokens/s."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        entry = out.setdefault(r.mode, {"streams_within_targets": 0, "peak_tokens_per_s": 0.0})
        if r.meets_targets:
            entry["streams_within_targets"] = max(entry["streams_within_targets"], r.streams)
        if not math.isnan(r.tokens_per_s):
            entry["peak_tokens_per_s"] = max(entry["peak_tokens_per_s"], r.tokens_per_s)
    return out


def _s(v: float) -> str:
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞"
    return f"{v:.3f} s"


def _x(v: float, *, zero: str = "0×") -> str:
    """A ratio to the reference; ``zero`` shows 0 (the p95 column: the
    reference's p95 was infinite, see :func:`_ratio`)."""
    if v == 0:
        return zero
    if math.isinf(v):
        return "∞"
    return "–" if math.isnan(v) else f"{v:.3g}×"


def _n(v: float, fmt: str = ".0f") -> str:
    return "–" if math.isnan(v) else format(v, fmt)


def _ms(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.1f} ms"


def _pc(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.0f} %"


def table(rows: list[Row]) -> str:
    head = ("| mode | streams | finals exp / lost / failed | final p50 | final p95 | "
            "partial age p95 | partials | dropped partials | GPU busy | tokens/s | "
            "p95 final vs ref | tokens/s vs ref | loop lag p95 | status |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r.mode} | {r.streams} | {r.finals_expected} / {r.finals_lost} / "
            f"{r.finals_failed} | {_s(r.final_p50)} | {_s(r.final_p95)} | "
            f"{_s(r.partial_age_p95)} | {r.partials} | {r.partials_dropped} | "
            f"{_pc(r.gpu_busy_pct)} | {_n(r.tokens_per_s)} | "
            f"{_x(r.final_p95_vs_ref, zero='0 (ref ∞)')} | "
            f"{_x(r.tokens_per_s_vs_ref)} | {_ms(r.loop_lag_p95_ms)} | "
            f"{'✓ targets' if r.meets_targets else r.status if r.status != 'ok' else 'ok'} |")
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    cap = capacity(rows)
    ref = cap.get("reference")
    lines = [f"Targets: p95 end-of-speech → final ≤ {TARGET_FINAL_P95_S * 1000:.0f} ms, "
             f"p95 partial age ≤ {TARGET_PARTIAL_AGE_P95_S:g} s, no final lost or failed.", ""]
    for mode, c in cap.items():
        text = (f"- {mode}: most streams within every target: "
                f"{int(c['streams_within_targets'])}; peak tokens/s {c['peak_tokens_per_s']:.0f}")
        if ref is not None and mode != "reference":
            if ref["peak_tokens_per_s"] > 0:
                text += (f" ({c['peak_tokens_per_s'] / ref['peak_tokens_per_s']:.3g}× the "
                         "reference's peak)")
            if ref["streams_within_targets"] > 0:
                text += (f"; {c['streams_within_targets'] / ref['streams_within_targets']:.3g}× "
                         "the reference's streams")
        lines.append(text)
    return "\n".join(lines)


def _git_commit() -> str:
    """Short HEAD, with "+modified" when tracked files differ from it; "unknown"
    without git (the working-tree copy on a device machine may have none)."""
    def git(*a: str) -> str:
        out = subprocess.run(["git", *a], cwd=_HERE, capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+modified" if dirty else head


def meta(args: argparse.Namespace, argv: Sequence[str], models_desc: str) -> dict[str, Any]:
    import transformers

    cuda = (args.device or ("cpu" if args.tiny else "cuda")).startswith("cuda")
    device = (torch.cuda.get_device_name(0) if cuda and torch.cuda.is_available()
              else f"CPU ({platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores)")
    try:
        import peft

        peft_version = str(peft.__version__)
    except ImportError:
        peft_version = "absent"
    ours = _level_config(args, "continuous", 1)
    return {
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "python": platform.python_version(),
        "commit": args.commit or _git_commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/gpu_load.py " + shlex.join(argv),
        "models": models_desc,
        "tiny": bool(args.tiny),
        "seconds": args.seconds,
        "chunk_ms": args.chunk_ms,
        # As our levels run them: --set wins over --max-batch and --prefix-reuse.
        "max_batch": ours.worker.max_batch,
        "prefix_reuse": ours.stream.prefix_reuse,
        "partial_interval_ms": ours.stream.partial_interval_ms,
        "tokens_forced": not args.no_force,
        "overrides": list(args.set or []),
    }


def _cadence(info: dict[str, Any]) -> str:
    """How often our streams ask for partials (older JSON files lack the key: 1 s)."""
    ms = info.get("partial_interval_ms", 1000)
    return "no partials" if ms == 0 else f"partials every {ms / 1000:g} s"


def markdown(info: dict[str, Any], rows: list[Row], plot: Path | None) -> str:
    perf = "" if not info["tiny"] else (
        "\n**Tiny checkpoint on the CPU: these figures test the harness; they are not "
        "performance claims.**\n")
    lines = [
        "## GPU load: live streams through the real engine (bench/gpu_load.py)",
        perf,
        f"- **Device:** {info['device']}; torch {info['torch']}, transformers "
        f"{info['transformers']}, peft {info['peft']}",
        f"- **Model:** {info['models']}",
        f"- **Commit:** `{info['commit']}`",
        f"- **Date:** {info['date']}",
        f"- **Command:** `{info['command']}`",
        f"- **Load:** {info['seconds']:g} s of audio per stream, {info['chunk_ms']} ms chunks "
        f"at real-time pace, speech about half of the time, {_cadence(info)}; "
        f"worker.max_batch {info['max_batch']}, stream.prefix_reuse "
        f"{info['prefix_reuse']}; tokens forced to the budget: {info['tokens_forced']}",
        "",
        table(rows),
        "",
        summary(rows),
    ]
    if plot is not None:
        lines += ["", f"![latency vs streams]({plot.name})"]
    return "\n".join(lines) + "\n"


def write_plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in dict.fromkeys(r.mode for r in rows):
        pts = sorted((r for r in rows if r.mode == mode and r.status != "skipped"),
                     key=lambda r: r.streams)
        xs = [r.streams for r in pts]

        def ys(vals: list[float]) -> list[float]:
            return [v if math.isfinite(v) else math.nan for v in vals]

        line = left.plot(xs, ys([r.final_p95 for r in pts]), "o-", label=f"{mode} p95")[0]
        left.plot(xs, ys([r.final_p50 for r in pts]), "s--", color=line.get_color(),
                  label=f"{mode} p50", alpha=0.7)
        right.plot(xs, ys([r.partial_age_p95 for r in pts]), "o-", color=line.get_color(),
                   label=mode)
    left.axhline(TARGET_FINAL_P95_S, color="red", lw=1, ls=":", label="target 500 ms")
    right.axhline(TARGET_PARTIAL_AGE_P95_S, color="red", lw=1, ls=":", label="target 1.5 s")
    left.set_title("end of speech → final received")
    right.set_title("partial age p95")
    counts = sorted({r.streams for r in rows})
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.minorticks_off()
        ax.set_xlabel("live streams")
        ax.set_ylabel("seconds")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(args: argparse.Namespace, info: dict[str, Any], rows: list[Row]) -> None:
    if args.json is not None:
        data = {"meta": info,
                "rows": [asdict(r) | {"meets_targets": r.meets_targets} for r in rows],
                "capacity": capacity(rows)}
        args.json.write_text(json.dumps(_clean(data), indent=2, allow_nan=False,
                                        default=_json_default) + "\n")
    if args.plot is not None and rows:
        write_plot(rows, args.plot, f"{info['device']} · {info['date']} · {info['commit']}")
    if args.markdown is not None:
        args.markdown.write_text(markdown(info, rows, args.plot))


def _json_default(o: object) -> object:
    return str(o)


def _clean(value: Any) -> Any:
    """NaN and infinity as JSON null / "inf" strings (strict JSON)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf"
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


async def run(args: argparse.Namespace, argv: Sequence[str],
              say: Callable[[str], None] = print) -> list[Row]:
    """Build the models, run every level, write the outputs; return the rows."""
    t_begin = time.monotonic()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    streams = _ints(args.streams)
    ref_streams = _ints(args.reference_streams) if args.reference_streams else streams
    rows: list[Row] = []
    threads = torch.get_num_threads()
    if (args.device or ("cpu" if args.tiny else "cuda")) == "cpu":
        # One intra-op thread leaves a core to the event loop (the CI machine has two).
        torch.set_num_threads(1)
    try:
        return await _run(args, argv, say, t_begin, modes, streams, ref_streams, rows)
    finally:
        torch.set_num_threads(threads)


async def _run(args: argparse.Namespace, argv: Sequence[str], say: Callable[[str], None],
               t_begin: float, modes: list[str], streams: list[int], ref_streams: list[int],
               rows: list[Row]) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="gpu-load-") as tmp:
        models = build_models(args, modes, Path(tmp), say)
        info = meta(args, argv, models.description)
        say(f"device: {info['device']}; commit {info['commit']}")
        if models.slots is not None:
            # Compile every bucket's step once, before any level: each level's
            # worker then only records its CUDA graphs (they are per thread).
            t = time.monotonic()
            try:
                what = models.slots.warm_up(int(info["max_batch"]))
            except Exception as e:
                # The other modes' levels still count; the traceback is the
                # finding (the slot modes' levels are reported as errors).
                info["slot_compile_error"] = one_line(e)[:200]
                say(f"slot decoder failed to compile after {time.monotonic() - t:.1f} s: "
                    f"{info['slot_compile_error']}\n{traceback.format_exc()}")
                for m in [m for m in modes if m in SLOT_MODES]:
                    rows += [Row(mode=m, streams=n, audio_s=args.seconds,
                                 status=f"error: compile: {info['slot_compile_error']}")
                             for n in streams]
                modes = [m for m in modes if m not in SLOT_MODES]
            else:
                info["slot_compile_s"] = round(time.monotonic() - t, 1)
                say(f"slot decoder compiled in {info['slot_compile_s']:.1f} s: {what}")
        if args.warmup_s > 0:
            warm = argparse.Namespace(**{**vars(args), "seconds": args.warmup_s})
            for m in modes:
                t = time.monotonic()
                try:
                    await run_level(models, m, 1 if m == "reference" else 2, warm,
                                    seed=10_000, say=say)
                except Exception as e:
                    say(f"warm-up of {m} failed: {type(e).__name__}: {e}")
                say(f"warm-up {m}: {time.monotonic() - t:.1f} s")
        levels = plan(modes, streams, ref_streams)
        busiest = max((lv for lv in levels if lv[0] in OUR_MODES), key=lambda lv: lv[1],
                      default=None)
        for mode, n in levels:
            elapsed = time.monotonic() - t_begin
            estimate = args.seconds + (args.drain_s if mode == "reference" else 5.0) + 5.0
            if args.budget_s and elapsed + estimate > args.budget_s:
                rows.append(Row(mode=mode, streams=n, status="skipped",
                                audio_s=args.seconds))
                say(f"{mode} x{n}: skipped (time budget {args.budget_s:g} s, "
                    f"{elapsed:.0f} s used)")
                continue
            t0 = time.monotonic()
            try:
                # The same audio and phases for every mode at one stream count.
                row = await run_level(models, mode, n, args, seed=args.seed + n, say=say)
            except Exception as e:
                log.debug("level failed", exc_info=True)
                row = Row(mode=mode, streams=n, status=f"error: {one_line(e)[:160]}",
                          audio_s=args.seconds)
                if args.verbose:
                    traceback.print_exc()
                if models.device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            add_ratios(rows)
            say(f"{mode} x{n}: {time.monotonic() - t0:.1f} s, final p95 {_s(row.final_p95)}, "
                f"partial age p95 {_s(row.partial_age_p95)}, {_n(row.tokens_per_s)} tokens/s, "
                f"finals {row.finals_expected}/{row.finals_lost} lost/{row.finals_failed} "
                f"failed, {row.status}")
            _write(args, _clean_info(info), rows)
        if args.profile is not None and busiest is not None:
            await _profile_level(models, busiest, args, t_begin, say)
        add_ratios(rows)
        _write(args, _clean_info(info), rows)
    say("")
    say(table(rows))
    say("")
    say(summary(rows))
    return rows


async def _profile_level(models: Models, level: tuple[str, int], args: argparse.Namespace,
                         t_begin: float, say: Callable[[str], None]) -> None:
    """An extra, unrecorded run of the busiest level with torch.profiler on."""
    mode, n = level
    seconds = 2 * args.profile_s + 4
    if args.budget_s and time.monotonic() - t_begin + seconds + 10 > args.budget_s:
        say("profile skipped (time budget)")
        return
    short = argparse.Namespace(**{**vars(args), "seconds": seconds})
    try:
        await run_level(models, mode, n, short, seed=args.seed + n, profile_to=args.profile,
                        say=say)
        say(f"profile of {mode} x{n} written to {args.profile}")
    except Exception as e:
        say(f"profile of {mode} x{n} failed: {type(e).__name__}: {e}")


def _clean_info(info: dict[str, Any]) -> dict[str, Any]:
    return dict(_clean(info))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    help="tiny checkpoint on the CPU: tests the harness, figures mean nothing")
    ap.add_argument("--device", default=None, help="torch device (cuda; cpu with --tiny)")
    ap.add_argument("--streams", default=None,
                    help="stream counts for our modes (default 25,50,100,150; 2 with --tiny)")
    ap.add_argument("--reference-streams", default=None,
                    help="stream counts for the reference mode (default 1,5,10; "
                         "the --streams list with --tiny)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="audio per stream and level (default 30; 8 with --tiny)")
    ap.add_argument("--modes", default="continuous,slots,lookahead,batch,reference",
                    help="comma-separated: continuous, slots, lookahead, batch, reference")
    ap.add_argument("--prefix-reuse", choices=("off", "partials", "all"), default=None,
                    help="stream.prefix_reuse for our modes (default: the config's)")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="worker.max_batch for our modes (default: the config's)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="any other config override, for every level (repeatable)")
    ap.add_argument("--base", default=None, help="real weights: base model folder or hub id")
    ap.add_argument("--adapter", default=None, help="real weights: LoRA adapter")
    ap.add_argument("--no-force", action="store_true",
                    help="let the model stop at EOS (real weights only)")
    ap.add_argument("--rank", type=int, default=None, help="random LoRA rank (64; 4 tiny)")
    ap.add_argument("--chunk-ms", type=int, default=40, help="audio per push (20-100 ms)")
    ap.add_argument("--tick-ms", type=float, default=10.0, help="pacing task's shortest sleep")
    ap.add_argument("--drain-s", type=float, default=15.0,
                    help="wait at most this long for the finals after the audio ends; "
                         "the rest then fail on purpose (counted as failed)")
    ap.add_argument("--warmup-s", type=float, default=None,
                    help="an unrecorded warm-up level of 2 streams per mode (5; 0 tiny)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip levels that would end past this many seconds after the "
                         "imports (default 540 on CUDA, none with --tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--commit", default=None,
                    help="commit to report (default: git rev-parse --short HEAD)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="after the levels, run the busiest one again for a few seconds "
                         "under torch.profiler (model thread) and write its table here")
    ap.add_argument("--profile-s", type=float, default=3.0, help="seconds profiled")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG: latency vs streams")
    ap.add_argument("--verbose", action="store_true", help="tracebacks and engine logs")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny for the CPU harness check")
        return 2
    if args.adapter and not args.base:
        print("--adapter needs --base")
        return 2
    args.streams = args.streams or ("2" if args.tiny else "25,50,100,150")
    if args.reference_streams is None and not args.tiny:
        args.reference_streams = "1,5,10"
    if args.seconds is None:
        args.seconds = 8.0 if args.tiny else 30.0
    if args.warmup_s is None:
        args.warmup_s = 0.0 if args.tiny else 5.0
    if args.budget_s is None and device.startswith("cuda"):
        args.budget_s = 540.0
    if not 5 <= args.chunk_ms <= 1000:
        print("--chunk-ms must be 5..1000")
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(run(args, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
