"""The merger, hypothesis by hypothesis: agreement, finals, stitching, ordering."""

from __future__ import annotations

import pytest

from evoxtral_stream.events import SAMPLE_RATE, CaptionEvent, Hypothesis, RequestKind
from evoxtral_stream.text.merger import Merger, place_tags, stitch, tail_after
from evoxtral_stream.text.tags import Carry, render, tokenize


class Feed:
    """A merger with per-segment revision counters, for terse tests."""

    def __init__(self, *, final_replaces_stable: bool = False, max_pending: int | None = 3,
                 **kwargs: int) -> None:
        self.m = Merger("s", final_replaces_stable=final_replaces_stable,
                        max_pending=max_pending, **kwargs)
        self.rev: dict[int, int] = {}
        self.events: list[CaptionEvent] = []

    def __call__(self, text: str, seg: int = 0, *, final: bool = False, start: float = 0.0,
                 end: float = 1.0, forced: bool = False,
                 rev: int | None = None) -> list[CaptionEvent]:
        if rev is None:
            rev = self.rev.get(seg, -1) + 1
        self.rev[seg] = max(rev, self.rev.get(seg, -1))
        h = Hypothesis("s", seg, rev, RequestKind.FINAL if final else RequestKind.PARTIAL,
                       text, round(start * SAMPLE_RATE), round(end * SAMPLE_RATE),
                       ready_at=end, done_at=end + 0.25, forced_end=forced)
        out = self.m.feed(h)
        self.events.extend(out)
        return out

    def finals(self) -> str:
        return " ".join(e.text for e in sorted(self.events, key=lambda e: e.segment)
                        if e.final and e.text)


def one(events: list[CaptionEvent]) -> CaptionEvent:
    assert len(events) == 1, events
    return events[0]


def test_partials_commit_the_agreed_prefix() -> None:
    f = Feed()
    e1 = one(f("So I was"))
    assert (e1.stable, e1.unstable, e1.seq) == ("", "So I was", 1)
    e2 = one(f("So I was thinking"))
    assert (e2.stable, e2.unstable) == ("So I was", " thinking")
    e3 = one(f("So I was thinking maybe"))
    assert (e3.stable, e3.unstable) == ("So I was thinking", " maybe")
    assert all(e.text == e.stable + e.unstable for e in f.events)
    assert [e.seq for e in f.events] == [1, 2, 3]


def test_an_unstable_last_word_is_not_committed() -> None:
    f = Feed()
    f("I want the restau")
    e = one(f("I want the restaurant"))
    assert e.stable == "I want the"
    e = one(f("I want the restaurant downtown"))
    assert e.stable == "I want the restaurant"


def test_tags_are_atomic_in_agreement() -> None:
    f = Feed()
    f("[nervous] So")
    e = one(f("[nervous] So... [stammers] I"))
    assert e.stable == "[nervous] So"
    e = one(f("[nervous] So... [stammers] I was"))
    assert e.stable == "[nervous] So... [stammers] I"
    assert [(m.tag, m.kind, m.index) for m in e.tags] == [
        ("nervous", "emotion", 0), ("stammers", "delivery", 1)]


def test_committed_words_are_never_retracted() -> None:
    f = Feed()
    f("I was thinking")
    f("I was thinking maybe")
    e = one(f("I was sinking maybe we"))
    assert e.stable.startswith("I was thinking")
    fin = one(f("I was sinking maybe we could", final=True))
    assert fin.final
    assert fin.text == "I was thinking maybe we could"
    assert (fin.stable, fin.unstable) == (fin.text, "")


def test_a_tag_that_appears_late_is_placed() -> None:
    f = Feed()
    f("downtown? I")
    f("downtown? [laughs] I mean")
    e = one(f("downtown? [laughs] I mean, if"))
    assert e.stable == "downtown? [laughs] I mean"
    assert one(f("downtown? [laughs] I mean, if you're free?", final=True)).text == (
        "downtown? [laughs] I mean, if you're free?")


def test_final_replaces_partials_and_closes_the_segment() -> None:
    f = Feed()
    f("hello wor")
    fin = one(f("Hello world.", final=True))
    assert fin.text == "Hello world."
    assert fin.final
    assert f("Hello world. More", rev=9) == []  # late partial
    assert f("Other", final=True) == []  # second final


@pytest.mark.parametrize("replaces", [False, True])
def test_captions_never_carry_control_characters(replaces: bool) -> None:
    """A model's byte tokens (an ESC, a NUL) reached every caption field and
    from there terminals, espeak-ng and subtitle files; they read as spaces."""
    f = Feed(final_replaces_stable=replaces)
    part = one(f("I\x00said \x1b"))
    f("I\x00said \x1bhello")
    fin = one(f("I\x00said \x1bhello\x07 [laughs].\x9b", final=True))
    for ev in (part, *f.events, fin):
        for text in (ev.text, ev.plain_text, ev.stable, ev.unstable):
            assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text), repr(text)
    assert fin.text == "I said hello [laughs]."


def test_empty_final_still_closes_the_segment() -> None:
    f = Feed()
    fin = one(f("", final=True))
    assert fin.final
    assert (fin.text, fin.plain_text, fin.stable, fin.unstable, fin.tags) == ("", "", "", "", ())


def test_stale_and_repeated_revisions_are_ignored() -> None:
    f = Feed()
    f("one two", rev=3)
    assert f("one", rev=2) == []
    assert f("one two three", rev=3) == []
    assert one(f("one two three", rev=4)).text == "one two three"


def test_a_partial_that_changes_nothing_emits_nothing() -> None:
    f = Feed()
    f("one two")
    assert one(f("one two")).stable == "one two"  # agreement: committed
    assert f("one two") == []
    assert one(f("one two three")).stable == "one two"


def test_times_tags_and_latency() -> None:
    f = Feed()
    e = one(f("[sighs] one two [laughs] three four [pause]", final=True, start=10.0, end=14.0))
    assert (e.start, e.end) == (10.0, 14.0)
    assert e.latency == pytest.approx(0.25)
    assert e.plain_text == "one two three four"
    assert [(m.tag, m.index, m.t) for m in e.tags] == [
        ("sighs", 0, 10.0), ("laughs", 2, 12.0), ("pause", 4, 14.0)]
    assert all(m.known for m in e.tags)
    unknown = one(f("a [Foo] b", seg=1, final=True, start=14.0, end=15.0)).tags
    assert [(m.tag, m.kind, m.known) for m in unknown] == [("foo", "unknown", False)]


