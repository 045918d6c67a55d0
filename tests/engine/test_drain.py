"""Bounded shutdown: a model that stops answering cannot hold the engine forever.

A backend that blocks on an event stands in for a hung GPU (the real part
cannot hang on demand); the worker thread, engine, merger and journal are real.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine, EngineStopping, Stream
from evoxtral_stream.events import (
    CaptionEvent,
    EngineEvent,
    StreamEnded,
    StreamError,
)
from tests.engine.test_journal import talk
from tests.fakes import ScriptedBackend, SteppingScriptedBackend, words_so_far


class HangingBackend(ScriptedBackend):
    """Answers like :class:`ScriptedBackend` until :meth:`hang`; from then on
    every call blocks until :meth:`release` (or 30 s)."""

    def __init__(self) -> None:
        super().__init__(words_so_far)
        self._hanging = False
        self._gate = threading.Event()
        self.stuck = threading.Event()

    def hang(self) -> None:
        self._hanging = True

    def release(self) -> None:
        self._gate.set()

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        if self._hanging:
            self.stuck.set()
            self._gate.wait(30)
        return super().transcribe(batch)


def _speech_then_silence(seconds: float) -> npt.NDArray[np.int16]:
    return talk(1)[: int(seconds * 16_000)]


async def _until(cond: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_a_hung_model_cannot_hold_shutdown_and_no_shown_text_is_lost(
        tmp_path: Path) -> None:
    cfg = load_config(env={}, overrides={
        "stream.partial_interval_ms": 200, "worker.drain_timeout_s": 0.5,
        "journal.enabled": True, "journal.dir": str(tmp_path / "j")})
    backend = HangingBackend()
    events: list[EngineEvent] = []
    t0 = 0.0
    try:
        async with Engine(cfg, backend) as engine:
            engine.add_listener(events.append)
            shown = engine.open_stream("shown")
            # Speech only: the segment stays open while partials come back.
            shown.push(talk(1)[:16_000])
            await _until(lambda: any(isinstance(e, CaptionEvent) and e.stream == "shown"
                                     and e.text for e in events), "a partial")
            backend.hang()
            silent = engine.open_stream("silent")
            silent.push(talk(1))                 # speech and its end: a final is owed
            shown.push(np.zeros(16_000, np.int16))   # the end of "shown"'s speech
            await _until(backend.stuck.is_set, "the model to hang")
            t0 = time.monotonic()
            assert await engine.drain() is False
            assert not engine.streams
        elapsed = time.monotonic() - t0          # the drain and the whole aclose
    finally:
        backend.release()
    assert elapsed < 10, f"shutdown took {elapsed:.1f} s with drain_timeout_s = 0.5"

    def of(stream: str) -> list[EngineEvent]:
        return [e for e in events if getattr(e, "stream", None) == stream]

    partials = [e for e in of("shown") if isinstance(e, CaptionEvent) and not e.final]
    finals = [e for e in of("shown") if isinstance(e, CaptionEvent) and e.final]
    # The final is the last text shown, not nothing; and it reached the journal.
    assert len(finals) == 1 and finals[0].text == partials[-1].text != ""
    # Its latency is how long its own final was waited for (the end of its
    # speech to the close, past the 0.5 s drain), not the partial's.
    assert finals[0].latency is not None and finals[0].latency >= 0.5, finals[0]
    lines = [json.loads(x) for f in (tmp_path / "j").glob("shown.*")
             for x in f.read_text().splitlines()]
    assert [(m["seq"], m["final"], m["text"]) for m in lines if m["type"] == "caption"] == [
        (finals[0].seq, True, finals[0].text)]
    # Beside it, the seqs the partials were sent under are reserved.
    assert max(m["seq"] for m in lines if m["type"] == "seq.reserved") >= finals[0].seq
    assert isinstance(of("shown")[-1], StreamEnded)
    assert not [e for e in of("shown") if isinstance(e, StreamError)]
    # "silent" showed nothing before the hang: its final is reported lost.
    lost = [e for e in of("silent") if isinstance(e, StreamError)]
    assert [(e.code, e.segment) for e in lost] == [("final_lost", 0)]
    assert isinstance(of("silent")[-1], StreamEnded)


@asynccontextmanager
async def hung(**overrides: object) -> AsyncIterator[tuple[Engine, Stream]]:
    """An engine whose model hangs on the final of stream "s" (partials off)."""
    cfg = load_config(env={}, overrides={"stream.partial_interval_ms": 0, **overrides})
    backend = HangingBackend()
    backend.hang()
    try:
        async with Engine(cfg, backend) as engine:
            stream = engine.open_stream("s")
            stream.push(talk(1))
            await _until(backend.stuck.is_set, "the model to hang")
            yield engine, stream
    finally:
        backend.release()


async def test_each_segment_whose_final_is_lost_gets_its_own_final_lost_event() -> None:
    """An overloaded engine stopped with several finals of one stream owed
    used to send that stream one ``final_lost`` with no ``segment`` (and count
    one error), where the docs promise each such segment an event."""
    async with hung(**{"worker.drain_timeout_s": 0.3}) as (engine, stream):
        events: list[EngineEvent] = []
        engine.add_listener(events.append)
        stream.push(talk(3)[16_000 * 2:])   # two more segments owed behind the hung one
        assert await asyncio.wait_for(engine.drain(), 10) is False
        summary = await asyncio.wait_for(stream.close(), 5)
    lost = [e for e in events if isinstance(e, StreamError)]
    assert [(e.code, e.segment) for e in lost] == [
        ("final_lost", 0), ("final_lost", 1), ("final_lost", 2)]
    assert summary.finals == 0 and summary.segments == 3 and summary.errors == 3


async def test_a_stall_below_a_second_is_reported_with_its_length(
        caplog: pytest.LogCaptureFixture) -> None:
    """With ``stall_timeout_s`` = 0.3 the log and every stream's
    ``model_stalled`` used to say the model had not answered "for 0 s"."""
    import re

    async with hung(**{"worker.stall_timeout_s": 0.3,
                       "worker.drain_timeout_s": 0.3}) as (engine, _):
        events: list[EngineEvent] = []
        engine.add_listener(events.append)
        await _until(lambda: any(isinstance(e, StreamError) for e in events), "model_stalled")
        await asyncio.wait_for(engine.drain(), 10)
    stalled = [e for e in events if isinstance(e, StreamError) and e.code == "model_stalled"]
    line = [r.getMessage() for r in caplog.records if "stuck in one backend call" in r.getMessage()]
    for text in [stalled[0].message, line[0]]:
        seconds = float(re.findall(r"for ([0-9.]+) s", text)[0])
        assert seconds >= 0.3, text


async def test_a_reader_waiting_for_the_model_wakes_when_the_drain_gives_up() -> None:
    """A file reader in :meth:`Stream.wait_idle` (a full batch of finals owed)
    is not left waiting forever once a cut drain closes its stream."""
    async with hung(**{"worker.drain_timeout_s": 0.3, "worker.max_batch": 2}) as (engine, stream):
        stream.push(talk(3)[16_000 * 2:])   # two more finals owed: the reader must wait
        waiter = asyncio.ensure_future(stream.wait_idle())
        await asyncio.sleep(0.2)
        assert not waiter.done()
        assert await asyncio.wait_for(engine.drain(), 10) is False
        await asyncio.wait_for(waiter, 5)


async def test_give_up_cuts_an_unbounded_drain_short() -> None:
    async with hung(**{"worker.drain_timeout_s": 0}) as (engine, stream):
        drain = asyncio.ensure_future(engine.drain())
        await asyncio.sleep(0.5)
        assert not drain.done()             # 0: it would wait forever
        engine.give_up()                    # the second Ctrl-C
        assert await asyncio.wait_for(drain, 10) is False
        summary = await asyncio.wait_for(stream.close(), 5)
        assert summary.finals == 0 and summary.errors == 1


async def test_a_healthy_model_drains_fully_within_the_limit() -> None:
    cfg = load_config(env={}, overrides={"worker.drain_timeout_s": 30})
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine:
        events: list[EngineEvent] = []
        engine.add_listener(events.append)
        stream = engine.open_stream("s")
        stream.push(_speech_then_silence(0.8))    # a segment still open at the stop
        assert await engine.drain() is True
    finals = [e for e in events if isinstance(e, CaptionEvent) and e.final]
    assert len(finals) == 1 and finals[0].text
    assert not [e for e in events if isinstance(e, StreamError)]


async def test_a_stalled_model_ends_the_drain_at_once_whatever_the_limit() -> None:
    """A supervisor's grace period is short: a drain that knows the model is
    stuck does not wait out drain_timeout_s."""
    async with hung(**{"worker.stall_timeout_s": 0.3,
                       "worker.drain_timeout_s": 3600}) as (engine, _):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await asyncio.wait_for(engine.drain(), 30) is False
        assert loop.time() - t0 < 15


class StuckWarmUp(SteppingScriptedBackend):
    """A stepping backend whose warm-up never ends (until released)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.warming = threading.Event()

    def warm_up(self, max_batch: int) -> str:
        self.warming.set()
        self.gate.wait(30)
        return "done"


