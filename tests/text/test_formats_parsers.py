"""SRT and WebVTT files read back by independent parsers (``srt`` and
``webvtt-py``): random final captions of several streams, with the text a
model can write (tags known and unknown, CAPS, RTL, emoji, combining and
zero-width marks, markup-like and timing-like text), must come back as
exactly the cues we meant, escaped and timed as the formats require."""

from __future__ import annotations

import html
import html.entities
import random
import re
import unicodedata
from datetime import timedelta
from html.parser import HTMLParser

import pytest
import srt
import webvtt

from evoxtral_stream.events import CaptionEvent
from evoxtral_stream.text.formats import (
    Cue,
    CueLayout,
    SubtitleWriter,
    TagStyle,
    build_cues,
    format_timestamp,
    to_srt,
    to_vtt,
)
from evoxtral_stream.text.tags import TAG_TABLE, plain_text, render, tokenize

_TAGS = [f"[{spec.name}]" for spec in TAG_TABLE] + [
    "(laughs)", "*sighs*", "[LAUGHTER]", "[Clears_Throat.]", "[Weird Tag]", "[ünknöwn]",
    "[笑]", "[a & <b>]", "[-->]", "[1]", "[{\\an8}]", "[ \u200b ]",
    "[a\x00b]", "[bell\x07]", "[\x1b]", "[del\x7fx]", "[c1\x9b]"]
_WORDS = [
    "so", "I", "was", "thinking,", "FREE", "REALLY?", "weekend.", "ok!", "don't", "R&D",
    "$500", "3.5", "9:30", "...", "—", "\"quoted\"", "(see", "below)", "*really*",
    "שלום", "مرحبا،", "עברית.", "\u202bرتل\u202c", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷",
    "e\u0301te\u0301", "n\u0303", "zero\u200bwidth", "\u200d", "\ufeff", "\u2060x",
    "-->", "a-->b", "--", ">", "<", "&", "&amp;", "&lt;", "&amp", "&copy", "&notit", "AT&T",
    "<b>bold</b>", "</c>",
    "<c.x>", "{\\an8}", "\r", "\n", "\r\n", "\t", "\u2028", "\x85", "\x00", "\x1b[31m",
    "\x7f", "NOTE", "STYLE", "REGION", "WEBVTT", "1", "00:00:01,000", "00:00:01.000",
    "supercalifragilisticexpialidocious" * 2, "x" * 50,
]
_STARTS = [0.0, 0.0004, 59.9996, 3599.9995, 86_399.9, 359_999.9996, 400_000.0]


def _text(rng: random.Random) -> str:
    n = rng.choice([0, 1, 2, 5, 12, 40])
    pieces = [rng.choice(_TAGS) if rng.random() < 0.2 else rng.choice(_WORDS)
              for _ in range(n)]
    seps = ["", " ", " ", " ", "  "]
    return "".join(p + rng.choice(seps) for p in pieces).strip(" ")


def _events(rng: random.Random, overlap: bool = False) -> list[CaptionEvent]:
    """Finals (and a few partials) of up to three streams, interleaved, each
    stream's in segment order as the merger gives them; ``overlap``: some
    starting before the one before ends (a journal's or another server's)."""
    out: list[CaptionEvent] = []
    clocks = {s: rng.choice(_STARTS) for s in ("a", "b", "c")[:rng.randint(1, 3)]}
    segs = dict.fromkeys(clocks, 0)
    for _ in range(rng.randint(0, 10)):
        stream = rng.choice(list(clocks))
        # Touching and zero-length finals too; never overlapping: the merger
        # starts a caption where the one before it ended.
        t = clocks[stream] + rng.choice([0.0, 0.0, 0.001, 0.4, 2.0])
        if overlap:
            t = max(0.0, t - rng.choice([0.0, 0.3, 1.0, 10.0]))
        span = rng.choice([0.0, 0.2, 1.0, 6.0, 20.0])
        text = _text(rng)
        final = rng.random() < 0.9
        out.append(CaptionEvent(stream, segs[stream], len(out) + 1, final, text,
                                plain_text(text), text, "", (), t, t + span, 0.1))
        if final:
            segs[stream] += 1
            clocks[stream] = t + span
    return out


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _visible(line: str) -> str:
    """A WebVTT cue line as shown: class spans dropped, entities decoded."""
    return html.unescape(re.sub(r"</?c(?:\.[^\s.<>&]+)*>", "", line))


def _meant(events: list[CaptionEvent], style: TagStyle) -> str:
    """The text the cues must show, space-joined: each final as written,
    or without its tags."""
    texts = [plain_text(e.text) if style is TagStyle.STRIP else render(tokenize(e.text))
             for e in events if e.final]
    return " ".join(t for t in texts if t)


def _shows(shown: str, meant: str, overlap: bool) -> bool:
    """Whether the cues show the text meant: in order, or, where finals
    overlap and their cues interleave, the same pieces."""
    return sorted(shown.split(" ")) == sorted(meant.split(" ")) if overlap else shown == meant


