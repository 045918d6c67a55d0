"""The merger: one stream's hypotheses in, caption events out.

Pure and synchronous: ``Merger(stream).feed(hypothesis) -> list[CaptionEvent]``;
no clock, no I/O, no threads. Tags are atomic tokens throughout.

Contracts (what the engine may rely on):

- ``seq`` starts at 1 and increases by one with every event of the stream.
- A partial produces at most one event: none when it is stale (its revision
  is not newer than one already seen for the segment), late (the segment's
  final was already received) or changes nothing on screen.
- A final produces exactly one final event for its segment, even with empty
  text. A second final of a closed segment is ignored. Finals are never
  dropped for their revision.
- Partials (LocalAgreement-n, default n=2): the longest common token prefix
  of the last n views of the segment is committed, short of a tag or a
  word still being written at the end (``So [clears``, ``I don'``).
  Committed (``stable``)
  text is never retracted or changed, by later partials or by the final: a
  hypothesis that revises committed words is aligned after them and only its
  tail is used. A view that may be cut wrongly (a seam not found yet, a held
  segment, see below) commits nothing and restarts the agreement. One whose
  alignment was guessed over revised words restarts it too, as its first
  view, unless the view before made the same guess (the same hypothesis
  tokens over the committed text): a guess made twice in a row agrees like
  any two views, so a respelled last committed word ("to", then "today")
  does not stop the commits for the rest of the segment.
  ``text == stable + unstable``, and the stable text of a segment only
  grows. A partial's ``plain_text`` is its text without tags and without a
  square-bracket tag still being written at the end (``So [clears`` is
  ``So``; brackets holding a digit are text, so ``see [12`` stays). A
  final leaves such a half tag out of its text too: it is no word said
  and no tag (an open ``(`` or ``*`` stays, punctuation too). The
  final's text is the committed
  text, with any tags the final hypothesis places inside it, followed by the
  rest of the final hypothesis: the final hypothesis is aligned with the
  committed tokens (difflib on :func:`match_key`: words case- and
  punctuation-insensitive, tags by name), and each of its tags in the
  committed region that is not aligned with a committed tag is inserted at
  its aligned position (inside a run of revised tokens, after as many
  committed words and punctuation as the final has ahead of it in that run).
  Committed words, punctuation and tags are never removed or changed (where
  the final revises a committed word, the committed word stays) and a tag
  the committed text already has there is not repeated. A final's ``stable``
  is its whole text, so it may contain tags that the last partial's
  ``stable`` lacked: within a segment, "stable only grows" holds for words
  (and punctuation) strictly, and for tags as insertions only.
- ``final_replaces_stable=True`` (the engine's default, config
  ``stream.final_replaces_stable``) changes only the final: its text is the
  final hypothesis itself (stitched as below), which heard the whole
  segment, so it may correct words that partials of a shorter prefix had
  agreed on. The guarantee above then holds across partials; the final is
  the segment's authoritative text. Measured with Whisper tiny.en on 60
  scripts: streaming WER +0.1 points over offline with it, +2.9 without
  (bench/RESULTS.md).
- Forced splits: when a segment's final has ``forced_end=True`` the next
  segment continues the sentence and is *stitched*:

  1. Overlap. Only when its audio starts before the previous segment's end
     (``start_sample < previous end_sample``): the longest run of words at
     the start of the hypothesis that equals the last words of the text
     already emitted is dropped, with everything before it (a tag re-emitted
     ahead of the overlap, say). Case and punctuation are ignored; the run
     has at most 5 words per second of overlap audio, rounded (none under
     0.1 s), the overlap being capped at ``max_overlap_s``.
     A match is refused when a sound tag (non-verbal, pause) ahead of it in
     the hypothesis is not right before the same words in the previous text:
     that is a genuine repetition. Right after the seam, the punctuation and
     tags that re-decode what followed the previous text's last word are
     dropped too (a tag right at the boundary is kept once); without a word
     overlap only such tags are. A hypothesis whose audio ends inside the
     overlap shows nothing.
  2. Carry-over. Leading tags of the remaining text that restate an emotion
     or delivery tag still in effect at the end of the previous text (see
     :class:`~evoxtral_stream.text.tags.Carry`: until replaced by one of its
     kind or until the sentence ends) are dropped, and so are leading ones
     that repeat, in order, the last emotion/delivery tags the previous text
     ended with after its last word. Non-verbal and pause tags never carry.

  The captions of a stitched segment say so (``CaptionEvent.continues``),
  so that a reader that speaks each final alone can put back the tags the
  carry-over left out. Segments after a natural end (``forced_end=False``)
  are not stitched.
  A caption's ``start`` is then ``max(start_sample, previous end_sample)``:
  the overlap audio belongs to the previous caption.
- Segment ids are consecutive per stream (the session numbers them so), and
  every segment gets one final; the first is ``first_segment`` (0). Segment
  ``s`` is *held* while any earlier segment (from ``first_segment``, seen or
  not) is not closed: a held segment commits
  nothing (its partials are all unstable) and its final waits; it is
  emitted, stitched, as soon as the earlier segments close. Call
  :meth:`Merger.abandon` when a segment's final will never come (a failed
  decode): it closes with what was shown, and a held one keeps its place
  (finals are emitted in segment order, always). Failing that, when more
  than ``max_pending`` finals wait, the segment holding them is abandoned
  automatically; ``max_pending=None`` never does, for a caller that answers
  or abandons every final it asks for (the engine: its finals may come back
  out of segment order, and a segment abandoned too early would drop its
  final when it comes). :meth:`Merger.close` abandons everything at the
  stream's end.
- Times: ``start``/``end`` are stream seconds (``SAMPLE_RATE``). A tag's
  ``TagMark.index`` is the index of the plain-text word it comes before
  (:func:`.tags.tag_word_indexes`: a tag glued inside a word indexes that
  word); ``TagMark.t`` interpolates linearly over the words of the tagged
  text: ``start + (end - start) * before / words``, ``before`` the words
  ahead of the tag (the two halves of ``hel[laughs]lo`` count as two;
  ``start`` when there are no words).
- Prefix reuse: :meth:`Merger.reusable_prefix` is a query only (it changes
  nothing). It is the committed text of an open segment when that text is
  exactly the start of what the model wrote for the segment's own audio (the
  latest partial), so a backend may continue from it instead of decoding it
  again; otherwise "".

Exactness: if no two consecutive hypotheses of a segment agree on a wrong
token, the committed text is a prefix of the final hypothesis and the final
caption equals it (stitched, less a half tag at its end). Known
ambiguities, where the text alone cannot tell and the merger may drop a
genuine repetition: an emotion/delivery tag restating one in effect right
at a forced seam (taken for a re-emission; the Evoxtral scripts never do
this), and, at a seam with audio overlap, a word or
a sound repeated at once, or with only tags between ("Wait, wait, wait",
"okay, [laughs] okay", "so [laughs] [whispers] [shouts] so", "[gasps]
[gasps]"), where more than one overlap length fits.
"""