async def test_a_model_thread_stuck_with_nothing_owed_cannot_hold_the_exit() -> None:
    """No stream is open, so the drain has nothing to wait for; the stop of a
    thread stuck in its warm-up is left behind once it counts as stalled (10x
    stall_timeout_s for a warm-up), not waited for."""
    cfg = load_config(env={}, overrides={"worker.batching": "continuous",
                                         "worker.stall_timeout_s": 0.1})
    backend = StuckWarmUp()
    loop = asyncio.get_running_loop()
    try:
        async with Engine(cfg, backend) as engine:
            assert await asyncio.to_thread(backend.warming.wait, 5)
            assert not engine.ready
            await _until(lambda: not engine.healthy, "the warm-up to count as stalled")
            t0 = loop.time()
        assert loop.time() - t0 < 10
    finally:
        backend.gate.set()


async def test_give_up_leaves_a_stuck_thread_behind_without_waiting_for_a_stall() -> None:
    cfg = load_config(env={}, overrides={"worker.batching": "continuous",
                                         "worker.stall_timeout_s": 0})
    backend = StuckWarmUp()
    loop = asyncio.get_running_loop()
    try:
        engine = Engine(cfg, backend)
        await engine.start()
        assert await asyncio.to_thread(backend.warming.wait, 5)
        closing = asyncio.ensure_future(engine.aclose())
        await asyncio.sleep(0.5)
        assert not closing.done()               # no stall check: it would wait
        t0 = loop.time()
        engine.give_up()                        # the second Ctrl-C
        await asyncio.wait_for(closing, 10)
        assert loop.time() - t0 < 5
    finally:
        backend.gate.set()


