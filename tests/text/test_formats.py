"""Caption files: SRT, WebVTT, JSONL and plain text."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evoxtral_stream.events import CaptionEvent, TagMark
from evoxtral_stream.server.protocol import caption_to_dict
from evoxtral_stream.text.formats import (
    CueLayout,
    SubtitleWriter,
    TagStyle,
    build_cues,
    format_timestamp,
    to_jsonl,
    to_srt,
    to_text,
    to_vtt,
)
from evoxtral_stream.text.tags import plain_text, render, tokenize

from .samples import SCRIPTS

LONG = ("[nervous] So... [stammers] I was thinking maybe we could... [clears throat] try "
        "that new restaurant downtown? [laughs] I mean, if you're FREE this weekend? [sighs]")


def final(text: str, start: float = 0.0, end: float = 10.0, seg: int = 0,
          is_final: bool = True) -> CaptionEvent:
    return CaptionEvent("s", seg, seg + 1, is_final, text, plain_text(text), text, "",
                        (TagMark("laughs", "non-verbal", 0, start),), start, end, 0.5)


def word_chunks(line: str) -> int:
    """Space-separated pieces of a line that hold a word."""
    count, has_word = 0, False
    for tok in tokenize(line):
        if tok.space_before:
            count += has_word
            has_word = False
        has_word = has_word or tok.is_word
    return count + has_word


def visible(line: str) -> str:
    return re.sub(r"</?c[^>]*>", "", line).replace("&lt;", "<").replace(
        "&gt;", ">").replace("&amp;", "&")


def test_timestamps() -> None:
    assert format_timestamp(0) == "00:00:00,000"
    assert format_timestamp(3661.5) == "01:01:01,500"
    assert format_timestamp(59.9996, ".") == "00:01:00.000"
    assert format_timestamp(-1) == "00:00:00,000"


def test_srt_layout_follows_subtitle_practice() -> None:
    srt = to_srt([final(LONG, 1.0, 9.0)])
    blocks = srt.strip("\n").split("\n\n")
    assert blocks[0].startswith("1\n00:00:01,000 --> ")
    for i, block in enumerate(blocks, start=1):
        lines = block.split("\n")
        assert lines[0] == str(i)
        assert re.fullmatch(r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}", lines[1])
        assert 1 <= len(lines[2:]) <= 2
        assert all(len(line) <= 42 for line in lines[2:])
    text = " ".join(" ".join(b.split("\n")[2:]) for b in blocks)
    assert text == LONG
    # A tag is never cut from the word after it.
    assert not any(line.endswith(("[stammers]", "[clears throat]", "[nervous]"))
                   for b in blocks for line in b.split("\n")[2:])


def test_cues_are_timed_by_word_position_and_limited_in_duration() -> None:
    words = " ".join(f"w{i}" for i in range(40))
    cues = build_cues([final(words, 0.0, 20.0)])
    assert cues[0].start == 0.0
    assert cues[-1].end == pytest.approx(20.0)
    assert all(c.end - c.start <= 7.0 + 1e-9 for c in cues)
    assert all(a.end <= b.start + 1e-9 for a, b in pairwise(cues))
    n = 0
    for c in cues:
        assert c.start == pytest.approx(20.0 * n / 40)
        n += sum(len(line.split()) for line in c.lines)


def test_short_cues_are_extended_but_never_overlap_the_next() -> None:
    cues = build_cues([final("Hi.", 1.0, 1.2, 0), final("There.", 1.5, 2.0, 1),
                       final("End.", 5.0, 5.1, 2)])
    assert [(c.start, round(c.end, 3)) for c in cues] == [(1.0, 1.5), (1.5, 2.333), (5.0, 5.833)]


def test_no_cue_is_stretched_past_the_end_of_the_audio() -> None:
    events = [final("There.", 1.5, 2.0, 0), final("Yes.", 4.0, 4.1, 1)]
    cues = build_cues(events, until=4.178)
    assert [(c.start, round(c.end, 3)) for c in cues] == [(1.5, 2.333), (4.0, 4.178)]
    # A caption's own end stands, even past a shorter "until".
    assert build_cues(events, until=4.05)[-1].end == pytest.approx(4.1)
    assert "00:00:04,178" in to_srt(events, until=4.178)
    assert "00:00:04.178" in to_vtt(events, until=4.178)


def test_tags_stripped() -> None:
    srt = to_srt([final(LONG)], tags=TagStyle.STRIP)
    assert "[" not in srt
    body = " ".join(line for line in srt.split("\n")
                    if line and not line.isdigit() and "-->" not in line)
    assert body == plain_text(LONG)
    assert to_srt([final("a [laughs].")], tags=TagStyle.STRIP).split("\n")[2] == "a."


def test_vtt_header_escaping_and_class_spans() -> None:
    vtt = to_vtt([final("[laughs] Fish & <chips> [clears throat] now")], tags=TagStyle.CLASS)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ")
    assert "<c.tag.non-verbal.laughs>[laughs]</c> Fish &amp; &lt;chips&gt;" in vtt
    assert "<c.tag.non-verbal.clears-throat>[clears throat]</c>" in vtt
    inline = to_vtt([final("[Weird Tag] hi")])
    assert "[Weird Tag] hi" in inline
    assert "<c.tag.unknown.weird-tag>[Weird Tag]</c>" in to_vtt(
        [final("[Weird Tag] hi")], tags=TagStyle.CLASS)


def test_srt_has_no_class_spans() -> None:
    with pytest.raises(ValueError, match="SRT"):
        to_srt([final("hi")], tags=TagStyle.CLASS)


def test_only_non_empty_finals_make_cues() -> None:
    events = [final("partial text", is_final=False), final(""), final("[laughs]", 2.0, 3.0)]
    cues = build_cues(events)
    assert [(c.lines, c.start, c.end) for c in cues] == [(("[laughs]",), 2.0, 3.0)]
    assert build_cues(events, tags=TagStyle.STRIP) == []
    assert to_srt([]) == ""
    assert to_vtt([]) == "WEBVTT\n"


def test_layout_is_configurable() -> None:
    cues = build_cues([final(LONG)], layout=CueLayout(max_line_chars=20, max_lines=1))
    assert all(len(c.lines) == 1 and len(c.lines[0]) <= 20 for c in cues
               if len(c.lines[0].split()) > 1)
    with pytest.raises(ValueError, match="at least 1"):
        CueLayout(max_line_chars=0)


def test_jsonl_and_dicts() -> None:
    events = [final("[laughs] hi", 1.0, 2.0, 0), final("there", 2.0, 3.0, 1)]
    lines = to_jsonl(events).splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first == caption_to_dict(events[0])
    assert first["type"] == "caption"
    assert first["tags"] == [{"tag": "laughs", "kind": "non-verbal", "index": 0, "t": 1.0,
                              "known": True}]
    assert (first["text"], first["plain_text"], first["final"]) == ("[laughs] hi", "hi", True)


def test_plain_text_output() -> None:
    events = [final("[sighs] One", 0.0, 1.0, 0), final("two.", 1.0, 2.0, 1),
              final("Later [laughs] on.", 5.0, 6.0, 2), final("ignored", is_final=False)]
    assert to_text(events) == "[sighs] One two.\nLater [laughs] on.\n"
    assert to_text(events, tags=TagStyle.STRIP) == "One two.\nLater on.\n"
    assert to_text([]) == ""


def running_text(*texts: str, tags: TagStyle = TagStyle.INLINE) -> str:
    """``to_text`` of finals one right after the other (no paragraph gap)."""
    return to_text([final(t, i, i + 1.0, i) for i, t in enumerate(texts)], tags=tags)


@pytest.mark.parametrize(("texts", "want"), [
    # Chinese and Japanese are written without spaces: none where finals meet.
    (("你好。", "我很好。", "谢谢你"), "你好。我很好。谢谢你"),
    (("今天天气很好", "我们去公园吧"), "今天天气很好我们去公园吧"),
    (("はい、そうです。", "「ありがとう」と言いました", "、またね"),
     "はい、そうです。「ありがとう」と言いました、またね"),
    (("カタカナです", "ひらがなです"), "カタカナですひらがなです"),
    # Korean is written with spaces, and so is Latin text.
    (("안녕하세요.", "반갑습니다."), "안녕하세요. 반갑습니다."),
    (("One.", "Two."), "One. Two."),
    # A Latin word beside a CJK character keeps its space; CJK punctuation,
    # which carries its own spacing, takes none.
    (("我用了 Python", "它很好用。"), "我用了 Python 它很好用。"),
    (("我很好。", "OK."), "我很好。OK."),
    (("Hello.", "你好。"), "Hello. 你好。"),
    (("Hello", "「はい」"), "Hello「はい」"),
    # A tag at the seam is glued as tags are inside CJK text (你好[laughs]世界).
    (("你好。", "[laughs]我很好。"), "你好。[laughs]我很好。"),
    (("你好。[sighs]", "我很好。"), "你好。[sighs]我很好。"),
    (("你好", "[laughs] OK"), "你好[laughs] OK"),
    (("Hello.", "[laughs]你好。"), "Hello. [laughs]你好。"),
    (("Hi [laughs]", "there."), "Hi [laughs] there."),
])
def test_plain_text_joins_finals_as_their_script_is_written(texts: tuple[str, ...],
                                                             want: str) -> None:
    assert running_text(*texts) == want + "\n"


def test_plain_text_looks_past_finals_of_nothing_but_tags() -> None:
    assert running_text("你好。", "[laughs]", "[sighs]", "我很好。") == (
        "你好。[laughs][sighs]我很好。\n")
    assert running_text("Hi.", "[laughs]", "[sighs]", "There.") == "Hi. [laughs] [sighs] There.\n"


def test_plain_text_without_tags_joins_the_text_left() -> None:
    assert running_text("你好。", "[laughs]我很好。", tags=TagStyle.STRIP) == "你好。我很好。\n"
    assert running_text("Hello. [laughs]", "你好。", tags=TagStyle.STRIP) == "Hello. 你好。\n"


def test_a_paragraph_break_between_cjk_finals_is_still_a_new_line() -> None:
    events = [final("你好。", 0.0, 1.0, 0), final("我很好。", 1.5, 2.0, 1),
              final("再见", 5.0, 6.0, 2), final("안녕.", 6.0, 7.0, 3)]
    assert to_text(events) == "你好。我很好。\n再见 안녕.\n"
    assert to_text(events, paragraph_gap_s=0.4) == "你好。\n我很好。\n再见 안녕.\n"


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(SCRIPTS), st.sampled_from([TagStyle.INLINE, TagStyle.STRIP,
                                                  TagStyle.CLASS]),
       st.integers(10, 60), st.integers(1, 3), st.floats(1.0, 60.0))
def test_cues_keep_every_word_and_tag(text: str, style: TagStyle, width: int, lines: int,
                                      duration: float) -> None:
    layout = CueLayout(max_line_chars=width, max_lines=lines)
    cues = build_cues([final(text, 3.0, 3.0 + duration)], tags=style, layout=layout, vtt=True)
    shown = " ".join(visible(line) for c in cues for line in c.lines)
    want = plain_text(text) if style is TagStyle.STRIP else render(tokenize(text))
    assert shown == want
    for c in cues:
        assert len(c.lines) <= lines
        for line in c.lines:
            # Only a single unbreakable unit (a word and the tags around it)
            # may overflow a line.
            if len(visible(line)) > width:
                assert word_chunks(visible(line)) <= 1, line
    assert all(a.end <= b.start + 1e-9 for a, b in pairwise(cues))
    assert all(c.end >= c.start for c in cues)


_WORDS = ["so", "I", "was", "thinking,", "maybe", "we", "could", "try", "that", "new",
          "restaurant", "downtown.", "[laughs]", "FREE", "weekend?", "[sighs]", "ok."]


@st.composite
def _finals_and_until(draw: st.DrawFn) -> tuple[list[CaptionEvent], float | None]:
    events: list[CaptionEvent] = []
    t = draw(st.floats(0, 3))
    for seg in range(draw(st.integers(0, 8))):
        # Overlaps (a forced split's seam), touching and zero-length finals too.
        t = max(0.0, t + draw(st.sampled_from([-0.5, 0.0, 0.1, 0.4, 1.5, 3.0])))
        span = draw(st.sampled_from([0.0, 0.2, 0.9, 3.0, 12.0]))
        text = " ".join(draw(st.lists(st.sampled_from(_WORDS), max_size=30)))
        events.append(final(text, t, t + span, seg))
        t += span
    # The audio ends at or after the last final's end (its audio was heard).
    end = max((e.end for e in events), default=0.0)
    until = draw(st.one_of(st.none(), st.floats(0, 2).map(lambda d: end + d)))
    return events, until


@given(_finals_and_until(), st.sampled_from([0.0, 5 / 6, 2.0]),
       st.sampled_from([1.0, 7.0]), st.booleans())
@settings(max_examples=300, deadline=None)
def test_subtitles_written_as_finals_land_are_the_whole_file_s(
        case: tuple[list[CaptionEvent], float | None], min_cue_s: float, max_cue_s: float,
        vtt: bool) -> None:
    """SubtitleWriter's pieces, appended as each final lands, make exactly
    to_srt/to_vtt of all the finals (transcribe writes its subtitles so)
    when they come in the merger's order, and every cue but the last is out
    before the end once a final ends past its minimum length. Finals that
    overlap give the same cues, still in start order and numbered so."""
    events, until = case
    layout = CueLayout(min_cue_s=min_cue_s, max_cue_s=max_cue_s)
    writer = SubtitleWriter(vtt=vtt, layout=layout)
    pieces = [writer.header(), *(writer.add(e) for e in events)]
    before_end = "".join(pieces)
    whole = before_end + writer.finish(until)
    expected = (to_vtt if vtt else to_srt)(events, layout=layout, until=until)
    shown = [e for e in events if e.text]
    if not all(b.start >= max(a.start, a.end) for a, b in pairwise(shown)):
        blocks, want = (out.removeprefix("WEBVTT\n").strip("\n").split("\n\n")
                        for out in (whole, expected))
        starts = [start for start, _ in _written(whole)]
        assert starts == sorted(starts)
        assert sorted(b.split("\n", 1 if vtt else 2)[-1] for b in blocks) == sorted(
            b.split("\n", 1 if vtt else 2)[-1] for b in want)
        if not vtt:
            assert [b.split("\n")[0] for b in blocks] == [
                str(i) for i in range(1, len(blocks) + 1)]
        return
    assert whole == expected
    cues = build_cues(events, layout=layout, until=until)
    if cues and all(nxt.start > cue.start for cue, nxt in pairwise(cues)):
        assert before_end.count(" --> ") == len(cues) - 1


@pytest.mark.parametrize("text", ["... Yes.", "[sighs]... Fine.", "Right. — Okay."])
@pytest.mark.parametrize("style", [TagStyle.INLINE, TagStyle.STRIP])
def test_a_cue_without_words_is_not_left_under_the_next(text: str, style: TagStyle) -> None:
    """A long segment with few words (the last word alone spans over 7 s):
    a leading "..." is not closed as a cue of its own, zero-length and then
    stretched over the next one."""
    cues = build_cues([final(text, 0.0, 16.0)], tags=style)
    assert all(a.end <= b.start for a, b in pairwise(cues)), cues
    assert all(c.end > c.start for c in cues), cues


def _written(out: str) -> list[tuple[str, str]]:
    return re.findall(r"(\d\d:\d\d:\d\d[.,]\d{3}) --> (\d\d:\d\d:\d\d[.,]\d{3})", out)


@pytest.mark.parametrize("min_cue_s", [0.0, 5 / 6])
def test_a_final_without_time_still_gets_a_cue_that_lasts(min_cue_s: float) -> None:
    """WebVTT requires a cue's end after its start (SRT players drop such a
    cue too): a zero-length final, one ending before it starts, or one that
    the end of the audio leaves no time gets MIN_SHOWN_S (0.25 s), less only
    where the next cue starts sooner, and at least 1 ms as written."""
    lay = CueLayout(min_cue_s=min_cue_s)

    def ends(events: list[CaptionEvent], until: float | None) -> list[tuple[str, str]]:
        srt, vtt = to_srt(events, layout=lay, until=until), to_vtt(events, layout=lay,
                                                                   until=until)
        assert _written(vtt) == [(a.replace(",", "."), b.replace(",", "."))
                                 for a, b in _written(srt)]
        return _written(srt)

    # At the end of the audio: nothing after it to overlap.
    assert ends([final("Hi.", 2.0, 2.0)], 2.0) == [("00:00:02,000", "00:00:02,250")]
    # Ending before it starts (a journal's or another server's final).
    assert ends([final("Hi.", 3.0, 2.5)], 3.0) == [("00:00:03,000", "00:00:03,250")]
    # Under 1 ms: the same as written.
    assert ends([final("Hi.", 1.0001, 1.0003)], 1.0003) == [
        ("00:00:01,000", "00:00:01,250")]
    # Up to the next cue's start, when that is sooner...
    assert ends([final("Hi.", 2.0, 2.0, 0), final("There.", 2.1, 2.1, 1)], 2.1) == [
        ("00:00:02,000", "00:00:02,100"), ("00:00:02,100", "00:00:02,350")]
    # ... and 1 ms when the next one starts in the same millisecond.
    assert ends([final("Hi.", 2.0, 2.0, 0), final("There.", 2.0004, 2.0004, 1)],
                2.0004) == [("00:00:02,000", "00:00:02,001"),
                            ("00:00:02,000", "00:00:02,250")]
    # In pieces as finals land, the same.
    for vtt in (False, True):
        writer = SubtitleWriter(vtt=vtt, layout=lay)
        events = [final("Hi.", 2.0, 2.0, 0), final("There.", 2.1, 2.1, 1)]
        whole = writer.header() + "".join(map(writer.add, events)) + writer.finish(2.1)
        assert whole == (to_vtt if vtt else to_srt)(events, layout=lay, until=2.1)


def test_overlapping_finals_make_cues_in_start_order() -> None:
    """Finals that overlap (from a journal or another server; the merger
    never makes them) still give cues in start order, as WebVTT requires
    and SRT players expect, equal starts in the order given, SRT numbered
    as written; no cue runs over the next one, and every word is kept."""
    events = [final("One two three four five six seven eight nine ten eleven twelve "
                    "thirteen fourteen fifteen sixteen.", 10.0, 20.0, 0),
              final("Early.", 4.0, 5.0, 1), final("Middle.", 12.0, 13.0, 2),
              final("Same start.", 4.0, 4.5, 3)]
    for vtt in (False, True):
        out = (to_vtt if vtt else to_srt)(events)
        times = [(float(a[6:].replace(",", ".")), float(b[6:].replace(",", ".")))
                 for a, b in _written(out)]
        assert [a for a, _ in times] == sorted(a for a, _ in times)
        assert all(e1 <= s2 for (s1, e1), (s2, _) in pairwise(times) if s2 > s1)
        blocks = out.removeprefix("WEBVTT\n").strip("\n").split("\n\n")
        texts = [" ".join(b.split("\n")[1 if vtt else 2:]) for b in blocks]
        assert texts[:2] == ["Early.", "Same start."]
        assert "Middle." in texts and texts.index("Middle.") not in (2, len(texts) - 1)
        assert sorted(" ".join(texts).split()) == sorted(
            " ".join(e.text for e in events).split())
        if not vtt:
            assert [b.split("\n")[0] for b in blocks] == [
                str(i) for i in range(1, len(blocks) + 1)]
    # Written as they land, a cue cannot go before one given out already:
    # the early finals' cues start where the last one given out did.
    writer = SubtitleWriter()
    out = writer.header() + "".join(map(writer.add, events)) + writer.finish()
    starts = [a for a, _ in _written(out)]
    assert starts == sorted(starts)
    assert [(b.split("\n")[1][6:12], b.split("\n", 2)[2].split()[0])
            for b in out.strip("\n").split("\n\n")] == [
        ("10,000", "One"), ("10,000", "Early."), ("12,000", "Middle."),
        ("12,000", "Same"), ("16,875", "twelve")]


class _HtmlText(HTMLParser):
    """What a player that reads SRT text as HTML (ExoPlayer, VLC) takes
    for text: tags dropped, entities decoded."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text = ""

    def handle_data(self, data: str) -> None:
        self.text += data


