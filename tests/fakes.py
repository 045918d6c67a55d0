"""Test doubles for the model: backends that replay scripted text.

They stand in for a real model only where the test is about the engine's
plumbing (scheduling, failures, timing), not about recognition. Also a gate
in front of the real journal's reads (:class:`GatedSource`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from evoxtral_stream.engine.backends.base import Done, Job
from evoxtral_stream.server.broadcast import HistorySource, SourceReplay

__all__ = [
    "AdapterScriptedBackend",
    "GatedBackend",
    "GatedSource",
    "LanguageScriptedBackend",
    "ScriptedBackend",
    "SteppingScriptedBackend",
    "words_so_far",
]


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


class GatedSource:
    """A history source (the real journal) whose reads wait until ``release()``.

    ``entered`` is set when a read waits; ``released`` says whether every
    read was let through by ``release()`` rather than by the timeout (a read
    on the event loop blocks the test's own coroutines, so the test cannot
    release it: it waits out ``timeout``).
    """

    def __init__(self, source: HistorySource, timeout: float = 3.0) -> None:
        self._source = source
        self._timeout = timeout
        self._gate = threading.Event()
        self.entered = threading.Event()
        self.released = True

    def release(self) -> None:
        self._gate.set()

    def replay(self, stream: str, since: int, before: int | None = None,
               limit: int | None = None) -> SourceReplay | None:
        self.entered.set()
        if not self._gate.wait(self._timeout):
            self.released = False
        return self._source.replay(stream, since, before, limit)


class AdapterScriptedBackend(ScriptedBackend):
    """A scripted backend that can switch adapters: text is ``NAME: script``."""

    adapter_names = ("default", "rl", "none")
    default_adapter = "default"

    def __init__(self, script: Callable[[npt.NDArray[np.float32]], str] | None = None) -> None:
        super().__init__(script)
        self.adapter_calls: list[list[str | None]] = []

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]],
                   adapters: Sequence[str | None] | None = None) -> list[str]:
        names: list[str | None] = list(adapters) if adapters is not None else [None] * len(batch)
        self.adapter_calls.append(names)
        texts = super().transcribe(batch)
        return [f"{n or 'default'}: {t}" for n, t in zip(names, texts, strict=True)]


class LanguageScriptedBackend(ScriptedBackend):
    """A multilingual job backend: text is ``LANG: script`` (``default`` for a
    job with no language); records every job it decodes, under ``lock``."""

    languages = ("de", "en", "fr")

    def __init__(self, script: Callable[[npt.NDArray[np.float32]], str] | None = None) -> None:
        super().__init__(script)
        self.jobs: list[Job] = []

    def transcribe_jobs(self, jobs: Sequence[Job]) -> list[Done]:
        for job in jobs:
            if job.language is not None and job.language not in self.languages:
                raise ValueError(f"unknown language {job.language!r}")
        with self.lock:
            self.jobs.extend(jobs)
        texts = self.transcribe([j.audio for j in jobs])
        return [Done(j, f"{j.language or 'default'}: {t}") for j, t in
                zip(jobs, texts, strict=True)]


class SteppingScriptedBackend(ScriptedBackend):
    """Continuous batching with scripted text: one word of ``script(audio)`` per step.

    Implements the SteppingBackend contract (admit/step/cancel/abort, one
    adapter per running batch) and JobBackend. Records, under ``lock``:
    ``admitted`` (lengths per admit call), ``admitted_adapters`` (the jobs'
    adapter names, likewise), ``cancelled`` (lengths),
    ``max_active`` and ``steps``. ``step_delay_s`` makes each step take
    time; ``fail_when`` applies to the one-call path as in ScriptedBackend;
    ``fail_steps`` lists step numbers (1-based, counted over the
    backend's life) that raise ``RuntimeError``; ``kill_steps`` ones that
    raise ``kill_with`` (a BaseException: the worker thread dies).
    """

    name = "stepping-scripted"
    adapter_names = ("default", "rl", "none")
    default_adapter = "default"

    def __init__(
        self,
        script: Callable[[npt.NDArray[np.float32]], str] | None = None,
        *,
        step_delay_s: float = 0.0,
        fail_steps: Sequence[int] = (),
        kill_steps: Sequence[int] = (),
        kill_with: type[BaseException] = SystemExit,
        fail_when: Callable[[npt.NDArray[np.float32]], bool] | None = None,
    ) -> None:
        super().__init__(script or (lambda a: " ".join(["w"] * (len(a) // 1000))),
                         fail_when=fail_when)
        self._step_delay = step_delay_s
        self._fail_steps = set(fail_steps)
        self._kill_steps = set(kill_steps)
        self._kill_with = kill_with
        self._rows: dict[Job, tuple[list[str], int]] = {}  # words, words done
        self._adapter: str | None = None
        self.admitted: list[list[int]] = []
        self.admitted_adapters: list[list[str | None]] = []
        self.cancelled: list[int] = []
        self.adapters_together: list[set[str]] = []
        self.max_active = 0
        self.steps = 0
        self.stepped = threading.Event()

    @staticmethod
    def _name(adapter: str | None) -> str:
        return adapter or "default"

    @property
    def active(self) -> int:
        return len(self._rows)

    def can_admit(self, job: Job) -> bool:
        return not self._rows or self._name(job.adapter) == self._adapter

    def transcribe_jobs(self, jobs: Sequence[Job]) -> list[Done]:
        texts = self.transcribe([j.audio for j in jobs])
        return [Done(j, t, len(t.split())) for j, t in zip(jobs, texts, strict=True)]

    def admit(self, jobs: Sequence[Job]) -> list[Done]:
        if not all(self.can_admit(j) for j in jobs) or len(
                {self._name(j.adapter) for j in jobs}) > 1:
            raise RuntimeError("adapters mixed in one running batch")
        with self.lock:
            self.admitted.append([len(j.audio) for j in jobs])
            self.admitted_adapters.append([j.adapter for j in jobs])
        done = []
        for job in jobs:
            words = self._script(job.audio).split()
            if not words:
                done.append(Done(job, "", 0))
                continue
            self._adapter = self._name(job.adapter)
            self._rows[job] = (words, 0)
        with self.lock:
            self.max_active = max(self.max_active, len(self._rows))
            self.adapters_together.append({self._name(j.adapter) for j in self._rows})
        return done

    def step(self) -> list[Done]:
        self.steps += 1
        if self._step_delay:
            time.sleep(self._step_delay)
        if self.steps in self._kill_steps:
            raise self._kill_with("scripted death")
        if self.steps in self._fail_steps:
            raise RuntimeError("scripted step failure")
        done = []
        for job, (words, n) in list(self._rows.items()):
            n += 1
            if n >= len(words):
                del self._rows[job]
                done.append(Done(job, " ".join(words), len(words)))
            else:
                self._rows[job] = (words, n)
        self.stepped.set()
        return done

    def cancel(self, job: Job) -> bool:
        if job not in self._rows:
            return False
        del self._rows[job]
        with self.lock:
            self.cancelled.append(len(job.audio))
        return True

    def abort(self) -> list[Job]:
        jobs = list(self._rows)
        self._rows.clear()
        return jobs
