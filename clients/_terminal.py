"""What the command-line clients write to their terminal, whatever its locale.

Under a non-UTF-8 locale (LANG=en_US.ISO-8859-1, or PYTHONIOENCODING=ascii)
stdout encodes strictly, and a caption's ``→``, an end line's ``■``, or a
Chinese word raised UnicodeEncodeError, which ended the client. The engine's
own terminal output writes ``?`` for what the encoding lacks; so do these.
And a client started without stderr (``2>&-``) drops its status lines
(:func:`closed_stderr_dropped`).
"""

from __future__ import annotations

import contextlib
import io
import sys

from evoxtral_stream.startup import fill_closed_descriptors

__all__ = ["closed_stderr_dropped", "lenient_output"]


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
        with contextlib.suppress(OSError):  # no /dev/null to be had: left None
            sys.stderr = open(2, "w", encoding="utf-8", errors="replace",  # noqa: SIM115
                              closefd=False)  # for the process's life


def lenient_output() -> None:
    """Make stdout and stderr write ``?`` for each character their encoding
    lacks, instead of raising. Streams that are no text file (replaced by a
    test, or closed) are left as they are."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")
