"""The page against docs/protocol.md in headless Chromium: errors beside finals the
microphone socket showed first, a failed partial decode, lines of a reused segment
trimmed, streams that ended while away, and lost audio declared again on a resend."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import (
    SAMPLE_RATE,
    CaptionEvent,
    EngineEvent,
    Hypothesis,
    RequestKind,
    StreamEnded,
    StreamError,
    StreamStarted,
)
from evoxtral_stream.server.app import CaptionServer
from evoxtral_stream.text.merger import Merger
from tests.clients.conftest import REBOUND_HOST, Browser, Page, publish_finals
from tests.clients.test_web import (
    FINALS,
    PARTIALS,
    SENTENCES,
    STARTED_DESK,
    STATUS,
    final,
    hello,
    page_files,
    partial,
)
from tests.clients.test_web import scripted as scripted
from tests.fakes import ScriptedBackend, words_so_far
from tests.speech import have_espeak, speech_with_pauses

pytestmark = [pytest.mark.timeout(120)]


@contextlib.asynccontextmanager
async def mic_page(browser: Browser, handler: Callable[[ServerConnection], Awaitable[None]]
                   ) -> AsyncIterator[Page]:
    """The page, served beside ``handler``, live, with its microphone started as desk."""
    async with serve(handler, "127.0.0.1", 0, process_request=page_files) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        page = await Page.open(browser, f"http://127.0.0.1:{port}/?mic=desk")
        try:
            await page.wait_for(f"{STATUS} === 'live'")
            await page.click("#mic")
            yield page
        finally:
            await page.close()


async def _messages(ws: ServerConnection) -> AsyncIterator[str | bytes]:
    """The messages of ``ws`` until it closes, however it closes."""
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            yield message


async def test_an_error_of_a_segment_does_not_remove_the_final_the_mic_socket_showed(
        browser: Browser) -> None:
    """The page's own microphone stream reaches it on both sockets. The
    microphone socket brings a segment's error and its closing final (a
    failed final decode after a partial was shown: docs/protocol.md, the
    error comes first, then the final with the partial's text) before the
    subscription does. The subscription's copy of the error then removed the
    final already shown, and its copy of the final was skipped as already
    shown: the final is gone from the page."""
    mic_done = asyncio.Event()
    err = json.dumps({"type": "error", "code": "decode_failed", "message": "boom",
                      "stream": "desk", "segment": 0})

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        if ws.request.path.startswith("/v1/ingest"):
            await ws.recv()  # config
            await ws.send(json.dumps({"type": "ingest.ready", "stream": "desk",
                                      "sample_rate": 48000, "channels": 1, "format": "pcm16",
                                      "language": "en", "progress": False, "epoch": "e1"}))
            for message in (STARTED_DESK, partial("desk", 0, 1, "hello"), err,
                            final("desk", 0, 2, "hello")):
                await ws.send(message)
            mic_done.set()
            await ws.wait_closed()
            return
        await ws.send(json.dumps({**json.loads(hello([])), "epoch": "e1"}))
        await mic_done.wait()
        await asyncio.sleep(0.5)  # the microphone socket's copies are handled by now
        for message in (STARTED_DESK, partial("desk", 0, 1, "hello"), err,
                        final("desk", 0, 2, "hello")):
            await ws.send(message)
        await ws.wait_closed()

    finals = FINALS.format(s="desk")
    async with mic_page(browser, handler) as page:
        await page.wait_for(f"{finals}.length === 1")
        await page.wait_for("evoxtral.lastSeq.get('desk') === 2")
        await asyncio.sleep(0.3)
        assert await page.evaluate(finals) == ["hello"]
        assert await page.evaluate(PARTIALS.format(s="desk")) == []


#: Each partial line of a stream: its segment, its text, and the error mark
#: it carries ("" for none).
MARKED = ("[...document.querySelectorAll('#partials .line[data-stream=\"{s}\"]')]"
          ".map(l => [+l.dataset.segment, l.querySelector('.text').textContent,"
          " l.classList.contains('failed') ? l.querySelector('.flag').textContent : ''])")


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
async def test_a_failed_partial_decode_keeps_the_last_partial_shown_with_a_mark(
        browser: Browser) -> None:
    """The model fails on the second partial of a segment: the engine sends
    decode_failed for the segment, and the segment goes on (its next partial
    a second of audio later, then its final). The page removed the
    segment's line at the error, so nothing of what was being said showed
    until the next partial. The last good partial stays now, marked with the
    error; the next partial takes the mark off, and the final replaces the
    line as usual."""
    cfg = load_config(overrides={"server.port": 0})
    calls = itertools.count(1)
    backend = ScriptedBackend(words_so_far, fail_when=lambda _: next(calls) == 2)
    errors: list[StreamError] = []
    shown: list[str] = []   # the partials' texts, up to the error
    later: list[str] = []   # and after it

    def on_event(event: EngineEvent) -> None:
        if isinstance(event, StreamError):
            errors.append(event)
        elif isinstance(event, CaptionEvent):
            (later if errors else shown).append(event.text)

    audio, spans = speech_with_pauses(SENTENCES[:1], pause_s=1.2)
    async with Engine(cfg, backend) as engine, CaptionServer(engine, cfg.server) as server:
        engine.add_listener(on_event)
        page = await Page.open(browser, f"http://127.0.0.1:{server.port}/")
        try:
            await page.wait_for(f"{STATUS} === 'live'")
            stream = engine.open_stream("talk", source="test")
            pos = 0
            while not errors:   # up to the failed partial, and no further
                assert pos < spans[0][1], "no partial decode failed"
                stream.push(audio[pos:pos + 1600])
                pos += 1600
                await stream.wait_idle()
            assert [(e.code, e.segment) for e in errors] == [("decode_failed", 0)]
            assert len(shown) == 1   # the first partial's text; the second failed
            await page.wait_for("[...document.querySelectorAll('#finals .note')]"
                                ".some(n => n.textContent.includes('decode_failed'))")
            await asyncio.sleep(0.3)   # what the page does after the error, if anything
            marked = MARKED.format(s="talk")
            assert await page.evaluate(marked) == [[0, shown[0], "⚠ decode_failed"]]
            flag = await page.evaluate(
                "(() => { const f = document.querySelector('#partials .line.failed .flag');"
                " return [f.title, f.getBoundingClientRect().width > 0]; })()")
            assert flag == ["RuntimeError: scripted failure", True]
            # The next good partial: the segment's newer text, no mark. Audio
            # only up to the engine's next caption, then as long as the page
            # takes (a loaded machine's browser may lag the rest of the speech).
            while not later:
                assert pos < spans[0][1], "no partial after the failed one"
                stream.push(audio[pos:pos + 1600])
                pos += 1600
                await stream.wait_idle()
            await page.wait_for(f"{marked}[0]?.[2] === ''")
            [[segment, text, mark]] = await page.evaluate(marked)
            assert (segment, mark) == (0, "") and text.startswith(f"{shown[0]} ")
            # A new error of the segment, then its final: the final replaces the line.
            server.broadcaster.publish(StreamError("talk", "decode_failed", "again", 0))
            await page.wait_for(f"{marked}[0]?.[2] === '⚠ decode_failed'")
            stream.push(audio[pos:])
            await stream.close()
            await page.wait_for(f"{FINALS.format(s='talk')}.length === 1")
            assert await page.evaluate(marked) == []
            assert not await page.evaluate("document.querySelector('.failed, .flag')")
            assert page.errors == []
        finally:
            await page.close()


def _final(stream: str, segment: int, seq: int, text: str) -> CaptionEvent:
    return CaptionEvent(stream, segment, seq, True, text, text, text, "", (), 0.0, 1.0, 0.1)


def _partial(stream: str, segment: int, seq: int, text: str) -> CaptionEvent:
    return CaptionEvent(stream, segment, seq, False, text, text, "", text, (), 0.0, 1.0, 0.1)


async def test_a_line_trimmed_from_the_log_does_not_orphan_its_segments_new_line(
        browser: Browser, scripted: tuple[Engine, CaptionServer],
) -> None:
    """Stream desk is used again: its new run's segment 0 has the same key
    as the old run's final line, still in the log. When that old line is
    trimmed (MAX_LINES = 300) while the new segment 0 is a partial,
    dropLine deleted the key, i.e. the new partial's entry: its final then
    got a line of its own and the partial stayed in #partials for good."""
    _, server = scripted
    page = await Page.open(browser, f"http://127.0.0.1:{server.port}/")
    b = server.broadcaster
    try:
        await page.wait_for(f"{STATUS} === 'live'")
        b.publish(StreamStarted("desk", "ingest"))
        b.publish(_final("desk", 0, 1, "old"))
        b.publish(StreamEnded("desk", 1.0, 1, 1))
        b.publish(StreamStarted("desk", "ingest"))
        b.publish(_partial("desk", 0, 2, "new"))
        await page.wait_for(f"{PARTIALS.format(s='desk')}.length === 1")
        for i in range(300):  # in batches, within the subscriber queue
            b.publish(_final("other", i, i + 1, f"o{i}"))
            if i % 100 == 99:
                await page.wait_for(f"evoxtral.lastSeq.get('other') === {i + 1}")
        assert await page.evaluate("evoxtral.connects") == 1
        b.publish(_final("desk", 0, 3, "new final"))
        await page.wait_for("evoxtral.lastSeq.get('desk') === 3")
        await asyncio.sleep(0.3)
        assert await page.evaluate(FINALS.format(s="desk")) == ["new final"]
        assert await page.evaluate(PARTIALS.format(s="desk")) == []
    finally:
        await page.close()


