"""Cue lines of text written without spaces (Chinese, Japanese): broken
between characters where a line is full, as UAX #14 and the kinsoku rules
allow, read back by the ``srt`` and ``webvtt-py`` parsers."""

from __future__ import annotations

import html
import re
from datetime import timedelta
from itertools import pairwise

import pytest
import srt
import webvtt
from hypothesis import given, settings
from hypothesis import strategies as st

from evoxtral_stream.events import CaptionEvent
from evoxtral_stream.text.chars import display_width
from evoxtral_stream.text.formats import (
    Cue,
    CueLayout,
    TagStyle,
    build_cues,
    format_timestamp,
    to_srt,
    to_vtt,
)
from evoxtral_stream.text.tags import plain_text, render, tokenize

# No line starts with closing punctuation, a small kana or a prolonged sound
# mark, nor ends with opening punctuation.
_NO_START = set("、。，．！？：；）」』】〉》〕ー々ぁぃぅぇぉっゃゅょゎ"
                "ァィゥェォッャュョヮヵヶ,.!?:;)]")
_NO_END = set("（「『【〈《〔([")
_CJK = re.compile(r"[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")

ZH = ("我今天早上去了一家新开的咖啡店，点了一杯拿铁和一块蛋糕，味道非常好，"
      "服务员也很友善，下次还想再去。")


def final(text: str, start: float = 0.0, end: float = 10.0) -> CaptionEvent:
    return CaptionEvent("s", 0, 1, True, text, plain_text(text), text, "", (), start, end, 0.5)


def _check_lines(text: str, cues: list[Cue], width: int, max_lines: int) -> None:
    """The lines, in order, are the text as written: a line break takes the
    place of a space, or falls between two characters where one is CJK.
    No line is wider than ``width``, none breaks a kinsoku rule."""
    pos = 0
    for cue in cues:
        assert 1 <= len(cue.lines) <= max_lines, cue
        for line in cue.lines:
            assert display_width(line) <= width, (line, cue)
            assert text.startswith(line, pos), (text[pos:], line)
            if pos and text[pos - 1] != " ":
                # Broken where no space was: beside a CJK character, and
                # by the kinsoku rules.
                assert _CJK.match(text[pos - 1]) or _CJK.match(line[0]), (text[:pos], line)
                assert line[0] not in _NO_START and text[pos - 1] not in _NO_END, (
                    text[:pos], line)
            pos += len(line)
            if text[pos:pos + 1] == " ":
                pos += 1
    assert pos == len(text)


def _read_back(events: list[CaptionEvent], cues: list[Cue], layout: CueLayout) -> None:
    parsed = list(srt.parse(to_srt(events, layout=layout), ignore_errors=False))
    assert [(s.content, s.start) for s in parsed] == [
        ("\n".join(c.lines), timedelta(milliseconds=round(c.start * 1000))) for c in cues]
    captions = webvtt.from_string(to_vtt(events, layout=layout), strict=True).captions
    assert [(c.raw_text, c.start) for c in captions] == [
        ("\n".join(c.lines), format_timestamp(c.start, "."))
        for c in build_cues(events, layout=layout, vtt=True)]
    assert [html.unescape(c.raw_text) for c in captions] == ["\n".join(c.lines) for c in cues]


def test_chinese_breaks_between_characters_within_the_line_width() -> None:
    """A final of 60 Chinese characters, written without a space, used to be
    one unbreakable unit: a line 120 columns wide."""
    layout = CueLayout()
    events = [final(ZH, 0.0, 12.0)]
    cues = build_cues(events, layout=layout)
    _check_lines(ZH, cues, 42, 2)
    assert len(cues) > 1
    _read_back(events, cues, layout)


def test_a_broken_word_shares_its_time_among_its_characters() -> None:
    """60 characters over 12 s, one "word" to the tokenizer: each character
    takes 0.2 s, so the first cue closes at 7 s (35 characters) and the
    second starts there."""
    text = "".join(chr(0x4E00 + i) for i in range(60))
    cues = build_cues([final(text, 0.0, 12.0)])
    assert [c.lines for c in cues] == [(text[:21], text[21:35]), (text[35:56], text[56:])]
    assert [c.start for c in cues] == pytest.approx([0.0, 7.0])
    assert cues[-1].end == pytest.approx(12.0)