def _check_common(text: str, cues: list[Cue]) -> None:
    bad = {c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")}
    assert not bad, f"control or line-separator characters {bad!r} in {text!r}"
    for cue in cues:
        assert cue.lines and all(line.strip() for line in cue.lines), cue
        assert all("\n" not in line and "\r" not in line for line in cue.lines), cue
    starts = [_ms(c.start) for c in cues]
    assert starts == sorted(starts), "cues out of start order"
    # Both formats require a cue's end after its start.
    assert all(_ms(c.end) > _ms(c.start) for c in cues), cues


# The entity names HTML decodes without a semicolon.
_LEGACY = "|".join(n for n in html.entities.html5 if not n.endswith(";"))


def _srt_shown(text: str) -> str:
    """``text`` as SRT writes it, so players show it as written: markup
    characters as look-alikes, a word joiner where an ASS escape or an HTML
    entity would start (one of HTML's legacy names, without a semicolon)."""
    text = text.translate(str.maketrans("<>{}", "‹›❴❵"))
    text = re.sub(r"\\(?=[Nnh])", "\\\u2060", text)
    return re.sub(rf"&(?=#|[A-Za-z][A-Za-z0-9]*;|{_LEGACY})", "&\u2060", text)


class _HtmlText(HTMLParser):
    """The text an HTML-reading player (ExoPlayer) shows."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text = ""

    def handle_data(self, data: str) -> None:
        self.text += data


def _check_srt(out: str, cues: list[Cue], style: TagStyle, meant: str,
               overlap: bool) -> None:
    _check_common(out, cues)
    for cue in cues:
        for line in cue.lines:
            assert not re.search(rf"[<>{{}}]|\\[Nnh]|&(?:#|[A-Za-z][A-Za-z0-9]*;|{_LEGACY})",
                                 line), line
            reader = _HtmlText()
            reader.feed(line)
            reader.close()
            assert reader.text == line
    parsed = list(srt.parse(out, ignore_errors=False))
    assert [(s.index, s.start, s.end, s.content) for s in parsed] == [
        (i, timedelta(milliseconds=_ms(c.start)), timedelta(milliseconds=_ms(c.end)),
         "\n".join(c.lines)) for i, c in enumerate(cues, 1)]
    for block in out.split("\n\n") if out else []:
        lines = block.strip("\n").split("\n")
        assert re.fullmatch(r"\d+", lines[0])
        assert re.fullmatch(r"\d{2,}:\d\d:\d\d,\d{3} --> \d{2,}:\d\d:\d\d,\d{3}", lines[1])
    assert _shows(" ".join(line for c in cues for line in c.lines), _srt_shown(meant),
                  overlap)
    if style is TagStyle.STRIP:
        assert not any(t.is_tag for c in cues for line in c.lines for t in tokenize(line))


def _check_vtt(out: str, cues: list[Cue], style: TagStyle, meant: str,
               overlap: bool) -> None:
    _check_common(out, cues)
    assert out.startswith("WEBVTT\n")
    parsed = webvtt.from_string(out, strict=True).captions
    assert [(c.start, c.end, c.raw_text) for c in parsed] == [
        (format_timestamp(c.start, "."), format_timestamp(c.end, "."), "\n".join(c.lines))
        for c in cues]
    span = re.compile(r"<c\.tag\.[a-z-]+(?:\.[0-9a-z-]+)?>|</c>")
    for cue in cues:
        for line in cue.lines:
            # WebVTT cue text: no "-->", "<" only opening our spans, "&"
            # only as an entity (the spec's escapes).
            assert "-->" not in line
            bare = span.sub("", line) if style is TagStyle.CLASS else line
            assert "<" not in bare and ">" not in bare, line
            assert re.fullmatch(r"(?:[^&]|&amp;|&lt;|&gt;)*", bare), line
    assert _shows(" ".join(_visible(line) for c in cues for line in c.lines), meant,
                  overlap)
    if style is TagStyle.CLASS:
        shown_tags = [t.text for c in cues for line in c.lines
                      for t in tokenize(_visible(line)) if t.is_tag]
        spans = [html.unescape(m) for c in cues for line in c.lines
                 for m in re.findall(r"<c\.tag\.[^>]*>(.*?)</c>", line)]
        assert spans == shown_tags


@pytest.mark.parametrize("seed", range(4))
def test_subtitle_files_read_back_by_real_parsers(seed: int) -> None:
    rng = random.Random(seed)
    for n in range(120):
        overlap = n % 3 == 2
        events = _events(rng, overlap)
        layout = CueLayout(max_line_chars=rng.choice([10, 42]), max_lines=rng.choice([1, 2]),
                           min_cue_s=rng.choice([0.0, 5 / 6]))
        for stream in sorted({e.stream for e in events}):
            mine = [e for e in events if e.stream == stream]
            end = max((e.end for e in mine if e.final), default=0.0)
            until = rng.choice([None, end, end + 1.0])
            for vtt, style in ((False, TagStyle.INLINE), (False, TagStyle.STRIP),
                               (True, TagStyle.INLINE), (True, TagStyle.STRIP),
                               (True, TagStyle.CLASS)):
                cues = build_cues(mine, tags=style, layout=layout, vtt=vtt, until=until)
                meant = _meant(mine, style)
                if vtt:
                    whole = to_vtt(mine, tags=style, layout=layout, until=until)
                    _check_vtt(whole, cues, style, meant, overlap)
                else:
                    whole = to_srt(mine, tags=style, layout=layout, until=until)
                    _check_srt(whole, cues, style, meant, overlap)
                writer = SubtitleWriter(vtt=vtt, tags=style, layout=layout)
                pieces = [writer.header(), *(writer.add(e) for e in mine),
                          writer.finish(until)]
                if not overlap:
                    assert "".join(pieces) == whole
                elif vtt:
                    # Written as they land, in start order too.
                    got_vtt = webvtt.from_string("".join(pieces), strict=True).captions
                    starts = [c.start_time.in_milliseconds() for c in got_vtt]
                    assert starts == sorted(starts)
                else:
                    got = list(srt.parse("".join(pieces), ignore_errors=False))
                    assert [s.index for s in got] == list(range(1, len(got) + 1))
                    assert [s.start for s in got] == sorted(s.start for s in got)
