"""The Voxtral (+ Evoxtral LoRA) backend: batched greedy transcription.

One :meth:`VoxtralBackend.transcribe` call makes one ``generate`` call per
adapter present in the batch (one in the usual, merged case): prompts are
left-padded to a common length, every 30 s window of every array goes through
the audio encoder together, and decoding is greedy with ``max_new_tokens``
proportional to the longest audio. Prompt ids and log-mel features are built
directly on the model's device (see :mod:`.prompt`, :mod:`.features`). Each
job's prompt carries its own ``lang:xx`` (:attr:`VoxtralBackend.languages`),
so one batch mixes languages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
import torch
from safetensors import SafetensorError
from torch import nn
from transformers import StoppingCriteria as _StoppingCriteria

from evoxtral_stream.config import VoxtralConfig
from evoxtral_stream.engine.backends.base import (
    BackendError,
    BackendUnavailable,
    Done,
    Job,
    one_line,
)
from evoxtral_stream.extras import extra_hint
from evoxtral_stream.text.loops import cut_loop

from .adapter import AdapterError, SavedAdapter, attach_adapter, merge_lora, read_adapter
from .compile_cache import CacheTally, use_compile_cache
from .features import LogMel
from .merge_note import NOTE, MergeNote, adapter_digest, read_note
from .prompt import LANGUAGES, PromptSpec, Tokenizer, language_ids
from .resolve import Kind, Resolved, is_hub_id, resolve

if TYPE_CHECKING:
    from .continuous import RowDecoder
    from .encoder import Encoder
    from .prefill import PrefillGraphs

__all__ = [
    "DEFAULT_ADAPTER",
    "NO_ADAPTER",
    "LoadedModel",
    "VoxtralBackend",
    "load_model",
    "load_tokenizer",
    "load_voxtral_backend",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

DEFAULT_ADAPTER = "default"
"""Name of the adapter set by ``model.voxtral.adapter``."""
NO_ADAPTER = "none"
"""Per-request adapter name for plain Voxtral (unmerged mode only)."""

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_EXTRA_HINT = f"{extra_hint('voxtral')}, or set model.backend = \"whisper\""

Audio = npt.NDArray[np.float32]


def resolve_device(setting: str) -> torch.device:
    """``model.voxtral.device`` as a torch device; refuses CUDA that is absent."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                f"model.voxtral.device is {setting!r} but no CUDA device is available; "
                'set model.voxtral.device = "cpu" or "auto"'
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BackendUnavailable(
                f"model.voxtral.device is {setting!r} but only {torch.cuda.device_count()} "
                "CUDA device(s) exist; set model.voxtral.device"
            )
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``model.voxtral.dtype``: "auto" is bfloat16 on CUDA, float32 on CPU."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[setting]


@dataclass(frozen=True)
class LoadedModel:
    """A Voxtral model on its device with its tokenizer and prompt geometry.

    ``peft`` is the peft wrapper when adapters stay unmerged, else None;
    ``model`` is always the transformers model that ``generate`` runs on.
    """

    model: nn.Module
    peft: nn.Module | None
    tokenizer: Tokenizer
    spec: PromptSpec
    device: torch.device
    dtype: torch.dtype
    adapters: tuple[str, ...]
    merged: bool
    base: Resolved
    adapter: Resolved | None


def load_tokenizer(folder: Path) -> Tokenizer:
    """The Tekken tokenizer in ``folder/tekken.json``; one-line error otherwise."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    try:
        return cast(Tokenizer, Tekkenizer.from_file(folder / "tekken.json"))
    except Exception as e:  # any unreadable tokenizer file ends the same way
        raise BackendUnavailable(
            f"cannot read {folder / 'tekken.json'} ({one_line(e)}); set model.voxtral.base "
            "to a folder with the Voxtral tokenizer"
        ) from None


def _check_architecture(folder: Path) -> None:
    """Refuse a base whose config.json names another model type (a Whisper
    folder, say): transformers would build a default Voxtral from it and
    fail on every tensor after a long report. An unreadable config.json is
    left to transformers, which says why."""
    try:
        raw = json.loads((folder / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if isinstance(kind, str) and kind != "voxtral":
        raise BackendUnavailable(
            f"Voxtral base model folder {str(folder)!r} holds a {kind!r} model (model_type in "
            "config.json), not Voxtral; set model.voxtral.base to a Voxtral checkpoint"
        )


def _check_geometry(model: nn.Module, spec: PromptSpec, where: Path) -> None:
    """Refuse a tokenizer whose audio framing does not fit the model's encoder."""
    cfg: Any = getattr(model, "config", None)
    audio = cfg.audio_config
    # The encoder's two convolutions halve 2 * max_source_positions mel frames
    # once; the projector then stacks intermediate/hidden frames per token.
    frames = 2 * audio.max_source_positions
    stack = audio.intermediate_size // audio.hidden_size
    tokens = audio.max_source_positions // stack
    problems = []
    if cfg.audio_token_id != spec.audio:
        problems.append(f"audio token {cfg.audio_token_id} vs tokenizer {spec.audio}")
    if frames != spec.frames_per_window:
        problems.append(f"{frames} mel frames per window vs tokenizer {spec.frames_per_window}")
    if tokens != spec.tokens_per_window:
        problems.append(f"{tokens} audio tokens per window vs tokenizer {spec.tokens_per_window}")
    if audio.num_mel_bins != spec.num_mel_bins:
        problems.append(f"{audio.num_mel_bins} mel bins vs tokenizer {spec.num_mel_bins}")
    if problems:
        raise BackendUnavailable(
            f"Voxtral base model in {str(where)!r} does not match its tokenizer "
            f"({'; '.join(problems)}); set model.voxtral.base to an unmodified checkpoint"
        )