def test_other_streams_are_refused() -> None:
    m = Merger("a")
    with pytest.raises(ValueError, match="stream"):
        m.feed(Hypothesis("b", 0, 0, RequestKind.FINAL, "x", 0, 1, 0.0, 0.0))


# --- forced splits -----------------------------------------------------------


def test_forced_split_without_overlap_drops_a_restated_delivery_tag() -> None:
    f = Feed()
    f("[whispers] Don't turn", final=True, end=2.0, forced=True)
    e = one(f("[whispers] around now.", seg=1, final=True, start=2.0, end=3.0))
    assert e.text == "around now."
    assert f.finals() == "[whispers] Don't turn around now."



def test_only_a_segment_stitched_onto_a_forced_split_is_marked_continues() -> None:
    """A reader speaking each final alone must know which finals lost their
    restated tags: those stitched onto a forced split. A segment after a
    natural end may start exactly where the one before it ended (speech
    resuming within the pre-roll, a commit), and keeps the model's tags."""
    f = Feed()
    first = one(f("[whispers] Don't turn", final=True, end=2.0, forced=True))
    second = one(f("[whispers] around now", seg=1, final=True, start=2.0, end=3.0))
    third = one(f("[whispers] Okay", seg=2, final=True, start=3.0, end=4.0))
    assert [e.continues for e in (first, second, third)] == [False, True, False]
    assert third.text == "[whispers] Okay"
    assert one(f("later", seg=3, start=4.0, end=4.5, forced=False)).continues is False

def test_sounds_never_carry() -> None:
    f = Feed()
    f("[laughs] That was", final=True, end=2.0, forced=True)
    assert one(f("[laughs] funny", seg=1, final=True, start=2.0, end=3.0)).text == (
        "[laughs] funny")


def test_carry_ends_with_the_sentence() -> None:
    f = Feed()
    f("[whispers] Don't turn around.", final=True, end=2.0, forced=True)
    assert one(f("[whispers] Keep walking.", seg=1, final=True, start=2.0, end=3.0)).text == (
        "[whispers] Keep walking.")


def test_carry_ends_with_a_hindi_sentence() -> None:
    """The danda is Hindi's full stop: a whispered new sentence after it used
    to lose its "[whispers]" at the seam, taken for a restatement."""
    f = Feed()
    f("[whispers] यह राज़ है।", final=True, end=2.0, forced=True)
    assert one(f("[whispers] किसी को मत बताना।", seg=1, final=True, start=2.0,
                 end=3.0)).text == "[whispers] किसी को मत बताना।"


def test_tags_ending_the_previous_text_are_not_restated() -> None:
    f = Feed()
    f("Stop it! [angry] [frustrated]", final=True, end=2.0, forced=True)
    assert one(f("[angry] [frustrated] That is not", seg=1, final=True, start=2.0,
                 end=3.0)).text == "That is not"


def test_natural_ends_are_not_stitched() -> None:
    f = Feed()
    f("[whispers] Don't turn", final=True, end=2.0)
    assert one(f("[whispers] turn around.", seg=1, final=True, start=2.0, end=3.0)).text == (
        "[whispers] turn around.")


def test_overlap_words_are_dropped_once() -> None:
    f = Feed()
    f("I was thinking maybe we could", final=True, end=3.0, forced=True)
    e = one(f("maybe we could try that new place.", seg=1, final=True, start=2.4, end=5.0))
    assert e.text == "try that new place."
    assert e.start == 3.0  # the overlap audio belongs to the previous caption
    assert f.finals() == "I was thinking maybe we could try that new place."


def test_overlap_comparison_ignores_case_and_punctuation() -> None:
    f = Feed()
    f("Can you BELIEVE it?", final=True, end=3.0, forced=True)
    assert one(f("believe it... [gasps] This is", seg=1, final=True, start=2.5,
                 end=5.0)).text == "[gasps] This is"


def test_a_tag_right_at_the_boundary_is_kept_once() -> None:
    f = Feed()
    f("try that restaurant downtown? [laughs]", final=True, end=3.0, forced=True)
    e = one(f("downtown? [laughs] I mean", seg=1, final=True, start=2.2, end=4.0))
    assert e.text == "I mean"
    f2 = Feed()
    f2("try that restaurant downtown?", final=True, end=3.0, forced=True)
    e2 = one(f2("downtown? [laughs] I mean", seg=1, final=True, start=2.5, end=4.0))
    assert e2.text == "[laughs] I mean"
    f3 = Feed()
    f3("try that restaurant downtown? [laughs]", final=True, end=3.0, forced=True)
    e3 = one(f3("[laughs] I mean", seg=1, final=True, start=2.6, end=4.0))
    assert e3.text == "I mean"


def test_a_restated_tag_ahead_of_the_overlap_goes_with_it() -> None:
    f = Feed()
    f("[whispers] Don't turn around", final=True, end=3.0, forced=True)
    e = one(f("[whispers] turn around, they're here.", seg=1, final=True, start=2.3, end=5.0))
    assert e.text == ", they're here."


def test_a_genuine_repetition_is_not_taken_for_overlap() -> None:
    # The sigh comes before "thank you" in the new audio but after it in the
    # previous text: the words are said twice.
    f = Feed()
    f("Thank you... [sighs]", final=True, end=2.0, forced=True)
    e = one(f("[sighs] [calm] thank you so much.", seg=1, final=True, start=1.5, end=4.0))
    assert e.text == "[calm] thank you so much."
    # No audio overlap: no words are dropped at all.
    f2 = Feed()
    f2("I... I", final=True, end=2.0, forced=True)
    assert one(f2("I don't know.", seg=1, final=True, start=2.0, end=3.0)).text == (
        "I don't know.")


