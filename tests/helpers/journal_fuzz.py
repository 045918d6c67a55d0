"""A seeded random fuzz of the caption journal against what disks and operators do.

:func:`write_journal` writes a journal folder with the real writer
(:class:`~evoxtral_stream.engine.journal.Journal`, an injected wall clock):
random streams (unicode ids, ids that look like file names), sessions that
end or are cut by a restart, finals with tags and unicode, seq reservations,
rotations by size and by age, retention, and finals that a full disk cuts
short as they are written (a real one: the file size limit, at a random
byte of the line, or before its first; some lines longer than the file's
buffer), after which the writer goes on. It checks what the writer left
(:attr:`Written.problems`) against what it was given, a final that no file
holds whole (the disk refused it) included: a replay from before it
announces it (``covered_from`` past it).

:func:`damage` then does to the folder, at random, what a real disk and
its operators do: truncate a file at a random byte (mid-line, mid-UTF-8
character), append garbage or half a line, zero a block, delete or rename a
file, copy one, make one unreadable (not as root), put an empty file or a
directory where a file is expected, add foreign files.

:func:`check` holds the readers against the contracts the docs state:
``Journal.restore`` and a ``since=`` resume through ``Broadcaster.resume``,
and the ``subtitles`` command, never raise; each final whose line survived
intact is given exactly once, in order, nothing is invented (nor a stream,
of a file copied under another name); finals of a
file that is gone or cannot be read are announced by a ``gap``; warnings
stay about one per damaged thing; finals whose lines a zeroed block hit,
older than a final left whole, are announced by a ``gap`` too (and a
resume replays the intact finals after the newest damaged line, unless a
gap is due); and a writer started on the damaged folder
journals new finals after every seq the folder holds. It returns the
problems found (empty: none), each naming the stream, so a failing seed can
be read and rerun.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from evoxtral_stream import cli
from evoxtral_stream.cli.messages import UserError
from evoxtral_stream.cli.subtitles import _read_recording, _recording_files
from evoxtral_stream.config import JournalConfig, load_config
from evoxtral_stream.engine.journal import (
    EPOCH_FILE,
    LOCK_FILE,
    PRUNED_FILE,
    Journal,
    LostRecord,
    Replay,
    decode_line,
    encode_record,
    parse_file_name,
)
from evoxtral_stream.events import CaptionEvent, StreamEnded, TagMark
from evoxtral_stream.server.broadcast import Broadcaster
from evoxtral_stream.server.protocol import encode_event
from evoxtral_stream.text.sessions import SessionSplitter
from tests.helpers.disk import disk_full_after

__all__ = ["Damage", "Written", "check", "damage", "write_journal"]

T0 = 1_750_000_000.0
DAY = 86_400.0

#: Stream ids: unicode, ones that look like journal file names, ones that
#: need percent-encoding.
STREAMS = ("mic", "café ☕", "a.00000001", "x/y%z", "日本語 talk", "s.1.jsonl")
WORDS = ("hello", "well", "naïve", "日本", "🎉", "été", 'a"b', "back\\slash", "ok.",
         "Ünïcödé", "—", "x" * 40)
TAGS = ("laughs", "sighs", "whispers")


@dataclass
class Written:
    """A journal folder written by the real writer, and what it was given."""

    folder: Path
    cfg: JournalConfig
    now: list[float]
    mono: list[float]
    lines: dict[str, list[tuple[int, str]]]
    """Each stream's final lines (seq, line) in order, since its files were
    last pruned: what its files hold, less what rotation deleted."""
    problems: list[str] = field(default_factory=list)
    failed: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    """Each stream's finals (seq, line) whose append the disk cut short (it
    raised): their files may hold them whole (then they are in
    :attr:`lines` too, once the writer is done), a fragment (a damaged
    line) or nothing of them."""
    refused: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    """As :attr:`failed`, since the stream's files were last pruned."""
    lost: dict[str, list[int]] = field(default_factory=dict)
    """The seqs of :attr:`refused` finals that no file holds whole, once
    the writer is done: the journal recorded their loss."""


