"""The model worker against a faulty stepping backend: randomized invariants,
and the backend calls a fault may come from (cancel, abort after a reload,
the warm-up of a worker that is down)."""

from __future__ import annotations

import dataclasses
import os
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest

from evoxtral_stream.config import WorkerConfig, load_config
from evoxtral_stream.engine.backends.base import Done, Job
from evoxtral_stream.engine.worker import ModelWorker, WorkerResult
from evoxtral_stream.events import DecodeFailure, DecodeRequest, Hypothesis, RequestKind
from tests.engine.test_worker_continuous import drain
from tests.fakes import SteppingScriptedBackend

PARTIAL, FINAL = RequestKind.PARTIAL, RequestKind.FINAL


def wcfg(**kw: object) -> WorkerConfig:
    return dataclasses.replace(load_config(env={}).worker, **kw)  # type: ignore[arg-type]


class Fatal(BaseException):
    pass


class Chaos(SteppingScriptedBackend):
    """Random failures in admit/step/transcribe_jobs, rare deaths; records violations."""

    def __init__(self, rng: random.Random, max_batch: int, kills: int) -> None:
        super().__init__(step_delay_s=0.0005)
        self.rng = rng
        self.max_batch = max_batch
        self.kills = kills
        self.violations: list[str] = []
        self.cancelled_keys: list[object] = []

    def _maybe(self, p: float, where: str) -> None:
        if self.rng.random() < p:
            raise RuntimeError(f"random failure in {where}")
        if self.kills and self.rng.random() < p / 4:
            self.kills -= 1
            raise Fatal(f"death in {where}")

    def admit(self, jobs: Sequence[Job]) -> list[Done]:
        names = {self._name(j.adapter) for j in jobs}
        if self._rows:
            names.add(self._adapter or "default")
        if len(names) > 1:
            self.violations.append(f"adapters mixed: {names}")
        if len(self._rows) + len(jobs) > self.max_batch:
            self.violations.append("max_batch exceeded")
        self._maybe(0.05, "admit")
        return super().admit(jobs)

    def step(self) -> list[Done]:
        self._maybe(0.02, "step")
        return super().step()

    def transcribe_jobs(self, jobs: Sequence[Job]) -> list[Done]:
        if len(jobs) > self.max_batch:
            self.violations.append("batch over max_batch")
        if any(len(j.audio) == 13_000 for j in jobs):  # a poison request
            raise RuntimeError("poison")
        self._maybe(0.05, "transcribe_jobs")
        return super().transcribe_jobs(jobs)

    def abort(self) -> list[Job]:
        jobs = super().abort()
        self._maybe(0.05, "abort")
        return jobs

    def can_admit(self, job: Job) -> bool:
        if self.kills and self.rng.random() < 0.002:
            self.kills -= 1
            raise Fatal("death in can_admit")
        return super().can_admit(job)

    def cancel(self, job: Job) -> bool:
        ok = super().cancel(job)
        self._maybe(0.1, "cancel")
        if ok:
            self.cancelled_keys.append(job.key)
        return ok


def mk(stream: str, seg: int, rev: int, kind: RequestKind, words: int,
       adapter: str | None, now: float) -> DecodeRequest:
    n = words * 1000
    return DecodeRequest(stream=stream, segment=seg, revision=rev, kind=kind,
                         audio=np.zeros(n, np.float32), start_sample=0, end_sample=n,
                         ready_at=now, adapter=adapter)


# NSEEDS=300 for a long run.
@pytest.mark.parametrize("seed", range(int(os.environ.get("NSEEDS", "12"))))
def test_every_request_gets_at_most_one_answer_and_finals_exactly_one(seed: int) -> None:
    rng = random.Random(seed)
    max_batch = rng.choice([1, 2, 3, 4])
    backend = Chaos(random.Random(seed + 1000), max_batch, kills=rng.choice([0, 1, 2, 5]))
    answers: list[WorkerResult] = []
    lock = threading.Lock()

    def deliver(r: WorkerResult) -> None:
        with lock:
            answers.append(r)

    w = ModelWorker(backend, wcfg(max_batch=max_batch, max_wait_ms=rng.choice([0, 2]),
                                  restart_limit=rng.choice([0, 1, 3, 1000]), restart_backoff_s=0.0,
                                  max_queue=1000, batching=rng.choice(['batch', 'continuous'])),
                    deliver, factory=lambda: backend, sleep=lambda s: None)
    w.start()
    submitted: list[DecodeRequest] = []
    for s in range(4):
        stream = f"s{s}"
        adapter = rng.choice([None, "rl"])
        for seg in range(3):
            rev = 0
            for _ in range(rng.randint(0, 3)):
                rev += 1
                r = mk(stream, seg, rev, PARTIAL, rng.choice([1, 5, 13, 20, 40]), adapter,
                       time.monotonic())
                assert w.submit(r)
                submitted.append(r)
                if rng.random() < 0.5:
                    time.sleep(rng.random() * 0.01)
            rev += 1
            r = mk(stream, seg, rev, FINAL, rng.choice([0, 2, 13, 30]), adapter, time.monotonic())
            assert w.submit(r)
            submitted.append(r)
            if rng.random() < 0.5:
                time.sleep(rng.random() * 0.01)
    w.stop(30)
    assert not w.alive
    assert backend.violations == []
    ids = Counter((a.stream, a.segment, a.revision) for a in answers)
    twice = [k for k, n in ids.items() if n > 1]
    assert twice == [], f"answered twice: {twice}"
    finals = {(r.stream, r.segment, r.revision) for r in submitted if r.kind is FINAL}
    missing = finals - set(ids)
    assert not missing, f"finals never answered: {missing}"
    for a in answers:
        if isinstance(a, Hypothesis) and a.kind is FINAL and a.revision:
            pass
    cancelled = {(k.stream, k.segment, k.revision) for k in backend.cancelled_keys}  # type: ignore[attr-defined]
    stale = cancelled & set(ids)
    assert not stale, f"cancelled partials answered: {stale}"
    st = w.stats()
    assert st.submitted == len(submitted)
    assert st.decoded == sum(isinstance(a, Hypothesis) for a in answers)
    assert st.failed == sum(isinstance(a, DecodeFailure) for a in answers)
    assert st.submitted == st.decoded + st.failed + st.superseded + st.cancelled, st
    assert st.running == 0 and st.pending == 0