@pytest.mark.parametrize(("prev", "new", "overlap", "text"), [
    # The overlap re-decoded: "क्योंकि" used to count as three words, so
    # 0.4 s (two words) matched only its first letter and cut it in two.
    ("मैं नहीं आया क्योंकि", "क्योंकि मैं बीमार था।", 0.4, "मैं बीमार था।"),
    # 0.6 s holds three words: "आया क्योंकि" is two, not four.
    ("मैं नहीं आया क्योंकि", "आया क्योंकि मैं बीमार था।", 0.6, "मैं बीमार था।"),
    # Not re-decoded: a word that starts with the letter "बात" ends on ("त",
    # after the vowel sign) used to lose that letter.
    ("हम बात", "तुम कहाँ हो।", 0.2, "तुम कहाँ हो।"),
    # Vowel signs tell words apart: "है" is not "हो" (both "ह" to the
    # comparison without its marks).
    ("यह सच है", "हो सकता है।", 0.2, "हो सकता है।"),
    # An accent written apart (NFD) is the same word as the one composed.
    ("I love the café", "cafe\u0301 au lait.", 0.3, "au lait."),
], ids=["re-decoded", "re-decoded-2-words", "first-letter-kept", "vowel-signs-differ", "nfd"])
def test_overlap_words_with_combining_marks_are_whole_words(
        prev: str, new: str, overlap: float, text: str) -> None:
    f = Feed()
    f(prev, final=True, end=3.0, forced=True)
    e = one(f(new, seg=1, final=True, start=3.0 - overlap, end=5.0))
    assert e.text == text
    assert [m.index for m in one(f("[sighs] नहीं [pause] क्योंकि", seg=2, final=True,
                                   start=5.0, end=6.0)).tags] == [0, 1]


def test_the_overlap_is_bounded_by_its_duration() -> None:
    f = Feed()
    f("Wait, wait,", final=True, end=2.0, forced=True)
    # 0.25 s of overlap holds one word, not two.
    e = one(f("wait, wait! [laughs] Are you", seg=1, final=True, start=1.75, end=4.0))
    assert f.finals() == "Wait, wait, wait! [laughs] Are you"
    assert e.text == "wait! [laughs] Are you"


def test_partials_inside_the_overlap_show_nothing_and_commit_nothing() -> None:
    f = Feed()
    f("I was thinking maybe we could", final=True, end=3.0, forced=True)
    assert f("maybe w", seg=1, start=2.2, end=2.8) == []
    # A garbled overlap: shown, but not committed until the seam is found.
    e = one(f("mabe we could try", seg=1, start=2.2, end=3.5))
    assert (e.stable, e.unstable) == ("", "mabe we could try")
    e = one(f("mabe we could try that", seg=1, start=2.2, end=3.8))
    assert e.stable == ""
    e = one(f("maybe we could try that", seg=1, start=2.2, end=3.8))
    assert (e.stable, e.unstable) == ("", "try that")
    e = one(f("maybe we could try that new", seg=1, start=2.2, end=4.0))
    assert e.stable == "try that"
    assert one(f("maybe we could try that new place.", seg=1, final=True, start=2.2,
                 end=4.5)).text == "try that new place."



@pytest.mark.parametrize("replaces", [False, True])
def test_a_tag_cut_short_after_the_overlap_is_no_word(replaces: bool) -> None:
    """The seam took the "[" of a tag cut short ("so [clea", a token budget
    running out) for punctuation re-decoding the previous text's "," and
    dropped it: partials showed and committed "clea" as a word, and the
    final kept it (found by the merger's state machine)."""
    f = Feed(final_replaces_stable=replaces)
    f("so ,", final=True, end=2.0, forced=True)
    e = one(f("so [clea", seg=1, start=1.6, end=2.5))
    assert (e.text, e.plain_text, e.stable) == ("[clea", "", "")
    assert f("so [clea", seg=1, start=1.6, end=2.6) == []
    assert one(f("so [clea", seg=1, final=True, start=1.6, end=4.0)).text == ""
    f2 = Feed(final_replaces_stable=replaces)
    f2("so ,", final=True, end=2.0, forced=True)
    assert one(f2("so ,[whis", seg=1, final=True, start=1.6, end=4.0)).text == ""
    # Inside the overlap it is old audio: nothing shows.
    f3 = Feed(final_replaces_stable=replaces)
    f3("so maybe", final=True, end=2.0, forced=True)
    assert f3("so [clea", seg=1, start=1.6, end=1.9) == []



def test_a_tag_cut_short_after_fewer_words_than_committed_stays_a_half_tag() -> None:
    """A partial that shrank ("so [clea" after "so so" was committed) had its
    "[" taken for a respelling of the second "so": it showed "so soclea",
    and an abandon closed the segment with it (found by the merger's state
    machine)."""
    f = Feed()
    f("so so [clea")
    f("so so [clea", end=1.2)
    assert f("so [clea", end=1.4) == []  # "so so [clea" is on screen already
    e = one(f("so [laug", end=1.6))
    assert (e.text, e.plain_text, e.stable) == ("so so [laug", "so so", "so so")
    fin = one(f.m.abandon(0))
    assert (fin.text, fin.plain_text) == ("so so", "so so")


# --- ordering across segments ------------------------------------------------


def test_a_later_segment_commits_nothing_while_an_earlier_one_is_open() -> None:
    f = Feed()
    f("we could", end=1.0)
    f("I was thinking maybe", seg=1, start=2.0, end=2.5)
    e = one(f("I was thinking maybe we", seg=1, start=2.0, end=2.8))
    assert e.stable == ""
    f("we could", final=True, end=2.0, forced=True)
    e = one(f("we could try that", seg=1, start=1.5, end=3.0))
    assert e.unstable == "try that"


def test_a_final_waits_for_the_segment_before_it() -> None:
    f = Feed()
    f("Hello", end=1.0)
    assert f("world again.", seg=1, final=True, start=1.0, end=2.0) == []
    assert f.m.open_segments == (0, 1)
    out = f("Hello", final=True, end=1.0, forced=True)
    assert [(e.segment, e.final, e.text) for e in out] == [
        (0, True, "Hello"), (1, True, "world again.")]
    assert [e.seq for e in f.events] == list(range(1, len(f.events) + 1))


