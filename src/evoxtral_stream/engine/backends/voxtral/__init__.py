"""Voxtral-Mini-3B + Evoxtral LoRA backend (transformers + peft).

Importing this package is cheap: torch, transformers and peft load only when
a function below needs them, so the engine can call
:func:`voxtral_available` without them installed. A missing library, weight
file or device is always a one-line :class:`BackendUnavailable`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from evoxtral_stream.config import VoxtralConfig
from evoxtral_stream.engine.backends.base import BackendUnavailable
from evoxtral_stream.extras import extra_hint

from .errors import ExportError
from .resolve import voxtral_available

if TYPE_CHECKING:
    from .backend import VoxtralBackend

__all__ = [
    "BackendUnavailable",
    "ExportError",
    "VoxtralBackend",
    "export_merged",
    "load_voxtral_backend",
    "voxtral_available",
]

_HINT = f"{extra_hint('voxtral')}, or set model.backend = \"whisper\""


def _missing(e: ImportError) -> BackendUnavailable:
    return BackendUnavailable(f"the Voxtral backend needs {e.name or 'torch'}: {_HINT}")


def load_voxtral_backend(
    cfg: VoxtralConfig, language: str, *, extra_adapters: Mapping[str, str] | None = None
) -> VoxtralBackend:
    """Load Voxtral as ``cfg`` says (see :func:`.backend.load_voxtral_backend`).

    ``extra_adapters`` maps adapter names to hub ids or folders for per-stream
    switching (needs ``model.voxtral.merge_lora = false``).
    """
    try:
        from .backend import load_voxtral_backend as load
    except ImportError as e:
        raise _missing(e) from None
    return load(cfg, language, extra_adapters=extra_adapters)


def export_merged(cfg: VoxtralConfig, outdir: Path) -> None:
    """Write the base with the LoRA merged in to ``outdir`` (see :mod:`.export`).

    Raises :class:`BackendUnavailable` (weights, libraries) or
    :class:`ExportError` (``outdir`` exists and is not empty, or is unwritable).
    """
    try:
        from .export import export_merged as export
    except ImportError as e:
        # Not _missing's "or set model.backend": that exports nothing.
        raise BackendUnavailable(
            f"export-merged needs the voxtral extra ({e.name or 'torch'} missing): "
            f"{extra_hint('voxtral', torch_first=True)}") from None
    export(cfg, outdir)


def __getattr__(name: str) -> object:
    # VoxtralBackend is importable by name without importing torch up front.
    if name == "VoxtralBackend":
        from .backend import VoxtralBackend

        return VoxtralBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