from __future__ import annotations

import unicodedata
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from difflib import SequenceMatcher

from ..events import SAMPLE_RATE, CaptionEvent, Hypothesis, RequestKind, TagMark
from .chars import is_mark
from .tags import (
    PUNCT_TAG_MAX,
    Carry,
    Token,
    holds_digit,
    render,
    tag_word_indexes,
    tokenize,
    word_count,
)

__all__ = [
    "MAX_OVERLAP_WORDS_PER_S",
    "Merger",
    "match_key",
    "place_tags",
    "stitch",
    "tag_marks",
    "tail_after",
]

# Fast speech is about 4 words a second; the bound keeps a short overlap from
# swallowing a genuine repetition ("Wait, wait, wait").
MAX_OVERLAP_WORDS_PER_S = 5.0
# Tokens of emitted text kept for overlap matching and the carry state.
_TAIL_TOKENS = 96


def match_key(tok: Token) -> str:
    """Comparison key of a token for stitching and alignment: words case- and
    punctuation-insensitive, tags by canonical name. Combining marks count
    (a vowel sign tells है from हो) and an accent written apart is the one
    composed (NFC)."""
    if tok.is_tag:
        return f"[{tok.tag}]"
    low = unicodedata.normalize("NFC", tok.text).casefold()
    return "".join(ch for ch in low if ch.isalnum() or is_mark(ch)) or low


