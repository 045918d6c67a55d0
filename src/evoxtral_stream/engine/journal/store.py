"""The journal's store: :class:`Journal` writes every final caption durably,
one file set per stream, and how far each stream's ``seq`` may have gone,
and reads them back for a resume or a restart.

The files are named as :mod:`.files` says, and rotated and pruned by its
rules; their lines are the records of :mod:`.records`.

End records: when a stream ends, after its last final, :meth:`Journal.end`
appends its protocol v1 ``stream.ended`` message as it is (the very message
subscribers got), then closes the file, fsyncing it unless ``fsync =
"never"``. :meth:`Journal.replay` reports it (:attr:`Replay.ended`) when it
is the stream's last record. Any later record (a reservation or a final)
means the stream was opened again: then it has no end, even when a crash cut
it (its end is unknown). A stream opened again in the same process writes a
reservation with its first caption even under the mark, so that caption
always follows a record that says so; between its re-open and that caption
the old end is still its last record (the broadcaster knows which streams
are live). An end record carries no seq: :meth:`Journal.restore` ignores it.
It never rotates a file (it goes into the current one, which may pass
``max_bytes`` by that one line), so ending a stream never deletes its rotated
files. A stream the journal holds nothing of (no final, no reservation) gets
no end record, hence no file. Builds before end records skip such a line
with a "damaged line" warning and read the rest.

Seq reservations: partials are sent but not journaled, so the last seq a
stream was given is usually a partial's, which the finals alone do not tell.
Before a caption whose seq is past the stream's reserved mark is sent, the
caller (the engine) asks :meth:`Journal.reserve`, which appends a
reservation of ``seq + SEQ_RESERVE_BLOCK`` (one line per
:data:`SEQ_RESERVE_BLOCK` captions) and makes it durable as a final is. On
:meth:`Journal.restore` a stream's last seq is the highest of its journaled
finals and reservations, so a restarted stream numbers after every seq it
was given before, crash or not; it may skip up to a block (gaps in seq are
normal: partials leave them too). A rotation starts the new file with the
stream's latest reservation, so the newest file always holds the mark even
once the older ones are deleted.

Ordering contract: the engine appends a final here, and reserves any seq
past the mark, before any listener sees the caption (:meth:`Journal.append`
and :meth:`Journal.reserve` return once the line is written and flushed to
the OS, and fsynced when ``fsync = "always"``), so a subscriber can never
hold a final the journal lacks, nor a seq a restart would give again. Its
end record likewise is written (and fsynced, unless ``fsync = "never"``)
before any listener sees the ``stream.ended``.

Writes happen inline on the caller's thread (the event loop): an append plus
a flush is a few microseconds; ``fsync = "always"`` adds one disk flush per
final and per reservation (0.1 to 10 ms, depending on the disk). There is no writer thread and
hence no queue that could overflow and lose finals.

Interval fsyncs (``fsync = "interval"``) leave the loop: when one is due
(:meth:`Journal.sync_due`), the descriptors of the files written since the
last one are duplicated (``os.dup``, microseconds; a duplicate stays valid
when the journal rotates or closes the file meanwhile, and syncs the same
file) and handed as one batch to the journal's one daemon thread,
``journal-sync``, which fsyncs and closes them. One batch at a time: a
batch due while the previous one still runs (a slow disk) waits, its files
staying dirty, until that one is done, and then goes as one batch; so there
is no queue, and nothing grows but the dirty set (at most one entry per
open file). A failed fsync is logged, once per batch (``journal: fsync
failed``), and counted (:attr:`Journal.sync_failures`, per file); it is not
tried again (after a failed fsync the kernel may have dropped the pages), and
the next batch goes on. A descriptor that cannot be duplicated (out of
descriptors) is fsynced inline, as before, and so is a batch when the
thread cannot be started (the process at its thread limit). The fsyncs that order the
stream's own contract stay inline: ``fsync = "always"``, a stream's end
(its file is fsynced and closed before the ``stream.ended`` goes out), a
rotation (the new file's reservation before the old files are deleted), and
the folder's entries. :meth:`Journal.close` waits up to
:data:`SYNC_CLOSE_WAIT_S` for a batch in flight (logged if cut short), stops
the thread, then fsyncs and closes every open file, so a clean stop leaves
no final unsynced.

Crash safety: a line cut short by a crash is skipped with a warning when
read, and the first record appended to such a file starts with a newline, so
that it stands on a line of its own. So does the record after a write the
disk refused part-way (full, EIO): what reached the file of the refused
line, whole or a fragment, cannot take a later record with it. A cut line,
like any damaged one (a zeroed block), may have held finals a subscriber got
(under ``fsync = "interval"`` a power cut loses the rest of it): with a
final after it, a replay covers from that final only
(:attr:`Replay.covered_from`), so a resume from before it gets a gap, as for
a missing file. A file left empty by a crash is
appended to as any other (its start is in its name).

Lost finals: a final whose append raised (the disk refused it, or its
fsync failed) was still sent live, so its seq is kept in memory, and the
stream's next line that the disk takes (a final, a reservation, its end
record; else one written at :meth:`Journal.close`) comes after a loss
record, ``{"type":"seq.lost","stream":S,"seqs":[...],"seq":N}``, in the
same write: one for all the finals lost since the stream's last line (a
disk full for a while), listing the first :data:`LOST_LISTED` and ``N``
the highest. A replay from before a lost final that the files lack
before the record (a refused line the file's buffer kept is written
later, before the record, whole: then it is replayed) covers from one
past it, as for a damaged line (:attr:`Replay.covered_from`): a resume
gets a gap, and a stream whose last final was lost still gets it.
Restore counts ``N`` among the stream's seqs. Bounded: the losses of the
:data:`LOST_STREAMS` streams that lost finals most recently wait to be
recorded; an older one is forgotten, with an error logged. A loss the
process never got to record (it stopped, or crashed, before the disk took
another line of the stream, or close found it still full: logged) is
skipped by a resume after a restart without a gap: no record says it was
there. Builds before loss records skip one with a "damaged line" warning
and make it a gap up to the final after it, if one follows.

Lifetime: a stream's file stays open only while the stream is live
(:meth:`Journal.end` closes it when the stream ends), so open files are
bounded by live streams, not by every stream ever seen. The files of a stream
that is not live and has not been written for ``retention_s`` (file mtimes)
are deleted by :meth:`Journal.prune` (at start, then periodically by the
engine). Mtimes are wall-clock times, so a step of the clock forward would
make fresh files look old: a step of more than :data:`CLOCK_SLACK_S` beyond
the monotonic time passed since the last prune is believed only once it has
held for ``retention_s`` (by then every file written before it is that old
in truth); until then files are aged by the wall time before the step plus
the monotonic time since. So no step forward while the process runs deletes
a file early, and one that set the clock right delays pruning by at most
``retention_s``; a step back only keeps files longer. A step while the
process is down cannot be told from time passing, nor (with the monotonic
clock stopped in a suspend) a suspend from a step: pruning then waits. A
pruned stream's last seq is kept, in memory and in
:data:`PRUNED_FILE` (appended, durably per ``fsync``, before the files are
deleted), so re-opened, in the same process or after a restart, it
continues after it (and a resume into the deleted part gets a gap). That is
bounded: the last seqs of the :data:`PRUNED_REMEMBERED` streams pruned most
recently are kept (about 180 bytes each for a 20-character id, 3 MB in
all; the file is rewritten with those once it holds twice as many lines);
one pruned longer ago is forgotten and counts from seq 1 again, so a server
whose clients take a new stream id on every connection does not grow
without end.

One process: :meth:`Journal.restore` takes a lock on :data:`LOCK_FILE`
(POSIX ``lockf``, which the kernel lets go of when the process ends, crash
or not) and raises OSError when another process holds it: two servers on
one folder would number a stream alike under one epoch and mix their lines.
A folder where the lock file cannot be made (read-only) is used unlocked,
with a warning. Journals within one process are not told apart.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote

from ...config import JournalConfig
from ...events import CaptionEvent, StreamEnded
from ...server.protocol import new_epoch, parse_epoch
from .files import (
    CLOCK_SLACK_S,
    expired,
    file_age,
    file_name,
    parse_file_name,
    recorded_start,
    should_rotate,
)
from .records import (
    EndRecord,
    JournalRecord,
    LostRecord,
    SeqReservation,
    _decode_pruned,
    _encode_pruned,
    decode_line,
    encode_end,
    encode_lost,
    encode_record,
    encode_reservation,
)

if sys.platform != "win32":
    import fcntl

__all__ = [
    "EPOCH_FILE",
    "LOCK_FILE",
    "LOST_LISTED",
    "LOST_STREAMS",
    "PRUNED_FILE",
    "PRUNED_REMEMBERED",
    "SEQ_RESERVE_BLOCK",
    "SYNC_CLOSE_WAIT_S",
    "Journal",
    "Replay",
]

# Logged as the package, as before it was split into modules: log lines (and
# operators' filters on them) name evoxtral_stream.engine.journal.
log = logging.getLogger(__name__.rpartition(".")[0])

PRUNED_REMEMBERED = 16_384
"""How many pruned streams' last seqs a running journal keeps (the most
recently pruned); a stream beyond that re-opens at seq 1, as after a restart."""

SEQ_RESERVE_BLOCK = 64
"""How many seqs past the one about to be sent a reservation covers: one
reservation line per this many captions; a restart may skip up to this many."""

PRUNED_FILE = "pruned"
"""The file in the journal folder that holds the last seq of each stream
pruned (one JSON line each, ``{"stream": S, "seq": N}``; the
:data:`PRUNED_REMEMBERED` newest count), so that opened again after a
restart it numbers after it; it never parses as a journal file."""

EPOCH_FILE = "epoch"
"""The file in the journal folder that holds the folder's epoch (the id of
its seq numbering, sent in the hello); it never parses as a journal file."""

LOCK_FILE = "lock"
"""The file in the journal folder that the process journaling into it holds
a lock on (from :meth:`Journal.restore` to :meth:`Journal.close`), so that a
second server given the same folder is refused; it never parses as a
journal file."""

# The folder's own files besides the journal files, and what _replace_file
# may leave of them after a crash: never reported as foreign.
_OWN_FILES = frozenset({EPOCH_FILE, LOCK_FILE, PRUNED_FILE, EPOCH_FILE + ".part",
                        PRUNED_FILE + ".part"})

LOST_LISTED = 64
"""How many seqs a loss record lists (the first finals lost in a row);
finals lost past them are told by its ``seq``, the highest lost."""

LOST_STREAMS = 4096
"""How many streams' lost finals not recorded yet a running journal keeps
(the most recent); one beyond that is forgotten, with an error logged."""


SYNC_CLOSE_WAIT_S = 5.0
"""How long :meth:`Journal.close` waits for the interval fsyncs in flight
(``fsync = "interval"``) before it goes on without them, with an error
logged: a disk that hangs must not hang the stop."""

# How soon a due interval fsync is tried again while the batch before it is
# still in flight (the engine's timer comes back then).
_SYNC_BUSY_RETRY_S = 0.05


@dataclass(frozen=True)
class Replay:
    """What the journal can replay of a stream after some seq.

    ``records`` are the finals with ``since < seq < before``, in order (the
    newest ``limit`` of them when a limit left older ones out).
    ``covered_from`` is the lowest seq from which every final is present: 1
    when no file of the stream was deleted by rotation (nor by hand: a file
    missing between kept ones counts its finals and those before it as
    deleted), else the seq of the oldest final kept (with no final kept,
    one past the oldest reservation kept: finals before it went with the
    deleted files); after a damaged line that a final follows, that
    final's seq (the line may have held finals); after a loss record (a
    final the disk refused), one past the highest of its seqs with
    ``since < seq < before`` whose final the files lack before it (finals
    lost past those listed count as lacking); past a limit, the seq of
    the oldest record replayed (with none, one past the newest left out).
    Before it, finals may be missing (a ``gap``). ``ended`` is the stream's
    ``stream.ended`` message when the stream's last record is its end
    record, else None (it was opened again, or cut by a crash: its end is
    unknown).
    """

    records: tuple[JournalRecord, ...]
    covered_from: int
    ended: str | None = None


class _Damaged:
    """Where :meth:`Journal._lines` found a damaged line (it may have held
    finals)."""


_DAMAGED = _Damaged()


class _Open:
    """The file being written for one stream; ``started`` is wall-clock
    seconds, as its name records it. ``torn``: the file may end in part of
    a line (a crash, or a write the disk cut short), so the next write
    starts with a newline (:meth:`Journal._put`)."""

    def __init__(self, index: int, path: Path, file: IO[bytes], size: int,
                 started: float, *, torn: bool = False) -> None:
        self.index = index
        self.path = path
        self.file = file
        self.size = size
        self.started = started
        self.torn = torn


class _Lost:
    """A stream's finals whose appends failed, not recorded yet: the first
    :data:`LOST_LISTED` seqs, and the highest."""

    def __init__(self, seq: int) -> None:
        self.seqs = [seq]
        self.last = seq

    def add(self, seq: int) -> None:
        if len(self.seqs) < LOST_LISTED:
            self.seqs.append(seq)
        self.last = max(self.last, seq)

    def line(self, stream: str) -> bytes:
        return (encode_lost(stream, tuple(self.seqs), self.last) + "\n").encode()


class _Syncer:
    """The journal's fsync thread for ``fsync = "interval"`` (module doc):
    one daemon thread, ``journal-sync``, started with the first batch, which
    fsyncs and closes the duplicated descriptors of one batch at a time."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._batch: list[tuple[str, int]] | None = None
        self._busy = False
        self._stop = False
        # The thread has not yet returned: set and cleared under the lock,
        # since a thread that has just decided to return is still "alive".
        self._running = False
        self.failures = 0
        """Files whose fsync failed (on the thread, or inline in its place)."""

    @property
    def busy(self) -> bool:
        """A batch is handed over and not done yet."""
        with self._cond:
            return self._busy

    def submit(self, batch: list[tuple[str, int]]) -> None:
        """Hand over ``batch`` ((file name, duplicated descriptor) pairs,
        which the thread closes); only when not :attr:`busy`. Where no
        thread can be started (the process at its thread limit), the batch
        is synced here, on the caller's thread, and the next one tries again."""
        with self._cond:
            assert not self._busy, "one batch at a time"
            refused = None if self._running else self._start()
            if refused is None:
                self._batch, self._busy, self._stop = batch, True, False
                self._cond.notify()
                return
        log.warning("journal: cannot start the fsync thread (%s): fsyncing on the event "
                    "loop this time", refused)
        self._sync(batch)

    def _start(self) -> RuntimeError | None:
        """Start the thread (called under the lock, which it then waits for
        in :meth:`_take`); why it could not be, or None."""
        thread = threading.Thread(target=self._run, name="journal-sync", daemon=True)
        try:
            thread.start()
        except RuntimeError as e:
            return e
        self._thread, self._running = thread, True
        return None

    def count(self, failures: int) -> None:
        with self._cond:
            self.failures += failures

    def stop(self, timeout: float) -> bool:
        """Let the batch in flight finish, for at most ``timeout`` seconds,
        and end the thread. False when it is still running (then it ends
        after its batch)."""
        with self._cond:
            self._stop = True
            self._cond.notify()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self) -> None:
        try:
            while (batch := self._take()) is not None:
                self._sync(batch)
        except BaseException:
            with self._cond:   # died: the next batch starts another
                self._running = False
            raise

    def _take(self) -> list[tuple[str, int]] | None:
        """The next batch, waited for; None once stopped with none left."""
        with self._cond:
            while self._batch is None and not self._stop:
                self._cond.wait()
            batch, self._batch = self._batch, None
            if batch is None:
                # In the same hold of the lock as submit checks it.
                self._running = False
            return batch

    def _sync(self, batch: list[tuple[str, int]]) -> None:
        failed: list[tuple[str, OSError]] = []
        try:
            for name, fd in batch:
                try:
                    os.fsync(fd)
                except OSError as e:
                    failed.append((name, e))
                finally:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        finally:
            if failed:
                name, first = failed[0]
                log.error("journal: fsync failed for %d of %d file(s) (%s: %s); the "
                          "finals written to them in the last fsync_interval_s may "
                          "not survive a power cut", len(failed), len(batch), name,
                          first.strerror or first)
            with self._cond:
                self.failures += len(failed)
                self._busy = False


