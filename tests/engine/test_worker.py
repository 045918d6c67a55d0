"""The model worker: scheduling, superseding, bounded inbox, failures."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import queue
import threading
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest

from evoxtral_stream.config import WorkerConfig, load_config
from evoxtral_stream.engine.backends.base import BackendError
from evoxtral_stream.engine.worker import ModelWorker, WorkerResult
from evoxtral_stream.events import DecodeFailure, DecodeRequest, Hypothesis, RequestKind
from tests.fakes import GatedBackend, ScriptedBackend


def req(stream: str, segment: int, revision: int, kind: RequestKind, n: int,
        ready_at: float = 0.0) -> DecodeRequest:
    return DecodeRequest(stream=stream, segment=segment, revision=revision, kind=kind,
                         audio=np.zeros(n, np.float32), start_sample=0, end_sample=n,
                         ready_at=ready_at)



def results(q: queue.Queue[WorkerResult], n: int) -> list[WorkerResult]:
    return [q.get(timeout=10) for _ in range(n)]


def wcfg(**kw: int) -> WorkerConfig:
    """The packaged [worker] defaults with ``kw`` changed."""
    return dataclasses.replace(load_config(env={}).worker, **kw)  # type: ignore[arg-type]


CFG = wcfg(max_queue=64, max_batch=4, max_wait_ms=0)


def test_finals_run_before_partials_and_batches_are_bounded() -> None:
    backend = GatedBackend()
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, CFG, out.put)
    w.start()
    assert w.submit(req("blocker", 0, 1, RequestKind.PARTIAL, 1))
    assert backend.entered.wait(5)
    # While the backend is busy: 5 partials (older) and 2 finals (newer).
    for i in range(5):
        assert w.submit(req(f"p{i}", 0, 1, RequestKind.PARTIAL, 100 + i, ready_at=i))
    for i in range(2):
        assert w.submit(req(f"f{i}", 0, 1, RequestKind.FINAL, 200 + i, ready_at=10 + i))
    backend.release()
    got = results(out, 8)
    w.stop(5)
    assert [len(b) for b in backend.batches] == [1, 4, 3]
    # Second batch: both finals first, then the two oldest partials.
    assert backend.batches[1] == [200, 201, 100, 101]
    assert backend.batches[2] == [102, 103, 104]
    assert all(isinstance(r, Hypothesis) for r in got)


P, F = RequestKind.PARTIAL, RequestKind.FINAL


@pytest.mark.parametrize(("submitted", "superseded"), [
    # rev 2 supersedes rev 1, the final rev 2; the late partial: the final stays.
    ([(1, P, 10), (2, P, 20), (3, F, 30), (4, P, 40)], 3),
    # Out of the session's order (it never makes one): the final replaces a
    # partial of a higher revision all the same (it was dropped unanswered,
    # logged as a "second final", and its stream waited for it forever).
    ([(5, P, 10), (4, F, 30)], 1),
])
def test_newer_request_supersedes_pending_partial_but_never_a_final(
        submitted: list[tuple[int, RequestKind, int]], superseded: int) -> None:
    backend = GatedBackend()
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, CFG, out.put)
    w.start()
    w.submit(req("blocker", 0, 1, RequestKind.PARTIAL, 1))
    assert backend.entered.wait(5)
    for revision, kind, n in submitted:
        w.submit(req("a", 3, revision, kind, n))
    backend.release()
    got = results(out, 2)
    w.stop(5)
    assert backend.batches[1] == [30]
    final = got[1]
    assert isinstance(final, Hypothesis)
    assert final.final
    assert final.text == "30 samples"
    assert out.empty()                                  # nothing else is answered
    assert w.stats().superseded == superseded


def test_full_inbox_refuses_without_blocking() -> None:
    backend = GatedBackend()
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_queue=2, max_batch=1, max_wait_ms=0), out.put)
    w.start()
    w.submit(req("blocker", 0, 1, RequestKind.PARTIAL, 1))
    assert backend.entered.wait(5)
    # The worker thread is inside the backend: nothing drains the inbox now.
    assert w.submit(req("a", 0, 1, RequestKind.FINAL, 5))
    assert w.submit(req("b", 0, 1, RequestKind.FINAL, 6))
    assert not w.submit(req("c", 0, 1, RequestKind.FINAL, 7))
    assert w.stats().refused == 1
    backend.release()
    results(out, 3)
    w.stop(5)


def test_failing_request_is_isolated_and_worker_continues() -> None:
    bad_len = 13
    backend = ScriptedBackend(fail_when=lambda a: len(a) == bad_len)
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_queue=64, max_batch=8, max_wait_ms=50), out.put)
    w.start()
    lengths = [10, 11, 12, bad_len, 14]
    for i, n in enumerate(lengths):
        w.submit(req(f"s{i}", 0, 1, RequestKind.FINAL, n))
    got = results(out, len(lengths))
    w.submit(req("after", 0, 1, RequestKind.FINAL, 99))
    (later,) = results(out, 1)
    w.stop(5)
    failures = [r for r in got if isinstance(r, DecodeFailure)]
    ok = [r for r in got if isinstance(r, Hypothesis)]
    assert [f.stream for f in failures] == ["s3"]
    assert "scripted failure" in failures[0].message
    assert sorted(h.stream for h in ok) == ["s0", "s1", "s2", "s4"]
    assert isinstance(later, Hypothesis)
    assert later.text == "99 samples"
    assert w.stats().failed == 1


def test_a_failure_without_a_message_is_named_by_its_type(
        caplog: pytest.LogCaptureFixture) -> None:
    class Blank(ScriptedBackend):
        def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
            raise AssertionError

    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(Blank(), wcfg(max_queue=64, max_batch=2, max_wait_ms=50), out.put)
    w.start()
    for i in range(2):
        w.submit(req(f"s{i}", 0, 1, RequestKind.FINAL, 10 + i))
    got = results(out, 2)
    w.stop(5)
    assert all(isinstance(r, DecodeFailure) and r.message == "AssertionError: " for r in got)
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("worker")]
    assert {"backend failed on s0 segment 0: AssertionError: ",
            "backend failed on s1 segment 0: AssertionError: "} <= set(lines)
    batches = [line for line in lines if "on a batch" in line]
    assert all("(AssertionError: )" in line for line in batches)
    # Where it came from, once per exception type (the rest would repeat it).
    traced = [r for r in caplog.records if r.exc_info and "backend failed on s" in r.getMessage()]
    assert len(traced) == 1
    assert "in transcribe" in caplog.text and "raise AssertionError" in caplog.text


def test_a_backend_error_explains_itself_without_a_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    class Refusing(ScriptedBackend):
        def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
            raise BackendError("audio too long")

    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(Refusing(), wcfg(max_queue=64, max_batch=1, max_wait_ms=50), out.put)
    w.start()
    w.submit(req("s0", 0, 1, RequestKind.FINAL, 10))
    got = results(out, 1)
    w.stop(5)
    assert isinstance(got[0], DecodeFailure) and got[0].message == "BackendError: audio too long"
    assert "backend failed on s0 segment 0: BackendError: audio too long" in caplog.text
    assert not [r for r in caplog.records if r.exc_info]


def test_stop_finishes_queued_work() -> None:
    backend = ScriptedBackend(delay_s=0.01)
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_queue=64, max_batch=2, max_wait_ms=0), out.put)
    w.start()
    for i in range(6):
        w.submit(req(f"s{i}", 0, 1, RequestKind.FINAL, 10 + i))
    w.stop(10)
    assert not w.alive
    assert out.qsize() == 6


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_stop_returns_once_the_model_thread_has_ended_natively() -> None:
    """``join`` returns at the thread's Python end; its native end (C++
    thread-locals: torch's TLS stash, which takes the GIL to let go of its
    objects) comes after. An interpreter exit in that gap aborted the process
    ("terminate called without an active exception"). A slow thread-local
    destructor stands in for torch's here."""
    libc = ctypes.CDLL(None)
    ended = threading.Event()

    def slow(_: int | None) -> None:
        time.sleep(0.5)
        ended.set()

    slow_destructor = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(slow)

    key = ctypes.c_uint()
    assert libc.pthread_key_create(ctypes.byref(key), slow_destructor) == 0
    native: list[int] = []

    class Backend(ScriptedBackend):
        def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
            native.append(threading.get_native_id())
            assert libc.pthread_setspecific(key, ctypes.c_void_p(1)) == 0
            return super().transcribe(batch)

    try:
        out: queue.Queue[WorkerResult] = queue.Queue()
        w = ModelWorker(Backend(), CFG, out.put)
        w.start()
        assert w.submit(req("s0", 0, 1, RequestKind.FINAL, 10, ready_at=time.monotonic()))
        results(out, 1)
        w.stop(10)
        assert ended.is_set()
        assert not os.path.exists(f"/proc/self/task/{native[0]}")
    finally:
        ended.wait(10)
        libc.pthread_key_delete(key)


