"""The Voxtral (+ Evoxtral LoRA) backend: batched greedy transcription.

One :meth:`VoxtralBackend.transcribe` call makes one ``generate`` call per
adapter present in the batch (one in the usual, merged case): prompts are
left-padded to a common length, every 30 s window of every array goes through
the audio encoder together, and decoding is greedy with ``max_new_tokens``
proportional to the longest audio. Prompt ids and log-mel features are built
directly on the model's device (see :mod:`.prompt`, :mod:`.features`). Each
job's prompt carries its own ``lang:xx`` (:attr:`VoxtralBackend.languages`),
so one batch mixes languages.

This module decodes with a model already loaded; :mod:`.load` loads it
(weights, tokenizer, adapters) and :func:`load_voxtral_backend` joins the two.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from transformers import StoppingCriteria as _StoppingCriteria

from evoxtral_stream.config import VoxtralConfig
from evoxtral_stream.engine.backends.base import BackendError, Done, Job, one_line
from evoxtral_stream.text.loops import cut_loop

from .compile_cache import CacheTally
from .features import LogMel
from .load import DEFAULT_ADAPTER, NO_ADAPTER, LoadedModel, load_model, load_tokenizer
from .prompt import LANGUAGES, language_ids

if TYPE_CHECKING:
    from .continuous import RowDecoder
    from .encoder import Encoder
    from .prefill import PrefillGraphs

# The loader's names that callers import from here are re-exported.
__all__ = [
    "DEFAULT_ADAPTER",
    "NO_ADAPTER",
    "LoadedModel",
    "VoxtralBackend",
    "load_model",
    "load_tokenizer",
    "load_voxtral_backend",
]

log = logging.getLogger(__name__)

Audio = npt.NDArray[np.float32]


class VoxtralBackend:
    """Voxtral behind the engine's :class:`Backend` protocol; one thread only.

    ``transcribe(batch)`` decodes every array with the default adapter;
    ``transcribe(batch, adapters)`` picks one per array by name (None: the
    default; :data:`NO_ADAPTER`: plain Voxtral), which needs unmerged mode for
    anything but the default. Returned texts are what the model wrote, with
    its inline ``[tags]``, special tokens removed and ends stripped.
    """

    name: str

    def __init__(self, loaded: LoadedModel, cfg: VoxtralConfig) -> None:
        self.loaded = loaded
        self.spec = loaded.spec
        self.features = LogMel(loaded.spec, loaded.device)
        self._cfg = cfg
        self._default = DEFAULT_ADAPTER if DEFAULT_ADAPTER in loaded.adapters else NO_ADAPTER
        self.name = "voxtral" if self._default == NO_ADAPTER else "voxtral+lora"
        self.force_tokens = False
        """Benchmarks only: hold EOS back so every row generates its whole
        budget (random weights never stop by themselves)."""
        self.tokens_generated = 0
        """Tokens generated since load, prefixes not counted (for benchmarks)."""
        self.draft_tokens = 0
        """Draft tokens checked at admission since load (for benchmarks)."""
        self.draft_kept = 0
        """Of those, the ones kept (for benchmarks)."""
        self._decoder: RowDecoder | None = None
        self._encoder: Encoder | None = None
        self._encoder_compile_tried = False
        self._prefill_graphs: PrefillGraphs | None = None
        self._language_ids: dict[str, tuple[int, ...]] = {}
        if cfg.static_cache:
            _group_text_attention(self.model)

    @property
    def model(self) -> nn.Module:
        """The transformers model that generates (merged or with LoRA layers)."""
        return self.loaded.model

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Names a request may ask for."""
        if self.loaded.peft is None:
            return (self._default,)
        return (*self.loaded.adapters, NO_ADAPTER)

    @property
    def default_adapter(self) -> str:
        """The adapter a request naming none gets."""
        return self._default

    @property
    def languages(self) -> tuple[str, ...]:
        """Codes a job may name as its language (:data:`.prompt.LANGUAGES`)."""
        return LANGUAGES

    def language_ids(self, language: str | None) -> tuple[int, ...]:
        """Prompt ids of ``language`` (None: ``model.language``); raises
        :class:`BackendError` for a code not in :attr:`languages`."""
        if language is None:
            return self.spec.language
        ids = self._language_ids.get(language)
        if ids is None:
            if language not in LANGUAGES:  # exactly: "EN" would be a second English
                raise BackendError(f"Voxtral does not transcribe language {language!r} "
                                   f"(it knows {', '.join(LANGUAGES)})")
            try:
                ids = language_ids(self.loaded.tokenizer, language)
            except ValueError as e:
                raise BackendError(str(e)) from None
            self._language_ids[language] = ids
        return ids

    def max_new_tokens(self, longest_samples: int) -> int:
        """Token budget for a batch whose longest audio has ``longest_samples``."""
        seconds = longest_samples / self.spec.sampling_rate
        return max(self._cfg.min_new_tokens, math.ceil(self._cfg.tokens_per_second * seconds))

    def _adapter(self, name: str | None) -> str:
        chosen = self._default if name is None else name
        if chosen not in self.adapter_names:
            known = ", ".join(self.adapter_names)
            extra = "" if self.loaded.peft is not None else " (LoRA is merged: one adapter only)"
            raise BackendError(f"unknown adapter {chosen!r}; this backend has {known}{extra}")
        return chosen

    @contextlib.contextmanager
    def use_adapter(self, name: str | None) -> Iterator[None]:
        """Run :attr:`model` with adapter ``name`` (None: the default) inside."""
        name = self._adapter(name)
        peft_model: Any = self.loaded.peft
        if peft_model is None:
            yield
        elif name == NO_ADAPTER:
            with peft_model.disable_adapter():
                yield
        else:
            peft_model.set_adapter(name)
            yield

    def row_budget(self, samples: int, prefix_tokens: int) -> int:
        """New tokens a row may generate after a prefix of ``prefix_tokens``.

        The budget for the audio (:meth:`max_new_tokens`) less the prefix,
        and at least one token, so a prefix never silences the rest.
        """
        return max(1, self.max_new_tokens(samples) - prefix_tokens)

    def encode_prefix(self, text: str) -> list[int]:
        """Tokens of committed text, as the model would have written them."""
        text = text.strip()
        if not text:
            return []
        tok: Any = self.loaded.tokenizer
        return cast(list[int], tok.encode(text, False, False))

    def generate_tokens(
        self,
        batch: Sequence[Audio],
        *,
        adapter: str | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        prefixes: Sequence[Sequence[int]] | None = None,
        languages: Sequence[str | None] | None = None,
    ) -> list[list[int]]:
        """Greedy new tokens for every array of ``batch`` in one ``generate`` call.

        Each row gets its own budget, :meth:`row_budget` of its own length
        (or ``max_new_tokens`` for all), so a row decodes the same alone as in
        any batch; the call ends when every row met EOS or its budget. Rows
        are returned without the EOS. ``min_new_tokens`` holds EOS back (for
        benchmarks; :attr:`force_tokens` holds it back for whole budgets).
        ``prefixes`` (token ids per row) are fed after the prompt and
        continued from; they are not part of the rows returned.
        ``languages`` names each row's language (see :meth:`language_ids`).
        """
        from transformers import GenerationConfig, StoppingCriteriaList

        spec = self.spec
        arrays = [_as_audio(a) for a in batch]
        pre = [list(p) for p in prefixes] if prefixes is not None else [[] for _ in arrays]
        if len(pre) != len(arrays):
            raise BackendError(f"{len(pre)} prefixes for {len(arrays)} requests")
        if max_new_tokens is None:
            budgets = [self.row_budget(len(a), len(p)) for a, p in zip(arrays, pre, strict=True)]
        else:
            budgets = [max_new_tokens] * len(arrays)
        if self.force_tokens:
            min_new_tokens = max(budgets)
        langs = [self.language_ids(code) for code in languages or [None] * len(arrays)]
        if len(langs) != len(arrays):
            raise BackendError(f"{len(langs)} languages for {len(arrays)} requests")
        rows, masks = spec.left_padded([len(a) for a in arrays], pre, langs)
        device = self.loaded.device
        gen = cast(Any, GenerationConfig)(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max(budgets),
            min_new_tokens=min(min_new_tokens, max(budgets)),
            eos_token_id=spec.eos,
            pad_token_id=spec.pad,
            bos_token_id=spec.bos,
            **({"cache_implementation": "static"} if self._cfg.static_cache else {}),
        )
        with torch.inference_mode(), self.use_adapter(adapter):
            ids = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
            mask = torch.tensor(masks, dtype=torch.long).to(device, non_blocking=True)
            feats = self.features(arrays).to(self.loaded.dtype)
            stop = _RowBudgets(ids.shape[1], torch.tensor(budgets, device=device))
            try:
                out = cast(Any, self.model).generate(
                    input_ids=ids,
                    attention_mask=mask,
                    input_features=feats,
                    generation_config=gen,
                    stopping_criteria=StoppingCriteriaList([stop]),
                )
            except torch.cuda.OutOfMemoryError:
                longest = max(len(a) for a in arrays) / spec.sampling_rate
                raise BackendError(
                    f"out of GPU memory decoding {len(arrays)} requests "
                    f"({longest:.1f} s longest); lower worker.max_batch"
                ) from None
        new = cast(list[list[int]], out[:, ids.shape[1] :].tolist())
        result = []
        for row, budget in zip(new, budgets, strict=True):
            row = row[:budget]
            cut = row.index(spec.eos) if spec.eos in row else len(row)
            result.append(row[:cut])
        self.tokens_generated += sum(len(r) for r in result)
        return result

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of generated ``tokens`` without special tokens, ends stripped."""
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        tok: Any = self.loaded.tokenizer
        return cast(str, tok.decode(list(tokens), special_token_policy=SpecialTokenPolicy.IGNORE))

    def text(self, job: Job, tokens: Sequence[int]) -> str:
        """A job's text from its ``tokens`` (its prefix's, then the generated
        ones): decoded, ends stripped, and a repetition loop at the end (a
        greedy decoder's, to the budget) cut back, never inside the job's
        prefix (:func:`~evoxtral_stream.text.loops.cut_loop`). Every decoder
        makes its texts here, so equal tokens give equal texts."""
        return cut_loop(self.decode(tokens).strip(), protect=len(job.prefix.strip()))

    def transcribe(
        self, batch: Sequence[Audio], adapters: Sequence[str | None] | None = None
    ) -> list[str]:
        """One text per array of ``batch`` (16 kHz float32 in [-1, 1]), in order.

        ``adapters`` names the adapter per array (see the class docstring).
        Empty arrays give "". Raises :class:`BackendError` for unknown
        adapters and when the GPU runs out of memory.
        """
        if adapters is None:
            adapters = [None] * len(batch)
        if len(adapters) != len(batch):
            raise BackendError(f"{len(adapters)} adapter names for {len(batch)} requests")
        jobs = [Job(i, a, n) for i, (a, n) in enumerate(zip(batch, adapters, strict=True))]
        return [d.text for d in self.transcribe_jobs(jobs)]

    def transcribe_jobs(self, jobs: Sequence[Job]) -> list[Done]:
        """One :class:`Done` per job, in order: one ``generate`` per adapter.

        A job's ``prefix`` is tokenized and continued from, so its text
        starts with the prefix; its ``language`` picks the prompt's
        ``lang:xx``; its ``draft`` is not used (``generate`` has no place for
        it; the result is the same). Raises like :meth:`transcribe`, and for
        an unknown language.
        """
        groups: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            self.language_ids(job.language)
            chosen = self._adapter(job.adapter)
            if len(job.audio):
                groups.setdefault(chosen, []).append(i)
        done = [Done(job, "") for job in jobs]
        for name, idx in groups.items():
            prefixes = [self.encode_prefix(jobs[i].prefix) for i in idx]
            rows = self.generate_tokens([jobs[i].audio for i in idx], adapter=name,
                                        prefixes=prefixes,
                                        languages=[jobs[i].language for i in idx])
            for i, pre, row in zip(idx, prefixes, rows, strict=True):
                done[i] = Done(jobs[i], self.text(jobs[i], pre + row), len(row),
                               tuple(pre + row))
        return done

    # --- continuous batching (SteppingBackend); see .continuous -------------

    @property
    def decoder(self) -> RowDecoder:
        """The continuous-batching decoder, made on first use.

        With ``static_cache`` a :class:`~.slots.SlotDecoder`, whose steps are
        compiled into CUDA graphs on a GPU; else a
        :class:`~.continuous.ContinuousDecoder`.
        """
        if self._decoder is None:
            if self._cfg.static_cache:
                from .slots import SlotDecoder

                on_gpu = self.loaded.device.type == "cuda"
                self._decoder = SlotDecoder(self, compile=_GRAPHS if on_gpu else None,
                                            lookahead=self._cfg.lookahead,
                                            shared=self._cfg.step_graphs == "shared")
            else:
                from .continuous import ContinuousDecoder

                self._decoder = ContinuousDecoder(self)
        return self._decoder

    @property
    def encoder(self) -> Encoder | None:
        """What the batched prefill encodes audio with when it embeds the
        prompts itself (``model.voxtral.encoder_graphs``): CUDA graphs on a
        GPU, the eager encoder elsewhere; None: the model's own forward does."""
        if self._encoder is None and self._cfg.encoder_graphs:
            from .encoder import EncoderGraphs, eager_encoder, encoder_parts

            tower, _ = encoder_parts(self.model)
            on_gpu = self.loaded.device.type == "cuda"
            self._encoder = EncoderGraphs(tower) if on_gpu else eager_encoder(tower)
        return self._encoder

    @property
    def prefill_graphs(self) -> PrefillGraphs | None:
        """The prompt prefill at fixed shapes (``model.voxtral.prefill_graphs``):
        CUDA graphs on a GPU once warmed up, the same route eagerly elsewhere;
        None: the plain prefill."""
        if self._prefill_graphs is None and self._cfg.prefill_graphs:
            from .prefill import PrefillGraphs

            window = self.spec.samples_per_window
            shortest = len(self.spec.ids(window, ()))  # no language given
            longest = len(self.spec.ids(window)) + self.max_new_tokens(window)
            self._prefill_graphs = PrefillGraphs(self.model, shortest, longest)
        return self._prefill_graphs

    def warm_up(self, max_batch: int) -> str:
        """Compile the slot decoder's steps for up to ``max_batch`` rows (see
        :meth:`.slots.SlotDecoder.warm_up`), capture the encoder's CUDA
        graphs for up to ``max_batch`` windows (see
        :class:`.encoder.EncoderGraphs`) and compile its layers
        (``model.voxtral.encoder_compile``); says what it did, and how many
        compiled graphs came from the compile cache."""
        from .encoder import EncoderGraphs
        from .slots import SlotDecoder

        done = []
        tally = CacheTally()
        dec = self.decoder
        if isinstance(dec, SlotDecoder) and not dec.active:
            sizes = dec.warm_up(max_batch)
            done.append(f"slot cache {dec.slots} x {dec.columns}, decode steps for batches "
                        f"{', '.join(map(str, sizes))}")
        enc = self.encoder
        if self._cfg.encoder_compile and not self._encoder_compile_tried:
            done.append(self._compile_encoder(max_batch))
        if isinstance(enc, EncoderGraphs):
            with self.use_adapter(None):
                counts = enc.capture(self._silent_window()[0], max_batch)
            done.append(f"encoder graphs for {', '.join(map(str, counts))} windows")
        prefill = self.prefill_graphs
        if prefill is not None and self.loaded.device.type == "cuda":
            with self.use_adapter(None):
                buckets = prefill.capture(max_batch)
            done.append(f"prefill graphs for {len(buckets)} (rows, columns) buckets"
                        if prefill.enabled else "prefill graphs failed (see the log)")
        if cached := tally.phrase():
            done.append(cached)
        return "; ".join(done) or "nothing to warm up"

    def _silent_window(self) -> torch.Tensor:
        """(1, mel bins, frames) features of one window of silence, in the
        model's dtype: what warm-up runs the encoder on."""
        example = self.features([np.zeros(self.spec.sampling_rate, np.float32)])
        return example.to(self.loaded.dtype)

    def _compile_encoder(self, max_batch: int) -> str:
        """Compile the encoder's layers (``model.voxtral.encoder_compile``) and
        run them for one window and for two, so that both of their graphs
        exist before the first request (see :func:`.encoder.compile_layers`).
        A compile that fails (no C++ compiler on the CPU, a graph break in
        another transformers version) leaves them eager and says why: left
        compiled, it would fail every request. Tried once: a restarted
        worker does not pay for the same failure again."""
        from .encoder import compile_layers, encoder_parts, uncompile_layers

        self._encoder_compile_tried = True
        tower = encoder_parts(self.model)[0]
        example = self._silent_window()
        start = time.perf_counter()
        compile_layers(tower, **ENCODER_COMPILE)
        try:
            with torch.inference_mode(), self.use_adapter(None):
                for n in sorted({1, min(2, max_batch)}):
                    tower(example.expand(n, -1, -1), return_dict=True)
        except Exception as e:  # any compile failure: serve eagerly
            uncompile_layers(tower)
            log.warning("encoder layers not compiled, running eagerly: %s", one_line(e))
            return f"encoder layers left eager ({one_line(e)})"
        return f"encoder layers compiled in {time.perf_counter() - start:.1f} s"

    @property
    def active(self) -> int:
        """Jobs running in the continuous batch."""
        return 0 if self._decoder is None else self._decoder.active

    def can_admit(self, job: Job) -> bool:
        return self.decoder.can_admit(job)

    def admit(self, jobs: Sequence[Job]) -> list[Done]:
        return self.decoder.admit(jobs)

    def step(self) -> list[Done]:
        return self.decoder.step()

    def cancel(self, job: Job) -> bool:
        return self._decoder is not None and self._decoder.cancel(job)

    def abort(self) -> list[Job]:
        return [] if self._decoder is None else self._decoder.abort()


_GRAPHS: dict[str, Any] = {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}
"""torch.compile settings of a slot decoder's step on CUDA: CUDA graphs, one per
shape (its ``shared`` steps make the batch size symbolic)."""


ENCODER_COMPILE: dict[str, Any] = {}
"""Extra ``torch.compile`` options of the encoder's layers
(``model.voxtral.encoder_compile``); inductor's defaults unless a test picks
another backend."""


def _group_text_attention(model: nn.Module) -> None:
    """Switch the language model from ``sdpa`` to :data:`.attention.GROUPED_SDPA`,
    which equals it eagerly and keeps one-token steps grouped when compiled."""
    from .attention import GROUPED_SDPA, register

    m: Any = model
    if m.config.get_text_config()._attn_implementation == "sdpa":
        register()
        m.set_attn_implementation({"text_config": GROUPED_SDPA})


class _RowBudgets(_StoppingCriteria):
    """Marks a row done once it generated its own number of tokens."""

    def __init__(self, prompt_len: int, budgets: torch.Tensor) -> None:
        self.prompt_len = prompt_len
        self.budgets = budgets

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return (input_ids.shape[1] - self.prompt_len) >= self.budgets


def _as_audio(a: npt.NDArray[Any]) -> Audio:
    arr = np.asarray(a, dtype=np.float32)
    if arr.ndim != 1:
        raise BackendError(f"audio must be mono (1-D), got shape {arr.shape}")
    return arr


def load_voxtral_backend(
    cfg: VoxtralConfig, language: str, *, extra_adapters: Mapping[str, str] | None = None
) -> VoxtralBackend:
    """Load the backend ``cfg`` describes, downloading weights on first use.

    ``language`` is the ISO 639-1 code put in the prompt, one of
    :data:`.prompt.LANGUAGES` exactly ("auto": detection). Raises
    :class:`BackendUnavailable` with one line naming what is missing and the
    config key to set.
    """
    return VoxtralBackend(load_model(cfg, language, extra_adapters=extra_adapters), cfg)
