"""Fault injection in the model worker: deaths, reloads, out of memory."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import pytest

from evoxtral_stream.config import WorkerConfig, load_config
from evoxtral_stream.engine.backends.base import Backend
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.engine.worker import ModelWorker, WorkerResult
from evoxtral_stream.events import (
    CaptionEvent,
    DecodeFailure,
    DecodeRequest,
    EngineEvent,
    Hypothesis,
    RequestKind,
)
from evoxtral_stream.server.app import CaptionServer
from tests.engine.test_journal import talk
from tests.fakes import GatedBackend, ScriptedBackend, SteppingScriptedBackend
from tests.helpers.http import http_get
from tests.helpers.threads import threads_refused


class Fatal(BaseException):
    """Not an Exception: the worker's batch retry does not catch it, the thread dies."""


class DyingBackend(ScriptedBackend):
    """Kills the calling thread on inputs of a length in ``kill``, ``times`` times."""

    def __init__(self, kill: set[int], times: int = 1) -> None:
        super().__init__()
        self.kill = kill
        self.times = times
        self.threads: set[str] = set()

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        self.threads.add(str(threading.get_ident()))
        if self.times and any(len(a) in self.kill for a in batch):
            self.times -= 1
            raise Fatal("segfault-like death")
        return super().transcribe(batch)


class OomBackend(ScriptedBackend):
    """CUDA out of memory on batches of more than ``fits`` inputs or on ``poison``."""

    def __init__(self, fits: int, poison: int = -1) -> None:
        super().__init__()
        self.fits = fits
        self.poison = poison

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        with self.lock:
            self.batches.append([len(a) for a in batch])
        if len(batch) > self.fits or any(len(a) == self.poison for a in batch):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [f"{len(a)} samples" for a in batch]


def wcfg(**kw: float) -> WorkerConfig:
    return dataclasses.replace(load_config(env={}).worker, **kw)  # type: ignore[arg-type]


def req(stream: str, n: int, kind: RequestKind = RequestKind.FINAL) -> DecodeRequest:
    return DecodeRequest(stream=stream, segment=0, revision=1, kind=kind,
                         audio=np.zeros(n, np.float32), start_sample=0, end_sample=n,
                         ready_at=0.0)


def collect(out: queue.Queue[WorkerResult], n: int) -> dict[str, WorkerResult]:
    got = [out.get(timeout=10) for _ in range(n)]
    assert out.empty() or out.get(timeout=0.2) is None, "nothing answered twice"
    return {r.stream: r for r in got}


def raising_once(out: queue.Queue[WorkerResult], streams: list[str],
                 error: BaseException) -> Callable[[WorkerResult], None]:
    """A deliver that puts results in ``out``, but raises ``error`` instead
    on the first result of each of ``streams``."""
    blows = list(streams)

    def deliver(result: WorkerResult) -> None:
        if result.stream in blows:
            blows.remove(result.stream)
            raise error
        out.put(result)

    return deliver


def test_a_dead_thread_is_restarted_the_model_reloaded_and_nothing_lost() -> None:
    backend = DyingBackend(kill={12})
    loads: list[Backend] = []

    def factory() -> Backend:
        loads.append(backend)
        return backend

    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=2, max_wait_ms=20), out.put, factory=factory,
                    sleep=lambda s: None)
    w.start()
    for i, n in enumerate([10, 11, 12, 13, 14]):
        assert w.submit(req(f"s{i}", n))
    got = collect(out, 5)
    assert all(isinstance(r, Hypothesis) for r in got.values())
    assert sorted(h.text for h in got.values() if isinstance(h, Hypothesis)) == [
        f"{n} samples" for n in (10, 11, 12, 13, 14)]
    assert len(loads) == 1
    st = w.stats()
    assert (st.restarts, st.failed, st.ready) == (1, 0, True)
    assert len(backend.threads) == 2                # a new thread took over
    assert w.submit(req("later", 20))               # service goes on
    assert isinstance(out.get(timeout=10), Hypothesis)
    w.stop(5)
    assert not w.alive


