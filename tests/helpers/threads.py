"""A process at its thread limit, for one kind of thread."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def threads_refused(name: str, times: int | None = None) -> Iterator[list[str]]:
    """While inside, ``threading.Thread.start`` of a thread named ``name``
    raises RuntimeError as at the process's thread limit (the first
    ``times`` such starts; every one when None); other threads start. Yields
    the list of starts refused so far."""
    real_start = threading.Thread.start
    refused: list[str] = []

    def start(self: threading.Thread) -> None:
        if self.name == name and (times is None or len(refused) < times):
            refused.append(self.name)
            raise RuntimeError("can't start new thread")
        real_start(self)

    threading.Thread.start = start  # type: ignore[method-assign]
    try:
        yield refused
    finally:
        threading.Thread.start = real_start  # type: ignore[method-assign]
