"""The browser page end to end: a real engine and server, headless Chromium over CDP.

The page is loaded from the server at ``/``; the tests feed audio through the
engine (or the page's own microphone button) and assert on the DOM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from evoxtral_stream.config import Config, load_config
from evoxtral_stream.engine.backends.base import Backend
from evoxtral_stream.engine.engine import Engine, Stream
from evoxtral_stream.events import (
    CaptionEvent,
    DecodeRequest,
    EngineEvent,
    Int16Array,
    StreamEnded,
    TagMark,
)
from evoxtral_stream.run import feed_samples
from evoxtral_stream.server.app import CaptionServer
from evoxtral_stream.server.auth import hash_token
from evoxtral_stream.text.tags import TAG_TABLE
from tests.clients.conftest import (
    BOTH_TOKEN,
    FAKE_MIC_TEXT,
    SUBSCRIBE_TOKEN,
    Browser,
    Page,
    publish_finals,
)
from tests.fakes import LanguageScriptedBackend, ScriptedBackend, words_so_far
from tests.helpers.events import EndedStreams
from tests.helpers.http import Relay, StallingRelay, free_port
from tests.speech import have_espeak, speech_with_pauses
from tests.text_norm import loose_wer

pytestmark = [pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed"),
              pytest.mark.timeout(120)]

SENTENCES = ["Good evening and welcome to the live captioning demo.",
             "Thank you for listening, and have a wonderful night."]
# Where the scripted model puts each tag: before word i.
TAGS_BEFORE = {0: "[nervous]", 2: "[laughs]", 4: "[whispers]", 5: "[pause]", 6: "[beeps]"}
KINDS = {"nervous": "emotion", "laughs": "non-verbal", "whispers": "delivery",
         "pause": "pause", "beeps": "unknown"}


def tagged_words(audio: npt.NDArray[np.float32]) -> str:
    """A stand-in model: a word per half second, tags of every kind in between."""
    words: list[str] = []
    for i in range(len(audio) // 8000):
        if i in TAGS_BEFORE:
            words.append(TAGS_BEFORE[i])
        words.append(f"w{i}")
    return " ".join(words)


def config() -> Config:
    return load_config(overrides={"server.port": 0})


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Engine, CaptionServer]]:
    cfg = config()
    async with Engine(cfg, ScriptedBackend(tagged_words)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        yield engine, server


async def open_page(browser: Browser, server: CaptionServer) -> Page:
    page = await Page.open(browser, f"http://127.0.0.1:{server.port}/")
    await page.wait_for("document.getElementById('status').textContent === 'live'")
    return page


async def collect_until_ended(ws: ClientConnection) -> list[dict[str, Any]]:
    """A native subscriber's view: every message up to ``stream.ended``."""
    out: list[dict[str, Any]] = []
    while not out or out[-1]["type"] != "stream.ended":
        out.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
    return out


async def push(stream: Stream, audio: Int16Array) -> None:
    """Push without closing, getting every partial (as feed_samples does)."""
    for i in range(0, len(audio), 1600):
        stream.push(audio[i:i + 1600])
        await stream.wait_idle()
        await asyncio.sleep(0)


def png_info(data: bytes) -> tuple[int, int, int]:
    """Width, height and the number of distinct byte values of the pixel data."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return size[0], size[1], len(set(zlib.decompress(idat)))


LINE = "document.querySelectorAll('.line[data-stream=\"{s}\"][data-segment=\"{n}\"]')"


async def test_page_renders_partials_finals_tags_and_picker(
    browser: Browser, scripted: tuple[Engine, CaptionServer], tmp_path: Path,
) -> None:
    engine, server = scripted
    audio, spans = speech_with_pauses(SENTENCES, pause_s=1.2)
    page = await open_page(browser, server)
    try:
        # "live" is set when the socket opens; the backend comes with the hello after it.
        await page.wait_for("document.getElementById('backend').textContent.includes('scripted')")
        async with connect(f"ws://127.0.0.1:{server.port}/v1/captions?stream=talk") as ws:
            await ws.recv()  # hello
            stream = engine.open_stream("talk", source="test")
            # Half of the first sentence: the segment is open, only partials so far.
            cut = spans[0][0] + (spans[0][1] - spans[0][0]) * 3 // 4
            await push(stream, audio[:cut])
            partial = await page.wait_for(
                f"(() => {{ const l = {LINE.format(s='talk', n=0)}[0];"
                "  const u = l && l.querySelector('.unstable:not(.tag)');"
                "  return u && l.parentNode.id === 'partials' && l.classList.contains('partial')"
                "    && {text: l.querySelector('.text').textContent,"
                "        style: getComputedStyle(u).fontStyle,"
                "        opacity: +getComputedStyle(u).opacity,"
                "        chips: [...l.querySelectorAll('.tag')].map(c => c.dataset.kind)}; })()")
            assert partial["style"] == "italic"
            assert partial["opacity"] < 1
            assert "emotion" in partial["chips"]
            assert png_info(await page.screenshot(tmp_path / "partial.png"))[:2] == (1100, 720)
            assert await page.evaluate(
                "[...document.getElementById('picker').options].map(o => o.value)"
            ) == ["", "talk"]
            summary = asyncio.ensure_future(feed_samples(stream, audio[cut:], 1600,
                                                         realtime=False))
            messages = await collect_until_ended(ws)
            await summary
        finals = [m for m in messages if m["type"] == "caption" and m["final"]]
        assert [f["segment"] for f in finals] == [0, 1]
        await page.wait_for("document.querySelector('#picker option[value=\"talk\"]')"
                            ".textContent === 'talk (ended)'")
        for f in finals:
            # One line per segment: the final replaced its partials, in the live log.
            line = LINE.format(s="talk", n=f["segment"])
            assert await page.evaluate(
                f"[...{line}].map(l => [l.parentNode.id, l.className,"
                " l.querySelector('.text').textContent])"
            ) == [["finals", "line final", f["text"]]]
        assert await page.evaluate("document.getElementById('partials').children.length") == 0
        assert await page.evaluate(
            "document.getElementById('finals').getAttribute('aria-live')") == "polite"
        chips = await page.evaluate(
            "[...document.querySelectorAll('#finals .tag')].map(c => [c.textContent,"
            " c.dataset.kind, getComputedStyle(c).backgroundColor,"
            " getComputedStyle(c).fontStyle])")
        seen = {text.strip("[]"): kind for text, kind, _, _ in chips}
        assert seen == KINDS, chips
        colours = {kind: bg for _, kind, bg, _ in chips}
        assert len(set(colours.values())) == len(colours), colours  # one colour per kind
        assert {style for *_, style in chips} == {"normal"}  # finals are stable
        assert not await page.evaluate("document.querySelector('#finals .unstable')")
        # A second stream; the picker filters the lines to the chosen one.
        await feed_samples(engine.open_stream("aside", source="test"),
                           audio[:spans[1][0]], 1600, realtime=False)
        await page.wait_for(f"{LINE.format(s='aside', n=0)}[0]?.classList.contains('final')")
        visible = ("[...document.querySelectorAll('.line')].filter(l => !l.hidden)"
                   ".map(l => l.dataset.stream)")
        assert set(await page.evaluate(visible)) == {"talk", "aside"}
        await page.evaluate("(() => { const p = document.getElementById('picker');"
                            " p.value = 'talk'; p.dispatchEvent(new Event('change')); })()")
        assert await page.evaluate("location.search") == "?stream=talk"
        assert set(await page.evaluate(visible)) == {"talk"}
        await page.evaluate("(() => { const p = document.getElementById('picker');"
                            " p.value = ''; p.dispatchEvent(new Event('change')); })()")
        assert set(await page.evaluate(visible)) == {"talk", "aside"}
        png = await page.screenshot(tmp_path / "captions.png")
        width, height, distinct = png_info(png)
        assert (width, height) == (1100, 720)
        assert distinct > 50
        assert len(png) > 10_000
        assert page.errors == []
    finally:
        await page.close()


CHIPS = ("[...{line}[0].querySelectorAll('.tag')]"
         ".map(c => [c.textContent, c.dataset.kind, c.classList.contains('unstable')])")


async def test_tag_chips_take_the_server_s_tags_in_order_whatever_the_text_spells(
    browser: Browser, scripted: tuple[Engine, CaptionServer],
) -> None:
    """A caption's ``tags`` are the server's parse of its text, in order
    (docs/protocol.md): the page looked each chip's text up among their
    names instead, so a tag written as an alias ("[sighing]", which the
    server names "sighs") got the outlined "unknown" chip. Each chip takes
    the kind of the tag at its place now, across the stable and the
    unstable text; an unknown tag stays unknown."""
    _, server = scripted
    page = await open_page(browser, server)
    try:
        tags = (TagMark("sighs", "non-verbal", 0, 0.0), TagMark("whispers", "delivery", 1, 0.4),
                TagMark("beeps", "unknown", 2, 0.8, False))
        text = "[sighing] oh [Whispering] no [beeps]"
        cut = len("[sighing] oh")
        for final in (False, True):
            server.broadcaster.publish(CaptionEvent(
                "talk", 0, 1 + final, final, text, "oh no", text if final else text[:cut],
                "" if final else text[cut:], tags, 0.0, 1.0, 0.1))
            line, shown = LINE.format(s="talk", n=0), "final" if final else "partial"
            await page.wait_for(f"{line}[0]?.classList.contains('{shown}')")
            assert await page.evaluate(CHIPS.format(line=line)) == [
                ["[sighing]", "non-verbal", False], ["[Whispering]", "delivery", not final],
                ["[beeps]", "unknown", not final]]
        assert page.errors == []
    finally:
        await page.close()


async def test_brackets_holding_a_digit_are_text_on_the_page_not_a_chip(
    browser: Browser, scripted: tuple[Engine, CaptionServer],
) -> None:
    """Square brackets holding a digit are text, not a tag (docs/protocol.md):
    the page made a chip of every bracketed span, so "see [1] [sighing] now"
    showed "[1]" as an outlined unknown tag, and "[sighing]", no longer lined
    up with the caption's one tag, took its kind by name."""
    _, server = scripted
    page = await open_page(browser, server)
    try:
        text = "see [1] [sighing] now array[0] ［２］"
        server.broadcaster.publish(CaptionEvent(
            "talk", 0, 1, True, text, "see [1] now array[0] ［２］", text, "",
            (TagMark("sighs", "non-verbal", 2, 0.0),), 0.0, 1.0, 0.1))
        line = LINE.format(s="talk", n=0)
        await page.wait_for(f"{line}.length === 1")
        assert await page.evaluate(CHIPS.format(line=line)) == [
            ["[sighing]", "non-verbal", False]]
        assert (await page.evaluate(f"{line}[0].textContent")).endswith(text)
        assert page.errors == []
    finally:
        await page.close()


