"""``Merger.reusable_prefix``: the committed text a decode may continue from."""

from __future__ import annotations

from evoxtral_stream.events import SAMPLE_RATE
from tests.text.test_merger import Feed

END = 100 * SAMPLE_RATE  # a request whose audio covers every partial's


def prefix(f: Feed, seg: int = 0, end: int = END) -> str:
    return f.m.reusable_prefix(seg, end)


def test_the_prefix_grows_with_the_stable_text() -> None:
    f = Feed()
    assert prefix(f) == ""  # a segment never seen
    got = []
    for text in ["So I was", "So I was thinking", "So I was thinking maybe",
                 "So I was thinking maybe we"]:
        (event,) = f(text)
        got.append(prefix(f))
        assert got[-1] == event.stable
    assert got == ["", "So I was", "So I was thinking", "So I was thinking maybe"]


def test_tags_stay_inline_as_the_model_writes_them() -> None:
    f = Feed()
    f("[nervous] So... [stammers] I was")
    f("[nervous] So... [stammers] I was thinking")
    assert prefix(f) == "[nervous] So... [stammers] I was"


def test_a_closed_segment_has_no_prefix() -> None:
    f = Feed()
    f("Good evening and")
    f("Good evening and welcome")
    assert prefix(f) == "Good evening and"
    f("Good evening and welcome.", final=True)
    assert prefix(f) == ""
    f = Feed()
    f("Good evening and")
    f("Good evening and welcome")
    f.m.abandon(0)
    assert prefix(f) == ""


def test_a_decode_of_shorter_audio_gets_no_prefix() -> None:
    # A forced final is cut before audio its partials heard: the committed
    # words may lie past the cut.
    f = Feed()
    f("one two three", end=3.0)
    f("one two three four", end=4.0)
    assert prefix(f, end=4 * SAMPLE_RATE) == "one two three"
    assert prefix(f, end=4 * SAMPLE_RATE - 1) == ""


def test_a_revised_committed_word_withholds_the_prefix_until_agreement_is_literal() -> None:
    f = Feed()
    f("I want the restaurant")
    f("I want the restaurant downtown")
    assert prefix(f) == "I want the restaurant"
    # The model respelled a committed word: the stable text is no longer a
    # prefix of what it wrote, so it is not handed back.
    (event,) = f("I want a restaurant downtown now")
    assert event.stable.startswith("I want the restaurant")
    assert prefix(f) == ""
    f("I want the restaurant downtown now please")
    assert prefix(f) == "I want the restaurant downtown now"


def test_a_tag_the_model_wrote_in_another_form_withholds_the_prefix() -> None:
    f = Feed()
    f("(laughs) So I was")
    f("(laughs) So I was thinking")
    # Committed as "[laughs] So I was", which the model did not write.
    assert f.events[-1].stable == "[laughs] So I was"
    assert prefix(f) == ""


def test_held_and_stitched_segments_have_no_prefix() -> None:
    f = Feed()
    f("first sentence here", seg=0, end=2.0)
    f("first sentence here too", seg=0, end=3.0)
    # Segment 1 is held while segment 0 is open.
    f("second one", seg=1, start=4.0, end=5.0)
    f("second one goes on", seg=1, start=4.0, end=6.0)
    assert prefix(f, seg=1) == ""
    assert prefix(f, seg=0) == "first sentence here"
    # Segment 0 ends at a forced split: segment 1 continues it and is stitched.
    f("first sentence here too and", seg=0, final=True, end=4.5, forced=True)
    f("and second one goes on", seg=1, start=4.0, end=7.0)
    f("and second one goes on still", seg=1, start=4.0, end=8.0)
    assert f.events[-1].stable == "second one goes on"
    assert prefix(f, seg=1) == ""
    # A held final waits: its segment is as good as closed.
    f("third", seg=3, start=9.0, end=10.0, final=True)
    assert prefix(f, seg=3) == ""


def test_a_continuation_is_stitched_even_where_nothing_was_dropped() -> None:
    f = Feed()
    f("first part", seg=0, final=True, end=4.0, forced=True)
    f("second one", seg=1, start=4.0, end=5.0)
    f("second one goes on", seg=1, start=4.0, end=6.0)
    # No overlap audio, nothing dropped: the text is the model's own, but it
    # was read as a continuation, so it is not handed back.
    assert f.events[-1].stable == "second one"
    assert prefix(f, seg=1) == ""


def test_a_segment_after_a_natural_end_is_not_stitched() -> None:
    f = Feed()
    f("Good evening.", seg=0, final=True, end=2.0)
    f("Thank you for", seg=1, start=3.0, end=4.0)
    f("Thank you for listening", seg=1, start=3.0, end=5.0)
    assert prefix(f, seg=1) == "Thank you for"


def test_the_query_changes_nothing() -> None:
    texts = ["So I was", "So I was thinking", "So I was thinking maybe", "So I was thinking"]
    plain, asked = Feed(), Feed()
    for t in texts:
        plain(t)
        prefix(asked)
        asked(t)
        prefix(asked)
    plain("So I was thinking maybe we", final=True)
    asked("So I was thinking maybe we", final=True)
    assert plain.events == asked.events
