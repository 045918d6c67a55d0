"""What a terminal shows for the bytes written to it."""

from __future__ import annotations

import re

__all__ = ["screen_rows"]


def screen_rows(output: str, columns: int) -> list[str]:
    """The rows a terminal shows for ``output``: printable text wrapping at
    ``columns``, CR, LF, cursor up (CSI A), erase below (CSI J) and erase
    line (CSI K); colours ignored."""
    rows: list[list[str]] = [[]]
    r = c = 0
    i = 0
    while i < len(output):
        ch = output[i]
        if ch == "\x1b":
            m = re.match(r"\x1b\[([0-9;]*)([A-Za-z])", output[i:])
            assert m is not None, repr(output[i:i + 10])
            i += len(m.group(0))
            arg, code = m.group(1), m.group(2)
            if code == "A":
                r = max(0, r - int(arg or 1))
            elif code == "J":
                del rows[r + 1:]
                rows[r] = rows[r][:c]
            elif code == "K":
                rows[r] = [] if arg == "2" else rows[r][:c]
            continue
        i += 1
        if ch == "\r":
            c = 0
        elif ch == "\n":
            r += 1
        else:
            if c >= columns:
                r, c = r + 1, 0
            while len(rows) <= r:
                rows.append([])
            row = rows[r]
            row.extend(" " * (c + 1 - len(row)))
            row[c] = ch
            c += 1
        while len(rows) <= r:
            rows.append([])
    return ["".join(row).rstrip() for row in rows]