async def test_a_tag_spelled_as_an_alias_takes_its_kind_when_the_tags_do_not_line_up(
    browser: Browser, scripted: tuple[Engine, CaptionServer],
) -> None:
    """Another server's captions whose text and ``tags`` do not line up one
    for one: ``tags`` leaves out a tag it does not know, holds one the text
    writes in parentheses, is empty, or a partial's stable/unstable cut
    splits a tag. The page then matched each chip's text against the tags'
    names as written, so a tag the text spells as an alias ("[sighing]",
    whose canonical name is "sighs") got the outlined "unknown" chip. A chip
    takes the kind of the event's tag of the same canonical name now, else
    the known tag set's; a tag outside it stays unknown."""
    _, server = scripted
    page = await open_page(browser, server)
    sighs = TagMark("sighs", "non-verbal", 0, 0.0)
    laughs = TagMark("laughs", "non-verbal", 0, 0.0)
    whispers = TagMark("whispers", "delivery", 1, 0.4)
    throat = TagMark("clears throat", "non-verbal", 0, 0.0)
    # (text, its stable part: all of it for a final, tags) as the other
    # server sends them; what the chips show.
    cases = [
        ("[sighing] oh [beeps]", "[sighing] oh [beeps]", (sighs,),
         [["[sighing]", "non-verbal"], ["[beeps]", "unknown"]]),
        ("(laughing) oh [sighing] no [Whispering]", "(laughing) oh [sighing] no [Whispering]",
         (laughs, sighs, whispers), [["[sighing]", "non-verbal"], ["[Whispering]", "delivery"]]),
        ("[Sighed] [clears_throat] [pausing] [beeps]", "[Sighed] [clears_throat] [pausing] [beeps]",
         (), [["[Sighed]", "non-verbal"], ["[clears_throat]", "non-verbal"],
              ["[pausing]", "pause"], ["[beeps]", "unknown"]]),
        ("[clears throat] oh [sighing]", "[clears", (throat, sighs),   # a partial
         [["[sighing]", "non-verbal"]]),
        # Fullwidth letters and parentheses inside the brackets, as the
        # server's normalize_tag_name reads them.
        ("[Ｓｉｇｈｉｎｇ] oh [(gasps)]", "[Ｓｉｇｈｉｎｇ] oh [(gasps)]", (),
         [["[Ｓｉｇｈｉｎｇ]", "non-verbal"], ["[(gasps)]", "non-verbal"]]),
    ]
    try:
        for i, (text, stable, tags, chips) in enumerate(cases):
            server.broadcaster.publish(CaptionEvent(
                "talk", i, i + 1, stable == text, text, "oh", stable, text[len(stable):], tags,
                0.0, 1.0, 0.1))
            line = LINE.format(s="talk", n=i)
            await page.wait_for(f"{line}.length === 1")
            assert [c[:2] for c in await page.evaluate(CHIPS.format(line=line))] == chips, text
        assert page.errors == []
    finally:
        await page.close()


async def test_the_page_s_known_tag_set_is_the_server_s(
    browser: Browser, scripted: tuple[Engine, CaptionServer],
) -> None:
    """The page keeps a copy of TAG_TABLE for the chips a caption's ``tags``
    do not name: every name and variant, with its canonical name and kind,
    and nothing else."""
    _, server = scripted
    page = await open_page(browser, server)
    try:
        seen = await page.evaluate("[...evoxtral.knownTags].map(([n, t]) => [n, t.tag, t.kind])")
        want = [[name, spec.name, spec.kind.value]
                for spec in TAG_TABLE for name in (spec.name, *spec.aliases)]
        assert sorted(seen) == sorted(want)
        assert page.errors == []
    finally:
        await page.close()


async def test_page_resumes_with_since_after_a_drop(
    browser: Browser, scripted: tuple[Engine, CaptionServer],
) -> None:
    engine, server = scripted
    audio, spans = speech_with_pauses(SENTENCES, pause_s=1.2)
    page = await open_page(browser, server)
    try:
        async with connect(f"ws://127.0.0.1:{server.port}/v1/captions?stream=talk") as ws:
            await ws.recv()  # hello
            stream = engine.open_stream("talk", source="test")
            await push(stream, audio[:spans[1][0]])  # the first sentence and its final
            await page.wait_for(f"{LINE.format(s='talk', n=0)}[0]?.classList.contains('final')")
            seen = await page.evaluate("evoxtral.lastSeq.get('talk')")
            # Drop the subscription, with a 4 s reconnect backoff: everything the
            # engine says meanwhile must come back by resume.
            await page.evaluate("evoxtral.retry = 4; evoxtral.socket.close()")
            await page.wait_for("document.getElementById('status').textContent !== 'live'")
            summary = asyncio.ensure_future(feed_samples(stream, audio[spans[1][0]:], 1600,
                                                         realtime=False))
            messages = await collect_until_ended(ws)
            await summary
            assert await page.evaluate("evoxtral.connects") == 1, "resumed too early"
        missed = [m for m in messages if m["type"] == "caption" and m["seq"] > seen]
        assert any(m["final"] for m in missed)
        await page.wait_for("evoxtral.connects === 2 && "
                            f"{LINE.format(s='talk', n=1)}[0]?.classList.contains('final')")
        url = await page.evaluate("evoxtral.url")
        assert url.endswith(f"/v1/captions?since=talk:{seen}&epoch={engine.epoch}")
        finals = [m for m in messages if m["type"] == "caption" and m["final"]]
        assert await page.evaluate(
            "[...document.querySelectorAll('#finals .line.final')]"
            ".map(l => [+l.dataset.segment, l.querySelector('.text').textContent])"
        ) == [[f["segment"], f["text"]] for f in finals]
        assert await page.evaluate("evoxtral.lastSeq.get('talk')") == messages[-2]["seq"]
        # stream.ended is not replayed; the page infers it from the new hello.
        assert await page.evaluate("document.querySelector('#picker option[value=\"talk\"]')"
                                   ".textContent") == "talk (ended)"
        assert not await page.evaluate("document.querySelector('#finals .note')"
                                       "?.textContent.includes('no longer available')")
        assert page.errors == []
    finally:
        await page.close()


async def test_a_page_that_saw_many_streams_resumes_in_a_url_the_server_takes(
    browser: Browser, scripted: tuple[Engine, CaptionServer],
) -> None:
    """A page left open while browser microphones come and go (a new stream
    id each time) resumed with since= for every stream it had seen: past a
    hundred or so the URL was too long for the server (HTTP 414), and the
    page retried it for ever, showing nothing more. The live streams go
    first, then the ended ones that fit."""
    _, server = scripted
    page = await open_page(browser, server)
    ids = [f"browser-{i:03d}-" + "x" * 100 for i in range(120)]

    def final(stream: str, seq: int, text: str) -> CaptionEvent:
        return CaptionEvent(stream, 0, seq, True, text, text, text, "", (), 0.0, 1.0, 0.1)

    try:
        await page.wait_for("evoxtral.connects === 1 && "
                            "document.getElementById('status').textContent === 'live'")
        server.broadcaster.publish(final("live", 1, "first words"))
        for stream in ids:
            server.broadcaster.publish(final(stream, 1, "hello"))
            server.broadcaster.publish(StreamEnded(stream, 1.0, 1, 1))
        await page.wait_for(f"evoxtral.lastSeq.size === {len(ids) + 1}")
        await page.evaluate("evoxtral.retry = 0; evoxtral.socket.close()")
        await page.wait_for("evoxtral.connects === 2 && "
                            "document.getElementById('status').textContent === 'live'")
        url = await page.evaluate("evoxtral.url")
        assert len(url) <= 4200 and "?since=live:1," in url, len(url)
        server.broadcaster.publish(final("live", 2, "after the reconnect"))
        await page.wait_for("[...document.querySelectorAll('#finals .line.final .text')]"
                            ".some(t => t.textContent === 'after the reconnect')")
        assert page.errors == []
    finally:
        await page.close()


async def test_microphone_button_streams_speech_to_ingest(
    browser: Browser, whisper_backend: Backend, tmp_path: Path,
) -> None:
    cfg = config()
    async with Engine(cfg, whisper_backend) as engine, \
            CaptionServer(engine, cfg.server) as server:
        page = await open_page(browser, server)
        try:
            await page.click("#mic")
            await page.wait_for("document.getElementById('mic').textContent"
                                " === 'Stop microphone' && evoxtral.mic.sent > 0")
            name = await page.evaluate("evoxtral.mic.stream")
            assert re.fullmatch(r"browser-[0-9a-f]{4}", name), name
            assert name in engine.streams
            assert await page.evaluate("document.getElementById('picker').value") == name
            # The fake microphone says FAKE_MIC_TEXT, then is silent: a final lands.
            text = await page.wait_for(
                f"{LINE.format(s=name, n=0)}[0]?.classList.contains('final') &&"
                f" {LINE.format(s=name, n=0)}[0].querySelector('.text').textContent", 30)
            assert loose_wer(FAKE_MIC_TEXT, text) <= 0.25, text
            assert png_info(await page.screenshot(tmp_path / "mic.png"))[:2] == (1100, 720)
            await page.click("#mic")
            summary = await page.wait_for("evoxtral.mic.summary", 15)
            assert summary["stream"] == name
            assert summary["finals"] >= 1
            rate = await page.evaluate("evoxtral.mic.sampleRate")
            sent = await page.evaluate("evoxtral.mic.sent")
            # What the page sent (PCM16 at the context's rate) is what the server counted.
            assert abs(sent / 2 / rate - summary["duration"]) < 0.1
            await page.wait_for("document.getElementById('mic').textContent"
                                " === 'Start microphone'")
            assert name not in engine.streams
            assert page.errors == []
        finally:
            await page.close()


