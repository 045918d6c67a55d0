"""Caption output on a terminal: finals as lines, the live partial in place.

On a TTY the current partial is redrawn in place (dim) and replaced by the
final when it lands; elsewhere only finals are printed, one per line, unless
``partials`` is set. With several streams each line names its stream.

Output that cannot be written (a pipe whose reader left, as ``| head`` does;
a full disk) stops the printing: logged once, kept in
:attr:`CaptionPrinter.error` for the caller's exit status, never raised into
the engine.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from .events import CaptionEvent, EngineEvent, StreamError

__all__ = ["CaptionPrinter", "format_time"]

log = logging.getLogger(__name__)

_DIM = "\x1b[2m"
_RESET = "\x1b[0m"
# To the row's start, then clear to the end of the screen: the row, and
# below it transcribe's progress bar (redrawn at its next update), which a
# final wrapping onto it would otherwise leave half covered.
_CLEAR_LINE = "\r\x1b[J"


def format_time(seconds: float) -> str:
    """``m:ss.s`` (or ``h:mm:ss.s``) for a stream position."""
    tenths = round(seconds * 10)
    h, rem = divmod(tenths, 36000)
    m, rem = divmod(rem, 600)
    s = rem / 10
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m}:{s:04.1f}"


class CaptionPrinter:
    """Engine listener that writes captions to a text stream."""

    def __init__(
        self,
        out: TextIO | None = None,
        *,
        show_stream: bool = False,
        partials: bool | None = None,
        live: bool | None = None,
    ) -> None:
        self._out = out if out is not None else sys.stdout
        is_tty = self._out.isatty()
        self._live = is_tty if live is None else live
        self._partials = self._live if partials is None else partials
        self._show_stream = show_stream
        self._partial_shown = False
        self.error: OSError | None = None
        """Why printing stopped (the first failed write), or None."""

    def _prefix(self, ev: CaptionEvent) -> str:
        span = f"[{format_time(ev.start)} → {format_time(ev.end)}]"
        return f"{ev.stream} {span}" if self._show_stream else span

    def __call__(self, event: EngineEvent) -> None:
        if self.error is not None:
            return
        try:
            self._print(event)
        except OSError as e:
            self.error = e
            where = "standard output" if self._out is sys.stdout else "the caption output"
            log.warning("captions are no longer printed: cannot write to %s: %s",
                        where, e.strerror or e)

    def _print(self, event: EngineEvent) -> None:
        if isinstance(event, StreamError):
            self._clear()
            print(f"! {event.stream}: {event.code}: {event.message}", file=self._out, flush=True)
            return
        if not isinstance(event, CaptionEvent):
            return
        if event.final:
            self._clear()
            if event.text:
                print(f"{self._prefix(event)} {event.text}", file=self._out, flush=True)
        elif self._partials and event.text:
            if self._live:
                # Keep the line on one screen row, or the redraw clears only
                # its last row and leaves the rest behind: drop the oldest text.
                prefix = self._prefix(event)
                stable, unstable = _tail(event.stable, event.unstable,
                                         self._columns() - 1 - len(prefix) - 1)
                line = f"{prefix} {stable}{_DIM}{unstable}{_RESET}"
                self._out.write(_CLEAR_LINE + line)
                self._out.flush()
                self._partial_shown = True
            else:
                print(f"{self._prefix(event)} … {event.text}", file=self._out, flush=True)

    def _columns(self) -> int:
        """The terminal's width now (it may be resized), 80 when unknown."""
        try:
            return os.get_terminal_size(self._out.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            return 80

    def _clear(self) -> None:
        if self._partial_shown or self._live:
            self._out.write(_CLEAR_LINE)
            self._partial_shown = False


def _tail(stable: str, unstable: str, room: int) -> tuple[str, str]:
    """The end of ``stable + unstable`` in ``room`` characters, split where the
    unstable part starts; an ellipsis marks text dropped from the front."""
    if len(stable) + len(unstable) <= room:
        return stable, unstable
    keep = max(0, room - 1)
    unstable = unstable[len(unstable) - min(len(unstable), keep):]
    rest = keep - len(unstable)
    return "…" + (stable[len(stable) - rest:] if rest else ""), unstable
