"""The journal's interval fsyncs (``fsync = "interval"``): on a thread of
their own ("journal-sync"), one batch at a time, so a slow disk never stalls
the event loop, and none left undone at a clean stop."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.engine.journal import Journal
from evoxtral_stream.engine.journal import store as journal_store
from evoxtral_stream.events import CaptionEvent, EngineEvent, StreamError
from tests.engine.test_journal import caption, config, talk
from tests.fakes import ScriptedBackend
from tests.helpers.threads import threads_refused

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"),
                                reason="names an fsynced descriptor's file by /proc")

SYNC_THREAD = "journal-sync"


def file_of(fd: int) -> str:
    """The name of the file ``fd`` is open on."""
    return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))


def stream_of(fd: int) -> str:
    """The stream whose journal file ``fd`` is open on ("" for another file)."""
    name = file_of(fd)
    return name.split(".", 1)[0] if name.endswith(".jsonl") else ""


def sync_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == SYNC_THREAD}


def eventually(check: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_interval_fsyncs_leave_the_event_loop_free(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync = "interval" fsynced every dirty file in turn on the event loop:
    with 20 streams on a disk whose flush takes 50 ms, the loop stood still
    for a second at each interval (every stream's ingest, partials and
    finals waited). Now a thread does them; every final is still fsynced."""
    before = sync_threads()
    cfg = config(tmp_path, **{"journal.fsync": "interval",
                              "journal.fsync_interval_s": 0.1}).journal
    streams = [f"s{i}" for i in range(20)]
    first = Journal(cfg)
    first.restore()
    for s in streams:                       # the files made at the disk's speed
        first.append(caption(s, 1))
    first.close()
    journal = Journal(cfg)
    journal.restore()
    synced: dict[str, int] = {}
    lock = threading.Lock()
    real = os.fsync

    def slow(fd: int) -> None:
        time.sleep(0.05)
        real(fd)
        with lock:
            synced[stream_of(fd)] = synced.get(stream_of(fd), 0) + 1

    monkeypatch.setattr(os, "fsync", slow)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        gaps: list[float] = []
        done = asyncio.Event()

        async def tick() -> None:
            last = loop.time()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = loop.time()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)
        for seq in range(2, 5):
            for s in streams:
                journal.append(caption(s, seq))
                await asyncio.sleep(0)
            # As the engine's timer does: back when the next fsync is due.
            while (wait := journal.sync_due()) is not None:
                await asyncio.sleep(wait)
        done.set()
        await ticker
        return max(gaps)

    worst = asyncio.run(main())
    journal.close()
    # Inline, each round stood still for 20 × 50 ms = 1 s; the bound leaves
    # room for a loaded CI machine (pytest -n 3 on 2 cores).
    assert worst < 0.5, f"the event loop stood still for {worst:.2f} s"
    # Three interval fsyncs of each file (one per round of finals) and the
    # close's: none skipped, none merged away.
    assert {s: n for s, n in synced.items() if s} == {s: 4 for s in streams}
    assert sync_threads() == before          # the thread did not outlive close


def blocking_sync_thread(monkeypatch: pytest.MonkeyPatch
                         ) -> tuple[threading.Event, list[str], list[str]]:
    """Make the sync thread's fsyncs wait for the gate returned; the loop's
    do not. Returns (gate, started, done): the streams whose files it
    began/ended an fsync of."""
    gate = threading.Event()
    started: list[str] = []
    done: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if threading.current_thread().name != SYNC_THREAD:
            real(fd)
            return
        started.append(stream_of(fd))
        assert gate.wait(30)
        real(fd)
        done.append(stream_of(fd))
    monkeypatch.setattr(os, "fsync", fsync)
    return gate, started, done