@pytest.mark.parametrize(("text", "width", "want"), [
    # A comma, a closing bracket, a prolonged sound mark or a small kana
    # never starts a line; an opening bracket never ends one.
    ("一二三四五、六七", 8, [("一二三四", "五、六七")]),
    ("一二三四「五六」", 8, [("一二三四", "「五六」")]),
    ("コーヒーとコーヒー", 8, [("コーヒー", "とコー"), ("ヒー",)]),
    ("あいうえっと", 6, [("あいう", "えっと")]),
    # A Latin word in between is never split; a tag stays with the
    # character after it.
    ("我用Python写代码", 8, [("我用", "Python写"), ("代码",)]),
    ("你好[laughs]世界", 10, [("你好", "[laughs]世"), ("界",)]),
])
def test_kinsoku_latin_words_and_tags(text: str, width: int,
                                      want: list[tuple[str, ...]]) -> None:
    cues = build_cues([final(text, 0.0, 4.0)], layout=CueLayout(max_line_chars=width))
    assert [c.lines for c in cues] == want


def test_halfwidth_katakana_breaks_as_kana_and_keeps_its_voicing_marks() -> None:
    """Halfwidth katakana breaks between kana as wide kana does, but never
    between a kana and its voicing mark (ﾊﾞ is one kana, as バ is), nor
    before a small kana or ｰ."""
    text = "ｺﾝﾆﾁﾊﾞﾊﾞﾊﾞｰｽﾞﾃﾞｽﾈｯﾎﾟ"
    cues = build_cues([final(text, 0.0, 4.0)], layout=CueLayout(max_line_chars=5))
    lines = [line for c in cues for line in c.lines]
    assert "".join(lines) == text
    assert all(display_width(line) <= 5 for line in lines)
    assert not any(line[0] in "ﾞﾟｰｯ" for line in lines), lines
    assert len(lines) > 3


def test_a_space_is_the_better_break() -> None:
    """Chinese and Japanese subtitles often put spaces between phrases: text
    between spaces that a line can hold whole goes to the next line whole,
    as a word does; only a run wider than a line breaks inside."""
    def lines(text: str) -> list[tuple[str, ...]]:
        return [c.lines for c in build_cues([final(text, 0.0, 4.0)],
                                            layout=CueLayout(max_line_chars=16))]

    assert lines("今日は 天気がいいですね") == [("今日は", "天気がいいですね")]
    assert lines("今日は 天気がとてもいいですね") == [("今日は 天気がと", "てもいいですね")]


def test_a_cjk_sentence_end_closes_a_full_cue() -> None:
    """。, ！ and ？ end a sentence as . ! ? do: the cue closes there once
    it holds a full line."""
    cues = build_cues([final("一二三四五六。七八九。", 0.0, 4.0)],
                      layout=CueLayout(max_line_chars=10))
    assert [c.lines for c in cues] == [("一二三四五", "六。"), ("七八九。",)]


def test_vtt_class_spans_stay_whole_when_cjk_text_breaks() -> None:
    text = "[sighs]我今天早上去了一家新开的咖啡店[laughs]点了一杯拿铁"
    cues = build_cues([final(text)], tags=TagStyle.CLASS, vtt=True,
                      layout=CueLayout(max_line_chars=12))
    lines = [line for c in cues for line in c.lines]
    assert len(lines) > 3
    assert all(line.count("<c.") == line.count("</c>") for line in lines)
    assert re.sub(r"</?c[^>]*>", "", "".join(lines)) == text


def test_korean_and_thai_break_at_spaces_only() -> None:
    """Korean is written with spaces, and Thai needs a dictionary to find
    its word ends (UAX #14 breaks none of its text without one): a run of
    either is one unit, as a Latin word is."""
    lay = CueLayout(max_line_chars=10)
    for text in ("안녕하세요반갑습니다 네", "สวัสดีครับยินดีที่ได้รู้จัก ครับ"):
        cues = build_cues([final(text, 0.0, 4.0)], layout=lay)
        assert [c.lines for c in cues] == [tuple(text.split(" "))]


_ZH_WORDS = ["我", "今天", "去了", "咖啡店", "点了", "拿铁", "蛋糕", "东京", "ありがとう",
             "コーヒー", "ちょっと", "カタカナ"]
