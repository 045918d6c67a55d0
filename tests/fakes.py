"""Test doubles for the model: backends that replay scripted text.

They stand in for a real model only where the test is about the engine's
plumbing (scheduling, failures, timing), not about recognition.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["AdapterScriptedBackend", "GatedBackend", "ScriptedBackend", "words_so_far"]


def words_so_far(audio: npt.NDArray[np.float32]) -> str:
    """A stand-in transcript: one word per half second of audio, so partials grow."""
    return " ".join(f"w{i}" for i in range(len(audio) // 8000))


class ScriptedBackend:
    """Returns ``script(audio)`` for each input; records every batch it saw.

    ``fail_when(audio)`` true makes the whole call raise, as a real backend
    failing on one bad input would.
    """

    name = "scripted"

    def __init__(
        self,
        script: Callable[[npt.NDArray[np.float32]], str] | None = None,
        *,
        delay_s: float = 0.0,
        fail_when: Callable[[npt.NDArray[np.float32]], bool] | None = None,
    ) -> None:
        self._script = script or (lambda a: f"{len(a)} samples")
        self._delay = delay_s
        self._fail_when = fail_when
        self.batches: list[list[int]] = []
        self.lock = threading.Lock()

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        with self.lock:
            self.batches.append([len(a) for a in batch])
        if self._delay:
            time.sleep(self._delay)
        if self._fail_when is not None and any(self._fail_when(a) for a in batch):
            raise RuntimeError("scripted failure")
        return [self._script(a) for a in batch]


class GatedBackend(ScriptedBackend):
    """A scripted backend whose first call waits until ``release()``.

    While it waits, requests pile up in the worker, so tests can check how the
    worker orders and prunes them.
    """

    def __init__(self, script: Callable[[npt.NDArray[np.float32]], str] | None = None) -> None:
        super().__init__(script)
        self._gate = threading.Event()
        self.entered = threading.Event()

    def release(self) -> None:
        self._gate.set()

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        self.entered.set()
        self._gate.wait(10)
        return super().transcribe(batch)


class AdapterScriptedBackend(ScriptedBackend):
    """A scripted backend that can switch adapters: text is ``NAME: script``."""

    adapter_names = ("default", "rl", "none")

    def __init__(self, script: Callable[[npt.NDArray[np.float32]], str] | None = None) -> None:
        super().__init__(script)
        self.adapter_calls: list[list[str | None]] = []

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]],
                   adapters: Sequence[str | None] | None = None) -> list[str]:
        names: list[str | None] = list(adapters) if adapters is not None else [None] * len(batch)
        self.adapter_calls.append(names)
        texts = super().transcribe(batch)
        return [f"{n or 'default'}: {t}" for n, t in zip(names, texts, strict=True)]