def test_a_segment_never_seen_holds_the_next_one() -> None:
    f = Feed()
    f("First.", final=True, end=1.0)
    assert f("Third.", seg=2, final=True, start=3.0, end=4.0) == []
    out = f("Second.", seg=1, final=True, start=2.0, end=3.0)
    assert [e.segment for e in out] == [1, 2]


def test_abandon_releases_held_segments() -> None:
    f = Feed()
    f("I was", end=1.0)
    assert f("Next one.", seg=1, final=True, start=1.5, end=2.0) == []
    out = f.m.abandon(0)
    assert [(e.segment, e.final, e.text) for e in out] == [
        (0, True, "I was"), (1, True, "Next one.")]
    assert f("I was here", rev=5) == []
    assert f.m.abandon(0) == []


def test_an_abandoned_stitched_segment_starts_where_its_partials_did() -> None:
    f = Feed()
    f("I was thinking about", final=True, start=0.0, end=2.0, forced=True)
    p = one(f("thinking about the [laughs] weekend", seg=1, start=1.5, end=3.0))
    assert (p.text, p.start) == ("the [laughs] weekend", 2.0)
    # The overlap audio belongs to the previous caption, the final's too.
    fin = one(f.m.abandon(1))
    assert (fin.final, fin.text, fin.start, fin.end) == (True, "the [laughs] weekend", 2.0, 3.0)
    assert [(m.tag, m.t) for m in fin.tags] == [("laughs", 2.5)]


@pytest.mark.parametrize("replaces", [False, True])
def test_a_segment_shown_held_and_abandoned_after_the_forced_split_is_stitched(
        replaces: bool) -> None:
    """Its partials were shown while the forced segment before it was still
    open (held: not stitched, the overlap words in them). Abandoned once that
    final was out, with no partial since, its final used to carry that
    unstitched text, repeating "thinking about" and starting inside the
    previous caption, yet marked ``continues``."""
    f = Feed(final_replaces_stable=replaces)
    f("I was thinking", end=1.5)
    p = one(f("thinking about the [laughs] weekend", seg=1, start=1.5, end=3.0))
    assert (p.text, p.continues) == ("thinking about the [laughs] weekend", False)
    one(f("I was thinking about", final=True, end=2.0, forced=True))
    fin = one(f.m.abandon(1))
    assert (fin.final, fin.text, fin.start, fin.end, fin.continues) == (
        True, "the [laughs] weekend", 2.0, 3.0, True)
    f.events.append(fin)
    assert f.finals() == "I was thinking about the [laughs] weekend"
    # After a natural end nothing is stitched: the text shown is the final.
    f = Feed(final_replaces_stable=replaces)
    f("I was thinking", end=1.5)
    f("thinking about the weekend", seg=1, start=1.5, end=3.0)
    one(f("I was thinking about", final=True, end=2.0))
    fin = one(f.m.abandon(1))
    assert (fin.text, fin.start, fin.continues) == ("thinking about the weekend", 1.5, False)


def test_an_abandoned_held_segment_waits_for_the_one_before() -> None:
    f = Feed()
    f("I was", end=1.0)
    f("Next one", seg=1, start=1.5, end=2.0)
    # Segment 1's final failed while segment 0 is still open: its caption
    # must not overtake segment 0's final.
    assert f.m.abandon(1) == []
    assert f.m.open_segments == (0, 1)
    assert f("Next one again", seg=1, start=1.5, end=2.5) == []
    out = f("I was here.", final=True, end=1.0)
    assert [(e.segment, e.final, e.text, e.seq) for e in out] == [
        (0, True, "I was here.", 3), (1, True, "Next one", 4)]
    assert not f.m.open_segments
    assert f.m.abandon(1) == []


def test_an_abandoned_held_segment_is_stitched_once_released() -> None:
    f = Feed()
    f("I was thinking", end=1.5)
    # Held: shown unstitched, with the overlap words of segment 0 in it.
    p = one(f("thinking about the [laughs] weekend", seg=1, start=1.5, end=3.0))
    assert p.text == "thinking about the [laughs] weekend"
    assert f.m.abandon(1) == []
    out = f("I was thinking about", final=True, end=2.0, forced=True)
    assert [(e.segment, e.text, e.start) for e in out] == [
        (0, "I was thinking about", 0.0), (1, "the [laughs] weekend", 2.0)]
    assert [(m.tag, m.t) for m in out[1].tags] == [("laughs", 2.5)]


def test_a_waiting_final_abandoned_while_held_keeps_its_place() -> None:
    f = Feed()
    f("I was", end=1.0)
    assert f("Second.", seg=1, final=True, start=1.5, end=2.0) == []
    assert f.m.abandon(1) == []
    out = f.m.abandon(0)
    assert [(e.segment, e.text) for e in out] == [(0, "I was"), (1, "Second.")]


def test_a_held_segment_never_shown_closes_silently_in_order() -> None:
    f = Feed()
    f("I was", end=1.0)
    assert f.m.abandon(1) == []
    out = f("Third.", seg=2, final=True, start=3.0, end=4.0)
    assert out == []
    out = f("I was here.", final=True, end=1.0)
    assert [(e.segment, e.text) for e in out] == [(0, "I was here."), (2, "Third.")]


def test_a_segment_never_seen_and_closed_silently_does_not_release_a_later_one() -> None:
    """Found by the stateful model: segment 1, never seen, was abandoned (its
    final decode failed) while segment 0 was not seen yet either; segment 2's
    final then went out at once, and segment 0's after it."""
    f = Feed(max_pending=None)
    assert f.m.abandon(1) == []
    assert f("Third.", seg=2, final=True, start=3.0, end=4.0) == []
    out = f("First.", final=True, end=1.0)
    assert [(e.segment, e.text) for e in out] == [(0, "First."), (2, "Third.")]


def test_close_closes_the_segments_never_seen_before_the_last_one_seen() -> None:
    """Found by the stateful model: close() skipped segment 0 (never seen)
    once segment 1 (never seen) was closed, so a late hypothesis of 0 opened
    it again after the stream's end, its final after 2's."""
    f = Feed(max_pending=None)
    f("Third.", seg=2, final=True, start=3.0, end=4.0)
    assert [e.segment for e in f.m.close()] == [2]
    assert f("First.", final=True, end=1.0) == []
    assert f.m.open_segments == ()
    # Segment 1, never seen, closed silently before it (its final failed).
    f = Feed(max_pending=None)
    assert f.m.abandon(1) == []
    assert f.m.close() == []
    assert f("First.", final=True, end=1.0) == []