def _no_speech_captions() -> list[CaptionEvent]:
    """What the real merger makes of two segments that Whisper first heard as
    "You", then rated as no speech (model.whisper.no_speech_threshold): the
    first stays so (an empty final), the second then says something."""
    merger = Merger("hum", final_replaces_stable=True)
    partial, final = RequestKind.PARTIAL, RequestKind.FINAL
    script = ((0, partial, "You", 1.0), (0, partial, "", 2.0), (0, final, "", 2.5),
              (1, partial, "You", 4.0), (1, partial, "", 5.0),
              (1, partial, "hello there", 6.0), (1, final, "hello there", 6.5))
    events: list[CaptionEvent] = []
    for rev, (segment, kind, text, end_s) in enumerate(script, start=1):
        h = Hypothesis("hum", segment, rev, kind, text, 48000 * segment,
                       round(end_s * SAMPLE_RATE), 0.0, 0.1)
        events += merger.feed(h)
    assert [(e.segment, e.final, e.text) for e in events] == [
        (0, False, "You"), (0, False, ""), (0, True, ""),
        (1, False, "You"), (1, False, ""), (1, False, "hello there"), (1, True, "hello there")]
    return events


async def test_a_partial_that_loses_its_text_takes_its_line_away_until_it_says_something(
        browser: Browser, scripted: tuple[Engine, CaptionServer],
) -> None:
    """A segment the model first heard as "You", then rated as no speech: its
    partial with no text left a line holding only the stream's name and a
    time in the live partials, until the segment's empty final removed it
    (a long noise: seconds). Now the line goes at the empty partial, and
    comes back if the segment says something after all."""
    _, server = scripted
    page = await Page.open(browser, f"http://127.0.0.1:{server.port}/")
    lines = ("[...document.querySelectorAll('.line[data-stream=\"hum\"]')]"
             ".filter(l => l.getClientRects().length)"
             ".map(l => [l.parentNode.id, +l.dataset.segment, "
             "l.querySelector('.text').textContent])")
    expected = [[["partials", 0, "You"]], [], [],
                [["partials", 1, "You"]], [], [["partials", 1, "hello there"]],
                [["finals", 1, "hello there"]]]
    try:
        await page.wait_for(f"{STATUS} === 'live'")
        server.broadcaster.publish(StreamStarted("hum", "test"))
        for event, shown in zip(_no_speech_captions(), expected, strict=True):
            server.broadcaster.publish(event)
            await page.wait_for(f"evoxtral.lastSeq.get('hum') === {event.seq}")
            assert await page.evaluate(lines) == shown, event
        assert page.errors == []
    finally:
        await page.close()


