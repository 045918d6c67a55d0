"""The journal's file names, and the rules on its files: rotation by size
and by age, retention (pure).

Layout: ``{dir}/{stream}.{index}.{start}.jsonl``, e.g.
``mic.00000003.20250301T120000.250Z.jsonl``: the stream id percent-encoded,
``index`` counting from 1 (the highest is the file being written, the others
are rotated ones, at most ``keep`` of them kept) and ``start`` the UTC time
(``YYYYMMDDTHHMMSS.mmmZ``, wall clock) at which the file was started.
Other names in the folder (``copy of mic.….jsonl``, whose stream part is no
encoded id) are no stream's (:func:`parse_file_name` gives None): ignored,
and named in one warning when first seen by a full scan
(:meth:`~.store.Journal.restore`, :meth:`~.store.Journal.prune`). What a
line of a file holds: :mod:`.records`.

Age rotation: a file is rotated ``max_age_s`` after its ``start``, counted by
the wall clock, so the age holds across a stream's release and re-open and
across restarts (a stream that reconnects hourly still gets its daily file).
The start lives in the name, not in the file: a file is created under its
final name, so no crash can leave one without its start, and the lines stay
records (finals, reservations) for every reader. Clock steps: a start up to
:data:`CLOCK_SLACK_S` ahead of the clock counts as age 0; a start further
ahead (the clock was set back, or ran ahead when the file was started) is not
trusted and the file is rotated at the next final, its successor starting by
the clock as it is now. So a step back delays a rotation by at most the step
(never "until the clock catches up"), and a step forward brings rotations
forward, each file being rotated at most once early; a new file always starts
at the clock's present reading, so no step can make rotation loop. The age
resolution is 1 ms.

Files of older versions, ``{stream}.{index}.jsonl``, recorded no start: they
are read as before, and the current one is renamed, with the time of that
re-open as its start, the first time a final is appended to it (the rename is
atomic and keeps the file's mtime, so retention is not reset). Its age thus
counts from the upgrade, once, and then survives re-opens and restarts like
any other file's. (Versions before this layout ignore the new names.)

Retention: :func:`expired` says when a stream's files, last written at
their mtime, are past ``retention_s``; which wall time the store compares
them with, across clock steps, is its contract (:mod:`.store`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, unquote

__all__ = [
    "CLOCK_SLACK_S",
    "JournalFile",
    "expired",
    "file_age",
    "file_name",
    "parse_file_name",
    "recorded_start",
    "should_rotate",
]

_SUFFIX = ".jsonl"

CLOCK_SLACK_S = 60.0
"""How far ahead of the wall clock a file's start may be and still count as
age 0 (a small step back of the clock); further ahead it is not trusted."""

# {quoted stream}.{index}[.{start}].jsonl; files of older versions lack the
# start. A quoted stream id is ASCII; the last part decides, so any stream id
# (even "x.00000001" or one ending like a start) parses back unambiguously.
_NAME = re.compile(r"(?P<stream>.+)\.(?P<index>[0-9]+)"
                   r"(?:\.(?P<start>[0-9]{8}T[0-9]{6}\.[0-9]{3}Z))?\.jsonl", re.ASCII)
_STAMP = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})T([0-9]{2})([0-9]{2})([0-9]{2})"
                    r"\.([0-9]{3})Z", re.ASCII)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: the name keeps 4 year digits


@dataclass(frozen=True)
class JournalFile:
    """What a journal file's name tells: its stream, index and start.

    ``started`` is wall-clock seconds (ms resolution); None for a file of an
    older version, whose name records no start (or a start that is no date).
    """

    stream: str
    index: int
    started: float | None


def _ms(t: float) -> int:
    """``t`` (wall-clock seconds) as the whole milliseconds a name can hold."""
    if not math.isfinite(t):
        return 0 if t < 0 else _MAX_MS
    # Rounded to 1 µs first, so a start read back from a name maps to itself.
    return min(max(math.floor(round(t * 1000, 3)), 0), _MAX_MS)


def recorded_start(started: float) -> float:
    """The start that :func:`file_name` records for ``started`` and
    :func:`parse_file_name` reads back: floored to the ms (after rounding to
    the µs, so that a recorded start maps to itself), kept in 1970..9999."""
    return _ms(started) / 1000


def file_name(stream: str, index: int, started: float) -> str:
    """``{quoted stream}.{index:08d}.{start}.jsonl``: any stream id gives a safe
    name; ``start`` is ``started`` (wall-clock seconds) as ``YYYYMMDDTHHMMSS.mmmZ``."""
    ms = _ms(started)
    d = _EPOCH + timedelta(milliseconds=ms)
    stamp = (f"{d.year:04d}{d.month:02d}{d.day:02d}T{d.hour:02d}{d.minute:02d}"
             f"{d.second:02d}.{ms % 1000:03d}Z")
    return f"{quote(stream, safe='')}.{index:08d}.{stamp}{_SUFFIX}"


def parse_file_name(name: str) -> JournalFile | None:
    """Inverse of :func:`file_name`, which also reads the names of older
    versions (``{quoted stream}.{index}.jsonl``, ``started`` None); None for
    files that are not the journal's, such as ``copy of mic.….jsonl``: the
    stream part must be a stream id as :func:`file_name` encodes it (every
    version did so), which holds no space, no ``(`` and no ``%`` but in
    ``%XX``."""
    m = _NAME.fullmatch(name)
    if m is None or not m["stream"].isascii():   # quote's output is ASCII
        return None
    stream = unquote(m["stream"])
    if quote(stream, safe="") != m["stream"]:
        return None
    started: float | None = None
    stamp = _STAMP.fullmatch(m["start"] or "")
    if stamp is not None:
        y, mo, d, h, mi, s, ms = (int(x) for x in stamp.groups())
        try:
            when = datetime(y, mo, d, h, mi, s, tzinfo=UTC)
        except ValueError:  # no such date: start unknown, as for an old file
            pass
        else:
            started = ((when - _EPOCH) // timedelta(milliseconds=1) + ms) / 1000
    return JournalFile(stream, int(m["index"]), started)


def file_age(started: float, now: float) -> float:
    """Seconds since a file was started, both by the wall clock.

    A start up to :data:`CLOCK_SLACK_S` ahead of ``now`` (the clock stepped
    back a little) gives 0. A start further ahead is not trusted (the clock
    was set back, or ran ahead when the file was started): infinity, so the
    file is rotated at the next record rather than waiting for the clock to
    catch up, and its successor starts at ``now``, which ends it.
    """
    age = now - started
    if age < -CLOCK_SLACK_S:
        return math.inf
    return max(age, 0.0)


def should_rotate(size: int, incoming: int, age_s: float, max_bytes: int,
                  max_age_s: float) -> bool:
    """Whether to start a new file before writing ``incoming`` bytes.

    ``age_s`` is the file's :func:`file_age`. A file is never rotated while
    empty, so one record larger than ``max_bytes`` still gets written (alone
    in its file), and a clock far off cannot rotate file after file.
    """
    if size == 0:
        return False
    return size + incoming > max_bytes or (max_age_s > 0 and age_s >= max_age_s)


def expired(last_write: float, now: float, retention_s: float) -> bool:
    """Whether a stream last written at ``last_write`` (wall-clock seconds) is
    past its retention at ``now``; ``retention_s = 0`` keeps it forever."""
    return retention_s > 0 and now - last_write >= retention_s