def test_too_many_waiting_finals_abandon_the_earliest_blocker() -> None:
    f = Feed(max_pending=0)
    f("First.", final=True, end=1.0)
    # Segment 1 never seen, segment 2 open: the final of 3 waits for both.
    f("Third", seg=2, start=3.0, end=3.5)
    out = f("Fourth.", seg=3, final=True, start=4.0, end=5.0)
    assert [(e.segment, e.text) for e in out] == [(2, "Third"), (3, "Fourth.")]
    assert f.m.open_segments == ()


def test_close_abandons_everything_in_order_across_unseen_segments() -> None:
    f = Feed()
    f("First.", final=True, end=1.0)
    f("Third", seg=2, start=3.0, end=3.5)
    f("Fourth.", seg=3, final=True, start=4.0, end=5.0)
    f("Fifth", seg=4, start=5.0, end=5.5)
    assert f.m.abandon(4) == []  # held behind 2 and the never seen 1
    out = f.m.close()
    assert [(e.segment, e.final, e.text) for e in out] == [
        (2, True, "Third"), (3, True, "Fourth."), (4, True, "Fifth")]
    assert f.m.open_segments == ()
    assert f.m.close() == []


def test_too_many_waiting_finals_abandon_the_blocker() -> None:
    f = Feed(max_pending=1)
    f("First.", final=True, end=1.0)
    assert f("Third.", seg=2, final=True, start=3.0, end=4.0) == []
    out = f("Fourth.", seg=3, final=True, start=4.0, end=5.0)
    assert [e.segment for e in out] == [2, 3]
    assert f("Second.", seg=1, final=True, start=2.0, end=3.0) == []


def test_without_a_limit_waiting_finals_wait_for_the_blocker_however_many() -> None:
    f = Feed(max_pending=None)
    f("I was", end=1.0)
    for seg in range(1, 9):
        assert f(f"Segment {seg}.", seg=seg, final=True, start=seg, end=seg + 1.0) == []
    out = f("I was here.", final=True, end=1.0)
    assert [(e.segment, e.text) for e in out] == [
        (0, "I was here."), *((seg, f"Segment {seg}.") for seg in range(1, 9))]
    assert f.m.open_segments == ()


def test_first_segment_is_configurable() -> None:
    m = Merger("s", first_segment=5)
    out = m.feed(Hypothesis("s", 5, 0, RequestKind.FINAL, "Hi.", 0, 100, 0.0, 0.0))
    assert [e.segment for e in out] == [5]


# --- the pure helpers --------------------------------------------------------


def test_tail_after() -> None:
    c = tokenize("I was thinking")
    assert tail_after(c, tokenize("I was thinking maybe")) == (tuple(tokenize("x maybe"))[1:],
                                                                True)
    tail, ok = tail_after(c, tokenize("I WAS thinking maybe"))
    assert ([t.text for t in tail], ok) == (["maybe"], True)
    tail, ok = tail_after(c, tokenize("I was sinking maybe"))
    assert ([t.text for t in tail], ok) == (["maybe"], False)
    tail, ok = tail_after(c, tokenize("I"))
    assert (tail, ok) == ((), False)


def test_stitch_reports_a_missing_seam() -> None:
    prev = tokenize("maybe we could")
    out, found = stitch(prev, Carry(), tokenize("we could go"), overlap_s=0.6)
    assert ([t.text for t in out], found) == (["go"], True)
    out, found = stitch(prev, Carry(), tokenize("wee could go"), overlap_s=0.6)
    assert ([t.text for t in out], found) == (["wee", "could", "go"], False)
    out, found = stitch(prev, Carry(), tokenize("could go"), overlap_s=0.0)
    assert ([t.text for t in out], found) == (["could", "go"], True)


# --- tags the final places inside the committed text ---------------------------


def _committed_then_final(partials: list[str], final: str) -> tuple[CaptionEvent, CaptionEvent]:
    f = Feed()
    for text in partials:
        f(text)
    last = f.events[-1]
    return last, one(f(final, final=True))


def test_final_tags_inside_the_committed_text_are_inserted() -> None:
    last, fin = _committed_then_final(
        ["Hello there, how", "Hello there, how are"],
        "[whispers] Hello there, [pause] how are you?")
    assert last.stable == "Hello there, how"
    assert fin.text == "[whispers] Hello there, [pause] how are you?"
    assert (fin.stable, fin.unstable) == (fin.text, "")
    assert fin.plain_text == "Hello there, how are you?"
    assert [(m.tag, m.index) for m in fin.tags] == [("whispers", 0), ("pause", 2)]


def test_a_final_tag_at_the_very_start_is_inserted() -> None:
    last, fin = _committed_then_final(["So I was", "So I was thinking"],
                                      "[nervous] So I was thinking maybe.")
    assert last.stable == "So I was"
    assert fin.text == "[nervous] So I was thinking maybe."


def test_a_final_tag_between_two_committed_words_is_inserted() -> None:
    last, fin = _committed_then_final(["So I was", "So I was thinking"],
                                      "So [sighs] I was thinking maybe.")
    assert last.stable == "So I was"
    assert fin.text == "So [sighs] I was thinking maybe."


def test_a_tag_the_committed_text_has_is_not_repeated() -> None:
    last, fin = _committed_then_final(
        ["[laughs] Hi there", "[laughs] Hi there you"],
        "[laughs] Hi [pause] there you all.")
    assert last.stable == "[laughs] Hi there"
    assert fin.text == "[laughs] Hi [pause] there you all."


def test_a_revised_committed_word_stays_and_the_tag_beside_it_is_inserted() -> None:
    last, fin = _committed_then_final(
        ["I was thinking maybe", "I was thinking maybe we"],
        "I was [sighs] sinking maybe we could")
    assert last.stable == "I was thinking maybe"
    assert fin.text == "I was [sighs] thinking maybe we could"
    last, fin = _committed_then_final(
        ["I was thinking maybe", "I was thinking maybe we"],
        "I was sinking [sighs] maybe we could")
    assert fin.text == "I was thinking [sighs] maybe we could"