_PUNCT = ["，", "。", "、", "！", "？", "「", "」", "（", "）", ",", "."]
_LATIN = ["ok", "Python", "AI", "iPhone", "Tokyo", "R&D", "3.5", "9:30"]
_TAGS = ["[laughs]", "[sighs]"]


@st.composite
def _mixed(draw: st.DrawFn) -> str:
    """CJK words, punctuation, short Latin words (each between spaces or
    CJK text, never glued to another Latin word) and tags, at most one mark
    and one tag between two words: no unit that cannot break (a tag, a
    word and the punctuation on it, a tag after it) is wider than 30
    columns."""
    out = ""
    marks = tags = 0  # since the last word
    for _ in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(["zh", "zh", "zh", "punct", "latin", "tag"]))
        if kind == "zh":
            piece = draw(st.sampled_from(_ZH_WORDS))
        elif kind == "punct":
            if marks:
                continue
            piece = draw(st.sampled_from(_PUNCT))
        elif kind == "latin":
            piece = draw(st.sampled_from(_LATIN))
            if out and re.match(r"[\w.,&:]", out[-1]) and not _CJK.match(out[-1]):
                out += " "
        else:
            # Brackets and closing marks glue the tags beside them into one
            # unit ('[laughs] 「 [laughs] 我 [laughs]', 32 columns).
            if tags:
                continue
            piece = draw(st.sampled_from(_TAGS))
        marks, tags = ((0, 0) if kind in ("zh", "latin")
                       else (marks + (kind == "punct"), tags + (kind == "tag")))
        if out and (kind == "tag" or draw(st.integers(0, 5)) == 0):
            out += " "
        out += piece
    return re.sub(r"\s+", " ", out).strip()


@settings(max_examples=150, deadline=None)
@given(_mixed(), st.integers(30, 50), st.integers(1, 3), st.floats(1.0, 30.0))
def test_mixed_cjk_and_latin_lines_fit_and_keep_every_word(
        text: str, width: int, max_lines: int, duration: float) -> None:
    text = render(tokenize(text))
    layout = CueLayout(max_line_chars=width, max_lines=max_lines)
    events = [final(text, 1.0, 1.0 + duration)]
    cues = build_cues(events, layout=layout)
    _check_lines(text, cues, width, max_lines)
    for cue in cues:
        for line in cue.lines:
            # Latin words and tags whole.
            bare = re.sub(r"\[(?:laughs|sighs)\]", " ", line)
            assert "[" not in bare and "]" not in bare, line
            for run in re.findall(r"[A-Za-z0-9]+(?:[.:&][A-Za-z0-9]+)*", bare):
                assert run in _LATIN, (run, line)
    assert all(c.end > c.start for c in cues)
    assert all(a.start <= b.start for a, b in pairwise(cues))
    _read_back(events, cues, layout)


@pytest.mark.parametrize(("text", "width", "want"), [
    # French puts a no-break space (U+00A0, U+202F) before ? ! : ; and
    # inside « »; the tokenizer reads it as a space, and a line broke
    # there: a lone ? or » started a line, a lone « ended one.
    ("Alors tu viens demain\u00a0? Je ne sais pas", 21,
     [("Alors tu viens", "demain ?"), ("Je ne sais pas",)]),
    ("Il a dit «\u00a0Bonjour\u00a0» hier soir", 11,
     [("Il a dit", "« Bonjour »"), ("hier soir",)]),
    ("Voilà\u202f: c'est fini\u202f; merci\u00a0!", 13,
     [("Voilà : c'est", "fini ;"), ("merci !",)]),
    # Hindi often spaces its danda; ¿ and ¡ open a Spanish clause.
    ("मैं ठीक हूँ । आप कैसे हैं ?", 8, [("मैं ठीक", "हूँ ।"), ("आप कैसे", "हैं ?")]),
    ("Dijo ¿ qué tal ? y se fue", 9, [("Dijo", "¿ qué"), ("tal ? y", "se fue")]),
    ("Dijo ¿ qué tal ? y se fue", 14, [("Dijo ¿ qué", "tal ?"), ("y se fue",)]),
])
def test_spaced_punctuation_stays_with_its_word(text: str, width: int,
                                                want: list[tuple[str, ...]]) -> None:
    cues = build_cues([final(text, 0.0, 4.0)], layout=CueLayout(max_line_chars=width))
    assert [c.lines for c in cues] == want


