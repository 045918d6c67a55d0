"""Property tests: scripted live replays through the merger.

A replay delivers a tagged reference as a live engine would (growing noisy
partials, forced splits with overlap and restated tags, stale and late
hypotheses, segments out of order). Whatever the schedule, the final
captions must equal the reference, stable text only grows, no tag is lost
or duplicated and ``seq`` strictly increases.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import replace
from itertools import pairwise

from hypothesis import example, given, settings
from hypothesis import strategies as st

from evoxtral_stream.events import SAMPLE_RATE, CaptionEvent, Hypothesis, RequestKind
from evoxtral_stream.text.merger import Merger, match_key
from evoxtral_stream.text.replay import (
    ReplayCheck,
    ReplayConfig,
    check_replay,
    make_replay,
    run_replay,
)
from evoxtral_stream.text.tags import Carry, Token, lookup_tag, render, tokenize

from .samples import SCRIPTS, TRIPLE_REPEATS

HARSH = ReplayConfig(
    max_segments=8, max_overlap_tokens=6, p_overlap=0.9, p_reemit=0.9, max_step=3,
    p_unstable=0.7, p_revision=0.4, p_late_tag=0.5, p_stale=0.3, p_late_partial=0.3,
    p_interleave=0.4, p_final_early=0.2,
)


def replay_check(text: str, rng: random.Random, cfg: ReplayConfig) -> ReplayCheck:
    replay = make_replay(text, rng, cfg)
    return check_replay(replay, run_replay(replay))


def assert_exact(check: ReplayCheck, reference: str) -> None:
    assert check.final_text == reference
    assert check.retracted == 0
    assert (check.tags_lost, check.tags_duplicated) == (0, 0)
    assert check.seq_ok
    assert check.finals_ok
    assert check.split_ok


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(SCRIPTS), st.integers(0, 2**32).map(random.Random))
def test_scripts_replay_exactly(text: str, rng: random.Random) -> None:
    assert_exact(replay_check(text, rng, ReplayConfig()), text)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SCRIPTS), st.integers(0, 2**32).map(random.Random))
def test_scripts_replay_exactly_under_harsh_schedules(text: str, rng: random.Random) -> None:
    assert_exact(replay_check(text, rng, HARSH), text)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["你好。 我很好。 [laughs]谢谢你。",
                        "[sighs]今日は いい天気ですね。 そうですね。",
                        "안녕하세요. 반갑습니다."]),
       st.integers(0, 2**32).map(random.Random))
def test_cjk_references_with_spaces_replay_exactly(text: str, rng: random.Random) -> None:
    """A replay cuts its reference at spaces only, so join_finals' spaces
    give it back, Chinese and Japanese ones too (a transcript's join would
    drop them: tags.join_texts)."""
    assert_exact(replay_check(text, rng, HARSH), text)


_WORDS = [
    "so", "I", "was", "thinking", "maybe", "we", "could", "try", "that", "new", "place",
    "downtown", "mean", "if", "you're", "free", "this", "weekend", "NEVER", "REALLY", "can't",
    "I-I", "well", "okay", "wait", "the", "a", "it", "is", "TOO", "late", "café", "$500",
]
_PUNCT = ["", "", "", ",", ".", "...", "?", "!", "?!", "—"]
_TAGS = ["[pause]", "[laughs]", "[sighs]", "[clears throat]", "[whispers]", "[shouts]",
         "[nervous]", "[excited]", "[calm]", "[crying]", "[stammers]", "[gasps]",
         "[Strange Noise]"]


def _acceptable(text: str) -> bool:
    """The documented preconditions of exactness: no tag restating one in
    effect, no tag twice in one run of tags, no word repeated at once."""
    toks = tokenize(text)
    if not any(t.is_word for t in toks):
        return False
    state = Carry()
    run: list[str | None] = []
    for t in toks:
        if state.holds(t):
            return False
        state = state.advance(t)
        run = [*run, t.tag] if t.is_tag else []
        if len(run) != len(set(run)):
            return False
    # A word back within three words and tags, or with only tags between:
    # an overlap there has two readings ("okay, [laughs] okay", "so [laughs]
    # [whispers] [shouts] so").
    keys = [match_key(t) for t in toks if not t.is_punct]
    words = [k for k in keys if not k.startswith("[")]
    return not (any(k in keys[i + 1:i + 4] for i, k in enumerate(keys) if not k.startswith("["))
                or any(a == b for a, b in pairwise(words)))


_items = st.one_of(
    st.tuples(st.sampled_from(_WORDS), st.sampled_from(_PUNCT)).map(lambda p: p[0] + p[1]),
    st.sampled_from(_TAGS),
)
references = st.lists(_items, min_size=1, max_size=40).map(" ".join).filter(_acceptable)


@settings(max_examples=400, deadline=None)
@given(references, st.integers(0, 2**32).map(random.Random))
def test_generated_references_replay_exactly(text: str, rng: random.Random) -> None:
    text = render(tokenize(text))
    assert_exact(replay_check(text, rng, ReplayConfig()), text)


# Words in Voxtral's Hindi (vowel signs, viramas, the danda), Thai marks,
# Arabic, accents composed and written apart, CJK between spaces.
_WORLD_WORDS = [
    "मैं", "नहीं", "आया", "क्योंकि", "हिंदी-भाषी", "बीमार", "था।", "है", "हो", "ที่", "ตลาด",
    "ซื้อ", "ذهبت", "السوق", "وحليبا", "café", "cafe\u0301s", "l'école", "sœur", "naïve",
    "你好", "世界。", "ok",
]


def _respell_tags(text: str, rng: random.Random) -> str:
    """``text`` with its known tags written as the model may write them:
    a variant (``[laughing]``), other case, spaces or ``_`` inside,
    parentheses or asterisks, trailing punctuation inside."""
    out: list[Token] = []
    for t in tokenize(text):
        spec = lookup_tag(t.tag) if t.is_tag and t.known and t.tag is not None else None
        if spec is not None:
            name = rng.choice([spec.name, *spec.aliases])
            name = rng.choice([name, name.upper(), name.title(), name.replace(" ", "_"),
                               f" {name}. "])
            left, right = rng.choice([("[", "]"), ("[", "]"), ("(", ")"), ("*", "*")])
            t = replace(t, text=f"{left}{name.strip() if left != '[' else name}{right}")
        out.append(t)
    return render(out)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_WORLD_WORDS), st.sampled_from(_TAGS)),
                min_size=1, max_size=30).map(" ".join).filter(_acceptable),
       st.integers(0, 2**32).map(random.Random))
def test_any_script_and_any_tag_spelling_replay_exactly(text: str, rng: random.Random) -> None:
    """The truth is known: whatever script the words are in and however each
    hypothesis spells its tags, the finals are the canonical reference,
    every word whole, no tag lost or doubled, every final once."""
    text = render(tokenize(text))
    replay = make_replay(text, rng, ReplayConfig())
    respelled = tuple(replace(h, text=_respell_tags(h.text, rng)) for h in replay.hypotheses)
    assert_exact(check_replay(replay, run_replay(replace(replay, hypotheses=respelled))), text)


def test_triple_repeats_are_exact_without_audio_overlap() -> None:
    cfg = ReplayConfig(p_overlap=0.0)
    for text in TRIPLE_REPEATS:
        for seed in range(40):
            assert_exact(replay_check(text, random.Random(seed), cfg), text)


# --- invariants under arbitrary input -----------------------------------------

_hyp_texts = st.lists(st.sampled_from(_WORDS + _TAGS + [".", ","]), max_size=12).map(" ".join)


@st.composite
def hypothesis_streams(draw: st.DrawFn) -> list[Hypothesis]:
    out: list[Hypothesis] = []
    for _ in range(draw(st.integers(0, 30))):
        seg = draw(st.integers(0, 4))
        final = draw(st.booleans())
        start = draw(st.integers(0, 10)) * SAMPLE_RATE // 2
        end = start + draw(st.integers(0, 8)) * SAMPLE_RATE // 4
        out.append(Hypothesis(
            "s", seg, draw(st.integers(0, 6)),
            RequestKind.FINAL if final else RequestKind.PARTIAL, draw(_hyp_texts),
            start, end, 0.0, 0.1, draw(st.booleans())))
    return out


def _only_tags_inserted(before: str, after: str) -> bool:
    """Whether ``after`` is ``before`` followed by more, with tags inserted
    anywhere: its words and punctuation begin with ``before``'s, and
    ``before``'s tokens appear in it in order."""
    old, new = tokenize(before), tokenize(after)
    untagged = [t.text for t in new if not t.is_tag]
    if untagged[:len(old) - sum(t.is_tag for t in old)] != [t.text for t in old
                                                            if not t.is_tag]:
        return False
    rest = iter(t.text for t in new)
    return all(t.text in rest for t in old)


