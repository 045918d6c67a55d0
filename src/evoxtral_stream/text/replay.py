"""Scripted replays: a tagged reference delivered as a live model would.

:func:`make_replay` turns one reference into the hypotheses a streaming
engine would feed the merger: the text is cut into segments (forced splits,
whose successor re-sends some overlap audio and may re-emit the emotion or
delivery tag in effect, or natural pauses), and each segment grows through
partials before its final. Partials are noisy the way live decoding is: the
last word cut short, an earlier word revised, a tag that shows up a
hypothesis late, an older revision re-delivered, a partial arriving after its
final, the next segment starting before this one's final arrived.

Noise falls on the new part of a segment (its overlap and restated tags are
re-decoded exactly) and is never agreed on by two consecutive hypotheses of
a segment (where the random draw would do that, the later hypothesis is
replaced by the clean text): the assumptions under which LocalAgreement and
stitching are exact, so the merger must then reproduce the reference
exactly (:func:`check_replay`). Simulated timing: words last 0.22-0.45 s,
sounds and pauses 0.3-0.8 s, emotion and delivery tags nothing; a natural
pause adds 0.6 s of silence.

Pure: the randomness comes from the ``random.Random`` passed in, the clock is
simulated (``ready_at`` is the audio end time).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from ..events import SAMPLE_RATE, CaptionEvent, Hypothesis, RequestKind
from .merger import Merger
from .tags import Carry, TagKind, Token, TokenKind, render, tokenize

__all__ = [
    "Replay",
    "ReplayCheck",
    "ReplayConfig",
    "check_replay",
    "join_finals",
    "make_replay",
    "run_replay",
]


@dataclass(frozen=True)
class ReplayConfig:
    """Probabilities and sizes of a replay schedule."""

    max_segments: int = 4
    p_forced: float = 0.8
    max_overlap_tokens: int = 3
    p_overlap: float = 0.7
    p_reemit: float = 0.6
    max_step: int = 4
    p_unstable: float = 0.5
    p_revision: float = 0.2
    p_late_tag: float = 0.3
    p_stale: float = 0.1
    p_late_partial: float = 0.1
    p_interleave: float = 0.2
    p_final_early: float = 0.05


@dataclass(frozen=True)
class Replay:
    """The hypotheses of one replay, in delivery order."""

    reference: str
    hypotheses: tuple[Hypothesis, ...]
    segments: tuple[int, ...]
    forced_seams: int
    overlap_seams: int
    reemitted_tags: int


@dataclass(frozen=True)
class ReplayCheck:
    """What the merger made of a replay.

    ``retracted`` counts tokens (words, punctuation, tags) that were part of a
    segment's stable text and missing from a later event of it.
    ``stable_before_final`` counts tokens of the final texts already stable
    in a partial.
    """

    final_text: str
    identical: bool
    retracted: int
    tags_lost: int
    tags_duplicated: int
    seq_ok: bool
    finals_ok: bool
    split_ok: bool
    events: int
    partial_events: int
    final_tokens: int
    stable_before_final: int

    @property
    def ok(self) -> bool:
        return (self.identical and self.retracted == 0 and self.tags_lost == 0
                and self.tags_duplicated == 0 and self.seq_ok and self.finals_ok
                and self.split_ok)


def _duration(tok: Token, rng: random.Random) -> float:
    if tok.is_word:
        return rng.uniform(0.22, 0.45)
    if tok.is_tag:
        if tok.tag_kind is not None and tok.tag_kind.carries:
            return 0.0  # an emotion or delivery tag has no sound of its own
        return rng.uniform(0.3, 0.8)
    return 0.0


def _boundaries(tokens: Sequence[Token]) -> list[int]:
    # Segments split where the speaker left a space, never inside "I—I".
    return [i for i in range(1, len(tokens)) if tokens[i].space_before]


def _noisy(clean: list[Token], protect: int, seen: int, rng: random.Random,
           cfg: ReplayConfig, uid: int) -> tuple[list[Token], list[Token]]:
    """A noisy copy of ``clean`` and the same without its revision (the
    revision is a substitution, so both stay aligned). Tokens before
    ``protect`` are left alone; ``seen`` tokens were in the last hypothesis."""
    toks = list(clean)
    # A tag not heard before, near the end, shows up one hypothesis late.
    if rng.random() < cfg.p_late_tag:
        lo = max(protect, seen, len(toks) - 3)
        near = [i for i in range(lo, len(toks) - 1) if toks[i].is_tag]
        if near:
            del toks[rng.choice(near)]
    unrevised = list(toks)
    # An earlier word revised (case or spelling).
    if rng.random() < cfg.p_revision:
        words = [i for i in range(protect, len(toks) - 1) if toks[i].is_word]
        if words:
            i = rng.choice(words)
            t = toks[i]
            alt = t.text.swapcase() if rng.random() < 0.5 else f"{t.text}x{uid}"
            toks[i] = Token(TokenKind.WORD, alt, space_before=t.space_before)
    # The last word cut short while it is still being spoken.
    if toks and toks[-1].is_word and len(toks) - 1 >= protect and rng.random() < cfg.p_unstable:
        t = toks[-1]
        cut = t.text[: rng.randint(1, len(t.text) - 1)] if len(t.text) > 1 else f"{t.text}~"
        toks[-1] = unrevised[-1] = Token(TokenKind.WORD, cut, space_before=t.space_before)
    return toks, unrevised


@dataclass(frozen=True)
class _Piece:
    segment: int
    raw: tuple[Token, ...]
    protect: int
    start_sample: int
    end_sample: int
    forced: bool
    partial_ends: tuple[int, ...]
    partial_samples: tuple[int, ...]


def _samples(t: float) -> int:
    return round(t * SAMPLE_RATE)


def make_replay(reference: str, rng: random.Random, config: ReplayConfig | None = None, *,
                stream: str = "replay", first_segment: int = 0) -> Replay:
    """A random live schedule for ``reference`` (see module doc)."""
    cfg = config or ReplayConfig()
    ref = tokenize(reference)
    n = len(ref)
    bounds = _boundaries(ref)
    k = rng.randint(1, max(1, min(cfg.max_segments, len(bounds) + 1)))
    cuts = sorted(rng.sample(bounds, k - 1)) if k > 1 else []
    starts = [0, *cuts]
    ends = [*cuts, n]
    forced = [rng.random() < cfg.p_forced for _ in range(k - 1)] + [False]

    # Simulated timeline: token i sounds from begin[i] to finish[i]; a natural
    # pause puts silence before the segment after it.
    natural_at = {starts[i + 1] for i in range(k - 1) if not forced[i]}
    begin: list[float] = []
    finish: list[float] = []
    t = 0.0
    for i, tok in enumerate(ref):
        if i in natural_at:
            t += 0.6
        begin.append(t)
        t += _duration(tok, rng)
        finish.append(t)
    seg_ids = [first_segment + i for i in range(k)]

    pieces: list[_Piece] = []
    forced_seams = overlap_seams = reemitted = 0
    chain_start = 0
    for p in range(k):
        a, b = starts[p], ends[p]
        lead: list[Token] = []
        o_start = a
        if p > 0 and forced[p - 1]:
            forced_seams += 1
            if rng.random() < cfg.p_overlap:
                # Overlap is audio: it cannot start on punctuation.
                options = [j for j in range(max(starts[p - 1], a - cfg.max_overlap_tokens), a)
                           if (j == 0 or ref[j].space_before) and not ref[j].is_punct]
                if options:
                    o_start = rng.choice(options)
                    overlap_seams += 1
            # The model hears the speech go on and may restate the tags in
            # effect for the first words it hears (unless the piece already
            # starts with them); in effect as the merger sees it: from the
            # last natural start on.
            heard = o_start
            while heard < b and not ref[heard].is_word:
                heard += 1
            state = Carry().advance_all(ref[chain_start:heard])
            present = {t.tag for t in ref[o_start:heard]}
            carried = [t for t in (state.emotion, state.delivery) if t and t not in present]
            if carried and rng.random() < cfg.p_reemit:
                rng.shuffle(carried)
                for name in carried:
                    kind = TagKind.EMOTION if name == state.emotion else TagKind.DELIVERY
                    lead.append(Token(TokenKind.TAG, f"[{name}]", name, kind, True, True))
                reemitted += len(carried)
        else:
            chain_start = a
        body = list(ref[o_start:b])
        body[0] = body[0].with_space(True)
        raw = [*lead, *body]
        raw[0] = raw[0].with_space(False)
        start_s = _samples(begin[o_start])
        # Partials: growing prefixes of the raw text, each decoded when its
        # last token has been heard; now and then no new token (a re-decode).
        ends_at: list[int] = []
        samples_at: list[int] = []
        pos = rng.randint(1, cfg.max_step)
        while pos < len(raw):
            ends_at.append(pos)
            last = o_start + pos - len(lead) - 1
            samples_at.append(max(_samples(finish[last]) if last >= o_start else 0, start_s + 1))
            step_lo = 0 if rng.random() < 0.1 else 1
            pos += rng.randint(step_lo, cfg.max_step)
        # Noise stays out of the restated tags and the overlap: the merger
        # judges those against text already final, not by agreement.
        pieces.append(_Piece(seg_ids[p], tuple(raw), len(lead) + a - o_start, start_s,
                             max(_samples(finish[b - 1]), start_s + 1), forced[p],
                             tuple(ends_at), tuple(samples_at)))

    # Hypotheses per segment, in generation (= revision) order.
    per_seg: list[list[Hypothesis]] = []
    uid = 0
    for pc in pieces:
        hyps: list[Hypothesis] = []
        prev: tuple[list[Token], list[Token]] | None = None
        for rev, (pos, smp) in enumerate(zip(pc.partial_ends, pc.partial_samples, strict=True)):
            uid += 1
            clean = list(pc.raw[:pos])
            seen = pc.partial_ends[rev - 1] if rev else 0
            toks, unrevised = _noisy(clean, pc.protect, seen, rng, cfg, uid)
            # Judge by what the merger will read ("It'" is two tokens).
            toks, unrevised = tokenize(render(toks)), tokenize(render(unrevised))
            # The merger aligns a revised hypothesis on the text it committed,
            # so agreement is judged without the revision.
            if prev is not None:
                truth = list(pc.raw)
                a1, a2 = _lcp(prev[0], toks), _lcp(prev[1], unrevised)
                if toks[:a1] != truth[:a1] or unrevised[:a2] != truth[:a2]:
                    toks = unrevised = clean
            prev = (toks, unrevised)
            hyps.append(_hyp(stream, pc.segment, rev, RequestKind.PARTIAL, render(toks),
                             pc.start_sample, smp))
        hyps.append(_hyp(stream, pc.segment, len(hyps), RequestKind.FINAL, render(pc.raw),
                         pc.start_sample, pc.end_sample, forced=pc.forced))
        per_seg.append(hyps)

    delivery = _deliver(per_seg, rng, cfg)
    return Replay(reference, tuple(delivery), tuple(seg_ids), forced_seams, overlap_seams,
                  reemitted)


def _deliver(per_seg: list[list[Hypothesis]], rng: random.Random,
             cfg: ReplayConfig) -> list[Hypothesis]:
    """Delivery order: mostly segment by segment, with stale and late
    partials, and the next segment sometimes starting (or even finishing)
    before this one's final."""
    queues: list[list[Hypothesis]] = []
    for hyps in per_seg:
        partials, final = hyps[:-1], hyps[-1]
        out: list[Hypothesis] = []
        for i, h in enumerate(partials):
            out.append(h)
            if i > 0 and rng.random() < cfg.p_stale:
                out.append(partials[rng.randrange(i)])
        out.append(final)
        if partials and rng.random() < cfg.p_late_partial:
            out.append(rng.choice(partials))
        queues.append(out)
    order: list[Hypothesis] = []
    i = 0
    while i < len(queues):
        cur = queues[i]
        nxt = queues[i + 1] if i + 1 < len(queues) else None
        if nxt is not None and rng.random() < cfg.p_final_early:
            # The next segment entirely, final included, before this final.
            fi = _final_index(cur)
            order.extend(cur[:fi])
            order.extend(nxt)
            order.extend(cur[fi:])
            i += 2
            continue
        if nxt is not None and rng.random() < cfg.p_interleave:
            fi = _final_index(cur)
            early = rng.randint(1, 2)
            head = [h for h in nxt[:early] if not h.final]
            order.extend(cur[:fi])
            order.extend(head)
            order.extend(cur[fi:])
            queues[i + 1] = nxt[len(head):]
            i += 1
            continue
        order.extend(cur)
        i += 1
    return order