async def test_a_stream_that_ended_while_away_is_marked_ended_without_captions_seen(
        browser: Browser, scripted: tuple[Engine, CaptionServer],
) -> None:
    """clients/README.md: the picker lists the streams open when the page
    connected and every stream that starts afterwards; ended streams are
    marked (ended). A stream that started (no caption yet) and ended while
    the page was reconnecting stayed listed as live for good: the hello's
    check only marks streams the page had a seq of."""
    engine, server = scripted
    quiet = engine.open_stream("quiet", source="test")  # open, no speech yet
    page = await Page.open(browser, f"http://127.0.0.1:{server.port}/")
    option = "document.querySelector('#picker option[value=\"quiet\"]')?.textContent"
    try:
        await page.wait_for(f"{STATUS} === 'live'")
        await page.wait_for(f"{option} === 'quiet'")  # listed by the hello
        await page.evaluate("evoxtral.retry = 3; evoxtral.socket.close()")
        await page.wait_for(f"{STATUS} !== 'live'")
        await quiet.close()  # it ends while the page is away
        await page.wait_for(f"evoxtral.connects === 2 && {STATUS} === 'live'", 10)
        await asyncio.sleep(0.5)
        assert await page.evaluate(option) == "quiet (ended)"
    finally:
        await page.close()