class Journal:
    """Writes and reads the per-stream journal files in ``cfg.dir``.

    Use it from one thread (the event loop), but for :meth:`replay`, which
    may also run on another thread meanwhile; ``fsync = "interval"``'s
    fsyncs run on a thread of the journal's own (module doc). ``clock`` is
    monotonic seconds, used for the fsync interval only; ``wall`` is the wall clock (Unix
    seconds) that files' starts (age rotation) and modification times
    (retention) are compared with, since both must hold across restarts.
    """

    def __init__(self, cfg: JournalConfig, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 pruned_remembered: int = PRUNED_REMEMBERED) -> None:
        self._cfg = cfg
        self._dir = Path(cfg.dir)
        self._clock = clock
        self._wall = wall
        self._open: dict[str, _Open] = {}
        self._dirty: set[str] = set()
        self._last_fsync = clock()
        self._syncer = _Syncer()
        # Streams with files: bounded by what retention keeps on disk. The
        # highest seq given (this process) or recorded (files) per stream,
        self._last_seq: dict[str, int] = {}
        # and the highest reservation its files hold (none: absent).
        self._reserved: dict[str, int] = {}
        # Streams pruned by this process, oldest prune first: a re-opened one
        # goes on after its last seq. Bounded, since ids may never come back.
        self._pruned_seq: OrderedDict[str, int] = OrderedDict()
        self._pruned_remembered = pruned_remembered
        # Streams re-opened after a prune here: their file 1 does not start
        # the numbering, so a replay from it is not complete.
        self._renumbered: set[str] = set()
        # Lines in PRUNED_FILE (it is rewritten past twice the remembered).
        self._pruned_lines = 0
        # Each stream's hole in its files last logged (the index after it),
        # so a resume logs it once (bounded like _last_seq).
        self._holes: dict[str, int] = {}
        # Names in the folder that are not the journal's, already warned of
        # (those there at the last full scan: bounded by the folder).
        self._foreign: set[str] = set()
        # Streams whose last record this process wrote is their end (bounded
        # like _last_seq): opened again, their first caption must say so.
        self._ended_last: set[str] = set()
        # Streams whose finals the disk refused, not recorded yet (oldest
        # loss first): their next write starts with a loss record. Bounded
        # by LOST_STREAMS, since a stream may never write again.
        self._lost: OrderedDict[str, _Lost] = OrderedDict()
        self._lock_fd: int | None = None
        # Retention's reading of the wall clock (_retention_now): the wall
        # and monotonic times it was last read at, and the monotonic time a
        # step forward was first seen (None: no step being distrusted).
        self._wall_read = (wall(), clock())
        self._stepped_at: float | None = None
        self.appended = 0
        self.pruned = 0
        """Streams whose files were deleted after ``retention_s``."""
        self.epoch = ""
        """The folder's epoch, set by :meth:`restore`: made once, with the
        folder, and kept in :data:`EPOCH_FILE`, since the numbering it names
        goes on across restarts."""

    # --- start and stop --------------------------------------------------------

    def restore(self) -> dict[str, int]:
        """Create the folder if needed, read the pruned streams' last seqs
        (:data:`PRUNED_FILE`), prune what is past retention, and return each
        remaining journaled stream's last seq: the highest of its journaled
        finals and seq reservations."""
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        self.epoch = self._load_epoch()
        self._load_pruned()
        self.prune()
        for stream, paths in self._files().items():
            last, reserved = self._recorded_last(paths)
            self._last_seq[stream] = last
            if reserved:
                self._reserved[stream] = reserved
            if stream in self._pruned_seq:
                # Opened again after a prune: its file 1 does not start the
                # numbering, and its files number past the pruned seq (a
                # crash may have left them no whole record yet).
                self._renumbered.add(stream)
                self._last_seq[stream] = max(last, self._pruned_seq[stream])
        return dict(self._last_seq)

    def _lock(self) -> None:
        """Hold :data:`LOCK_FILE` (module doc); OSError when another process
        holds it."""
        if self._lock_fd is not None or sys.platform == "win32":
            return
        path = self._dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            log.warning("journal: cannot open %s (%s); a second server on this folder "
                        "would go unnoticed", path, e.strerror or e)
            return
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise OSError(e.errno, "another process (a second server?) is journaling "
                              "into this folder; give each server its own journal.dir",
                              str(path)) from None
            log.warning("journal: cannot lock %s (%s); a second server on this folder "
                        "would go unnoticed", path, e.strerror or e)
            return
        self._lock_fd = fd

    def _recorded_last(self, paths: list[Path]) -> tuple[int, int]:
        """The last seq the files ``paths`` (oldest first) record, and the
        highest reservation among them (0: none)."""
        # The newest file that holds a valid line has the last seq: marks
        # only grow, and a rotation carries the latest reservation into the
        # new file. Unless that file has a damaged line and no reservation
        # left: the crash may have hit its carried mark, which the file
        # before it still holds, so the files before are read until one
        # holds a reservation. End records carry no seq; a loss record's
        # lost finals were sent.
        last = reserved = 0
        damaged = False
        for path in reversed(paths):
            counted = last    # what the newer files hold
            try:
                for x in self._lines(path):
                    if isinstance(x, _Damaged):
                        damaged = True
                    elif isinstance(x, JournalRecord | SeqReservation | LostRecord):
                        last = max(last, x.seq)
                        if isinstance(x, SeqReservation):
                            reserved = max(reserved, x.seq)
            except OSError as e:
                # Not in the file that holds the last seq: its seqs past what
                # was read would be numbered again.
                if not counted:
                    raise
                # Read for a mark only: what the newer files hold stands.
                log.warning("journal: cannot read %s for a seq reservation (%s): "
                            "counting from the newer files", path, e.strerror or e)
                break
            if reserved or (last and not damaged):
                break
        return last, reserved

    def _load_pruned(self) -> None:
        """Remember the last seqs :data:`PRUNED_FILE` holds (the newest
        :attr:`_pruned_remembered` of them). A damaged line is skipped; an
        unreadable file is logged: those streams then count from 1 again."""
        path = self._dir / PRUNED_FILE
        try:
            with open(path, "rb") as f:
                raw = f.read().splitlines()
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("journal: cannot read %s (%s): streams pruned before count from "
                        "seq 1 again if opened", path, e.strerror or e)
            return
        damaged = 0
        for line in raw:
            entry = _decode_pruned(line)
            if entry is None:
                damaged += line.strip() != b""
                continue
            stream, seq = entry
            self._remember_pruned(stream, seq)
        self._pruned_lines = len(raw)
        if damaged:
            log.warning("journal: %d damaged line(s) in %s skipped", damaged, path)

    def _remember_pruned(self, stream: str, seq: int) -> None:
        self._pruned_seq[stream] = seq
        self._pruned_seq.move_to_end(stream)
        while len(self._pruned_seq) > self._pruned_remembered:
            self._pruned_seq.popitem(last=False)

    def _record_pruned(self, entries: dict[str, int]) -> None:
        """Append ``entries`` (stream: last seq) to :data:`PRUNED_FILE`,
        durably unless ``fsync = "never"``, before their files are deleted;
        rewrite it with what is remembered once it holds twice that many
        lines. A failure is logged: those streams are remembered until a
        restart only."""
        if not entries:
            return
        path = self._dir / PRUNED_FILE
        data = b"".join(_encode_pruned(s, n) for s, n in entries.items())
        try:
            with open(path, "ab") as f:
                if f.tell() and not _ends_with_newline(path):
                    # A crash cut the last line short: end it, or the first
                    # entry would join it and be skipped as damaged when read.
                    data = b"\n" + data
                f.write(data)
                f.flush()
                if self._cfg.fsync != "never":
                    os.fsync(f.fileno())
            self._pruned_lines += len(entries)
            if self._pruned_lines > 2 * self._pruned_remembered:
                remembered = {**self._pruned_seq, **entries}
                _replace_file(path, b"".join(_encode_pruned(s, n)
                                             for s, n in remembered.items()),
                              sync=self._cfg.fsync != "never")
                self._pruned_lines = len(remembered)
            self._sync_dir()
        except OSError as e:
            log.error("journal: cannot write %s (%s): after a restart, the %d stream(s) "
                      "pruned now count from seq 1 again if opened", path,
                      e.strerror or e, len(entries))

    def _load_epoch(self) -> str:
        """The folder's epoch; a new one (written durably before any seq is
        given under it) if the folder has none or its file is damaged or
        unreadable. A new one that cannot be written (a read-only folder, a
        full disk) is logged and still used: it holds for this run only, so
        after a restart resuming subscribers get a gap and replay from seq 0
        (captions again, never fewer), and the captions go on as when a final
        cannot be journaled."""
        path = self._dir / EPOCH_FILE
        try:
            text = path.read_text(encoding="ascii", errors="replace").strip()
        except FileNotFoundError:
            text = None
        except OSError as e:
            text = None
            log.warning("journal: cannot read %s (%s); starting a new epoch: resuming "
                        "subscribers get a gap and replay from seq 0", path, e.strerror or e)
        if text is not None:
            try:
                epoch = parse_epoch([text])
            except ValueError:
                log.warning("journal: %s is damaged (%r); starting a new epoch: resuming "
                            "subscribers get a gap and replay from seq 0", path, text[:80])
            else:
                assert epoch is not None
                return epoch
        epoch = new_epoch()
        try:
            _replace_file(path, (epoch + "\n").encode("ascii"), sync=True)
            self._sync_dir()
        except OSError as e:
            log.error("journal: cannot write %s (%s); epoch %s holds for this run only: "
                      "after a restart, resuming subscribers get a gap and replay from seq 0",
                      path, e.strerror or e, epoch)
        return epoch

    def last_seq(self, stream: str) -> int:
        """The last seq of ``stream``: the highest given in this process (as
        :meth:`reserve` and :meth:`append` were told), else the highest its
        files record, finals and reservations (0 if none, or pruned and
        forgotten)."""
        seq = self._last_seq.get(stream)
        return seq if seq is not None else self._pruned_seq.get(stream, 0)

    def close(self) -> None:
        """fsync (unless ``fsync = "never"``) and close every open file, and
        let go of the folder (:data:`LOCK_FILE`). Every file is closed even
        when the disk refuses (a full disk fails the flush of a final still
        buffered); then one OSError is raised, naming the first file that
        failed and how many did.

        First the loss record of each stream with finals lost and not
        recorded yet is written (a stream that wrote nothing since: the
        disk may take it now); one the disk refuses is logged, as it is
        lost with the process (a resume after a restart then skips those
        finals without a gap).

        Under ``fsync = "interval"``, the batch of fsyncs in flight is waited
        for first (at most :data:`SYNC_CLOSE_WAIT_S`; an error is logged if
        it is cut short) and the sync thread ended; the files written since
        are fsynced by their close."""
        if not self._syncer.stop(SYNC_CLOSE_WAIT_S):
            log.error("journal: the fsync thread did not finish its batch within %g s "
                      "(a disk that does not answer?); closing the files without it",
                      SYNC_CLOSE_WAIT_S)
        for stream in list(self._lost):
            lost = self._lost[stream]
            try:
                self._write(stream, b"", rotate=False)
            except OSError as e:
                log.error("journal: cannot record that the final(s) of %s up to seq %d "
                          "were not journaled (%s); after a restart a resume skips them "
                          "without a gap", stream, lost.last, e.strerror or e)
        self._lost.clear()
        failed: list[tuple[Path, OSError]] = []
        try:
            for stream in list(self._open):
                path = self._open[stream].path
                try:
                    self._close(stream)
                except OSError as e:
                    failed.append((path, e))
        finally:
            if self._lock_fd is not None:
                fd, self._lock_fd = self._lock_fd, None
                os.close(fd)
        if failed:
            path, first = failed[0]
            raise OSError(first.errno, f"{first.strerror or first} (closing {path.name}"
                          + (f" and {len(failed) - 1} more journal file(s)"
                             if len(failed) > 1 else "") + ")")

    def release(self, stream: str) -> None:
        """The stream ended: fsync (per policy) and close its file, if open.
        Its records stay readable; a later append opens the file again."""
        if stream in self._open:
            self._close(stream)

    def end(self, event: StreamEnded) -> None:
        """The stream ended after its last final: append its end record
        (``event``'s ``stream.ended`` message; module doc), then
        :meth:`release` it, which fsyncs per policy and closes the file.

        A stream the journal holds nothing of (no record, no lost final)
        gets no record (and no file). The record never rotates the file.
        Raises OSError when the disk refuses; the file is closed either way.
        """
        stream = event.stream
        try:
            if stream in self._last_seq or stream in self._lost:
                self._write(stream, (encode_end(event) + "\n").encode(), rotate=False)
                self._ended_last.add(stream)
        finally:
            self.release(stream)

    @property
    def sync_failures(self) -> int:
        """Interval fsyncs (``fsync = "interval"``) that failed, one per
        file per batch: logged by the sync thread, never raised."""
        return self._syncer.failures

    @property
    def open_files(self) -> int:
        """Files held open: one per live stream that has journaled a final or
        a seq reservation."""
        return len(self._open)

    def prune(self, live: Collection[str] = ()) -> list[str]:
        """Delete the files of every stream past ``retention_s``.

        A stream is past retention when its newest file was last modified
        ``retention_s`` or more ago; streams in ``live`` or with an open file
        are never pruned. Returns the streams pruned. Runs on the calling
        thread: one directory listing plus one ``stat`` per stream.
        """
        if self._cfg.retention_s <= 0:
            return []
        now = self._retention_now()
        due: list[tuple[str, list[Path]]] = []
        for stream, paths in self._files().items():
            if stream in live or stream in self._open:
                continue
            try:
                last_write = paths[-1].stat().st_mtime
            except FileNotFoundError:
                continue
            if expired(last_write, now, self._cfg.retention_s):
                due.append((stream, paths))
        if not due:
            return []
        # Each stream's last seq is recorded before its files go, so that
        # opened again, even after a restart, it numbers after it.
        last = {stream: self._last_seq.get(stream) or self._recorded_last(paths)[0]
                for stream, paths in due}
        self._record_pruned({s: n for s, n in last.items() if n})
        for stream, paths in due:
            for path in paths:
                path.unlink(missing_ok=True)
            self._forget_files_of(stream, last[stream])
        pruned = [stream for stream, _ in due]
        self.pruned += len(pruned)
        self._sync_dir()
        log.info("journal: deleted the files of %d stream(s) not written for %g s "
                 "(journal.retention_s): %s", len(pruned), self._cfg.retention_s,
                 ", ".join(sorted(pruned)[:10]) + (" ..." if len(pruned) > 10 else ""))
        return pruned

    def _retention_now(self) -> float:
        """The wall time that :meth:`prune` compares mtimes with: the wall
        clock, except after a step forward of it, which is believed only
        once it has held for ``retention_s`` (module doc). Until then, the
        wall time read before the step plus the monotonic time since."""
        wall, mono = self._wall(), self._clock()
        last_wall, last_mono = self._wall_read
        counted = last_wall + (mono - last_mono)
        if wall <= counted + CLOCK_SLACK_S:
            # No step forward. A step back makes files look younger: they
            # are kept longer, never deleted early, so it is believed.
            self._wall_read, self._stepped_at = (wall, mono), None
            return wall
        if self._stepped_at is None:
            self._stepped_at = mono
            log.warning("journal: the wall clock jumped %.0f s ahead; files are aged by "
                        "the time counted before the jump until the new time has held "
                        "for journal.retention_s (%g s)", wall - counted,
                        self._cfg.retention_s)
        if mono - self._stepped_at >= self._cfg.retention_s:
            self._wall_read, self._stepped_at = (wall, mono), None
            return wall
        return counted

    def _forget_files_of(self, stream: str, last: int) -> None:
        """The stream's files are gone: remember its last seq among the pruned."""
        self._renumbered.discard(stream)
        self._ended_last.discard(stream)
        self._holes.pop(stream, None)
        # Finals lost before the prune are before the numbering its files
        # start again at: a resume into them gets a gap all the same.
        self._lost.pop(stream, None)
        self._reserved.pop(stream, None)
        self._last_seq.pop(stream, None)
        if last:
            self._remember_pruned(stream, last)

    # --- writing ----------------------------------------------------------------

    def append(self, event: CaptionEvent) -> None:
        """Write one final; returns once it is flushed (and fsynced per policy).

        Raises OSError when the disk refuses; the caller decides what then.
        The final's seq is then kept (module doc: lost finals), and the
        stream's next line that the disk takes comes after a loss record of it.
        """
        try:
            cur = self._write(event.stream, (encode_record(event) + "\n").encode())
            self._last_seq[event.stream] = max(event.seq,
                                               self._last_seq.get(event.stream, 0))
            self.appended += 1
            self._make_durable(event.stream, cur)
        except OSError:
            self._note_lost(event.stream, event.seq)
            raise

    def _note_lost(self, stream: str, seq: int) -> None:
        """The append of ``stream``'s final ``seq`` failed: keep its seq for
        the loss record (bounded: :data:`LOST_STREAMS` streams)."""
        lost = self._lost.get(stream)
        if lost is None:
            self._lost[stream] = _Lost(seq)
        else:
            lost.add(seq)
            self._lost.move_to_end(stream)
        while len(self._lost) > LOST_STREAMS:
            gone, forgotten = self._lost.popitem(last=False)
            log.error("journal: forgetting that the final(s) of %s up to seq %d were not "
                      "journaled (%d streams wait to record such a loss); after a restart "
                      "a resume skips them without a gap", gone, forgotten.last, LOST_STREAMS)

    def reserve(self, stream: str, seq: int) -> bool:
        """A caption of ``stream`` numbered ``seq`` (partial or final) is about
        to be sent: make sure a restart numbers the stream after it.

        Past the stream's reserved mark, or when the stream's last record
        is its end (opened again in this process: the reservation says it is
        live again), a reservation of ``seq + SEQ_RESERVE_BLOCK`` is appended
        and the call returns once it is flushed (and fsynced per policy, as a
        final is): True. Otherwise only ``seq`` is noted (:meth:`last_seq`):
        False. Raises OSError when the disk refuses (the mark stays where it
        was).
        """
        reserved = self._reserved.get(stream, 0)
        if seq <= reserved and stream not in self._ended_last:
            self._last_seq[stream] = max(seq, self._last_seq.get(stream, 0))
            return False
        mark = max(seq + SEQ_RESERVE_BLOCK, reserved)
        cur = self._write(stream, (encode_reservation(stream, mark) + "\n").encode())
        self._reserved[stream] = mark
        self._last_seq[stream] = max(seq, self._last_seq.get(stream, 0))
        self._make_durable(stream, cur)
        return True

    def _write(self, stream: str, data: bytes, *, rotate: bool = True) -> _Open:
        """Append one line to the stream's file (rotating first if due, unless
        not ``rotate``) and flush it to the OS; returns the file written.
        The stream's loss record, if finals were lost since its last line,
        goes first, in the same write."""
        lost = self._lost.get(stream)
        if lost is not None:
            data = lost.line(stream) + data
        now = self._wall()
        cur = self._open.get(stream)
        if cur is None:
            # Re-opened files are checked too: one written before a release
            # or a restart may be due by age or size already.
            cur = self._open_for_append(stream, now)
        age = file_age(cur.started, now)
        if rotate and should_rotate(cur.size, len(data), age, self._cfg.max_bytes,
                                    self._cfg.max_age_s):
            if age == math.inf and self._cfg.max_age_s > 0:
                log.warning("journal: %s was started %.0f s ahead of the clock (was the "
                            "clock set back?); starting a new file", cur.path.name,
                            cur.started - now)
            cur = self._rotate(stream, cur, now)
        self._put(cur, data)
        if lost is not None:
            del self._lost[stream]
        self._ended_last.discard(stream)
        if stream in self._pruned_seq and stream not in self._renumbered:
            # Opened again after a prune: it numbers on. Its pruned seq stays
            # among the remembered (and in PRUNED_FILE when that is
            # rewritten), so a restart still knows its file 1 does not start
            # the numbering.
            self._last_seq[stream] = max(self._pruned_seq[stream],
                                         self._last_seq.get(stream, 0))
            self._renumbered.add(stream)
        return cur

    @staticmethod
    def _put(cur: _Open, data: bytes) -> None:
        """Write ``data`` (whole lines) to ``cur``'s file and flush it to the OS.

        A write the disk refuses (full, EIO) may leave part of the line in
        the file, and what the file's buffer keeps of it may follow with a
        later flush, or never (a line longer than the buffer is written
        past it): so after a failed write the next one starts with a
        newline. Its line then stands on its own, whatever of the failed
        one reached the disk (an empty line, the failed record whole, or a
        fragment read as a damaged line), and no record written after it
        is lost with it.
        """
        if cur.torn:
            data = b"\n" + data
        cur.torn = True
        cur.file.write(data)
        cur.file.flush()
        cur.torn = False
        cur.size += len(data)

    def _make_durable(self, stream: str, cur: _Open) -> None:
        """fsync what was just written, per ``fsync``."""
        if self._cfg.fsync == "always":
            os.fsync(cur.file.fileno())
        elif self._cfg.fsync == "interval":
            self._dirty.add(stream)
            self.sync_due()

    def sync_due(self) -> float | None:
        """For ``fsync = "interval"``: when due, hand the files written since
        the last fsync to the sync thread (module doc); return seconds until
        the next is due (None: nothing waits). The engine calls it again
        then, so the last finals before a quiet spell reach the disk too.

        While the batch before is still in flight, the files wait (they stay
        dirty: one batch at a time, no queue) and the return is how soon to
        ask again. Never raises: a failed fsync is logged and counted
        (:attr:`sync_failures`)."""
        if not self._dirty:
            return None
        interval = self._cfg.fsync_interval_s
        wait = self._last_fsync + interval - self._clock()
        if wait > 0:
            # last + interval - now rounds a hair above the interval when
            # no time has passed (1.2 + 1.0 - 1.2 == 1.0000000000000002).
            return min(wait, interval)
        if self._syncer.busy:
            return min(_SYNC_BUSY_RETRY_S, interval)
        batch: list[tuple[str, int]] = []
        for stream in self._dirty:
            cur = self._open.get(stream)
            if cur is None:
                continue
            try:
                batch.append((cur.path.name, os.dup(cur.file.fileno())))
            except OSError:
                self._sync_inline(cur)
        self._dirty.clear()
        self._last_fsync = self._clock()
        if batch:
            self._syncer.submit(batch)
        return None

    def _sync_inline(self, cur: _Open) -> None:
        """fsync ``cur`` on the loop, in place of the sync thread (its
        descriptor could not be duplicated); a failure counts as the
        thread's do."""
        try:
            os.fsync(cur.file.fileno())
        except OSError as e:
            self._syncer.count(1)
            log.error("journal: fsync failed for %s: %s; the finals written to it in "
                      "the last fsync_interval_s may not survive a power cut",
                      cur.path.name, e.strerror or e)

    def _open_for_append(self, stream: str, now: float) -> _Open:
        """Open the stream's newest file (or its first) to append to it."""
        self._dir.mkdir(parents=True, exist_ok=True)
        paths = self._files_of(stream)
        info = parse_file_name(paths[-1].name) if paths else None
        if info is None:
            index, started = 1, recorded_start(now)
            path = self._dir / file_name(stream, index, started)
        else:
            index, path = info.index, paths[-1]
            if info.started is None:
                path, started = self._record_start(stream, index, path, now)
            else:
                started = info.started
        created = not path.exists()
        f = path.open("ab")
        size = f.tell()
        # A crash may have cut the last line short: the next record then
        # starts on a line of its own (the fragment is skipped when read).
        # Held open first, torn if not empty: a check that fails leaves a
        # blank line at worst, and no handle behind.
        opened = self._open[stream] = _Open(index, path, f, size, started, torn=bool(size))
        opened.torn = bool(size) and not _ends_with_newline(path)
        if created:
            self._sync_dir()
        return opened

    def _record_start(self, stream: str, index: int, path: Path,
                      now: float) -> tuple[Path, float]:
        """Give a file of an older version, whose name records no start, the
        start ``now``: rename it (atomic; its mtime, hence retention, is kept).
        Returns its path and start; when the rename fails, the old path and
        ``now``, which then holds for this opening only (as older versions did)."""
        started = recorded_start(now)
        target = self._dir / file_name(stream, index, started)
        try:
            if target.exists():
                raise FileExistsError(f"{target.name} exists")
            path.rename(target)
        except OSError as e:
            log.warning("journal: cannot rename %s to record its start (%s); its age "
                        "counts from now while it stays open", path.name, e)
            return path, started
        self._sync_dir()
        log.info("journal: %s recorded no start (an older version wrote it); renamed "
                 "%s, its age for max_age_s counts from now", path.name, target.name)
        return target, started

    def _rotate(self, stream: str, cur: _Open, now: float) -> _Open:
        self._close(stream)
        index, started = cur.index + 1, recorded_start(now)
        path = self._dir / file_name(stream, index, started)
        opened = self._open[stream] = _Open(index, path, path.open("ab"), 0, started)
        mark = self._reserved.get(stream)
        if mark:
            # The new file starts with the latest reservation, durably before
            # the old files may go: the newest file holds the mark (restore).
            self._put(opened, (encode_reservation(stream, mark) + "\n").encode())
            if self._cfg.fsync != "never":
                os.fsync(opened.file.fileno())
        self._sync_dir()
        # Keep `keep` rotated files besides the new one.
        old = self._files_of(stream)[:-1]
        for gone in old[: max(0, len(old) - self._cfg.keep)]:
            log.info("journal: deleting rotated file %s", gone.name)
            try:
                gone.unlink(missing_ok=True)
            except OSError as e:
                # The record that rotated goes into the new file all the
                # same: a file that stays (a folder in its place, no
                # permission) costs space, never a final.
                log.warning("journal: cannot delete rotated file %s (%s); remove it by hand",
                            gone.name, e.strerror or e)
        return opened

    def _close(self, stream: str) -> None:
        cur = self._open.pop(stream)
        self._dirty.discard(stream)
        try:
            if self._cfg.fsync != "never":
                os.fsync(cur.file.fileno())
        finally:
            cur.file.close()  # also when fsync fails: the handle must not leak

    def _sync_dir(self) -> None:
        # A new file's directory entry must be durable too, or a crash can
        # lose the whole file; only worth it when fsync is asked for at all.
        if self._cfg.fsync == "never":
            return
        fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- reading ----------------------------------------------------------------

    def replay(self, stream: str, since: int, before: int | None = None,
               limit: int | None = None) -> Replay | None:
        """The journaled finals of ``stream`` with ``since < seq < before``
        (captions only: reservation lines are never replayed), and its end
        when its last record is its end record (:attr:`Replay.ended`).

        With ``limit``, only the newest ``limit`` of those finals: the older
        ones are left out as missing (:attr:`Replay.covered_from` is past
        them, so the caller announces a gap). None when the journal holds
        nothing of the stream.

        Safe on another thread while the loop writes: it reads the files
        through handles of its own, each up to its size when opened (lines
        appended later are newer than any the caller asked for, if it gives
        ``before``; its end record may be newer too), and a file rotated or
        pruned away since it listed them makes what it held a gap. Reads the
        stream's lines on the calling thread from the end, newest first, and
        stops at a final at or before ``since`` (seqs only grow, so older
        lines hold nothing to replay) or once it has read a final past
        ``limit``: a resume of recent captions
        reads the end of the newest file; one from the start the lines
        holding the newest ``limit`` finals, and without a limit at most
        ``(keep + 1) * max_bytes`` bytes.
        """
        paths = self._files_of(stream)
        if not paths:
            return None
        paths = self._after_missing(stream, paths)

        def wanted(x: JournalRecord | SeqReservation | EndRecord | LostRecord) -> bool:
            return (isinstance(x, JournalRecord) and x.seq > since
                    and (before is None or x.seq < before))

        newest_first: list[JournalRecord | SeqReservation | EndRecord | LostRecord
                           | _Damaged] = []
        found = 0   # finals to replay among the lines read
        stopped = False
        vanished = False
        for path in reversed(paths):
            empty = True
            with contextlib.closing(self._lines(path, newest_first=True)) as backward:
                for line in backward:
                    empty = False
                    newest_first.append(line)
                    if not isinstance(line, JournalRecord):
                        continue
                    # A final at or before since: older lines hold nothing to
                    # replay. One past the limit: the older are a gap, which
                    # starts after this one.
                    if wanted(line):
                        found += 1
                    if line.seq <= since or (limit is not None and found > limit):
                        stopped = True
                        break
            # Nothing read and gone: deleted since the listing (file names
            # are never used again).
            vanished = vanished or (empty and not path.exists())
            if stopped:
                break
        # Rotation deletes the lowest indices: if file 1 is gone, finals
        # before the oldest kept record may be missing. Lines left unread
        # hold only finals at or before since, or finals past the limit
        # (then covered_from is set past them below). A file gone since the
        # listing (rotated or pruned away while another thread read) is
        # as good as gone before it.
        first_file = parse_file_name(paths[0].name)
        complete = (first_file is not None and first_file.index == 1
                    and not vanished and stream not in self._renumbered)
        records: list[JournalRecord] = []
        covered_from: int | None = None
        first_reserved: int | None = None
        ended: str | None = None
        damaged = False   # a damaged line since the last final
        seen: set[int] = set()   # the finals read so far
        for line in reversed(newest_first):
            if isinstance(line, _Damaged):
                damaged = True
                continue
            if isinstance(line, EndRecord):
                ended = line.message
                continue
            ended = None   # a later record: the stream was opened again
            if isinstance(line, LostRecord):
                top = _lacking(line, seen, since, before)
                if top is not None:
                    # Finals the disk refused: as for a damaged line, the one
                    # gap covers them, hence the finals before them too (but
                    # for refused ones the buffer wrote late, past the top).
                    records = [r for r in records if r.seq > top]
                    covered_from = top + 1
                continue
            if isinstance(line, SeqReservation):
                if first_reserved is None:
                    first_reserved = line.seq
                continue
            seen.add(line.seq)
            if damaged:
                # The damaged line may have held finals (a zeroed block, a
                # line cut short): they are missing, and the one gap a
                # replay may announce (from since) must cover them, hence
                # also the finals before them, as for a missing file.
                damaged = False
                records.clear()
                covered_from = line.seq
            elif covered_from is None:
                covered_from = 1 if complete else line.seq
            if wanted(line):
                records.append(line)
        if limit is not None and len(records) > limit:
            # Past the limit: replay the newest, and say the older are missing.
            # (Finals in lines left unread are missing already: covered_from
            # was at the oldest one read.)
            kept = records[len(records) - limit:] if limit else []
            covered_from = kept[0].seq if kept else records[-1].seq + 1
            records = kept
        if covered_from is None:
            if first_reserved is None:
                return None
            # Reservations but no final: every final there was is in deleted
            # files, and those were numbered up to the oldest reservation kept.
            covered_from = 1 if complete else first_reserved + 1
        return Replay(tuple(records), covered_from, ended)

    def _after_missing(self, stream: str, paths: list[Path]) -> list[Path]:
        """``paths`` (oldest first) from the one after the newest missing
        index on. Rotation deletes the lowest indices only, so a missing one
        between two kept was deleted or renamed by hand (or rotation deleted
        it but not an older one, which it could not): its finals are
        missing, and the one gap a replay may announce (from ``since``)
        must cover them, hence also the finals of the files before it,
        as if rotation had deleted those. Logged once per hole: every
        resume of the stream meets it until a person acts."""
        indices = [info.index if (info := parse_file_name(p.name)) else 0 for p in paths]
        cut = next((i for i in range(len(paths) - 1, 0, -1)
                    if indices[i] - indices[i - 1] > 1), 0)
        if cut and self._holes.get(stream) != indices[cut]:
            # Read off the loop too: a race may log a hole twice, no more.
            self._holes[stream] = indices[cut]
            log.warning("journal: %s has no file %d (deleted by hand, or left by rotation "
                        "beside older files it could not delete?); a resume gets a gap "
                        "for its finals up to %s (logged once)", stream, indices[cut] - 1,
                        paths[cut].name)
        return paths[cut:]

    def _files(self) -> dict[str, list[Path]]:
        """Every stream's journal files, oldest (lowest index) first."""
        return self._scan(None)

    def _files_of(self, stream: str) -> list[Path]:
        """``stream``'s journal files, oldest (lowest index) first."""
        return self._scan(stream).get(stream, [])

    def _scan(self, stream: str | None) -> dict[str, list[Path]]:
        # A week of retention may hold the files of thousands of streams, and
        # a stream's first record runs on the event loop (a resume reads
        # once per stream): names that cannot be the stream's are skipped
        # before they are parsed.
        prefix = "" if stream is None else f"{quote(stream, safe='')}."
        found: dict[str, list[tuple[int, Path]]] = {}
        foreign: set[str] = set()
        if not self._dir.is_dir():
            return {}
        for name in os.listdir(self._dir):
            if not name.startswith(prefix):
                continue
            parsed = parse_file_name(name)
            if parsed is None:
                if name not in _OWN_FILES:
                    foreign.add(name)
            elif stream is None or parsed.stream == stream:
                found.setdefault(parsed.stream, []).append((parsed.index, self._dir / name))
        if stream is None:
            self._warn_foreign(foreign)
        return {s: [p for _, p in sorted(items)] for s, items in found.items()}

    def _warn_foreign(self, names: set[str]) -> None:
        """Warn once of the files in the folder that are not the journal's
        (a copy made by hand, ``copy of mic.….jsonl``): ignored, never read
        as a stream's nor pruned. Each full scan (start, prune) names the
        ones not named before."""
        new = sorted(names - self._foreign)
        self._foreign = names
        if new:
            log.warning("journal: ignoring %d file(s) in %s whose names are not the "
                        "journal's ({stream}.{index}.{start}.jsonl, the stream id "
                        "percent-encoded): %s", len(new), self._dir,
                        ", ".join(repr(n) for n in new[:10])
                        + (" ..." if len(new) > 10 else ""))

    def _lines(self, path: Path, *, newest_first: bool = False
               ) -> Generator[JournalRecord | SeqReservation | EndRecord | LostRecord
                              | _Damaged, None, None]:
        """The file's finals, reservations, end and loss records, in order (or
        ``newest_first``, read in blocks from the end); a damaged (or
        unknown) line is given as :data:`_DAMAGED`, with a warning."""
        try:
            f = path.open("rb")
        except FileNotFoundError:  # rotated away meanwhile
            return
        with f:
            raws = _raw_lines_backward(f) if newest_first else _raw_lines(f)
            for where, raw in raws:
                if not raw.strip():
                    continue
                line: JournalRecord | SeqReservation | EndRecord | LostRecord | None
                try:
                    text = raw.decode()
                except UnicodeDecodeError:
                    line = None
                else:
                    line = decode_line(text)
                if line is None:
                    log.warning("journal: skipping a damaged line (%s at byte %d): %r",
                                path.name, where, raw[:60])
                    yield _DAMAGED
                    continue
                yield line