def test_a_final_tag_next_to_the_last_committed_word_duplicates_nothing() -> None:
    words = "a b c d e f g h i j k l m n o p"
    last, fin = _committed_then_final([words, words + " q"],
                                      "a b c d e f g h i j k l m n o [laughs] p q r")
    assert last.stable == words
    assert fin.text == "a b c d e f g h i j k l m n o [laughs] p q r"


def test_final_tags_after_the_committed_text_are_as_before() -> None:
    last, fin = _committed_then_final(["Hi there", "Hi there you"],
                                      "Hi there [laughs] you all [pause] okay.")
    assert last.stable == "Hi there"
    assert fin.text == "Hi there [laughs] you all [pause] okay."
    last, fin = _committed_then_final(["Hi there.", "Hi there. Bye"],
                                      "Hi there [laughs]. Bye now")
    assert fin.text == "Hi there [laughs]. Bye now"


def test_place_tags() -> None:
    def place(committed: str, region: str) -> str:
        return render(place_tags(tokenize(committed), tokenize(region)))

    assert place("Hello there, how", "[whispers] Hello there, [pause] how") == (
        "[whispers] Hello there, [pause] how")
    assert place("one two", "one two") == "one two"
    assert place("[laughs] one two", "[laughs] one [laughs] two") == "[laughs] one [laughs] two"
    assert place("one [sighs] two", "one [gasps] two") == "one [gasps] [sighs] two"
    assert place("one two", "One, TWO [laughs]") == "one two [laughs]"


def test_tail_after_aligns_a_token_inserted_before_the_last_committed_one() -> None:
    # Few tokens shifted by an insertion look like a respelling in place; the
    # last committed token moved, so the cut comes from the alignment.
    c = tokenize("a b c d e f g h i j k l m n about it")
    tail, ok = tail_after(c, tokenize("a b c d e f g h i j k l m n, about it tomorrow"))
    assert ([t.text for t in tail], ok) == (["tomorrow"], True)
    tail, ok = tail_after(tokenize("I think"), tokenize("I really think so"))
    assert ([t.text for t in tail], ok) == (["so"], True)


@pytest.mark.parametrize(("committed", "partial", "final", "text"), [
    ("Yeah so", "Yeah, so I think", "Yeah, so I think.", "Yeah so I think."),
    ("I think", "I really think so", "I really think so.", "I think so."),
])
def test_a_word_or_comma_inserted_before_the_last_committed_word_duplicates_nothing(
        committed: str, partial: str, final: str, text: str) -> None:
    f = Feed()
    f(committed)
    f(committed, end=1.2)
    e = one(f(partial, end=2.0))
    assert e.stable == committed
    assert e.text == text.rstrip(".")
    assert one(f(final, final=True, end=2.2)).text == text


def test_agreement_continues_after_a_comma_inserted_before_the_last_committed_word() -> None:
    f = Feed()
    f("Yeah so")
    f("Yeah so", end=1.2)
    f("Yeah, so I think", end=2.0)
    e = one(f("Yeah, so I think we could", end=3.0))
    assert (e.stable, e.text) == ("Yeah so I think", "Yeah so I think we could")
    e = one(f("Yeah, so I think we could go", end=4.0))
    assert e.stable == "Yeah so I think we could"


def test_tail_after_keeps_a_tag_inserted_among_revised_words_out_of_the_tail() -> None:
    c = tokenize("I was thinking")
    tail, ok = tail_after(c, tokenize("I was [sighs] sinking maybe"))
    assert ([t.text for t in tail], ok) == (["maybe"], False)
    c = tokenize("a b c d e f g h i j k l m n o p")
    tail, ok = tail_after(c, tokenize("a b c d e f g h i j k l m n o [laughs] p q"))
    assert ([t.text for t in tail], ok) == (["q"], True)


@pytest.mark.parametrize("replaces", [True, False])
def test_final_replaces_stable_words_only_when_asked(replaces: bool) -> None:
    f = Feed(final_replaces_stable=replaces)
    f("my daughter asked")
    f("my daughter asked me")          # commits "my daughter asked"
    final = one(f("My daughter asked me, [sighs] why?", final=True))
    if replaces:
        # The final decode heard the whole segment: it is the caption.
        assert final.text == "My daughter asked me, [sighs] why?"
    else:
        # Stable words stay; the rest of the final, tags included, follows.
        assert final.text.startswith("my daughter asked")
        assert "[sighs]" in final.text
    assert final.stable == final.text and final.unstable == ""
    partials = [e for e in f.events if not e.final]
    assert partials[-1].stable == "my daughter asked"


@pytest.mark.parametrize("replaces", [True, False])
def test_a_tag_cut_short_at_the_end_of_a_partial_is_never_committed(replaces: bool) -> None:
    """Two partials cut inside a tag ("[clears", a token budget running out)
    used to commit the half tag as punctuation and a word; the final then
    kept "[clears" and, without final_replaces_stable, lost "maybe I"."""
    f = Feed(final_replaces_stable=replaces)
    f("So [clears")
    assert one(f("So [clears")).stable == "So"
    f("So (laughs")
    f("So (laughs")
    f("So ［clears")
    f("So ［clears")
    assert [e.stable for e in f.events] == ["", "So", "So", "So"]
    e = one(f("So [clears throat] maybe"))
    assert e.stable == "So" and e.text == "So [clears throat] maybe"
    assert one(f("So [clears throat] maybe")).stable == "So [clears throat] maybe"
    fin = one(f("So [clears throat] maybe I", final=True))
    assert fin.text == "So [clears throat] maybe I"
    assert [m.tag for m in fin.tags] == ["clears throat"]


