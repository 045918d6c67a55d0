"""Captions on a terminal: a real pseudo-terminal, its width set as a user's."""

from __future__ import annotations

import fcntl
import os
import re
import struct
import termios

from evoxtral_stream.console import CaptionPrinter
from evoxtral_stream.events import CaptionEvent

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _partial(stable: str, unstable: str) -> CaptionEvent:
    text = stable + unstable
    return CaptionEvent("s", 0, 1, False, text, text, stable, unstable, (), 0.0, 9.5, None)


def test_a_live_partial_fits_the_terminal_row_so_its_redraw_leaves_nothing_behind() -> None:
    """On an 80-column terminal each redraw of the growing partial is at most
    79 characters: the clear-line that redraws it clears one row only. The
    partial used to be cut at 150 characters, so on a usual terminal it
    wrapped and every redraw left its first rows on the screen."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    os.set_blocking(master, False)
    written = b""

    def drain() -> None:   # read as it goes: a full pty buffer would block the writes
        nonlocal written
        while True:
            try:
                written += os.read(master, 65536)
            except BlockingIOError:
                return

    with open(slave, "w", encoding="utf-8") as tty:
        printer = CaptionPrinter(tty)
        sentence = ("the committee met on Tuesday to discuss the budget and several members "
                    "raised concerns about the timeline")
        words = sentence.split()
        for n in range(1, len(words) + 1):
            printer(_partial(" ".join(words[:n - 1]) + " ", words[n - 1]))
            drain()
        printer(_partial("x" * 10, "y" * 200))   # an unstable tail longer than the row
        drain()
    os.close(master)
    redraws = [_ANSI.sub("", r) for r in written.decode().split("\r\x1b[2K") if r]
    assert len(redraws) == len(words) + 1
    assert max(len(r) for r in redraws) <= 79, max(redraws, key=len)
    assert redraws[-2].endswith("about the timeline")   # the newest words are kept
    assert redraws[-2].split("] ", 1)[1].startswith("…")
    assert redraws[-1].endswith("y" * 40)
