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
  of the last n views of the segment is committed. Committed (``stable``)
  text is never retracted or changed, by later partials or by the final: a
  hypothesis that revises committed words is aligned after them and only its
  tail is used. ``text == stable + unstable``, and the stable text of a
  segment only grows. The final's text is the committed text followed by the
  rest of the final hypothesis.
- Forced splits: when a segment's final has ``forced_end=True`` the next
  segment continues the sentence and is *stitched*:

  1. Overlap. Only when its audio starts before the previous segment's end
     (``start_sample < previous end_sample``): the longest run of words at
     the start of the hypothesis that equals the last words of the text
     already emitted (case and punctuation ignored; at most 5 words per
     second of overlap audio, + 1, capped at ``max_overlap_s``) is dropped,
     with everything before it (a tag re-emitted ahead of the overlap, say).
     Where several lengths match, the one closest to what the overlap's
     duration predicts at the previous segment's speaking rate wins (ties:
     the longer). Right after the seam, punctuation is dropped when the
     previous text already had some there, and a tag is dropped when the
     previous text already ended with it (a tag right at the boundary).
     A partial that lies wholly inside the overlap shows nothing.
  2. Carry-over. Leading tags of the remaining text that restate an emotion
     or delivery tag still in effect at the end of the previous text (see
     :class:`~evoxtral_stream.text.tags.Carry`: until replaced by one of its
     kind or until the sentence ends) are dropped. Non-verbal and pause tags
     never carry.

  Segments after a natural end (``forced_end=False``) are not stitched.
  A caption's ``start`` is then ``max(start_sample, previous end_sample)``:
  the overlap audio belongs to the previous caption.
- Segment ids are consecutive per stream (the session numbers them so), and
  every segment gets one final. Segment ``s`` is *held* while ``s - 1`` is
  not closed (unless no segment below ``s`` was ever seen: the stream's
  first) or any earlier segment seen is still open: a held segment commits
  nothing (its partials are all unstable) and its final waits; it is
  emitted, stitched, as soon as the earlier segments close. Call
  :meth:`Merger.abandon` when a segment's final will never come (a failed
  decode); failing that, when more than ``max_pending`` finals wait, the
  segment holding them is abandoned automatically.
- Times: ``start``/``end`` are stream seconds (``SAMPLE_RATE``). A tag's
  ``TagMark.index`` is the number of plain-text words before it in the
  segment's text; ``TagMark.t`` interpolates linearly: ``start + (end -
  start) * index / words`` (``start`` when there are no words).

Exactness: if no two consecutive hypotheses of a segment agree on a wrong
token, the committed text is a prefix of the final hypothesis and the final
caption text equals it (stitched). A known ambiguity: a genuine repetition of
an in-effect emotion/delivery tag exactly at a forced seam is taken for a
re-emission and dropped.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

from ..events import SAMPLE_RATE, CaptionEvent, Hypothesis, TagMark
from .tags import Carry, Token, render, tokenize, word_count

__all__ = [
    "MAX_OVERLAP_WORDS_PER_S",
    "Merger",
    "match_key",
    "stitch",
    "tag_marks",
    "tail_after",
]

# Fast speech is about 4 words a second; the bound keeps a short overlap from
# swallowing a genuine repetition ("I... I don't").
MAX_OVERLAP_WORDS_PER_S = 5.0
# Tokens of emitted text kept for overlap matching and the carry state.
_TAIL_TOKENS = 96
# Closed segment ids remembered exactly; older ones are known by a watermark.
_CLOSED_KEEP = 1024


def match_key(tok: Token) -> str:
    """Comparison key of a token for stitching and alignment: words case- and
    punctuation-insensitive, tags by canonical name."""
    if tok.is_tag:
        return f"[{tok.tag}]"
    low = tok.text.casefold()
    return "".join(ch for ch in low if ch.isalnum()) or low