def _lacking(lost: LostRecord, seen: Collection[int], since: int,
             before: int | None) -> int | None:
    """The highest seq of ``lost`` with ``since < seq < before`` whose final
    is not in ``seen`` (the finals read before the record: a refused line
    the file's buffer kept is written before the next line, whole); None
    if none. Finals lost past those listed, up to ``lost.seq``, are unknown
    and count as lacking."""
    upper = lost.seq if before is None else min(lost.seq, before - 1)
    lacking = [s for s in lost.seqs if since < s <= upper and s not in seen]
    if lost.seq > lost.seqs[-1] and upper > max(since, lost.seqs[-1]):
        lacking.append(upper)
    return max(lacking, default=None)


# Read from a journal file's end at a time: a resume of recent finals reads one.
_BLOCK = 65536


def _replace_file(path: Path, data: bytes, *, sync: bool) -> None:
    """Make ``path`` hold ``data`` whole or not at all: written to
    ``PATH.part`` (fsynced when ``sync``), renamed over ``path``; the part
    file is removed if that fails, an interrupt (Ctrl-C) included."""
    part = path.with_name(path.name + ".part")
    try:
        with open(part, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(part, path)
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
        raise


def _raw_lines(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line without its newline) of each line of ``f``, in order."""
    where = 0
    for raw in f:
        yield where, raw.rstrip(b"\n")
        where += len(raw)


def _raw_lines_backward(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """As :func:`_raw_lines`, last line first, reading ``_BLOCK`` bytes at a
    time from the end."""
    pos = f.seek(0, os.SEEK_END)
    head = b""   # the start of a line, which began in an earlier block
    while pos > 0:
        step = min(_BLOCK, pos)
        pos -= step
        f.seek(pos)
        parts = (f.read(step) + head).split(b"\n")
        head = parts[0]
        where = pos + len(head) + 1
        starts = []
        for part in parts[1:]:
            starts.append(where)
            where += len(part) + 1
        yield from zip(reversed(starts), reversed(parts[1:]), strict=True)
    yield 0, head


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
