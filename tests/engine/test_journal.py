"""The journal of finals: written before broadcast, replayed after a restart."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from evoxtral_stream.config import Config, load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.engine.journal import (
    Journal,
    decode_record,
    encode_record,
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