def test_a_restart_in_progress_counts_as_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """``alive`` stays true through a restart, also while the successor
    thread starts (found by the worker's state machine: it was false then)."""
    backend = DyingBackend(kill={10})
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=1, max_wait_ms=0), out.put, sleep=lambda s: None)
    seen: list[bool] = []
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name == "model-worker":
            seen.append(w.alive)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    w.start()
    assert w.submit(req("a", 10))                   # kills the thread once
    assert isinstance(out.get(timeout=10), Hypothesis)
    w.stop(5)
    assert w.stats().restarts == 1
    assert seen == [False, True]                    # not started yet; then restarting


def test_stop_waits_for_a_successor_that_ended_before_it_was_published(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A successor published only once started (so ``alive`` holds through a
    restart) may take the stop and end before the dying thread publishes it:
    stop then joined only the dying thread, not the one that ran last (nor
    waited for its native end)."""
    go = threading.Event()

    class GatedDeath(DyingBackend):
        def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
            if self.times:
                assert go.wait(10)
            return super().transcribe(batch)

    backend = GatedDeath(kill={10})
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=1, max_wait_ms=0), out.put, sleep=lambda s: None)
    started: list[threading.Thread] = []
    joined: list[threading.Thread] = []
    real_start, real_join = threading.Thread.start, threading.Thread.join

    def start(thread: threading.Thread) -> None:
        if thread.name == "model-worker":
            started.append(thread)
        real_start(thread)
        if thread.name == "model-worker" and len(started) == 2:
            thread.join(10)                         # the successor took the stop and ended
            deadline = time.monotonic() + 10
            while not joined and time.monotonic() < deadline:
                time.sleep(0.001)                   # then the stop joins the dying thread

    def join(thread: threading.Thread, timeout: float | None = None) -> None:
        if thread.name == "model-worker" and threading.current_thread() is stopper:
            joined.append(thread)
        real_join(thread, timeout)

    stopper = threading.Thread(target=w.stop, args=(10,), daemon=True)
    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(threading.Thread, "join", join)
    w.start()
    assert w.submit(req("a", 10))
    deadline = time.monotonic() + 10
    while w.stats().call_s == 0 and backend.times and time.monotonic() < deadline:
        time.sleep(0.001)                           # in the call that kills the thread
    stopper.start()
    while w.stats().pending == 0 and time.monotonic() < deadline:
        time.sleep(0.001)                           # the stop is queued
    go.set()                                        # the thread dies
    stopper.join(30)
    assert not stopper.is_alive()
    assert len(started) == 2 and not any(t.is_alive() for t in started)
    assert joined[0] is started[0]
    assert started[1] in joined, "stop did not join the thread that ran last"
    assert isinstance(out.get(timeout=10), Hypothesis)   # the successor answered it


def test_a_stop_that_times_out_reports_the_thread_it_leaves_and_a_later_stop_joins_it(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A stop whose timeout runs out while the thread is in a call that then
    kills it returned saying nothing and forgot the thread (``alive`` false),
    and the successor the dying thread started after it was published all
    the same: a model thread nobody joined or reported. The stop says it
    leaves the thread, ``alive`` stays true, and a later stop joins them all."""
    backend = DieOnceGated()
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=1, max_wait_ms=0, restart_backoff_s=0.0),
                    out.put, sleep=lambda s: None)
    started: list[threading.Thread] = []
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name == "model-worker":
            started.append(thread)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    w.start()
    assert w.submit(req("a", 10))
    assert backend.entered.wait(5)                  # stuck in the call
    with caplog.at_level(logging.ERROR, logger="evoxtral_stream.engine.worker"):
        w.stop(timeout=0.2)
    assert "did not end within 0.2 s of the stop; leaving it" in caplog.text
    assert w.alive
    backend.release()                               # the thread dies; a successor starts
    assert isinstance(out.get(timeout=10), Hypothesis)   # it answers, then takes the stop
    w.stop(5)
    assert len(started) == 2 and not any(t.is_alive() for t in started)
    assert not w.alive and w._thread is None


