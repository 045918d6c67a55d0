"""Repetition loops at the end of a hypothesis, cut back; people's own
repetitions kept."""

from __future__ import annotations

import pytest

from evoxtral_stream.text.loops import cut_loop


@pytest.mark.parametrize("text", [
    "No, no, no.",
    "no no no",
    "No, no, no, no.",
    "Wait, wait, wait.",
    "ha ha ha ha",
    "Ha ha ha ha ha ha ha.",
    "Yeah, yeah, yeah, yeah, yeah.",
    "bye bye bye bye bye bye",
    "Thank you, thank you, thank you, thank you.",
    "[laughs] [laughs] [laughs] Stop it.",
    "Knock knock. Who's there? Knock knock knock knock knock knock knock",
    "The the",
    "the quick brown fox jumps over the lazy dog and then it runs far away",
    "hahahahahahahahahahahahahahahahahahahaha",
    "",
    "...",
])
def test_what_people_say_is_kept(text: str) -> None:
    assert cut_loop(text) == text


@pytest.mark.parametrize(("text", "cut"), [
    # tiny.en on espeak's "No, no, no." and on a 440 Hz tone, to its budget
    (" ".join(["No"] * 20), "No No No"),
    ("( Be" + " Be" * 24, "( Be Be Be"),
    ("I went to the store" + " the store" * 12, "I went to the store the store the store"),
    # the budget ended inside a copy, inside a word
    ("So [laughs]" + " [laughs]" * 9 + " [lau", "So [laughs] [laughs] [laughs]"),
    ("I think that" + " I think that" * 6 + " I thi", "I think that I think that I think that"),
    ("and the the the the the the the the the", "and the the the"),
    ("Stop, stop, stop, stop, stop, stop, stop, stop,", "Stop, stop, stop"),
    ("it is what it is it is it is it is it is", "it is what it is it is it is"),
    # a phrase of four words, five times
    ("one two three four " * 5, "one two three four one two three four one two three four"),
])
def test_a_loop_is_cut_back_to_three_repeats(text: str, cut: str) -> None:
    assert cut_loop(text) == cut
    assert cut_loop(cut) == cut


def test_the_longest_loop_with_the_shortest_phrase_is_cut() -> None:
    # "no no" twice over is "no" four times: the phrase is one word.
    assert cut_loop("well " + "no " * 16) == "well no no no"
    # Two words alternating: their phrase is two words, not either alone.
    assert cut_loop("a b " * 8) == "a b a b a b"


def test_committed_text_is_never_cut() -> None:
    text = "Be" + " Be" * 19
    assert cut_loop(text, protect=len("Be Be Be Be Be")) == "Be Be Be Be Be"
    # a word straddling the protected length is kept whole
    assert cut_loop(text, protect=len("Be Be Be Be B")) == "Be Be Be Be Be"
    assert cut_loop(text, protect=len(text)) == text
    assert cut_loop(text, protect=1) == "Be Be Be"
