"""Characters that act on whatever shows text instead of being shown.

One rule for the text a model writes (the tokenizer, :mod:`.tags`: every
caption and subtitle file) and for text shown on a terminal or in a log
line (:func:`evoxtral_stream.console.printable`: other servers' captions
in the clients, too):

- Control characters (:data:`CONTROL`: C0, DEL, C1). ESC starts a terminal
  escape sequence, a line break or backspace breaks a one-row line, NUL
  ends espeak-ng's input. They become spaces: a model's byte tokens write
  them between words.
- Format characters (Unicode category Cf) but ZWNJ and ZWJ
  (:data:`HIDDEN`). They are invisible, and they reorder what a terminal,
  an editor or a player shows (the bidi embeddings, overrides, isolates
  and marks, U+202A..U+202E, U+2066..U+2069, U+200E, U+200F, U+061C: the
  "Trojan Source" class) or hide what text holds (zero-width space, word
  joiner, BOM, soft hyphen, invisible operators, the tag characters that
  can spell out hidden ASCII). They are dropped: taking no room, they
  leave what was seen, in the order it is held. The few visible ones
  (Arabic number signs, Egyptian hieroglyph and musical format controls)
  go too: one rule a test can check against Unicode's own table, and no
  speech caption holds them.
- ZWNJ (U+200C) and ZWJ (U+200D) stay: they change only how the visible
  characters beside them join (Persian, Indic scripts, emoji sequences
  such as 👩‍💻), and can neither reorder nor hide text.
- Lone surrogates (:data:`SURROGATE`: a byte that is no UTF-8, decoded
  with ``surrogateescape``) are no text: no file, socket or terminal can
  take them in UTF-8. They become U+FFFD, as a decoder that replaces
  writes such a byte.

Each is the body of a regular expression character class.

What is shown is counted in user-perceived characters (:func:`graphemes`:
a letter with its accents, an emoji sequence) and display columns
(:func:`display_width`), with no dependency beyond :mod:`unicodedata`.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["CONTROL", "HIDDEN", "SURROGATE", "display_width", "drop_hidden", "graphemes",
           "is_cjk", "is_mark", "mend_surrogates", "shown"]

#: Control characters: C0, DEL and C1.
CONTROL = "\x00-\x1f\x7f-\x9f"

#: Every format character (Cf) but ZWNJ and ZWJ, as of Unicode 15 (code
#: points of a range that an older Unicode leaves unassigned are included:
#: dropping one loses nothing). tests/text/test_chars.py checks the list
#: against the running Python's Unicode database.
HIDDEN = (
    "\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
    "\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
)

_HIDDEN = re.compile(f"[{HIDDEN}]+")


def drop_hidden(text: str) -> str:
    """``text`` without its :data:`HIDDEN` characters."""
    return _HIDDEN.sub("", text)


#: Lone surrogates (every surrogate in a Python str is one: a pair is one
#: character there).
SURROGATE = "\ud800-\udfff"

_SURROGATE = re.compile(f"[{SURROGATE}]")


def mend_surrogates(text: str) -> str:
    """``text`` with each lone surrogate as U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def shown(value: object, limit: int = 60) -> str:
    """``value`` as an error message quotes it: its repr, whose escapes make
    any string one line of printable text (a lone surrogate and U+2028
    included), cut to ``limit`` characters and ``...``. A value from a
    client may be as long as its message, or nested as deep as JSON goes."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        # An int past Python's digit limit for str(), nesting past the stack.
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}..."


_ZWJ = "\u200d"
_VS16 = "\ufe0f"


def is_mark(c: str) -> bool:
    """Whether ``c`` is a combining mark (Unicode's Mn, Mc, Me): a vowel
    sign or virama of an Indic or Thai word, an accent written apart (NFD).
    Not ``\\w`` to a regular expression, yet part of the word it follows."""
    return unicodedata.category(c)[0] == "M"


def _hangul(c: str) -> bool:
    o = ord(c)
    return (0xAC00 <= o <= 0xD7FF or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F
            or 0xA960 <= o <= 0xA97F or 0xFFA0 <= o <= 0xFFDC)


def is_cjk(c: str) -> bool:
    """Whether ``c`` is of text written without spaces between its words, as
    Chinese and Japanese are: a wide or fullwidth (East Asian) letter, digit
    or punctuation mark (a Han ideograph, kana, bopomofo, Yi, a fullwidth
    letter or digit, 。、「」), or halfwidth katakana (ｿｳﾃﾞｽ｡, Japanese
    written narrow). Not Hangul, wide or halfwidth: Korean is written with
    spaces.
    Nor Thai, Lao, Khmer or Burmese, which space their phrases (and whose
    words only a dictionary can find)."""
    # "H" is halfwidth katakana, halfwidth Hangul and a few symbols; the
    # category and Hangul tests leave the katakana.
    return (unicodedata.east_asian_width(c) in ("W", "F", "H")
            and unicodedata.category(c)[0] in "LNP" and not _hangul(c))


def _extends(c: str) -> bool:
    """Whether ``c`` belongs to the character before it (UAX #29's Extend
    and SpacingMark, near enough): marks, ZWNJ and ZWJ, emoji skin-tone
    modifiers, tag characters, the vowel and final jamo of a decomposed
    Hangul syllable, and halfwidth katakana's voicing marks (ﾃﾞ is one
    kana, as デ is)."""
    o = ord(c)
    return (is_mark(c) or c in "\u200c\u200d\uff9e\uff9f"
            or 0x1F3FB <= o <= 0x1F3FF or 0xE0020 <= o <= 0xE007F
            or 0x1160 <= o <= 0x11FF or 0xD7B0 <= o <= 0xD7FF)


def _regional(c: str) -> bool:
    return 0x1F1E6 <= ord(c) <= 0x1F1FF


def _pictographic(c: str) -> bool:
    # Unicode's Extended_Pictographic is not in unicodedata; emoji are So.
    return unicodedata.category(c) == "So"


def graphemes(text: str) -> list[str]:
    """``text`` in user-perceived characters, Unicode's extended grapheme
    clusters (UAX #29) for the cases captions hold: a base with its
    combining marks, variation selectors and skin-tone modifiers (👍🏽),
    emoji joined by ZWJ (👩‍👩‍👧), a flag's pair of regional indicators
    (🇯🇵). ``"".join(graphemes(text)) == text``."""
    out: list[str] = []
    for c in text:
        if out:
            last = out[-1]
            if (_extends(c)
                    or (last[-1] == _ZWJ and _pictographic(c) and _pictographic(last[0]))
                    or (_regional(c) and _regional(last[0])
                        and sum(map(_regional, last)) == 1)):
                out[-1] = last + c
                continue
        out.append(c)
    return out


def _char_width(c: str) -> int:
    o = ord(c)
    if (unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me", "Cf")
            or 0x1160 <= o <= 0x11FF or 0xD7B0 <= o <= 0xD7FF):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


def _grapheme_width(g: str) -> int:
    first = g[0]
    if len(g) > 1 and (_VS16 in g or (_regional(first) and _regional(g[1]))
                       or (_pictographic(first)
                           and any(c == _ZWJ or 0x1F3FB <= ord(c) <= 0x1F3FF for c in g))):
        # Shown as one emoji: two columns, however many code points.
        return 2
    return sum(map(_char_width, g))


def display_width(text: str) -> int:
    """Columns ``text`` takes on a line: 2 for a wide or fullwidth (East
    Asian) character and for an emoji shown as one (a ZWJ sequence, a flag,
    a skin tone, VS16: counted once), 0 for a combining mark or a format
    character (zero-width space and joiners, bidi marks), 1 for the rest."""
    if text.isascii():
        return len(text)
    return sum(map(_grapheme_width, graphemes(text)))