async def test_microphone_language_and_stream_name(browser: Browser) -> None:
    """The picker offers the hello's languages; the microphone streams in the
    one picked, as the stream ``?mic=`` names (a token limited to some
    streams needs that)."""
    cfg = config()
    backend = LanguageScriptedBackend(words_so_far)
    async with Engine(cfg, backend) as engine, CaptionServer(engine, cfg.server) as server:
        page = await Page.open(browser, f"http://127.0.0.1:{server.port}/?mic=desk-1")
        try:
            await page.wait_for(f"{STATUS} === 'live'")
            # 'live' is the socket's open; the picker fills at the hello after it.
            await page.wait_for("document.getElementById('language').options.length > 0")
            assert await page.evaluate(
                "[...document.getElementById('language').options].map(o => o.value)"
            ) == ["en", "de", "fr"]
            assert not await page.evaluate("document.getElementById('language-label').hidden")
            await page.evaluate("document.getElementById('language').value = 'fr'")
            await page.click("#mic")
            await page.wait_for("evoxtral.mic?.sent > 0")
            assert await page.evaluate("evoxtral.mic.stream") == "desk-1"
            text = await page.wait_for(
                f"{LINE.format(s='desk-1', n=0)}[0]?.classList.contains('final') &&"
                f" {LINE.format(s='desk-1', n=0)}[0].querySelector('.text').textContent", 30)
            assert text.startswith("fr: w0"), text
            await page.click("#mic")
            await page.wait_for("evoxtral.mic.summary", 15)
            assert page.errors == []
        finally:
            await page.close()
    languages = {j.key.language for j in backend.jobs if isinstance(j.key, DecodeRequest)}
    assert languages == {"fr"}


async def test_no_language_picker_when_the_server_offers_one(
    browser: Browser, scripted: tuple[Engine, CaptionServer],
) -> None:
    _, server = scripted
    page = await open_page(browser, server)
    try:
        assert await page.evaluate("document.getElementById('language-label').hidden")
    finally:
        await page.close()


# --- access tokens ---------------------------------------------------------------------

STATUS = "document.getElementById('status').textContent"
REFUSED = "access refused: token missing or not accepted"
AUTH_WHY = ("!document.getElementById('auth').hidden"
            " && document.getElementById('auth-why').textContent")


async def test_page_takes_its_token_from_the_fragment_for_both_sockets(
    browser: Browser, guarded: tuple[Engine, CaptionServer], tmp_path: Path,
) -> None:
    engine, server = guarded
    base = f"http://127.0.0.1:{server.port}/"
    page = await Page.open(browser, f"{base}#token={BOTH_TOKEN}&view=big")
    try:
        await page.wait_for(f"{STATUS} === 'live'"
                            " && document.getElementById('backend').textContent !== ''")
        # Out of the visible URL (other fragment parts stay), kept for this tab.
        assert await page.evaluate("location.href") == f"{base}#view=big"
        assert await page.evaluate("sessionStorage.getItem('evoxtral.token')") == BOTH_TOKEN
        assert await page.evaluate("document.getElementById('auth').hidden")
        publish_finals(server, "talk", ["[laughs] hello there"], ended=False)
        line = LINE.format(s="talk", n=0)
        assert await page.wait_for(
            f"{line}[0]?.classList.contains('final') && {line}[0]"
            ".querySelector('.text').textContent") == "[laughs] hello there"
        # The microphone's ingest socket carries the token too.
        await page.click("#mic")
        await page.wait_for("document.getElementById('mic').textContent"
                            " === 'Stop microphone' && evoxtral.mic.sent > 0")
        name = await page.evaluate("evoxtral.mic.stream")
        assert name in engine.streams
        await page.click("#mic")
        summary = await page.wait_for("evoxtral.mic.summary", 15)
        assert summary["stream"] == name
        # Loaded again without the fragment, the tab still has its token.
        await page.evaluate("window.previous = true")
        await page.send("Page.navigate", url=base)
        await page.wait_for(f"!window.previous && document.readyState === 'complete'"
                            f" && {STATUS} === 'live'")
        assert await page.evaluate("location.href") == base
        assert page.errors == []
    finally:
        await page.close()


async def test_an_unusable_fragment_token_keeps_the_stored_one_and_its_error_goes_stale(
    browser: Browser, guarded: tuple[Engine, CaptionServer],
) -> None:
    _, server = guarded
    base = f"http://127.0.0.1:{server.port}/"
    page = await Page.open(browser, f"{base}#token={SUBSCRIBE_TOKEN}")
    try:
        await page.wait_for(f"{STATUS} === 'live'", 30)
        # Loaded again with a token a subprotocol cannot carry: the tab's
        # stored token gets in, and the page says why the new one was not used.
        await page.evaluate("window.previous = true")
        await page.send("Page.navigate", url=f"{base}?again#token=bad!token")
        await page.wait_for("!window.previous && document.readyState === 'complete'"
                            f" && {STATUS} === 'live'", 30)
        notice = await page.wait_for("!document.getElementById('notice').hidden"
                                     " && document.getElementById('notice').textContent")
        assert "was not used" in notice and "cannot be sent by a browser" in notice
        assert await page.evaluate("document.getElementById('auth').hidden")
        assert await page.evaluate("location.href") == f"{base}?again"
        assert await page.evaluate("sessionStorage.getItem('evoxtral.token')") == \
            SUBSCRIBE_TOKEN
        # The token is revoked (as far as this page knows) and the connection
        # drops: the refusal shows the server's reason, not that stale error.
        await page.evaluate("evoxtral.token = 'revoked-token'; evoxtral.socket.close()")
        why = await page.wait_for(AUTH_WHY, 30)
        assert why == "The server said: unknown token", why
        assert await page.evaluate(STATUS) == REFUSED
        assert page.errors == []
    finally:
        await page.close()


WEB = Path(__file__).resolve().parents[2] / "src" / "evoxtral_stream" / "server" / "web"


async def test_a_check_the_server_never_answers_does_not_hold_off_the_reconnect(
    browser: Browser,
) -> None:
    """A half-open server: it serves the page and fails each WebSocket
    handshake, but never answers the plain GET with which the page asks why.
    That check gives up after 5 s, and the page reconnects."""
    stop = asyncio.Event()
    checks = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal checks
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            path = head.split()[1]
            if "upgrade: websocket" not in head.lower() and path.startswith("/v1/"):
                checks += 1
                await stop.wait()  # never answered
            elif path == "/" or path.startswith("/static/"):
                name = "index.html" if path == "/" else path.removeprefix("/static/")
                body = (WEB / name).read_bytes()
                kind = {"html": "text/html", "js": "text/javascript", "css": "text/css"}.get(
                    name.rsplit(".", 1)[-1], "application/octet-stream")
                writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: "
                             f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
                await writer.drain()
            # Anything else, a WebSocket handshake included: closed unanswered.
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    page = await Page.open(browser, f"http://127.0.0.1:{port}/")
    try:
        await page.wait_for("evoxtral.connects === 1")
        started = asyncio.get_running_loop().time()
        await page.wait_for("evoxtral.connects >= 2", 30)
        assert asyncio.get_running_loop().time() - started > 3, "it did wait for the check"
        assert checks >= 1
    finally:
        await page.close()
        stop.set()
        server.close()
        await server.wait_closed()


async def test_a_token_limited_to_some_streams_works_with_streams_and_mic(
    browser: Browser,
) -> None:
    """A token for studio-* only: the page names its streams (?streams=) and
    its microphone's (?mic=), and sees those alone."""
    token = "studio-Only_4"
    cfg = load_config(overrides={"server.port": 0, "auth.tokens": [
        {"name": "studio", "hash": hash_token(token), "roles": ["subscribe", "ingest"],
         "streams": ["studio-*"]}]})
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        other = engine.open_stream("lobby")
        page = await Page.open(browser, f"http://127.0.0.1:{server.port}/"
                                        f"?streams=studio-1,studio-2&mic=studio-2#token={token}")
        try:
            await page.wait_for(f"{STATUS} === 'live'")
            publish_finals(server, "studio-1", ["first words."], ended=False)
            await page.wait_for(f"{LINE.format(s='studio-1', n=0)}.length === 1")
            await page.click("#mic")
            text = await page.wait_for(
                f"{LINE.format(s='studio-2', n=0)}[0]?.classList.contains('final') &&"
                f" {LINE.format(s='studio-2', n=0)}[0].querySelector('.text').textContent", 30)
            assert text.startswith("w0"), text
            await page.click("#mic")
            await page.wait_for("evoxtral.mic.summary", 15)
            # The other stream never shows, not even as a name in the picker.
            assert await page.evaluate("[...evoxtral.streams.keys()].sort()") == [
                "studio-1", "studio-2"]
            assert page.errors == []
        finally:
            await page.close()
            await other.close()


async def test_page_without_a_token_is_refused_until_one_is_pasted(
    browser: Browser, guarded: tuple[Engine, CaptionServer], tmp_path: Path,
) -> None:
    engine, server = guarded
    page = await Page.open(browser, f"http://127.0.0.1:{server.port}/")

    async def paste(token: str) -> None:
        await page.evaluate(f"(() => {{ document.getElementById('token').value = "
                            f"{json.dumps(token)}; document.getElementById('auth')"
                            ".requestSubmit(); })()")

    try:
        await page.wait_for(f"{STATUS} === {json.dumps(REFUSED)}")
        assert "needs an access token" in await page.wait_for(AUTH_WHY)
        await page.screenshot(tmp_path / "refused.png")
        # Refused is final: the page waits for a token instead of retrying.
        await asyncio.sleep(1.5)
        assert await page.evaluate("evoxtral.connects") == 1
        await paste("not-a-token")
        await page.wait_for(f"evoxtral.connects === 2 && ({AUTH_WHY} || '')"
                            ".includes('unknown token')")
        assert await page.evaluate(STATUS) == REFUSED
        # A token a subprotocol cannot carry is refused by the page itself.
        await paste("not a token!")
        assert "cannot be sent by a browser" in await page.wait_for(AUTH_WHY)
        assert await page.evaluate("evoxtral.connects") == 2
        await paste(SUBSCRIBE_TOKEN)
        await page.wait_for(f"{STATUS} === 'live'"
                            " && document.getElementById('backend').textContent !== ''")
        assert await page.evaluate("document.getElementById('auth').hidden")
        assert await page.evaluate("sessionStorage.getItem('evoxtral.token')") == \
            SUBSCRIBE_TOKEN
        publish_finals(server, "talk", ["hello again"], ended=False)
        await page.wait_for(f"{LINE.format(s='talk', n=0)}[0]?.classList.contains('final')")
        # This token may subscribe but not ingest: the microphone says so.
        await page.click("#mic")
        notice = await page.wait_for("!document.getElementById('notice').hidden"
                                     " && document.getElementById('notice').textContent")
        assert REFUSED in notice and "lacks the ingest role" in notice
        assert await page.evaluate("document.getElementById('mic').textContent") == \
            "Start microphone"
        # The stream that never started is gone from the picker and the page.
        assert await page.evaluate(
            "[...document.getElementById('picker').options].map(o => o.value)"
        ) == ["", "talk"]
        assert await page.evaluate("document.getElementById('picker').value") == ""
        assert not [s for s in engine.streams if s.startswith("browser-")]
        assert page.errors == []
    finally:
        await page.close()


