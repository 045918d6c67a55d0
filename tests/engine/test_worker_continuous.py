"""The worker's continuous-batching mode, with a scripted stepping backend."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time

import numpy as np
import pytest

from evoxtral_stream.config import WorkerConfig, load_config
from evoxtral_stream.engine.backends.base import Backend, Job
from evoxtral_stream.engine.worker import ModelWorker, WorkerResult
from evoxtral_stream.events import DecodeFailure, DecodeRequest, Hypothesis, RequestKind
from tests.fakes import ScriptedBackend, SteppingScriptedBackend

PARTIAL, FINAL = RequestKind.PARTIAL, RequestKind.FINAL


def wcfg(**kw: object) -> WorkerConfig:
    return dataclasses.replace(load_config(env={}).worker, **kw)  # type: ignore[arg-type]


def req(stream: str, words: int, kind: RequestKind = FINAL, *, segment: int = 0,
        revision: int = 1, adapter: str | None = None, ready_at: float = 0.0) -> DecodeRequest:
    """A request whose scripted text has ``words`` words (1000 samples a word)."""
    n = words * 1000
    return DecodeRequest(stream=stream, segment=segment, revision=revision, kind=kind,
                         audio=np.zeros(n, np.float32), start_sample=0, end_sample=n,
                         ready_at=ready_at, adapter=adapter)


def drain(out: queue.Queue[WorkerResult], n: int) -> list[WorkerResult]:
    got = [out.get(timeout=10) for _ in range(n)]
    try:
        extra = out.get(timeout=0.2)
    except queue.Empty:
        return got
    raise AssertionError(f"answered more than expected: {extra}")


def test_uses_the_stepping_path_and_gives_whole_texts() -> None:
    backend = SteppingScriptedBackend()
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=4, max_wait_ms=20), out.put)
    assert w.mode == "continuous"
    w.start()
    for i, words in enumerate([3, 5, 0, 7]):
        assert w.submit(req(f"s{i}", words))
    got = {r.stream: r for r in drain(out, 4)}
    w.stop(5)
    assert {s: r.text for s, r in got.items() if isinstance(r, Hypothesis)} == {
        "s0": "w w w", "s1": "w w w w w", "s2": "", "s3": "w w w w w w w"}
    assert backend.batches == []           # never the one-call path
    st = w.stats()
    assert (st.decoded, st.tokens, st.running) == (4, 15, 0)
    assert st.steps >= 7


def test_a_final_overtakes_a_long_running_partial() -> None:
    backend = SteppingScriptedBackend(step_delay_s=0.005)
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=4, max_wait_ms=0), out.put)
    w.start()
    assert w.submit(req("long", 200, PARTIAL))
    assert backend.stepped.wait(5)          # the partial is running now
    assert w.submit(req("short", 2, FINAL))
    first, second = drain(out, 2)
    w.stop(5)
    # In a one-call batch the final would wait for all 200 steps.
    assert (first.stream, second.stream) == ("short", "long")
    assert w.stats().max_lag_s > 0
    assert backend.admitted == [[200_000], [2000]]


def test_a_superseded_running_partial_is_cancelled() -> None:
    backend = SteppingScriptedBackend(step_delay_s=0.005)
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=4, max_wait_ms=0), out.put)
    w.start()
    assert w.submit(req("a", 300, PARTIAL, revision=1))
    assert backend.stepped.wait(5)
    assert w.submit(req("a", 4, FINAL, revision=2))     # the segment ended
    (only,) = drain(out, 1)
    w.stop(5)
    assert isinstance(only, Hypothesis)
    assert only.final
    assert only.text == "w w w w"
    assert backend.cancelled == [300_000]
    st = w.stats()
    assert (st.cancelled, st.decoded) == (1, 1)


def test_a_stale_request_never_replaces_a_running_final() -> None:
    backend = SteppingScriptedBackend(step_delay_s=0.005)
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=4, max_wait_ms=0), out.put)
    w.start()
    assert w.submit(req("a", 100, FINAL, revision=3))
    assert backend.stepped.wait(5)
    assert w.submit(req("a", 5, PARTIAL, revision=4))   # late partial
    (only,) = drain(out, 1)
    w.stop(5)
    assert isinstance(only, Hypothesis)
    assert only.final
    assert backend.cancelled == []
    assert w.stats().superseded == 1


def test_never_more_than_max_batch_running_and_finals_admitted_first() -> None:
    backend = SteppingScriptedBackend(step_delay_s=0.002)
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=3, max_wait_ms=50), out.put)
    for i in range(4):
        assert w.submit(req(f"p{i}", 10 + i, PARTIAL, ready_at=i))
    for i in range(2):
        assert w.submit(req(f"f{i}", 20 + i, FINAL, ready_at=10 + i))
    w.start()                               # everything is waiting already
    got = drain(out, 6)
    w.stop(5)
    assert len(got) == 6
    assert backend.max_active == 3
    # The first admission took both finals, then the oldest partial.
    assert backend.admitted[0] == [20_000, 21_000, 10_000]


def test_one_adapter_per_running_batch() -> None:
    backend = SteppingScriptedBackend(step_delay_s=0.002)
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=8, max_wait_ms=50), out.put)
    w.start()
    for i, name in enumerate([None, "rl", None, "rl", "none"]):
        assert w.submit(req(f"s{i}", 5 + i, adapter=name, ready_at=i))
    got = drain(out, 5)
    w.stop(5)
    assert all(isinstance(r, Hypothesis) for r in got)
    assert all(len(names) <= 1 for names in backend.adapters_together)
    assert {"default", "rl", "none"} <= set().union(*backend.adapters_together)


def test_a_failing_step_falls_back_to_plain_batches_and_loses_nothing() -> None:
    backend = SteppingScriptedBackend(fail_steps=[2], fail_when=lambda a: len(a) == 7000)
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=4, max_wait_ms=50), out.put)
    w.start()
    for i, words in enumerate([5, 6, 7, 8]):
        assert w.submit(req(f"s{i}", words))
    got = {r.stream: r for r in drain(out, 4)}
    assert w.submit(req("after", 3))                    # continuous again afterwards
    (later,) = drain(out, 1)
    w.stop(5)
    assert isinstance(got["s2"], DecodeFailure)         # the culprit, alone
    assert "scripted failure" in got["s2"].message
    assert all(isinstance(got[s], Hypothesis) for s in ("s0", "s1", "s3"))
    assert isinstance(later, Hypothesis)
    assert later.text == "w w w"
    assert backend.admitted[-1] == [3000]


def test_a_death_mid_step_restarts_and_requeues_the_running_batch() -> None:
    backend = SteppingScriptedBackend(kill_steps=[3])
    loads: list[Backend] = []

    def factory() -> Backend:
        loads.append(backend)
        return backend

    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=4, max_wait_ms=50), out.put, factory=factory,
                    sleep=lambda s: None)
    w.start()
    for i in range(3):
        assert w.submit(req(f"s{i}", 5 + i))
    got = {r.stream: r for r in drain(out, 3)}
    w.stop(5)
    assert len(loads) == 1
    texts = [r.text if isinstance(r, Hypothesis) else r.message
             for r in (got[f"s{i}"] for i in range(3))]
    assert texts == [" ".join(["w"] * n) for n in (5, 6, 7)]
    assert w.stats().restarts == 1


def test_batch_setting_and_plain_backends_use_one_call_per_batch() -> None:
    stepping = SteppingScriptedBackend()
    assert ModelWorker(stepping, wcfg(batching="batch"), lambda r: None).mode == "batch"
    assert ModelWorker(ScriptedBackend(), wcfg(), lambda r: None).mode == "batch"
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(stepping, wcfg(batching="batch", max_batch=4, max_wait_ms=50), out.put)
    w.start()
    for i in range(3):
        assert w.submit(req(f"s{i}", 2))
    drain(out, 3)
    w.stop(5)
    assert stepping.admitted == []
    assert stepping.batches == [[2000, 2000, 2000]]


def test_stop_finishes_the_running_batch() -> None:
    backend = SteppingScriptedBackend(step_delay_s=0.002)
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=2, max_wait_ms=0), out.put)
    w.start()
    for i in range(5):
        assert w.submit(req(f"s{i}", 20))
    w.stop(10)
    assert out.qsize() == 5
    assert not w.alive


def test_a_cancel_that_kills_the_thread_loses_no_request() -> None:
    class CancelDies(SteppingScriptedBackend):
        def cancel(self, job: Job) -> bool:
            raise SystemExit("scripted death in cancel")

    backend = CancelDies(step_delay_s=0.005)
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=4, max_wait_ms=0), out.put,
                    factory=lambda: backend, sleep=lambda s: None)
    w.start()
    assert w.submit(req("a", 200, PARTIAL, revision=1))
    assert w.submit(req("b", 3, PARTIAL))
    assert backend.stepped.wait(5)
    assert w.submit(req("a", 4, FINAL, revision=2))     # cancelling "a" kills the thread
    got = {(r.stream, r.kind): r for r in drain(out, 2)}
    w.stop(5)
    final = got[("a", FINAL)]
    assert isinstance(final, Hypothesis)
    assert final.text == "w w w w"
    assert isinstance(got[("b", PARTIAL)], Hypothesis)
    assert w.stats().restarts == 1


class _WarmingBackend(SteppingScriptedBackend):
    """Records warm-up calls and the steps taken before them; may fail it."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.warmed: list[tuple[int, int]] = []  # (max_batch, steps so far)
        self._fail = fail

    def warm_up(self, max_batch: int) -> str:
        self.warmed.append((max_batch, self.steps))
        if self._fail:
            raise RuntimeError("compile failed\nlong traceback")
        return "compiled"