@dataclass
class Damage:
    """What :func:`damage` did: a description per act, the journal files
    each stream had before, with their lines, and the streams' files gone
    whole (deleted, renamed, unreadable, a folder in their place)."""

    acts: list[str]
    before: dict[str, dict[str, list[str]]]
    files_lost: dict[str, set[str]]
    unreadable: set[str]
    """Streams with a file that cannot be read (a folder in its place, no
    permission): documented to make a resume a gap for all it would have
    replayed, a server refuse to start on the folder, and ``subtitles`` stop,
    each with one line naming the file."""
    zeroed: dict[str, dict[str, set[int]]] = field(default_factory=dict)
    """Each stream's finals whose lines a zeroed block hit, by file (the
    file's later truncation or emptying forgets them: lines cut off at a
    line's end leave no trace to tell)."""


def _caption(rng: random.Random, stream: str, segment: int, seq: int, t: float) -> CaptionEvent:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 8))]
    tags: list[TagMark] = []
    text_parts: list[str] = []
    for i, w in enumerate(words):
        if rng.random() < 0.2:
            tag = rng.choice(TAGS)
            tags.append(TagMark(tag, "non-verbal", i, round(t + i * 0.1, 3)))
            text_parts.append(f"[{tag}]")
        text_parts.append(w)
    plain = " ".join(words)
    text = " ".join(text_parts)
    return CaptionEvent(stream=stream, segment=segment, seq=seq, final=True, text=text,
                        plain_text=plain, stable=text, unstable="", tags=tuple(tags),
                        start=round(t, 3), end=round(t + 0.5 + rng.random(), 3),
                        latency=round(rng.random(), 4))


def _journal(cfg: JournalConfig, now: list[float], mono: list[float]) -> Journal:
    return Journal(cfg, clock=lambda: mono[0], wall=lambda: now[0])


def _files_of(folder: Path, stream: str) -> list[Path]:
    found = []
    for path in folder.iterdir():
        info = parse_file_name(path.name)
        if info is not None and info.stream == stream:
            found.append((info.index, path.name, path))
    return [p for _, _, p in sorted(found)]


def _touch(folder: Path, stream: str, now: float) -> None:
    """The stream's newest file was written at ``now`` (the injected wall
    clock), as retention reads it."""
    files = _files_of(folder, stream)
    if files:
        os.utime(files[-1], (now, now))


def write_journal(seed: int, folder: Path) -> Written:
    """Write a journal at ``folder`` with the real writer, at random (``seed``)."""
    rng = random.Random(seed)
    cfg = load_config(env={}, overrides={
        "journal.enabled": True, "journal.dir": str(folder), "journal.fsync": "never",
        "journal.max_bytes": rng.choice([1024, 1500, 3000, 1 << 20]),
        "journal.keep": rng.choice([0, 1, 2, 5, 100]),
        "journal.max_age_s": rng.choice([0.0, 3600.0, DAY]),
        "journal.retention_s": rng.choice([0.0, 0.0, 3 * DAY])}).journal
    now, mono = [T0], [0.0]
    pool = rng.sample(STREAMS, rng.randint(1, 4))
    w = Written(folder, cfg, now, mono, {s: [] for s in pool})
    journal = _journal(cfg, now, mono)
    journal.restore()
    # Disk faults draw from a random of their own, so that the seeds' other
    # draws stay as they were.
    faults = random.Random(seed * 104_729 + 3)
    whole = random.Random(seed * 7 + 11)   # which faults refuse a line whole
    live: dict[str, int] = {}   # stream: its next segment
    t: dict[str, float] = {}

    def files_gone() -> None:
        for s in pool:
            if not _files_of(folder, s):
                w.lines[s].clear()
                w.refused.pop(s, None)

    for _ in range(rng.randint(30, 120)):
        act = rng.random()
        if act < 0.62:
            stream = rng.choice(list(live) if live and rng.random() < 0.8 else pool)
            if stream not in live:
                live[stream], t[stream] = 0, 0.0
            last = journal.last_seq(stream)
            seq = last + rng.randint(1, 3)
            for partial in range(last + 1, seq + 1):   # partials are reserved too
                journal.reserve(stream, partial)
            event = _caption(rng, stream, live[stream], seq, t[stream])
            event, appended = _append(journal, event, faults, whole, folder)
            (w.lines if appended else w.failed).setdefault(stream, []).append(
                (seq, encode_record(event)))
            if not appended:
                w.refused.setdefault(stream, []).append((seq, encode_record(event)))
            live[stream] += 1
            t[stream] = event.end + rng.random()
            _touch(folder, stream, now[0])
        elif act < 0.72 and live:
            stream = rng.choice(list(live))
            journal.end(StreamEnded(stream, t[stream], live[stream], live[stream]))
            del live[stream]
            _touch(folder, stream, now[0])
        elif act < 0.75 and live:
            stream = rng.choice(list(live))
            journal.release(stream)
            del live[stream]
        elif act < 0.90:
            step = rng.choice([1.0, 60.0, 3600.0, DAY / 2, 2 * DAY])
            now[0] += step
            mono[0] += step
        elif act < 0.96:
            journal.close()                 # a restart: live streams lose their end
            live.clear()
            journal = _journal(cfg, now, mono)
            journal.restore()
            files_gone()
        elif live or rng.random() < 0.5:
            journal.prune(live=list(live))
            files_gone()
    journal.close()
    _settle_failed(w)
    _check_written(w)
    return w