# --- targeted reproductions ------------------------------------------------------


def req(stream: str, words: int, kind: RequestKind = FINAL, *, segment: int = 0,
        revision: int = 1) -> DecodeRequest:
    return mk(stream, segment, revision, kind, words, None, 0.0)


def assert_stalls(w: ModelWorker, entered: threading.Event, gate: threading.Event) -> None:
    """Once the backend call is ``entered``, stuck there 6x the stall limit,
    the worker is stalled and not ready; ``gate`` lets it go, and it stops."""
    try:
        assert entered.wait(5)
        time.sleep(0.3)
        assert w.stalled
        assert not w.ready
    finally:
        gate.set()
        w.stop(5)


def test_an_exception_from_cancel_is_a_backend_failure_not_a_thread_death() -> None:
    """RowDecoder.cancel copies the KV cache (select/_keep) outside the OOM
    handling admit and step have: CUDA out of memory there reaches the worker
    as an Exception. The module doc sends backend Exceptions through the
    failure rules (abort, batch path); only a BaseException, a bug or a
    failing deliver kills the thread. Here the thread dies and the model is
    reloaded from scratch."""

    class CancelOom(SteppingScriptedBackend):
        def cancel(self, job: Job) -> bool:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    backend = CancelOom(step_delay_s=0.005)
    loads: list[int] = []

    def factory() -> CancelOom:
        loads.append(1)
        return backend

    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=4, max_wait_ms=0), out.put,
                    factory=factory, sleep=lambda s: None)
    w.start()
    assert w.submit(req("a", 200, PARTIAL, revision=1))
    assert w.submit(req("b", 300, PARTIAL))
    assert backend.stepped.wait(5)
    assert w.submit(req("a", 4, FINAL, revision=2))     # supersedes the running partial
    got = {(r.stream, r.kind): r for r in drain(out, 2)}
    w.stop(5)
    assert isinstance(got[("a", FINAL)], Hypothesis)
    assert isinstance(got[("b", PARTIAL)], Hypothesis)
    assert (w.stats().restarts, len(loads)) == (0, 0)


def test_a_hung_cancel_is_seen_as_a_stall() -> None:
    """"The worker notes when each backend call starts": cancel is one, untimed."""
    gate = threading.Event()
    entered = threading.Event()

    class HangingCancel(SteppingScriptedBackend):
        def cancel(self, job: Job) -> bool:
            entered.set()
            gate.wait(10)
            return super().cancel(job)

    backend = HangingCancel(step_delay_s=0.005)
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=4, max_wait_ms=0, stall_timeout_s=0.05), out.put)
    w.start()
    assert w.submit(req("a", 300, PARTIAL, revision=1))
    assert backend.stepped.wait(5)
    assert w.submit(req("a", 4, FINAL, revision=2))
    assert_stalls(w, entered, gate)


def test_a_hung_abort_after_a_reload_is_not_ready() -> None:
    """After a death the successor reloads, clears _loading, then calls
    backend.abort() untimed: a hang there reads as ready and not stalled."""
    gate = threading.Event()
    entered = threading.Event()

    class HangingAbort(SteppingScriptedBackend):
        def abort(self) -> list[Job]:
            entered.set()
            gate.wait(10)
            return super().abort()

    backend = HangingAbort(kill_steps=[2])
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=4, max_wait_ms=0, stall_timeout_s=0.05),
                    out.put, factory=lambda: backend, sleep=lambda s: None)
    w.start()
    assert w.submit(req("a", 20))
    assert_stalls(w, entered, gate)


def test_a_worker_that_is_down_answers_without_warming_the_model_up_again() -> None:
    """Down, the worker "stays alive only to answer every request with a
    DecodeFailure, so no final waits forever"; its successor thread still
    runs the backend's warm-up first (minutes of compiling on a GPU, or
    forever on a faulted one), and every final waits for it."""
    gate = threading.Event()

    class Warms(SteppingScriptedBackend):
        def __init__(self) -> None:
            super().__init__(kill_steps=[1])
            self.warmed = 0

        def warm_up(self, max_batch: int) -> str:
            self.warmed += 1
            if self.warmed > 1:
                gate.wait(10)                # a long compile, or a hung GPU
            return "compiled"

    backend = Warms()
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=4, max_wait_ms=0, restart_limit=0), out.put,
                    sleep=lambda s: None)
    w.start()
    try:
        assert w.submit(req("a", 5))                       # kills the thread: down
        deadline = time.monotonic() + 5
        while w.down is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.down is not None
        assert w.submit(req("b", 5))
        got = {r.stream: r for r in (out.get(timeout=10), out.get(timeout=10))}
        assert all(isinstance(r, DecodeFailure) for r in got.values())
    finally:
        gate.set()
        w.stop(5)