def test_srt_text_cannot_be_taken_for_markup() -> None:
    """SRT has no escapes, and players read HTML-like tags (<b>, <i>, <u>,
    <font>), ASS override blocks ({\\an8}, libass hides any {...}), ASS
    line breaks and hard spaces (\\N, \\n, \\h) and HTML entities: a
    model's literal ones are written with look-alikes or a word joiner
    (U+2060, invisible), so they read the same; our own [tags] stay."""
    text = ("[laughs] <b>bold</b> <i>it</i> <font color=red>red</font> {\\an8}top "
            "{Y:i} {x} C:\\Notes \\h R&D &amp; &#60; a -> b [a & <b>]")
    for style in (TagStyle.INLINE, TagStyle.STRIP):
        srt = to_srt([final(text, 0.0, 1.0)], layout=CueLayout(max_line_chars=200),
                     tags=style)
        line = srt.split("\n", 2)[2].rstrip("\n")
        want = ("‹b›bold‹/b› ‹i›it‹/i› ‹font color=red›red‹/font› ❴\\an8❵top ❴Y:i❵ ❴x❵ "
                "C:\\\u2060Notes \\\u2060h R&D &\u2060amp; &\u2060#60; a -› b")
        assert line == (f"[laughs] {want} [a & ‹b›]" if style is TagStyle.INLINE
                        else want)
        parser = _HtmlText()
        parser.feed(line)
        parser.close()
        assert parser.text == line
        assert not re.search(r"[<>{}]|\\[Nnh]", line)
    # WebVTT has its escapes.
    assert "&lt;b&gt;bold&lt;/b&gt; " in to_vtt([final(text)])


