"""The journal of finals: written before broadcast, replayed after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from evoxtral_stream.config import Config, JournalConfig, load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.engine.journal import (
    CLOCK_SLACK_S,
    EPOCH_FILE,
    PRUNED_FILE,
    SEQ_RESERVE_BLOCK,
    Journal,
    JournalFile,
    Replay,
    decode_line,
    decode_lost,
    decode_record,
    encode_lost,
    encode_record,
    expired,
    file_age,
    file_name,
    parse_file_name,
    recorded_start,
    should_rotate,
)
from evoxtral_stream.engine.journal import store as journal_store
from evoxtral_stream.engine.journal.records import _decode_pruned
from evoxtral_stream.events import (
    CaptionEvent,
    EngineEvent,
    Int16Array,
    StreamEnded,
    StreamError,
)
from evoxtral_stream.server.broadcast import Broadcaster, Subscription
from evoxtral_stream.server.protocol import decode_caption, encode_event, parse_epoch
from tests.fakes import GatedSource, ScriptedBackend
from tests.helpers.audio import buzz
from tests.helpers.disk import disk_full_after


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


T0 = 1_750_000_000.0
"""A wall-clock time for tests that inject one (2025-06-15T15:06:40Z)."""


def test_file_names_round_trip_any_stream_id_with_the_start() -> None:
    started = T0 + 0.25
    for stream in ["mic", "a.b.c", "../etc/passwd", "ünï code/x y", ".", "x.00000001",
                   "x.20250301T120000.000Z", "7"]:
        name = file_name(stream, 7, started)
        assert "/" not in name
        assert parse_file_name(name) == JournalFile(stream, 7, started)
    assert file_name("mic", 3, T0 + 0.25) == "mic.00000003.20250615T150640.250Z.jsonl"
    assert parse_file_name("notes.txt") is None
    assert parse_file_name("x.abc.jsonl") is None
    assert parse_file_name("x.00000001.2025T1.jsonl") is None


def test_names_of_older_versions_parse_with_an_unknown_start() -> None:
    assert parse_file_name("mic.00000003.jsonl") == JournalFile("mic", 3, None)
    # An older version's stream named like a new name's head stays that stream.
    assert parse_file_name("x.00000001.00000004.jsonl") == JournalFile("x.00000001", 4, None)
    # A start of the right shape that is no date: unknown, not a lost file.
    assert parse_file_name("mic.00000002.20251340T000000.000Z.jsonl") == JournalFile(
        "mic", 2, None)


def test_recorded_starts_are_ms_and_map_to_themselves() -> None:
    for t in (T0, T0 + 0.0004, T0 + 0.9999, 1.0 / 3, 4e9 + 0.123):
        r = recorded_start(t)
        assert recorded_start(r) == r and abs(t - r) < 0.001
        assert file_name("s", 1, t) == file_name("s", 1, r)
        parsed = parse_file_name(file_name("s", 1, t))
        assert parsed is not None and parsed.started == r
    # Out of what a name can hold: clamped, still a name that parses back.
    assert recorded_start(-5.0) == 0.0
    for t in (-5.0, 1e15):
        assert parse_file_name(file_name("s", 1, t)) is not None


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
    # Damage nested past what Python's json reads (RecursionError) is damage too.
    deep = "[" * 100_000 + "]" * 100_000
    assert decode_record(deep) is None
    assert decode_line(deep) is None
    assert _decode_pruned(deep.encode()) is None


def test_rotation_decision() -> None:
    assert not should_rotate(0, 10_000, 1e9, 100, 1.0)       # an empty file never rotates
    assert should_rotate(90, 11, 0.0, 100, 0.0)               # would pass max_bytes
    assert not should_rotate(90, 10, 0.0, 100, 0.0)
    assert should_rotate(1, 1, 5.0, 100, 5.0)                 # old enough
    assert not should_rotate(1, 1, 1e9, 100, 0.0)             # 0: no age limit
    assert should_rotate(1, 1, math.inf, 100, 5.0)            # start not trusted
    assert not should_rotate(0, 1, math.inf, 100, 5.0)


def test_file_age_by_the_wall_clock_and_its_steps() -> None:
    assert file_age(T0, T0 + 90.0) == 90.0
    assert file_age(T0, T0 + 10 * 365 * 86400) == 10 * 365 * 86400   # set forward: old
    # Set back a little: age 0, not negative; a lot: the start is not trusted.
    assert file_age(T0, T0 - CLOCK_SLACK_S) == 0.0
    assert file_age(T0, T0 - CLOCK_SLACK_S - 1) == math.inf


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
        *finals, end = [json.loads(m) for m in sub.backlog]
        assert [m["seq"] for m in finals] == [2, 3]
        assert all(m["final"] for m in finals)
        # It ended before the restart: so ends the replay.
        assert (end["type"], end["stream"], end["finals"]) == ("stream.ended", "mic", 3)
        # The same stream id again: numbering goes on after the seqs reserved
        # when 1 was sent (a restart skips up to a block).
        await run_stream(engine, "mic", 2)
        live = [json.loads(sub.queue.get_nowait()) for _ in range(sub.queue.qsize())]
        base = 1 + SEQ_RESERVE_BLOCK
        assert [m["seq"] for m in live if m["type"] == "caption"] == [base + 1, base + 2]
        # Now memory holds those and the journal all five: a resume from 2
        # uses both, with no gap (seq has holes; nothing is missing).
        again = b.subscribe(["mic"], since={"mic": 2})
        assert [json.loads(m).get("seq") for m in again.backlog][:3] == [3, base + 1, base + 2]
        assert all(json.loads(m)["type"] != "gap" for m in again.backlog)
        # A stream nobody journaled is unknown, as before.
        assert [json.loads(m)["type"] for m in b.subscribe(since={"x": 4}).backlog] == ["gap"]


async def test_a_resume_read_off_the_loop_gives_what_the_stream_did_meanwhile_once(
        tmp_path: Path) -> None:
    """The resume's journal read runs on a worker thread while the loop goes
    on writing: here the stream is opened again, captions twice and ends
    while the read waits. The subscription gets the old finals from the
    journal, then the new run live, each once: the read leaves out the
    finals given after the resume was asked, and the journal's new end
    (which the live events carry)."""
    cfg = config(tmp_path)
    async with Engine(cfg, ScriptedBackend()) as engine:
        await run_stream(engine, "mic", 3)
    async with Engine(cfg, ScriptedBackend()) as engine:
        assert engine.journal is not None
        gated = GatedSource(engine.journal)
        b = Broadcaster(16, encode_event, history=100, source=gated,
                        last_seq=engine.last_seq)
        engine.add_listener(b.publish)
        resuming = asyncio.ensure_future(b.resume(["mic"], since={"mic": 1}))
        assert await asyncio.to_thread(gated.entered.wait, 10)
        await run_stream(engine, "mic", 2)
        gated.release()
        sub = await resuming
        got = [json.loads(m) for m in sub.backlog]
        got += [json.loads(sub.queue.get_nowait()) for _ in range(sub.queue.qsize())]
    base = 1 + SEQ_RESERVE_BLOCK
    assert [m.get("seq", m["type"]) for m in got] == [
        2, 3, "stream.started", base + 1, base + 2, "stream.ended"]
    assert gated.released


async def test_a_journal_file_gone_unreadable_gives_a_resume_a_gap_not_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file that cannot be read any more (a disk error, a permission; here a
    folder in its place, which stops root too): the subscription is made, and
    what the file held is a gap, not an exception out of subscribe (which
    closed the connection 1011 and kept a token's subscriber slot)."""
    cfg = config(tmp_path)
    async with Engine(cfg, ScriptedBackend()) as engine:
        await run_stream(engine, "mic", 2)
    async with Engine(cfg, ScriptedBackend()) as engine:
        assert engine.journal is not None
        b = Broadcaster(16, encode_event, history=100, source=engine.journal)
        engine.add_listener(b.publish)
        (path,) = (tmp_path / "j").glob("mic.*.jsonl")
        path.rename(tmp_path / "moved")
        path.mkdir()
        with caplog.at_level(logging.ERROR):
            sub = b.subscribe(["mic"], since={"mic": 0})
        assert [json.loads(m) for m in sub.backlog] == [
            {"type": "gap", "stream": "mic", "from": 1, "to": None}]
        assert "cannot read the journal to resume mic" in caplog.text
        # What this run retains still follows the gap.
        await run_stream(engine, "mic", 1)
        again = b.subscribe(["mic"], since={"mic": 0})
        kinds = [json.loads(m)["type"] for m in again.backlog]
        assert kinds[0] == "gap" and "caption" in kinds


async def test_the_epoch_lives_with_the_journal_and_only_there(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The journal's numbering goes on across restarts, so its epoch does; an
    engine without one numbers anew each run, under a new epoch."""
    cfg = config(tmp_path)
    async with Engine(cfg, ScriptedBackend()) as engine:
        first = engine.epoch
        await run_stream(engine, "mic", 1)
    assert (tmp_path / "j" / EPOCH_FILE).read_text() == first + "\n"
    async with Engine(cfg, ScriptedBackend()) as engine:
        assert engine.epoch == first
        # The epoch file is never taken for a stream's.
        assert set(engine.journal.restore() if engine.journal else {}) == {"mic"}
    # A damaged file: a new epoch (resumes then replay from 0), said once.
    (tmp_path / "j" / EPOCH_FILE).write_bytes(b"\xff not an epoch")
    with caplog.at_level(logging.WARNING):
        async with Engine(cfg, ScriptedBackend()) as engine:
            damaged = engine.epoch
    assert damaged != first and "is damaged" in caplog.text
    assert (tmp_path / "j" / EPOCH_FILE).read_text() == damaged + "\n"
    plain = load_config(env={})
    async with Engine(plain, ScriptedBackend()) as a, Engine(plain, ScriptedBackend()) as b:
        assert len({a.epoch, b.epoch, first, damaged}) == 4
    assert not list((tmp_path / "j").glob("*.part"))


async def test_an_epoch_that_cannot_be_kept_is_logged_and_the_engine_serves(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A folder where the epoch file cannot be written (read-only, a full
    disk; here a folder in the way, which stops root too) or read: the engine
    starts anyway with an epoch of this run only, logged in one line, and
    journals its finals as before. It used to stop with a traceback."""
    cfg = config(tmp_path)
    (tmp_path / "j" / (EPOCH_FILE + ".part")).mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        async with Engine(cfg, ScriptedBackend()) as engine:
            first = engine.epoch
            await run_stream(engine, "mic", 1)
        async with Engine(cfg, ScriptedBackend()) as engine:
            second = engine.epoch
            assert engine.journal is not None and engine.journal.last_seq("mic") >= 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and "holds for this run only" in errors[0].getMessage()
    assert first != second                        # not kept: each run its own
    assert all(parse_epoch([e]) == e for e in (first, second))
    assert not (tmp_path / "j" / EPOCH_FILE).exists()
    (tmp_path / "j" / (EPOCH_FILE + ".part")).rmdir()
    (tmp_path / "j" / EPOCH_FILE).mkdir()         # unreadable as a file
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        async with Engine(cfg, ScriptedBackend()) as engine:
            assert parse_epoch([engine.epoch]) == engine.epoch
    assert "cannot read" in caplog.text and "holds for this run only" in caplog.text
    assert not list((tmp_path / "j").glob("*.part"))


def test_rotation_by_size_keeps_keep_files_and_reports_the_gap(tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"journal.max_bytes": 1024, "journal.keep": 2}).journal
    journal = Journal(cfg)
    journal.restore()
    for seq in range(1, 41):
        journal.append(caption("s", seq, text="word " * 20))
    journal.close()
    files = sorted((tmp_path / "j").glob("*.jsonl"))
    assert len(files) == 3                     # the current one and `keep` rotated ones
    assert all(f.stat().st_size <= 1024 for f in files)
    oldest = parse_file_name(files[0].name)
    assert oldest is not None and oldest.index > 1      # the oldest were deleted
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