# The logger that transformers writes its load report with (a table of every
# missing, resized or unused tensor, tens of lines).
_REPORT_LOGGER = "transformers.modeling_utils"


@contextlib.contextmanager
def _load_report_held() -> Iterator[None]:
    """Hold back transformers' load report while a model loads and log it at
    debug level: what it says that matters (missing or resized tensors) ends
    the start in one line of ours, and unused ones get a line of their own,
    so the table would only stand before, or instead of, those lines. When
    the load raises, the report is logged as a warning: transformers' own
    errors point at it ("look at the above report")."""
    held: list[str] = []

    def hold(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "LOAD REPORT" not in text:
            return True
        held.append(text)
        return False

    logger = logging.getLogger(_REPORT_LOGGER)
    logger.addFilter(hold)
    level = logging.WARNING
    try:
        yield
        level = logging.DEBUG
    finally:
        logger.removeFilter(hold)
        for text in held:
            log.log(level, "transformers' load report: %s", text)


def _from_pretrained(
    folder: Path, device: torch.device, dtype: torch.dtype | str, attn: str
) -> nn.Module:
    from transformers import VoxtralForConditionalGeneration
    from transformers.utils.import_utils import is_accelerate_available

    # device_map loads straight onto the GPU but needs accelerate; without it
    # the weights pass through host memory once.
    placement: dict[str, Any] = {"device_map": str(device)} if is_accelerate_available() else {}
    cls: Any = VoxtralForConditionalGeneration
    try:
        with _load_report_held():
            # Resized tensors come back in the loading info (refused below)
            # instead of as an error that points at the held report.
            model, info = cls.from_pretrained(
                str(folder),
                dtype=dtype,
                attn_implementation=attn,
                local_files_only=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **placement,
            )
        if not placement:
            model.to(device)
    except torch.cuda.OutOfMemoryError:
        raise BackendUnavailable(
            f"not enough GPU memory on {device} to load the Voxtral base model "
            "(about 9.5 GB in bfloat16); free the GPU or set model.voxtral.device"
        ) from None
    except ImportError as e:
        raise BackendUnavailable(
            f"cannot load Voxtral with attn_implementation {attn!r} ({one_line(e)}); "
            'set model.voxtral.attn_implementation = "sdpa"'
        ) from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        # SafetensorError (a truncated model.safetensors) is none of the others.
        raise BackendUnavailable(
            f"cannot load the Voxtral base model from {str(folder)!r} ({one_line(e)}); "
            "set model.voxtral.base to a complete checkpoint"
        ) from None
    # transformers fills tensors the checkpoint lacks with random values and
    # only prints a report: a model that would caption with them is refused.
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise BackendUnavailable(
            f"the Voxtral base model in {str(folder)!r} lacks {len(missing)} weight tensors "
            f"(e.g. {', '.join(missing[:3])}); set model.voxtral.base to a complete checkpoint"
        )
    # Likewise for tensors whose shape is not the one config.json gives.
    resized = sorted(info.get("mismatched_keys") or ())
    if resized:
        key, saved, wanted = resized[0]
        shown = f"{key}: {tuple(saved)} in the file, {tuple(wanted)} in the model"
        raise BackendUnavailable(
            f"the Voxtral base model in {str(folder)!r} has {len(resized)} weight tensors of "
            f"another shape than its config.json gives (e.g. {shown}); set model.voxtral.base "
            "to a complete checkpoint"
        )
    unused = sorted(info.get("unexpected_keys") or ())
    if unused:
        log.warning("the Voxtral base model in %s holds %d tensor(s) that the model does not "
                    "use (e.g. %s); they are left out", folder, len(unused),
                    ", ".join(unused[:3]))
    cast(Any, model).eval()
    _greedy_generation_config(model, folder)
    return cast(nn.Module, model)


# What transformers' generate would take from a checkpoint's
# generation_config.json and apply on top of greedy argmax; the continuous and
# slot decoders apply none of it.
_GREEDY_NEUTRAL: dict[str, Any] = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None, "min_length": 0, "min_new_tokens": None,
    "length_penalty": 1.0, "renormalize_logits": False,
}