def test_tail_after_does_not_align_a_respelled_last_word_with_a_later_one() -> None:
    """A committed last word cut short ("to" of "today") used to align with a
    later "to" of the hypothesis, so every word between was cut away."""
    c = tokenize("I miss you. But to")
    tail, ok = tail_after(c, tokenize("I miss you. But today I want you to know"))
    assert ([t.text for t in tail], ok) == (["I", "want", "you", "to", "know"], False)
    # Punctuation too, also when n // 8 would let several tokens differ.
    words = " ".join("abcdefghijklmnopqrstuvwxyzabcdef")
    tail, ok = tail_after(tokenize(f"{words} woman."),
                          tokenize(f"{words} woman... Miss Lewinsky. I never"))
    assert ([t.text for t in tail], ok) == (["Miss", "Lewinsky", ".", "I", "never"], False)


def test_words_after_a_respelled_last_committed_word_are_not_lost() -> None:
    """The final used to lose "I want you" (aligned past the later "to")."""
    f = Feed()
    f("I miss you. But to")
    f("I miss you. But to", end=1.2)
    e = one(f("I miss you. But today I want you to know", end=2.0))
    assert (e.stable, e.text) == ("I miss you. But to", "I miss you. But to I want you to know")
    fin = one(f("I miss you. But today I want you to know.", final=True, end=2.5))
    assert fin.text == "I miss you. But to I want you to know."


def test_tail_after_does_not_jump_to_a_far_equal_token_after_a_revision() -> None:
    """A hypothesis that revised the last committed word ("the" -> "a") and
    shifted the rest (a comma) is not revised in place; the committed "the"
    used to align with the hypothesis' later "the", reliably, and the words
    between ("store and") were cut away."""
    c = tokenize("So I went to the")
    tail, ok = tail_after(c, tokenize("So, I went to a store and the clerk"))
    assert ([t.text for t in tail], ok) == (["store", "and", "the", "clerk"], False)
    # With nothing aligned before it, the same.
    tail, ok = tail_after(tokenize("the"), tokenize("a store and the clerk"))
    assert ([t.text for t in tail], ok) == (["store", "and", "the", "clerk"], False)
    # Inserted punctuation, fillers and tags are not a jump: the alignment holds.
    tail, ok = tail_after(tokenize("So I think"), tokenize("So, uh, I think so"))
    assert ([t.text for t in tail], ok) == (["so"], True)
    tail, ok = tail_after(tokenize("So I think"), tokenize("So... [laughs] I think so"))
    assert ([t.text for t in tail], ok) == (["so"], True)


@pytest.mark.parametrize("replaces", [False, True])
def test_words_after_a_revised_and_shifted_last_committed_word_are_not_lost(
        replaces: bool) -> None:
    """The partials used to commit "So I went to the clerk" and the final
    (without final_replaces_stable) lost "store and" for good."""
    f = Feed(final_replaces_stable=replaces)
    f("So I went to the")
    f("So I went to the", end=1.2)
    e = one(f("So, I went to a store and the clerk", end=2.0))
    assert (e.stable, e.text) == ("So I went to the", "So I went to the store and the clerk")
    e = one(f("So, I went to a store and the clerk said", end=2.5))
    assert e.text == "So I went to the store and the clerk said"
    # The same guess twice commits, as two agreeing views do.
    assert e.stable == "So I went to the store and the clerk"
    fin = one(f("So, I went to a store and the clerk said hi.", final=True, end=3.0))
    assert fin.text == ("So, I went to a store and the clerk said hi." if replaces
                        else "So I went to the store and the clerk said hi.")


def test_tail_after_counts_a_word_cut_at_its_apostrophe_as_one() -> None:
    """A partial cut at an apostrophe ("I don'") is two tokens to the
    tokenizer, "don't" one: the apostrophe used to count for a word of the
    hypothesis, and "know" was cut away."""
    tail, ok = tail_after(tokenize("I don'"), tokenize("I don't know"))
    assert ([t.text for t in tail], ok) == (["know"], False)
    tail, ok = tail_after(tokenize("Well it’"), tokenize("Well it’s fine"))
    assert ([t.text for t in tail], ok) == (["fine"], False)
    # Also where n // 8 lets two tokens differ in place.
    words = " ".join("abcdefghijklmnop")
    tail, ok = tail_after(tokenize(f"{words} don'"), tokenize(f"{words} don't know what"))
    assert ([t.text for t in tail], ok) == (["know", "what"], False)
    # And the other way round: the hypothesis cut at the apostrophe.
    tail, ok = tail_after(tokenize("I don't"), tokenize("I don'"))
    assert (tail, ok) == ((), False)


@pytest.mark.parametrize("replaces", [False, True])
def test_a_word_cut_at_its_apostrophe_at_the_end_of_a_partial_is_never_committed(
        replaces: bool) -> None:
    """Two partials cut at an apostrophe ("I don'", the same audio decoded
    twice) used to commit "don'" for good: the captions went on "I don'
    know" and so did the final without final_replaces_stable."""
    f = Feed(final_replaces_stable=replaces)
    f("I don'")
    assert one(f("I don'", end=1.2)).stable == "I"
    e = one(f("I don't know", end=2.0))
    assert (e.stable, e.text) == ("I", "I don't know")
    assert one(f("I don't know what", end=2.5)).stable == "I don't know"
    assert one(f("I don't know what to do.", final=True, end=3.0)).text == (
        "I don't know what to do.")
    # Inside the text, or followed by more of the word, it is committed.
    f = Feed(final_replaces_stable=replaces)
    f("The dogs' bowls")
    assert one(f("The dogs' bowls are", end=1.2)).stable == "The dogs' bowls"
    f = Feed(final_replaces_stable=replaces)
    f("It's")
    assert one(f("It's", end=1.2)).stable == "It's"


@pytest.mark.parametrize("replaces", [False, True])
def test_partials_keep_committing_after_a_respelled_last_committed_word(
        replaces: bool) -> None:
    """After "to" was committed and the model went on with "today", every
    partial's cut was a guess, so nothing was committed until the final:
    the stable text stalled for the rest of the segment."""
    f = Feed(final_replaces_stable=replaces)
    f("I miss you. But to")
    f("I miss you. But to", end=1.2)
    assert one(f("I miss you. But today I want", end=2.0)).stable == "I miss you. But to"
    # The same guess twice in a row is agreement, as two views are.
    e = one(f("I miss you. But today I want you", end=2.5))
    assert (e.stable, e.text) == ("I miss you. But to I want",
                                  "I miss you. But to I want you")
    e = one(f("I miss you. But today I want you to know", end=3.0))
    assert e.stable == "I miss you. But to I want you"
    fin = one(f("I miss you. But today I want you to know.", final=True, end=3.5))
    assert fin.text == ("I miss you. But today I want you to know." if replaces
                        else "I miss you. But to I want you to know.")


