"""The one list of characters that act on a display (text/chars.py)."""

from __future__ import annotations

import re
import sys
import unicodedata

from evoxtral_stream.text.chars import CONTROL, HIDDEN, drop_hidden

_KEPT = {"\u200c", "\u200d"}   # ZWNJ, ZWJ


def test_hidden_is_every_format_character_but_zwnj_and_zwj() -> None:
    """The rule is Unicode's category Cf less two; the list spells it out
    for a regular expression. A Python whose Unicode adds a Cf character
    fails here until the list has it."""
    hidden = re.compile(f"[{HIDDEN}]")
    listed = {chr(c) for c in range(sys.maxunicode + 1) if hidden.match(chr(c))}
    cf = {chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"}
    assert sorted(f"{ord(c):04X}" for c in cf - _KEPT - listed) == []
    # Beside Cf, only code points this Python's Unicode leaves unassigned.
    assert {unicodedata.category(c) for c in listed - cf} <= {"Cn"}
    assert not listed & _KEPT


def test_controls_and_hidden_do_not_overlap() -> None:
    controls = re.compile(f"[{CONTROL}]")
    assert [c for c in range(0x110000) if controls.match(chr(c))] == [
        *range(0x20), *range(0x7f, 0xa0)]
    assert not re.search(f"[{HIDDEN}]", "".join(map(chr, range(0xa0))))


def test_drop_hidden_keeps_everything_else() -> None:
    assert drop_hidden("a\u202eb\u2066c\u2069\u200bd\ufeff") == "abcd"
    text = ("caf\u00e9 \u05e9\u05dc\u05d5\u05dd \U0001f469\u200d\U0001f4bb "
            "\u0645\u06cc\u200c\u062e \x1b")
    assert drop_hidden(text) == text