def _lcp(a: Sequence[Token], b: Sequence[Token]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _lstrip(tokens: Sequence[Token]) -> tuple[Token, ...]:
    if tokens and tokens[0].space_before:
        return (tokens[0].with_space(False), *tokens[1:])
    return tuple(tokens)


def tail_after(committed: Sequence[Token], tokens: Sequence[Token]) -> tuple[Token, ...]:
    """The part of ``tokens`` (a whole-segment hypothesis) that comes after
    the ``committed`` prefix. When the hypothesis revised committed tokens,
    they are aligned (difflib on :func:`match_key`) and the position after
    the last aligned committed token is used."""
    n = len(committed)
    if tuple(tokens[:n]) == tuple(committed):
        return tuple(tokens[n:])
    a = [match_key(t) for t in committed]
    b = [match_key(t) for t in tokens]
    blocks = [blk for blk in SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
              if blk.size]
    if not blocks:
        j = n
    else:
        last = blocks[-1]
        # Unmatched committed tokens after the last match are taken as
        # substituted one for one.
        j = last.b + last.size + (n - (last.a + last.size))
    return tuple(tokens[min(j, len(tokens)):])


def stitch(
    prev: Sequence[Token],
    prev_end: Carry,
    tokens: Sequence[Token],
    *,
    overlap_s: float,
    words_per_s: float | None,
    partial: bool = False,
) -> tuple[tuple[Token, ...], bool]:
    """Drop from ``tokens`` (the hypothesis of a segment continuing a forced
    split) what the previous text ``prev`` already said: see the module doc.

    ``prev_end`` is the carry state at the end of ``prev``; ``overlap_s`` is
    how much of the new audio the previous segment already covered (bounded
    by the caller); ``words_per_s`` the previous segment's speaking rate, or
    None when unknown (then the longest match wins).

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
        max_o = min(len(pkeys), math.ceil(overlap_s * MAX_OVERLAP_WORDS_PER_S) + 1)
        expected = overlap_s * words_per_s if words_per_s else None
        best: int | None = None
        best_score: tuple[float, int] | None = None
        for o in range(1, max_o + 1):
            m = min(o, len(nkeys))
            if m == 0:
                break
            suffix = pkeys[len(pkeys) - o:]
            head = nkeys[:m]
            if m == o:
                ok = head == suffix
            else:
                # The hypothesis ends inside the overlap; its last word may be
                # cut short on a partial.
                last_ok = head[-1] == suffix[m - 1] or (
                    partial and suffix[m - 1].startswith(head[-1]))
                ok = head[:-1] == suffix[:m - 1] and last_ok
            if not ok:
                continue
            score = (abs(o - expected) if expected is not None else 0.0, -o)
            if best_score is None or score < best_score:
                best, best_score = o, score
        prev_trailer = prev[pw[-1] + 1:] if pw else prev
        found = best is not None
        if best is not None:
            if len(nkeys) < best:
                return (), True
            rest = tokens[nw[best - 1] + 1:]
        seen = Counter(t.tag for t in prev_trailer if t.is_tag)
        prev_punct = any(t.is_punct for t in prev_trailer)
        kept: list[Token] = []
        k = 0
        while k < len(rest) and not rest[k].is_word:
            t = rest[k]
            if t.is_tag and seen[t.tag] > 0:
                seen[t.tag] -= 1
            elif not (t.is_punct and prev_punct and best is not None):
                kept.append(t)
            k += 1
        rest = [*kept, *rest[k:]]
    out: list[Token] = []
    state = prev_end
    leading = True
    for t in rest:
        if leading and t.is_tag:
            if state.holds(t):
                continue
            state = state.advance(t)
        else:
            leading = False
        out.append(t)
    return _lstrip(out), found


def tag_marks(tokens: Sequence[Token], start: float, end: float) -> tuple[TagMark, ...]:
    """Structured tags of a segment's tokens: the index of the plain-text word
    each precedes and a time interpolated linearly over ``start..end``."""
    n = word_count(tokens)
    marks: list[TagMark] = []
    idx = 0
    for tok in tokens:
        if tok.is_word:
            idx += 1
        elif tok.is_tag and tok.tag is not None and tok.tag_kind is not None:
            t = start + (end - start) * idx / n if n else start
            marks.append(TagMark(tok.tag, tok.tag_kind.value, idx, round(t, 3), tok.known))
    return tuple(marks)


@dataclass(frozen=True)
class _Chain:
    """What a forced split leaves for the segment that continues it."""

    after: int
    tail: tuple[Token, ...]
    tail_carry: Carry
    end_sample: int
    words_per_s: float | None

    @property
    def end_carry(self) -> Carry:
        return self.tail_carry.advance_all(self.tail)


class _Segment:
    """Mutable per-segment state (internal; events are the frozen output)."""

    __slots__ = ("committed", "history", "id", "last", "revision", "shown", "view")

    def __init__(self, segment: int, agreement: int) -> None:
        self.id = segment
        self.revision = -1
        self.committed: tuple[Token, ...] = ()
        self.view: tuple[Token, ...] = ()
        self.history: deque[tuple[Token, ...]] = deque(maxlen=agreement - 1)
        self.shown: tuple[str, str] = ("", "")
        self.last: Hypothesis | None = None


class Merger:
    """Turns one stream's hypotheses into caption events (see module doc).

    ``agreement`` is the number of consecutive views that must agree before
    tokens are committed (2 is LocalAgreement-2); ``max_overlap_s`` bounds the
    audio overlap searched when stitching forced splits; ``max_pending`` is
    how many finals may wait for an earlier segment before that segment is
    abandoned.
    """

    def __init__(self, stream: str, *, agreement: int = 2, max_overlap_s: float = 3.0,
                 max_pending: int = 3) -> None:
        if agreement < 2:
            raise ValueError(f"agreement must be at least 2, got {agreement}")
        if max_overlap_s < 0:
            raise ValueError(f"max_overlap_s must not be negative, got {max_overlap_s}")
        self._stream = stream
        self._agreement = agreement
        self._max_overlap_s = max_overlap_s
        self._max_pending = max(0, max_pending)
        self._min_seen: int | None = None
        self._seq = 0
        self._open: dict[int, _Segment] = {}
        self._pending: dict[int, Hypothesis] = {}
        self._closed: set[int] = set()
        self._closed_below = -(2**62)
        self._chain: _Chain | None = None

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
            if self._min_seen is None or sid < self._min_seen:
                self._min_seen = sid
        if h.final:
            seg.revision = max(seg.revision, h.revision)
            if not self._blocked(sid):
                return [self._finish(seg, h, stitched=True), *self._drain()]
            self._pending[sid] = h
            events: list[CaptionEvent] = []
            while len(self._pending) > self._max_pending:
                events.extend(self.abandon(self._blocker(min(self._pending))))
            return events
        if h.revision <= seg.revision:
            return []
        seg.revision = h.revision
        event = self._partial(seg, h)
        return [event] if event is not None else []

    def abandon(self, segment: int) -> list[CaptionEvent]:
        """Close ``segment`` whose final will never come: its final event
        carries the latest text shown (or a final already received), and the
        next segment is not stitched to it. Returns that event (none for a
        segment never seen or already closed) and any finals it released."""
        if self._is_closed(segment):
            return []
        seg = self._open.get(segment)
        if seg is None:
            self._mark_closed(segment)
            return self._drain()
        h = self._pending.pop(segment, None)
        blocked = self._blocked(segment)
        if h is None:
            last = seg.last
            if last is None:
                # Nothing was ever shown for it: close it silently.
                del self._open[segment]
                self._mark_closed(segment)
                return self._drain()
            h = Hypothesis(last.stream, last.segment, last.revision, last.kind,
                           render(seg.view), last.start_sample, last.end_sample,
                           last.ready_at, last.done_at, False)
            event = self._finish(seg, h, stitched=False, as_final=True)
        else:
            event = self._finish(seg, h, stitched=not blocked)
        return [event, *self._drain()]

    # --- internals ---------------------------------------------------------

    def _is_closed(self, sid: int) -> bool:
        return sid < self._closed_below or sid in self._closed

    def _mark_closed(self, sid: int) -> None:
        self._closed.add(sid)
        if len(self._closed) > _CLOSED_KEEP:
            # Segment ids grow, so the oldest ones are the least likely to
            # see a late partial; below the watermark everything is closed.
            for old in sorted(self._closed)[: len(self._closed) - _CLOSED_KEEP // 2]:
                self._closed.discard(old)
                self._closed_below = max(self._closed_below, old + 1)

    def _blocked(self, sid: int) -> bool:
        if any(other < sid for other in self._open):
            return True
        first = self._min_seen is None or self._min_seen >= sid
        return not first and not self._is_closed(sid - 1)

    def _blocker(self, sid: int) -> int:
        """The earliest segment that holds ``sid``."""
        earlier = [other for other in self._open if other < sid]
        return min(earlier) if earlier else sid - 1

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

    def _tokens(self, h: Hypothesis,
                chain: _Chain | None) -> tuple[tuple[Token, ...], int, bool]:
        """The hypothesis' tokens (stitched when it continues a forced split),
        the sample its caption starts at, and whether the seam was found."""
        tokens = tokenize(h.text)
        if chain is None:
            return _lstrip(tokens), h.start_sample, True
        overlap_s = min(max(0, chain.end_sample - h.start_sample) / SAMPLE_RATE,
                        self._max_overlap_s)
        stitched, found = stitch(chain.tail, chain.end_carry, tokens, overlap_s=overlap_s,
                                 words_per_s=chain.words_per_s, partial=not h.final)
        return stitched, max(h.start_sample, chain.end_sample), found

    def _partial(self, seg: _Segment, h: Hypothesis) -> CaptionEvent | None:
        blocked = self._blocked(seg.id)
        tokens, start, found = self._tokens(h, None if blocked else self._chain_for(seg.id))
        view = seg.committed + tail_after(seg.committed, tokens)
        if blocked or not found:
            # Stitching may still cut this text's head (once the earlier
            # segment closes, or once the overlap is recognised), so nothing
            # of it may become stable yet.
            seg.history.clear()
        else:
            if len(seg.history) == seg.history.maxlen:
                agreed = min(_lcp(v, view) for v in seg.history)
                if agreed > len(seg.committed):
                    seg.committed = view[:agreed]
            seg.history.append(view)
        seg.view = view
        seg.last = h
        shown = (render(view), render(seg.committed))
        if shown == seg.shown:
            return None
        seg.shown = shown
        return self._event(seg, view, False, h, start)

    def _finish(self, seg: _Segment, h: Hypothesis, *, stitched: bool,
                as_final: bool = False) -> CaptionEvent:
        chain = self._chain_for(seg.id) if stitched else None
        if as_final:
            tokens, start = _lstrip(tokenize(h.text)), h.start_sample
        else:
            tokens, start, _ = self._tokens(h, chain)
        view = seg.committed + tail_after(seg.committed, tokens)
        seg.committed = seg.view = view
        del self._open[seg.id]
        self._mark_closed(seg.id)
        if h.forced_end:
            if chain is not None:
                full, carry0 = chain.tail + view, chain.tail_carry
            else:
                full, carry0 = view, Carry()
            cut = max(0, len(full) - _TAIL_TOKENS)
            dur = (h.end_sample - start) / SAMPLE_RATE
            words = word_count(view)
            self._chain = _Chain(
                after=seg.id,
                tail=full[cut:],
                tail_carry=carry0.advance_all(full[:cut]),
                end_sample=h.end_sample,
                words_per_s=words / dur if words and dur > 0 else None,
            )
        else:
            self._chain = None
        return self._event(seg, view, True, h, start)

    def _event(self, seg: _Segment, view: tuple[Token, ...], final: bool, h: Hypothesis,
               start_sample: int) -> CaptionEvent:
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
            plain_text=render(view, tags=False),
            stable=stable,
            unstable=text[len(stable):],
            tags=tag_marks(view, start, end),
            start=start,
            end=end,
            latency=h.latency,
        )
