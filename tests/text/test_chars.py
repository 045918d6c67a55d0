"""The one list of characters that act on a display (text/chars.py)."""

from __future__ import annotations

import re
import sys
import unicodedata

from evoxtral_stream.text.chars import (
    CONTROL,
    HIDDEN,
    display_width,
    drop_hidden,
    graphemes,
    is_cjk,
)
from evoxtral_stream.text.tags import join_texts

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


def test_graphemes_keep_what_shows_as_one_character() -> None:
    family, tone, flags = "👩\u200d👩\u200d👧", "👍🏽", "🇯🇵🇫🇷"
    text = f"e\u0301t{family}{tone}{flags}🇯 ❤\ufe0f1\ufe0f\u20e3नमस्ते\u1100\u1161\u11a8"
    assert graphemes(text) == [
        "e\u0301", "t", family, tone, "🇯🇵", "🇫🇷", "🇯", " ", "❤\ufe0f", "1\ufe0f\u20e3",
        "न", "म", "स्", "ते", "\u1100\u1161\u11a8"]
    assert "".join(graphemes(text)) == text
    # ZWJ and ZWNJ join emoji only: between letters they stay with the
    # letter before (Persian, Indic scripts).
    assert graphemes("a\u200db\u200cc") == ["a\u200d", "b\u200c", "c"]


def test_display_width_counts_an_emoji_sequence_once() -> None:
    assert display_width("👩\u200d👩\u200d👧") == 2
    assert display_width("🧑🏽\u200d🚀") == 2
    assert display_width("👍🏽 🇯🇵") == 5
    assert display_width("❤\ufe0f") == 2 and display_width("❤") == 1
    assert display_width("1\ufe0f\u20e3") == 2
    assert display_width("東京ＡＢ") == 8
    assert display_width("e\u0301te\u0301 zero\u200bwidth") == 13
    assert display_width("\u1100\u1161\u11a8") == 2
    assert display_width("") == 0


def test_halfwidth_katakana_is_written_without_spaces_as_kana_is() -> None:
    """Halfwidth katakana (ｿｳﾃﾞｽ, ｡｢｣､･, still met in older Japanese text)
    is Japanese written narrow, so it joins and breaks as the wide kana;
    halfwidth Hangul is Korean (spaced) and halfwidth arrows and symbols
    are no letters."""
    assert all(is_cjk(c) for c in "ｱｿｳﾃﾞｽﾟｰ｡｢｣､･ｦ")
    assert not any(is_cjk(c) for c in "ﾡￂ￨￩₩")
    assert join_texts(["ｿｳﾃﾞｽ｡", "ﾈ｡"]) == "ｿｳﾃﾞｽ｡ﾈ｡"
    assert join_texts(["ｿｳﾃﾞｽ", "OK"]) == "ｿｳﾃﾞｽ OK"


def test_halfwidth_voicing_marks_belong_to_their_kana() -> None:
    assert graphemes("ﾃﾞｽﾎﾟ") == ["ﾃﾞ", "ｽ", "ﾎﾟ"]
    assert display_width("ﾃﾞｽ") == 3