def _lcp(a: Sequence[Token], b: Sequence[Token]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _open_tag(tokens: Sequence[Token]) -> int:
    """Where a tag still being written starts: the index of a trailing ``[``
    (``［`` too), ``(`` or ``*`` followed only by words (``So [clears``, a partial whose
    token budget ran out inside the tag), else ``len(tokens)``. Words holding
    a digit (``see [12``) can close into no tag: they are text already."""
    i = len(tokens)
    while i > 0 and tokens[i - 1].is_word:
        i -= 1
    if i == 0 or not tokens[i - 1].text.endswith(("[", "［", "(", "*")):
        return len(tokens)
    if any(holds_digit(t.text) for t in tokens[i:]):
        return len(tokens)
    # No longer than the tokenizer lets a ( ) or * tag be.
    return i - 1 if len(render(tokens[i:])) <= PUNCT_TAG_MAX else len(tokens)


def _split_open_bracket(
        tokens: Sequence[Token]) -> tuple[Sequence[Token], tuple[Token, ...]]:
    """``tokens`` cut before a square-bracket tag still being written at the
    end (``So [clears``; see :func:`_open_tag`): the tokens before it and
    the half tag (its bracket split from punctuation glued ahead of it,
    ``,[``), which renders back to the same text after them. An open ``(``
    or ``*`` stays in the first part: it is punctuation too (``(see``)."""
    i = _open_tag(tokens)
    if i == len(tokens) or not tokens[i].text.endswith(("[", "［")):
        return tokens, ()
    head = tokens[i].text[:-1]
    if not head:
        return tokens[:i], tuple(tokens[i:])
    bracket = replace(tokens[i], text=tokens[i].text[-1], space_before=False)
    return [*tokens[:i], replace(tokens[i], text=head)], (bracket, *tokens[i + 1:])


def _close_open_bracket(tokens: Sequence[Token]) -> Sequence[Token]:
    """``tokens`` without a square-bracket tag still being written at the
    end, for a partial's plain text and a final's text (see
    :func:`_split_open_bracket`)."""
    return _split_open_bracket(tokens)[0]


def _lstrip(tokens: Sequence[Token]) -> tuple[Token, ...]:
    if tokens and tokens[0].space_before:
        return (tokens[0].with_space(False), *tokens[1:])
    return tuple(tokens)


_APOSTROPHES = frozenset("'’`´")


def _apostrophe(tok: Token) -> bool:
    return tok.is_punct and set(tok.text) <= _APOSTROPHES


def _open_word(tokens: Sequence[Token]) -> int:
    """Where a word cut at its apostrophe at the end starts (``I don'``, a
    partial that stopped inside ``don't``), else ``len(tokens)``."""
    n = len(tokens)
    if (n >= 2 and _apostrophe(tokens[-1]) and not tokens[-1].space_before
            and tokens[-2].is_word):
        return n - 2
    return n


def _units(tokens: Sequence[Token]) -> tuple[list[Token], list[int]]:
    """``tokens`` with each word and the apostrophes and words glued to it
    (``don'``, ``it´s``) as one word, and where each unit starts in
    ``tokens`` (with ``len(tokens)`` last)."""
    units: list[Token] = []
    starts: list[int] = []
    for i, tok in enumerate(tokens):
        if (i and not tok.space_before and units and units[-1].is_word
                and (_apostrophe(tok) if tokens[i - 1].is_word
                     else tok.is_word and _apostrophe(tokens[i - 1]))):
            units[-1] = replace(units[-1], text=units[-1].text + tok.text)
            continue
        units.append(tok)
        starts.append(i)
    starts.append(len(tokens))
    return units, starts


def _far(committed: Sequence[Token], tokens: Sequence[Token],
         blocks: Sequence[tuple[int, int, int]]) -> bool:
    """Whether the last aligned block jumped far: the hypothesis has more
    words between it and the block before (or the start) than the block
    has tokens plus the committed tokens left unaligned there. Inserted
    punctuation and tags do not count: partials add them all the time."""
    la, lb, size = blocks[-1]
    pa = pb = 0
    if len(blocks) > 1:
        a, b, before = blocks[-2]
        pa, pb = a + before, b + before
    inserted = sum(1 for t in tokens[pb:lb] if t.is_word)
    revised = sum(1 for t in committed[pa:la] if not t.is_tag)
    return inserted > revised + size


def tail_after(committed: Sequence[Token],
               tokens: Sequence[Token]) -> tuple[tuple[Token, ...], bool]:
    """The part of ``tokens`` (a whole-segment hypothesis) that comes after
    the ``committed`` prefix, and whether that cut is reliable.

    A hypothesis that revised a few committed tokens in place (a word
    respelled, its case changed: at most ``max(1, n // 8)`` tokens differ,
    none of them a tag facing a word or punctuation, which would be an
    insertion or deletion) and kept the last committed token is cut after
    as many tokens, reliably. Otherwise the committed tokens are aligned
    (difflib on :func:`match_key`) and the cut goes after the last aligned
    one, the unmatched committed words and punctuation after it counting one
    for one for the hypothesis' (tags are skipped on both sides); reliable
    only when the last committed token itself is aligned. A last aligned run
    that the hypothesis reaches only past more new words than the run has
    tokens and the committed words and punctuation left unaligned before it
    (``So I went to the`` with ``So, I went to a store and the clerk``) is
    a revised token matching a later equal one, not an insertion: it is not
    used (the run before it is the last aligned one), and the cut is not
    reliable. A hypothesis that passes as revised in place but changed the
    last committed token is aligned too, since a word or comma inserted
    before that token shifts it just as a respelling changes it; when the
    alignment leaves it unaligned (respelled) or shifts it by more tokens
    than differ in place (a later token equal to the respelled one), the
    cut goes after ``n`` tokens, unreliable. Tokens are counted as words are
    written throughout: a word and the apostrophes and words glued to it
    are one (``don'``, a partial cut at the apostrophe, against ``don't``).
    """
    n = len(committed)
    if tuple(tokens[:n]) == tuple(committed):
        return tuple(tokens[n:]), True
    # Counted in words as written: "don'" (a partial cut at the apostrophe)
    # is two tokens, "don't" one, and one for one they would cut a word away.
    units, starts = _units(tokens)
    cut, reliable = _cut(_units(committed)[0], units)
    return tuple(tokens[starts[cut]:]), reliable


def _cut(committed: Sequence[Token], tokens: Sequence[Token]) -> tuple[int, bool]:
    """:func:`tail_after` on units: where the tail starts, and whether reliably."""
    n = len(committed)
    a = [match_key(t) for t in committed]
    b = [match_key(t) for t in tokens]
    in_place = False
    changed: list[int] = []
    if len(b) >= n:
        changed = [i for i in range(n) if a[i] != b[i]]
        # In place means respelled: a tag facing a word or punctuation is an
        # insertion or a deletion, which shifts what follows (aligned below).
        in_place = len(changed) <= max(1, n // 8) and all(
            committed[i].is_tag == tokens[i].is_tag for i in changed)
        if in_place and (n - 1) not in changed:
            return n, True
        # Otherwise the last committed token changed: respelled, or shifted
        # by a word or comma inserted before it ("Yeah so" -> "Yeah, so I"),
        # where a cut after n tokens would repeat it ("Yeah so so I").
    blocks = [blk for blk in SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
              if blk.size]
    while blocks and _far(committed, tokens, blocks):
        # Aligned past more new words than it holds: a revised last token
        # ("the" -> "a") matching a later equal one ("a store and the"), not
        # an insertion; the tokens it covers count as revised, one for one.
        blocks.pop()
    if not blocks:
        return min(n, len(tokens)), False
    last = blocks[-1]
    if in_place and last.b - last.a > len(changed):
        # Shifted by more tokens than it moved over: not an insertion but the
        # respelled last token ("to" of "today", "." become "...") matching a
        # later one ("you to know"), and a cut there would drop every new
        # token in between.
        return n, False
    unmatched = n - (last.a + last.size)
    # The committed words and punctuation left unaligned stand for as many of
    # the hypothesis' (revised), tags skipped on both sides: a tag the
    # hypothesis adds there belongs to the committed region, not the tail.
    left = sum(1 for t in committed[last.a + last.size:] if not t.is_tag)
    j = last.b + last.size
    while left and j < len(tokens):
        if not tokens[j].is_tag:
            left -= 1
        j += 1
    if unmatched and in_place:
        # The last committed token was respelled, not shifted: its position
        # is the better guess, but still a guess.
        return n, False
    return j, unmatched == 0


def place_tags(committed: Sequence[Token],
               region: Sequence[Token]) -> tuple[Token, ...]:
    """``committed`` with the tags of ``region`` (the part of a final
    hypothesis that covers the committed tokens) that it lacks, each inserted
    at its aligned position; nothing of ``committed`` is removed or changed.

    The tokens are aligned with difflib on :func:`match_key`. A tag of
    ``region`` aligned with a committed tag is already there; one that is not
    goes where it aligns: in a run of tokens the final inserted, before the
    committed token that follows the run; in a run that replaces committed
    tokens, after as many of the run's committed words and punctuation as the
    final has ahead of the tag in that run (at most all of them). An inserted
    tag keeps the final's spacing before it (none at the very start), and
    the committed token it lands before takes the final's spacing after it.
    """
    if not any(t.is_tag for t in region):
        return tuple(committed)
    a = [match_key(t) for t in committed]
    b = [match_key(t) for t in region]
    # committed index -> tags (and the final's spacing after them) to insert before it
    inserts: dict[int, list[Token]] = {}
    space_after: dict[int, bool] = {}
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op in ("equal", "delete"):
            continue
        others = [i for i in range(i1, i2) if not committed[i].is_tag]
        ahead = 0
        for j in range(j1, j2):
            tok = region[j]
            if not tok.is_tag:
                ahead += 1
                continue
            pos = i1 if ahead == 0 else (others[ahead - 1] + 1 if ahead <= len(others) else i2)
            inserts.setdefault(pos, []).append(tok.with_space(tok.space_before and pos > 0))
            nxt = region[j + 1] if j + 1 < len(region) else None
            space_after[pos] = nxt.space_before if nxt is not None else True
    if not inserts:
        return tuple(committed)
    out: list[Token] = []
    for i in range(len(committed) + 1):
        if i in inserts:
            out.extend(inserts[i])
        if i < len(committed):
            tok = committed[i]
            if i in inserts:
                tok = tok.with_space(tok.space_before or space_after[i])
            out.append(tok)
    return tuple(out)


def stitch(
    prev: Sequence[Token],
    prev_end: Carry,
    tokens: Sequence[Token],
    *,
    overlap_s: float,
    inside: bool = False,
) -> tuple[tuple[Token, ...], bool]:
    """Drop from ``tokens`` (the hypothesis of a segment continuing a forced
    split) what the previous text ``prev`` already said: see the module doc.

    ``prev_end`` is the carry state at the end of ``prev``; ``overlap_s`` is
    how much of the new audio the previous segment already covered (bounded
    by the caller); ``inside`` says the hypothesis' audio ends inside the
    overlap, so its text may stop short of the previous text's end (its last
    word cut short).

    Returns the tokens left and whether the seam was found: False when the
    audio overlaps but no overlap text matched (the hypothesis may still
    repeat words of the previous text, so nothing of it should be committed).
    """
    rest: Sequence[Token] = tokens
    found = True
    if overlap_s > 0:
        pw = [i for i, t in enumerate(prev) if t.is_word]
        nw = [i for i, t in enumerate(tokens) if t.is_word]
        pkeys = [match_key(prev[i]) for i in pw]
        nkeys = [match_key(tokens[i]) for i in nw]
        max_o = min(len(pkeys), round(overlap_s * MAX_OVERLAP_WORDS_PER_S))
        best: int | None = None
        for o in range(max_o, 0, -1):
            m = min(o, len(nkeys))
            if m == 0:
                break
            suffix = pkeys[len(pkeys) - o:]
            if m == o:
                ok = nkeys[:o] == suffix
            elif inside:
                # All of this hypothesis is old audio: it re-decodes the start
                # of the overlap, its last word possibly cut short.
                last_ok = nkeys[m - 1] == suffix[m - 1] or suffix[m - 1].startswith(
                    nkeys[m - 1])
                ok = nkeys[:m - 1] == suffix[:m - 1] and last_ok
            else:
                ok = False
            if ok and _sounds_agree(prev, pw, o, tokens[: nw[0]]):
                best = o
                break
        found = best is not None
        prev_trailer = prev[pw[-1] + 1:] if pw else prev
        if best is not None:
            if len(nkeys) < best:
                return (), True
            rest = tokens[nw[best - 1] + 1:]
        rest = _dedupe_trailer(prev_trailer, rest, after_word=best is not None)
    # Emotion and delivery tags after the previous text's last word describe
    # speech that only starts here: a hypothesis that opens with the last of
    # them, in the same order, restates them.
    # (Tags still in effect are dropped anyway and left out of the match.)
    last_word = max((i for i, t in enumerate(prev) if t.is_word), default=-1)
    ending = [t.tag for t in prev[last_word + 1:] if t.carries and not prev_end.holds(t)]
    opening: list[str | None] = []
    for t in rest:
        if not t.is_tag:
            break
        if t.carries and not prev_end.holds(t):
            opening.append(t.tag)
    restated = next((k for k in range(min(len(ending), len(opening)), 0, -1)
                     if opening[:k] == ending[len(ending) - k:]), 0)
    out: list[Token] = []
    state = prev_end
    leading = True
    for t in rest:
        if leading and t.is_tag:
            if t.carries and restated > 0 and not prev_end.holds(t):
                restated -= 1
                continue
            if state.holds(t):
                continue
            state = state.advance(t)
        else:
            leading = False
        out.append(t)
    return _lstrip(out), found


def _dedupe_trailer(prev_trailer: Sequence[Token], rest: Sequence[Token], *,
                    after_word: bool) -> list[Token]:
    """Drop the punctuation and tags at the head of ``rest`` that re-decode
    what followed the previous text's last word (``prev_trailer``).

    After an overlapped word the head re-decodes the trailer from its start:
    they are matched in order. Without one the overlap audio is the end of
    the trailer: the head's sound tags that repeat the trailer's last sounds
    are dropped, and punctuation is kept (a leading ``—`` is the new text's
    own, as in ``—you``). Emotion and delivery tags not matched are kept and
    passed over (restatements, left to the carry-over rule).
    """
    if not after_word:
        sounds = [t.tag for t in prev_trailer if t.is_tag and not t.carries]
        head: list[int] = []
        for i, t in enumerate(rest):
            if not t.is_tag:
                break
            if not t.carries:
                head.append(i)
        said = [rest[i].tag for i in head]
        k = next((k for k in range(min(len(sounds), len(said)), 0, -1)
                  if said[:k] == sounds[len(sounds) - k:]), 0)
        drop = set(head[:k])
        return [t for i, t in enumerate(rest) if i not in drop]
    kept: list[Token] = []
    i = 0
    k = 0
    while k < len(rest) and not rest[k].is_word:
        t = rest[k]
        j = i
        while j < len(prev_trailer) and not (
            (t.is_tag and prev_trailer[j].is_tag and prev_trailer[j].tag == t.tag)
            or (t.is_punct and prev_trailer[j].is_punct)
        ):
            j += 1
        if j < len(prev_trailer):
            i = j + 1
        elif t.carries:
            kept.append(t)
        else:
            break
        k += 1
    return [*kept, *rest[k:]]


def _sounds_agree(prev: Sequence[Token], pw: Sequence[int], o: int,
                  head: Sequence[Token]) -> bool:
    """Whether the sounds (non-carrying tags) ahead of the overlap words in
    the new hypothesis (``head``) are the ones right before the same words in
    ``prev``. An overlap re-decodes the same audio, so they must be; when
    they are not, the match is a genuine repetition ("Thank you... [sighs]
    thank you")."""
    sounds = [t.tag for t in head if t.is_tag and not t.carries]
    if not sounds:
        return True
    lo = pw[len(pw) - o - 1] + 1 if o < len(pw) else 0
    before = [t.tag for t in prev[lo:pw[len(pw) - o]] if t.is_tag and not t.carries]
    return len(sounds) <= len(before) and before[len(before) - len(sounds):] == sounds


def tag_marks(tokens: Sequence[Token], start: float, end: float) -> tuple[TagMark, ...]:
    """Structured tags of a segment's tokens: the index of the plain-text word
    each precedes and a time interpolated linearly over ``start..end``."""
    if not any(tok.is_tag for tok in tokens):
        return ()  # most captions: no plain text to render and split for indexes
    n = word_count(tokens)
    indexes = iter(tag_word_indexes(tokens))
    marks: list[TagMark] = []
    idx = 0
    for tok in tokens:
        if tok.is_word:
            idx += 1
        elif tok.is_tag:
            index = next(indexes)
            if tok.tag is not None and tok.tag_kind is not None:
                t = start + (end - start) * idx / n if n else start
                marks.append(TagMark(tok.tag, tok.tag_kind.value, index, round(t, 3),
                                     tok.known))
    return tuple(marks)


@dataclass(frozen=True)
class _Chain:
    """What a forced split leaves for the segment that continues it."""

    after: int
    tail: tuple[Token, ...]
    tail_carry: Carry
    end_sample: int

    @property
    def end_carry(self) -> Carry:
        return self.tail_carry.advance_all(self.tail)


class _Segment:
    """Mutable per-segment state (internal; events are the frozen output)."""

    __slots__ = ("committed", "cover", "held", "history", "id", "last", "revision", "shown",
                 "start", "view")

    def __init__(self, segment: int, agreement: int) -> None:
        self.id = segment
        self.revision = -1
        self.committed: tuple[Token, ...] = ()
        self.view: tuple[Token, ...] = ()
        # The tokens of the latest view's hypothesis that cover the committed
        # text (None: a view that could not be cut, held or seam not found).
        self.cover: tuple[Token, ...] | None = None
        self.history: deque[tuple[Token, ...]] = deque(maxlen=agreement - 1)
        self.shown: tuple[str, str] = ("", "")
        self.last: Hypothesis | None = None
        # Whether ``last`` was shown held (unstitched, an earlier segment open).
        self.held = False
        # The sample the caption of ``last`` starts at (after any overlap).
        self.start = 0


class Merger:
    """Turns one stream's hypotheses into caption events (see module doc).

    ``agreement`` is the number of consecutive views that must agree before
    tokens are committed (2 is LocalAgreement-2); ``max_overlap_s`` bounds the
    audio overlap searched when stitching forced splits; ``max_pending`` is
    how many finals may wait for an earlier segment before that segment is
    abandoned (None: no limit); ``first_segment`` is the id of the stream's first segment.
    """

    def __init__(self, stream: str, *, agreement: int = 2, max_overlap_s: float = 3.0,
                 max_pending: int | None = 3, first_segment: int = 0,
                 final_replaces_stable: bool = False) -> None:
        if agreement < 2:
            raise ValueError(f"agreement must be at least 2, got {agreement}")
        if max_overlap_s < 0:
            raise ValueError(f"max_overlap_s must not be negative, got {max_overlap_s}")
        self._stream = stream
        self._agreement = agreement
        self._max_overlap_s = max_overlap_s
        self._max_pending = None if max_pending is None else max(0, max_pending)
        self._seq = 0
        self._open: dict[int, _Segment] = {}
        self._pending: dict[int, Hypothesis] = {}
        self._closed: set[int] = set()
        # Segments before the stream's first count as closed.
        self._closed_below = first_segment
        self._chain: _Chain | None = None
        self._final_replaces = final_replaces_stable

    @property
    def stream(self) -> str:
        return self._stream

    @property
    def seq(self) -> int:
        """The last ``seq`` assigned (0 before the first event)."""
        return self._seq

    @property
    def open_segments(self) -> tuple[int, ...]:
        """Segments seen whose final event has not been emitted yet."""
        return tuple(sorted(self._open))

    def reusable_prefix(self, segment: int, end_sample: int) -> str:
        """The committed text of ``segment``, rendered as the model writes it
        (tags inline), for a decode of its audio up to ``end_sample`` to
        continue from; "" when that would not be simply a prefix of what the
        segment's own audio produced.

        Non-empty only for an open segment that is neither held nor stitched
        (it does not continue a forced split), whose committed text starts the
        text of its latest partial literally (so no committed word was revised
        or aligned over, and tags are canonical), and whose latest partial's
        audio ends at or before ``end_sample`` (a forced final is cut before
        audio its partials heard). A pure query: nothing changes.
        """
        seg = self._open.get(segment)
        last = seg.last if seg is not None else None
        # A final waiting in _pending is held too, so _blocked covers it.
        if (seg is None or last is None or not seg.committed or self._blocked(segment)
                or self._chain_for(segment) is not None or last.end_sample > end_sample):
            return ""
        n = len(seg.committed)
        text = render(seg.committed)
        if (_lstrip(tokenize(last.text))[:n] != seg.committed
                or not last.text.strip().startswith(text)):
            return ""
        return text

    def feed(self, h: Hypothesis) -> list[CaptionEvent]:
        """Take one hypothesis; return the events it causes, in ``seq`` order."""
        if h.stream != self._stream:
            raise ValueError(f"hypothesis of stream {h.stream!r} fed to the merger of "
                             f"{self._stream!r}")
        sid = h.segment
        if self._is_closed(sid) or sid in self._pending:
            return []
        seg = self._open.get(sid)
        if seg is None:
            seg = self._open[sid] = _Segment(sid, self._agreement)
        if h.final:
            seg.revision = max(seg.revision, h.revision)
            if not self._blocked(sid):
                return [self._finish(seg, h, stitched=True), *self._drain()]
            self._pending[sid] = h
            return self._limit_pending()
        if h.revision <= seg.revision:
            return []
        seg.revision = h.revision
        event = self._partial(seg, h)
        return [event] if event is not None else []

    def abandon(self, segment: int) -> list[CaptionEvent]:
        """Close ``segment`` whose final will never come: its final event
        carries the latest text shown, with the start it was shown with
        (without a final, the next segment is not stitched to it), or the
        final already received if one is waiting. Text shown while the
        segment was held, before the forced split it continues closed, was
        never stitched: its latest partial's hypothesis is then stitched as
        a final would be.

        A held segment (an earlier one is still open) keeps its place: its
        final waits like any held final and is emitted, in order, once the
        earlier segments close; it is then the final received or else its
        latest partial's hypothesis, stitched as a final would be. A held
        segment that never showed anything closes silently.
        Returns the events this causes (none for a segment never seen or
        already closed), in ``seq`` order."""
        seg = self._open.get(segment)
        if seg is None:
            if self._is_closed(segment):
                return []
            self._mark_closed(segment)
            return self._drain()
        if self._blocked(segment):
            return self._hold_abandoned(seg)
        h = self._pending.pop(segment, None)
        if h is not None:
            return [self._finish(seg, h, stitched=True), *self._drain()]
        last = seg.last
        if last is None:
            # Nothing was ever shown for it: close it silently.
            del self._open[segment]
            self._mark_closed(segment)
            return self._drain()
        if seg.held and self._chain_for(segment) is not None:
            # Its text still holds the overlap words the previous final ends
            # with, and starts inside that caption.
            h = replace(last, kind=RequestKind.FINAL, forced_end=False)
            return [self._finish(seg, h, stitched=True), *self._drain()]
        h = Hypothesis(last.stream, last.segment, last.revision, last.kind,
                       render(seg.view), last.start_sample, last.end_sample,
                       last.ready_at, last.done_at, False)
        event = self._finish(seg, h, stitched=False, as_final=True)
        return [event, *self._drain()]

    def close(self) -> list[CaptionEvent]:
        """The stream is over: abandon every segment not closed, in order, up
        to the last one seen or closed (an id never seen closes silently), so
        that :attr:`open_segments` is empty and a late hypothesis of any of
        them is ignored. Returns the events, in ``seq`` order."""
        events: list[CaptionEvent] = []
        # Ids closed above the watermark (abandoned unseen) leave ids below
        # them that were never seen: those close too.
        while self._open or self._closed:
            # The lowest id not closed: held by none, it holds every later one.
            events.extend(self.abandon(self._closed_below))
        return events

    # --- internals ---------------------------------------------------------

    def _is_closed(self, sid: int) -> bool:
        return sid < self._closed_below or sid in self._closed

    def _mark_closed(self, sid: int) -> None:
        # Closed ids from the watermark up fold into it, so with consecutive
        # ids the set stays small; the watermark stops at any id not closed.
        self._closed.add(sid)
        while self._closed_below in self._closed:
            self._closed.discard(self._closed_below)
            self._closed_below += 1

    def _blocked(self, sid: int) -> bool:
        # Any earlier id not closed holds it, seen or not: with only sid - 1
        # and the open ones asked, an id never seen was passed over once the
        # one after it closed silently (abandoned unseen), and its final came
        # after later ones. The watermark is the lowest id not closed.
        return self._closed_below < sid

    def _hold_abandoned(self, seg: _Segment) -> list[CaptionEvent]:
        """Abandon held ``seg`` in its place (see :meth:`abandon`)."""
        if seg.id not in self._pending:
            last = seg.last
            if last is None:
                del self._open[seg.id]
                self._mark_closed(seg.id)
                return []
            # Its final stands in the queue of held finals (feed ignores
            # later hypotheses of it); stitched when released, as a final.
            self._pending[seg.id] = replace(last, kind=RequestKind.FINAL, forced_end=False)
        return self._limit_pending()

    def _limit_pending(self) -> list[CaptionEvent]:
        """Abandon the segment holding the earliest waiting final while more
        than ``max_pending`` wait."""
        events: list[CaptionEvent] = []
        if self._max_pending is None:
            return events
        while len(self._pending) > self._max_pending:
            # The lowest id not closed holds every waiting final.
            events.extend(self.abandon(self._closed_below))
        return events

    def _drain(self) -> list[CaptionEvent]:
        out: list[CaptionEvent] = []
        while self._pending:
            sid = min(self._pending)
            if self._blocked(sid):
                break
            h = self._pending.pop(sid)
            out.append(self._finish(self._open[sid], h, stitched=True))
        return out

    def _chain_for(self, sid: int) -> _Chain | None:
        chain = self._chain
        if chain is None:
            return None
        return chain if sid == chain.after + 1 else None

    def _tokens(self, h: Hypothesis, chain: _Chain | None
                ) -> tuple[tuple[Token, ...], tuple[Token, ...], int, bool]:
        """The hypothesis' tokens (stitched when it continues a forced split)
        less a square-bracket tag cut short at the end, that half tag, the
        sample its caption starts at, and whether the seam was found.

        The half tag stays out of stitching and alignment: its "[" is no
        punctuation re-decoding the previous text's, nor a word revising a
        committed one, and either would drop it and leave the half name a
        word ("clea") that partials commit."""
        tokens, half = _split_open_bracket(tokenize(h.text))
        if chain is None:
            return _lstrip(tokens), half, h.start_sample, True
        overlap_s = min(max(0, chain.end_sample - h.start_sample) / SAMPLE_RATE,
                        self._max_overlap_s)
        inside = h.end_sample < chain.end_sample
        stitched, found = stitch(chain.tail, chain.end_carry, tokens, overlap_s=overlap_s,
                                 inside=inside)
        # Inside the overlap all of it is old audio: nothing of it shows.
        return stitched, () if inside else half, max(h.start_sample, chain.end_sample), found

    def _partial(self, seg: _Segment, h: Hypothesis) -> CaptionEvent | None:
        blocked = self._blocked(seg.id)
        chain = None if blocked else self._chain_for(seg.id)
        tokens, half, start, found = self._tokens(h, chain)
        tail, aligned = tail_after(seg.committed, tokens)
        view = _lstrip((*seg.committed, *tail, *half))
        cover = None if blocked or not found else tokens[:len(tokens) - len(tail)]
        if cover is None:
            # This view may be cut wrongly (stitching once the earlier
            # segment closes or the overlap is recognised), so nothing of it
            # becomes stable.
            seg.history.clear()
        elif not aligned and cover != seg.cover:
            # An alignment guessed over revised words ("to" -> "today") may
            # be cut wrongly: it starts the agreement afresh. The same guess
            # from the next hypothesis (the same tokens over the committed
            # text) agrees with it, or a respelled last committed word
            # would stop the commits for the rest of the segment.
            seg.history.clear()
            seg.history.append(view)
        else:
            if len(seg.history) == seg.history.maxlen:
                # A tag cut short is punctuation and words to the tokenizer,
                # which two partials may agree on; committed, the whole tag
                # would later read as revised words. So would a word cut at
                # its apostrophe ("don'" of "don't").
                agreed = min(min(_lcp(v, view) for v in seg.history), _open_tag(view),
                             _open_word(view))
                if agreed > len(seg.committed):
                    seg.committed = view[:agreed]
            seg.history.append(view)
        seg.view = view
        seg.cover = cover
        seg.last = h
        seg.held = blocked
        seg.start = start
        shown = (render(view), render(seg.committed))
        if shown == seg.shown:
            return None
        seg.shown = shown
        return self._event(seg, view, False, h, start, continues=chain is not None)

    def _finish(self, seg: _Segment, h: Hypothesis, *, stitched: bool,
                as_final: bool = False) -> CaptionEvent:
        continues = self._chain_for(seg.id) is not None
        chain = self._chain_for(seg.id) if stitched else None
        # A tag the model was cut off inside ("and then [laug": its token
        # budget, the loop cutter) is no word the speaker said, and no tag:
        # it is left out. Partials never commit it (_open_tag), so no
        # committed token goes.
        if as_final:
            # The text shown, already stitched: it starts where it was shown
            # to (after the overlap that belongs to the previous caption).
            tokens = tuple(_close_open_bracket(_lstrip(tokenize(h.text))))
            start = seg.start
        else:
            tokens, _, start, _ = self._tokens(h, chain)
        if self._final_replaces and not as_final:
            # The final decode heard the whole segment: it wins over words
            # that partials of a shorter prefix agreed on.
            view = tokens
        else:
            tail = tail_after(seg.committed, tokens)[0]
            # Tags the final places inside the committed text are inserted
            # there (never lost); committed tokens stay as they are.
            region = tokens[:len(tokens) - len(tail)]
            view = place_tags(seg.committed, region) + tail
        seg.committed = seg.view = view
        del self._open[seg.id]
        self._mark_closed(seg.id)
        if h.forced_end:
            if chain is not None:
                full, carry0 = chain.tail + view, chain.tail_carry
            else:
                full, carry0 = view, Carry()
            cut = max(0, len(full) - _TAIL_TOKENS)
            self._chain = _Chain(
                after=seg.id,
                tail=full[cut:],
                tail_carry=carry0.advance_all(full[:cut]),
                end_sample=h.end_sample,
            )
        else:
            self._chain = None
        return self._event(seg, view, True, h, start, continues=continues)

    def _event(self, seg: _Segment, view: tuple[Token, ...], final: bool, h: Hypothesis,
               start_sample: int, *, continues: bool) -> CaptionEvent:
        committed = view if final else seg.committed
        text = render(view)
        stable = render(committed)
        start = start_sample / SAMPLE_RATE
        end = max(h.end_sample, start_sample) / SAMPLE_RATE
        self._seq += 1
        return CaptionEvent(
            stream=self._stream,
            segment=seg.id,
            seq=self._seq,
            final=final,
            text=text,
            plain_text=render(view if final else _close_open_bracket(view), tags=False),
            stable=stable,
            unstable=text[len(stable):],
            tags=tag_marks(view, start, end),
            start=start,
            end=end,
            latency=h.latency,
            continues=continues,
        )