def test_lines_are_measured_in_display_columns() -> None:
    """A wide (CJK, fullwidth) character takes two columns of a line, a
    combining mark or a zero-width character none."""
    lay = CueLayout(max_line_chars=10)
    cues = build_cues([final("東京 大阪 名古屋 札幌", 0.0, 4.0)], layout=lay)
    assert [c.lines for c in cues] == [("東京 大阪", "名古屋"), ("札幌",)]
    cues = build_cues([final("ＡＢ ＣＤ ＥＦ", 0.0, 4.0)], layout=lay)
    assert [c.lines for c in cues] == [("ＡＢ ＣＤ", "ＥＦ")]
    # "été" with combining accents (5 code points, 3 columns), and words
    # joined by zero-width characters (ZWNJ and ZWJ: captions keep no other
    # format character, text/chars.py).
    ete = "e\u0301te\u0301"
    lay = CueLayout(max_line_chars=11)
    assert build_cues([final(f"{ete} {ete} {ete}", 0.0, 4.0)], layout=lay)[0].lines == (
        f"{ete} {ete} {ete}",)
    joined = "zero\u200cwidth\u200dx"
    assert build_cues([final(f"{joined} ok", 0.0, 4.0)], layout=lay)[0].lines == (
        f"{joined}", "ok")
    assert build_cues([final(f"{joined} ok", 0.0, 4.0)],
                      layout=CueLayout(max_line_chars=13))[0].lines == (f"{joined} ok",)


