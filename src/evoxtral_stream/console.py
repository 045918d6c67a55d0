"""Caption output on a terminal: finals as lines, the live partial in place.

On a TTY each stream's current partial is redrawn in place (dim) on a row
of its own, below the finals, and replaced by the stream's final when it
lands (a partial or final with no text, a segment rated no speech, clears
it); the finals and errors of every stream go above all live rows. At most
:data:`MAX_LIVE_ROWS` rows (fewer on a short terminal) are live: past that,
the streams whose partials changed last are shown. Elsewhere, and on a
terminal whose ``TERM`` is ``dumb`` (:func:`redraws`), only finals are
printed, one per line, unless ``partials`` is set. With several streams
each line names its stream. ``NO_COLOR`` drops the dim.

Characters the output's encoding lacks (a non-UTF-8 locale) are written
as ``?``, and the time span's arrow and the ellipsis as ``->`` and ``...``.

Output that cannot be written (a pipe whose reader left, as ``| head`` does;
a full disk) stops the printing: logged once, kept in
:attr:`CaptionPrinter.error` for the caller's exit status, never raised into
the engine. A reader that left is not logged where the caller takes it
(``on_closed``): ``| head`` is no error.

With ``queued`` set (``serve``, where stdout is a side output), lines for
a stream that is not a terminal (journald, docker) are written by a thread
of their own through a bounded queue (:class:`~.writer.QueuedWriter`), so
that a reader that stops reading never stops the engine's event loop.

Log lines and status lines written to a terminal go through
:func:`above_captions` (:class:`TerminalLogHandler` does for log records):
the live partials' rows, and transcribe's progress bar below them, are
cleared first and the partials redrawn after, so a line from another thread never
lands inside a caption row.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TextIO

from .events import CaptionEvent, EngineEvent, StreamEnded, StreamError
from .text.chars import CONTROL, display_width, drop_hidden, graphemes, mend_surrogates
from .writer import EXIT_WAIT_S, QueuedWriter

__all__ = ["MAX_LIVE_ROWS", "PRINT_QUEUE_CHARS", "PRINT_QUEUE_LINES", "CaptionPrinter",
           "LiveRows", "TerminalLogHandler", "above_captions", "clip_columns",
           "format_time", "printable", "redraws", "text_columns"]

#: The most live partial rows a printer draws at once, one per stream.
MAX_LIVE_ROWS = 8

#: The most lines a queued :class:`CaptionPrinter` holds for its writer...
PRINT_QUEUE_LINES = 10_000
#: ... and the most characters they may take together.
PRINT_QUEUE_CHARS = 8 * 1024 * 1024

log = logging.getLogger(__name__)

_DIM = "\x1b[2m"
_RESET = "\x1b[0m"
# To the row's start, then clear to the end of the screen: the row, and
# below it transcribe's progress bar (redrawn at its next update), which a
# final wrapping onto it would otherwise leave half covered.
_CLEAR_LINE = "\r\x1b[J"

# One writer on the terminal at a time: printers are called on the engine's
# thread, log records come from any thread.
_TERMINAL = threading.RLock()
# The printers redrawing a live row now (weak: a printer dropped leaves).
_LIVE: weakref.WeakSet[CaptionPrinter] = weakref.WeakSet()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, AttributeError):   # closed, or not a file
        return False


def redraws(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal that moves its cursor: a TTY whose
    ``TERM`` is not ``dumb`` (Emacs' shell buffer, some CI consoles, where
    a redraw, a colour or a progress bar shows as escape codes and stacked
    rows). Only such a terminal gets the live partial and the bar."""
    return _isatty(stream) and os.environ.get("TERM") != "dumb"


def _styles() -> tuple[str, str]:
    """The dim style of a partial's words not yet stable, and its reset:
    none when ``NO_COLOR`` is set and not empty (no-color.org)."""
    return ("", "") if os.environ.get("NO_COLOR") else (_DIM, _RESET)


