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

Both are bodies of a regular expression character class.
"""

from __future__ import annotations

import re

__all__ = ["CONTROL", "HIDDEN", "drop_hidden"]

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