def test_a_file_rotated_away_while_a_replay_reads_makes_its_finals_a_gap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay off the loop lists the files, and the loop may delete the
    oldest (rotation past ``keep``, a prune) before it opens them. File 1
    was listed, so the replay took itself for complete (covered from seq 1):
    the deleted file's finals were skipped without a gap."""
    cfg = config(tmp_path, **{"journal.max_bytes": 4096, "journal.keep": 100}).journal
    journal = Journal(cfg)
    journal.restore()
    for seq in range(1, 41):
        journal.append(caption("s", seq, text="word " * 20))
    listed = journal._files_of("s")
    first = parse_file_name(listed[0].name)
    assert first is not None and first.index == 1 and len(listed) > 2
    # Listed, then deleted before it is read, as by the loop meanwhile.
    monkeypatch.setattr(journal, "_files_of", lambda stream: listed)
    listed[0].unlink()
    replay = journal.replay("s", 0)
    assert replay is not None
    seqs = [r.seq for r in replay.records]
    assert seqs == list(range(seqs[0], 41)) and seqs[0] > 1
    assert replay.covered_from == seqs[0]
    journal.close()


def test_a_line_cut_short_by_a_crash_is_skipped_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(tmp_path).journal
    journal = Journal(cfg)
    journal.restore()
    journal.append(caption("s", 1))
    journal.append(caption("s", 2))
    journal.close()
    [path] = (tmp_path / "j").glob("s.00000001.*.jsonl")
    whole = encode_record(caption("s", 3))
    with path.open("a") as f:
        f.write(whole[:25])                       # the crash: half a line, no newline
    with caplog.at_level(logging.WARNING):
        restarted = Journal(cfg)
        assert restarted.restore() == {"s": 2}
    assert "damaged line" in caplog.text
    restarted.append(caption("s", 3))             # starts on a line of its own
    restarted.close()
    replay = restarted.replay("s", 2)
    assert replay is not None
    assert [r.seq for r in replay.records] == [3] and replay.covered_from == 3
    # The cut line may have been a final sent (fsync = "interval" loses the
    # rest of it in a power cut): a resume from before it gets a gap, which
    # covers the finals before it too (one gap, first).
    replay = restarted.replay("s", 0)
    assert replay is not None
    assert [r.seq for r in replay.records] == [3] and replay.covered_from == 3


def test_seq_reservations_count_on_restore_and_are_never_replayed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(tmp_path).journal
    journal = Journal(cfg)
    journal.restore()
    # Seqs 1..70 are sent (partials and the finals 2 and 40): a reservation
    # is written at 1 and at 66, past the first block.
    written = []
    for seq in range(1, 71):
        if journal.reserve("s", seq):
            written.append(seq)
        if seq in (2, 40):
            journal.append(caption("s", seq))
    assert written == [1, 2 + SEQ_RESERVE_BLOCK]
    assert journal.last_seq("s") == 70          # this process knows what it sent
    journal.reserve("only-partials", 5)         # a stream that sent no final
    journal.close()
    lines = [json.loads(x) for f in sorted((tmp_path / "j").glob("s.*"))
             for x in f.read_text().splitlines()]
    assert [(m["type"], m["seq"]) for m in lines] == [
        ("seq.reserved", 1 + SEQ_RESERVE_BLOCK), ("caption", 2), ("caption", 40),
        ("seq.reserved", 66 + SEQ_RESERVE_BLOCK)]
    with caplog.at_level(logging.WARNING):
        restarted = Journal(cfg)
        # After a restart: the highest final or reservation, past every seq sent.
        assert restarted.restore() == {"s": 66 + SEQ_RESERVE_BLOCK,
                                       "only-partials": 5 + SEQ_RESERVE_BLOCK}
        replay = restarted.replay("s", 0)
        assert replay is not None and replay.covered_from == 1
        assert [r.seq for r in replay.records] == [2, 40]       # captions only
        assert all(decode_caption(r.message)["final"] for r in replay.records)
        assert restarted.replay("s", 2, 40) == type(replay)((), 1)
        # Known, with nothing to replay: a resume gets no gap for it.
        assert restarted.replay("only-partials", 0) == type(replay)((), 1)
    assert not caplog.records                   # reservation lines are not damage
    # Below the mark nothing more is written; past it, a new reservation.
    assert not restarted.reserve("s", 66 + SEQ_RESERVE_BLOCK)
    assert restarted.reserve("s", 67 + SEQ_RESERVE_BLOCK)
    restarted.close()
    assert Journal(cfg).restore()["s"] == 67 + 2 * SEQ_RESERVE_BLOCK


def test_rotation_carries_the_reservation_so_deleted_files_do_not_lose_it(
        tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"journal.max_bytes": 1024, "journal.keep": 0}).journal
    journal = Journal(cfg)
    journal.restore()
    journal.reserve("s", 1)                      # reserves up to 1 + block
    for seq in range(1, 31):                     # finals under that mark, rotating
        journal.reserve("s", seq)
        journal.append(caption("s", seq, text="word " * 20))
    journal.close()
    files = files_of(tmp_path, "s")
    assert len(files) == 1 and files[0][0].index > 1     # the first files are gone
    first_line = json.loads((next((tmp_path / "j").glob("s.*"))).read_text().splitlines()[0])
    assert first_line == {"type": "seq.reserved", "stream": "s", "seq": 1 + SEQ_RESERVE_BLOCK}
    assert all(f.stat().st_size <= 1024 for f in (tmp_path / "j").glob("*.jsonl"))
    restarted = Journal(cfg)
    assert restarted.restore() == {"s": 1 + SEQ_RESERVE_BLOCK}
    replay = restarted.replay("s", 0)
    assert replay is not None
    seqs = [r.seq for r in replay.records]
    assert seqs == list(range(seqs[0], 31)) and replay.covered_from == seqs[0] > 1


def test_a_rotated_files_reservation_counts_when_the_newest_file_lost_its_copy(
        tmp_path: Path) -> None:
    """The newest file's carried reservation zeroed (a crash under fsync =
    "never" loses the new file's first page): restore still finds the mark
    in the file rotated before it, so partials sent under it are not
    numbered again."""
    cfg = config(tmp_path, **{"journal.max_bytes": 1024, "journal.keep": 1,
                              "journal.fsync": "never"}).journal
    journal = Journal(cfg)
    journal.restore()
    for seq in range(1, 8):
        journal.reserve("s", seq)
        journal.append(caption("s", seq, text="word " * 20))
    journal.reserve("s", 8)                      # a partial, under the mark
    journal.close()
    files = sorted((tmp_path / "j").glob("s.*.jsonl"))    # one name but the index
    assert len(files_of(tmp_path, "s")) == 2              # rotated, one kept
    data = files[-1].read_bytes()
    carried = data.index(b"\n")
    assert json.loads(data[:carried]) == {"type": "seq.reserved", "stream": "s",
                                          "seq": 1 + SEQ_RESERVE_BLOCK}
    files[-1].write_bytes(bytes(carried) + data[carried:])
    restarted = Journal(cfg)
    assert restarted.restore() == {"s": 1 + SEQ_RESERVE_BLOCK}
    assert restarted.last_seq("s") >= 8
    restarted.close()


@pytest.mark.parametrize("newest", [True, False])
def test_a_journal_file_that_cannot_be_read_in_full_at_restore(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        newest: bool) -> None:
    """A read error (EIO) part way through the newest file refuses the
    restore, as ever: the seqs past what was read are unknown, and counting
    from what was read would number them again. One in an older file, read
    only for a mark the damaged newest file lost, leaves the newest file's
    count, said in a warning."""
    cfg = config(tmp_path, **{"journal.max_bytes": 1024, "journal.keep": 1}).journal
    journal = Journal(cfg)
    journal.restore()
    for seq in range(1, 8):
        journal.reserve("s", seq)
        journal.append(caption("s", seq, text="word " * 20))
    journal.close()
    files = sorted((tmp_path / "j").glob("s.*.jsonl"))
    assert len(files) == 2
    if not newest:
        # Its carried reservation zeroed, so the file before is read for it.
        data = files[-1].read_bytes()
        carried = data.index(b"\n")
        files[-1].write_bytes(bytes(carried) + data[carried:])
    failing = files[-1 if newest else 0]
    restarted = Journal(cfg)
    real = restarted._lines

    def eio(path: Path, **kw: bool) -> Iterator[object]:
        lines = real(path, **kw)
        if path != failing:
            yield from lines
            return
        if newest:
            yield next(lines)
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(restarted, "_lines", eio)
    if newest:
        with pytest.raises(OSError, match="Input/output"):
            restarted.restore()
        return
    with caplog.at_level(logging.WARNING, "evoxtral_stream.engine.journal"):
        assert restarted.restore() == {"s": 7}
    assert any("Input/output" in r.getMessage() for r in caplog.records)
    restarted.close()


async def test_seq_goes_on_past_every_seq_sent_after_a_crash_mid_segment(
        tmp_path: Path) -> None:
    """The last seq sent before a crash is usually a partial's, which is not
    journaled; the reservation is, so the restarted stream sends no seq a
    subscriber already holds."""
    cfg = config(tmp_path, **{"stream.partial_interval_ms": 200})
    crashed = tmp_path / "crashed"
    given: list[CaptionEvent] = []
    async with Engine(cfg, ScriptedBackend(lambda a: f"{len(a)} samples")) as engine:
        engine.add_listener(lambda e: given.append(e) if isinstance(e, CaptionEvent) else None)
        stream = engine.open_stream("mic")
        stream.push(talk(2)[:48_000])             # a final, then speech without an end
        for _ in range(200):
            if sum(not e.final for e in given if e.segment == 1) >= 3:
                break
            await stream.wait_idle()
            await asyncio.sleep(0.01)
        assert any(e.final for e in given) and not given[-1].final
        # The crash: the disk as it is now; the engine never drains.
        shutil.copytree(tmp_path / "j", crashed)
    cfg = config(tmp_path, **{"stream.partial_interval_ms": 200,
                              "journal.dir": str(crashed)})
    async with Engine(cfg, ScriptedBackend()) as engine:
        assert engine.journal is not None
        b = Broadcaster(16, encode_event, history=100, source=engine.journal)
        engine.add_listener(b.publish)
        # A subscriber resumes from the last seq it got before the crash.
        last = max(e.seq for e in given)
        sub = b.subscribe(["mic"], since={"mic": last})
        await run_stream(engine, "mic", 2)
        live = [json.loads(sub.queue.get_nowait()) for _ in range(sub.queue.qsize())]
    assert sub.backlog == []                     # nothing journaled after it, and no gap
    new = [m["seq"] for m in live if m["type"] == "caption"]
    assert new and min(new) > last
    assert sum(m["final"] for m in live if m["type"] == "caption") == 2