async def test_the_microphone_stream_survives_a_server_restart(browser: Browser) -> None:
    """The server goes away while the page streams its microphone and comes
    back on the same port: the page reconnects as the same stream, and the
    audio captured meanwhile is sent first, so the two connections' audio
    adds up to all that the page sent. The page's captions follow: the new
    server numbers the stream from 1 (no journal), below the seq the page
    had seen, and the page, told so by a gap with no end, shows them."""
    port = free_port()
    # The first server sends a partial every 100 ms, so the page has seen a
    # high seq; the second sends finals only, numbered from 1.
    first = load_config(overrides={"server.port": port, "stream.partial_interval_ms": 100,
                                   "stream.min_partial_ms": 100}, env={})
    second = load_config(overrides={"server.port": port, "stream.partial_interval_ms": 0},
                         env={})
    ended = EndedStreams()
    finals: list[str] = []

    def on_final(event: EngineEvent) -> None:
        if isinstance(event, CaptionEvent) and event.final and event.text:
            finals.append(event.text)

    page: Page | None = None
    try:
        async with Engine(first, ScriptedBackend(words_so_far)) as engine, \
                CaptionServer(engine, first.server):
            engine.add_listener(ended)
            page = await Page.open(browser, f"http://127.0.0.1:{port}/?mic=desk")
            await page.wait_for("document.getElementById('status').textContent === 'live'")
            await page.click("#mic")
            await page.wait_for("(evoxtral.lastSeq.get('desk') || 0) >= 6", 20)
        seen = await page.evaluate("evoxtral.lastSeq.get('desk')")
        # Server down: the page keeps capturing and retries.
        await page.wait_for("evoxtral.mic.connects >= 2 && !evoxtral.mic.ready")
        assert "connection lost" in await page.evaluate(
            "document.getElementById('notice').textContent")
        assert await page.evaluate("document.getElementById('mic').textContent") \
            == "Stop microphone"
        await asyncio.sleep(1.5)
        async with Engine(second, ScriptedBackend(words_so_far)) as engine, \
                CaptionServer(engine, second.server):
            engine.add_listener(ended)
            engine.add_listener(on_final)
            await page.wait_for("evoxtral.mic.ready", 20)
            assert "desk" in engine.streams
            await asyncio.sleep(0.5)
            await page.click("#mic")
            summary = await page.wait_for("evoxtral.mic.summary", 15)
            assert summary["stream"] == "desk"
            assert finals and len(finals) < seen   # numbered below what the page saw
            shown = ("[...document.querySelectorAll('#finals .line.final[data-stream=\"desk\"]"
                     f" .text')].map(t => t.textContent).slice(-{len(finals)})")
            await page.wait_for(f"JSON.stringify({shown}) === {json.dumps(json.dumps(finals))}",
                                20)
        rate = await page.evaluate("evoxtral.mic.sampleRate")
        sent = await page.evaluate("evoxtral.mic.sent")
        assert [e.stream for e in ended] == ["desk", "desk"]
        assert abs(sent / 2 / rate - sum(e.duration_s for e in ended)) < 0.1
        assert ended[1].duration_s > 1.5   # the outage's audio was kept and sent
        assert await page.evaluate("evoxtral.mic.dropped") == 0
        assert await page.evaluate("document.getElementById('notice').textContent") == ""
        assert page.errors == []
    finally:
        if page is not None:
            await page.close()


async def test_stopping_the_microphone_while_reconnecting_says_what_was_not_sent(
        browser: Browser) -> None:
    cfg = load_config(overrides={"server.port": 0}, env={})
    page: Page | None = None
    try:
        async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
                CaptionServer(engine, cfg.server) as server:
            page = await Page.open(browser, f"http://127.0.0.1:{server.port}/?mic=desk")
            await page.wait_for("document.getElementById('status').textContent === 'live'")
            await page.click("#mic")
            await page.wait_for("evoxtral.mic?.sent > 0")
        await page.wait_for("evoxtral.mic.connects >= 2 && evoxtral.mic.backlogBytes > 0")
        await page.click("#mic")
        assert await page.evaluate("document.getElementById('mic').textContent") \
            == "Start microphone"
        assert re.fullmatch(
            r"Microphone stopped while reconnecting: \d+\.\d s of audio were not sent",
            await page.evaluate("document.getElementById('notice').textContent"))
        connects = await page.evaluate("evoxtral.mic.connects")
        await asyncio.sleep(6)  # longer than the longest backoff: no reconnect comes
        assert await page.evaluate("evoxtral.mic.connects") == connects
        assert page.errors == []
    finally:
        if page is not None:
            await page.close()