async def test_audio_sent_again_after_a_lost_connection_keeps_its_lost_declarations(
        browser: Browser) -> None:
    """On a link slower than the microphone the page drops chunks past 10 s
    of unacknowledged audio and declares their time with a lost message
    before the next chunk it sends. That lost message goes after all the
    unacknowledged audio, so when the connection is then lost, the server
    took neither (docs/protocol.md: the audio sent more than half a second
    past the last acknowledgement was not taken). The page sends that audio
    again on the next connection, but with no lost message where the chunks
    were dropped: the audio after them lands early on the stream's timeline
    by all the time dropped (here 1 s; up to 10 s)."""
    conns: list[ServerConnection] = []
    received: list[list[tuple[str, int, int]]] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        if not ws.request.path.startswith("/v1/ingest"):
            await ws.send(hello([]))
            await ws.wait_closed()
            return
        config = json.loads(await ws.recv())
        conns.append(ws)
        received.append(got := [])
        await ws.send(json.dumps({"type": "ingest.ready", "stream": "desk",
                                  "sample_rate": config["sample_rate"], "channels": 1,
                                  "format": "pcm16", "language": "en", "progress": True}))
        async for message in _messages(ws):
            if isinstance(message, bytes):
                a = np.frombuffer(message, "<i2")
                got.append(("audio", int(a[0]) if (a == a[0]).all() else -1, len(a)))
            elif (msg := json.loads(message))["type"] == "lost":
                got.append(("lost", msg["samples"], 0))

    deliver = ("(n) => { const m = evoxtral.mic, f = Math.round(m.sampleRate / 20);"
               " for (let i = 0; i < n; i++) { window.stamp = (window.stamp || 1000) + 1;"
               " m.node.port.onmessage({data: new Int16Array(f).fill(window.stamp).buffer}); } }")
    async with mic_page(browser, handler) as page:
        await page.wait_for("Boolean(evoxtral.mic?.node)")
        await page.evaluate("evoxtral.mic.ctx.suspend()")  # only our chunks from now on
        await page.wait_for("evoxtral.mic.ready && !evoxtral.mic.backlog.length")
        await asyncio.sleep(0.5)
        rate = await page.evaluate("evoxtral.mic.sampleRate")
        chunk = round(rate / 20)
        await page.evaluate(f"({deliver})(220)")  # 11 s: the last ones are dropped
        dropped = await page.evaluate("evoxtral.mic.lost")
        assert dropped >= 10 * chunk
        async with asyncio.timeout(10):
            while sum(f for k, _, f in received[0] if k == "audio") < 8 * rate:
                await asyncio.sleep(0.05)
        # The server acknowledges its first second only; then the page sends
        # one more chunk, after a lost message for those it dropped.
        await conns[0].send(json.dumps({"type": "ingest.progress", "frames": rate}))
        await page.wait_for(f"evoxtral.mic.framesAcked === {rate}")
        await page.evaluate(f"({deliver})(1)")
        last = await page.evaluate("window.stamp")
        async with asyncio.timeout(10):
            while not any(s == last for k, s, _ in received[0] if k == "audio"):
                await asyncio.sleep(0.05)
        assert ("lost", dropped, 0) in received[0]
        await conns[0].close(1012, "service restart")
        await page.wait_for("evoxtral.mic.connects === 2 && evoxtral.mic.ready", 10)
        async with asyncio.timeout(10):
            while len(received) < 2 or not any(s == last for k, s, _ in received[1]
                                               if k == "audio"):
                await asyncio.sleep(0.05)
        second = received[1]

    stamps = [s for k, s, _ in second if k == "audio"]
    assert stamps[-1] == last and stamps[-2] < last - 1  # chunks were dropped in between
    # The drop keeps its place on the new connection's timeline.
    assert second[-2] == ("lost", dropped, 0), second[-3:]