def _append(journal: Journal, event: CaptionEvent, faults: random.Random,
            whole: random.Random, folder: Path) -> tuple[CaptionEvent, bool]:
    """Append ``event``, now and then with the disk full at a random byte
    of its line, or (a third of those, drawn from ``whole``) before its
    first (half of them made longer than the file's 8 KiB buffer); the
    final appended and whether the append succeeded (else it raised)."""
    if faults.random() >= 0.08:
        journal.append(event)
        return event, True
    if faults.random() < 0.5:
        event = dataclasses.replace(event, text=event.text + " long words" * 900)
    files = _files_of(folder, event.stream)
    size = files[-1].stat().st_size if files else 0
    at = faults.randrange(len(encode_record(event)) + 1)
    if whole.random() < 1 / 3:
        at = 0
    try:
        with disk_full_after(size + at):
            journal.append(event)
    except OSError:
        return event, False
    return event, True


def _settle_failed(w: Written) -> None:
    """A final whose append the disk cut short that its files hold whole (the
    file's buffer wrote the rest later) is a final written: put it among
    :attr:`Written.lines`, in seq order."""
    for stream, failed in w.failed.items():
        held: set[str] = set()
        for path in _files_of(w.folder, stream):
            held.update(path.read_text(encoding="utf-8", errors="replace").split("\n"))
        for seq, line in failed:
            if line in held:
                w.lines[stream].append((seq, line))
        w.lines[stream].sort(key=lambda x: x[0])
        w.lost[stream] = [seq for seq, line in w.refused.get(stream, []) if line not in held]


def _reader(w: Written) -> Journal:
    """A journal that reads the folder as a restarted server does, without
    pruning (so what is read is what is there)."""
    journal = _journal(dataclasses.replace(w.cfg, retention_s=0.0), w.now, w.mono)
    journal.restore()
    return journal


def _check_written(w: Written) -> None:
    """What the writer left, undamaged: each stream's replay is the finals
    written to it, less only a prefix that ``covered_from`` announces."""
    reader = _reader(w)
    try:
        for stream, lines in w.lines.items():
            w.problems += [f"{stream!r}: {p}"
                           for p in _suffix_problems(reader.replay(stream, 0), lines)]
        # A final the disk refused is announced, never skipped silently.
        for stream, lost in w.lost.items():
            for seq in lost:
                replay = reader.replay(stream, seq - 1)
                if replay is None or replay.covered_from <= seq:
                    w.problems.append(
                        f"{stream!r}: final {seq}, which the disk refused, is skipped "
                        f"without a gap (covered_from "
                        f"{None if replay is None else replay.covered_from})")
    finally:
        reader.close()