def test_a_successor_that_cannot_start_leaves_the_worker_down_answering_errors() -> None:
    """A death when no thread can start (the process at its thread limit):
    the dying thread stays on as a down worker's would, answering every
    request with an error, so no final waits forever and the health check
    says the model is down (it said nothing, and nothing was ever answered)."""
    backend = DyingBackend(kill={10})
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=1, max_wait_ms=0), out.put, sleep=lambda s: None)
    w.start()
    with threads_refused("model-worker") as refused:
        assert w.submit(req("a", 10))               # kills the thread
        got = out.get(timeout=10)
        assert refused == ["model-worker"]
        assert isinstance(got, DecodeFailure) and got.stream == "a"
        assert w.down is not None and "start" in w.down
        assert w.alive and not w.ready
        assert w.submit(req("b", 11))
        got = out.get(timeout=10)
        assert isinstance(got, DecodeFailure) and got.stream == "b"
        w.stop(5)
    assert not w.alive
    assert w.stats().restarts == 1


def test_a_worker_left_down_without_a_thread_survives_another_death() -> None:
    """The dying thread that stays on as the down worker (no thread could
    start) dies too if its deliver raises a BaseException: it carries on as
    a down successor would (it ended, answering nothing again, and a stop
    without a timeout waited for it forever)."""
    backend = DyingBackend(kill={10})
    out: queue.Queue[WorkerResult] = queue.Queue()
    deliver = raising_once(out, ["b"], Fatal("deliver died"))
    w = ModelWorker(backend, wcfg(max_batch=1, max_wait_ms=0), deliver, sleep=lambda s: None)
    w.start()
    with threads_refused("model-worker") as refused:
        assert w.submit(req("a", 10))               # kills the thread; none can start
        assert isinstance(out.get(timeout=10), DecodeFailure)
        assert w.submit(req("b", 11))               # its answer kills the thread again
        assert w.submit(req("c", 12))
        got = out.get(timeout=10)
        assert isinstance(got, DecodeFailure) and got.stream in ("b", "c")
        assert w.alive and w.down is not None
        stopper = threading.Thread(target=w.stop, daemon=True)
        stopper.start()
        stopper.join(10)
        assert not stopper.is_alive(), "stop waited forever"
    assert refused == ["model-worker", "model-worker"]
    assert not w.alive


@pytest.mark.parametrize("stepping", [False, True])
def test_a_deliver_that_raises_mid_batch_counts_each_request_decoded_once(
        stepping: bool) -> None:
    """``deliver`` raising on the first result of a batch kills the thread;
    the rest of the batch is queued again and decoded by the successor.
    ``decoded`` counted the whole batch before delivering, so those counted
    twice; it counts each request as its answer is given."""
    backend: Backend = SteppingScriptedBackend() if stepping else ScriptedBackend()
    out: queue.Queue[WorkerResult] = queue.Queue()
    deliver = raising_once(out, ["s0"], RuntimeError("the loop is gone"))
    w = ModelWorker(backend, wcfg(max_batch=4, max_wait_ms=0), deliver, sleep=lambda s: None)
    for i in range(3):                              # one batch: queued before the start
        assert w.submit(dataclasses.replace(req(f"s{i}", 3000), ready_at=float(i)))
    w.start()
    got = collect(out, 2)
    w.stop(5)
    assert sorted(got) == ["s1", "s2"]
    st = w.stats()
    assert (st.restarts, st.decoded, st.failed, st.submitted) == (1, 3, 0, 3)


def test_a_request_that_kills_the_model_twice_fails_alone() -> None:
    backend = DyingBackend(kill={66}, times=10)
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=1, max_wait_ms=0), out.put, sleep=lambda s: None)
    w.start()
    for i, n in enumerate([10, 66, 12]):
        w.submit(req(f"s{i}", n))
    got = collect(out, 3)
    bad = got["s1"]
    assert isinstance(bad, DecodeFailure)
    assert "died twice" in bad.message
    assert isinstance(got["s0"], Hypothesis)
    assert isinstance(got["s2"], Hypothesis)
    assert w.stats().restarts == 2
    w.stop(5)


