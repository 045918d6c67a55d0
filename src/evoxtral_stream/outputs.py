"""Output files written while the engine runs: ``transcribe``'s ``--jsonl``,
``--srt`` and ``--vtt``; and :func:`write_file`, how the commands that write
a result at the end (``subtitles``, ``eval --json``) write it.

Engine listeners (called on the event loop; they never raise): each writes
what an event settles as the event is emitted, so a process killed outright
(``kill -9``, the out-of-memory killer) leaves on disk everything emitted
until then, and nothing of the run is held in memory.

- :class:`JsonlFile`: every event, one JSON line each, each line handed to
  the OS in one write as its event is emitted: a crash leaves whole lines.
  Removed while written, it is a failed write when it is closed.
- :class:`SubtitleFiles`: each stream's SRT or WebVTT goes to ``PATH.part``
  beside its target, a cue at a time once nothing can change it
  (:class:`~.text.formats.SubtitleWriter`); when the stream ends the rest
  is written and the file renamed to its target (taking the permissions of
  the file it replaces), which therefore only ever holds a complete file:
  the same bytes :func:`~.text.formats.to_srt` and
  :func:`~.text.formats.to_vtt` give for all the stream's finals.

A failed write (a full disk) stops that file and is kept in ``error`` for
the caller to report; the others go on. A subtitle file's ``.part`` file is
then removed (its target left as it was), unless it is no longer this run's.
One into stdout whose reader left
(``--jsonl /dev/stdout | head``) is no error (:func:`stdout_closed`) and is
not warned of; ``/dev/stdout`` with stdout closed (``>&-``) cannot be
opened (EBADF), descriptor 1 being another file then. Nothing is synced to
disk before a file is closed: after a power loss a file holds what the system had
written out (a last JSON line may be cut short; ``subtitles`` skips it).

A ``.part`` file is created anew (one left there by a killed run, or a
link, is removed first, never written through). It is renamed only while it
is still the one this run made: one removed or replaced meanwhile (another
run writing the same target) is a failed write, the target left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .events import CaptionEvent, EngineEvent, StreamEnded
from .server.protocol import event_to_dict
from .text.formats import SubtitleWriter

__all__ = ["JsonlFile", "SubtitleFiles", "is_stdout", "part_path", "stdout_closed",
           "write_file"]

log = logging.getLogger(__name__)


def is_stdout(path: Path) -> bool:
    """Whether ``path`` names the file standard output writes to
    (``/dev/stdout``, the file it was redirected to; links followed)."""
    try:
        out, st = os.fstat(sys.stdout.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError):  # none there, stdout closed
        return False
    return (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino)


#: The names of descriptor 1 itself (``-`` for an output is /dev/stdout).
_FD1_NAMES = frozenset({"/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"})


def _names_closed_stdout(path: Path) -> bool:
    """Whether ``path`` names descriptor 1 while standard output was closed
    at start (``>&-``: Python has no ``sys.stdout``, the CLI's stand-in's
    descriptor is EBADF): descriptor 1 is whatever the process opened next
    (the log writer's copy of stderr), no output's, so writing it would
    write, or replace, that file."""
    if os.path.abspath(path) not in _FD1_NAMES:
        return False
    try:
        sys.stdout.fileno()
    except AttributeError:  # None
        return True
    except OSError as e:  # not one without a descriptor (a test's capture: no errno)
        return e.errno == errno.EBADF
    except ValueError:  # a closed file object, not a closed descriptor
        return False
    return False


def _refuse_closed_stdout(path: Path) -> None:
    if _names_closed_stdout(path):
        raise OSError(errno.EBADF, "standard output is closed", str(path))


def stdout_closed(path: Path, error: OSError) -> bool:
    """Whether ``error``, writing ``path``, says stdout's reader left (as
    ``| head`` does): no error, as for printed captions."""
    return isinstance(error, BrokenPipeError) and is_stdout(path)


def part_path(target: Path) -> Path | None:
    """Where a subtitle file is written until its stream ends, to be renamed
    to the file ``target`` names (a symbolic link is followed: the file it
    names is replaced, the link kept). None: ``target`` is written in place,
    being no regular file (a device such as ``/dev/stdout``, a FIFO), which
    a rename would replace, or standard output's own file (``-`` redirected
    to a file, appended to or not), written through stdout."""
    if _names_closed_stdout(target):  # refused in place (_open), never renamed over
        return None
    # stat, following links: /dev/stdout into a pipe links to
    # "/proc/PID/fd/pipe:[N]", a name realpath cannot follow.
    try:
        mode: int | None = target.stat().st_mode
    except (OSError, ValueError):  # none there yet, a symlink loop, a NUL
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        return None
    if is_stdout(target):  # `-` into a file: written through stdout (_open)
        return None
    # realpath: Path.resolve raises RuntimeError on a symlink loop before 3.13.
    # os.path.islink: Path.is_symlink raises on a name too long (Python 3.11).
    real = Path(os.path.realpath(target)) if os.path.islink(target) else target
    return real.with_name(real.name + ".part")


def _open(path: Path) -> BinaryIO:
    # Unbuffered: each write is one write(2), whole once it returns.
    _refuse_closed_stdout(path)
    if is_stdout(path):
        # Through stdout's own descriptor: opened anew, the file stdout is
        # redirected to would be emptied (what `>>` or the shell put there
        # before lost) and written from its start.
        return os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    return open(path, "wb", buffering=0)


def _create(part: Path) -> BinaryIO:
    """``part`` opened as :func:`_open` does, made new: through a link (a
    stale ``.part`` may be one) the write would go to the file it names, and
    the rename would then put the link in the target's place."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(part)
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    return os.fdopen(fd, "wb", buffering=0)