def _greedy_generation_config(model: Any, folder: Path) -> None:
    """Keep only the special token ids of the checkpoint's generation config.

    ``generate`` fills what a call leaves unset from ``model.generation_config``,
    so a checkpoint asking for a repetition penalty (say) would change the
    plain path's text but not the decoders' (plain argmax): every path must
    decode alike, greedily. What is dropped is logged.
    """
    from transformers import GenerationConfig

    old = getattr(model, "generation_config", None)
    if old is None:
        return
    dropped = {k: v for k, v in old.to_dict().items()
               if k in _GREEDY_NEUTRAL and v not in (None, _GREEDY_NEUTRAL[k])}
    if dropped:
        log.warning("the generation config in %s asks for %s; the engine decodes greedily "
                    "on every path and ignores it", folder,
                    ", ".join(f"{k}={v!r}" for k, v in sorted(dropped.items())))
    model.generation_config = cast(Any, GenerationConfig)(
        bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id,
        pad_token_id=old.pad_token_id, decoder_start_token_id=old.decoder_start_token_id)


def load_model(
    cfg: VoxtralConfig,
    language: str,
    *,
    extra_adapters: Mapping[str, str] | None = None,
    merge: bool | None = None,
    dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Resolve, load and adapt the model that ``cfg`` describes.

    ``merge`` overrides ``cfg.merge_lora`` and ``dtype`` overrides
    ``cfg.dtype`` (``"auto"`` here means the checkpoint's own dtype).
    Extra adapters (name -> hub id or folder) need unmerged mode. Every
    failure is a one-line :class:`BackendUnavailable`.
    """
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"the Voxtral backend needs {e.name}: {_EXTRA_HINT}") from None
    # Exactly a code: the engine compares them as they are (hello's list,
    # a stream's own language), so "EN" would be a second English.
    if language not in LANGUAGES:
        raise BackendUnavailable(f"model.language {language!r} is not a language Voxtral "
                                 f"transcribes; use one of {', '.join(LANGUAGES)}")
    merged = cfg.merge_lora if merge is None else merge
    extras = dict(extra_adapters or {})
    for name in extras:
        if name in (DEFAULT_ADAPTER, NO_ADAPTER) or not name:
            raise BackendUnavailable(
                f"adapter name {name!r} is reserved; choose another name for that adapter"
            )
        if "." in name:  # peft keeps adapters in torch ModuleDicts, whose keys cannot hold one
            raise BackendUnavailable(
                f"adapter name {name!r} contains '.'; rename {_extra_key(name)}"
            )
    if extras and merged:
        raise BackendUnavailable(
            "switching adapters per stream needs unmerged LoRA; "
            "set model.voxtral.merge_lora = false"
        )
    device = resolve_device(cfg.device)
    torch_dtype = resolve_dtype(cfg.dtype, device) if dtype is None else dtype
    # Before the weights load (a minute), so that a bad folder stops the start at once.
    cache = use_compile_cache(cfg.compile_cache_dir)
    if cache is not None:
        log.info("compile cache: %s", cache)
    base = resolve(cfg.base, Kind.BASE)
    _check_architecture(base.path)
    note = read_note(base.path)
    if note is not None:
        # Before the lookup, which would download a hub adapter only to refuse it.
        for name, ref in ([(DEFAULT_ADAPTER, cfg.adapter)] if cfg.adapter else []) + [
                *extras.items()]:
            if is_hub_id(ref) and ref == note.adapter:
                raise _merged_again(name, ref, base)
    adapter = resolve(cfg.adapter, Kind.ADAPTER) if cfg.adapter else None
    extra_paths = {name: resolve(ref, Kind.ADAPTER, key=_extra_key(name))
                   for name, ref in extras.items()}
    wanted = ([(DEFAULT_ADAPTER, adapter)] if adapter else []) + list(extra_paths.items())
    # Read before the base (a minute of loading): an unreadable adapter stops the start at once.
    saved: list[tuple[str, Resolved, SavedAdapter]] = []
    for name, res in wanted:
        assert res is not None
        try:
            saved.append((name, res, read_adapter(res.path)))
        except AdapterError as e:
            raise _adapter_unusable(name, res, e) from None
        if note is not None:
            _check_merged_note(note, name, res, base)

    tokenizer = load_tokenizer(base.path)
    try:
        spec = PromptSpec.from_tokenizer(tokenizer, language)
    except (ValueError, KeyError) as e:
        raise BackendUnavailable(
            f"the tokenizer in {str(base.path)!r} cannot build transcription prompts "
            f"({one_line(e)}); set model.voxtral.base to a Voxtral checkpoint"
        ) from None
    t0 = time.monotonic()
    model = _from_pretrained(base.path, device, torch_dtype, cfg.attn_implementation)
    _check_geometry(model, spec, base.path)

    peft_model: nn.Module | None = None
    names: list[str] = []
    for name, res, read in saved:
        try:
            peft_model = attach_adapter(peft_model or model, read, name)
        except AdapterError as e:
            raise _adapter_unusable(name, res, e) from None
        names.append(name)
    if peft_model is not None:
        peft_model.eval()
    gen_model = model
    if peft_model is not None and merged:
        try:
            gen_model = merge_lora(peft_model)
        except AdapterError as e:
            raise BackendUnavailable(
                f"cannot merge the LoRA adapters into the base model ({e}); set "
                "model.voxtral.merge_lora = false, or use adapters trained on this base"
            ) from None
        peft_model = None
    if peft_model is not None:
        gen_model = cast(nn.Module, cast(Any, peft_model).get_base_model())
    log.info(
        "Voxtral loaded in %.1f s: base %s (%s), adapters %s (%s), %s %s",
        time.monotonic() - t0,
        base.ref,
        base.source,
        ", ".join(names) or "none",
        "merged" if merged else "unmerged",
        device,
        str(next(gen_model.parameters()).dtype).removeprefix("torch."),
    )
    return LoadedModel(
        model=gen_model,
        peft=peft_model,
        tokenizer=tokenizer,
        spec=spec,
        device=device,
        dtype=next(gen_model.parameters()).dtype,
        adapters=tuple(names),
        merged=merged and bool(names),
        base=base,
        adapter=adapter,
    )


def _adapter_unusable(name: str, res: Resolved, e: AdapterError) -> BackendUnavailable:
    """The one line for adapter ``name`` that cannot be read or does not fit the base."""
    key = Kind.ADAPTER.value if name == DEFAULT_ADAPTER else _extra_key(name)
    return BackendUnavailable(
        f"cannot use LoRA adapter {res.ref!r} on this base model ({e}); set {key} "
        "to a complete adapter trained on this base"
    )


def _merged_again(name: str, ref: str, base: Resolved) -> BackendUnavailable:
    """The one line refusing adapter ``name`` (``ref``) that export-merged
    already merged into ``base``."""
    fix = ('set model.voxtral.adapter = ""' if name == DEFAULT_ADAPTER
           else f"remove {_extra_key(name)}")
    return BackendUnavailable(
        f"LoRA adapter {ref!r} is already merged into the Voxtral base model in "
        f"{str(base.path)!r} ({NOTE}); {fix} to serve it as exported"
    )


def _check_merged_note(note: MergeNote, name: str, res: Resolved, base: Resolved) -> None:
    """Refuse adapter ``name`` if it is the one ``note`` says is merged into
    ``base`` (the same weights wherever they lie; the same hub id was refused
    before the lookup, in :func:`load_model`): merged twice, its change would
    count double. Another adapter goes on top of the merged one, as
    configured, with a warning."""
    same = False
    if note.sha256:
        # Read just before: one gone since is reported by the load.
        with contextlib.suppress(OSError):
            same = adapter_digest(res.path) == note.sha256
    if same:
        raise _merged_again(name, res.ref, base)
    key = Kind.ADAPTER.value if name == DEFAULT_ADAPTER else _extra_key(name)
    log.warning("the Voxtral base model in %s already has LoRA adapter %r merged in (%s); "
                "%s %r goes on top of it", base.path, note.adapter, NOTE, key, res.ref)


def _extra_key(name: str) -> str:
    """The config key of the extra adapter ``name`` ([model.voxtral.adapters])."""
    return f"model.voxtral.adapters.{name}"


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