def test_the_invariant_check_allows_inserted_tags_only() -> None:
    assert _only_tags_inserted("so", "[pause] so")
    assert _only_tags_inserted("so [pause]", "so [pause] well.")
    assert not _only_tags_inserted("so", "well so")
    assert not _only_tags_inserted("so [pause]", "so")
    assert not _only_tags_inserted("so well", "so [pause]")


@settings(max_examples=300, deadline=None)
@given(hypothesis_streams())
@example([Hypothesis("s", 0, r, k, t, 0, SAMPLE_RATE, 0.0, 0.1)
          for r, (k, t) in enumerate([(RequestKind.PARTIAL, "so"), (RequestKind.PARTIAL, "so"),
                                      (RequestKind.FINAL, "[pause]")])])
def test_invariants_hold_for_any_input(stream: list[Hypothesis]) -> None:
    m = Merger("s", max_pending=2)
    events: list[CaptionEvent] = []
    for h in stream:
        events.extend(m.feed(h))
    events.extend(m.close())
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    stable: dict[int, str] = defaultdict(str)
    closed: set[int] = set()
    for e in events:
        assert e.segment not in closed
        assert e.text == e.stable + e.unstable
        if e.final:
            # The merger's contract: a final may insert tags into the
            # committed text (its decode places them), never remove or change
            # what was committed.
            assert _only_tags_inserted(stable[e.segment], e.stable)
        else:
            assert e.stable.startswith(stable[e.segment])
        stable[e.segment] = e.stable
        if e.final:
            assert e.unstable == ""
            closed.add(e.segment)
    # Every segment shown was closed by exactly one final, nothing is left open.
    assert {e.segment for e in events} == closed
    assert closed <= {h.segment for h in stream}
    assert m.open_segments == ()
