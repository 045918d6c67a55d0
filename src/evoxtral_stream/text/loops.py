"""Decoder repetition loops, cut back. Pure.

Greedy decoders (Whisper, Voxtral) can fall into a loop and repeat one short
phrase until their token budget ends: "No No No No ... No" (tiny.en on
espeak's "No, no, no."), "( Be Be Be ... Be" (on a 440 Hz tone). People
repeat themselves too ("no, no, no", "ha ha ha ha"), but not eight times
in a row, nor a phrase of several words five times.

:func:`cut_loop`: when the end of a text is one phrase of 1 to
:data:`MAX_PHRASE` words repeated at least :data:`MIN_REPEATS` times and over
at least :data:`MIN_WORDS` words, the repeats after the first :data:`KEEP`
are cut off. Words are compared case- and punctuation-insensitively ("No,"
and "no." are one word; a tag by its name), and the last copy may be
incomplete, down to a word cut short (a budget that ends inside the loop).
Words are what whitespace separates: a loop inside one word (tiny.en's
"fahahahahah...", or a script written without spaces) is not seen.
"""

from __future__ import annotations

import re

__all__ = ["KEEP", "MAX_PHRASE", "MIN_REPEATS", "MIN_WORDS", "cut_loop"]

#: Longest phrase, in words, whose repeats are a loop.
MAX_PHRASE = 4
#: Fewest repeats of a phrase that make a loop ...
MIN_REPEATS = 5
#: ... and fewest words they cover: a single word repeats 8 times.
MIN_WORDS = 8
#: Repeats kept: as many as people say.
KEEP = 3

_WORD = re.compile(r"\S+")
_EDGES = re.compile(r"^\W+|\W+$")
# Left at the end of the text once the loop is cut ("no, no, no," -> "no, no, no").
_TRAILING = " \t\n,;:"


def _key(word: str) -> str:
    """A word as compared: without the punctuation around it, casefolded;
    a word of punctuation only stays itself."""
    return _EDGES.sub("", word).casefold() or word


def cut_loop(text: str, *, protect: int = 0) -> str:
    """``text`` with a repetition loop at its end cut back to :data:`KEEP`
    repeats (module docstring); else ``text`` itself. The first ``protect``
    characters (text already committed) are never cut, nor the word that
    straddles them."""
    spans = [m.span() for m in _WORD.finditer(text)]
    keys = [_key(text[a:b]) for a, b in spans]
    m = len(keys)
    best: tuple[int, int] | None = None  # (first word of the loop, phrase length)
    for n in range(1, MAX_PHRASE + 1):
        # r words after the last whole copy start another one, the last of
        # them perhaps cut short.
        for r in range(n + 1):
            end = m - r
            if end < n * MIN_REPEATS:
                break
            phrase = keys[end - n:end]
            if r and not (keys[end:m - 1] == phrase[:r - 1]
                          and phrase[r - 1].startswith(keys[m - 1])):
                continue
            start = end
            while start >= n and keys[start - n:start] == phrase:
                start -= n
            repeats = (end - start) // n
            if repeats < MIN_REPEATS or end - start < MIN_WORDS:
                continue
            # The longest loop; of equal ones the shortest phrase.
            if best is None or start < best[0]:
                best = (start, n)
    if best is None:
        return text
    start, n = best
    cut = spans[start + KEEP * n - 1][1]
    for a, b in spans:
        if a < protect:
            cut = max(cut, b)
    return text[:cut].rstrip(_TRAILING)
