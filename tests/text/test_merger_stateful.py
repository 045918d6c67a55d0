"""A stateful model of the merger (Hypothesis RuleBasedStateMachine).

One stream's segments, each with a true text, get partials (growing,
shrinking, rewritten, tags added, dropped or cut short, control characters,
revisions new, repeated, stale or ahead), finals (in or out of segment
order, empty, cut inside a tag, forced ends continued by the next segment
with or without audio overlap) and abandons as the engine makes them on a
failed final decode; a second stream's hypotheses are refused. After every
step the events obey the module doc's contracts: ``text == stable +
unstable``, ``seq`` one up per event from 1, no control characters, partial
``stable`` only grows, one final per segment, in segment order, nothing of a
segment after its final, times inside the hypotheses' audio, and a final's
text is its hypothesis (or the text shown, when abandoned) up to the
documented normalisation and stitching.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from evoxtral_stream.events import SAMPLE_RATE, CaptionEvent, Hypothesis, RequestKind
from evoxtral_stream.text.chars import CONTROL
from evoxtral_stream.text.merger import Merger, match_key
from evoxtral_stream.text.tags import Token, render, tokenize

WORDS = ("so", "I", "was", "thinking", "maybe", "we", "could", "try", "that", "FREE",
         "don't", "okay", "wait")
# Sounds, emotions and deliveries, variants the tokenizer normalises, an unknown tag.
TAGS = ("[laughs]", "[sighs]", "[whispers]", "[nervous]", "[excited]", "[clears throat]",
        "[pause]", "(laughs)", "［sighs］", "[Whispering]", "[odd noise]")
PUNCT = (",", ".", "...", "?", "!")
HALF_TAGS = (" [clea", " [laug", "[whis")
CONTROLS = ("\x1b", "\x00", "\t\x7f", "\x9b")
MAX_SEGMENTS = 6
_CONTROL = re.compile(f"[{CONTROL}]")

parts = st.sampled_from(WORDS * 3 + TAGS + PUNCT)


def toks(text: str) -> tuple[Token, ...]:
    """Tokens of ``text`` as a caption would carry them (no leading space)."""
    out = tokenize(text)
    if out and out[0].space_before:
        out[0] = out[0].with_space(False)
    return tuple(out)


def keys(tokens: tuple[Token, ...], *, tags: bool = True) -> list[str]:
    """Tokens as written (tags canonical), spacing aside."""
    return [t.text for t in tokens if tags or not t.is_tag]


def words(tokens: tuple[Token, ...]) -> list[str]:
    return [match_key(t) for t in tokens if t.is_word]


def less_leading_carried(final: tuple[Token, ...], hyp: tuple[Token, ...]) -> bool:
    """Whether ``final`` is ``hyp`` less some of its leading emotion/delivery
    tags (the carry-over at a forced seam)."""
    i = 0
    while i < len(hyp) and hyp[i].is_tag:
        i += 1
    j = 0
    while j < len(final) and final[j].is_tag:
        j += 1
    if keys(final[j:]) != keys(hyp[i:]):
        return False
    kept = iter(keys(final[:j]))
    want = next(kept, None)
    for t in hyp[:i]:
        if want is not None and t.text == want:
            want = next(kept, None)
        elif not t.carries:
            return False  # a sound tag dropped
    return want is None


@dataclass
class Seg:
    """The model's segment: its true text and what was fed and shown."""

    id: int
    truth: tuple[Token, ...]
    lead: tuple[Token, ...]       # words of the segment before, re-decoded in the overlap
    start: int                    # its own audio, in samples
    end: int
    overlap: int                  # samples of the previous segment's audio it starts with
    forced_end: bool
    rev: int = -1                 # the newest revision the merger saw
    seen: bool = False
    noisy: bool = False           # an accepted partial that was no prefix of the truth
    last_half: bool = False       # the latest accepted partial ended inside a tag
    last_h: Hypothesis | None = None
    last_held: bool = False       # it was fed while an earlier segment was open
    final_h: Hypothesis | None = None
    final_body: str = ""          # final_h's text less a half tag
    final_exact: bool = False     # final_h is the truth (spacing, controls aside)
    abandoned: bool = False       # abandon called (before its final event)
    pending_by_abandon: bool = False  # abandoned while held: its final stands queued
    silent: bool = False          # closed without a final event
    partials: list[CaptionEvent] = field(default_factory=list)
    final: CaptionEvent | None = None
    final_chained: bool = False
    from_final: bool = False      # its final event came from final_h (else from abandon)

    @property
    def hyp_start(self) -> int:
        return self.start - self.overlap


class MergerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.segs: list[Seg] = []
        self.events: list[CaptionEvent] = []
        self.ended = False

    @initialize(
        replaces=st.booleans(),
        max_pending=st.sampled_from([None, None, 0, 1, 3]),
        agreement=st.sampled_from([2, 2, 3]),
        first=st.sampled_from([0, 4]),
    )
    def start(self, replaces: bool, max_pending: int | None, agreement: int,
              first: int) -> None:
        self.replaces = replaces
        self.max_pending = max_pending
        self.first = first
        self.m = Merger("s", agreement=agreement, max_pending=max_pending,
                        first_segment=first, final_replaces_stable=replaces)

    # --- the model's view ---------------------------------------------------

    def seg(self, sid: int) -> Seg:
        return self.segs[sid - self.first]

    def closed(self, s: Seg) -> bool:
        return s.final is not None or s.silent or (s.seen and s.id not in self.m.open_segments)

    def held(self, s: Seg) -> bool:
        """Whether an earlier segment is open (as the merger counts it; a
        segment never seen is open until closed, which the model notes)."""
        return any(not self.closed(e) for e in self.segs[: s.id - self.first])

    def chained(self, s: Seg) -> bool:
        """Whether ``s`` continues a forced split whose final was the
        segment before's own (an abandoned one ends no sentence)."""
        if s.id == self.first:
            return False
        p = self.seg(s.id - 1)
        return p.final is not None and p.forced_end and p.from_final

    def hyp(self, s: Seg, rev: int, kind: RequestKind, text: str, end: int,
            stream: str = "s") -> Hypothesis:
        return Hypothesis(stream, s.id, rev, kind, text, s.hyp_start, max(end, s.start),
                          ready_at=end / SAMPLE_RATE, done_at=end / SAMPLE_RATE + 0.1,
                          forced_end=s.forced_end and kind is RequestKind.FINAL)

    def text_of(self, s: Seg, body: tuple[Token, ...]) -> str:
        lead = render(s.lead)
        rest = render(body)
        return f"{lead} {rest}" if lead and rest else lead or rest

    def open_ids(self, *, finalable: bool = False) -> list[int]:
        return [s.id for s in self.segs
                if s.final is None and not s.silent
                and not (finalable and (s.final_h is not None or s.pending_by_abandon))]

    # --- rules -------------------------------------------------------------------

    @precondition(lambda self: not self.ended and len(self.segs) < MAX_SEGMENTS)
    @rule(truth=st.lists(parts, max_size=7) | st.lists(parts, min_size=3, max_size=7),
          forced_end=st.booleans(),
          overlap_s=st.sampled_from([0.0, 0.0, 0.4, 1.0]), lead=st.integers(0, 3))
    def open_segment(self, truth: list[str], forced_end: bool, overlap_s: float,
                     lead: int) -> None:
        sid = self.first + len(self.segs)
        prev = self.segs[-1] if self.segs else None
        if prev is not None and prev.forced_end:
            start = prev.end  # a forced split cuts speech: the next segment goes on
            overlap = round(overlap_s * SAMPLE_RATE)
            n = min(lead, round(overlap_s * 5))
            lead_toks = tuple(t.with_space(i > 0) for i, t in enumerate(
                [t for t in prev.truth if t.is_word][-n:] if n else []))
        else:
            start = (prev.end if prev is not None else 0) + SAMPLE_RATE // 2
            overlap, lead_toks = 0, ()
        self.segs.append(Seg(sid, toks(" ".join(truth)), lead_toks, start,
                             start + 2 * SAMPLE_RATE, overlap, forced_end))

    @precondition(lambda self: not self.ended and self.segs)
    @rule(data=st.data(), what=st.sampled_from(["closed", "other_stream"]))
    def refused(self, data: st.DataObject, what: str) -> None:
        """A partial or final of a segment already closed, or of another
        stream: ignored, or refused, and nothing changes."""
        seq, open_ = self.m.seq, self.m.open_segments
        kind = data.draw(st.sampled_from(RequestKind), label="kind")
        if what == "other_stream":
            s = data.draw(st.sampled_from(self.segs), label="segment")
            with pytest.raises(ValueError, match="stream"):
                self.m.feed(self.hyp(s, s.rev + 1, kind, "Hello.", s.end, stream="t"))
        else:
            done = [s for s in self.segs if s.final is not None]
            if not done:
                return
            s = data.draw(st.sampled_from(done), label="segment")
            assert self.m.feed(self.hyp(s, s.rev + 1, kind, "something else", s.end)) == []
        assert (self.m.seq, self.m.open_segments) == (seq, open_)

    @precondition(lambda self: not self.ended and self.open_ids())
    @rule(data=st.data(),
          shape=st.sampled_from(["prefix", "prefix", "half", "rewrite", "tag_insert",
                                 "tag_drop", "control"]),
          revision=st.sampled_from(["next", "next", "next", "repeat", "stale", "ahead"]))
    def partial(self, data: st.DataObject, shape: str, revision: str) -> None:
        s = self.seg(data.draw(st.sampled_from(self.open_ids()), label="segment"))
        k = data.draw(st.integers(0, len(s.truth)), label="words")
        body = list(s.truth[:k])
        noisy = False
        half = ""
        if shape == "half":
            half = data.draw(st.sampled_from(HALF_TAGS), label="half")
        elif shape == "rewrite" and body:
            i = data.draw(st.integers(0, len(body) - 1), label="at")
            new = toks(data.draw(st.sampled_from(WORDS), label="word"))[0]
            noisy = match_key(new) != match_key(body[i])
            body[i] = new.with_space(body[i].space_before or i > 0)
        elif shape == "tag_insert":
            i = data.draw(st.integers(0, len(body)), label="at")
            body.insert(i, toks(data.draw(st.sampled_from(TAGS), label="tag"))[0]
                        .with_space(True))
            noisy = True
        elif shape == "tag_drop":
            at = [i for i, t in enumerate(body) if t.is_tag]
            if at:
                del body[data.draw(st.sampled_from(at), label="at")]
                noisy = True
        text = self.text_of(s, tuple(body)) + half
        if shape == "control":
            text = text.replace(" ", data.draw(st.sampled_from(CONTROLS), label="ctl") + " ")
        rev = {"next": s.rev + 1, "repeat": s.rev, "stale": s.rev - 1,
               "ahead": s.rev + 3}[revision]
        end = s.start + (s.end - s.start) * k // max(1, len(s.truth))
        h = self.hyp(s, rev, RequestKind.PARTIAL, text, end)
        ignored = rev <= s.rev or s.final_h is not None or s.pending_by_abandon
        held = self.held(s)
        out = self.m.feed(h)
        s.seen = True
        if ignored:
            assert out == [], (h, out)
        else:
            assert len(out) <= 1
            assert all(e.segment == s.id and not e.final for e in out)
            s.rev = rev
            s.noisy |= noisy
            s.last_h, s.last_held, s.last_half = h, held, bool(half)
        self.take(out)

    @precondition(lambda self: not self.ended and self.open_ids(finalable=True))
    @rule(data=st.data(),
          shape=st.sampled_from(["truth", "truth", "half", "rewrite", "empty", "control"]),
          stale=st.booleans())
    def final(self, data: st.DataObject, shape: str, stale: bool) -> None:
        s = self.seg(data.draw(st.sampled_from(self.open_ids(finalable=True)),
                               label="segment"))
        body = list(s.truth)
        half = ""
        exact = True
        if shape == "half":
            half = data.draw(st.sampled_from(HALF_TAGS), label="half")
        elif shape == "rewrite" and body:
            i = data.draw(st.integers(0, len(body) - 1), label="at")
            new = toks(data.draw(st.sampled_from(WORDS), label="word"))[0]
            exact = match_key(new) == match_key(body[i])
            body[i] = new.with_space(body[i].space_before or i > 0)
        elif shape == "empty":
            body = []
            exact = not s.truth
        text = self.text_of(s, tuple(body)) if body or shape != "empty" else ""
        s.final_body = text
        text += half
        if shape == "control":
            text = text.replace(" ", data.draw(st.sampled_from(CONTROLS), label="ctl") + " ")
        # Finals are never dropped for their revision.
        rev = max(0, s.rev - 1) if stale else s.rev + 1
        h = self.hyp(s, rev, RequestKind.FINAL, text, s.end)
        held = self.held(s)
        out = self.m.feed(h)
        s.seen = True
        s.final_h, s.final_exact = h, exact
        s.rev = max(s.rev, rev)
        if not held:
            assert out and out[0].final and out[0].segment == s.id, out
        self.take(out)

    @precondition(lambda self: not self.ended and self.open_ids())
    @rule(data=st.data())
    def fail_final(self, data: st.DataObject) -> None:
        """The engine's answer to a failed final decode (Engine._on_result)."""
        self.abandon(self.seg(data.draw(st.sampled_from(self.open_ids()), label="segment")))

    def held_shown(self) -> list[int]:
        return [sid for sid in self.open_ids(finalable=True)
                if self.seg(sid).last_h is not None and self.held(self.seg(sid))]

    @precondition(lambda self: not self.ended and self.held_shown())
    @rule(data=st.data())
    def fail_held_final(self, data: st.DataObject) -> None:
        """A failed final of a segment shown while an earlier one is open."""
        self.abandon(self.seg(data.draw(st.sampled_from(self.held_shown()), label="segment")))

    def abandon(self, s: Seg) -> None:
        held = self.held(s)
        shown_before = s.last_h is not None
        out = self.m.abandon(s.id)
        s.abandoned = True
        mine = [e for e in out if e.final and e.segment == s.id]
        if not mine and s.id in self.m.open_segments:
            # Held: its final (received, or its latest partial) keeps its place.
            assert held and (shown_before or s.final_h is not None)
            s.pending_by_abandon = s.final_h is None
        elif not mine:
            assert s.final_h is None and not shown_before, "a shown segment lost its final"
            s.silent = True
        self.take(out)

    @precondition(lambda self: not self.ended and len(self.segs) == MAX_SEGMENTS)
    @rule()
    def end_stream(self) -> None:
        self.ended = True
        self.take(self.m.close())
        assert self.m.open_segments == ()
        assert self.m.close() == []
        for s in self.segs:
            if s.final is None and not s.silent:
                # Closed silently: nothing was shown and no final received.
                assert s.last_h is None and s.final_h is None, s
                s.silent = True

    @precondition(lambda self: self.ended)
    @rule(data=st.data())
    def late_after_end(self, data: st.DataObject) -> None:
        """Anything of a segment closed by the end (up to the last one seen) is ignored."""
        seen = [s.id for s in self.segs if s.seen]
        if not seen:
            return
        s = data.draw(st.sampled_from(self.segs[: max(seen) - self.first + 1]),
                      label="segment")
        kind = data.draw(st.sampled_from(RequestKind), label="kind")
        assert self.m.feed(self.hyp(s, s.rev + 1, kind, "late.", s.end)) == []

    def teardown(self) -> None:
        # Hypothesis tears down in a finally: after a failed step the end's
        # checks would fail again on the same fault (the event that failed
        # its check was never recorded, so the next seq looks skipped) and
        # be reported as another distinct failure.
        if hasattr(self, "m") and not self.ended and sys.exc_info()[0] is None:
            self.end_stream()

    # --- checks ---------------------------------------------------------------

    def take(self, out: list[CaptionEvent]) -> None:
        for e in out:
            self.check_event(e)
            self.events.append(e)

    @invariant()
    def nothing_open_is_closed(self) -> None:
        if not hasattr(self, "m"):
            return
        for sid in self.m.open_segments:
            s = self.seg(sid)
            assert s.final is None and not s.silent

    def check_event(self, e: CaptionEvent) -> None:
        assert e.stream == "s"
        assert e.seq == (self.events[-1].seq if self.events else 0) + 1
        assert e.text == e.stable + e.unstable
        for text in (e.text, e.plain_text, e.stable):
            assert not _CONTROL.search(text), e
        s = self.seg(e.segment)
        assert s.final is None and not s.silent, f"event after its segment closed: {e}"
        assert e.start <= e.end
        assert e.start >= s.hyp_start / SAMPLE_RATE - 1e-9
        assert e.end <= max(s.end / SAMPLE_RATE, e.start) + 1e-9
        assert len(e.tags) == sum(1 for t in toks(e.text) if t.is_tag)
        assert all(e.start - 1e-3 <= m.t <= e.end + 1e-3 for m in e.tags)
        if not e.final:
            if s.partials:
                assert e.stable.startswith(s.partials[-1].stable), (s.partials[-1], e)
            s.partials.append(e)
            return
        # Finals in segment order: every earlier segment is closed.
        for p in self.segs[: e.segment - self.first]:
            assert p.id not in self.m.open_segments or p.final is not None, p
            if p.final is None and not p.silent:
                # Never seen, closed without a final: abandoned (by the test,
                # the end or the limit).
                assert p.last_h is None and p.final_h is None
                assert p.abandoned or self.ended or self.max_pending is not None, p
                p.silent = True
        s.final_chained = self.chained(s)
        assert e.continues == s.final_chained
        if s.final_chained:
            p = self.seg(s.id - 1)
            assert p.final is not None
            assert e.start >= p.final.end - 1e-9
        self.check_final_text(s, e)
        s.final = e

    def check_final_text(self, s: Seg, e: CaptionEvent) -> None:
        final = toks(e.text)
        committed = toks(s.partials[-1].stable) if s.partials else ()
        if not self.replaces:
            # Committed words and punctuation stay, tags only inserted.
            assert keys(final, tags=False)[: len(keys(committed, tags=False))] == keys(
                committed, tags=False), (committed, e)
        s.from_final = s.final_h is not None and not s.pending_by_abandon
        if not s.from_final:
            # Abandoned: the text shown last (no half tag) closes the segment.
            if s.last_h is None:
                assert e.text == ""
                return
            shown = s.partials[-1] if s.partials else None
            if s.final_chained and s.last_held:
                # Shown before the seam was known: stitched now, its overlap words gone.
                shown_words = words(toks(shown.plain_text)) if shown else []
                assert words(final) == shown_words[len(shown_words) - len(words(final)):]
                return
            assert e.plain_text == (shown.plain_text if shown else ""), (shown, e)
            if not s.last_half:
                assert e.text == (shown.text if shown else ""), (shown, e)
            return
        body = toks(s.final_body)
        if not self.replaces and (s.noisy or not s.final_exact):
            return  # committed words checked above; the rest is alignment
        if not s.final_chained:
            assert keys(final) == keys(body), (s.final_body, e)
        elif s.overlap == 0:
            assert less_leading_carried(final, body), (s.final_body, e)
        else:
            # The overlap's words are dropped, at most 5 a second of it.
            bw = words(body)
            fw = words(final)
            assert fw == bw[len(bw) - len(fw):], (s.final_body, e)
            assert len(bw) - len(fw) <= round(min(s.overlap / SAMPLE_RATE, 3.0) * 5)


MergerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_merger_contracts = MergerMachine.TestCase