def _suffix_problems(replay: Replay | None, lines: list[tuple[int, str]]) -> list[str]:
    """``replay`` gives the finals written (``lines``), less only a prefix
    that rotation deleted, which ``covered_from`` announces."""
    got = [] if replay is None else [(r.seq, r.message) for r in replay.records]
    if got != lines[len(lines) - len(got):]:
        return [f"the journal replays {[s for s, _ in got]}, written {[s for s, _ in lines]}"]
    lost = lines[:len(lines) - len(got)]
    if lost and (replay is None or lost[-1][0] >= replay.covered_from):
        return [f"finals {[s for s, _ in lost]} rotated away without a gap (covered_from "
                f"{None if replay is None else replay.covered_from})"]
    return []


# --- damage -----------------------------------------------------------------


def _garbage(rng: random.Random, lines: list[str]) -> bytes:
    kind = rng.randrange(5)
    lines = [x for x in lines if x]      # a write cut short leaves a blank line
    if kind == 0 and lines:              # half a line, as a crash leaves it
        line = rng.choice(lines).encode()
        return line[:rng.randrange(1, len(line))]
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    if kind == 2:
        return "☕é日".encode()[:rng.randint(1, 8)]   # cut inside a character
    if kind == 3:
        return b'{"type":"caption","stream":' + b"\n" * rng.randint(0, 2)
    return b"\x00" * rng.randint(1, 100) + b"\n"


def damage(seed: int, w: Written) -> Damage:
    """Damage ``w``'s folder at random (``seed``): 1 to 4 acts (module doc)."""
    rng = random.Random(seed * 7919 + 1)
    folder = w.folder
    before: dict[str, dict[str, list[str]]] = {}
    for stream in w.lines:
        before[stream] = {p.name: p.read_text(encoding="utf-8").splitlines()
                          for p in _files_of(folder, stream)}
    d = Damage([], before, {s: set() for s in w.lines}, set())
    root = hasattr(os, "geteuid") and os.geteuid() == 0

    for _ in range(rng.randint(1, 4)):
        journal_files = sorted(p for p in folder.iterdir()
                               if p.is_file() and parse_file_name(p.name) is not None)
        others = [folder / n for n in (EPOCH_FILE, PRUNED_FILE, LOCK_FILE)]
        kind = rng.choice(["truncate", "append", "zero", "delete", "rename", "copy",
                           "unreadable", "empty", "folder", "foreign", "other"])
        if kind == "foreign" or not journal_files:
            name = rng.choice(["notes.txt", "README", "x.jsonl", ".hidden.jsonl",
                               "mic.jsonl", "mic.00000001.jsonl.swp", "mic.x.jsonl"])
            (folder / name).write_bytes(_garbage(rng, []) + b'\n{"a":1}\n')
            d.acts.append(f"foreign file {name}")
            continue
        if kind == "other":
            path = rng.choice(others)
            with contextlib.suppress(OSError):
                if path.is_dir():
                    continue
                if rng.random() < 0.5:
                    path.write_bytes(_garbage(rng, []))
                    d.acts.append(f"garbage in {path.name}")
                else:
                    path.unlink(missing_ok=True)
                    path.mkdir()
                    d.acts.append(f"a folder in place of {path.name}")
            continue
        path = rng.choice(journal_files)
        info = parse_file_name(path.name)
        assert info is not None
        stream = info.stream
        data = path.read_bytes()
        if kind == "truncate":
            at = rng.randrange(len(data) + 1)
            path.write_bytes(data[:at])
            d.acts.append(f"{path.name} truncated at byte {at} of {len(data)}")
        elif kind == "append":
            junk = _garbage(rng, before.get(stream, {}).get(path.name, []))
            with path.open("ab") as f:
                f.write(junk)
            d.acts.append(f"{path.name}: {len(junk)} bytes of garbage appended")
        elif kind == "zero":
            at = rng.randrange(len(data) + 1)
            n = rng.randint(1, 200)
            new_data = data[:at] + b"\x00" * len(data[at:at + n]) + data[at + n:]
            path.write_bytes(new_data)
            d.acts.append(f"{path.name}: zeroed {n} bytes at {at}")
            # The finals whose lines were whole before and are not now (a
            # zeroed newline joins two lines: both are hit).
            gone = set(data.split(b"\n")) - set(new_data.split(b"\n"))
            hit = {seq for seq, line in w.lines[stream] if line.encode() in gone}
            d.zeroed.setdefault(stream, {}).setdefault(path.name, set()).update(hit)
        elif kind == "delete":
            path.unlink()
            d.acts.append(f"{path.name} deleted")
        elif kind == "rename":
            new = path.name + rng.choice([".bak", "~", ".old"])
            path.rename(folder / new)
            d.acts.append(f"{path.name} renamed {new}")
        elif kind == "copy":
            new = rng.choice([path.name + ".bak", path.name[:-6] + " (1).jsonl",
                              "copy of " + path.name])
            shutil.copyfile(path, folder / new)
            d.acts.append(f"{path.name} copied to {new}")
        elif kind == "unreadable" and not root:
            path.chmod(0)
            d.acts.append(f"{path.name} made unreadable")
        elif kind == "empty":
            path.write_bytes(b"")
            d.acts.append(f"{path.name} emptied")
        elif kind == "folder":
            path.unlink()
            path.mkdir()
            d.acts.append(f"a folder in place of {path.name}")
        else:
            continue
        if kind in ("truncate", "empty"):
            d.zeroed.get(stream, {}).pop(path.name, None)
        if kind in ("unreadable", "folder"):
            d.unreadable.add(stream)
        if kind in ("delete", "rename", "unreadable", "folder"):
            d.files_lost.setdefault(stream, set()).add(path.name)
    return d


