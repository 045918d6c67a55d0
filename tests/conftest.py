"""Shared test setup: no network, and fixtures for config and the embedded model."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The tests' pseudo-terminals are terminals that move their cursor, whatever
# the one (or none: TERM=dumb under some CI runners) the suite runs from;
# those testing TERM=dumb and NO_COLOR set them themselves.
os.environ["TERM"] = "xterm-256color"
os.environ.pop("NO_COLOR", None)


import pytest

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.backends.base import Backend


@pytest.fixture(scope="session")
def whisper_backend() -> Backend:
    """The embedded Whisper tiny.en, loaded once for the whole run."""
    from evoxtral_stream.engine.backends.whisper import load_whisper_backend

    cfg = load_config()
    return load_whisper_backend(cfg.model.whisper, cfg.model.language)


@pytest.fixture(autouse=True)
def _stop_signals_restored() -> Iterator[None]:
    """A test that runs ``serve`` in this process leaves the handlers it sets
    for Ctrl-C and SIGTERM after its drain: the next test gets them back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        if signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)