def _rename_done(part: Path) -> None:
    """Rename the complete ``part`` onto the file it was written for."""
    done = part.with_name(part.name.removesuffix(".part"))
    _keep_mode(part, done)
    os.replace(part, done)


def _check_own(part: Path, f: BinaryIO) -> None:
    """Raise :class:`OSError` unless ``part`` is still the file ``f`` writes:
    one removed (by hand, with its folder) or replaced (another run writing
    the same target removes the ``.part`` it finds) must not be renamed, or
    the target would get whatever is there now, a file no run finished."""
    own = os.fstat(f.fileno())
    try:
        now = os.lstat(part)
    except OSError:  # gone, or its folder gone or made a file
        now = None
    if now is None or (now.st_dev, now.st_ino) != (own.st_dev, own.st_ino):
        raise OSError(errno.ENOENT, f"{part} was removed or replaced while it was written",
                      str(part))


def write_file(target: Path, data: bytes) -> None:
    """Make ``target`` hold ``data``, whole or not at all: written to its
    ``.part`` file (:func:`part_path`), synced to disk, then renamed onto it
    (taking the permissions of the file it replaces). When that fails (a
    full disk, Ctrl-C) the ``.part`` file is removed and ``target`` is as it
    was. A target that is no regular file (``/dev/stdout``) is written in
    place. Raises :class:`OSError`."""
    part = part_path(target)
    f = _open(target) if part is None else _create(part)
    try:
        _write_all(f, data)
        _close(f)
        if part is not None:
            _rename_done(part)
    except BaseException:
        # What failed before is what is reported.
        with contextlib.suppress(OSError):
            f.close()
        if part is not None:
            with contextlib.suppress(OSError):
                os.unlink(part)
        raise


def _write_all(f: BinaryIO, data: bytes) -> None:
    """Write all of ``data``: an unbuffered write may take only part (a
    disk filling up); the next attempt then raises."""
    view = memoryview(data)
    while view:
        n = f.write(view)
        if not n:
            raise OSError(errno.EIO, "the file took nothing")
        view = view[n:]


def _keep_mode(part: Path, target: Path) -> None:
    """Give ``part`` the permissions of the file it is about to replace, as
    an editor saving it would: a rename would otherwise replace a file made
    readable to a group (say, a web server's) with one the umask made."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(part, stat.S_IMODE(target.stat().st_mode))


def _close(f: BinaryIO) -> None:
    try:
        os.fsync(f.fileno())
    except OSError as e:
        # A terminal, pipe or device has nothing to sync.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EROFS):
            f.close()
            raise
    f.close()


class JsonlFile:
    """Every event as a protocol v1 JSON line in ``path`` (created now,
    replacing a file there), written as it is emitted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: OSError | None = None
        self._f: BinaryIO | None = _open(path)

    def __call__(self, event: EngineEvent) -> None:
        if self._f is None:
            return
        line = json.dumps(event_to_dict(event), ensure_ascii=False) + "\n"
        try:
            _write_all(self._f, line.encode("utf-8"))
        except OSError as e:
            self._fail(e)

    def close(self) -> None:
        """Close the file; a failure is kept in ``error``. One removed while
        written (by hand, or with its folder) is one: its events are lost."""
        if self._f is None:
            return
        f, self._f = self._f, None
        try:
            removed = os.fstat(f.fileno()).st_nlink == 0
        except OSError:
            removed = False  # the close below says what is wrong, if anything
        try:
            _close(f)
        except OSError as e:
            self.error = self.error or e
        if removed and self.error is None:
            self.error = OSError(errno.ENOENT, "it was removed while it was written",
                                 str(self.path))

    def _fail(self, e: OSError) -> None:
        self.error = e
        if not stdout_closed(self.path, e):
            log.warning("%s is no longer written: %s", self.path, e.strerror or e)
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(OSError):  # the write already failed; that is what is reported
                f.close()