async def test_a_refused_reservation_is_reported_once_and_captions_still_go_out(
        tmp_path: Path) -> None:
    events: list[EngineEvent] = []
    async with Engine(config(tmp_path, **{"stream.partial_interval_ms": 200}),
                      ScriptedBackend()) as engine:
        assert engine.journal is not None

        def refuse(stream: str, seq: int) -> bool:
            raise OSError(28, "No space left on device")

        engine.journal.reserve = refuse  # type: ignore[method-assign]
        engine.add_listener(events.append)
        await run_stream(engine, "mic", 2)
        failures = engine.stats().journal_failures
    captions = [e for e in events if isinstance(e, CaptionEvent)]
    errors = [e for e in events if isinstance(e, StreamError)]
    assert sum(c.final for c in captions) == 2
    assert [e.code for e in errors] == ["journal_failed"]
    assert "seq reservation" in errors[0].message
    assert failures == len(captions)


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


# --- the end of a stream -----------------------------------------------------------


def lines_of(tmp: Path, stream: str) -> list[dict[str, object]]:
    """Every journal line of ``stream``, oldest file first, decoded."""
    def index(path: Path) -> int:
        info = parse_file_name(path.name)
        assert info is not None
        return info.index

    paths = sorted((tmp / "j").glob(f"{stream}.*.jsonl"), key=index)
    return [json.loads(x) for path in paths for x in path.read_text().splitlines()]


def ended(journal: Journal, stream: str) -> str | None:
    """What ``journal`` replays of ``stream``'s end."""
    replay = journal.replay(stream, 0)
    assert replay is not None
    return replay.ended


def test_the_end_is_journaled_and_replayed_until_the_stream_is_opened_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(tmp_path).journal
    journal = Journal(cfg)
    journal.restore()
    for seq in (1, 2):
        journal.reserve("s", seq)
        journal.append(caption("s", seq))
    end = StreamEnded("s", 2.5, 2, 2)
    journal.end(end)
    assert journal.open_files == 0                   # released too
    # The very message subscribers get, after the last final.
    assert lines_of(tmp_path, "s")[-1] == json.loads(encode_event(end))
    replay = journal.replay("s", 0)
    assert replay is not None and [r.seq for r in replay.records] == [1, 2]
    assert replay.ended == encode_event(end)
    assert journal.replay("s", 2) == type(replay)((), 1, encode_event(end))
    with caplog.at_level(logging.WARNING):
        restarted = Journal(cfg)
        # The end carries no seq: the last seq is still the reservation's.
        assert restarted.restore() == {"s": 1 + SEQ_RESERVE_BLOCK}
        replay = restarted.replay("s", 1)
    assert not caplog.records                        # an end record is no damage
    assert replay is not None and replay.ended == encode_event(end)
    # Opened again in the same process: its first caption, under the mark,
    # still writes a reservation, so the journal no longer says it ended.
    assert journal.reserve("s", 3)
    replay = journal.replay("s", 0)
    assert replay is not None and replay.ended is None
    assert not journal.reserve("s", 4)               # once
    again = StreamEnded("s", 1.0, 1, 1)
    journal.append(caption("s", 4))
    journal.end(again)
    assert ended(journal, "s") == encode_event(again)
    # After a restart: opened again (numbered past the mark), then a crash.
    restarted = Journal(cfg)
    last = restarted.restore()["s"]
    assert restarted.reserve("s", last + 1)
    restarted.append(caption("s", last + 1))
    restarted.close()                                # the crash: no end
    replay = Journal(cfg).replay("s", 0)
    assert replay is not None and [r.seq for r in replay.records] == [1, 2, 4, last + 1]
    assert replay.ended is None                      # its end is unknown
    # A final alone clears the end too (files of an older version: no
    # reservation comes first).
    restarted.end(again)
    restarted.append(caption("s", last + 2))
    restarted.close()
    assert ended(Journal(cfg), "s") is None
    # A stream the journal holds nothing of gets no file for its end.
    restarted.end(StreamEnded("silent", 0.0, 0, 0))
    assert not list((tmp_path / "j").glob("silent.*"))
    assert restarted.replay("silent", 0) is None


def files_of_records(tmp: Path, stream: str) -> list[tuple[JournalFile, list[int | None]]]:
    """Like :func:`files_of`, with None for a line without a seq (an end)."""
    out = []
    for path in (tmp / "j").glob(f"{stream}.*.jsonl"):
        info = parse_file_name(path.name)
        assert info is not None
        out.append((info, [json.loads(x).get("seq") for x in path.read_text().splitlines()]))
    return sorted(out, key=lambda f: f[0].index)


def test_the_end_never_rotates_and_a_rotation_after_it_keeps_it_right(
        tmp_path: Path) -> None:
    now = [T0]
    journal = journal_at(tmp_path, now, **{"journal.max_bytes": 1024, "journal.keep": 0})
    journal.reserve("s", 1)
    seq = 0
    first = tmp_path / "j" / file_name("s", 1, T0)
    line = len(encode_record(caption("s", 99, text="word " * 10))) + 1
    while first.stat().st_size + line <= 1024:       # up to the last that fits
        seq += 1
        journal.append(caption("s", seq, text="word " * 10))
    # Past max_bytes and max_age_s: a final would rotate (deleting the
    # finals, keep = 0); the end goes into the current file.
    now[0] = T0 + DAY
    journal.end(StreamEnded("s", 9.0, seq, seq))
    assert [(f.index, seqs[-1]) for f, seqs in files_of_records(tmp_path, "s")] == [
        (1, None)]
    replay = journal.replay("s", 0)
    assert replay is not None and [r.seq for r in replay.records] == list(range(1, seq + 1))
    assert replay.ended is not None and replay.covered_from == 1
    assert journal_at(tmp_path, now).last_seq("s") == 1 + SEQ_RESERVE_BLOCK
    # Opened again: the next final rotates; the new file starts with the
    # reservation, after which the old end no longer holds.
    journal.append(caption("s", seq + 1))
    journal.close()
    [(info, records)] = files_of_records(tmp_path, "s")
    assert info.index == 2 and records == [1 + SEQ_RESERVE_BLOCK, seq + 1]
    restarted = journal_at(tmp_path, now)
    assert restarted.last_seq("s") == 1 + SEQ_RESERVE_BLOCK
    replay = restarted.replay("s", 0)
    assert replay is not None and [r.seq for r in replay.records] == [seq + 1]
    assert replay.ended is None


async def test_the_end_is_journaled_before_any_listener_sees_it(
        tmp_path: Path) -> None:
    cfg = config(tmp_path)
    ends: list[tuple[StreamEnded, object]] = []

    def listener(event: EngineEvent) -> None:
        if isinstance(event, StreamEnded):
            ends.append((event, lines_of(tmp_path, event.stream)[-1]))

    async with Engine(cfg, ScriptedBackend()) as engine:
        engine.add_listener(listener)
        await run_stream(engine, "mic", 2)
        assert engine.stats().journal_open_files == 0
    [(end, last_line)] = ends
    assert last_line == json.loads(encode_event(end))
    assert end.finals == 2


async def test_after_a_restart_a_stream_live_again_does_not_end_with_its_old_end(
        tmp_path: Path) -> None:
    cfg = config(tmp_path)
    async with Engine(cfg, ScriptedBackend()) as engine:
        await run_stream(engine, "mic", 2)
    async with Engine(cfg, ScriptedBackend()) as engine:
        assert engine.journal is not None
        b = Broadcaster(16, encode_event, history=100, source=engine.journal)
        engine.add_listener(b.publish)

        def types(sub: Subscription) -> list[str]:
            return [json.loads(m)["type"] for m in sub.backlog]

        assert types(b.subscribe(since={"mic": 0})) == ["caption", "caption", "stream.ended"]
        # Opened again, no caption yet: the journal's last record is still
        # the old end, but the stream is live.
        stream = engine.open_stream("mic")
        assert types(b.subscribe(since={"mic": 0})) == ["caption", "caption"]
        await stream.close()                         # ends with nothing said
        *_, end = [json.loads(m) for m in b.subscribe(since={"mic": 0}).backlog]
        assert (end["type"], end["finals"]) == ("stream.ended", 0)   # this run's end
        # History off: the journal's end alone, and only while not live.
        plain = Broadcaster(16, encode_event, history=0, source=engine.journal)
        engine.add_listener(plain.publish)
        assert types(plain.subscribe(since={"mic": 0}))[-1] == "stream.ended"
        stream = engine.open_stream("mic")
        assert "stream.ended" not in types(plain.subscribe(since={"mic": 0}))
        await stream.close()


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