def test_start_twice_is_an_error() -> None:
    w = ModelWorker(ScriptedBackend(), CFG, lambda r: None)
    w.start()
    with pytest.raises(RuntimeError):
        w.start()
    w.stop(5)


def clocked_worker() -> tuple[ModelWorker, queue.Queue[WorkerResult], list[float]]:
    """A started worker on a scripted model whose clock reads ``now[0]``."""
    out: queue.Queue[WorkerResult] = queue.Queue()
    now = [100.0]
    w = ModelWorker(ScriptedBackend(), CFG, out.put, clock=lambda: now[0])
    w.start()
    return w, out, now


def test_lag_is_logged_with_the_accumulated_delay(caplog: pytest.LogCaptureFixture) -> None:
    w, out, _ = clocked_worker()  # at 100.0
    with caplog.at_level("WARNING", logger="evoxtral_stream.engine.worker"):
        w.submit(req("late", 0, 1, RequestKind.FINAL, 10, ready_at=97.5))
        results(out, 1)
    w.stop(5)
    assert any("2.5 s behind" in r.getMessage() for r in caplog.records), caplog.text


def test_lag_reports_say_the_peak_between_them_and_when_it_caught_up(
        caplog: pytest.LogCaptureFixture) -> None:
    """Reports come at most every 5 s. A spike between two of them used to be
    unreported (the next report said only that moment's lag, or nothing once
    under a second), so a 9 s stall looked like a 2.5 s one."""
    w, out, now = clocked_worker()
    with caplog.at_level("INFO", logger="evoxtral_stream.engine.worker"):
        for i, (t, waited) in enumerate([(100.0, 2.5), (101.0, 9.0), (106.0, 0.2),
                                          (107.0, 0.1), (120.0, 3.0), (126.0, 1.5)]):
            now[0] = t
            w.submit(req(f"s{i}", 0, 1, RequestKind.FINAL, 10, ready_at=t - waited))
            results(out, 1)
    w.stop(5)
    lines = [(r.levelname, r.getMessage().split(" (")[0].split(":")[0], r.getMessage())
             for r in caplog.records if "behind" in r.getMessage()]
    assert [line[:2] for line in lines] == [
        ("WARNING", "model worker is 2.5 s behind"),
        ("INFO", "model worker caught up"),
        ("WARNING", "model worker is 3.0 s behind"),
        ("WARNING", "model worker is 1.5 s behind")], caplog.text
    assert lines[1][2] == ("model worker caught up: 0.2 s behind now; "
                           "up to 9.0 s since the last report")
    assert "since the last report" not in lines[2][2]  # 3.0 s was the most
    assert w.stats().max_lag_s == 9.0