async def test_no_stream_opens_once_the_engine_drains() -> None:
    cfg = load_config(env={}, overrides={})
    async with Engine(cfg, ScriptedBackend()) as engine:
        engine.open_stream("before")
        assert await engine.drain() is True
        with pytest.raises(EngineStopping, match="shutting down"):
            engine.open_stream("after")


async def test_a_backlog_retry_pending_at_a_cut_drain_does_not_run_after_the_stop() -> None:
    """Finals the full inbox refused wait in the backlog, offered again on a
    timer; a drain cut short drops them, and the timer must not fire once
    the worker is gone (it did, and failed in the loop's exception handler)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        async with hung(**{"worker.max_queue": 1, "worker.max_batch": 1,
                           "worker.drain_timeout_s": 0.2}) as (engine, stream):
            stream.push(talk(2))                 # two more finals: one waits, one is refused
            assert engine.stats().finals_backlog == 1
            assert await engine.drain() is False
        await asyncio.sleep(0.1)                 # past any retry still scheduled
    finally:
        loop.set_exception_handler(None)
    assert errors == []


async def test_a_second_drain_during_one_waits_for_it_and_returns_its_result(
        caplog: pytest.LogCaptureFixture) -> None:
    """Two drains at once (a SIGTERM's and an exit's, say): the second
    closed the streams again on a clock of its own, and when the first gave
    up and closed the owed final with what was shown, the second returned
    True, every final come, though one was lost. Now a drain under way is
    the one every caller waits for: the same False for each (and for a
    drain after it), one shutdown line, one final_lost, nothing raised."""
    async with hung(**{"worker.drain_timeout_s": 0.3}) as (engine, stream):
        events: list[EngineEvent] = []
        engine.add_listener(events.append)
        first = asyncio.ensure_future(engine.drain())
        await asyncio.sleep(0)
        second = asyncio.ensure_future(engine.drain(limit_s=0))   # no limit of its own
        results = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert list(results) == [False, False]
        assert await asyncio.wait_for(engine.drain(), 5) is False
        summary = await asyncio.wait_for(stream.close(), 5)
    assert summary.errors == 1
    lost = [e for e in events if isinstance(e, StreamError)]
    assert [(e.code, e.segment) for e in lost] == [("final_lost", 0)]
    assert len([e for e in events if isinstance(e, StreamEnded)]) == 1
    lines = [r for r in caplog.records if r.getMessage().startswith("shutdown: worker.")]
    assert len(lines) == 1, [r.getMessage() for r in lines]


async def test_a_drain_whose_caller_is_cancelled_goes_on_for_the_next_caller() -> None:
    """A drain's caller cancelled (a wait_for that ran out) leaves the drain
    going: the next call (the engine's exit) waits for that one, within its
    limit, rather than starting a second one beside it."""
    async with hung(**{"worker.drain_timeout_s": 0.5}) as (engine, _):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(engine.drain(), 0.1)
        assert await asyncio.wait_for(engine.drain(limit_s=60), 10) is False
        assert loop.time() - t0 < 5