def _final_index(hyps: Sequence[Hypothesis]) -> int:
    return next(i for i, h in enumerate(hyps) if h.final)


def _hyp(stream: str, segment: int, revision: int, kind: RequestKind, text: str,
         start: int, end: int, *, forced: bool = False) -> Hypothesis:
    ready = end / SAMPLE_RATE
    return Hypothesis(stream, segment, revision, kind, text, start, end, ready, ready + 0.05,
                      forced)


def _lcp(a: Sequence[Token], b: Sequence[Token]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def run_replay(replay: Replay, merger: Merger | None = None) -> list[CaptionEvent]:
    """Feed a replay to a merger (a fresh one by default); all events emitted."""
    stream = replay.hypotheses[0].stream if replay.hypotheses else "replay"
    m = merger or Merger(stream, first_segment=replay.segments[0] if replay.segments else 0)
    events: list[CaptionEvent] = []
    for h in replay.hypotheses:
        events.extend(m.feed(h))
    return events


def join_finals(events: Iterable[CaptionEvent]) -> str:
    """The stream's text: final captions by segment, joined by single spaces.

    Spaces even inside Chinese or Japanese, unlike a transcript's join
    (:func:`.tags.join_texts`): :func:`make_replay` cuts its reference only
    where the reference has a space, so a space gives the reference back."""
    finals = sorted((e for e in events if e.final), key=lambda e: e.segment)
    return " ".join(e.text for e in finals if e.text)


def _tag_counts(text: str) -> Counter[str]:
    return Counter(t.tag for t in tokenize(text) if t.is_tag and t.tag is not None)


def check_replay(replay: Replay, events: Sequence[CaptionEvent]) -> ReplayCheck:
    """Compare what the merger emitted with the replay's reference."""
    seq_ok = all(b.seq > a.seq for a, b in pairwise(events))
    seq_ok = seq_ok and (not events or events[0].seq == 1)
    split_ok = all(e.text == e.stable + e.unstable for e in events)
    finals: Counter[int] = Counter(e.segment for e in events if e.final)
    finals_ok = all(finals[s] == 1 for s in replay.segments) and set(finals) <= set(
        replay.segments)
    closed: set[int] = set()
    stable: dict[int, list[Token]] = {}
    retracted = 0
    stable_before: dict[int, int] = {}
    for e in events:
        if e.segment in closed:
            finals_ok = False
        prev = stable.get(e.segment, [])
        now = tokenize(e.text if e.final else e.stable)
        kept = _lcp(prev, now)
        retracted += len(prev) - kept
        if e.final:
            closed.add(e.segment)
            stable_before[e.segment] = len(prev)
        stable[e.segment] = now
    final_text = join_finals(events)
    want, got = _tag_counts(replay.reference), _tag_counts(final_text)
    final_tokens = sum(len(tokenize(e.text)) for e in events if e.final)
    return ReplayCheck(
        final_text=final_text,
        identical=final_text == replay.reference,
        retracted=retracted,
        tags_lost=sum((want - got).values()),
        tags_duplicated=sum((got - want).values()),
        seq_ok=seq_ok,
        finals_ok=finals_ok,
        split_ok=split_ok,
        events=len(events),
        partial_events=sum(1 for e in events if not e.final),
        final_tokens=final_tokens,
        stable_before_final=sum(stable_before.values()),
    )