def test_a_call_ending_while_stats_are_read_is_counted_once() -> None:
    """GPU busy (bench/gpu_load.py) is ``busy_s + call_s``. ``stats`` read
    ``call_s`` outside the worker's lock and the call's time was added to
    ``busy_s`` after it stopped counting as running, so a call ending just
    then was counted in neither (or in both)."""
    now = [100.0]
    ended = threading.Event()
    paused, release = threading.Event(), threading.Event()
    model_thread: list[int] = []

    def clock() -> float:
        # The first time the model thread reads the clock after the call:
        # held there, as a preemption of that thread would hold it.
        if ended.is_set() and threading.get_ident() in model_thread and not paused.is_set():
            paused.set()
            release.wait(10)
        return now[0]

    def script(audio: npt.NDArray[np.float32]) -> str:
        model_thread.append(threading.get_ident())
        now[0] += 2.0
        ended.set()
        return "text"

    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(ScriptedBackend(script), CFG, out.put, clock=clock)
    w.start()
    try:
        w.submit(req("s", 0, 1, RequestKind.FINAL, 10, ready_at=now[0]))
        assert paused.wait(10)
        seen: list[float] = []
        reader = threading.Thread(target=lambda: seen.append(
            (st := w.stats()).busy_s + st.call_s))
        reader.start()
        reader.join(0.3)     # it waits for the lock now: the call ends first
        release.set()
        reader.join(10)
        assert seen == [2.0]
        results(out, 1)
    finally:
        release.set()
        w.stop(5)