async def test_a_partial_of_a_stream_found_ended_at_a_reconnect_does_not_stay(
        browser: Browser) -> None:
    """The page shows a partial of talk; the server crashes and comes back
    with its journal (same epoch). docs/protocol.md: a stream cut by a crash
    has no recorded end, so its replay ends without stream.ended and no
    final of that segment ever comes. The page sees from the hello that
    talk is no longer open and marks it (ended), but left its partial in
    #partials for good (stream.ended would have removed it)."""
    paths: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        if len(paths) == 1:
            await ws.send(json.dumps({**json.loads(hello(["talk"])), "epoch": "e1"}))
            await ws.send(partial("talk", 0, 1, "cut off"))
            await asyncio.sleep(0.5)
            await ws.close(1001, "going away")
            return
        await ws.send(json.dumps({**json.loads(hello([])), "epoch": "e1"}))  # nothing to replay
        await ws.wait_closed()

    option = "document.querySelector('#picker option[value=\"talk\"]')?.textContent"
    async with serve(handler, "127.0.0.1", 0, process_request=page_files) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        page = await Page.open(browser, f"http://127.0.0.1:{port}/")
        try:
            await page.wait_for(f"{PARTIALS.format(s='talk')}.length === 1")
            await page.wait_for(f"evoxtral.connects === 2 && {option} === 'talk (ended)'", 10)
            assert paths[1] == "/v1/captions?since=talk:1&epoch=e1"
            await asyncio.sleep(0.3)
            assert await page.evaluate(PARTIALS.format(s="talk")) == []
        finally:
            await page.close()


async def test_a_page_whose_origin_is_refused_says_so_and_does_not_ask_for_a_token(
    browser: Browser, scripted: tuple[Engine, CaptionServer],
) -> None:
    """A loopback server refuses its own page reached by another name (DNS
    rebinding, or a proxy passing its public Host). The page's plain fetch
    that asks why carries no Origin, so the server granted it and the page
    showed the token form ("token missing or not accepted") and retried
    nothing a token could fix; it now says the origin is not allowed."""
    _, server = scripted
    page = await Page.open(browser, f"http://{REBOUND_HOST}:{server.port}/")
    try:
        await page.wait_for(f"{STATUS} === 'access refused: this page\\'s origin is not allowed'")
        notice = await page.wait_for("document.getElementById('notice').textContent")
        assert f"origin http://{REBOUND_HOST}:{server.port} is not in server.allowed_origins" \
            in notice
        assert await page.evaluate("document.getElementById('auth').hidden")
        await asyncio.sleep(1.0)
        assert await page.evaluate("evoxtral.connects") == 1  # waits: retrying cannot help
    finally:
        await page.close()