def test_a_dying_thread_is_not_ready() -> None:
    """From its death until the successor has reloaded the worker is not
    ready: also while the dying thread answers what died twice (it was
    ready then, and a probe could see it before the restart began)."""
    backend = DyingBackend(kill={66}, times=2)
    seen: list[tuple[str, bool]] = []
    out: queue.Queue[WorkerResult] = queue.Queue()
    w: ModelWorker

    def deliver(result: WorkerResult) -> None:
        seen.append((type(result).__name__, w.ready))
        out.put(result)

    w = ModelWorker(backend, wcfg(max_batch=1, max_wait_ms=0), deliver, sleep=lambda s: None)
    w.start()
    assert w.submit(req("a", 66))                   # kills the thread twice
    bad = out.get(timeout=10)
    assert isinstance(bad, DecodeFailure) and "died twice" in bad.message
    assert seen == [("DecodeFailure", False)]
    assert w.submit(req("b", 10))                   # the successor serves
    assert isinstance(out.get(timeout=10), Hypothesis)
    w.stop(5)
    assert w.stats().restarts == 2


def test_past_the_restart_limit_the_worker_answers_errors_and_is_not_ready() -> None:
    backend = DyingBackend(kill={10}, times=1)

    def broken_factory() -> Backend:
        raise OSError("weights missing")

    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=1, max_wait_ms=0, restart_limit=2), out.put,
                    factory=broken_factory, sleep=lambda s: None)
    w.start()
    w.submit(req("a", 10))
    w.submit(req("b", 11))
    got = collect(out, 2)
    assert all(isinstance(r, DecodeFailure) for r in got.values())
    assert "model unavailable" in got["b"].message  # type: ignore[union-attr]
    assert w.alive and not w.ready
    assert not w.stats().ready
    w.stop(5)


@pytest.mark.parametrize("reloads", [False, True])
def test_a_worker_gone_down_keeps_nothing_it_died_on(reloads: bool) -> None:
    """What a death held is kept (to fail a request that dies twice) until it
    is answered; a worker gone down (past the restart limit, or its reloads
    failing) answers it with an error and never decodes again, so it must let
    go of it then, audio and all (it held it for good)."""
    backend = DyingBackend(kill={10})

    def broken_factory() -> Backend:
        raise OSError("weights missing")

    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=4, max_wait_ms=0, restart_limit=1 if reloads else 0),
                    out.put, factory=broken_factory if reloads else None, sleep=lambda s: None)
    w.start()
    assert w.submit(req("a", 10))                   # kills the thread: down
    got = out.get(timeout=10)
    assert isinstance(got, DecodeFailure) and "model unavailable" in got.message
    assert w.down is not None
    assert w.submit(req("b", 11))
    assert isinstance(out.get(timeout=10), DecodeFailure)
    w.stop(5)
    assert not w._died_on, "a down worker still holds what it died on"


def test_cuda_out_of_memory_splits_the_batch_then_fails_only_the_culprit() -> None:
    backend = OomBackend(fits=2, poison=13)
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=8, max_wait_ms=100), out.put)
    w.start()
    lengths = [10, 11, 12, 13, 14, 15, 16, 17]
    for i, n in enumerate(lengths):
        w.submit(req(f"s{i}", n))
    got = collect(out, len(lengths))
    failed = {s for s, r in got.items() if isinstance(r, DecodeFailure)}
    assert failed == {"s3"}
    assert "out of memory" in got["s3"].message  # type: ignore[union-attr]
    assert max(len(b) for b in backend.batches) > 2      # a big batch was tried first
    assert w.stats().restarts == 0 and w.alive        # OOM is not a death
    w.stop(5)


