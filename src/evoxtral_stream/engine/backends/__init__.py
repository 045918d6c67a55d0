"""Model backends and the choice between them (``model.backend``)."""

from __future__ import annotations

import logging

from ...config import ModelConfig
from ...extras import extra_hint
from .base import Backend, BackendError, BackendUnavailable

__all__ = ["Backend", "BackendError", "BackendUnavailable", "choose_backend", "load_backend"]

log = logging.getLogger(__name__)


def choose_backend(cfg: ModelConfig) -> tuple[str, str]:
    """Return (backend name, reason) for ``model.backend``; loads nothing."""
    if cfg.backend != "auto":
        return cfg.backend, f"model.backend = {cfg.backend!r}"
    try:
        from .voxtral import voxtral_available
    except ImportError as e:
        return "whisper", f"Voxtral support is not installed ({e.name} missing)"
    ok, why = voxtral_available(cfg.voxtral)
    if ok:
        return "voxtral", why
    return "whisper", f"Voxtral unavailable: {why}"


def load_backend(cfg: ModelConfig) -> Backend:
    """Load the configured backend; raises BackendUnavailable with one line."""
    name, why = choose_backend(cfg)
    if name == "voxtral":
        try:
            from .voxtral import load_voxtral_backend
        except ImportError as e:
            raise BackendUnavailable(
                f"the voxtral backend needs torch, transformers and peft ({e.name} missing): "
                f"{extra_hint('voxtral', torch_first=True)}"
            ) from None
        backend: Backend = load_voxtral_backend(cfg.voxtral, cfg.language,
                                                extra_adapters=cfg.voxtral.adapters)
    else:
        from .whisper import load_whisper_backend

        backend = load_whisper_backend(cfg.whisper, cfg.language)
    log.info("backend: %s (%s)", backend.name, why)
    return backend
