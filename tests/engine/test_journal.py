"""The journal of finals: written before broadcast, replayed after a restart."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from evoxtral_stream.config import Config, load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.engine.journal import (
    Journal,
    decode_record,
    encode_record,
    expired,
    file_name,
    parse_file_name,
    should_rotate,
)
from evoxtral_stream.events import CaptionEvent, EngineEvent, Int16Array
from evoxtral_stream.server.broadcast import Broadcaster
from evoxtral_stream.server.protocol import encode_event
from tests.fakes import ScriptedBackend
from tests.helpers.audio import buzz


def talk(segments: int) -> Int16Array:
    """``segments`` stretches of voiced audio, each followed by a second of silence."""
    parts: list[Int16Array] = []
    for _ in range(segments):
        parts.append((buzz(1.0) * 32767).astype(np.int16))
        parts.append(np.zeros(16_000, np.int16))
    return np.concatenate(parts)


def config(tmp: Path, **over: object) -> Config:
    # Partials off: the finals then carry seq 1, 2, 3... which the tests read.
    return load_config(env={}, overrides={
        "journal.enabled": True, "journal.dir": str(tmp / "j"), "journal.fsync": "always",
        "stream.partial_interval_ms": 0, **over})


def caption(stream: str, seq: int, text: str = "hello", final: bool = True) -> CaptionEvent:
    return CaptionEvent(stream=stream, segment=seq, seq=seq, final=final, text=text,
                        plain_text=text, stable=text, unstable="", tags=(), start=0.0,
                        end=1.0, latency=0.1)


async def run_stream(engine: Engine, stream_id: str, segments: int) -> None:
    stream = engine.open_stream(stream_id)
    stream.push(talk(segments))
    await stream.close()


# --- pure parts ----------------------------------------------------------------


def test_file_names_round_trip_any_stream_id() -> None:
    for stream in ["mic", "a.b.c", "../etc/passwd", "ünï code/x y", "."]:
        name = file_name(stream, 7)
        assert "/" not in name
        assert parse_file_name(name) == (stream, 7)
    assert parse_file_name("notes.txt") is None
    assert parse_file_name("x.abc.jsonl") is None


def test_records_encode_finals_only_and_damaged_lines_decode_to_none() -> None:
    line = encode_record(caption("s", 3))
    rec = decode_record(line)
    assert rec is not None
    assert (rec.stream, rec.seq, rec.message) == ("s", 3, line)
    with pytest.raises(ValueError, match="only final"):
        encode_record(caption("s", 4, final=False))
    assert decode_record(line[: len(line) // 2]) is None
    assert decode_record('{"type": "gap"}') is None
    assert decode_record('{"type": "caption", "stream": "s", "seq": true}') is None


def test_rotation_decision() -> None:
    assert not should_rotate(0, 10_000, 1e9, 100, 1.0)       # an empty file never rotates
    assert should_rotate(90, 11, 0.0, 100, 0.0)               # would pass max_bytes
    assert not should_rotate(90, 10, 0.0, 100, 0.0)
    assert should_rotate(1, 1, 5.0, 100, 5.0)                 # old enough
    assert not should_rotate(1, 1, 1e9, 100, 0.0)             # 0: no age limit


def test_retention_decision() -> None:
    assert expired(100.0, 200.0, 100.0)
    assert not expired(100.0, 199.0, 100.0)
    assert not expired(0.0, 1e12, 0.0)                        # 0: kept forever


# --- the engine with its journal -------------------------------------------------


async def test_a_final_is_journaled_before_any_listener_sees_it(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    seen: list[tuple[int, bool]] = []

    def listener(event: EngineEvent) -> None:
        if isinstance(event, CaptionEvent) and event.final:
            files = sorted((tmp_path / "j").glob("*.jsonl"))
            lines = [json.loads(x) for f in files for x in f.read_text().splitlines()]
            seen.append((event.seq, any(m["seq"] == event.seq for m in lines)))

    async with Engine(cfg, ScriptedBackend()) as engine:
        engine.add_listener(listener)
        await run_stream(engine, "mic", 2)
        assert engine.stats().journal_appends == 2
    assert seen == [(1, True), (2, True)]


async def test_after_a_restart_resume_comes_from_the_journal_and_seq_continues(
        tmp_path: Path) -> None:
    cfg = config(tmp_path)
    async with Engine(cfg, ScriptedBackend()) as engine:
        await run_stream(engine, "mic", 3)
    # A fresh engine and broadcaster: nothing in memory, only the journal.
    async with Engine(cfg, ScriptedBackend()) as engine:
        assert engine.journal is not None
        b = Broadcaster(16, encode_event, history=100, source=engine.journal)
        engine.add_listener(b.publish)
        sub = b.subscribe(["mic"], since={"mic": 1})
        assert [json.loads(m)["seq"] for m in sub.backlog] == [2, 3]
        assert all(json.loads(m)["final"] for m in sub.backlog)
        # The same stream id again: numbering goes on after the journaled 3.
        await run_stream(engine, "mic", 2)
        live = [json.loads(sub.queue.get_nowait()) for _ in range(sub.queue.qsize())]
        assert [m["seq"] for m in live if m["type"] == "caption"] == [4, 5]
        # Now memory holds 4..5 and the journal 1..5: a resume from 2 uses both.
        again = b.subscribe(["mic"], since={"mic": 2})
        assert [json.loads(m).get("seq") for m in again.backlog][:3] == [3, 4, 5]
        # A stream nobody journaled is unknown, as before.
        assert [json.loads(m)["type"] for m in b.subscribe(since={"x": 4}).backlog] == ["gap"]


def test_rotation_by_size_keeps_keep_files_and_reports_the_gap(tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"journal.max_bytes": 1024, "journal.keep": 2}).journal
    journal = Journal(cfg)
    journal.restore()
    for seq in range(1, 41):
        journal.append(caption("s", seq, text="word " * 20))
    journal.close()
    files = sorted((tmp_path / "j").iterdir())
    assert len(files) == 3                     # the current one and `keep` rotated ones
    assert all(f.stat().st_size <= 1024 for f in files)
    assert parse_file_name(files[0].name) != ("s", 1)   # the oldest were deleted
    replay = journal.replay("s", 0)
    assert replay is not None
    seqs = [r.seq for r in replay.records]
    assert seqs == list(range(seqs[0], 41))
    assert replay.covered_from == seqs[0] > 1
    # The broadcaster turns the missing start into a gap message.
    b = Broadcaster(16, encode_event, history=10, source=journal)
    first, *rest = b.subscribe(since={"s": 0}).backlog
    gap = json.loads(first)
    assert (gap["type"], gap["stream"], gap["from"], gap["to"]) == ("gap", "s", 1, seqs[0] - 1)
    assert [json.loads(m)["seq"] for m in rest] == seqs
    # A restarted journal knows the last seq though the first files are gone.
    assert Journal(cfg).restore() == {"s": 40}


def test_a_line_cut_short_by_a_crash_is_skipped_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(tmp_path).journal
    journal = Journal(cfg)
    journal.restore()
    journal.append(caption("s", 1))
    journal.append(caption("s", 2))
    journal.close()
    path = tmp_path / "j" / file_name("s", 1)
    whole = encode_record(caption("s", 3))
    with path.open("a") as f:
        f.write(whole[:25])                       # the crash: half a line, no newline
    with caplog.at_level(logging.WARNING):
        restarted = Journal(cfg)
        assert restarted.restore() == {"s": 2}
    assert "damaged line" in caplog.text
    restarted.append(caption("s", 3))             # starts on a line of its own
    restarted.close()
    replay = restarted.replay("s", 0)
    assert replay is not None
    assert [r.seq for r in replay.records] == [1, 2, 3]


def test_interval_fsync_tells_when_the_next_is_due(tmp_path: Path) -> None:
    now = [100.0]
    cfg = config(tmp_path, **{"journal.fsync": "interval",
                              "journal.fsync_interval_s": 1.0}).journal
    journal = Journal(cfg, clock=lambda: now[0])
    journal.restore()
    journal.append(caption("s", 1))
    assert journal.sync_due() == pytest.approx(1.0)
    now[0] += 1.5
    assert journal.sync_due() is None             # fsynced; nothing waits now
    journal.close()


# --- lifetime: open files and retention -------------------------------------------


async def test_a_stream_that_ends_closes_its_file(tmp_path: Path) -> None:
    """Open journal files follow live streams, not every stream ever seen."""
    cfg = config(tmp_path)
    async with Engine(cfg, ScriptedBackend()) as engine:
        for i in range(20):
            await run_stream(engine, f"call-{i}", 1)
        assert engine.stats().journal_open_files == 0
        live = engine.open_stream("live")
        live.push(talk(1))
        while engine.stats().journal_appends < 21:
            await asyncio.sleep(0.01)
        assert engine.stats().journal_open_files == 1
        await live.close()
        assert engine.stats().journal_open_files == 0
        # Released files are still read for resume, and appended to on re-open.
        assert engine.journal is not None
        replay = engine.journal.replay("call-3", 0)
        assert replay is not None and [r.seq for r in replay.records] == [1]
        await run_stream(engine, "call-3", 1)
        replay = engine.journal.replay("call-3", 0)
        assert replay is not None and [r.seq for r in replay.records] == [1, 2]


def _age(folder: Path, stream: str, seconds: float) -> None:
    """Make every journal file of ``stream`` look last written ``seconds`` ago."""
    t = time.time() - seconds
    for path in folder.glob(f"{stream}.*.jsonl"):
        os.utime(path, (t, t))


def test_streams_past_retention_are_pruned_at_start_and_forgotten(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(tmp_path, **{"journal.retention_s": 3600.0,
                              "journal.max_bytes": 1024, "journal.keep": 3}).journal
    journal = Journal(cfg)
    journal.restore()
    for seq in range(1, 30):                       # several rotated files
        journal.append(caption("old", seq, text="word " * 20))
    journal.append(caption("recent", 1))
    journal.close()
    folder = tmp_path / "j"
    assert len(list(folder.glob("old.*"))) > 1
    _age(folder, "old", 7200)
    _age(folder, "recent", 1800)
    with caplog.at_level(logging.INFO):
        restarted = Journal(cfg)
        assert restarted.restore() == {"recent": 1}
    assert "not written for 3600 s" in caplog.text and "old" in caplog.text
    assert not list(folder.glob("old.*"))
    assert restarted.pruned == 1
    assert restarted.last_seq("old") == 0 and restarted.replay("old", 0) is None
    # Retention 0 keeps everything, however old.
    _age(folder, "recent", 10 * 365 * 86400)
    keep_all = config(tmp_path, **{"journal.retention_s": 0.0}).journal
    assert Journal(keep_all).restore() == {"recent": 1}


def test_live_streams_and_open_files_are_never_pruned(tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"journal.retention_s": 60.0}).journal
    journal = Journal(cfg)
    journal.restore()
    for stream in ("open", "live", "ended"):
        journal.append(caption(stream, 1))
    journal.release("live")
    journal.release("ended")
    for stream in ("open", "live", "ended"):
        _age(tmp_path / "j", stream, 120)
    assert journal.prune(live={"live"}) == ["ended"]
    assert journal.last_seq("open") == journal.last_seq("live") == 1
    journal.close()


async def test_the_engine_prunes_periodically_and_spares_live_streams(
        tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"journal.retention_s": 0.4})
    async with Engine(cfg, ScriptedBackend()) as engine:
        await run_stream(engine, "gone", 1)
        live = engine.open_stream("live")
        live.push(talk(1))
        while engine.stats().journal_appends < 2:
            await asyncio.sleep(0.01)
        folder = tmp_path / "j"
        _age(folder, "live", 3600)                  # old files, but the stream is live
        deadline = time.monotonic() + 30
        while list(folder.glob("gone.*")) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not list(folder.glob("gone.*"))
        await asyncio.sleep(0.5)                    # more prune rounds pass
        assert list(folder.glob("live.*"))
        assert engine.stats().journal_pruned == 1
        await live.close()


def test_a_stream_pruned_while_running_continues_its_seq_and_reports_the_gap(
        tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"journal.retention_s": 60.0}).journal
    journal = Journal(cfg)
    journal.restore()
    journal.append(caption("weekly", 1))
    journal.append(caption("weekly", 2))
    journal.release("weekly")
    _age(tmp_path / "j", "weekly", 120)
    assert journal.prune() == ["weekly"]
    # Still known to this process: a re-opened stream goes on from 2.
    assert journal.last_seq("weekly") == 2
    journal.append(caption("weekly", 3))
    replay = journal.replay("weekly", 0)
    assert replay is not None
    assert [r.seq for r in replay.records] == [3] and replay.covered_from == 3
    journal.close()
    # A restart forgets what was pruned, and only that.
    assert Journal(cfg).restore() == {"weekly": 3}