@contextlib.contextmanager
def above_captions(stream: TextIO, *, clear_below: bool = True) -> Iterator[None]:
    """Write lines to ``stream`` inside this block above the live captions.

    On a terminal, each live printer's partial row (and whatever is below it:
    transcribe's progress bar, redrawn at its next update) is cleared before
    the block and the partial redrawn after. Elsewhere it only serialises.
    ``clear_below=False``: nothing is written to ``stream`` itself (the live
    rows are the printers' own streams'), for lines that must be all there
    is on it: JSON log lines, where no progress bar is drawn.
    """
    with _TERMINAL:
        if not redraws(stream):
            yield
            return
        live = list(_LIVE)
        for printer in live:
            printer._hide()
        if clear_below:
            with contextlib.suppress(OSError, ValueError):
                stream.write(_CLEAR_LINE)   # a progress bar with no printer
        try:
            yield
        finally:
            for printer in live:
                printer._show()


class TerminalLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A :class:`logging.StreamHandler` whose records go :func:`above_captions`.

    ``clear_below`` is that function's: false for JSON lines, which no
    progress bar shares a terminal with and which nothing else may precede.

    It writes to a duplicate of ``stream``'s descriptor where it has one
    (:func:`_own_copy`), as :class:`~.logs.QueuedLogHandler` does: while an
    MP3's block decodes, descriptor 2 is caught for its decoder's prints
    (:class:`~.audio.filereader.FilePass`), and a record another thread
    logged on it then (a file decoded on a worker thread, found damaged)
    was taken for the decoder's, a DEBUG record.
    """

    clear_below = True

    def __init__(self, stream: TextIO) -> None:
        super().__init__(_own_copy(stream))

    def emit(self, record: logging.LogRecord) -> None:
        with above_captions(self.stream, clear_below=self.clear_below):
            super().emit(record)


def _own_copy(stream: TextIO) -> TextIO:
    """``stream`` on a duplicate of its descriptor, flushed at each line;
    ``stream`` itself where it has none (an in-memory one) or none is left."""
    try:
        fd = os.dup(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return stream
    return open(fd, "w", encoding=getattr(stream, "encoding", None) or "utf-8",
                errors=getattr(stream, "errors", None) or "backslashreplace", buffering=1)


def format_time(seconds: float) -> str:
    """``m:ss.s`` (or ``h:mm:ss.s``) for a stream position."""
    tenths = round(seconds * 10)
    h, rem = divmod(tenths, 36000)
    m, rem = divmod(rem, 600)
    s = rem / 10
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m}:{s:04.1f}"


class CaptionPrinter:
    """Engine listener that writes captions to a text stream.

    ``show_stream``: every line names its stream. Else, with ``own`` set,
    the lines of that stream are unnamed and any other stream's name theirs
    (serve's own source beside streams clients send). ``on_closed`` is
    called once, instead of the warning, when the output's reader has left
    (a broken pipe).

    ``queued``: off a terminal, the lines go to ``out``'s file descriptor
    through a queue of at most :data:`PRINT_QUEUE_LINES` lines
    (:data:`PRINT_QUEUE_CHARS` characters) and a writer thread, never
    blocking the caller. Overflow: the new line is dropped and counted, and
    once the writer gets through again it writes the line ``! N caption
    lines dropped: standard output's reader fell behind`` where they would
    have been. :meth:`flush` waits for the queue at most
    :data:`~.writer.EXIT_WAIT_S` seconds. A write the writer could not do
    stops the printing at the next line (or at :meth:`flush`), as a failed
    write does.
    """

    def __init__(
        self,
        out: TextIO | None = None,
        *,
        show_stream: bool = False,
        own: str | None = None,
        partials: bool | None = None,
        live: bool | None = None,
        on_closed: Callable[[], None] | None = None,
        queued: bool = False,
    ) -> None:
        self._out = out if out is not None else sys.stdout
        is_tty = self._out.isatty()
        self._queue: QueuedWriter | None = None
        # Read at construction, so that a test can make it small beforehand.
        self._queue_lines = PRINT_QUEUE_LINES
        # No descriptor (an in-memory stream) or no thread: written directly.
        with contextlib.suppress(OSError, ValueError, RuntimeError, AttributeError):
            if queued and not is_tty:
                self._queue = QueuedWriter(self._out, name="caption-writer",
                                           max_chars=PRINT_QUEUE_CHARS, exit_wait=EXIT_WAIT_S,
                                           dropped_line=_dropped_captions)
        self._live = redraws(self._out) if live is None else live
        self._dim, self._reset = _styles()
        self._partials = self._live if partials is None else partials
        self._show_stream = show_stream
        self._own = own
        self._rows = LiveRows()
        self.error: OSError | None = None
        """Why printing stopped (the first failed write), or None."""
        self._error_logged = False
        self._on_closed = on_closed
        self._encoding = getattr(self._out, "encoding", None) or "utf-8"
        self._arrow = self._encodable("→", "->")
        self._ellipsis = self._encodable("…", "...")
        if self._live:
            _LIVE.add(self)

    def _encodable(self, text: str, fallback: str | None = None) -> str:
        """``text``, or where the output's encoding lacks some of its
        characters (a Latin-1 locale's strict stdout would raise),
        ``fallback``, else ``text`` with each of those as ``?``."""
        try:
            text.encode(self._encoding)
        except UnicodeEncodeError:
            if fallback is not None:
                return fallback
            return text.encode(self._encoding, "replace").decode(self._encoding)
        except LookupError:   # an encoding Python does not know: as it comes
            pass
        return text

    def _name(self, ev: CaptionEvent) -> str | None:
        """The stream's name as its lines show it, or None: unnamed."""
        if not (self._show_stream or (self._own is not None and ev.stream != self._own)):
            return None
        # A stream id is the ingest client's choice: the engine refuses
        # control characters in it, not the other characters printable drops.
        return self._encodable(printable(ev.stream))

    def _prefix(self, ev: CaptionEvent) -> str:
        span = f"[{format_time(ev.start)} {self._arrow} {format_time(ev.end)}]"
        name = self._name(ev)
        return span if name is None else f"{name} {span}"

    def __call__(self, event: EngineEvent) -> None:
        with _TERMINAL:
            if self.error is None:
                try:
                    self._print(event)
                except OSError as e:
                    self._stop(e)
        self._say_stopped()

    def _say_stopped(self) -> None:
        """Log once why the printing stopped (or call ``on_closed``).
        Outside the terminal lock: a log handler holds its own lock while it
        takes the terminal's, so logging under it could deadlock."""
        if self.error is not None and not self._error_logged:
            self._error_logged = True
            if isinstance(self.error, BrokenPipeError) and self._on_closed is not None:
                self._on_closed()
                return
            where = "standard output" if self._out is sys.stdout else "the caption output"
            log.warning("captions are no longer printed: cannot write to %s: %s",
                        where, self.error.strerror or self.error)

    def flush(self) -> None:
        """Wait until the lines queued are written, at most
        :data:`~.writer.EXIT_WAIT_S` seconds in all (``queued``; else at once).
        A line the writer could not write stops the printing here, as at the
        next line: the last lines lost are said too."""
        if self._queue is not None:
            self._queue.flush()
            with _TERMINAL:
                if self.error is None and self._queue.error is not None:
                    self._stop(self._queue.error)
            self._say_stopped()

    def _line(self, text: str) -> None:
        """Print ``text`` as a line, through the queue when there is one."""
        if self._queue is None:
            print(text, file=self._out, flush=True)
        elif self._queue.error is not None:
            raise self._queue.error   # stops the printing, as a failed print
        else:
            self._queue.put(text + "\n", self._queue_lines)

    def _stop(self, e: OSError) -> None:
        """Stop printing; :meth:`__call__` logs why."""
        self.error = e
        _LIVE.discard(self)

    def _hide(self) -> None:
        """Clear the live rows for a line from elsewhere (:func:`above_captions`)."""
        if self.error is None and self._rows.shown:
            try:
                self._out.write(self._rows.erase())
                self._out.flush()
            except OSError as e:
                self._stop(e)

    def _show(self) -> None:
        """Draw the live partials again after :meth:`_hide`."""
        if self.error is None and self._rows:
            try:
                self._out.write(self._rows.draw(self._lines()))
                self._out.flush()
            except OSError as e:
                self._stop(e)

    def _print(self, event: EngineEvent) -> None:
        if isinstance(event, StreamError):
            self._above(self._encodable(
                printable(f"! {event.stream}: {event.code}: {event.message}")), event.stream)
            return
        if isinstance(event, StreamEnded):
            # Every final of it came: a row left would stay for good.
            self._above(None, event.stream)
            return
        if not isinstance(event, CaptionEvent):
            return
        if event.final:
            self._above(f"{self._prefix(event)} {self._encodable(event.text)}"
                        if event.text else None, event.stream)
        elif self._partials and not event.text:
            # The segment's text is gone (Whisper rated it no speech): what
            # its earlier partial showed is no longer what it says.
            if self._live and event.stream in self._rows:
                self._redraw(event.stream, None)
        elif self._partials:
            if self._live:
                # Keep the line on one screen row, or the redraw clears only
                # its last row and leaves the rest behind: drop the oldest
                # text, and on a narrow terminal the span and the name too.
                room = self._columns() - 1
                prefix = _fit_prefix(self._prefix(event), self._name(event), room,
                                     self._ellipsis)
                sep = " " if prefix else ""
                stable, unstable = _tail(self._encodable(event.stable),
                                         self._encodable(event.unstable),
                                         room - text_columns(prefix + sep), self._ellipsis)
                self._redraw(event.stream,
                             f"{prefix}{sep}{stable}{self._dim}{unstable}{self._reset}")
            else:
                self._line(f"{self._prefix(event)} {self._ellipsis} "
                           f"{self._encodable(event.text)}")

    def _redraw(self, stream: str, row: str | None) -> None:
        """Set ``stream``'s live row to ``row`` (None: remove it) and draw
        the rows again."""
        self._rows.set(stream, row)
        self._out.write(self._rows.erase() + self._rows.draw(self._lines()))
        self._out.flush()

    def _above(self, text: str | None, stream: str) -> None:
        """Print ``text`` (None: nothing) for ``stream``: its own partial's
        row goes (the line replaces it), the other streams' rows are drawn
        again below the line."""
        if not self._live:
            if text is not None:
                self._line(text)
            return
        if text is None and stream not in self._rows:
            return
        self._rows.set(stream, None)
        self._out.write(self._rows.erase())
        if text is not None:
            self._line(text)
        self._out.write(self._rows.draw(self._lines()))
        self._out.flush()

    def _columns(self) -> int:
        """The terminal's width now (it may be resized), 80 when unknown."""
        try:
            return os.get_terminal_size(self._out.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            return 80

    def _lines(self) -> int:
        """The terminal's height now, 24 when unknown."""
        try:
            return os.get_terminal_size(self._out.fileno()).lines or 24
        except (OSError, ValueError, AttributeError):
            return 24


class LiveRows:
    """The live partial rows on a terminal, one per stream, and the text
    that erases and draws them; it writes nothing itself.

    The rows keep the order their streams' rows appeared in (a row keeps its
    place while its stream speaks). :meth:`draw` writes them from the cursor
    (at a cleared row's start) and leaves it at the last one's end;
    :meth:`erase` goes back to the first one's start and clears to the end
    of the screen. Of more rows than fit (:data:`MAX_LIVE_ROWS`, or the
    terminal's height less two), those that changed last are drawn.
    """

    def __init__(self) -> None:
        self._rows: dict[object, str] = {}
        self._changed: dict[object, int] = {}
        self._changes = 0
        self.shown = 0
        """How many rows are on the screen now."""

    def __contains__(self, stream: object) -> bool:
        return stream in self._rows

    def __bool__(self) -> bool:
        return bool(self._rows)

    def set(self, stream: object, row: str | None) -> None:
        """Set ``stream``'s row to ``row``; None removes it."""
        if row is None:
            self._rows.pop(stream, None)
            self._changed.pop(stream, None)
            return
        self._rows[stream] = row
        self._changes += 1
        self._changed[stream] = self._changes

    def clear(self) -> None:
        """Remove every row (after :meth:`erase`, nothing is drawn)."""
        self._rows.clear()
        self._changed.clear()

    def erase(self) -> str:
        """What clears the rows shown (and all below them: a progress bar)."""
        up = f"\x1b[{self.shown - 1}A" if self.shown > 1 else ""
        self.shown = 0
        return "\r" + up + "\x1b[J"

    def draw(self, lines: int) -> str:
        """What draws the rows on a terminal ``lines`` high."""
        room = max(1, min(MAX_LIVE_ROWS, lines - 2))
        shown = set(sorted(self._rows, key=self._changed.__getitem__)[-room:])
        rows = [row for stream, row in self._rows.items() if stream in shown]
        self.shown = len(rows)
        # CR too: a terminal whose output is raw (no LF to CR LF) starts
        # each row at its start all the same.
        return "\r\n".join(rows)


def _dropped_captions(n: int) -> str:
    return f"! {n} caption lines dropped: standard output's reader fell behind\n"


def text_columns(text: str) -> int:
    """The columns ``text`` takes on a terminal, counted per user-perceived
    character as subtitles count them (:func:`~.text.chars.display_width`):
    East Asian wide characters and an emoji shown as one (VS16 ``❤️``, a
    ZWJ sequence, a flag) two, combining marks none. Counted per code point,
    a VS16 emoji took one and a row of them wrapped."""
    return display_width(text)


# Control characters (C0, DEL, C1): written as they came, ESC would start an
# escape sequence and a line break or backspace would break a one-row line.
_CONTROL = re.compile(f"[{CONTROL}]")


def printable(text: str) -> str:
    """``text`` with each control character (C0, DEL, C1) as a space, no bidi
    control or other invisible format character (all of Unicode's Cf but
    ZWNJ and ZWJ: they would reorder or hide what is shown) and each lone
    surrogate as U+FFFD, for a terminal or a log line (a caption's text
    may hold controls: a model's byte tokens; text from another server, or
    decoded with ``surrogateescape``, surrogates). The rules are
    :mod:`evoxtral_stream.text.chars`'s, which the tokenizer applies to
    every caption."""
    return mend_surrogates(drop_hidden(_CONTROL.sub(" ", text)))


def clip_columns(text: str, columns: int, ellipsis: str = "…") -> str:
    """``text``, or its longest start that fits in ``columns`` terminal
    columns (:func:`text_columns`) with ``ellipsis`` after it, when it
    takes more than ``columns``. It is cut between user-perceived
    characters (:func:`~.text.chars.graphemes`): a letter keeps its marks
    (a Hindi vowel sign, a virama, an accent) or goes with them."""
    if text_columns(text) <= columns:
        return text
    room = columns - text_columns(ellipsis)
    used, kept = 0, []
    for g in graphemes(text):
        if (used := used + text_columns(g)) > room:
            break
        kept.append(g)
    return "".join(kept) + ellipsis


#: The fewest columns a live partial's words get before its time span, then
#: its stream's name, give way (:func:`_fit_prefix`).
_MIN_WORDS = 12


def _fit_prefix(prefix: str, name: str | None, room: int, ellipsis: str) -> str:
    """``prefix``, or where it leaves the words fewer than :data:`_MIN_WORDS`
    of the row's ``room`` columns, the stream's ``name`` alone, clipped to
    leave them that many (none when unnamed, or too narrow for 3 columns)."""
    if text_columns(prefix) + 1 + _MIN_WORDS <= room:
        return prefix
    keep = room - 1 - _MIN_WORDS
    if name is None or keep < 3:
        return ""
    return clip_columns(name, keep, ellipsis)


def _suffix(text: str, columns: int) -> str:
    """The longest end of ``text`` that fits in ``columns``, cut between
    user-perceived characters: the marks of a letter cut away (हूँ's, of
    क्योंकि) go with it, or they would be drawn on what comes before."""
    used, kept = 0, []
    for g in reversed(graphemes(text)):
        if (used := used + text_columns(g)) > columns:
            break
        kept.append(g)
    return "".join(reversed(kept))


def _tail(stable: str, unstable: str, room: int, ellipsis: str = "…") -> tuple[str, str]:
    """The end of ``stable + unstable`` in ``room`` columns, split where the
    unstable part starts; ``ellipsis`` marks text dropped from the front."""
    if text_columns(stable) + text_columns(unstable) <= room:
        return stable, unstable
    keep = max(0, room - text_columns(ellipsis))
    unstable = _suffix(unstable, keep)
    rest = keep - text_columns(unstable)
    return ellipsis + (_suffix(stable, rest) if rest > 0 else ""), unstable