def test_a_batch_in_flight_makes_the_next_wait_without_a_queue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    cfg = config(tmp_path, **{"journal.fsync": "interval",
                              "journal.fsync_interval_s": 1.0}).journal
    journal = Journal(cfg, clock=clock)
    journal.restore()
    for s in ("a", "b", "c"):
        journal.append(caption(s, 1))
    gate, started, done = blocking_sync_thread(monkeypatch)
    try:
        clock.now += 1.0
        assert journal.sync_due() is None            # a, b, c handed over
        eventually(lambda: len(started) == 1)        # the thread is in its first fsync
        journal.append(caption("a", 2))
        journal.append(caption("c", 2))
        clock.now += 5.0
        # Due, but the batch is still in flight: the new dirty set waits,
        # and the engine's timer comes back soon.
        for _ in range(3):
            wait = journal.sync_due()
            assert wait is not None and 0 < wait <= 1.0
        time.sleep(0.1)
        assert len(started) == 1
    finally:
        gate.set()
    eventually(lambda: journal.sync_due() is None)   # the next batch went
    journal.close()
    assert sorted(done[:3]) == ["a", "b", "c"]
    assert sorted(done[3:]) == ["a", "c"]
    assert journal.sync_failures == 0


def test_close_waits_for_the_batch_in_flight_and_fsyncs_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = sync_threads()
    clock = Clock()
    cfg = config(tmp_path, **{"journal.fsync": "interval",
                              "journal.fsync_interval_s": 1.0}).journal
    journal = Journal(cfg, clock=clock)
    journal.restore()
    journal.append(caption("a", 1))
    gate, started, done = blocking_sync_thread(monkeypatch)
    closed: list[str] = []
    real = os.fsync

    def also_count(fd: int) -> None:
        real(fd)
        if threading.current_thread().name != SYNC_THREAD:
            closed.append(stream_of(fd))
    monkeypatch.setattr(os, "fsync", also_count)
    clock.now += 1.0
    journal.append(caption("b", 1))                  # due: a and b handed over
    eventually(lambda: len(started) == 1)
    journal.append(caption("c", 1))                  # dirty, waits for the batch
    opener = threading.Timer(0.3, gate.set)
    opener.start()
    t0 = time.monotonic()
    journal.close()
    assert time.monotonic() - t0 >= 0.25             # it waited for the batch
    opener.join()
    assert sorted(done) == ["a", "b"]                # the batch finished
    assert "c" in closed                             # the rest fsynced at close
    assert sync_threads() == before


def test_close_cuts_a_stuck_batch_short_with_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    before = sync_threads()
    monkeypatch.setattr(journal_store, "SYNC_CLOSE_WAIT_S", 0.2)
    clock = Clock()
    journal = Journal(config(tmp_path, **{"journal.fsync": "interval"}).journal,
                      clock=clock)
    journal.restore()
    journal.append(caption("a", 1))
    gate, started, done = blocking_sync_thread(monkeypatch)
    try:
        clock.now += 1.0
        assert journal.sync_due() is None
        eventually(lambda: len(started) == 1)
        t0 = time.monotonic()
        with caplog.at_level(logging.ERROR):
            journal.close()
        assert time.monotonic() - t0 < 5.0
        assert "journal: the fsync thread did not finish" in caplog.text
    finally:
        gate.set()
    eventually(lambda: sync_threads() == before)     # it ends once the disk answers
    assert done == ["a"]


def test_an_interval_fsync_error_is_logged_once_counted_and_the_next_batch_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    journal = Journal(config(tmp_path, **{"journal.fsync": "interval"}).journal,
                      clock=clock)
    journal.restore()
    for s in ("a", "b", "c"):
        journal.append(caption(s, 1))
    real = os.fsync
    failing = {"a", "b"}
    synced: list[str] = []

    def fsync(fd: int) -> None:
        if stream_of(fd) in failing:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)
        synced.append(stream_of(fd))
    monkeypatch.setattr(os, "fsync", fsync)
    with caplog.at_level(logging.ERROR):
        clock.now += 1.0
        assert journal.sync_due() is None
        eventually(lambda: journal.sync_failures == 2)
        assert synced == ["c"]
        failures = [r for r in caplog.records if "journal: fsync failed" in r.getMessage()]
        assert len(failures) == 1                    # one line for the batch
        assert "2 of 3" in failures[0].getMessage()
        failing.clear()
        journal.append(caption("a", 2))              # the disk is back
        clock.now += 1.0
        assert journal.sync_due() is None
        eventually(lambda: synced == ["c", "a"])
    journal.close()
    assert journal.sync_failures == 2