@pytest.mark.parametrize("fail", [False, True])
def test_warm_up_runs_once_before_serving_and_a_failure_only_logs(
    fail: bool, caplog: pytest.LogCaptureFixture
) -> None:
    backend = _WarmingBackend(fail)
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=6, max_wait_ms=20), out.put)
    with caplog.at_level(logging.INFO, logger="evoxtral_stream.engine.worker"):
        w.start()
        assert w.submit(req("s0", 3))
        (got,) = drain(out, 1)
        w.stop(5)
    assert isinstance(got, Hypothesis)
    assert got.text == "w w w"
    assert backend.warmed == [(6, 0)]
    if fail:
        assert "warm-up failed (RuntimeError: compile failed); serving without it" in caplog.text
    else:
        assert "backend warmed up in" in caplog.text
        assert "compiled" in caplog.text


def test_not_ready_from_start_until_the_warm_up_ends() -> None:
    """A readiness probe (or a benchmark waiting to start its clock) right
    after start must not see a worker that has not begun warming up as ready."""
    started, gate = threading.Event(), threading.Event()

    class Slow(_WarmingBackend):
        def warm_up(self, max_batch: int) -> str:
            gate.wait(10)
            return super().warm_up(max_batch)

    class Hold(logging.Handler):
        """Holds the thread at its first line, before its warm-up."""

        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("model worker started"):
                started.wait(10)

    logger = logging.getLogger("evoxtral_stream.engine.worker")
    hold, level = Hold(), logger.level
    logger.addHandler(hold)
    logger.setLevel(logging.INFO)
    try:
        w = ModelWorker(Slow(), wcfg(max_batch=4, max_wait_ms=20), lambda r: None)
        w.start()
        assert not w.ready
        assert not w.stats().ready
        started.set()
        time.sleep(0.05)
        assert not w.ready  # warming up
        gate.set()
        deadline = time.monotonic() + 10
        while not w.ready and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.ready
        w.stop(5)
    finally:
        started.set()
        gate.set()
        logger.removeHandler(hold)
        logger.setLevel(level)


def test_batch_mode_does_not_warm_up() -> None:
    backend = _WarmingBackend()
    out: queue.Queue[WorkerResult] = queue.Queue()
    w = ModelWorker(backend, wcfg(max_batch=4, max_wait_ms=20, batching="batch"), out.put)
    w.start()
    assert w.submit(req("s0", 2))
    drain(out, 1)
    w.stop(5)
    assert backend.warmed == []