async def test_engine_keeps_every_final_through_a_worker_death() -> None:
    cfg = load_config(env={}, overrides={"stream.partial_interval_ms": 0,
                                         "worker.restart_backoff_s": 0.0})
    # The three finals arrive together: the first backend call (all of them) dies.
    backend = DyingBackend(kill=set(), times=1)
    calls = {"n": 0}
    original = backend.transcribe

    def transcribe(batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Fatal("the model thread dies")
        return original(batch)

    backend.transcribe = transcribe  # type: ignore[method-assign]
    finals: list[CaptionEvent] = []

    def listen(e: EngineEvent) -> None:
        if isinstance(e, CaptionEvent) and e.final:
            finals.append(e)

    async with Engine(cfg, backend, backend_factory=lambda: backend) as engine:
        engine.add_listener(listen)
        stream = engine.open_stream("mic")
        stream.push(talk(3))
        summary = await stream.close()
        st = engine.stats()
        assert engine.ready
    assert summary.errors == 0
    assert [f.seq for f in finals] == [1, 2, 3]
    assert st.worker.restarts == 1


def test_stop_with_a_timeout_returns_even_when_the_thread_is_stuck_and_its_inbox_full(
) -> None:
    backend = GatedBackend()
    cfg = dataclasses.replace(load_config().worker, max_queue=2, max_wait_ms=0)
    worker = ModelWorker(backend, cfg, lambda r: None)
    worker.start()
    try:
        assert worker.submit(req("s0", 1600))
        assert backend.entered.wait(5)          # the thread is stuck in its call
        assert worker.submit(req("s1", 1600)) and worker.submit(req("s2", 1600))
        assert not worker.submit(req("s3", 1600))     # the inbox is full
        t0 = time.monotonic()
        worker.stop(timeout=0.3)
        assert time.monotonic() - t0 < 5
    finally:
        backend.release()


class DieOnceGated(GatedBackend):
    """Its first call waits for ``release()``, then kills the thread."""

    def __init__(self) -> None:
        super().__init__()
        self.died = False

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        if not self.died:
            self.entered.set()
            self._gate.wait(10)
            self.died = True
            raise Fatal("the model thread dies")
        return ScriptedBackend.transcribe(self, batch)


def test_a_request_requeued_after_a_death_then_superseded_is_not_kept() -> None:
    """A request held at a death is kept (to fail it if it kills the model
    again) until answered; one superseded meanwhile is never answered, so it
    must be let go then, audio and all."""
    backend = DieOnceGated()
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=4, max_wait_ms=0, restart_backoff_s=0.0),
                    out.put, sleep=lambda s: None)
    w.start()
    partial = req("s", 16_000, RequestKind.PARTIAL)
    final = dataclasses.replace(partial, revision=2, kind=RequestKind.FINAL)
    assert w.submit(partial)
    assert backend.entered.wait(5)
    assert w.submit(final)                    # waits while the partial runs
    backend.release()                         # the thread dies holding the partial
    got = out.get(timeout=10)
    assert isinstance(got, Hypothesis) and got.kind is RequestKind.FINAL
    w.stop(5)
    assert out.empty()                        # the superseded partial is not answered
    assert w.stats().restarts == 1
    assert not w._died_on, "a superseded request is still held"


async def test_a_worker_past_its_restart_limit_fails_liveness_for_good() -> None:
    """It answers every request with an error from then on and never recovers,
    so ``/healthz`` must tell a supervisor to restart the process."""
    cfg = load_config(env={}, overrides={"server.port": 0, "stream.partial_interval_ms": 0,
                                         "worker.restart_limit": 0})
    backend = DyingBackend(kill=set(), times=0)
    dying = threading.Event()
    original = backend.transcribe

    def transcribe(batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        if dying.is_set():
            raise Fatal("the model thread dies")
        return original(batch)

    backend.transcribe = transcribe  # type: ignore[method-assign]
    async with Engine(cfg, backend) as engine, CaptionServer(engine, cfg.server) as server:
        base = f"http://127.0.0.1:{server.port}"
        stream = engine.open_stream("mic")
        stream.push(talk(1))
        summary = await stream.close()
        assert summary.finals == 1
        assert await http_get(f"{base}/healthz") == (200, "ok\n")

        dying.set()                             # the next call kills the thread
        stream = engine.open_stream("mic2")
        stream.push(talk(1))
        summary = await stream.close()
        assert summary.errors == 1
        assert not engine.ready and not engine.healthy
        assert await http_get(f"{base}/healthz") == (503, "model down\n")
        assert await http_get(f"{base}/readyz") == (503, "not ready\n")
