"""What the command-line clients write to their terminal, whatever its locale.

Under a non-UTF-8 locale (LANG=en_US.ISO-8859-1, or PYTHONIOENCODING=ascii)
stdout encodes strictly, and a caption's ``→``, an end line's ``■``, or a
Chinese word raised UnicodeEncodeError, which ended the client. The engine's
own terminal output writes ``?`` for what the encoding lacks; so do these.
"""

from __future__ import annotations

import io
import sys

__all__ = ["lenient_output"]


def lenient_output() -> None:
    """Make stdout and stderr write ``?`` for each character their encoding
    lacks, instead of raising. Streams that are no text file (replaced by a
    test, or closed) are left as they are."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")