# --- checks -----------------------------------------------------------------


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _warnings() -> Iterator[_Count]:
    handler = _Count()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


@dataclass
class _Survivors:
    kept: dict[int, str]
    """The stream's finals (seq: line) whose lines survived whole in one of
    its journal files."""
    lost: set[int]
    """The seqs of finals in its files gone whole (deleted, renamed, a
    folder in their place, unreadable)."""
    newer: set[int]
    """The kept finals in files newer than any gone whole and after every
    damaged line followed by a kept final: a replay from before them gives
    them all (within ``server.history``)."""
    zeroed: set[int]
    """The seqs of finals whose lines a zeroed block hit."""
    any_file: bool
    """Whether a readable journal file of the stream is left."""


def _intact(w: Written, d: Damage, stream: str) -> _Survivors:
    written = dict(w.lines[stream])
    lost_top = max((info.index for name in d.files_lost.get(stream, ())
                    if (info := parse_file_name(name)) is not None), default=0)
    kept: dict[int, str] = {}
    newer: set[int] = set()
    any_file = False
    damaged = False     # a damaged line since the last kept final
    for path in _files_of(w.folder, stream):
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        any_file = True
        info = parse_file_name(path.name)
        assert info is not None
        for piece in raw.split(b"\n"):
            try:
                text = piece.decode()
            except UnicodeDecodeError:
                text = None
            whole = [(seq, line) for seq, line in w.lines[stream] if line == text]
            if not whole:
                record = None if text is None else decode_line(text)
                if isinstance(record, LostRecord) and (
                        record.seq > record.seqs[-1] or not set(record.seqs) <= set(kept)):
                    # A loss record of finals no file holds: the kept finals
                    # before it may be in a gap, final after it or not.
                    newer.clear()
                # A line that is no record (decode_line, as the journal reads
                # it): the kept finals before it may be in a gap, once a
                # kept final follows it.
                damaged = damaged or (bool(piece.strip()) and record is None)
                continue
            if damaged:
                newer.clear()
                damaged = False
            for seq, line in whole:
                kept[seq] = line
                if info.index > lost_top:
                    newer.add(seq)
    lost: set[int] = set()
    for name in d.files_lost.get(stream, ()):
        for line in d.before[stream].get(name, []):
            for seq, text in written.items():
                if text == line and seq not in kept:
                    lost.add(seq)
    zeroed = {seq for seqs in d.zeroed.get(stream, {}).values() for seq in seqs
              if seq not in kept}
    return _Survivors(kept, lost, newer, zeroed, any_file)


