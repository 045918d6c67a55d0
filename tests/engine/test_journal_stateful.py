"""A stateful model of the journal: streams written, ended, reopened, rotated,
pruned, restarted cleanly or after a crash, driven at random.

Hypothesis drives the real :class:`~evoxtral_stream.engine.journal.Journal`
as the engine does (a seq reservation before every caption, the final
appended after it, the end record when a stream ends, ``prune`` with the
live streams, ``sync_due`` under ``fsync = "interval"`` with its thread), in
a folder of its own per example, on an injected clock (wall and monotonic
advance together) and small ``max_bytes`` so that files rotate. Restarts
are clean (``close``) or crashes: the journal is dropped unclosed, then
the stream's newest file is cut at a random byte, or garbage or half a
line is appended to it, or a block of one of its files is zeroed (the
crash model of the store's module doc), and a new journal restores.

The model holds each journal file's bytes as the store's contract makes
them (one record per line, a record after a torn line on a new line, a
rotation by size or age carrying the latest reservation, ``keep`` rotated
files, an end record never rotating) and which of its lines are records
the journal wrote (the rest, after damage, are damaged lines). After every
step:

- the folder holds exactly the model's files, byte for byte, under names
  with the index and start the model expects;
- ``last_seq`` is the model's for every stream: after a restart the
  highest seq of a whole final or reservation left (so, with no damage, at
  or past every seq handed out), a pruned stream's last seq kept;
- a replay from 0 and from a seq in the middle gives exactly the whole
  finals after it that a damaged line or a deleted file do not hide, with
  the gap (``covered_from``) where the Replay docstring puts it, and the
  end message only when the stream's last record is its end;
- ``prune`` deletes the streams that are not live and were last written
  ``retention_s`` or more ago, no other;
- the files held open are those of the live streams written to;
- ``sync_due`` answers within its interval, and its thread lets a quiet
  spell's files go (no batch stuck), with no failed fsync.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from evoxtral_stream.config import JournalConfig, load_config
from evoxtral_stream.engine.journal import (
    SEQ_RESERVE_BLOCK,
    Journal,
    encode_end,
    encode_record,
    encode_reservation,
    file_age,
    parse_file_name,
    recorded_start,
    should_rotate,
)
from evoxtral_stream.events import CaptionEvent, StreamEnded

# Ids that need percent-encoding, or look like file names.
STREAMS = ("mic", "café ☕", "x/y%z")
T0 = 1_750_000_000.0
RETENTION_S = 5_000.0
INTERVAL_S = 1.0
# Text with what JSON must escape (quotes, backslashes, newlines, NUL),
# non-BMP characters and tags.
TEXTS = st.lists(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=6)
                 | st.sampled_from(['"', "\\", "\n", "\x00", "[laughs]", "🎉", "é" * 120]),
                 max_size=6).map(" ".join)


@dataclass(frozen=True)
class Rec:
    """A line the journal wrote: its kind, seq (finals, reservations) and
    text (the final's or end's message)."""

    kind: str   # "final" | "reserved" | "end"
    seq: int
    text: str


@dataclass
class MFile:
    """The model of one journal file: its index, start, bytes, and the
    lines the journal wrote into it, by (offset, line without newline)."""

    index: int
    started: float
    data: bytearray = field(default_factory=bytearray)
    written: dict[tuple[int, bytes], Rec] = field(default_factory=dict)

    def lines(self) -> list[Rec | None]:
        """Its non-blank lines in order: the record the journal wrote there
        when the line is still whole at its place, else None (damaged)."""
        out: list[Rec | None] = []
        at = 0
        for raw in bytes(self.data).split(b"\n"):
            if raw.strip():
                out.append(self.written.get((at, raw)))
            at += len(raw) + 1
        return out


class JournalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # Its own folder per example (xdist-safe), removed at teardown.
        self.tmp = tempfile.TemporaryDirectory(prefix="journal-state-")
        self.dir = Path(self.tmp.name) / "j"
        self.wall = T0
        self.mono = 0.0
        self.journal: Journal | None = None
        self.cfg: JournalConfig | None = None
        # The model, per stream.
        self.files: dict[str, list[MFile]] = {s: [] for s in STREAMS}
        self.last: dict[str, int] = {s: 0 for s in STREAMS}   # last_seq's answer
        self.reserved: dict[str, int] = {}       # the reserved mark known
        self.known: set[str] = set()             # in the journal's _last_seq
        self.ended_last: set[str] = set()        # end written last, this process
        self.live: set[str] = set()              # open, as the engine has them
        self.opened: set[str] = set()            # written since opened: a file held
        self.pruned_seq: dict[str, int] = {}
        self.renumbered: set[str] = set()
        self.last_write: dict[str, float] = {}
        self.segments: dict[str, int] = {s: 0 for s in STREAMS}

    # --- setup and teardown ---------------------------------------------------

    @initialize(fsync=st.sampled_from(["never", "interval", "interval", "always"]),
                max_bytes=st.sampled_from([1024, 2048]),
                max_age_s=st.sampled_from([0.0, 3_000.0]),
                keep=st.sampled_from([0, 1, 3]),
                retention=st.booleans())
    def start(self, fsync: str, max_bytes: int, max_age_s: float, keep: int,
              retention: bool) -> None:
        self.cfg = load_config(env={}, overrides={
            "journal.enabled": True, "journal.dir": str(self.dir), "journal.fsync": fsync,
            "journal.fsync_interval_s": INTERVAL_S, "journal.max_bytes": max_bytes,
            "journal.max_age_s": max_age_s, "journal.keep": keep,
            "journal.retention_s": RETENTION_S if retention else 0.0}).journal
        self._restart()

    def teardown(self) -> None:
        try:
            if self.journal is not None:
                self.journal.close()
        finally:
            self.tmp.cleanup()

    # --- the model's writes ---------------------------------------------------

    def _write(self, stream: str, rec: Rec, line: str, *, rotate: bool = True) -> None:
        """What the journal's write of ``line`` does to the stream's files."""
        assert self.cfg is not None
        data = (line + "\n").encode()
        files = self.files[stream]
        if not files:
            files.append(MFile(1, recorded_start(self.wall)))
        cur = files[-1]
        if rotate and should_rotate(len(cur.data), len(data), file_age(cur.started, self.wall),
                                    self.cfg.max_bytes, self.cfg.max_age_s):
            cur = MFile(cur.index + 1, recorded_start(self.wall))
            files.append(cur)
            if mark := self.reserved.get(stream):
                self._put(cur, Rec("reserved", mark, ""),
                          (encode_reservation(stream, mark) + "\n").encode())
            del files[: max(0, len(files) - 1 - self.cfg.keep)]
        self._put(cur, rec, data)
        self.opened.add(stream)
        self.last_write[stream] = self.wall
        self.ended_last.discard(stream)
        if stream in self.pruned_seq:
            self.renumbered.add(stream)
        # The mtime retention reads is the injected wall clock's.
        os.utime(self._disk_files(stream)[-1], (self.wall, self.wall))

    @staticmethod
    def _put(f: MFile, rec: Rec, data: bytes) -> None:
        if f.data and not f.data.endswith(b"\n"):
            f.data += b"\n"   # after a torn line, a line of its own
        f.written[(len(f.data), data[:-1])] = rec
        f.data += data

    def _disk_files(self, stream: str) -> list[Path]:
        found = []
        for path in self.dir.iterdir():
            info = parse_file_name(path.name)
            if info is not None and info.stream == stream:
                found.append((info.index, path))
        return [p for _, p in sorted(found)]

    # --- rules ----------------------------------------------------------------

    @rule(stream=st.sampled_from(STREAMS), captions=st.lists(
        st.tuples(st.booleans(), st.sampled_from([0, 0, 0, 1, 40, 70]), TEXTS),
        min_size=0, max_size=8))
    def talk(self, stream: str, captions: list[tuple[bool, int, str]]) -> None:
        """The stream is opened (unless live) and captions of it are sent,
        each seq reserved first, then, a final, appended (seqs skipped:
        partials, or a restart's block)."""
        self.live.add(stream)
        for final, skip, text in captions:
            self._caption(stream, final, skip, text)

    def _caption(self, stream: str, final: bool, skip: int, text: str) -> None:
        assert self.journal is not None
        seq = self.journal.last_seq(stream) + 1 + skip
        mark = self.reserved.get(stream, 0)
        expect = seq > mark or stream in self.ended_last
        assert self.journal.reserve(stream, seq) is expect
        self.known.add(stream)
        if expect:
            new = max(seq + SEQ_RESERVE_BLOCK, mark)
            self._write(stream, Rec("reserved", new, ""), encode_reservation(stream, new))
            self.reserved[stream] = new
        self.last[stream] = max(self.last[stream], seq)
        if final:
            self.segments[stream] += 1
            event = CaptionEvent(stream=stream, segment=self.segments[stream], seq=seq,
                                 final=True, text=text, plain_text=text, stable=text,
                                 unstable="", tags=(), start=0.0, end=1.0, latency=0.1)
            self.journal.append(event)
            line = encode_record(event)
            self._write(stream, Rec("final", seq, line), line)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        assert self.journal is not None
        stream = data.draw(st.sampled_from(sorted(self.live)), label="stream")
        event = StreamEnded(stream, duration_s=1.5, segments=self.segments[stream],
                            finals=self.segments[stream])
        self.journal.end(event)
        if stream in self.known:
            line = encode_end(event)
            self._write(stream, Rec("end", 0, line), line, rotate=False)
            self.ended_last.add(stream)
        self.live.discard(stream)
        self.opened.discard(stream)

    @rule(dt=st.sampled_from([0.1, 1.0, 60.0, 1_000.0, 2_600.0, 5_000.0]))
    def advance(self, dt: float) -> None:
        self.wall += dt
        self.mono += dt

    @rule()
    def prune(self) -> None:
        assert self.journal is not None
        expect = self._due()
        assert sorted(self.journal.prune(live=self.live)) == expect
        self._pruned(expect)

    def _due(self) -> list[str]:
        assert self.cfg is not None
        if self.cfg.retention_s <= 0:
            return []
        return sorted(s for s in STREAMS if self.files[s] and s not in self.live
                      and self.wall - self.last_write[s] >= self.cfg.retention_s)

    def _pruned(self, streams: list[str]) -> None:
        for s in streams:
            self.files[s] = []
            if self.last[s]:
                self.pruned_seq[s] = self.last[s]
            self.renumbered.discard(s)
            self.ended_last.discard(s)
            self.reserved.pop(s, None)
            self.known.discard(s)

    @precondition(lambda self: self.cfg is not None and self.cfg.fsync == "interval")
    @rule(dt=st.sampled_from([0.0, 0.3, 1.0, 2.5]))
    def sync(self, dt: float) -> None:
        """The engine's timer calls sync_due; after a quiet spell every batch goes."""
        assert self.journal is not None
        self.advance(dt)
        wait = self.journal.sync_due()
        assert wait is None or 0 < wait <= INTERVAL_S
        deadline = time.monotonic() + 10
        self.advance(INTERVAL_S)
        while (wait := self.journal.sync_due()) is not None:
            assert time.monotonic() < deadline, "an interval fsync batch is stuck"
            time.sleep(0.005)   # the thread's batch in flight (real fsyncs)
            self.advance(wait)
        assert self.journal.sync_failures == 0

    @rule()
    def restart(self) -> None:
        """A clean stop (close) and a start on the same folder."""
        assert self.journal is not None
        self.journal.close()
        self._restart()

    @rule(data=st.data(),
          how=st.sampled_from(["none", "cut", "garbage", "half", "zero", "zero-line"]))
    def crash(self, data: st.DataObject, how: str) -> None:
        """The process dies (no close), the disk is hurt as a crash hurts it,
        and the journal restarts."""
        self._drop()
        hurt: set[str] = set()
        if how != "none" and (written := [s for s in STREAMS if self.files[s]]):
            stream = data.draw(st.sampled_from(written), label="stream")
            hurt.add(stream)
            files = self.files[stream]
            f = files[-1]
            if how == "cut":
                del f.data[data.draw(st.integers(0, len(f.data)), label="cut at"):]
            elif how == "garbage":
                # No "{": never a JSON object, so never a record.
                f.data += data.draw(st.binary(min_size=1, max_size=40).map(
                    lambda b: b.replace(b"{", b"x")), label="garbage")
            elif how == "half":
                whole = next((raw for (_, raw), r in f.written.items() if r.kind == "final"),
                             b'{"type":"caption","stream":"z","seq":1}')
                f.data += whole[: data.draw(st.integers(1, len(whole) - 1), label="half")]
            elif how == "zero":
                f = data.draw(st.sampled_from(files), label="zeroed file")
                if f.data:
                    at = data.draw(st.integers(0, len(f.data) - 1), label="zero at")
                    n = data.draw(st.integers(1, len(f.data) - at), label="zero n")
                    f.data[at:at + n] = bytes(n)
            else:
                # A block that hits one line whole (a page of the disk
                # lost), most often the newest file's first: its carried
                # reservation.
                f = data.draw(st.sampled_from(files), label="zeroed file")
                if f.written:
                    lines = sorted(f.written)
                    at, raw = data.draw(st.sampled_from(lines[:1] * len(lines) + lines),
                                        label="line")
                    f.data[at:at + len(raw)] = bytes(len(raw))
            path = self._disk_files(stream)[f.index - files[0].index]
            path.write_bytes(bytes(f.data))
            os.utime(path, (self.wall, self.wall))
            if f is files[-1]:
                self.last_write[stream] = self.wall
        self._restart(frozenset(hurt))

    def _drop(self) -> None:
        """Lose the journal as a crash does: nothing more is written. (What
        the dead object holds, its handles, lock and thread, is let go of
        here, as the kernel would at the process's end; every line was
        flushed already, so that writes nothing.)"""
        dead, self.journal = self.journal, None
        assert dead is not None
        dead._syncer.stop(10)
        for cur in dead._open.values():
            cur.file.close()
        if dead._lock_fd is not None:
            os.close(dead._lock_fd)
        del dead

    def _restart(self, hurt: frozenset[str] = frozenset()) -> None:
        """Start a journal on the folder; the model of what restore finds.
        ``hurt``: streams whose files a crash damaged (their lines lost may
        have held the highest seq given)."""
        assert self.cfg is not None
        before = {s: self.last[s] for s in STREAMS}
        damaged = hurt | {s for s in STREAMS if None in self._records(s)}
        self.journal = Journal(self.cfg, clock=lambda: self.mono, wall=lambda: self.wall)
        self.live.clear()
        self.opened.clear()
        self.ended_last.clear()
        self.known.clear()
        self.reserved.clear()
        for s in STREAMS:
            # Restore's last seq: the highest whole final or reservation left.
            recs = [r for r in self._records(s) if r is not None and r.kind != "end"]
            self.last[s] = max((r.seq for r in recs), default=0)
            if s in self.pruned_seq:
                self.last[s] = max(self.last[s], self.pruned_seq[s])
            if self.files[s]:
                self.known.add(s)
                if marks := [r.seq for r in recs if r.kind == "reserved"]:
                    self.reserved[s] = max(marks)
        restored = self.journal.restore()
        self._pruned(self._due())
        assert restored == {s: self.last[s] for s in STREAMS if self.files[s]}
        self.renumbered = {s for s in STREAMS if self.files[s] and s in self.pruned_seq}
        for s in STREAMS:
            if s not in damaged:
                # The seq contract: a restart numbers after every seq given.
                assert self.journal.last_seq(s) >= before[s], s

    def _records(self, stream: str) -> list[Rec | None]:
        return [r for f in self.files[stream] for r in f.lines()]

    # --- invariants -----------------------------------------------------------

    @invariant()
    def folder_is_the_model(self) -> None:
        if self.journal is None:
            return
        for s in STREAMS:
            disk = self._disk_files(s)
            want = self.files[s]
            got = [(info.index, info.started) for p in disk
                   if (info := parse_file_name(p.name)) is not None]
            assert got == [(f.index, f.started) for f in want], s
            for p, f in zip(disk, want, strict=True):
                assert p.read_bytes() == bytes(f.data), (s, p.name)

    @invariant()
    def last_seqs(self) -> None:
        if self.journal is None:
            return
        for s in STREAMS:
            assert self.journal.last_seq(s) == self.last[s], s
        assert self.journal.open_files == len(self.opened)

    @invariant()
    def replays(self) -> None:
        if self.journal is None:
            return
        for s in STREAMS:
            finals = [r.seq for r in self._records(s) if r is not None and r.kind == "final"]
            for since in {0, finals[len(finals) // 2] if finals else 0}:
                self._check_replay(s, since)

    def _check_replay(self, stream: str, since: int) -> None:
        """Replay's docstring, from the model's lines."""
        assert self.journal is not None
        got = self.journal.replay(stream, since)
        files = self.files[stream]
        complete = bool(files) and files[0].index == 1 and stream not in self.renumbered
        records: list[Rec] = []
        covered: int | None = None
        first_reserved: int | None = None
        ended: str | None = None
        damaged = False
        for r in self._records(stream):
            if r is None:
                damaged = True
                continue
            if r.kind == "end":
                ended = r.text
                continue
            ended = None
            if r.kind == "reserved":
                first_reserved = first_reserved or r.seq
                continue
            if damaged:
                damaged, records, covered = False, [], r.seq
            elif covered is None:
                covered = 1 if complete else r.seq
            if r.seq > since:
                records.append(r)
        if covered is None:
            if first_reserved is None:
                assert got is None, (stream, got)
                return
            covered = 1 if complete else first_reserved + 1
        assert got is not None, stream
        assert [(r.seq, r.message) for r in got.records] == [(r.seq, r.text) for r in records]
        assert [json.loads(r.message)["seq"] for r in got.records] == [r.seq for r in records]
        # A gap (covered_from past since + 1) where the model has one, and
        # from the same seq; below since + 1 any value means no gap.
        if covered > since + 1 or got.covered_from > since + 1:
            assert got.covered_from == covered, (stream, since)
        assert got.ended == ended, stream


JournalMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_journal_stateful = JournalMachine.TestCase
