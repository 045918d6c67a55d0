"""Errors of the Voxtral package that callers catch without importing torch."""

from __future__ import annotations

__all__ = ["ExportError"]


class ExportError(RuntimeError):
    """``export-merged`` cannot write its output; the message is one line for people."""