async def test_a_new_session_of_a_stream_id_missed_while_away_gets_new_lines(
    browser: Browser, scripted: tuple[Engine, CaptionServer],
) -> None:
    """Its segments count from 0 again; the page, which missed its
    stream.started, must not rewrite the first session's lines with them."""
    engine, server = scripted
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    page = await open_page(browser, server)
    try:
        await feed_samples(engine.open_stream("desk", source="test"), audio, 1600,
                           realtime=False)
        finals = ("[...document.querySelectorAll('#finals .line.final[data-stream=\"desk\"]')]"
                  ".map(l => [+l.dataset.segment, l.querySelector('.text').textContent])")
        await page.wait_for(f"{finals}.length === 1")
        first = await page.evaluate(finals)
        await page.evaluate("evoxtral.retry = 4; evoxtral.socket.close()")
        await page.wait_for("document.getElementById('status').textContent !== 'live'")
        await feed_samples(engine.open_stream("desk", source="test"),
                           audio[: len(audio) * 2 // 3], 1600, realtime=False)
        assert await page.evaluate("evoxtral.connects") == 1, "resumed too early"
        await page.wait_for(f"evoxtral.connects === 2 && {finals}.length === 2", 20)
        both = await page.evaluate(finals)
        assert both[0] == first[0] and both[1][0] == 0 and both[1][1] != first[0][1]
        assert await page.evaluate("document.querySelectorAll('#partials .line').length") == 0
        assert page.errors == []
    finally:
        await page.close()


async def test_the_end_of_the_pages_own_microphone_stream_is_noted_once(
        browser: Browser) -> None:
    """The microphone's stream reaches the page on both its sockets: the
    caption subscription (every stream) and the ingest socket (the stream's
    own events). Its end is handled once: one 'ended' note, not two."""
    cfg = load_config(overrides={"server.port": 0}, env={})
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        page = await Page.open(browser, f"http://127.0.0.1:{server.port}/?mic=desk")
        try:
            await page.wait_for(f"{STATUS} === 'live'")
            await page.click("#mic")
            await page.wait_for("evoxtral.mic?.ready && evoxtral.mic.sent > 48000")
            await page.click("#mic")
            await page.wait_for("evoxtral.mic.summary", 15)
            await page.wait_for("document.querySelector('#picker option[value=\"desk\"]')"
                                ".textContent === 'desk (ended)'")
            await asyncio.sleep(1.0)  # both sockets have had the stream.ended by now
            notes = await page.evaluate(
                "[...document.querySelectorAll('#finals .note[data-stream=\"desk\"]')]"
                ".map(n => n.textContent)")
            assert len([n for n in notes if "ended" in n]) == 1, notes
            assert page.errors == []
        finally:
            await page.close()


async def test_a_microphone_stream_the_server_refuses_says_why(
    browser: Browser, scripted: tuple[Engine, CaptionServer],
) -> None:
    """Refused after the handshake (the stream id is busy): the server's own
    error stays on screen, the button comes back, and no retry is made."""
    engine, server = scripted
    busy = engine.open_stream("desk", source="test")
    page = await Page.open(browser, f"http://127.0.0.1:{server.port}/?mic=desk")
    try:
        await page.wait_for("document.getElementById('status').textContent === 'live'")
        await page.click("#mic")
        notice = await page.wait_for("document.getElementById('mic').textContent === "
                                     "'Start microphone' && evoxtral.mic?.lastError && "
                                     "document.getElementById('notice').textContent")
        assert notice.startswith("stream_busy: stream 'desk' is already open"), notice
        await asyncio.sleep(1.0)
        assert await page.evaluate("evoxtral.mic.connects") == 1
        assert await page.evaluate("document.getElementById('notice').textContent") == notice
        assert page.errors == []
    finally:
        await page.close()
        await busy.close()


# --- against a scripted server -----------------------------------------------------------


def page_files(connection: ServerConnection, request: Request) -> Response | None:
    """``process_request`` for a scripted WebSocket server: the page and its
    files over plain HTTP; WebSocket upgrades go on to the handler."""
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return None
    path = request.path.split("?", 1)[0]
    name = "index.html" if path == "/" else path.removeprefix("/static/")
    file = WEB / name
    if "/" in name or not file.is_file():
        return connection.respond(404, "not found\n")
    body = file.read_bytes()
    kind = {"html": "text/html", "js": "text/javascript", "css": "text/css"}.get(
        file.suffix[1:], "application/octet-stream")
    headers = Headers([("Content-Type", kind), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store")])
    return Response(200, "OK", headers, body)


def hello(streams: list[str]) -> str:
    return json.dumps({"type": "hello", "v": 1, "server": "evoxtral-stream", "version": "test",
                       "backend": "scripted", "capabilities": [], "languages": ["en"],
                       "adapters": [], "streams": streams})


def final(stream: str, segment: int, seq: int, text: str) -> str:
    return json.dumps({"type": "caption", "stream": stream, "segment": segment, "seq": seq,
                       "final": True, "text": text, "plain_text": text, "stable": text,
                       "unstable": "", "tags": [], "start": 0.0, "end": 1.0, "latency": 0.1})


def partial(stream: str, segment: int, seq: int, text: str) -> str:
    return json.dumps({"type": "caption", "stream": stream, "segment": segment, "seq": seq,
                       "final": False, "text": text, "plain_text": text, "stable": "",
                       "unstable": text, "tags": [], "start": 0.0, "end": 1.0,
                       "latency": 0.1})


STARTED_DESK = json.dumps({"type": "stream.started", "stream": "desk", "source": "ingest"})
DECODE_FAILED_DESK_0 = json.dumps({"type": "error", "code": "decode_failed",
                                   "message": "RuntimeError: boom", "stream": "desk",
                                   "segment": 0})


async def start_mic_run(ws: ServerConnection, caption: str) -> None:
    """A scripted ``/v1/ingest`` for stream ``desk``: takes the page's config,
    answers ingest.ready, then the run's stream.started and ``caption``."""
    await ws.recv()  # config
    await ws.send(json.dumps({"type": "ingest.ready", "stream": "desk",
                              "sample_rate": 48000, "channels": 1,
                              "format": "pcm16", "language": "en"}))
    await ws.send(STARTED_DESK)
    await ws.send(caption)


FINALS = ("[...document.querySelectorAll('#finals .line.final[data-stream=\"{s}\"]')]"
          ".map(l => l.querySelector('.text').textContent)")
PARTIALS = ("[...document.querySelectorAll('#partials .line[data-stream=\"{s}\"]')]"
            ".map(l => [+l.dataset.segment, l.querySelector('.text').textContent])")


@contextlib.asynccontextmanager
async def desk_microphone_page(browser: Browser, handler: Callable[[ServerConnection],
                               Awaitable[None]], drop: asyncio.Event) -> AsyncIterator[Page]:
    """The page with microphone ``desk``, served by ``handler``: once it shows
    desk's first final, the subscription is dropped (``drop``; the page's
    reconnect then waits 1 s) and the microphone starts."""
    async with serve(handler, "127.0.0.1", 0, process_request=page_files) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        page = await Page.open(browser, f"http://127.0.0.1:{port}/?mic=desk")
        try:
            await page.wait_for(f"{FINALS.format(s='desk')}.length === 1")
            await page.evaluate("evoxtral.retry = 2")
            drop.set()
            await page.wait_for(f"{STATUS} !== 'live'")
            await page.click("#mic")
            yield page
        finally:
            await page.close()


async def test_a_final_the_microphone_socket_overtook_is_still_replayed(
        browser: Browser) -> None:
    """Both sockets drop (a network blip); the server flushes the lost
    microphone connection's last final (seq 2) to subscribers only. The
    microphone socket is back first and brings the new session's caption
    (seq 3); the subscription then resumes. It must resume after the last
    caption it had (seq 1), not the microphone's, and the page shows seq 2."""
    retained = [final("desk", 0, 1, "one"), final("desk", 1, 2, "missed"),
                final("desk", 0, 3, "new")]
    drop = asyncio.Event()
    mic_caption_sent = asyncio.Event()
    paths: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        path = ws.request.path
        if path.startswith("/v1/ingest"):
            await start_mic_run(ws, retained[2])
            mic_caption_sent.set()
            await ws.wait_closed()
            return
        paths.append(path)
        if len(paths) == 1:
            await ws.send(hello(["desk"]))
            await ws.send(retained[0])
            await drop.wait()
            await ws.close(1001, "going away")
            return
        await mic_caption_sent.wait()
        since = int(path.rsplit("desk:", 1)[1]) if "desk:" in path else 0
        await ws.send(hello(["desk"]))
        for message in retained:
            if json.loads(message)["seq"] > since:
                await ws.send(message)
        await ws.wait_closed()

    finals = FINALS.format(s="desk")
    async with desk_microphone_page(browser, handler, drop) as page:
        await page.wait_for(f"evoxtral.connects === 2 && {finals}.includes('new')")
        await page.wait_for(f"{STATUS} === 'live'")
        assert paths[1] == "/v1/captions?since=desk:1"
        await page.wait_for(f"{finals}.length === 3")
        await asyncio.sleep(0.5)  # time for a duplicate to show up, if any
        assert sorted(await page.evaluate(finals)) == ["missed", "new", "one"]
        assert await page.evaluate("evoxtral.lastSeq.get('desk')") == 3
        assert page.errors == []


async def test_captions_the_microphone_showed_from_a_restarted_server_are_not_shown_twice(
        browser: Browser) -> None:
    """The server restarted without its journal while the page held seq 1 of
    its microphone's stream; the microphone socket is back first and shows
    the new run's seqs 1 to 3 (of the new epoch, which its ingest.ready
    names). The subscription then resumes with the old epoch and gets a gap
    with no end and the new run from seq 1: the page shows each caption
    once. It used to forget at the gap what the microphone had shown, and
    showed seqs 2 and 3 twice (and hid the new seq 1 until the replay)."""
    new_run = [final("desk", 0, 1, "new one"), final("desk", 1, 2, "new two"),
               final("desk", 2, 3, "new three")]
    drop = asyncio.Event()
    mic_captions_sent = asyncio.Event()
    paths: list[str] = []

    def hello_of(epoch: str) -> str:
        return json.dumps({**json.loads(hello(["desk"])), "epoch": epoch})

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        path = ws.request.path
        if path.startswith("/v1/ingest"):   # the restarted server, epoch e2
            await ws.recv()  # config
            await ws.send(json.dumps({"type": "ingest.ready", "stream": "desk",
                                      "sample_rate": 48000, "channels": 1, "format": "pcm16",
                                      "language": "en", "progress": False, "epoch": "e2"}))
            await ws.send(STARTED_DESK)
            for message in new_run:
                await ws.send(message)
            mic_captions_sent.set()
            await ws.wait_closed()
            return
        paths.append(path)
        if len(paths) == 1:   # the first server, epoch e1
            await ws.send(hello_of("e1"))
            await ws.send(final("desk", 0, 1, "one"))
            await drop.wait()
            await ws.close(1001, "going away")
            return
        await mic_captions_sent.wait()
        # As the restarted server answers since=desk:1&epoch=e1.
        await ws.send(hello_of("e2"))
        await ws.send(json.dumps({"type": "gap", "stream": "desk", "from": 2, "to": None}))
        for message in new_run:
            await ws.send(message)
        await ws.wait_closed()

    finals = FINALS.format(s="desk")
    async with desk_microphone_page(browser, handler, drop) as page:
        await page.wait_for(f"evoxtral.connects === 2 && {STATUS} === 'live'"
                            " && evoxtral.epoch === 'e2'")
        assert paths[1] == "/v1/captions?since=desk:1&epoch=e1"
        await page.wait_for(f"{finals}.length >= 4")
        await page.wait_for("evoxtral.lastSeq.get('desk') === 3")
        await asyncio.sleep(0.5)  # time for a duplicate to show up, if any
        assert await page.evaluate(finals) == ["one", "new one", "new two", "new three"]
        assert page.errors == []


async def test_a_link_lost_right_after_a_gap_with_no_end_resumes_from_0(
        browser: Browser) -> None:
    """The gap with no end comes first, then every retained caption of the
    stream, numbered anew. If the link drops in between, the next resume
    must still ask for them (since=talk:0); without a resume point the
    server sends live events only, and they are lost."""
    retained = [final("talk", 0, 1, "after")]
    paths: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        await ws.send(hello(["talk"]))
        if len(paths) == 1:
            await ws.send(final("talk", 0, 5, "before"))
        elif len(paths) == 2:  # the server restarted without its journal
            await ws.send(json.dumps({"type": "gap", "stream": "talk", "from": 6, "to": None}))
        else:  # as the server answers a resume
            if "since=talk:" in ws.request.path:
                since = int(ws.request.path.rsplit(":", 1)[1])
                for message in retained:
                    if json.loads(message)["seq"] > since:
                        await ws.send(message)
            await ws.wait_closed()
            return
        await ws.close(1001, "going away")

    finals = FINALS.format(s="talk")
    async with serve(handler, "127.0.0.1", 0, process_request=page_files) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        page = await Page.open(browser, f"http://127.0.0.1:{port}/")
        try:
            await page.wait_for(f"evoxtral.connects === 3 && {STATUS} === 'live'")
            assert paths[2] == "/v1/captions?since=talk:0"
            await page.wait_for(f"{finals}.length === 2")
            assert await page.evaluate(finals) == ["before", "after"]
            # Not said to be lost: most often the server restarted.
            assert await page.evaluate("document.querySelector('#finals .note').textContent") \
                == ("talk: the server cannot place caption 6 (it restarted, or forgot the "
                    "stream); showing all it has")
            assert page.errors == []
        finally:
            await page.close()


async def test_a_restart_without_the_journal_that_passed_the_held_seq_loses_no_final(
        browser: Browser) -> None:
    """The page held seq 1 of talk when the server restarted without its
    journal; the new run numbered 1 to 3 before the page got back. Its resume
    carries the first run's epoch, so the server replays the new run from
    seq 1; with a bare since=talk:1 the page missed the new seq 1."""
    cfg = config()
    finals = FINALS.format(s="talk")
    nowhere = free_port()
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server, Relay(server.port) as relay:
        page = await Page.open(browser, f"http://127.0.0.1:{relay.port}/")
        try:
            await page.wait_for(f"{STATUS} === 'live'")
            publish_finals(server, "talk", ["before"], ended=False)
            await page.wait_for(f"{finals}.length === 1")
            before = await page.evaluate("evoxtral.epoch")
            relay.target = nowhere
            relay.drop()
            await page.wait_for(f"{STATUS} !== 'live'")
            async with Engine(cfg, ScriptedBackend()) as engine2, \
                    CaptionServer(engine2, cfg.server) as server2:
                publish_finals(server2, "talk", ["new one", "new two", "new three"])
                relay.target = server2.port
                await page.wait_for(f"{finals}.length === 4")
                assert await page.evaluate(finals) == ["before", "new one", "new two",
                                                       "new three"]
                url = await page.evaluate("evoxtral.url")
                assert url.endswith(f"/v1/captions?since=talk:1&epoch={before}")
                assert await page.evaluate("evoxtral.epoch") == engine2.epoch != before
                assert await page.evaluate("evoxtral.lastSeq.get('talk')") == 3
            assert page.errors == []
        finally:
            await page.close()


async def test_a_late_stream_started_keeps_the_microphones_partial_and_drops_the_old_run(
        browser: Browser) -> None:
    """The microphone's stream id is used again: its first run (a decode
    error for segment 0, a final for segment 1) has ended. The new run's
    partial of segment 0 comes on the microphone socket before the
    subscription's stream.started for it. That stream.started lets the old
    run's lines go (the new segment 1 gets its own line) but keeps the
    partial already shown: it stays on screen, not gone until the next one."""
    go = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        if ws.request.path.startswith("/v1/ingest"):
            await start_mic_run(ws, partial("desk", 0, 2, "new zero"))
            await ws.wait_closed()
            return
        await ws.send(hello([]))
        await ws.send(STARTED_DESK)
        await ws.send(DECODE_FAILED_DESK_0)
        await ws.send(final("desk", 1, 1, "old one"))
        await ws.send(json.dumps({"type": "stream.ended", "stream": "desk", "duration": 2.0,
                                  "segments": 2, "finals": 1}))
        await go.wait()
        await ws.send(STARTED_DESK)
        await ws.send(partial("desk", 0, 2, "new zero"))
        await ws.send(partial("desk", 1, 3, "new one"))
        await ws.wait_closed()

    finals, partials = FINALS.format(s="desk"), PARTIALS.format(s="desk")
    async with serve(handler, "127.0.0.1", 0, process_request=page_files) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        page = await Page.open(browser, f"http://127.0.0.1:{port}/?mic=desk")
        try:
            await page.wait_for("document.querySelector('#picker option[value=\"desk\"]')"
                                "?.textContent === 'desk (ended)'")
            assert await page.evaluate(finals) == ["old one"]
            await page.click("#mic")
            await page.wait_for(f"{partials}.length === 1")
            go.set()
            await page.wait_for("evoxtral.lastSeq.get('desk') === 3")
            assert await page.evaluate(partials) == [[0, "new zero"], [1, "new one"]]
            assert await page.evaluate(finals) == ["old one"]
            assert page.errors == []
        finally:
            await page.close()



class RecordingIngest:
    """A scripted server's ``/v1/ingest``: what each connection of the
    page's microphone sends, in order: ``("audio", STAMP, FRAMES)`` (STAMP:
    the number :data:`STAMP_CHUNKS` filled the chunk with, -1 for a chunk
    not stamped) and ``("lost", SAMPLES, 0)``, up to ``end`` (answered with a
    summary). The first connection is closed (1012) at its first stamped
    chunk; a connection in ``hold`` waits for that event before
    ``ingest.ready``; one in ``close_at_ready`` is closed (1012) right after it."""

    def __init__(self, hold: dict[int, asyncio.Event] | None = None,
                 close_at_ready: frozenset[int] = frozenset()) -> None:
        self.hold = hold or {}
        self.close_at_ready = close_at_ready
        self.connections: list[list[tuple[str, int, int]]] = []

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        if not ws.request.path.startswith("/v1/ingest"):
            await ws.send(hello([]))
            await ws.wait_closed()
            return
        config = json.loads(await ws.recv())
        index = len(self.connections)
        self.connections.append(received := [])
        if index in self.hold:
            await self.hold[index].wait()  # meanwhile the page keeps its backlog, then drops
        await ws.send(json.dumps({"type": "ingest.ready", "stream": "desk",
                                  "sample_rate": config["sample_rate"], "channels": 1,
                                  "format": "pcm16", "language": "en"}))
        if index in self.close_at_ready:
            await ws.close(1012, "service restart")
            return
        async for message in ws:
            if isinstance(message, bytes):
                samples = np.frombuffer(message, "<i2")
                stamp = int(samples[0]) if (samples == samples[0]).all() else -1
                received.append(("audio", stamp, len(samples)))
                if index == 0 and stamp > 0:
                    await ws.close(1012, "service restart")
                    return
            elif (msg := json.loads(message))["type"] == "lost":
                received.append(("lost", msg["samples"], 0))
            else:
                assert msg == {"type": "end"}
                break
        await ws.send(json.dumps({"type": "ingest.summary", "stream": "desk", "duration": 1.0,
                                  "segments": 0, "finals": 0, "partials": 0, "errors": 0,
                                  "lost": 0.0}))
        await ws.close(1000, "end of stream")


#: Numbers each chunk the page's worklet delivers from now on (fills it with 1,
#: 2, ...); window.stamped is the last number given.
STAMP_CHUNKS = ("(() => { const port = evoxtral.mic.node.port; const deliver = port.onmessage;"
                " window.stamped = 0; port.onmessage = (e) => {"
                " new Int16Array(e.data).fill(++window.stamped); deliver(e); }; })()")


@pytest.mark.parametrize("max_lost_s", [None, 0.2])
async def test_microphone_audio_dropped_while_reconnecting_is_declared_lost(
        browser: Browser, max_lost_s: float | None) -> None:
    """The ingest connection drops and the next one waits long for
    ingest.ready: the page keeps MIC_BACKLOG_S (10 s) of audio for it and
    drops later chunks. On the new connection the backlog comes first, then
    a lost message for exactly the frames of the chunks dropped, then the
    live chunks: the server's timeline keeps its true times. With
    ``max_lost_s`` (what a connection takes at once) lowered, the page
    declares no more and says how much it could not."""
    release = asyncio.Event()
    ingest = RecordingIngest(hold={1: release})
    async with serve(ingest.handler, "127.0.0.1", 0, process_request=page_files) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        page = await Page.open(browser, f"http://127.0.0.1:{port}/?mic=desk")
        try:
            await page.wait_for(f"{STATUS} === 'live'")
            if max_lost_s is not None:
                await page.evaluate(f"evoxtral.maxLostS = {max_lost_s}")
            await page.click("#mic")
            await page.wait_for("Boolean(evoxtral.mic?.node)")
            await page.evaluate(STAMP_CHUNKS)
            await page.wait_for("evoxtral.mic.connects === 2 && evoxtral.mic.dropped >= 20", 30)
            release.set()
            await page.wait_for("evoxtral.mic.ready && !evoxtral.mic.backlog.length")
            await asyncio.sleep(1.0)
            await page.click("#mic")
            await page.wait_for("evoxtral.mic.summary")
            rate = await page.evaluate("evoxtral.mic.sampleRate")
            declared, undeclared, notice = await page.evaluate(
                "[evoxtral.mic.declared, evoxtral.mic.undeclared,"
                " document.getElementById('notice').textContent]")
            assert page.errors == []
        finally:
            await page.close()

    second = ingest.connections[1]
    lost = [i for i, item in enumerate(second) if item[0] == "lost"]
    assert len(lost) == 1, second[:3]
    backlog, after = second[:lost[0]], second[lost[0] + 1:]
    frames = backlog[0][2]
    stamps = [stamp for _, stamp, _ in backlog + after]
    assert backlog[0][1] > 0 and len(after) >= 10
    # No chunk missing but those declared; the backlog held 10 s of them.
    assert stamps == [*range(stamps[0], stamps[0] + len(backlog)),
                      *range(after[0][1], after[0][1] + len(after))]
    assert len(backlog) * frames <= 10 * rate < (len(backlog) + 1) * frames
    gap = (after[0][1] - backlog[-1][1] - 1) * frames
    assert gap >= 20 * frames
    sent = second[lost[0]][1]
    assert (declared, undeclared) == (sent, gap - sent)
    if max_lost_s is None:
        assert sent == gap
        assert notice == (f"Microphone: reconnected ({gap // frames} audio chunks dropped "
                          "meanwhile; their time is sent as lost audio)")
    else:
        assert max_lost_s * rate <= sent < gap
        assert notice == (f"Microphone: {(gap - sent) / rate:.1f} s of lost audio were more "
                          f"than the server takes at once ({max_lost_s} s): the captions "
                          "after them come that much early")


async def drop_past_the_backlog(page: Page) -> None:
    """Start the microphone with stamped chunks (STAMP_CHUNKS) while the
    server holds the second connection before its ingest.ready, wait until
    20 chunks were dropped past the 10 s backlog, then pause the capture and
    let the chunks already posted arrive."""
    await page.wait_for(f"{STATUS} === 'live'")
    await page.click("#mic")
    await page.wait_for("Boolean(evoxtral.mic?.node)")
    await page.evaluate(STAMP_CHUNKS)
    await page.wait_for("evoxtral.mic.connects === 2 && evoxtral.mic.dropped >= 20", 30)
    await page.evaluate("evoxtral.mic.ctx.suspend()")
    await asyncio.sleep(0.3)


async def test_microphone_audio_dropped_before_a_connections_first_chunk_is_not_declared(
        browser: Browser) -> None:
    """The second connection is closed right after ingest.ready, the capture
    paused: the page sends it the backlog, but the chunks dropped after the
    backlog have no chunk after them there. They lie between that
    connection's stream and the next one's, which begins with the next chunk
    captured: declared on the third connection, they would shift its whole
    timeline late."""
    release = asyncio.Event()
    ingest = RecordingIngest(hold={1: release}, close_at_ready=frozenset({1}))
    async with serve(ingest.handler, "127.0.0.1", 0, process_request=page_files) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        page = await Page.open(browser, f"http://127.0.0.1:{port}/?mic=desk")
        try:
            await drop_past_the_backlog(page)
            last, backlog_last = await page.evaluate(
                "[window.stamped, new Int16Array(evoxtral.mic.backlog.at(-1).chunk)[0]]")
            release.set()
            await page.wait_for("evoxtral.mic.connects === 3 && evoxtral.mic.ready", 20)
            await page.evaluate("evoxtral.mic.ctx.resume()")
            await asyncio.sleep(1.0)
            await page.click("#mic")
            await page.wait_for("evoxtral.mic.summary")
            declared = await page.evaluate("evoxtral.mic.declared")
            assert page.errors == []
        finally:
            await page.close()

    assert last - backlog_last >= 20  # dropped after the backlog
    third = ingest.connections[2]
    assert third and all(kind == "audio" for kind, _, _ in third), third[:3]
    assert [stamp for _, stamp, _ in third] == list(range(last + 1, last + 1 + len(third)))
    assert declared == 0


async def test_microphone_audio_dropped_after_the_last_chunk_is_declared_before_end(
        browser: Browser) -> None:
    """Stopped while the capture is paused right after a reconnect: the
    chunks dropped after the backlog have no chunk after them, and are
    declared before end (the stream's timeline still reaches its end)."""
    release = asyncio.Event()
    ingest = RecordingIngest(hold={1: release})
    async with serve(ingest.handler, "127.0.0.1", 0, process_request=page_files) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        page = await Page.open(browser, f"http://127.0.0.1:{port}/?mic=desk")
        try:
            await drop_past_the_backlog(page)
            last = await page.evaluate("window.stamped")
            release.set()
            await page.wait_for("evoxtral.mic.ready && !evoxtral.mic.backlog.length")
            await page.click("#mic")
            await page.wait_for("evoxtral.mic.summary")
            declared = await page.evaluate("evoxtral.mic.declared")
            assert page.errors == []
        finally:
            await page.close()

    *backlog, (kind, samples, _) = ingest.connections[1]
    assert kind == "lost" and all(item[0] == "audio" for item in backlog)
    assert samples == declared == (last - backlog[-1][1]) * backlog[-1][2] > 0


async def test_stopping_while_reconnecting_counts_the_audio_dropped_past_the_backlog(
        browser: Browser) -> None:
    """Stopped while the next connection waits long for ingest.ready: what
    was not sent is the backlog's 10 s and the chunks dropped after it."""
    release = asyncio.Event()
    ingest = RecordingIngest(hold={1: release})
    async with serve(ingest.handler, "127.0.0.1", 0, process_request=page_files) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        page = await Page.open(browser, f"http://127.0.0.1:{port}/?mic=desk")
        try:
            await drop_past_the_backlog(page)
            # Every chunk from the backlog's first on was kept there or dropped.
            last, first, frames, rate = await page.evaluate(
                "[window.stamped, new Int16Array(evoxtral.mic.backlog[0].chunk)[0],"
                " evoxtral.mic.backlog[0].chunk.byteLength / 2, evoxtral.mic.sampleRate]")
            await page.click("#mic")
            notice = await page.evaluate("document.getElementById('notice').textContent")
            assert page.errors == []
        finally:
            release.set()
            await page.close()

    unsent = (last - first + 1) * frames / rate
    assert unsent >= 10 + 20 * frames / rate - 0.01  # the backlog, and 20 chunks past it
    assert notice == (f"Microphone stopped while reconnecting: {unsent:.1f} s of audio "
                      "were not sent")


async def throttle_upload(page: Page, bytes_per_s: float) -> None:
    """DevTools network emulation: the tab's uploads at ``bytes_per_s`` (-1: not
    throttled). Chromium applies it to WebSockets opened while some throttling
    is on, later changes included."""
    await page.send("Network.emulateNetworkConditions", offline=False, latency=0,
                    downloadThroughput=-1, uploadThroughput=bytes_per_s)


#: Records in window.notices every text the page's notice is given.
RECORD_NOTICES = ("(() => { window.notices = []; const notice = document.getElementById('notice');"
                  " new MutationObserver((records) => { for (const r of records)"
                  " for (const n of r.addedNodes) window.notices.push(n.textContent); })"
                  ".observe(notice, {childList: true}); })()")


async def test_a_connection_slower_than_the_microphone_drops_past_the_bound_and_declares_it(
        browser: Browser) -> None:
    """The open ingest connection stops keeping up (its upload throttled to
    1 byte/s by Chromium's own network emulation): the chunks wait in the
    socket's bufferedAmount. As from a server that does not acknowledge the
    audio (its ingest.ready without progress), the page bounds what
    bufferedAmount shows: once it holds MIC_BACKLOG_S (10 s) of audio,
    the page drops new chunks instead of buffering without end, and says so
    once. When the link is back and the buffer drains, it sends again, after
    a lost message for exactly the frames dropped: the real server counts
    them as lost audio, and its timeline is what was sent plus them."""
    cfg = load_config(overrides={"server.port": 0, "server.ping_interval_s": 0}, env={})
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        page = await Page.open(browser, f"http://127.0.0.1:{server.port}/?mic=desk")
        try:
            await page.wait_for(f"{STATUS} === 'live'")
            await page.send("Network.enable")
            await throttle_upload(page, 1e7)  # before the ingest socket opens; not slow yet
            await page.evaluate(RECORD_NOTICES)
            await page.click("#mic")
            await page.wait_for("evoxtral.mic?.ready && evoxtral.mic.sent > 0")
            await page.evaluate("evoxtral.mic.framesAcked = null")  # acknowledgements unseen
            rate = await page.evaluate("evoxtral.mic.sampleRate")
            await throttle_upload(page, 1)
            # 20 chunks dropped; or (the page without a bound) 11 s buffered.
            await page.wait_for("evoxtral.mic.slow >= 20 ||"
                                f" evoxtral.mic.ws.bufferedAmount > {11 * rate * 2}", 40)
            buffered = await page.evaluate("evoxtral.mic.ws.bufferedAmount")
            assert 9.8 * rate * 2 < buffered <= 10 * rate * 2
            await throttle_upload(page, -1)
            await page.wait_for("evoxtral.mic.slow === 0", 20)
            await asyncio.sleep(1.0)
            notices = await page.evaluate("window.notices")
            await page.click("#mic")
            summary = await page.wait_for("evoxtral.mic.summary", 15)
            sent, declared, undeclared = await page.evaluate(
                "[evoxtral.mic.sent, evoxtral.mic.declared, evoxtral.mic.undeclared]")
            assert page.errors == []
        finally:
            await page.close()

    assert notices[0] == ("Microphone: the connection is too slow; audio is dropped until it "
                          "catches up (its time is sent as lost audio)")
    caught_up = re.fullmatch(r"Microphone: the connection caught up \((\d+) audio chunks "
                             r"dropped meanwhile; their time is sent as lost audio\)", notices[1])
    assert caught_up and len(notices) == 2, notices
    chunks = int(caught_up[1])
    assert chunks >= 20
    assert (declared, undeclared) == (chunks * round(rate / 20), 0)
    assert abs(summary["lost"] - declared / rate) < 0.01
    assert abs(summary["duration"] - (sent / 2 + declared) / rate) < 0.1


async def test_a_stalled_link_bounds_the_audio_on_its_way_by_the_servers_acknowledgements(
        browser: Browser) -> None:
    """The page reaches a real server through a relay whose uplink stalls: what
    the page sends waits in the sockets and in Chromium's network process,
    which its bufferedAmount does not show. The server's ingest.progress
    acknowledgements stop with it, so once 10 s of audio are sent and not
    acknowledged the page sends nothing more: it drops new chunks and says so
    once. When the link moves again and the server has taken the audio held
    up, the page sends again, after a lost message for exactly the frames
    dropped: the server counts them as lost audio, and its timeline is what
    was sent plus them."""
    cfg = load_config(overrides={"server.port": 0, "server.ping_interval_s": 0}, env={})
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server, StallingRelay(server.port) as relay:
        page = await Page.open(browser, f"http://127.0.0.1:{relay.port}/?mic=desk")
        try:
            await page.wait_for(f"{STATUS} === 'live'")
            await page.evaluate(RECORD_NOTICES)
            await page.click("#mic")
            await page.wait_for("evoxtral.mic?.ready && evoxtral.mic.sent > 0")
            rate = await page.evaluate("evoxtral.mic.sampleRate")
            await asyncio.sleep(1.0)
            relay.flowing.clear()
            before = await page.evaluate("evoxtral.mic.sent")
            # 20 chunks dropped; or (no bound on what the stall holds) 12 s more sent.
            await page.wait_for(f"evoxtral.mic.slow >= 20 || evoxtral.mic.sent - {before}"
                                f" > {12 * rate * 2}", 40)
            stalled, forwarded = await page.evaluate("evoxtral.mic.sent"), relay.forwarded
            await asyncio.sleep(1.0)
            later, slow, unacked = await page.evaluate(
                "[evoxtral.mic.sent, evoxtral.mic.slow,"
                " evoxtral.mic.framesSent - evoxtral.mic.framesAcked]")
            assert relay.forwarded == forwarded  # the link is stalled
            relay.flowing.set()
            await page.wait_for("evoxtral.mic.slow === 0", 30)
            await asyncio.sleep(1.0)
            notices = await page.evaluate("window.notices")
            await page.click("#mic")
            summary = await page.wait_for("evoxtral.mic.summary", 20)
            sent, declared, undeclared = await page.evaluate(
                "[evoxtral.mic.sent, evoxtral.mic.declared, evoxtral.mic.undeclared]")
            assert page.errors == []
        finally:
            await page.close()

    # Sent during the stall: up to the bound, past what had been acknowledged.
    assert (stalled - before) / 2 <= 10.5 * rate, (stalled - before) / 2 / rate
    assert later == stalled and slow >= 30
    assert 9.9 * rate < unacked <= 10 * rate
    assert notices[0] == ("Microphone: the connection is too slow; audio is dropped until it "
                          "catches up (its time is sent as lost audio)")
    caught_up = re.fullmatch(r"Microphone: the connection caught up \((\d+) audio chunks "
                             r"dropped meanwhile; their time is sent as lost audio\)", notices[1])
    assert caught_up and len(notices) == 2, notices
    chunks = int(caught_up[1])
    assert chunks >= slow
    assert (declared, undeclared) == (chunks * round(rate / 20), 0)
    assert abs(summary["lost"] - declared / rate) < 0.01
    assert abs(summary["duration"] - (sent / 2 + declared) / rate) < 0.1


async def test_audio_a_broken_link_held_up_is_sent_again_on_the_next_connection(
        browser: Browser) -> None:
    """The page's microphone reaches a real server through a relay whose
    uplink stalls for 3 s and then breaks (a network that fails): the audio
    sent meanwhile waited in the sockets and in Chromium's network process,
    and never reached the server. The page sends it again first on the next
    connection, ahead of what it captured while reconnecting, so the two
    streams hold all that the page captured but for at most the half second
    the server may have taken unacknowledged (sent again, it would be taken
    twice). It used to be lost without a word, up to 10 s of it."""
    cfg = load_config(overrides={"server.port": 0, "server.ping_interval_s": 0}, env={})
    ended = EndedStreams()
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server, StallingRelay(server.port) as relay:
        engine.add_listener(ended)
        page = await Page.open(browser, f"http://127.0.0.1:{relay.port}/?mic=desk")
        try:
            await page.wait_for(f"{STATUS} === 'live'")
            await page.evaluate(RECORD_NOTICES)
            await page.click("#mic")
            await page.wait_for("evoxtral.mic?.ready && evoxtral.mic.sent > 0")
            await asyncio.sleep(1.0)
            relay.flowing.clear()
            await asyncio.sleep(3.0)
            relay.drop()
            relay.flowing.set()
            await page.wait_for("evoxtral.mic.connects >= 2 && evoxtral.mic.ready"
                                " && !evoxtral.mic.backlog.length", 20)
            await asyncio.sleep(1.5)
            # Capture paused: what the page captured is all it will send.
            await page.evaluate("evoxtral.mic.ctx.suspend()")
            await asyncio.sleep(0.3)
            await page.click("#mic")
            await page.wait_for("evoxtral.mic.summary", 20)
            rate, captured, resent, dropped, declared, notices = await page.evaluate(
                "[evoxtral.mic.sampleRate, evoxtral.mic.captured, evoxtral.mic.resent,"
                " evoxtral.mic.dropped, evoxtral.mic.declared, window.notices]")
            assert page.errors == []
        finally:
            await page.close()

    assert [e.stream for e in ended] == ["desk", "desk"]
    taken = sum(e.duration_s for e in ended)
    assert captured / rate - 0.55 <= taken <= captured / rate + 0.05, (captured / rate, taken)
    # About 3 s were held up, less the half second the server may take
    # unacknowledged, and less on a busy machine (see test_mic_client).
    assert resent >= 1.5 * rate, resent / rate
    assert dropped == 0 and declared == 0
    again = [n for n in notices if n.startswith("Microphone: reconnected")]
    assert again and re.fullmatch(
        r"Microphone: reconnected \((\d+\.\d) s of audio that did not reach the server "
        r"before the connection was lost sent again\)", again[0]), notices
    assert abs(float(again[0].split("(")[1].split(" ")[0]) - resent / rate) <= 0.05


#: Fills every frame the page's worklet delivers from now on with a running
#: count (mod 2**15): audio in which any frame missing or repeated shows.
COUNT_FRAMES = ("(() => { const port = evoxtral.mic.node.port; const deliver = port.onmessage;"
                " let n = 0; port.onmessage = (e) => { const a = new Int16Array(e.data);"
                " for (let i = 0; i < a.length; i++) a[i] = n++ & 0x7fff; deliver(e); }; })()")


async def test_a_lost_connection_is_resent_from_half_a_second_past_its_last_acknowledgement(
        browser: Browser) -> None:
    """A scripted server reads all of the first connection's audio but
    acknowledges only its first second or so, then closes the connection
    (1012) after 3 s. It acknowledges 7 frames short of what it read (the
    page's chunks need not be what a server hands on at a time), so the
    resend point falls inside a chunk. The next connection's audio begins
    exactly ceil(sample_rate / 2) frames past the last acknowledgement (the
    page sends the rest of that chunk), and from there every frame the page
    captured comes once, in order: none twice, none missing."""
    rate_seen: list[int] = []
    received: list[bytearray] = []  # the audio of each ingest connection
    acked: list[int] = []           # the last frames acknowledged on each

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        if not ws.request.path.startswith("/v1/ingest"):
            await ws.send(hello([]))
            await ws.wait_closed()
            return
        rate = json.loads(await ws.recv())["sample_rate"]
        rate_seen.append(rate)
        audio, index = bytearray(), len(received)
        received.append(audio)
        acked.append(0)
        await ws.send(json.dumps({"type": "ingest.ready", "stream": "desk", "sample_rate": rate,
                                  "channels": 1, "format": "pcm16", "language": "en",
                                  "progress": True}))
        async for message in ws:
            if not isinstance(message, bytes):
                continue
            audio += message
            frames = len(audio) // 2
            if index == 0 and frames >= 3 * rate:
                await ws.close(1012, "service restart")
                return
            if (index > 0 or frames <= 1.2 * rate) and frames - acked[index] >= -(-rate // 2):
                acked[index] = frames - 7
                await ws.send(json.dumps({"type": "ingest.progress", "frames": frames - 7}))

    async with serve(handler, "127.0.0.1", 0, process_request=page_files) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        page = await Page.open(browser, f"http://127.0.0.1:{port}/?mic=desk")
        try:
            await page.wait_for(f"{STATUS} === 'live'")
            await page.click("#mic")
            await page.wait_for("Boolean(evoxtral.mic?.node)")
            await page.evaluate(COUNT_FRAMES)
            await page.wait_for("evoxtral.mic.connects === 2 && evoxtral.mic.ready", 20)
            rate = await page.evaluate("evoxtral.mic.sampleRate")
            async with asyncio.timeout(20):
                while len(received[1]) < 4 * rate:
                    await asyncio.sleep(0.05)
            resent, notice = await page.evaluate(
                "[evoxtral.mic.resent, document.getElementById('notice').textContent]")
            assert page.errors == []
        finally:
            await page.close()

    first = np.frombuffer(bytes(received[0]), "<i2").astype(np.int64)
    second = np.frombuffer(bytes(received[1]), "<i2").astype(np.int64)
    start = acked[0] + -(-rate // 2)
    chunk = round(rate / 20)
    assert start % chunk != 0  # the resend begins mid-chunk
    assert len(first) > start + rate
    # The first connection's audio is counted frames from before its last acknowledgement.
    assert (np.diff(first[acked[0] - chunk:]) % 0x8000 == 1).all()
    assert second[0] == first[start]
    assert (np.diff(second) % 0x8000 == 1).all()  # nothing twice, nothing missing
    assert resent >= len(first) - start
    assert notice == (f"Microphone: reconnected ({resent / rate:.1f} s of audio that did not "
                      "reach the server before the connection was lost sent again)")
    assert rate_seen == [rate, rate]


async def test_each_ingest_connection_bounds_its_own_unacknowledged_audio(
        browser: Browser) -> None:
    """Each ingest connection counts its frames from 0, as its server does.
    A scripted server acknowledges every half second of the first
    connection's audio until over 10 s of it came, then closes it. It
    acknowledges the next connection's first 2 s only: the page sends that
    connection 10 s past its last acknowledgement (the backlog included),
    then drops. The first connection's frames sent, carried over, would make
    it drop at once."""
    cut = asyncio.Event()
    configs: list[dict[str, Any]] = []
    received: list[int] = []  # audio frames each ingest connection got
    acked: list[int] = []     # the last frames acknowledged on each

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        if not ws.request.path.startswith("/v1/ingest"):
            await ws.send(hello([]))
            await ws.wait_closed()
            return
        configs.append(config := json.loads(await ws.recv()))
        rate, index = config["sample_rate"], len(received)
        received.append(0)
        acked.append(0)
        await ws.send(json.dumps({"type": "ingest.ready", "stream": "desk", "sample_rate": rate,
                                  "channels": 1, "format": "pcm16", "language": "en",
                                  "progress": True}))
        async for message in ws:
            if not isinstance(message, bytes):
                continue
            if index == 0 and cut.is_set():
                await ws.close(1012, "service restart")
                return
            received[index] += len(message) // 2
            if (index == 0 or received[index] <= 2 * rate) \
                    and received[index] - acked[index] >= rate // 2:
                acked[index] = received[index]
                await ws.send(json.dumps({"type": "ingest.progress", "frames": acked[index]}))

    async with serve(handler, "127.0.0.1", 0, process_request=page_files) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        page = await Page.open(browser, f"http://127.0.0.1:{port}/?mic=desk")
        try:
            await page.wait_for(f"{STATUS} === 'live'")
            await page.click("#mic")
            await page.wait_for("evoxtral.mic?.ready")
            rate = await page.evaluate("evoxtral.mic.sampleRate")
            async with asyncio.timeout(30):
                while received[0] <= 10.5 * rate:
                    await asyncio.sleep(0.05)
            assert await page.evaluate("evoxtral.mic.slow") == 0
            cut.set()
            await page.wait_for("evoxtral.mic.connects === 2 && evoxtral.mic.ready", 10)
            # The next connection drops; or (counts carried over, or no bound)
            # its audio goes on past 14 s.
            async with asyncio.timeout(30):
                while (slow := await page.evaluate("evoxtral.mic.slow")) < 10 \
                        and received[1] <= 14 * rate:
                    await asyncio.sleep(0.05)
            assert page.errors == []
        finally:
            await page.close()

    frames = round(rate / 20)
    assert slow >= 10
    assert acked[1] >= 1.5 * rate
    assert 10 * rate - frames < received[1] - acked[1] <= 10 * rate
    assert [c.get("progress") for c in configs] == [True, True]


async def test_a_late_stream_ended_of_the_old_run_keeps_the_microphones_new_partial(
        browser: Browser) -> None:
    """The microphone's stream id is used again: the server ends the old run
    (stream.ended) before it starts the new one (the engine frees the id and
    publishes stream.ended in one step), but the subscription is behind, and the
    new run's partial comes first on the microphone socket. The old run's
    late stream.ended drops that run's unfinished partial (segment 0 had a
    decode error, so segment 1's line is not forgotten before), not the new
    run's: it stays on screen, not gone until the next one."""
    go = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        if ws.request.path.startswith("/v1/ingest"):
            await start_mic_run(ws, partial("desk", 0, 2, "new zero"))
            await ws.wait_closed()
            return
        await ws.send(hello([]))
        await ws.send(STARTED_DESK)
        await ws.send(DECODE_FAILED_DESK_0)
        await ws.send(partial("desk", 1, 1, "old one"))
        await go.wait()
        await ws.send(json.dumps({"type": "stream.ended", "stream": "desk", "duration": 2.0,
                                  "segments": 2, "finals": 0}))
        await ws.send(STARTED_DESK)
        await ws.send(partial("desk", 0, 2, "new zero"))
        await ws.wait_closed()

    finals, partials = FINALS.format(s="desk"), PARTIALS.format(s="desk")
    async with serve(handler, "127.0.0.1", 0, process_request=page_files) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        page = await Page.open(browser, f"http://127.0.0.1:{port}/?mic=desk")
        try:
            await page.wait_for(f"{partials}.length === 1")
            await page.click("#mic")
            await page.wait_for(f"{partials}.length === 2")
            go.set()
            await page.wait_for("evoxtral.lastSeq.get('desk') === 2")
            assert await page.evaluate(partials) == [[0, "new zero"]]
            assert await page.evaluate(finals) == []
            notes = await page.evaluate(
                "[...document.querySelectorAll('#finals .note')].map(n => n.textContent)")
            assert [n for n in notes if "ended" in n] == ["desk ended · 0 captions, 2.0 s"]
            assert await page.evaluate("document.querySelector('#picker option"
                                       "[value=\"desk\"]').textContent") == "desk"
            assert page.errors == []
        finally:
            go.set()  # the handler must not hold the server open
            await page.close()
