"""Data shipped with the package: the bundled speech sample."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["sample_path", "sample_text"]


def sample_path() -> Path:
    """The bundled sample: 25 s of English speech, five sentences (Ogg Vorbis)."""
    return Path(str(resources.files(__name__).joinpath("sample.ogg")))


def sample_text() -> str:
    """What the bundled sample says."""
    return resources.files(__name__).joinpath("sample.txt").read_text("utf-8").strip()
