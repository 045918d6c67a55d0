"""Loading Voxtral: weights, tokenizer and LoRA adapters onto a device.

:func:`load_model` resolves the configured base and adapters (hub ids or
folders, see :mod:`.resolve`), checks what it can before the minute of
loading (the architecture, the adapter files, an adapter that
``export-merged`` already merged into the base), loads the base onto
``model.voxtral.device`` in ``model.voxtral.dtype``, refuses weights that are
missing or of another shape and a tokenizer whose audio framing does not fit
the encoder, and attaches or merges the adapters. Its :class:`LoadedModel` is
what :class:`.backend.VoxtralBackend` decodes with and what :mod:`.export`
saves. Every failure is a one-line :class:`BackendUnavailable` naming the
config key to set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from torch import nn

from evoxtral_stream.config import VoxtralConfig
from evoxtral_stream.engine.backends.base import BackendUnavailable, one_line
from evoxtral_stream.extras import extra_hint

from .adapter import AdapterError, SavedAdapter, attach_adapter, merge_lora, read_adapter
from .compile_cache import use_compile_cache
from .merge_note import NOTE, MergeNote, adapter_digest, read_note
from .prompt import LANGUAGES, PromptSpec, Tokenizer
from .resolve import Kind, Resolved, is_hub_id, resolve

__all__ = [
    "DEFAULT_ADAPTER",
    "NO_ADAPTER",
    "LoadedModel",
    "load_model",
    "load_tokenizer",
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