def test_a_guessed_cut_commits_only_what_the_next_hypothesis_agrees_on() -> None:
    """Guesses that differ (the hypothesis revised its start again) restart
    the agreement; a cut made once is never committed on its own."""
    f = Feed()
    f("I miss you. But to")
    f("I miss you. But to", end=1.2)
    f("I miss you. But today I want", end=2.0)
    e = one(f("I miss you. Bit today I want you", end=2.5))
    assert e.stable == "I miss you. But to"
    e = one(f("I miss you. But today I want you to", end=3.0))
    assert e.stable == "I miss you. But to"
    e = one(f("I miss you. But today I want you to know", end=3.5))
    assert e.stable == "I miss you. But to I want you to"


@pytest.mark.parametrize(("text", "plain", "indexes"), [
    ("a word[laughs]next b", "a wordnext b", [1]),
    ("a [laughs]-b c", "a-b c", [0]),
    ("I can'[sighs]t go [laughs]", "I can't go", [1, 3]),
    ("it costs 3.[gasps]5 [pause] dollars", "it costs 3.5 dollars", [2, 3]),
    ("[laughs]你好[sighs]世界。[pause]", "你好世界。", [0, 0, 1]),
    ("日本語[笑い]です", "日本語です", [0]),
], ids=["glued-word", "hyphen", "apostrophe", "decimal", "chinese", "japanese"])
def test_a_tag_inside_a_plain_text_word_indexes_that_word(
        text: str, plain: str, indexes: list[int]) -> None:
    """A tag's index is the plain-text word it comes before. A tag glued
    inside a word (or between the characters of a Chinese run, which has
    no spaces) leaves one word in plain_text, yet the index counted its
    two halves: it pointed one word on, or past the last word."""
    e = one(Feed()(text, final=True, start=0.0, end=2.0))
    assert e.plain_text == plain
    assert [m.index for m in e.tags] == indexes


def test_a_partial_cut_inside_a_square_bracket_tag_keeps_the_half_tag_out_of_plain_text() -> None:
    """A partial whose token budget ran out inside a tag ("So [clears")
    showed "[clears" in plain_text, the text for plain captions, until the
    next partial closed it. An open ( or * stays: it is also punctuation
    ("(see")."""
    f = Feed()
    e = one(f("So [clears"))
    assert (e.text, e.plain_text, e.tags) == ("So [clears", "So", ())
    assert one(f("I said,[whis")).plain_text == "I said,"
    assert one(f("He wrote ［笑")).plain_text == "He wrote"
    assert one(f("So (see")).plain_text == "So (see"
    assert one(f("So [clears throat] ok")).plain_text == "So ok"


def test_a_partial_ending_in_an_open_bracket_holding_a_digit_shows_it() -> None:
    """Square brackets holding a digit are text ("see [12]"), so a partial
    cut at "see [12" is cut inside no tag: its plain text keeps "[12" and two
    partials commit it, as any words. A bracket holding letters only is
    still a tag being written, left out."""
    f = Feed()
    e = one(f("see note [12"))
    assert (e.text, e.plain_text) == ("see note [12", "see note [12")
    assert one(f("see note [12")).stable == "see note [12"
    e = one(f("see note [12] here [laug"))
    assert (e.stable, e.plain_text, e.tags) == ("see note [12", "see note [12] here", ())
    fin = one(f("see note [12] here [laughs]", final=True))
    assert (fin.text, fin.plain_text) == ("see note [12] here [laughs]", "see note [12] here")
    assert [(m.tag, m.index) for m in fin.tags] == [("laughs", 4)]


@pytest.mark.parametrize("replaces", [False, True])
def test_a_final_ending_in_a_half_tag_leaves_it_out(replaces: bool) -> None:
    """A final cut inside a tag (the model's token budget, or the loop
    cutter, ending at "and then [laug") kept "[laug" in its text and
    plain_text: captions showed it and a TTS said "laug", a word nobody
    said. A trailing square bracket followed by words alone (no digit, at
    most PUNCT_TAG_MAX characters) is left out of a final now, as a
    partial's plain_text leaves it out. An open ( or * stays (it is
    punctuation too), and so do brackets holding a digit (text)."""
    f = Feed(final_replaces_stable=replaces)
    cases = [
        ("and then [laug", "and then"),
        ("I said,[clears thr", "I said,"),
        ("He wrote ［笑", "He wrote"),
        ("so [laughs] ok [", "so [laughs] ok"),
        ("[whisp", ""),
        ("So (see", "So (see"),
        ("So *laug", "So *laug"),
        ("see note [12", "see note [12"),
        ("it [went on " + "x" * 40, "it [went on " + "x" * 40),  # too long for a tag
    ]
    for seg, (text, kept) in enumerate(cases):
        f(text, seg)
        f(text, seg)  # two partials agree: the half tag is still not committed
        fin = one(f(text, seg, final=True))
        assert (fin.text, fin.stable, fin.unstable) == (kept, kept, ""), text
        assert fin.plain_text == render(tokenize(kept), tags=False)
        assert [m.tag for m in fin.tags] == [t.tag for t in tokenize(kept) if t.is_tag]


def test_a_final_closed_from_its_partial_leaves_the_half_tag_out() -> None:
    """A segment whose final decode failed closes with the partial shown:
    its half tag goes too, and the segment that continues it after a forced
    split is stitched to the text without it."""
    f = Feed()
    f("well and then [laug", 0, end=2.0)
    (fin,) = f.m.abandon(0)
    assert (fin.final, fin.text, fin.plain_text) == (True, "well and then", "well and then")
    f("so [whisp", 1)
    fin = one(f("so [whisp", 1, final=True, forced=True, end=2.0))
    assert fin.text == "so"
    fin = one(f("so yes", 2, final=True, start=1.8, end=3.0))
    assert fin.text == "yes"
