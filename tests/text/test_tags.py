"""The tag table, the tokenizer and the normaliser on tricky text."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from evoxtral_stream.events import CaptionEvent
from evoxtral_stream.text import tags as tags_module
from evoxtral_stream.text.chars import CONTROL, drop_hidden
from evoxtral_stream.text.formats import to_srt
from evoxtral_stream.text.tags import (
    TAG_TABLE,
    Carry,
    TagKind,
    Token,
    TokenKind,
    join_texts,
    lookup_tag,
    normalize,
    normalize_tag_name,
    plain_text,
    render,
    seam,
    tag_word_indexes,
    tokenize,
)

from .samples import SCRIPTS

TRAINED = {
    "pause": TagKind.PAUSE, "sighs": TagKind.NONVERBAL, "whispers": TagKind.DELIVERY,
    "nervous": TagKind.EMOTION, "clears throat": TagKind.NONVERBAL,
    "laughs": TagKind.NONVERBAL, "excited": TagKind.EMOTION, "gasps": TagKind.NONVERBAL,
    "stammers": TagKind.DELIVERY, "frustrated": TagKind.EMOTION, "calm": TagKind.EMOTION,
    "angry": TagKind.EMOTION, "shouts": TagKind.DELIVERY, "sad": TagKind.EMOTION,
    "crying": TagKind.DELIVERY,
}


def kinds(text: str) -> list[tuple[str, str]]:
    return [(t.kind.value, t.text) for t in tokenize(text)]


def test_table_has_the_trained_tags_with_their_kinds() -> None:
    trained = {s.name: s.kind for s in TAG_TABLE if s.trained}
    assert trained == TRAINED


def test_table_names_are_unique_and_normalised() -> None:
    names = [n for s in TAG_TABLE for n in (s.name, *s.aliases)]
    assert len(names) == len(set(names))
    assert all(normalize_tag_name(n) == n for n in names)
    for rare in ("scared", "emotional", "slams door", "confused", "yawns", "curious tone",
                 "sniffles", "laughs nervously", "worried", "curious", "serious",
                 "giggles"):
        assert lookup_tag(rare) is not None, rare


def test_only_emotion_and_delivery_carry() -> None:
    assert [k for k in TagKind if k.carries] == [TagKind.EMOTION, TagKind.DELIVERY]


def test_multi_word_tag_is_one_token() -> None:
    toks = tokenize("[clears throat] Hello")
    assert [t.kind for t in toks] == [TokenKind.TAG, TokenKind.WORD]
    assert toks[0].tag == "clears throat"
    assert toks[0].tag_kind is TagKind.NONVERBAL


def test_adjacent_tags_and_tags_at_both_ends() -> None:
    assert kinds("[laughs] [excited] Hi! [sighs]") == [
        ("tag", "[laughs]"), ("tag", "[excited]"), ("word", "Hi"), ("punct", "!"),
        ("tag", "[sighs]"),
    ]
    assert kinds("[laughs][excited]") == [("tag", "[laughs]"), ("tag", "[excited]")]
    assert render(tokenize("[laughs][excited]")) == "[laughs][excited]"


@pytest.mark.parametrize(("raw", "canonical"), [
    ("(laughs)", "[laughs]"),
    ("*sighs*", "[sighs]"),
    ("[LAUGHTER]", "[laughs]"),
    ("[Laughs]", "[laughs]"),
    ("[ laughs  ]", "[laughs]"),
    ("[clears_throat]", "[clears throat]"),
    ("[Clears   Throat.]", "[clears throat]"),
    ("[whispering]", "[whispers]"),
    ("(Sighing)", "[sighs]"),
    ("(\nsighs)", "[sighs]"),
    ("*\tlaughs\r\n*", "[laughs]"),
    ("(clears" + " " * 40 + "throat)", "[clears throat]"),
])
def test_variants_map_to_the_canonical_tag(raw: str, canonical: str) -> None:
    (tok,) = tokenize(raw)
    assert tok.kind is TokenKind.TAG
    assert tok.known
    assert tok.text == canonical


def test_unknown_bracketed_tag_is_kept_verbatim_and_flagged() -> None:
    (tok,) = tokenize("[Dramatic  Music]")
    assert tok.kind is TokenKind.TAG
    assert not tok.known
    assert tok.text == "[Dramatic Music]"
    assert tok.tag == "dramatic music"
    assert tok.tag_kind is TagKind.UNKNOWN


def test_parentheses_and_asterisks_only_make_known_tags() -> None:
    assert kinds("(see below) *really*") == [
        ("punct", "("), ("word", "see"), ("word", "below"), ("punct", ")"),
        ("punct", "*"), ("word", "really"), ("punct", "*"),
    ]
    assert normalize("(see below) *really*") == "(see below) *really*"
    # At most 40 characters inside, whitespace runs counted as one.
    assert kinds("(" + "laughs" + "!" * 34 + ")")[0] == ("tag", "[laughs]")
    assert kinds("(" + "laughs" + "!" * 35 + ")")[0] == ("punct", "(")


@pytest.mark.parametrize(("raw", "canonical"), [
    ("[[laughs]] ok", "[laughs] ok"),
    ("([laughs]) ok", "[laughs] ok"),
    ("*[laughs]* ok", "[laughs] ok"),
    ("**laughs** ok", "[laughs] ok"),
    ("((laughs)) ok", "[laughs] ok"),
    ("[(laughs)] ok", "[laughs] ok"),
    ("[*clears throat*] ok", "[clears throat] ok"),
    ("so [[Dramatic Music]] ok", "so [Dramatic Music] ok"),
    ("a[[sighs]]b", "a[sighs]b"),
])
def test_a_tag_wrapped_twice_is_one_tag(raw: str, canonical: str) -> None:
    """A model writes a tag with a second pair of brackets, or markdown's
    asterisks around it, now and then: the inner tag was the tag and the
    outer pair was left in the plain text ("[] ok", "() ok", "** ok")."""
    assert normalize(raw) == canonical
    assert plain_text(raw) == plain_text(canonical)
    assert not any(c in plain_text(raw) for c in "[]()*")


def test_wrappers_around_more_than_one_tag_stay_text() -> None:
    assert kinds("[b [laughs] c]") == [
        ("punct", "["), ("word", "b"), ("tag", "[laughs]"), ("word", "c"), ("punct", "]")]
    assert normalize("(see [laughs]) **bold** [(x) y]") == "(see [laughs]) **bold** [(x) y]"


@pytest.mark.parametrize("text", ["[ *]*]", "[ *] *]", "[ *a]b*]", "[ (a]b)]", "\uff3b *\uff3d*]"])
def test_a_wrapper_never_reaches_past_the_bracket_that_ends_a_tag(text: str) -> None:
    """``[ *]`` is the tag ``[*]``: normalised, ``[ *]*]`` read as ``[``
    around ``*]*``, one tag, and normalising again changed the tokens."""
    once = normalize(text)
    assert tokenize(once) == tokenize(text)
    assert normalize(once) == once


@pytest.mark.parametrize(("text", "once"), [
    ("[[[laughs]]] ok", "[laughs] ok"),
    ("*([laughs])* ok", "[laughs] ok"),
    ("***sighs***", "[sighs]"),
    ("(\uff3b\uff3ba\uff3d\uff3d)", "[a]"),
    ("\uff08\uff3b*[(\uff3d*\uff3d*", "\uff08[(]*"),
    ("[ (sighs)*a]", "[ [sighs]*a]"),
    ("\uff3b (sighs)*a]", "\uff3b [sighs]*a]"),
    ("[\n(s))]", "[ (s))]"),
    # The "*" after "[[laughs]]" opens the tag "*gasps*": no pair around it.
    ("*[[laughs]]*gasps*", "*[laughs][gasps]"),
])
def test_odd_nests_normalise_once_for_all(text: str, once: str) -> None:
    """A tag wrapped twice inside one more pair (``[[[laughs]]]``) kept the
    outer pair, written around ``[laughs]``: a wrapped tag the next time.
    And ``[ (sighs)*a]`` was the tag ``[(sighs)*a]``, which reads as ``[``,
    ``[sighs]``, ``*a]``. Normalising twice changed the text or its tokens
    (found by the idempotence property at 20,000 examples, which CI's 200
    could draw: fullwidth [ ] are square brackets, and fail as ASCII ones)."""
    assert normalize(text) == once
    assert normalize(once) == once
    assert tokenize(once) == tokenize(text)


@pytest.mark.parametrize(("text", "plain"), [
    ("see [1] now", "see [1] now"),  # a citation
    ("see array[0] now", "see array[0] now"),  # glued to a word
    ("in [2021] and at [10:30]", "in [2021] and at [10:30]"),
    ("the [1990s] were", "the [1990s] were"),
    ("at [2x speed] ok", "at [2x speed] ok"),
    # A known tag with a digit typed in is no tag either: one rule.
    ("he [laughs 2x] ok", "he [laughs 2x] ok"),
    ("so [[1]] and ([1]) and [(1)] and *[1]* ok", "so [[1]] and ([1]) and [(1)] and *[1]* ok"),
    ("\uff3b\uff11\uff3d ok", "\uff3b\uff11\uff3d ok"),  # fullwidth brackets and digit
    ("[\u0663] ok", "[\u0663] ok"),  # an Arabic-Indic digit
    ("note [\u00b9] ok", "note [\u00b9] ok"),  # a superscript: a digit once NFKC'd
    ("page[12].", "page[12]."),
])
def test_square_brackets_holding_a_digit_are_text_not_a_tag(text: str, plain: str) -> None:
    """A citation ("[1]"), an index ("array[0]"), a year or a time in
    brackets were unknown tags: plain_text, what captions show, lost them
    ("see array now"), and the TTS bridge needed a rule of its own to read
    them. Square brackets whose inner text holds a digit are text now:
    punctuation, the words inside, punctuation; no tag names a digit."""
    toks = tokenize(text)
    assert render(toks) == text
    assert plain_text(text) == plain
    assert not any(c.isdecimal() for t in toks if t.is_tag for c in f"{t.text}{t.tag}")
    assert normalize(text) == text


def test_a_bracketed_number_is_punctuation_and_words() -> None:
    assert kinds("see [1] now") == [
        ("word", "see"), ("punct", "["), ("word", "1"), ("punct", "]"), ("word", "now")]
    assert kinds("array[0].") == [
        ("word", "array"), ("punct", "["), ("word", "0"), ("punct", "]."), ]
    assert kinds("[9:30 pm]") == [("punct", "["), ("word", "9:30"), ("word", "pm"), ("punct", "]")]
    # A tag inside is still a tag.
    assert kinds("[(laughs) 3]") == [
        ("punct", "["), ("tag", "[laughs]"), ("word", "3"), ("punct", "]")]
    assert plain_text("[(laughs) 3] go") == "[ 3] go"
    # Bracketed letters alone stay a tag, known or not.
    assert kinds("[sic] [laughs] [Dramatic Music]") == [
        ("tag", "[sic]"), ("tag", "[laughs]"), ("tag", "[Dramatic Music]")]


def test_words_inside_a_bracketed_number_count_for_the_tags_after_it() -> None:
    toks = tokenize("see [1] [laughs] now [2 more] [sighs]")
    assert [t.tag for t in toks if t.is_tag] == ["laughs", "sighs"]
    assert tag_word_indexes(toks) == [2, 5]


def test_fullwidth_square_brackets_make_tags() -> None:
    """Chinese and Japanese text is written with fullwidth punctuation, and
    a model writing it may bracket a tag with ［ ］ (U+FF3B, U+FF3D), the
    fullwidth [ ]. They were punctuation: the tag's name stayed in the
    plain text and in no tags field. Fullwidth letters in a tag
    (［Ｌａｕｇｈｓ］) are the letters."""
    toks = tokenize("［笑］你好［ＬＡＵＧＨＳ］世界。［laughs]")
    assert [(t.text, t.tag, t.known) for t in toks if t.is_tag] == [
        ("[笑]", "笑", False), ("[laughs]", "laughs", True), ("[laughs]", "laughs", True)]
    assert render(toks) == "[笑]你好[laughs]世界。[laughs]"
    assert plain_text("［笑］你好［ＬＡＵＧＨＳ］世界。") == "你好世界。"
    assert normalize("［［laughs］］ ok") == "[laughs] ok"
    assert kinds("［］ a ［") == [("punct", "［］"), ("word", "a"), ("punct", "［")]


def test_brackets_inside_words() -> None:
    toks = tokenize("hel[laughs]lo wor[ld")
    assert [t.text for t in toks] == ["hel", "[laughs]", "lo", "wor", "[", "ld"]
    assert render(toks) == "hel[laughs]lo wor[ld"
    assert plain_text("hel[laughs]lo") == "hello"


def test_empty_and_blank_text() -> None:
    assert tokenize("") == []
    assert tokenize("  \n\t ") == []
    assert plain_text("") == ""
    assert kinds("[] [ ]") == [("punct", "[]"), ("punct", "["), ("punct", "]")]


def test_control_characters_are_whitespace() -> None:
    """A model's byte tokens can write NUL or ESC; they were punctuation
    tokens, so a caption carried them to terminals (escape sequences) and
    espeak-ng (NUL ends its input). They separate words as spaces do."""
    toks = tokenize("So\x1b I\x00said\x07 [laughs]\x85 yes.\x7f")
    assert render(toks) == "So I said [laughs] yes."
    assert [t.text for t in toks if t.is_word] == ["So", "I", "said", "yes"]
    assert tokenize("\x00\x1b\x9f") == []


def test_control_characters_inside_an_unknown_tag_are_whitespace() -> None:
    """An unknown tag is kept as written, and its control characters went
    with it into captions and subtitle files ("[\\x1b]" in an SRT)."""
    toks = tokenize("[a\x00b] [bell\x07] [\x1b] [x\x9by] hi")
    assert render(toks) == "[a b] [bell] [ ] [x y] hi"
    assert [t.tag for t in toks if t.is_tag] == ["a b", "bell", "x y"]
    assert to_srt([CaptionEvent("s", 0, 1, True, "[\x1b[31m] [a\x00b] hi", "hi", "", "", (),
                                0.0, 1.0, None)]).endswith("\n[ [31m] [a b] hi\n")


def test_a_lone_surrogate_is_a_replacement_character() -> None:
    """A lone surrogate (a byte that is no UTF-8, decoded with
    surrogateescape) is no text: no file or socket could take a caption
    holding it. It is U+FFFD, as a decoder that replaces writes it."""
    toks = tokenize("caf\udce9 ok\ud800 [laughs\udfff]")
    assert render(toks) == "caf\ufffd ok\ufffd [laughs\ufffd]"
    assert plain_text("caf\udce9 ok") == "caf\ufffd ok"
    assert to_srt([CaptionEvent("s", 0, 1, True, "a\udce9b", "", "", "", (),
                                0.0, 1.0, None)]).endswith("\na\ufffdb\n")


def test_bidi_controls_and_invisible_format_characters_are_dropped() -> None:
    """A model (or another server's caption, read back by subtitles) may
    write U+202E or isolates, which reorder what a terminal, an editor or a
    player shows, or zero-width characters, which hide what a caption holds
    (an unknown tag "[\\u200b]" showed as an empty one). They take no room,
    so they are dropped, not made spaces; ZWNJ and ZWJ join visible letters
    and stay."""
    toks = tokenize("pay \u202e0001$\u202c [laughs\u200b] \u2066ok\u2069 [\u200b] [ev\u2067il]")
    assert render(toks) == "pay 0001$ [laughs] ok [] [evil]"
    assert [(t.tag, t.known) for t in toks if t.is_tag] == [("laughs", True), ("evil", False)]
    assert tokenize("\ufeff\u200b\u2060") == []
    assert plain_text("zero\u200bwidth \u00adsoft") == "zerowidth soft"
    kept = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 \U0001f469\u200d\U0001f4bb"
    assert render(tokenize(kept)) == kept
    assert to_srt([CaptionEvent("s", 0, 1, True, "a\u202eb [\u2066x]", "", "", "", (),
                                0.0, 1.0, None)]).endswith("\nab [x]\n")


def test_unicode_words_and_symbols() -> None:
    toks = tokenize("Café 你好 naïve — ok 😀!")
    assert [t.text for t in toks if t.is_word] == ["Café", "你好", "naïve", "ok"]
    assert render(toks) == "Café 你好 naïve — ok 😀!"


def test_combining_marks_belong_to_their_word() -> None:
    """Vowel signs and viramas (Hindi, one of Voxtral's languages; Thai),
    and accents written apart (NFD), are combining marks, not letters to
    \\w: each used to end the word, so "क्योंकि" was three words and two
    punctuation marks to the merger, which could cut it at a seam."""
    text = "मैं नहीं आया क्योंकि हिंदी-भाषी, ที่ ตลาด cafe\u0301's re\u0301sume\u0301 ok"
    toks = tokenize(text)
    assert [t.text for t in toks if t.is_word] == [
        "मैं", "नहीं", "आया", "क्योंकि", "हिंदी-भाषी", "ที่", "ตลาด", "cafe\u0301's",
        "re\u0301sume\u0301", "ok"]
    assert [t.text for t in toks if t.is_punct] == [","]
    assert render(toks) == text
    # A mark with no letter before it stays punctuation, as it was.
    assert kinds("\u0301a \u0301") == [("punct", "\u0301"), ("word", "a"), ("punct", "\u0301")]


def test_words_keep_their_joins_and_caps() -> None:
    toks = tokenize("I-I can't pay $500 for R&D, 3.5 times... REALLY?!")
    assert [t.text for t in toks] == [
        "I-I", "can't", "pay", "$500", "for", "R&D", ",", "3.5", "times", "...", "REALLY", "?!",
    ]
    assert [t.text for t in toks if t.emphasis] == ["REALLY"]


def test_plain_text_drops_tags_and_keeps_spacing() -> None:
    assert plain_text("[nervous] So... [stammers] I was [laughs] here.") == "So... I was here."
    assert plain_text("Hello [laughs].") == "Hello."
    assert plain_text("a [laughs]b") == "a b"
    assert plain_text("[laughs]") == ""


def test_scripts_round_trip_and_strip_like_the_seed() -> None:
    for text in SCRIPTS:
        assert render(tokenize(text)) == text
        seed_plain = re.sub(r"\[[^\]]+\]\s*", "", text).strip()
        assert plain_text(text) == seed_plain
        assert all(t.known for t in tokenize(text) if t.is_tag)


def test_carry_state() -> None:
    c = Carry().advance_all(tokenize("[whispers] [nervous] Don't"))
    assert c == Carry("nervous", "whispers")
    assert c.holds(tokenize("[whispers]")[0])
    assert not c.holds(tokenize("[shouts]")[0])
    assert not c.holds(tokenize("[laughs]")[0])
    assert c.advance_all(tokenize("[calm]")) == Carry("calm", "whispers")
    # An ellipsis does not end the sentence; a full stop does.
    assert c.advance_all(tokenize("wait... go")) == c
    assert c.advance_all(tokenize("turn around.")) == Carry()
    assert c.advance_all(tokenize('HERE."')) == Carry()
    assert c.advance_all(tokenize("really?!")) == Carry()
    # Chinese and Japanese end theirs with 。！？ (fullwidth), a closing 」 after.
    assert c.advance_all(tokenize("你好。")) == Carry()
    assert c.advance_all(tokenize("「本当？」")) == Carry()
    assert c.advance_all(tokenize("待って．．．まだ")) == c


def test_a_sentence_end_is_one_rule_for_carried_tags_and_subtitle_cues() -> None:
    for text in ("end.", "end!", "end?", "終わり。", "終わり！", "終わり？", "終わり｡",
                 "end．", "「終わり。」", 'end."', "अंत।", "अंत॥", "النهاية؟", "ختم۔"):
        assert tokenize(text)[-1].ends_sentence, text
    for text in ("wait...", "待って．．．", "so,", "ね、", "「"):
        assert not tokenize(text)[-1].ends_sentence, text
    # A bracket opening right after the full stop (a citation is text:
    # "[1]") is one punctuation token with it, and the sentence still ends.
    for text in ("it.[1] Then", "done!(see", "end.［２］"):
        assert [t.ends_sentence for t in tokenize(text)].count(True) == 1, text
    for text in ("wait...[1]", "so,(see"):
        assert not any(t.ends_sentence for t in tokenize(text)), text


def test_a_sentence_ends_inside_any_language_s_closing_quotes() -> None:
    """German closes a quote with “ or ‘ („Ja!“, ‚Ja!‘) and with « or ‹ in
    its guillemets (»Ja!«); Swiss and French single guillemets close with ›.
    The full stop inside them ended no sentence: a whispered „Ja!“ kept
    the next sentence whispered, and no cue closed there."""
    for text in ("„Ja!“", "„Ja.“", "‚Ja?‘", "»Ja!«", "›Ja.‹", "‹Oui !›", "«Oui.»"):
        assert tokenize(text)[-1].ends_sentence, text
    c = Carry(emotion="excited", delivery="whispers")
    assert c.advance_all(tokenize("Er sagte: „Ja!“")) == Carry()
    for text in ("„Ja…“", "»so,«"):
        assert not tokenize(text)[-1].ends_sentence, text


_pieces = st.sampled_from([
    "word", "CAPS", "I-I", "can't", ",", "...", "?!", ".", "—", "[laughs]", "[clears throat]",
    "(sighs)", "*gasps*", "[LAUGHTER]", "[Unknown Thing]", "café", "[", "]", "(", ")", "*",
    "$5", "😀", "[[laughs]]", "*[sighs]*",
    # Fullwidth brackets (［ ］ are square brackets, （ ） only punctuation)
    # and the ideographic space, which normalising folds.
    "\uff3b", "\uff3d", "\uff08", "\uff09", "\uff3blaughs\uff3d", "\uff3b\uff3bsighs\uff3d\uff3d",
])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_pieces, st.sampled_from(["", " ", "  ", "\n", "\u3000"])), max_size=30))
def test_normalising_is_idempotent(parts: list[tuple[str, str]]) -> None:
    text = "".join(p + sep for p, sep in parts)
    once = normalize(text)
    assert normalize(once) == once
    assert tokenize(once) == tokenize(text)
    assert "  " not in once
    assert once == once.strip()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
@example("*\nlaughs*")
@example("(\nsighs)")
@example("(sighs\n) and *gasps\r\n*")
@example("(clears" + " " * 40 + "throat)")
@example("*" + "\n" * 41 + "laughs*")
def test_any_text_tokenizes_and_renders(text: str) -> None:
    toks = tokenize(text)
    assert all(isinstance(t, Token) for t in toks)
    out = render(toks)
    assert tokenize(out) == toks
    if not any(ch in text for ch in "[]()*"):
        # Without tag syntax, nothing but whitespace (control characters
        # count as whitespace) may change, and hidden format characters go.
        assert out.split() == re.sub(f"[{CONTROL}]", " ", drop_hidden(text)).split()


_digits = st.sampled_from([
    "[", "]", "\uff3b", "\uff3d", "(", ")", "*", "1", "42", "9:30", "1990s", "\u00b9",
    "\uff11", "laughs", "x", "[laughs]", "[sic]", ".", " ",
])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(_digits, max_size=20).map("".join)))
@example("see [1] now [laughs 2x] ok")
def test_no_tag_holds_a_digit_and_plain_text_keeps_every_digit(text: str) -> None:
    """The rule for square brackets holding a digit, on any text: no tag's
    name or text holds a digit (as NFKC writes it), and every digit of the
    text is in its plain text, in order."""
    toks = tokenize(text)
    assert not any(c.isdecimal() for t in toks if t.is_tag
                   for c in unicodedata.normalize("NFKC", f"{t.text}{t.tag}"))
    assert [c for c in plain_text(text) if c.isdecimal()] == [c for c in text if c.isdecimal()]


_glued = st.sampled_from([
    "word", "can", "'", "t", "3", ".", "5", "-", "你好", "世界", "。", "—", "...", ",",
    "[laughs]", "[Unknown Thing]", "(sighs)", "[", "]", "(", ")", "*", "la", "ughs",
    "क्यों", "\u0301",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_glued, st.sampled_from(["", "", " "])), max_size=20))
@example([("word", ""), ("[laughs]", ""), ("word", "")])
@example([("3", ""), (".", ""), ("[laughs]", ""), ("5", "")])
def test_a_tag_indexes_the_plain_text_word_it_comes_before(
        parts: list[tuple[str, str]]) -> None:
    """The words of the plain text before a tag's place are the words of
    the plain text rendered up to it, but for the last one, which goes on
    past the tag when the tag is inside it."""
    toks = tokenize("".join(p + sep for p, sep in parts))
    words = [t.text for t in tokenize(plain_text(render(toks))) if t.is_word]
    expected = []
    for i, tok in enumerate(toks):
        if tok.is_tag:
            before = [t.text for t in tokenize(render(toks[:i], tags=False)) if t.is_word]
            k = 0
            while k < min(len(before), len(words)) and before[k] == words[k]:
                k += 1
            expected.append(k)
    assert tag_word_indexes(toks) == expected
    assert all(0 <= i <= len(words) for i in expected)


@pytest.mark.parametrize(("before", "after", "between"), [
    ("你好。", "我很好。", ""),
    ("そうです", "ね", ""),
    ("ＯＫ", "です", ""),            # fullwidth letters are written as CJK
    ("안녕하세요", "반갑습니다", " "),
    ("สวัสดีครับ", "ยินดีที่ได้รู้จัก", " "),  # Thai spaces its phrases
    ("用了", "Python", " "),
    ("你好!", "我很好", " "),        # ASCII punctuation is spaced as Latin
    ("か\u3099", "ね", ""),         # a dakuten written apart is its kana's
    ("[laughs]", "[sighs]", " "),
    ("[laughs]", "我很好", ""),
    ("\u200b", "我很好", " "),      # nothing visible before
])
def test_seam_is_no_space_inside_text_written_without_spaces(before: str, after: str,
                                                              between: str) -> None:
    assert seam(before, after) == between


def test_join_texts_looks_past_texts_of_nothing_but_tags() -> None:
    """A final of tags alone between two (laughter, then a sigh) is glued
    inside Chinese as a tag at any seam is: the seam after it looks past it
    to the text before, as one before a tag looks past the tag."""
    assert join_texts(["你好。", "[laughs]", "[sighs]", "我很好。"]) == (
        "你好。[laughs][sighs]我很好。")
    assert join_texts(["你好。", "[laughs]", "", "[sighs] [cough]", "我很好。"]) == (
        "你好。[laughs][sighs] [cough]我很好。")
    assert join_texts(["Hi.", "[laughs]", "[sighs]", "There."]) == "Hi. [laughs] [sighs] There."
    assert join_texts(["[laughs]", "[sighs]", "你好"]) == "[laughs] [sighs]你好"


def test_join_texts_reads_each_text_a_bounded_number_of_times(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A long run of finals of nothing but tags (an hour of [music]) is read
    as much as any run: each seam tokenizes the last text that holds words
    and the one tag-only text before it, never the whole run so far (which
    made a day's transcript quadratic: 4,000 such finals took 30 s)."""
    read: list[int] = []
    real = tags_module.tokenize

    def tokenize(text: str) -> list[Token]:
        read.append(len(text))
        return real(text)

    monkeypatch.setattr(tags_module, "tokenize", tokenize)
    texts = ["你好。", *(["[music]"] * 2000), "世界", *(["[music]"] * 2000), "Hi"]
    assert join_texts(texts) == "你好。" + "[music]" * 2000 + "世界" + "[music]" * 2000 + " Hi"
    assert max(read) <= len("你好。 [music]")
    assert sum(read) < 20 * sum(map(len, texts))


def test_join_texts_skips_empty_texts() -> None:
    assert join_texts(["", "你好。", "", "我很好。", "Hi", "there"]) == "你好。我很好。Hi there"
    assert join_texts([]) == ""


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(SCRIPTS), max_size=4))
def test_latin_texts_join_by_single_spaces(texts: list[str]) -> None:
    assert join_texts(texts) == " ".join(texts)