def check(seed: int, w: Written, d: Damage) -> list[str]:
    """The readers and a writer on the damaged folder, held to the docs."""
    rng = random.Random(seed * 31 + 7)
    problems: list[str] = []
    streams = list(w.lines)
    for stream in streams:
        survivors = _intact(w, d, stream)
        kept = survivors.kept
        since = rng.choice([0, 0, *kept]) if kept else 0
        history = rng.choice([10_000, 10_000, rng.randint(1, 20)])
        with _warnings() as warned:
            try:
                reader = _reader(w)
            except OSError as e:
                if not d.unreadable:
                    problems.append(f"restore raised {type(e).__name__}: {e}")
                break
            except Exception as e:  # what the fuzz looks for
                problems.append(f"restore raised {type(e).__name__}: {e}")
                break
            try:
                b = Broadcaster(16, encode_event, history=history, source=reader,
                                last_seq=reader.last_seq)
                try:
                    sub = asyncio.run(b.resume([stream], {stream: since}))
                except Exception as e:
                    problems.append(f"{stream!r}: resume since {since} raised "
                                    f"{type(e).__name__}: {e}")
                    continue
            finally:
                reader.close()
        noisy = [r.getMessage()[:120] for r in warned.records]
        # One per damaged line per read (restore, then the resume), and
        # garbage may hold a few lines: a flood is many more.
        if len(noisy) > 10 * _harms(w, d):
            problems.append(f"{stream!r}: {len(noisy)} warnings for {_harms(w, d)} acts of "
                            f"damage and writes cut short: {noisy[:4]}")
        problems += [f"{stream!r} since {since} history {history}: {p}"
                     for p in _check_backlog(sub.backlog, since, history, survivors,
                                             dict(w.lines[stream]),
                                             unreadable=stream in d.unreadable)]
    problems += _check_streams(w)
    problems += _check_subtitles(w, d)
    problems += _check_writer_after(seed, w, d)
    return problems


def _harms(w: Written, d: Damage) -> int:
    """The acts of damage, and the writes a full disk cut short (each may
    leave a fragment, a damaged line)."""
    return len(d.acts) + sum(len(f) for f in w.failed.values())


def _check_streams(w: Written) -> list[str]:
    """A restored journal holds the streams written, no other: a file of
    another name (a copy made by hand) is no stream's."""
    journal = _journal(dataclasses.replace(w.cfg, retention_s=0.0), w.now, w.mono)
    try:
        restored = journal.restore()
    except OSError:
        return []   # an unreadable file: checked by check()
    finally:
        journal.close()
    extra = sorted(set(restored) - set(w.lines))
    return [f"restore read streams never written: {extra}"] if extra else []


def _check_backlog(backlog: list[str], since: int, history: int, survivors: _Survivors,
                   written: dict[int, str], *, unreadable: bool) -> list[str]:
    kept, lost = survivors.kept, survivors.lost
    problems: list[str] = []
    captions: list[int] = []
    gaps: list[tuple[int, int | None]] = []
    for message in backlog:
        obj = json.loads(message)
        if obj["type"] == "caption":
            seq = obj["seq"]
            if written.get(seq) != message:
                problems.append(f"caption seq {seq} was never written so: {message[:80]}")
            captions.append(seq)
        elif obj["type"] == "gap":
            gaps.append((obj["from"], obj["to"]))
    if captions != sorted(set(captions)):
        problems.append(f"captions out of order or repeated: {captions}")
    if any(s <= since for s in captions):
        problems.append(f"captions at or before since: {captions}")

    def in_gap(seq: int) -> bool:
        return any(lo <= seq and (hi is None or seq <= hi) for lo, hi in gaps)

    if bad := [s for s in captions if in_gap(s)]:
        problems.append(f"gaps {gaps} name captions replayed: {bad}")
    want = sorted(s for s in kept if s > since)
    given = set(captions)
    # The newest `history` are replayed; older ones may be a gap.
    missing = [s for s in want if s not in given and not in_gap(s)]
    if missing:
        problems.append(f"intact finals {missing} neither replayed nor in a gap {gaps}")
    newer = [s for s in want if s in survivors.newer]
    if not unreadable and history >= len(want) and (short := [s for s in newer if s not in given]):
        problems.append(f"intact finals {short} not replayed (history {history})")
    # Past the last final the files left hold (the newest files gone: a
    # reservation past it may stand for partials), or with no file of the
    # stream left, the server cannot know of them.
    newest = max(kept, default=0)
    silent = sorted(s for s in lost if s > since and not in_gap(s)
                    and (s < newest or (since > 0 and not survivors.any_file)))
    if silent:
        problems.append(f"finals {silent} of files gone whole are not announced "
                        f"(gaps {gaps}, captions {captions})")
    # A zeroed line before a final left whole: the reader saw the damage.
    hit = sorted(s for s in survivors.zeroed if since < s < newest and not in_gap(s))
    if hit:
        problems.append(f"finals {hit} of zeroed lines are not announced "
                        f"(gaps {gaps}, captions {captions})")
    return problems