def test_a_sentence_end_inside_spaced_guillemets_closes_the_cue_after_them() -> None:
    """« Oui ! » ends its sentence after the », not between ! and »: the
    next cue started with a lone »."""
    text = "Il a répondu «\u00a0Oui\u00a0!\u00a0» puis il est parti sans rien dire"
    cues = build_cues([final(text, 0.0, 6.0)], layout=CueLayout(max_line_chars=12))
    assert [c.lines for c in cues] == [("Il a répondu", "« Oui ! »"),
                                       ("puis il est", "parti sans"), ("rien dire",)]


_EU_WORDS = ["Alors", "demain", "c'est", "l’homme", "dell'anno", "„Guten", "Tag“",
             "¿Qué", "tal?", "¡Hola!", "très", "Straße", "हूँ", "क्योंकि", "office",
             "Donaudampfschifffahrt", "'s", "avonds", "[laughs]", "[whispers]"]
_SPACED = ["?", "!", ":", ";", "»", "«", "।", "॥", "…", "?»", "!»", "»,", "%"]
_SPACES = [" ", "\u00a0", "\u202f"]


@st.composite
def _spaced_text(draw: st.DrawFn) -> str:
    """Words of the European languages and Hindi with punctuation written
    after a (no-break) space, French style: a closing mark after a word,
    « before one."""
    items = [draw(st.sampled_from(_EU_WORDS))]
    for _ in range(draw(st.integers(0, 30))):
        p = draw(st.sampled_from(_SPACED + _EU_WORDS))
        if p in _SPACED and items[-1] == "«":
            continue  # « opens a word
        # Marks since the last word; a tag is no word: the layout glues it
        # with the mark after it, into the same run.
        word = next((i for i in range(len(items) - 1, -1, -1)
                     if (items[i] not in _SPACED and not items[i].startswith("["))
                     or items[i] == "«"), -1)
        closing = sum(1 for x in items[word + 1:] if x in _SPACED)
        if p in _SPACED and p != "«" and closing == 3:
            continue  # a longer run is a model's loop: see the test below
        items.append(p)
    # « opens a word: none may follow it (tags are no words)
    while items[last := max((i for i, x in enumerate(items) if not x.startswith("[")),
                            default=0)] == "«":
        del items[last]
    return "".join(draw(st.sampled_from(_SPACES)) + p if i else p
                   for i, p in enumerate(items))


@settings(max_examples=200, deadline=None)
@given(_spaced_text(), st.integers(8, 42), st.integers(1, 3),
       st.sampled_from([TagStyle.INLINE, TagStyle.STRIP]))
def test_no_line_starts_with_spaced_closing_punctuation(
        text: str, width: int, max_lines: int, style: TagStyle) -> None:
    text = render(tokenize(text))
    layout = CueLayout(max_line_chars=width, max_lines=max_lines)
    cues = build_cues([final(text, 0.0, 20.0)], tags=style, layout=layout)
    want = plain_text(text) if style is TagStyle.STRIP else text
    lines = [line for c in cues for line in c.lines]
    assert " ".join(lines) == want
    for i, line in enumerate(lines):
        first = line.split(" ")[0]
        if i:
            assert first not in _SPACED or first == "«", (line, lines)
        assert line.split(" ")[-1] != "«", (line, lines)


@pytest.mark.parametrize("text", ["Hmm" + " ..." * 30, "Non" + "\u00a0!" * 40,
                                  "«\u00a0" * 20 + "Oui", "मैं" + " ।" * 30])
def test_a_long_run_of_spaced_punctuation_still_breaks_into_lines_that_fit(text: str) -> None:
    """Spaced punctuation joins its word's line only a few marks deep: a
    model looping on it ("Hmm ... ... ...") made one line of them all,
    however wide."""
    cues = build_cues([final(text, 0.0, 10.0)])
    lines = [line for c in cues for line in c.lines]
    assert " ".join(lines) == text.replace("\u00a0", " ")
    assert max(display_width(line) for line in lines) <= CueLayout().max_line_chars, lines