async def test_a_resume_that_replays_a_streams_end_does_not_note_it_again(
        browser: Browser, scripted: tuple[Engine, CaptionServer],
) -> None:
    """docs/protocol.md: a resume's replay of an ended stream ends with its
    stream.ended, whether or not the subscriber had it. The page added an
    'ended' note for each: one more under the stream's captions at every
    reconnect. One note per end; the next run of the id gets its own."""
    _, server = scripted
    b = server.broadcaster
    notes = ("[...document.querySelectorAll('#finals .note[data-stream=\"talk\"]')]"
             ".map(n => n.textContent)")

    async def reconnect(n: int, marker: str) -> None:
        await page.evaluate("evoxtral.retry = 0; evoxtral.socket.close()")
        await page.wait_for(f"evoxtral.connects === {n} && {STATUS} === 'live'")
        # After the replay on the same connection: the replay has been handled.
        b.publish(_final("other", 0, n, marker))
        await page.wait_for(f"{FINALS.format(s='other')}.includes('{marker}')")

    page = await Page.open(browser, f"http://127.0.0.1:{server.port}/")
    try:
        await page.wait_for(f"{STATUS} === 'live'")
        publish_finals(server, "talk", ["one"])
        await page.wait_for(f"{notes}.length === 1")
        await reconnect(2, "m2")
        await reconnect(3, "m3")
        assert await page.evaluate(notes) == ["talk ended · 1 captions, 1.0 s"]
        # The id used again: its end is noted, once too.
        b.publish(StreamStarted("talk", "test"))
        b.publish(_final("talk", 0, 2, "two"))
        b.publish(StreamEnded("talk", 2.0, 1, 1))
        await page.wait_for(f"{notes}.length === 2")
        await reconnect(4, "m4")
        assert await page.evaluate(notes) == ["talk ended · 1 captions, 1.0 s",
                                              "talk ended · 1 captions, 2.0 s"]
        assert await page.evaluate(FINALS.format(s="talk")) == ["one", "two"]
        assert page.errors == []
    finally:
        await page.close()


async def test_a_link_lost_right_after_a_restarted_servers_hello_drops_the_old_partial(
        browser: Browser) -> None:
    """The server restarted without its journal (a new epoch) and stream talk
    was opened again before the page came back, so the hello lists it as
    open. The old server's open segment never ends: the page forgot its
    partial only at the replay's gap with no end. When the link dropped right
    after the hello, the next resume (since=talk:0 of the new epoch) gets no
    gap, and the old partial stayed on screen for good."""
    paths: list[str] = []

    def hello_of(epoch: str) -> str:
        return json.dumps({**json.loads(hello(["talk"])), "epoch": epoch})

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        if len(paths) == 1:   # the first server
            await ws.send(hello_of("e1"))
            await ws.send(json.dumps({"type": "stream.started", "stream": "talk",
                                      "source": "ingest"}))
            await ws.send(partial("talk", 0, 1, "old words"))
            await ws.send(final("other", 0, 1, "first"))
            await ws.wait_closed()
            return
        await ws.send(hello_of("e2"))   # the restarted server
        if len(paths) == 2:
            await ws.close(1011, "lost right after the hello")
            return
        await ws.send(final("other", 0, 1, "back"))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, process_request=page_files) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        page = await Page.open(browser, f"http://127.0.0.1:{port}/")
        try:
            await page.wait_for(f"{FINALS.format(s='other')}.length === 1")
            assert await page.evaluate(PARTIALS.format(s="talk")) == [[0, "old words"]]
            await page.evaluate("evoxtral.retry = 0; evoxtral.socket.close()")
            await page.wait_for(f"evoxtral.connects === 3 && {STATUS} === 'live' && "
                                f"{FINALS.format(s='other')}.includes('back')")
            assert paths[1:] == ["/v1/captions?since=other:1,talk:1&epoch=e1",
                                 "/v1/captions?since=talk:0,other:0&epoch=e2"]
            assert await page.evaluate(PARTIALS.format(s="talk")) == []
            assert page.errors == []
        finally:
            await page.close()
