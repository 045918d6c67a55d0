"""What the command-line clients write to their terminal, whatever its locale.

Under a non-UTF-8 locale (LANG=en_US.ISO-8859-1, or PYTHONIOENCODING=ascii)
stdout encodes strictly, and a caption's ``→``, an end line's ``■``, or a
Chinese word raised UnicodeEncodeError, which ended the client. The engine's
own terminal output writes ``?`` for what the encoding lacks; so do these.
And a client started without stderr (``2>&-``) drops its status lines
(:func:`closed_stderr_dropped`); one started without stdout (``>&-``) drops
what it prints there beside its work (:func:`closed_stdout_dropped`), or
refuses to start where that is its work (:func:`closed_stdout_refused`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from typing import TextIO

from evoxtral_stream.startup import fill_closed_descriptors

__all__ = ["closed_stderr_dropped", "closed_stdout_dropped", "closed_stdout_refused",
           "lenient_output"]


def closed_stderr_dropped() -> None:
    """First thing in a client: descriptors 0-2 it was started without are
    /dev/null (:func:`~evoxtral_stream.startup.fill_closed_descriptors`),
    and a stderr Python found closed (None) writes there: the status and
    error lines are dropped, as the caller asked, where viewer.py and
    mic_client.py ended at the first one (AttributeError) and print() put
    tts_bridge.py's on stdout. ``sys.__stderr__`` stays None: the process
    still knows it has none. A closed stdin or stdout stays None."""
    fill_closed_descriptors()
    if sys.stderr is None:
        sys.stderr = _writer(2)


def closed_stdout_dropped() -> None:
    """For a client whose printed captions are a side output
    (mic_client.py streaming): a stdout Python found closed (None) writes
    to descriptor 1, /dev/null since :func:`closed_stderr_dropped`; the
    captions are dropped, as the caller asked, as serve drops its own."""
    if sys.stdout is None:
        sys.stdout = _writer(1)


def closed_stdout_refused(parser: argparse.ArgumentParser, what: str) -> None:
    """For a client whose stdout is what it is for (viewer.py's captions):
    started with it closed (``>&-``: Python's stdout None), one error line
    saying ``what`` has nowhere to go, and status 2, as the commands say of
    an output they cannot write."""
    if sys.stdout is None:
        parser.exit(2, f"{parser.prog}: error: standard output is closed: {what} "
                       "(>/dev/null drops them)\n")


def _writer(fd: int) -> TextIO | None:
    """A text stream on ``fd`` for the process's life; None where there is
    no /dev/null to be had (the descriptor left closed)."""
    with contextlib.suppress(OSError):
        return open(fd, "w", encoding="utf-8", errors="replace", closefd=False)
    return None


def lenient_output() -> None:
    """Make stdout and stderr write ``?`` for each character their encoding
    lacks, instead of raising. Streams that are no text file (replaced by a
    test, or closed) are left as they are."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")