@dataclass
class _Subtitles:
    stream: str
    target: Path
    writer: SubtitleWriter
    file: BinaryIO | None
    part: Path | None = None
    """Where it is written until its stream ends (None: in place)."""
    own: tuple[int, int] | None = None
    """``part``'s device and inode as created: what a failure may remove."""


class SubtitleFiles:
    """The SRT and WebVTT files of streams: ``(stream, target, writer)``
    each (see the module doc). Every ``.part`` file is created now."""

    def __init__(self, files: list[tuple[str, Path, SubtitleWriter]]) -> None:
        """Raises :class:`OSError` when one cannot be created, the
        ``.part`` files created before it removed (:meth:`discard`)."""
        self.errors: list[tuple[Path, OSError]] = []
        """Each file that failed (its target), in order."""
        self._subs: list[_Subtitles] = []
        try:
            for stream, target, writer in files:
                sub = _Subtitles(stream, target, writer, None, part_path(target))
                sub.file = _open(target) if sub.part is None else _create(sub.part)
                st = os.fstat(sub.file.fileno())
                sub.own = (st.st_dev, st.st_ino)
                self._subs.append(sub)
                self._write(sub, writer.header())
        except OSError:
            self.discard()
            raise

    @property
    def error(self) -> tuple[Path, OSError] | None:
        """The first file that failed (its target), or None."""
        return self.errors[0] if self.errors else None

    def __call__(self, event: EngineEvent) -> None:
        if isinstance(event, CaptionEvent) and event.final:
            for sub in self._subs:
                if sub.stream == event.stream and sub.file is not None:
                    self._write(sub, sub.writer.add(event))
        elif isinstance(event, StreamEnded):
            for sub in self._subs:
                if sub.stream == event.stream:
                    self._complete(sub, event.duration_s)

    def close(self, *, complete: bool) -> None:
        """Close every file still open: ``complete`` finishes each (its
        stream's end unknown) and renames it to its target, else it is
        left as ``.part``."""
        for sub in self._subs:
            if complete:
                self._complete(sub, None)
            elif sub.file is not None:
                f, sub.file = sub.file, None
                with contextlib.suppress(OSError):  # left as .part anyway
                    f.close()

    def discard(self) -> None:
        """Close every file still open and remove its ``.part`` file: for a
        run that ends before any audio (another output could not be
        created), which would leave only headers behind."""
        for sub in self._subs:
            if sub.file is None:
                continue
            f, sub.file = sub.file, None
            with contextlib.suppress(OSError):  # removed anyway
                f.close()
            if sub.part is not None:
                with contextlib.suppress(OSError):  # gone already
                    os.unlink(sub.part)

    def _write(self, sub: _Subtitles, text: str) -> None:
        if not text or sub.file is None:
            return
        try:
            _write_all(sub.file, text.encode("utf-8"))
        except OSError as e:
            self._fail(sub, e)

    def _complete(self, sub: _Subtitles, until: float | None) -> None:
        if sub.file is None:
            return
        self._write(sub, sub.writer.finish(until))
        if sub.file is None:
            return
        if sub.part is not None:
            try:
                _check_own(sub.part, sub.file)
            except OSError as e:
                self._fail(sub, e, remove=False)  # another's, or gone
                return
        f, sub.file = sub.file, None
        try:
            _close(f)
            if sub.part is not None:
                _rename_done(sub.part)
        except OSError as e:
            self._fail(sub, e)

    def _fail(self, sub: _Subtitles, e: OSError, *, remove: bool = True) -> None:
        """Stop ``sub`` for ``e``; ``remove`` its ``.part`` file, cut short,
        while it is still the one this run made (never another run's)."""
        self.errors.append((sub.target, e))
        if not stdout_closed(sub.target, e):
            log.warning("%s is no longer written: %s", sub.target, e.strerror or e)
        f, sub.file = sub.file, None
        if f is not None:
            with contextlib.suppress(OSError):  # the write already failed; that is what is reported
                f.close()
        if remove and sub.part is not None:
            with contextlib.suppress(OSError):  # gone already: nothing to remove
                now = os.lstat(sub.part)
                if (now.st_dev, now.st_ino) == sub.own:
                    os.unlink(sub.part)