def test_streams_past_retention_are_pruned_at_start_their_seq_kept(
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
    # Its files are gone; its numbering is not (opened again, it goes on).
    assert restarted.last_seq("old") == 29 and restarted.replay("old", 0) is None
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
    # After a restart too: the files number past the pruned seq, so a replay
    # from the start still says the first two are missing.
    restarted = Journal(cfg)
    assert restarted.restore() == {"weekly": 3}
    replay = restarted.replay("weekly", 0)
    assert replay is not None and replay.covered_from == 3


def test_a_stream_pruned_before_a_restart_goes_on_after_its_last_seq(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A stream not written for retention_s had its files deleted and, after
    a restart, counted from seq 1 again under the same epoch: a client
    holding seq 41 of it then skipped the new run's first 41 captions
    unseen. The pruned streams' last seqs are kept in the folder."""
    cfg = config(tmp_path, **{"journal.retention_s": 60.0}).journal
    journal = Journal(cfg)
    journal.restore()
    for seq in range(1, 42):
        journal.append(caption("weekly", seq))
    journal.release("weekly")
    _age(tmp_path / "j", "weekly", 120)
    assert journal.prune() == ["weekly"]
    journal.close()
    restarted = Journal(cfg)
    assert restarted.restore() == {}
    assert restarted.last_seq("weekly") == 41
    restarted.append(caption("weekly", 42))
    restarted.close()
    # A damaged line (a crash mid-write) is skipped, the rest read.
    with open(tmp_path / "j" / PRUNED_FILE, "ab") as f:
        f.write(b'{"stream": "cut", "se')
    with caplog.at_level(logging.WARNING):
        again = Journal(cfg)
        assert again.restore() == {"weekly": 42}
    assert "1 damaged line(s)" in caplog.text
    replay = again.replay("weekly", 0)
    assert replay is not None and replay.covered_from == 42


def test_the_file_of_pruned_seqs_is_rewritten_before_it_grows_past_twice_the_bound(
        tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"journal.retention_s": 60.0}).journal
    journal = Journal(cfg, pruned_remembered=2)
    journal.restore()
    for n in range(1, 8):
        journal.append(caption(f"s{n}", n))
        journal.release(f"s{n}")
        _age(tmp_path / "j", f"s{n}", 120)
        assert journal.prune() == [f"s{n}"]
        lines = (tmp_path / "j" / PRUNED_FILE).read_text().splitlines()
        assert len(lines) <= 4
    journal.close()
    assert [json.loads(x) for x in lines][-2:] == [{"stream": "s6", "seq": 6},
                                                   {"stream": "s7", "seq": 7}]
    restarted = Journal(cfg, pruned_remembered=2)
    restarted.restore()
    assert [restarted.last_seq(f"s{n}") for n in range(1, 8)] == [0] * 5 + [6, 7]


def test_only_the_most_recently_pruned_streams_seqs_are_remembered(
        tmp_path: Path) -> None:
    # A server whose clients take a new stream id per connection must not
    # grow by one entry per id forever: past the bound, the stream pruned
    # longest ago is forgotten, as a restart would forget it.
    cfg = config(tmp_path, **{"journal.retention_s": 60.0}).journal
    journal = Journal(cfg, pruned_remembered=2)
    journal.restore()
    folder = tmp_path / "j"
    for n, stream in enumerate(("a", "b", "c"), 1):
        journal.append(caption(stream, 10 * n))
        journal.release(stream)
        _age(folder, stream, 120)
        assert journal.prune() == [stream]
    assert [journal.last_seq(s) for s in ("a", "b", "c")] == [0, 20, 30]
    # "a" starts over and its replay is complete from 1; "b" goes on and its
    # replay says where its kept records begin.
    journal.append(caption("a", 1))
    journal.append(caption("b", 21))
    replay_a, replay_b = journal.replay("a", 0), journal.replay("b", 0)
    assert replay_a is not None and replay_a.covered_from == 1
    assert replay_b is not None and replay_b.covered_from == 21
    # Pruned once more, "a" and "b" are the newest pruned, and "c", pruned
    # longest ago, is forgotten.
    journal.release("a")
    journal.release("b")
    _age(folder, "a", 120)
    _age(folder, "b", 120)
    assert sorted(journal.prune()) == ["a", "b"]
    assert [journal.last_seq(s) for s in ("a", "b", "c")] == [1, 21, 0]
    journal.close()


# --- age rotation: by the wall clock, from the file's start -----------------------


DAY = 86400.0


def journal_at(tmp: Path, now: list[float], **over: object) -> Journal:
    """A restored journal whose wall clock reads ``now[0]``. Retention off:
    the injected clock must not be compared with the files' real mtimes."""
    cfg = config(tmp, **{"journal.max_age_s": DAY, "journal.retention_s": 0.0,
                         **over}).journal
    journal = Journal(cfg, wall=lambda: now[0])
    journal.restore()
    return journal


def files_of(tmp: Path, stream: str) -> list[tuple[JournalFile, list[int]]]:
    """Each journal file of ``stream``, lowest index first, with its seqs."""
    out = []
    for path in (tmp / "j").glob(f"{stream}.*.jsonl"):
        info = parse_file_name(path.name)
        assert info is not None
        out.append((info, [json.loads(x)["seq"] for x in path.read_text().splitlines()]))
    return sorted(out, key=lambda f: f[0].index)


def test_a_stream_that_reconnects_hourly_still_rotates_daily(tmp_path: Path) -> None:
    """The age counts from the file's start, not from when it was re-opened."""
    now = [T0]
    journal = journal_at(tmp_path, now)
    for hour in range(30):                          # one final per connection
        now[0] = T0 + hour * 3600
        journal.append(caption("s", hour + 1))
        journal.release("s")
    assert files_of(tmp_path, "s") == [
        (JournalFile("s", 1, T0), list(range(1, 25))),
        (JournalFile("s", 2, T0 + DAY), list(range(25, 31)))]


def test_a_server_restarted_hourly_still_rotates_daily(tmp_path: Path) -> None:
    now = [T0]
    for hour in range(30):                          # a fresh journal every hour
        now[0] = T0 + hour * 3600
        journal = journal_at(tmp_path, now)
        assert journal.last_seq("s") == hour
        journal.append(caption("s", hour + 1))
        journal.close()
    assert [(f.index, f.started, seqs[0], seqs[-1]) for f, seqs in files_of(tmp_path, "s")] == [
        (1, T0, 1, 24), (2, T0 + DAY, 25, 30)]


def test_a_reopened_file_is_checked_for_size_too(tmp_path: Path) -> None:
    now = [T0]
    journal = journal_at(tmp_path, now, **{"journal.max_bytes": 1024})
    first = tmp_path / "j" / file_name("s", 1, T0)
    seq = 0
    while seq == 0 or first.stat().st_size < 900:
        seq += 1
        journal.append(caption("s", seq, text="word " * 10))
    journal.release("s")
    journal.append(caption("s", seq + 1, text="word " * 30))   # would pass max_bytes
    journal.close()
    files = sorted((tmp_path / "j").glob("*.jsonl"))
    assert len(files) == 2 and all(f.stat().st_size <= 1024 for f in files)


def test_a_file_of_an_older_version_gets_its_start_at_the_first_append(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "j"
    folder.mkdir()
    legacy1, legacy2 = folder / "s.00000001.jsonl", folder / "s.00000002.jsonl"
    legacy1.write_text("".join(encode_record(caption("s", i)) + "\n" for i in (1, 2)))
    legacy2.write_text(encode_record(caption("s", 3)) + "\n")
    os.utime(legacy2, (T0 - 30 * DAY, T0 - 30 * DAY))
    now = [T0]
    with caplog.at_level(logging.INFO):
        journal = journal_at(tmp_path, now, **{"journal.retention_s": 0.0})
        assert journal.last_seq("s") == 3
        # Reading renames nothing: prune still sees the old file's mtime.
        assert legacy2.exists() and legacy2.stat().st_mtime == T0 - 30 * DAY
        replay = journal.replay("s", 0)
        assert replay is not None
        assert [r.seq for r in replay.records] == [1, 2, 3] and replay.covered_from == 1
        # Its start is unknown: the first append records "now" in its name,
        # and appends to it (no rotation just for being old).
        now[0] = T0 + 3600
        journal.append(caption("s", 4))
    assert "recorded no start" in caplog.text
    assert not legacy2.exists()
    assert [(f, seqs) for f, seqs in files_of(tmp_path, "s")] == [
        (JournalFile("s", 1, None), [1, 2]), (JournalFile("s", 2, T0 + 3600), [3, 4])]
    # From then on the start holds across release and restart.
    journal.release("s")
    now[0] = T0 + 3600 + DAY - 1
    journal.append(caption("s", 5))
    journal.close()
    now[0] = T0 + 3600 + DAY
    restarted = journal_at(tmp_path, now)
    restarted.append(caption("s", 6))
    restarted.close()
    assert [(f.index, f.started, seqs) for f, seqs in files_of(tmp_path, "s")] == [
        (1, None, [1, 2]), (2, T0 + 3600, [3, 4, 5]), (3, T0 + 3600 + DAY, [6])]
    replay = restarted.replay("s", 2)
    assert replay is not None and [r.seq for r in replay.records] == [3, 4, 5, 6]


def test_when_the_start_cannot_be_recorded_the_file_is_still_written(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "j"
    folder.mkdir()
    (folder / "s.00000001.jsonl").write_text(encode_record(caption("s", 1)) + "\n")
    now = [T0]
    (folder / file_name("s", 1, T0)).write_text("")     # the name it would take
    journal = journal_at(tmp_path, now)
    with caplog.at_level(logging.WARNING):
        journal.append(caption("s", 2))
    assert "cannot rename" in caplog.text
    journal.close()
    replay = journal.replay("s", 0)
    assert replay is not None and [r.seq for r in replay.records] == [1, 2]


def test_a_file_left_empty_by_a_crash_is_appended_to(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    folder.mkdir()
    (folder / file_name("s", 1, T0)).touch()        # created, then the crash
    now = [T0 + 60]
    journal = journal_at(tmp_path, now)
    assert journal.replay("s", 0) is None
    journal.append(caption("s", 1))
    now[0] = T0 + DAY                               # its start is the name's
    journal.append(caption("s", 2))
    journal.close()
    assert [(f.index, seqs) for f, seqs in files_of(tmp_path, "s")] == [(1, [1]), (2, [2])]


def test_journal_lines_are_caption_messages_only_and_read_without_warnings(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = [T0]
    with caplog.at_level(logging.WARNING):
        journal = journal_at(tmp_path, now, **{"journal.max_bytes": 1024,
                                                "journal.keep": 100})
        for seq in range(1, 21):
            now[0] = T0 + seq * DAY / 4
            journal.append(caption("s", seq, text="word " * 10))
            if seq % 3 == 0:
                journal.release("s")
        journal.close()
        restarted = journal_at(tmp_path, now, **{"journal.keep": 100})
        assert restarted.last_seq("s") == 20
        replay = restarted.replay("s", 0)
    assert replay is not None and [r.seq for r in replay.records] == list(range(1, 21))
    assert not caplog.records
    assert len(list((tmp_path / "j").glob("*.jsonl"))) > 3      # rotated by age and by size
    for path in (tmp_path / "j").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            assert decode_caption(line)["final"] is True
            assert line == encode_record(caption("s", json.loads(line)["seq"],
                                                 text="word " * 10))


def test_a_clock_set_back_rotates_once_and_never_stalls_rotation(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = [T0]
    journal = journal_at(tmp_path, now)
    journal.append(caption("s", 1))
    now[0] = T0 - CLOCK_SLACK_S / 2                 # a small step back: age 0
    journal.append(caption("s", 2))
    assert len(files_of(tmp_path, "s")) == 1
    back = T0 - 365 * DAY                           # a year back
    now[0] = back
    with caplog.at_level(logging.WARNING):
        journal.append(caption("s", 3))             # not a year's wait: rotated now
    assert "ahead of the clock" in caplog.text
    for seq in (4, 5):                              # and not again and again
        journal.append(caption("s", seq))
    journal.release("s")
    now[0] = back + DAY                             # the new file ages normally
    journal.append(caption("s", 6))
    journal.close()
    assert [(f.index, f.started, seqs) for f, seqs in files_of(tmp_path, "s")] == [
        (1, T0, [1, 2]), (2, back, [3, 4, 5]), (3, back + DAY, [6])]


def test_a_restart_with_the_clock_set_back_rotates_once(tmp_path: Path) -> None:
    now = [T0]
    journal = journal_at(tmp_path, now)
    journal.append(caption("s", 1))
    journal.close()
    now[0] = T0 - 30 * DAY
    for seq in (2, 3):
        restarted = journal_at(tmp_path, now)
        restarted.append(caption("s", seq))
        restarted.close()
    assert [(f.started, seqs) for f, seqs in files_of(tmp_path, "s")] == [
        (T0, [1]), (T0 - 30 * DAY, [2, 3])]


def test_a_clock_set_forward_rotates_once(tmp_path: Path) -> None:
    now = [T0]
    journal = journal_at(tmp_path, now)
    journal.append(caption("s", 1))
    ahead = T0 + 10 * 365 * DAY
    now[0] = ahead
    for seq in (2, 3):
        journal.append(caption("s", seq))
    journal.close()
    assert [(f.started, seqs) for f, seqs in files_of(tmp_path, "s")] == [
        (T0, [1]), (ahead, [2, 3])]


def test_no_age_limit_never_rotates_by_age(tmp_path: Path) -> None:
    now = [T0]
    journal = journal_at(tmp_path, now, **{"journal.max_age_s": 0.0})
    for seq, t in enumerate((T0, T0 + 400 * DAY, T0 - 400 * DAY), 1):
        now[0] = t
        journal.append(caption("s", seq))
    journal.close()
    assert [seqs for _, seqs in files_of(tmp_path, "s")] == [[1, 2, 3]]


def test_a_streams_first_record_and_its_replay_parse_only_its_own_file_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Both run on the event loop, once per new stream and per resume: a week
    # of retention holds the files of thousands of streams (20,000 of them
    # made a resume take 0.25 s, and one of 100 streams blocked the loop 50 s).
    cfg = config(tmp_path).journal
    writer = Journal(cfg)
    writer.restore()
    for i in range(200):
        writer.append(caption(f"other-{i}", 1))
    writer.append(caption("a.b", 1, "not a's"))
    for stream in (*(f"other-{i}" for i in range(200)), "a.b"):
        writer.end(StreamEnded(stream, 1.0, 1, 1))
    writer.close()

    parsed: list[str] = []
    real = parse_file_name

    def counting(name: str) -> JournalFile | None:
        parsed.append(name)
        return real(name)

    journal = Journal(cfg)
    journal.restore()
    # Where the store looks the name up (it imports it from .files).
    monkeypatch.setattr(journal_store, "parse_file_name", counting)
    journal.append(caption("a", 1, "first"))
    journal.append(caption("a", 2, "second"))
    replay = journal.replay("a", 0)
    assert replay is not None
    assert [json.loads(r.message)["text"] for r in replay.records] == ["first", "second"]
    other = journal.replay("a.b", 0)
    assert other is not None and [json.loads(r.message)["text"] for r in other.records] == [
        "not a's"]
    # "a." starts "a.b"'s names too: those may be read, the 200 others never.
    assert not [n for n in parsed if n.startswith("other-")], parsed[:5]
    assert any(n.startswith("a.") for n in parsed)   # the spy saw the scans
    journal.close()


def _long_stream_journal(tmp_path: Path) -> tuple[JournalConfig, list[Path]]:
    """A journal of stream "s" across many small files: 133 finals of seqs
    1..200 (every third seq is a partial's, not journaled), then its end."""
    cfg = config(tmp_path, **{"journal.max_bytes": 1024, "journal.keep": 100}).journal
    writer = Journal(cfg)
    writer.restore()
    for seq in range(1, 201):
        if seq % 3:
            writer.append(caption("s", seq, text="word " * 20))
    writer.end(StreamEnded("s", 200.0, 133, 133))
    writer.close()
    files = sorted((tmp_path / "j").glob("*.jsonl"))
    assert len(files) > 20
    return cfg, files


def test_a_resume_of_recent_finals_reads_only_the_newest_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stream live for days keeps (keep + 1) * max_bytes of journal (80 MB by
    # default); a resume is read on the event loop, so one asking for the last
    # few finals must not parse them all (1.8 s per viewer at 77 MB).
    cfg, files = _long_stream_journal(tmp_path)

    journal = Journal(cfg)
    journal.restore()
    full = journal.replay("s", 0)
    assert full is not None and full.covered_from == 1
    read: list[Path] = []
    real = journal._lines

    def spy(path: Path, **kw: bool) -> Iterator[object]:
        read.append(path)
        return real(path, **kw)

    monkeypatch.setattr(journal, "_lines", spy)
    for since in (197, 196, 150, 0):
        read.clear()
        replay = journal.replay("s", since)
        assert replay is not None
        assert replay.records == tuple(r for r in full.records if r.seq > since)
        assert replay.ended == full.ended is not None
        assert replay.covered_from <= since + 1      # nothing missing: no gap
        if since >= 196:
            assert sorted(read) in (files[-1:], files[-2:]), [p.name for p in read]
        elif since == 150:
            assert 1 < len(read) < len(files) // 2
        else:
            assert sorted(read) == files
    # The broadcaster replays the same, gap-free.
    b = Broadcaster(16, encode_event, history=10, source=journal)
    backlog = [json.loads(m) for m in b.subscribe(since={"s": 196}).backlog]
    assert [(m["type"], m.get("seq")) for m in backlog] == [
        ("caption", 197), ("caption", 199), ("caption", 200), ("stream.ended", None)]


def test_a_resume_from_the_start_replays_only_the_newest_history_finals_after_a_gap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A resume with since=0 of a stream live for days would otherwise hold
    # its whole journal (up to (keep + 1) * max_bytes) in one subscriber's
    # backlog: measured +155 MB per such subscriber.
    cfg, files = _long_stream_journal(tmp_path)

    journal = Journal(cfg)
    journal.restore()
    full = journal.replay("s", 0)
    assert full is not None and len(full.records) == 134
    newest = [r.seq for r in full.records][-10:]
    read: list[Path] = []
    real = journal._lines

    def spy(path: Path, **kw: bool) -> Iterator[object]:
        read.append(path)
        return real(path, **kw)

    monkeypatch.setattr(journal, "_lines", spy)
    limited = journal.replay("s", 0, limit=10)
    assert limited is not None
    assert limited.records == full.records[-10:]
    assert (limited.covered_from, limited.ended) == (newest[0], full.ended)
    # Only the newest files, those holding the ten (two or three finals a
    # file), not all of them.
    assert sorted(read) == files[-len(read):], [p.name for p in read]
    assert 3 <= len(read) <= 6 < len(files), [p.name for p in read]

    b = Broadcaster(16, encode_event, history=10, source=journal)
    read.clear()
    gap, *replayed, end = [json.loads(m) for m in b.subscribe(since={"s": 0}).backlog]
    assert (gap["type"], gap["from"], gap["to"]) == ("gap", 1, newest[0] - 1)
    assert [(m["type"], m["seq"]) for m in replayed] == [("caption", q) for q in newest]
    assert end["type"] == "stream.ended"
    assert len(read) <= 6, [p.name for p in read]
    # A since within the limit replays as without one: no gap, every final after it.
    unlimited = Broadcaster(16, encode_event, history=1000, source=journal)
    since = newest[0] - 1
    backlog = b.subscribe(since={"s": since}).backlog
    assert backlog == unlimited.subscribe(since={"s": since}).backlog
    assert [json.loads(m).get("seq") for m in backlog] == [*newest, None]
    # History off: nothing from the journal but the gap and the end.
    plain = Broadcaster(16, encode_event, history=0, source=journal)
    gap, end = [json.loads(m) for m in plain.subscribe(since={"s": 0}).backlog]
    assert (gap["type"], gap["from"], gap["to"], end["type"]) == ("gap", 1, 200, "stream.ended")


def _bytes_read() -> int:
    """Bytes this process has read through read(2) so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_a_resume_of_recent_finals_reads_the_end_of_the_newest_file_only(
        tmp_path: Path) -> None:
    # After a restart every subscriber resumes from the journal, on the event
    # loop: each used to parse the stream's newest file whole (0.19 s at the
    # default 16 MB), stalling every stream's audio; now the lines it needs,
    # read from the end. A damaged line at the file's start is never read.
    cfg = config(tmp_path, **{"journal.max_bytes": 64 << 20, "journal.fsync": "never"}).journal
    writer = Journal(cfg)
    writer.restore()
    texts = {seq: f"{seq} " + "ünïcode words spanning blocks " * (seq % 7 + 1)
             for seq in range(1, 12001) if seq % 5}
    for seq, text in texts.items():
        writer.append(caption("s", seq, text=text))
    writer.close()
    [path] = (tmp_path / "j").glob("*.jsonl")
    with path.open("r+b") as f:   # the first line damaged
        f.write(b"#")
    assert path.stat().st_size > 4 << 20
    # The end left by a crash: a line cut short, no newline.
    with path.open("ab") as f:
        f.write(b'{"type": "caption", "seq": 1200')

    journal = Journal(cfg)
    journal.restore()
    for since, limit in ((11997, None), (11900, 100), (11000, 50), (0, 10), (0, 0)):
        before = _bytes_read()
        replay = journal.replay("s", since, limit=limit)
        read = _bytes_read() - before
        assert replay is not None
        wanted = [seq for seq in texts if seq > since]
        kept = wanted if limit is None else wanted[max(0, len(wanted) - limit):] if limit else []
        assert [r.seq for r in replay.records] == kept, (since, limit)
        assert [decode_caption(r.message)["text"] for r in replay.records] == [
            texts[seq] for seq in kept]
        if len(kept) < len(wanted):    # the older are a gap, up to the first replayed
            assert replay.covered_from == (kept[0] if kept else wanted[-1] + 1)
        else:
            assert replay.covered_from <= since + 1
        assert read < 512 << 10, (since, limit, read)


def _prune_once(journal: Journal, folder: Path, stream: str, seq: int) -> None:
    journal.append(caption(stream, seq))
    journal.release(stream)
    _age(folder, stream, 120)
    assert journal.prune() == [stream]


def test_rewriting_the_pruned_file_keeps_a_reopened_streams_gap(tmp_path: Path) -> None:
    """docs/config.md: the `pruned` file "is rewritten with those [the last
    seqs of the N streams pruned most recently]", and "a resume reaching into
    the deleted finals gets a gap". A stream pruned and then opened again is
    dropped from the rewrite (it is no longer in _pruned_seq) although it is
    among the N pruned most recently; after a restart its file 1 counts as
    complete, and a resume into the deleted finals is silently skipped."""
    cfg = config(tmp_path, **{"journal.retention_s": 60.0}).journal
    folder = tmp_path / "j"
    journal = Journal(cfg, pruned_remembered=2)
    journal.restore()
    for seq in (1, 2, 3):                       # "x" pruned three times: 3 lines
        _prune_once(journal, folder, "x", seq)
    for seq in range(1, 11):                    # "s": finals 1..10, then pruned
        journal.append(caption("s", seq))
    journal.release("s")
    _age(folder, "s", 120)
    assert journal.prune() == ["s"]
    journal.append(caption("s", 11))            # opened again: goes on after 10
    _prune_once(journal, folder, "t", 1)        # the 5th line: the file is rewritten
    journal.close()
    restarted = Journal(cfg, pruned_remembered=2)
    restarted.restore()
    replay = restarted.replay("s", 5)
    assert replay is not None
    assert replay.covered_from == 11            # finals 6..10 are gone: a gap
    b = Broadcaster(16, encode_event, history=10, source=restarted)
    first = json.loads(b.subscribe(since={"s": 5}).backlog[0])
    assert first["type"] == "gap"


def test_a_journal_gap_never_names_captions_the_resume_then_replays(tmp_path: Path) -> None:
    """docs/protocol.md "Resume": a gap "names the missing range". When the
    journal's oldest kept final is newer than the oldest caption the
    broadcaster retains (a small journal, keep = 0), Journal.replay's
    covered_from lies past ``before`` and the broadcaster announces a gap
    up to it, then replays the retained captions inside that very range:
    the client is told captions 6..38 are lost, then gets 11..38."""
    cfg = config(tmp_path, **{"journal.max_bytes": 1024, "journal.keep": 0}).journal
    journal = Journal(cfg)
    journal.restore()
    b = Broadcaster(64, encode_event, history=30, source=journal)
    for seq in range(1, 41):
        event = caption("s", seq, text="word " * 20)
        journal.append(event)              # journaled before any listener sees it
        b.publish(event)
    kept_first = 41 - 30                   # the broadcaster retains 11..40
    backlog = [json.loads(m) for m in b.subscribe(since={"s": 5}).backlog]
    gaps = [m for m in backlog if m["type"] == "gap"]
    sent = [m["seq"] for m in backlog if m["type"] == "caption"]
    assert sent == list(range(kept_first, 41))
    assert len(gaps) == 1 and gaps[0]["from"] == 6
    # The gap must end before the first caption replayed.
    assert gaps[0]["to"] < sent[0], (gaps[0], sent[0])


def test_a_pruned_entry_appended_after_a_line_cut_short_is_kept(tmp_path: Path) -> None:
    """A crash mid-write left the file of pruned seqs ending in half a line;
    the next prune appended its entry right after it, on the same line, so
    that entry was skipped as damaged and, after a restart, its stream
    counted from seq 1 again under the same epoch."""
    cfg = config(tmp_path, **{"journal.retention_s": 60.0}).journal
    folder = tmp_path / "j"
    journal = Journal(cfg)
    journal.restore()
    journal.close()
    with open(folder / PRUNED_FILE, "ab") as f:
        f.write(b'{"stream": "cut", "se')           # the crash: no newline
    restarted = Journal(cfg)
    restarted.restore()
    for seq in range(1, 7):
        restarted.append(caption("weekly", seq))
    _prune_once(restarted, folder, "weekly", 7)
    restarted.close()
    again = Journal(cfg)
    assert again.restore() == {}
    assert again.last_seq("weekly") == 7


def test_a_stream_reopened_after_a_prune_keeps_its_seq_when_its_new_file_holds_nothing(
        tmp_path: Path) -> None:
    """A stream pruned, then opened again, whose new file a crash left with
    no whole record (created, its first reservation not yet written): the
    restart took the empty file's 0 as its last seq over the pruned one, so
    the stream numbered from 1 again under the same epoch."""
    cfg = config(tmp_path, **{"journal.retention_s": 60.0}).journal
    folder = tmp_path / "j"
    journal = Journal(cfg)
    journal.restore()
    for seq in range(1, 7):
        journal.append(caption("weekly", seq))
    _prune_once(journal, folder, "weekly", 7)
    journal.close()
    # Opened again, and the crash: its new file exists, empty or cut short.
    (folder / file_name("weekly", 1, time.time())).write_bytes(b'{"type":"seq.res')
    restarted = Journal(cfg)
    restarted.restore()
    assert restarted.last_seq("weekly") == 7


def test_a_second_process_on_the_same_journal_folder_is_refused(tmp_path: Path) -> None:
    """Two servers given one journal.dir each restored the same last seqs
    and reservations and numbered the same stream alike under one epoch,
    interleaving their lines in its file: seqs given twice, resumes replaying
    the other server's captions. The folder is now held by one process."""
    cfg = config(tmp_path).journal
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from evoxtral_stream.config import load_config
            from evoxtral_stream.engine.journal import Journal
            cfg = load_config(env={{}}, overrides={{
                "journal.enabled": True, "journal.dir": {str(tmp_path / "j")!r}}}).journal
            journal = Journal(cfg)
            journal.restore()
            journal.reserve("mic", 1)
            print("ready", flush=True)
            sys.stdin.read()
            journal.close()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        second = Journal(cfg)
        with pytest.raises(OSError, match="another process"):
            second.restore()
        assert second.open_files == 0
    finally:
        holder.kill()          # SIGKILL: the kernel lets go of the folder
        holder.wait()
    after_crash = Journal(cfg)
    assert after_crash.restore() == {"mic": 1 + SEQ_RESERVE_BLOCK}
    after_crash.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("fsync", ["never", "always"])
def test_close_on_a_full_disk_closes_every_file_and_raises_once(
        tmp_path: Path, fsync: str) -> None:
    """A final the full disk refused stays in the file's buffer, so closing
    that file fails again (its flush). close() stopped at the first file
    that failed: the files after it were neither fsynced nor closed, and
    nothing said so. Now every file is closed and one error is raised."""
    cfg = config(tmp_path, **{"journal.fsync": fsync}).journal
    journal = Journal(cfg)
    journal.restore()
    folder = tmp_path / "j"
    # The first stream's file is /dev/full: every write to it fails ENOSPC.
    full = folder / file_name("full", 1, time.time())
    full.symlink_to("/dev/full")
    with pytest.raises(OSError, match="No space left") as refused:
        journal.append(caption("full", 1))
    assert refused.value.errno == errno.ENOSPC
    for stream in ("b", "c"):
        journal.append(caption(stream, 1))
    files = {s: journal._open[s].file for s in ("full", "b", "c")}
    with pytest.raises(OSError, match="No space left") as closing:
        journal.close()
    assert journal.open_files == 0
    assert all(f.closed for f in files.values())
    assert closing.value.errno == errno.ENOSPC
    assert "full." in str(closing.value)      # which file, for the one log line
    # The folder is let go of: a new journal (a restart) takes it. (Reading
    # /dev/full gives zeros without end: the stand-in goes first.)
    full.unlink()
    again = Journal(cfg)
    assert again.restore() == {"b": 1, "c": 1}
    again.close()


def test_a_line_with_a_seq_below_one_is_skipped_as_damaged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Seqs count from 1, but any caption-shaped line was taken: a corrupted
    last line with seq -5 (at or below any resume's since) stopped the
    backward read of a replay there, hiding every final before it."""
    cfg = config(tmp_path).journal
    journal = Journal(cfg)
    journal.restore()
    journal.append(caption("s", 1))
    journal.append(caption("s", 2))
    journal.close()
    [path] = (tmp_path / "j").glob("s.00000001.*.jsonl")
    with path.open("a") as f:
        f.write(encode_record(caption("s", -5)) + "\n")
    with caplog.at_level(logging.WARNING):
        restarted = Journal(cfg)
        assert restarted.restore() == {"s": 2}
        replay = restarted.replay("s", 0)
    assert replay is not None and [r.seq for r in replay.records] == [1, 2]
    assert "damaged line" in caplog.text
    restarted.close()
    assert decode_record(encode_record(caption("s", 0))) is None
    assert decode_line('{"type":"seq.reserved","stream":"s","seq":-1}') is None


def test_a_clock_set_forward_prunes_no_stream_before_its_time(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Retention compared file mtimes with the wall clock alone: set a day
    forward, it made every stream not live look a day unwritten, and their
    fresh files were deleted at the next prune. A step forward is now
    believed once it has held for retention_s (by the monotonic clock);
    until then ages count as before the step."""
    cfg = config(tmp_path, **{"journal.retention_s": 60.0}).journal
    folder = tmp_path / "j"
    wall, mono = [time.time()], [1000.0]
    journal = Journal(cfg, clock=lambda: mono[0], wall=lambda: wall[0])
    journal.restore()
    for stream in ("fresh", "old"):
        journal.append(caption(stream, 1))
        journal.release(stream)
    _age(folder, "old", 120)                  # truly past retention
    wall[0] += DAY                            # the clock is set a day forward
    mono[0] += 1
    with caplog.at_level(logging.WARNING):
        assert journal.prune() == ["old"]     # ages still count: "old" is old
    assert "clock" in caplog.text
    wall[0] += 30
    mono[0] += 30
    assert journal.prune() == []              # "fresh" is 31 s unwritten
    # retention_s after the step, its files are that old in truth, whatever
    # the clock says: the new clock is believed.
    wall[0] += 31
    mono[0] += 31
    assert journal.prune() == ["fresh"]
    # A clock that runs as the monotonic one does is read as it is.
    journal.append(caption("later", 1))
    journal.release("later")
    for path in folder.glob("later.*.jsonl"):   # 120 s old by the new clock
        os.utime(path, (wall[0] - 120, wall[0] - 120))
    wall[0] += 1
    mono[0] += 1
    assert journal.prune() == ["later"]
    journal.close()


def test_a_rotated_file_that_cannot_be_deleted_costs_no_final(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found by the journal fuzz: a rotated file that rotation cannot delete
    (here a folder in its place, which stops root too; a file without
    permission, an immutable one) failed the append that rotated, after the
    new file was made: that final was lost (and reported as not journaled),
    and so was one at every later rotation. Now the file stays, with a
    warning, and every final is written."""
    cfg = config(tmp_path, **{"journal.max_bytes": 1024, "journal.keep": 5}).journal
    journal = Journal(cfg)
    journal.restore()
    for seq in range(1, 9):
        journal.append(caption("s", seq, text="word " * 20))
    journal.close()
    first = sorted((tmp_path / "j").glob("s.00000001.*.jsonl"))[0]
    first.unlink()
    first.mkdir()                                   # what rotation cannot delete
    journal = Journal(dataclasses.replace(cfg, keep=0))
    journal.restore()
    with caplog.at_level(logging.WARNING):
        for seq in range(9, 13):
            journal.append(caption("s", seq, text="word " * 20))
    journal.close()
    assert f"cannot delete rotated file {first.name}" in caplog.text
    assert first.is_dir()
    # Beside it, the newest file only (keep = 0), which ends with the last final.
    [newest] = [p for p in (tmp_path / "j").glob("s.*.jsonl") if p.is_file()]
    seqs = [json.loads(x)["seq"] for x in newest.read_text().splitlines()
            if json.loads(x)["type"] == "caption"]
    assert seqs and seqs == list(range(seqs[0], 13)) and seqs[0] > 9


def test_a_file_missing_between_kept_ones_is_announced_as_a_gap(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found by the journal fuzz: a file deleted (or renamed) by hand between
    two kept ones lost its finals from a resume silently: file 1 was there,
    so the replay counted as complete, and no gap named them. Now a replay
    reads from the file after the missing one, as if rotation had deleted
    those before it, and the gap (one, from since) covers them all."""
    cfg = config(tmp_path, **{"journal.max_bytes": 1024, "journal.keep": 100}).journal
    journal = Journal(cfg)
    journal.restore()
    for seq in range(1, 13):
        journal.append(caption("s", seq, text="word " * 20))
    journal.close()
    files = files_of(tmp_path, "s")
    assert len(files) >= 4
    middle = files[2]
    gone = sorted((tmp_path / "j").glob(f"s.{middle[0].index:08d}.*.jsonl"))[0]
    gone.rename(tmp_path / "j" / (gone.name + ".bak"))
    after = [seq for _, seqs in files[3:] for seq in seqs]
    with caplog.at_level(logging.WARNING):
        replay = Journal(cfg).replay("s", 0)
    assert replay is not None
    assert [r.seq for r in replay.records] == after
    assert replay.covered_from == after[0] > max(middle[1])
    assert f"s has no file {middle[0].index}" in caplog.text
    b = Broadcaster(16, encode_event, history=100, source=Journal(cfg))
    backlog = [json.loads(m) for m in b.subscribe(since={"s": 1}).backlog]
    assert backlog[0] == {"type": "gap", "stream": "s", "from": 2, "to": after[0] - 1}
    assert [m["seq"] for m in backlog[1:]] == after


def test_a_zeroed_block_in_a_rotated_file_is_announced_as_a_gap(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found by the journal fuzz, once it checked lines damaged in place: a
    block of a rotated file zeroed (a disk, a crash of the file system) lost
    its finals from a resume with a "damaged line" warning but no gap. A
    damaged line may have held finals, so now a resume reaching before it
    gets a gap up to the first final after it, as for a missing file (one
    gap, first: the finals before the damage are in it too)."""
    cfg = config(tmp_path, **{"journal.max_bytes": 1024, "journal.keep": 100}).journal
    journal = Journal(cfg)
    journal.restore()
    for seq in range(1, 13):
        journal.append(caption("s", seq, text="word " * 20))
    journal.close()
    files = files_of(tmp_path, "s")
    assert len(files) >= 4
    old = sorted((tmp_path / "j").glob(f"s.{files[1][0].index:08d}.*.jsonl"))[0]
    data = old.read_bytes()
    first_line = data.index(b"\n") + 1
    zeroed = files[1][1][1]                         # the file's second final, zeroed
    end = data.index(b"\n", first_line)             # its newline stays
    old.write_bytes(data[:first_line] + b"\0" * (end - first_line) + data[end:])
    after = [seq for _, seqs in files[2:] for seq in seqs]
    with caplog.at_level(logging.WARNING):
        b = Broadcaster(16, encode_event, history=100, source=Journal(cfg))
        backlog = [json.loads(m) for m in b.subscribe(since={"s": 0}).backlog]
    assert "damaged line" in caplog.text
    gaps = [(m["from"], m["to"]) for m in backlog if m["type"] == "gap"]
    sent = [m["seq"] for m in backlog if m["type"] == "caption"]
    assert zeroed not in sent
    assert backlog[0]["type"] == "gap" and gaps == [(1, after[0] - 1)]
    assert sent == after
    # A resume from just before the damage gets the gap alone for it.
    since = files[1][1][0]
    backlog = [json.loads(m) for m in b.subscribe(since={"s": since}).backlog]
    assert backlog[0] == {"type": "gap", "stream": "s", "from": since + 1, "to": after[0] - 1}
    assert [m["seq"] for m in backlog[1:]] == after
    # One from after it replays all after it, without a gap.
    backlog = [json.loads(m) for m in b.subscribe(since={"s": after[0]}).backlog]
    assert [m["seq"] for m in backlog] == after[1:]


def test_files_not_named_as_the_journal_names_them_are_ignored_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file copied inside the journal folder, ``copy of mic.….jsonl``,
    was read as the files of a stream ``copy of mic``: restored (a stream
    the engine never had), replayed to a ``since=copy of mic:0`` and pruned
    as such. The journal names files by the percent-encoded stream id, which
    holds no space, so such a name is no journal file: it is ignored, with
    one warning naming it (not one per scan). Streams whose ids hold spaces
    and other characters (encoded in their names) are read as before."""
    now = [T0]
    cfg = config(tmp_path, **{"journal.retention_s": 3600.0}).journal
    journal = Journal(cfg, wall=lambda: now[0])
    journal.restore()
    for stream in ("mic", "café talk (2)"):
        journal.append(caption(stream, 1))
        journal.append(caption(stream, 2))
    journal.close()
    folder = tmp_path / "j"
    [mic] = folder.glob("mic.*.jsonl")
    copies = ["copy of " + mic.name, mic.name[:-6] + " (1).jsonl",
              mic.name.replace("mic", "m%69c"), mic.name.replace("mic", "MIC%zz")]
    for name in copies:
        shutil.copyfile(mic, folder / name)
        assert parse_file_name(name) is None, name
    # Nor is a name whose stream part is not encoded, or not text (a byte
    # that is no UTF-8, as os.listdir gives it).
    for name in ("café.00000001.jsonl", "caf%E9.00000001.jsonl", "\udcff.00000001.jsonl",
                 "%2f.00000001.jsonl"):
        assert parse_file_name(name) is None, name
    assert parse_file_name("%2F.00000001.jsonl") == JournalFile("/", 1, None)
    (folder / "bad\udcff.00000001.jsonl").write_bytes(b"")
    copies.append("bad\udcff.00000001.jsonl")
    with caplog.at_level(logging.WARNING):
        restarted = Journal(cfg, wall=lambda: now[0])
        assert restarted.restore() == {"mic": 2, "café talk (2)": 2}
        assert restarted.replay("copy of mic", 0) is None
        replay = restarted.replay("café talk (2)", 0)
        assert replay is not None and [r.seq for r in replay.records] == [1, 2]
        assert restarted.prune() == []
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1, warned
    assert all(repr(name) in warned[0] for name in copies), warned
    restarted.close()
    # Past retention, the journal's own files are deleted, the others kept.
    now[0] += 7200
    for path in folder.iterdir():
        os.utime(path, (T0, T0))
    later = Journal(cfg, wall=lambda: now[0])
    assert later.restore() == {}
    later.close()
    assert sorted(p.name for p in folder.glob("*.jsonl")) == sorted(copies)


def test_a_hole_left_by_an_undeletable_rotated_file_is_logged_once_and_gapped_always(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A rotated file that rotation cannot delete stays, and rotation
    deletes the ones after it: the files kept then miss the indices between,
    and every resume of the stream logged that hole again (a warning per
    reconnecting client, about a state only a person can change; rotation
    already said to remove the file). Now it is logged once per hole per
    process; every resume still gets its gap."""
    cfg = config(tmp_path, **{"journal.max_bytes": 1024, "journal.keep": 5}).journal
    journal = Journal(cfg)
    journal.restore()
    for seq in range(1, 5):
        journal.append(caption("s", seq, text="word " * 20))
    journal.close()
    first = sorted((tmp_path / "j").glob("s.00000001.*.jsonl"))[0]
    first.unlink()
    first.mkdir()                                   # what rotation cannot delete
    journal = Journal(dataclasses.replace(cfg, keep=1))
    journal.restore()
    for seq in range(5, 17):
        journal.append(caption("s", seq, text="word " * 20))
    kept = sorted(p for p in (tmp_path / "j").glob("s.*.jsonl") if p.is_file())
    assert len(kept) == 2
    info = parse_file_name(kept[0].name)
    assert info is not None and info.index > 2      # a hole after file 1
    after = [json.loads(x)["seq"] for p in kept for x in p.read_text().splitlines()]
    b = Broadcaster(16, encode_event, history=100, source=journal)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            backlog = [json.loads(m) for m in b.subscribe(since={"s": 1}).backlog]
            assert backlog[0] == {"type": "gap", "stream": "s", "from": 2,
                                  "to": after[0] - 1}
            assert [m["seq"] for m in backlog[1:]] == after
    holes = [r.getMessage() for r in caplog.records if "has no file" in r.getMessage()]
    assert len(holes) == 1, holes
    journal.close()


# --- a write the disk cuts short ------------------------------------------------------


async def test_a_final_the_disk_cut_short_is_reported_and_the_finals_after_it_replay(
        tmp_path: Path) -> None:
    """A full disk took half of a final's line and refused the rest: the
    next final, written whole, was appended on the same line, so a restart
    skipped both as one damaged line and a resume lost a final that had
    been journaled (a line longer than the file's buffer, 8 KiB, is written
    past the buffer: what the disk refused of it is dropped)."""
    events: list[EngineEvent] = []
    long_text = "ünïcode words of a long final " * 120      # 3 copies: > 8 KiB
    async with Engine(config(tmp_path), ScriptedBackend(lambda a: long_text)) as engine:
        journal = engine.journal
        assert journal is not None
        append = journal.append
        calls = [0]

        def cut_short(event: CaptionEvent) -> None:
            calls[0] += 1
            if calls[0] != 2:
                return append(event)
            [path] = (tmp_path / "j").glob("mic.*.jsonl")
            with disk_full_after(path.stat().st_size + 4000):
                return append(event)

        journal.append = cut_short  # type: ignore[method-assign]
        engine.add_listener(events.append)
        await run_stream(engine, "mic", 4)
    finals = [e for e in events if isinstance(e, CaptionEvent) and e.final]
    errors = [e for e in events if isinstance(e, StreamError)]
    assert [f.seq for f in finals] == [1, 2, 3, 4]            # all sent live
    assert [(e.code, e.segment) for e in errors] == [("journal_failed", finals[1].segment)]
    assert "final not journaled" in errors[0].message
    restarted = Journal(config(tmp_path).journal)
    assert restarted.restore()["mic"] >= 4
    b = Broadcaster(16, encode_event, history=100, source=restarted)
    backlog = [json.loads(m) for m in b.subscribe(since={"mic": 0}).backlog]
    # The final cut short is a gap (its fragment may have been any final),
    # and every final after it is replayed.
    assert backlog[0] == {"type": "gap", "stream": "mic", "from": 1, "to": 2}
    assert [(m["type"], m.get("seq")) for m in backlog[1:]] == [
        ("caption", 3), ("caption", 4), ("stream.ended", None)]
    restarted.close()


@pytest.mark.parametrize("words", [3, 1000])   # a line within the file's buffer, and past it
@pytest.mark.parametrize("fsync", ["never", "always"])
def test_after_a_write_cut_short_the_next_line_stands_on_its_own(
        tmp_path: Path, words: int, fsync: str) -> None:
    cfg = config(tmp_path, **{"journal.fsync": fsync}).journal
    journal = Journal(cfg)
    journal.restore()
    journal.append(caption("s", 1))
    [path] = (tmp_path / "j").glob("s.*.jsonl")
    cut = caption("s", 2, text="word " * words)
    with disk_full_after(path.stat().st_size + len(encode_record(cut)) // 2), \
            pytest.raises(OSError, match="too large") as refused:
        journal.append(cut)
    assert refused.value.errno == errno.EFBIG
    journal.append(caption("s", 3))
    journal.append(caption("s", 4))
    for reader in (journal, Journal(cfg)):
        replay = reader.replay("s", 0)
        assert replay is not None
        seqs = [r.seq for r in replay.records]
        # The final cut short is whole (what the disk refused was kept and
        # written with the next line) or a gap; never the finals after it.
        assert (seqs, replay.covered_from) in (([1, 2, 3, 4], 1), ([3, 4], 3)), seqs
        journal.close()
    assert Journal(cfg).restore() == {"s": 4}


def test_a_rotation_cut_short_by_the_disk_loses_no_later_final(tmp_path: Path) -> None:
    """A rotation writes the stream's reservation first into the new file:
    the disk cutting that short must not take the next final with it."""
    cfg = config(tmp_path, **{"journal.max_bytes": 1024, "journal.keep": 5}).journal
    journal = Journal(cfg)
    journal.restore()
    journal.reserve("s", 1)
    [path] = (tmp_path / "j").glob("s.*.jsonl")
    seq = 1
    while path.stat().st_size + len(encode_record(caption("s", seq, text="word " * 20))) < 1024:
        journal.append(caption("s", seq, text="word " * 20))
        seq += 1
    with disk_full_after(20), pytest.raises(OSError, match="too large"):  # reservation cut
        journal.append(caption("s", seq, text="word " * 20))
    assert len(list((tmp_path / "j").glob("s.*.jsonl"))) == 2
    for after in range(seq + 1, seq + 4):
        journal.append(caption("s", after, text="word " * 20))
    journal.close()
    restarted = Journal(cfg)
    assert restarted.restore() == {"s": 1 + SEQ_RESERVE_BLOCK}
    # The final whose rotation the disk refused never reached a file: a
    # resume from before it gets a gap up to it (its loss was recorded).
    for since in (0, seq - 1):
        replay = restarted.replay("s", since)
        assert replay is not None
        assert [r.seq for r in replay.records] == list(range(seq + 1, seq + 4))
        assert replay.covered_from == seq + 1
    restarted.close()


def test_a_pruned_entry_after_one_the_disk_cut_short_is_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(tmp_path, **{"journal.retention_s": 60.0}).journal
    folder = tmp_path / "j"
    journal = Journal(cfg)
    journal.restore()
    _prune_once(journal, folder, "first", 3)
    journal.append(caption("cut", 5))
    journal.release("cut")
    _age(folder, "cut", 120)
    size = (folder / PRUNED_FILE).stat().st_size
    with caplog.at_level(logging.ERROR), disk_full_after(size + 10):
        assert journal.prune() == ["cut"]           # half its entry written
    assert "cannot write" in caplog.text
    assert not (folder / PRUNED_FILE).read_bytes().endswith(b"\n")
    _prune_once(journal, folder, "next", 7)
    journal.close()
    again = Journal(cfg)
    again.restore()
    # "cut" is remembered until a restart only (docs/config.md); the entry
    # after it is whole.
    assert (again.last_seq("first"), again.last_seq("next")) == (3, 7)
    again.close()


# --- a final the disk refused whole ---------------------------------------------------


@pytest.mark.parametrize("words", [3, 1000])   # a line within the file's buffer, and past it
async def test_a_final_the_disk_refused_whole_is_a_gap_after_a_restart(
        tmp_path: Path, words: int) -> None:
    """The disk refused every byte of a final (full before it, EIO): it was
    sent live and reported, but a resume after a restart replayed the finals
    around it with no gap, skipping it silently. A line within the file's
    buffer stays there and is written with the next line (then it is
    replayed); one past the buffer is dropped, and the journal records the
    loss with its next line."""
    events: list[EngineEvent] = []
    text = "word " * words
    async with Engine(config(tmp_path), ScriptedBackend(lambda a: text)) as engine:
        journal = engine.journal
        assert journal is not None
        append = journal.append
        calls = [0]

        def refused(event: CaptionEvent) -> None:
            calls[0] += 1
            if calls[0] != 2:
                return append(event)
            [path] = (tmp_path / "j").glob("mic.*.jsonl")
            with disk_full_after(path.stat().st_size):    # not one byte more
                return append(event)

        journal.append = refused  # type: ignore[method-assign]
        engine.add_listener(events.append)
        await run_stream(engine, "mic", 4)
    finals = [e for e in events if isinstance(e, CaptionEvent) and e.final]
    errors = [e for e in events if isinstance(e, StreamError)]
    assert [f.seq for f in finals] == [1, 2, 3, 4]            # all sent live
    assert [(e.code, e.segment) for e in errors] == [("journal_failed", finals[1].segment)]
    restarted = Journal(config(tmp_path).journal)
    assert restarted.restore()["mic"] >= 4
    b = Broadcaster(16, encode_event, history=100, source=restarted)
    for since in (0, 1):
        backlog = [json.loads(m) for m in b.subscribe(since={"mic": since}).backlog]
        kinds = [(m["type"], m.get("seq")) for m in backlog]
        if words == 3:      # written with the next line: nothing is missing
            assert kinds == [("caption", s) for s in range(since + 1, 5)] + [
                ("stream.ended", None)]
        else:
            assert backlog[0] == {"type": "gap", "stream": "mic", "from": since + 1, "to": 2}
            assert kinds[1:] == [("caption", 3), ("caption", 4), ("stream.ended", None)]
    # A resume from past the lost final is no gap.
    backlog = [json.loads(m) for m in b.subscribe(since={"mic": 2}).backlog]
    assert [(m["type"], m.get("seq")) for m in backlog] == [
        ("caption", 3), ("caption", 4), ("stream.ended", None)]
    restarted.close()


LONG = "word " * 2000
"""A final's text whose line is longer than the file's 8 KiB buffer: a write
of it the disk refuses is dropped, not kept for the next flush."""


def refuse(journal: Journal, event: CaptionEvent, folder: Path) -> None:
    """Append ``event`` with the disk full before its first byte."""
    files = list(folder.glob(f"{event.stream}.*.jsonl"))
    size = files[0].stat().st_size if files else 0
    with disk_full_after(size), pytest.raises(OSError, match="too large"):
        journal.append(event)


def records_of(tmp: Path, stream: str) -> list[dict[str, object]]:
    """Every non-blank journal line of ``stream`` (one file), decoded."""
    [path] = (tmp / "j").glob(f"{stream}.*.jsonl")
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def test_loss_records_round_trip_and_malformed_ones_are_damage() -> None:
    line = encode_lost("mic", (2, 3), 5)
    assert json.loads(line) == {"type": "seq.lost", "stream": "mic", "seqs": [2, 3], "seq": 5}
    lost = decode_lost(line)
    assert lost is not None and (lost.stream, lost.seqs, lost.seq) == ("mic", (2, 3), 5)
    for bad in ([], [3, 2], [2, 2], [0, 1], [True], ["2"], "2", None):
        assert decode_line(json.dumps({"type": "seq.lost", "stream": "m", "seqs": bad,
                                       "seq": 5})) is None, bad
    assert decode_line('{"type":"seq.lost","stream":"m","seqs":[2,6],"seq":5}') is None
    assert decode_line('{"type":"seq.lost","stream":"m","seqs":[2]}') is None


def test_finals_refused_in_a_row_are_one_loss_record_and_a_gap(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A disk full for a while refused finals 2, 3 and 5 whole (4 was a
    partial): the next line the disk took comes after one loss record, and
    a resume from before any of them gets a gap up to the one after them."""
    cfg = config(tmp_path).journal
    folder = tmp_path / "j"
    journal = Journal(cfg)
    journal.restore()
    journal.append(caption("s", 1))
    for seq in (2, 3, 5):
        refuse(journal, caption("s", seq, text=LONG), folder)
    journal.append(caption("s", 6))
    journal.append(caption("s", 7))
    assert [(x["type"], x.get("seq")) for x in records_of(tmp_path, "s")] == [
        ("caption", 1), ("seq.lost", 5), ("caption", 6), ("caption", 7)]
    assert records_of(tmp_path, "s")[1]["seqs"] == [2, 3, 5]
    journal.close()
    with caplog.at_level(logging.WARNING):
        restarted = Journal(cfg)
        assert restarted.restore() == {"s": 7}
        for since, covered in ((0, 6), (1, 6), (4, 6), (5, 1), (6, 1)):
            replay = restarted.replay("s", since)
            assert replay is not None
            assert ([r.seq for r in replay.records], replay.covered_from) == (
                [s for s in (6, 7) if s > since], covered), since
        # Only what was asked for counts: finals lost at or past `before`
        # come from elsewhere (the broadcaster's retained ones).
        assert restarted.replay("s", 0, before=3) == Replay((), 3)
        replay = restarted.replay("s", 0, before=2)
        assert replay is not None
        assert ([r.seq for r in replay.records], replay.covered_from) == ([1], 1)
    assert not caplog.records                       # a loss record is no damage
    b = Broadcaster(16, encode_event, history=100, source=restarted)
    backlog = [json.loads(m) for m in b.subscribe(since={"s": 1}).backlog]
    assert backlog[0] == {"type": "gap", "stream": "s", "from": 2, "to": 5}
    assert [m["seq"] for m in backlog[1:]] == [6, 7]
    restarted.close()


def test_a_stream_that_ends_after_a_refused_final_still_gets_the_gap(
        tmp_path: Path) -> None:
    cfg = config(tmp_path).journal
    journal = Journal(cfg)
    journal.restore()
    journal.append(caption("e", 1))
    refuse(journal, caption("e", 2, text=LONG), tmp_path / "j")
    end = StreamEnded("e", 2.0, 2, 2)
    journal.end(end)                                 # its loss record first
    # A stream whose every final was refused gets one too (and a file).
    refuse(journal, caption("only", 1, text=LONG), tmp_path / "j")
    journal.end(StreamEnded("only", 1.0, 1, 1))
    journal.close()
    restarted = Journal(cfg)
    assert restarted.restore() == {"e": 2, "only": 1}
    assert restarted.replay("e", 0) == Replay((), 3, encode_event(end))
    assert restarted.replay("e", 2) == Replay((), 1, encode_event(end))
    b = Broadcaster(16, encode_event, history=100, source=restarted)
    backlog = [json.loads(m) for m in b.subscribe(since={"e": 0, "only": 0}).backlog]
    assert [(m["type"], m["stream"], m.get("from"), m.get("to")) for m in backlog] == [
        ("gap", "e", 1, 2), ("stream.ended", "e", None, None),
        ("gap", "only", 1, 1), ("stream.ended", "only", None, None)]
    restarted.close()


def test_a_loss_is_recorded_at_close_or_else_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream that writes nothing after a refused final has its loss
    recorded when the journal closes; with the disk still full then, it is
    lost with the process, and an error says so. Only LOST_STREAMS streams'
    losses are kept, the latest; past that one is forgotten, logged."""
    monkeypatch.setattr(journal_store, "LOST_STREAMS", 2)
    cfg = config(tmp_path).journal
    folder = tmp_path / "j"
    journal = Journal(cfg)
    journal.restore()
    for stream in ("quiet", "gone", "kept"):
        journal.append(caption(stream, 1))
    # kept's file is the largest: a limit at its size leaves room for the others.
    journal.append(caption("kept", 2, text="more words " * 20))
    with caplog.at_level(logging.ERROR):
        for stream in ("gone", "quiet", "kept"):
            refuse(journal, caption(stream, 3, text=LONG), folder)
    assert "forgetting that the final(s) of gone up to seq 3" in caplog.text
    caplog.clear()
    [kept] = folder.glob("kept.*.jsonl")
    with caplog.at_level(logging.ERROR), disk_full_after(kept.stat().st_size):
        journal.release("kept")     # closed: the loss opens it again at close
        with contextlib.suppress(OSError):
            journal.close()
    assert journal.open_files == 0
    assert "cannot record that the final(s) of kept up to seq 3" in caplog.text
    assert "quiet" not in caplog.text
    restarted = Journal(cfg)
    restarted.restore()
    assert restarted.replay("quiet", 0) == Replay((), 4)
    for stream, seqs in (("gone", [1]), ("kept", [1, 2])):   # no gap: documented
        replay = restarted.replay(stream, 0)
        assert replay is not None and ([r.seq for r in replay.records],
                                       replay.covered_from) == (seqs, 1)
    restarted.close()


def test_loss_records_list_the_first_lost_and_the_highest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_store, "LOST_LISTED", 2)
    cfg = config(tmp_path).journal
    journal = Journal(cfg)
    journal.restore()
    journal.append(caption("s", 1))
    for seq in (2, 3, 5, 7):
        refuse(journal, caption("s", seq, text=LONG), tmp_path / "j")
    journal.append(caption("s", 9))
    journal.close()
    assert records_of(tmp_path, "s")[1] == {"type": "seq.lost", "stream": "s",
                                            "seqs": [2, 3], "seq": 7}
    restarted = Journal(cfg)
    assert restarted.restore() == {"s": 9}
    # Which of 4 to 7 were lost is not known: a resume from any of them
    # before 7 gets a gap up to 7.
    for since, covered in ((0, 8), (3, 8), (6, 8), (7, 1)):
        replay = restarted.replay("s", since)
        assert replay is not None and replay.covered_from == covered, since
        assert [r.seq for r in replay.records] == [9]
    restarted.close()


def test_an_interrupt_while_a_journal_file_is_replaced_leaves_no_part(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (before serve's signal handlers are in place, or a second one)
    while the epoch file is written to its ``.part`` file: the interrupt
    goes on, but the ``.part`` file was left in the folder, since only an
    OSError removed it. Now any exception does, as for the outputs."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".part"):
            raise KeyboardInterrupt
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    journal = Journal(config(tmp_path).journal)
    try:
        with pytest.raises(KeyboardInterrupt):
            journal.restore()
    finally:
        journal.close()
    assert not list((tmp_path / "j").glob("*.part"))