def _check_subtitles(w: Written, d: Damage) -> list[str]:
    """``subtitles DIR``: no traceback; each final of an intact line once."""
    problems: list[str] = []
    out = w.folder.parent / f"subs-{len(d.acts)}-{id(d)}"
    err = io.StringIO()
    with _warnings() as warned, contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        try:
            status = cli.main(["subtitles", str(w.folder), "--text", f"{out}/"])
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except Exception as e:
            return [f"subtitles raised {type(e).__name__}: {e}"]
    shutil.rmtree(out, ignore_errors=True)
    if "Traceback" in err.getvalue():
        problems.append(f"subtitles printed a traceback: {err.getvalue()[-300:]}")
    have_any = any(_intact(w, d, s).kept for s in w.lines)
    if status != 0 and have_any and not d.unreadable:
        problems.append(f"subtitles exited {status} with intact finals there: "
                        f"{err.getvalue().strip()[:200]}")
    if len(warned.records) > 2 * (_harms(w, d) + 1):
        problems.append(f"subtitles: {len(warned.records)} warnings for {_harms(w, d)} acts "
                        "of damage and writes cut short")
    # What it read, by the same path the command takes.
    splitter = SessionSplitter()
    with contextlib.suppress(UserError):
        for path in _recording_files([str(w.folder)]):
            with contextlib.suppress(UserError):
                _read_recording(path, splitter)
    for stream in w.lines:
        kept = _intact(w, d, stream).kept
        seqs = [f.seq for s in splitter.sessions() if s.stream == stream for f in s.finals]
        if len(seqs) != len(set(seqs)):
            problems.append(f"subtitles {stream!r}: finals repeated: {seqs}")
        if missing := sorted(set(kept) - set(seqs)):
            problems.append(f"subtitles {stream!r}: intact finals {missing} left out")
    return problems


def _check_writer_after(seed: int, w: Written, d: Damage) -> list[str]:
    """A server restarted on the damaged folder journals new finals, each
    numbered past every seq the folder holds, and replays them."""
    rng = random.Random(seed * 13 + 5)
    problems: list[str] = []
    w.now[0] += 1.0
    w.mono[0] += 1.0
    journal = _journal(dataclasses.replace(w.cfg, retention_s=0.0), w.now, w.mono)
    try:
        journal.restore()
    except OSError as e:
        return [] if d.unreadable else [f"a writer on the damaged folder cannot start: {e}"]
    new: dict[str, list[tuple[int, str]]] = {}
    try:
        for stream in w.lines:
            held = max(_intact(w, d, stream).kept, default=0)
            for n in range(rng.randint(1, 3)):
                seq = journal.last_seq(stream) + 1
                event = _caption(rng, stream, n, seq, float(n))
                try:
                    journal.reserve(stream, seq)
                    journal.append(event)
                except OSError as e:
                    problems.append(f"{stream!r}: a final after the damage not journaled: {e}")
                    break
                new.setdefault(stream, []).append((seq, encode_record(event)))
            if new.get(stream) and new[stream][0][0] <= held:
                problems.append(f"{stream!r}: numbered again from {new[stream][0][0]}, "
                                f"at or below seq {held} the folder held")
    finally:
        journal.close()
    reader = _reader(w)
    try:
        for stream, lines in new.items():
            try:
                replay = reader.replay(stream, lines[0][0] - 1)
            except OSError:
                if stream in d.unreadable:
                    continue   # documented: the broadcaster makes it a gap
                raise
            problems += [f"{stream!r}: after the damage, {p}"
                         for p in _suffix_problems(replay, lines)]
    finally:
        reader.close()
    return problems