async def test_the_engine_counts_a_failed_interval_fsync_and_blames_no_final(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """An interval fsync that failed raised out of whichever append came
    when it was due: that stream got a ``journal_failed`` for a final (or a
    reservation) its file held, and the loss was recorded against it. Now
    it is logged and counted in ``journal_failures``, and no stream is told
    its caption was not journaled."""
    cfg = config(tmp_path, **{"journal.fsync": "interval",
                              "journal.fsync_interval_s": 0.01})
    real = os.fsync
    failing = [True]

    def fsync(fd: int) -> None:
        # The live stream's file fails; its close at the end does not.
        if failing[0] and stream_of(fd) == "mic":
            raise OSError(errno.EIO, "Input/output error")
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    events: list[EngineEvent] = []
    with caplog.at_level(logging.ERROR):
        async with Engine(cfg, ScriptedBackend()) as engine:
            assert engine.journal is not None
            journal = engine.journal
            engine.add_listener(events.append)
            stream = engine.open_stream("mic")
            stream.push(talk(1))
            deadline = time.monotonic() + 20
            while not (any(isinstance(e, CaptionEvent) and e.final for e in events)
                       and journal.sync_failures >= 1):
                assert time.monotonic() < deadline, "no final, or no fsync failed"
                await stream.wait_idle()
                await asyncio.sleep(0.01)
            failing[0] = False
            await stream.close()
            failures = engine.stats().journal_failures
    assert not [e for e in events if isinstance(e, StreamError)]
    assert failures == journal.sync_failures >= 1
    assert "journal: fsync failed" in caplog.text


def test_a_file_whose_descriptor_cannot_be_duplicated_is_fsynced_inline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Out of descriptors: the file is fsynced on the loop, as before the
    thread, rather than left unsynced; a failure then counts as the thread's."""
    clock = Clock()
    journal = Journal(config(tmp_path, **{"journal.fsync": "interval"}).journal,
                      clock=clock)
    journal.restore()
    journal.append(caption("a", 1))
    real = os.fsync
    synced: list[tuple[str, str]] = []

    def no_dup(fd: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    def fsync(fd: int) -> None:
        real(fd)
        synced.append((threading.current_thread().name, stream_of(fd)))
    monkeypatch.setattr(os, "dup", no_dup)
    monkeypatch.setattr(os, "fsync", fsync)
    clock.now += 1.0
    assert journal.sync_due() is None
    assert synced == [(threading.current_thread().name, "a")]

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fsync", failing)
    journal.append(caption("a", 2))
    clock.now += 1.0
    with caplog.at_level(logging.ERROR):
        assert journal.sync_due() is None          # logged, not raised
    assert journal.sync_failures == 1
    assert "journal: fsync failed" in caplog.text
    monkeypatch.setattr(os, "fsync", real)
    journal.close()


def test_a_sync_thread_that_cannot_start_leaves_no_descriptor_and_no_stuck_sync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread that cannot start (the process at its thread limit: a
    container's pids.max) raised out of sync_due, into the append of a
    final, with the batch's duplicated descriptors left open and the syncer
    marked busy and running for good: no interval fsync ran again. Now the
    batch is fsynced on the loop in its place, its duplicates closed, and
    the next batch starts the thread once it can."""
    clock = Clock()
    journal = Journal(config(tmp_path, **{"journal.fsync": "interval"}).journal,
                      clock=clock)
    journal.restore()
    journal.append(caption("a", 1))
    real_fsync = os.fsync
    synced: list[tuple[str, str]] = []

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append((threading.current_thread().name, stream_of(fd)))

    monkeypatch.setattr(os, "fsync", fsync)
    with threads_refused(SYNC_THREAD):
        fds = set(os.listdir("/proc/self/fd"))
        clock.now += 1.0
        assert journal.sync_due() is None
        assert synced == [(threading.current_thread().name, "a")]
        assert set(os.listdir("/proc/self/fd")) <= fds      # every duplicate closed
    journal.append(caption("a", 2))
    clock.now += 1.0
    assert journal.sync_due() is None
    eventually(lambda: (SYNC_THREAD, "a") in synced)
    journal.close()
    assert journal.sync_failures == 0