def test_an_emoji_sequence_takes_the_columns_of_one_emoji() -> None:
    """A ZWJ sequence, a flag's two regional indicators, a skin tone and an
    emoji with VS16 show as one emoji: two columns a line, not two for
    each part."""
    lay = CueLayout(max_line_chars=5)
    text = "👩\u200d👩\u200d👧 👍🏽 🇯🇵 ❤\ufe0f ok"
    assert [c.lines for c in build_cues([final(text, 0.0, 4.0)], layout=lay)] == [
        ("👩\u200d👩\u200d👧 👍🏽", "🇯🇵 ❤\ufe0f"), ("ok",)]


def test_entities_without_a_semicolon_are_shown_as_written() -> None:
    """HTML decodes its legacy entity names without the semicolon, within a
    word too (``&copy``, ``&amp``, ``&lt``, ``&notit`` reads ``¬it``), and
    so do players that read SRT text as HTML: SRT gets a word joiner after
    such an ``&``; ``R&D`` and ``AT&T`` stay as written. WebVTT escapes
    every ``&``."""
    text = "&copy 2024 &amp &lt &gt &AMP &notit &para5 &#60 &ampx AT&T R&D Q&A"
    events, lay = [final(text, 0.0, 4.0)], CueLayout(max_line_chars=200)
    srt_line = to_srt(events, layout=lay).split("\n")[2]
    assert srt_line == ("&\u2060copy 2024 &\u2060amp &\u2060lt &\u2060gt &\u2060AMP "
                        "&\u2060notit &\u2060para5 &\u2060#60 &\u2060ampx AT&T R&D Q&A")
    parser = _HtmlText()
    parser.feed(srt_line)
    parser.close()
    assert parser.text == srt_line
    vtt_line = to_vtt(events, layout=lay).split("\n")[3]
    assert vtt_line == text.replace("&", "&amp;")
    assert html.unescape(vtt_line) == text
