"""The WebSocket server over real sockets: hello, captions, filters, slow subscribers."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedOK, InvalidStatus

from evoxtral_stream.config import Config, load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import CaptionEvent
from evoxtral_stream.run import feed_samples
from evoxtral_stream.server.app import CLOSE_TIMEOUT_S, CaptionServer
from evoxtral_stream.server.protocol import encode_event
from tests.fakes import ScriptedBackend, words_so_far
from tests.helpers.audio import buzz, to_int16
from tests.helpers.http import close_while_reading, http_get, raw_ws_handshake, read_slowly
from tests.speech import have_espeak, speech_with_pauses

SENTENCES = ["Good evening and welcome to the live captioning demo.",
             "Thank you for listening, and have a wonderful night."]


def config(**overrides: object) -> Config:
    return load_config(overrides={"server.port": 0, **overrides})



@pytest.fixture
async def served() -> AsyncIterator[tuple[Engine, CaptionServer]]:
    cfg = config()
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        yield engine, server


async def test_healthz_and_unknown_path(served: tuple[Engine, CaptionServer]) -> None:
    _, server = served
    assert await http_get(f"http://127.0.0.1:{server.port}/healthz") == (200, "ok\n")
    status, body = await http_get(f"http://127.0.0.1:{server.port}/nope")
    assert status == 404
    assert "/nope" in body


async def test_connections_that_never_finish_their_handshake_do_not_hold_up_the_close(
) -> None:
    # A load balancer's TCP check, a browser's preconnect, a half-sent
    # request: websockets alone waits for its open_timeout (10 s) on each,
    # past a container's stop grace.
    cfg = config()
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine:
        server = CaptionServer(engine, cfg.server)
        await server.start()
        idle = socket.create_connection(("127.0.0.1", server.port))
        half = socket.create_connection(("127.0.0.1", server.port))
        half.sendall(b"GET /v1/ingest?stream=a HTTP/1.1\r\nHost: x\r\n")
        try:
            async with connect(f"ws://127.0.0.1:{server.port}/v1/captions") as ws:
                assert json.loads(await ws.recv())["type"] == "hello"
                t0 = asyncio.get_running_loop().time()
                await asyncio.wait_for(server.aclose(), 30)
                took = asyncio.get_running_loop().time() - t0
                # An open connection is still closed properly (1001).
                with pytest.raises(ConnectionClosedOK):
                    await asyncio.wait_for(ws.recv(), 5)
                assert ws.close_code == 1001
        finally:
            idle.close()
            half.close()
    assert took < 4.0


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
async def test_subscriber_gets_hello_partials_then_finals(
    served: tuple[Engine, CaptionServer],
) -> None:
    engine, server = served
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.5)
    async with connect(f"ws://127.0.0.1:{server.port}/v1/captions") as ws:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello"
        assert hello["v"] == 1
        assert hello["backend"] == "scripted"
        assert (hello["languages"], hello["adapters"]) == (["en"], [])
        stream = engine.open_stream("talk", source="test")
        await feed_samples(stream, audio, 1600, realtime=False)
        messages: list[dict[str, Any]] = []
        while not messages or messages[-1]["type"] != "stream.ended":
            messages.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
    types = [m["type"] for m in messages]
    assert types[0] == "stream.started"
    assert types[-1] == "stream.ended"
    captions = [m for m in messages if m["type"] == "caption"]
    assert all(c["stream"] == "talk" for c in captions)
    seqs = [c["seq"] for c in captions]
    assert seqs == sorted(set(seqs))
    for segment in (0, 1):
        mine = [c for c in captions if c["segment"] == segment]
        assert [c["final"] for c in mine][-1] is True
        assert any(not c["final"] for c in mine), "a partial comes before the final"
        final = mine[-1]
        assert final["text"].startswith("w0 w1 w2")
        assert 0 <= final["start"] < final["end"]
        assert final["latency"] >= 0
    assert messages[-1]["finals"] == 2


async def test_stream_filter(served: tuple[Engine, CaptionServer]) -> None:
    engine, server = served
    async with connect(f"ws://127.0.0.1:{server.port}/v1/captions?stream=b") as ws:
        await ws.recv()  # hello
        for name in ("a", "b"):
            engine.open_stream(name, source="test")
        msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert msg == {"type": "stream.started", "stream": "b", "source": "test"}
    # The hello names only the open streams asked for.
    # A list's items are trimmed, as since='s are ("b, a" names a and b).
    for query, listed in (("?stream=b,c", ["b"]), ("", ["a", "b"]),
                          ("?stream=c,%20a", ["a"])):
        async with connect(f"ws://127.0.0.1:{server.port}/v1/captions{query}") as ws:
            assert json.loads(await ws.recv())["streams"] == listed
    for s in engine.streams.values():
        await s.close()


@pytest.mark.parametrize(("query", "why"), [
    ("?stream=a%01b", "?stream= names an id no stream can have: a stream id holds no "
                      "control characters, got 'a\\x01b'"),
    ("?stream=ok,a%E2%80%AEb", "?stream= names an id no stream can have: a stream id holds "
                               "no invisible format characters"),
    ("?stream=" + "x" * 129, "?stream= names an id no stream can have: a stream id has 1 to "
                             "128 characters, got 129"),
    ("?since=a%0A:3", "since names an id no stream can have: a stream id holds no control "
                      "characters, got 'a\\n'"),
])
async def test_a_stream_id_no_stream_can_have_is_a_bad_query(
        served: tuple[Engine, CaptionServer], query: str, why: str) -> None:
    """``?stream=`` or ``since=`` naming an id that no stream can be opened
    under (the engine refuses it: a control character, a bidi override, too
    long) was taken silently: the subscriber got its hello, then nothing
    ever, and a resume a gap to null for it. It gets one ``bad_query`` that
    says why, then close 1008, as an ingest under that id does."""
    _, server = served
    async with connect(f"ws://127.0.0.1:{server.port}/v1/captions{query}") as ws:
        err = json.loads(await asyncio.wait_for(ws.recv(), 5))
        await asyncio.wait_for(ws.wait_closed(), 5)
    assert (err["type"], err["code"]) == ("error", "bad_query")
    assert err["message"].startswith(why), err["message"]
    assert ws.close_code == 1008
    assert server.broadcaster.subscribers == 0


async def test_a_query_that_is_not_utf8_once_decoded_is_a_bad_request(
        served: tuple[Engine, CaptionServer]) -> None:
    """Percent-encoded bytes that are no UTF-8 (``%ff``) used to decode to
    U+FFFD, so different ids named one stream (``?stream=%ff`` and
    ``?stream=%fe`` both ``"\ufffd"``, to subscribe, resume or ingest under).
    They get a 400 with one line, as a repeated header does."""
    engine, server = served
    engine.open_stream("\ufffd", source="test")
    base = f"ws://127.0.0.1:{server.port}"
    for path in ("/v1/captions?stream=%ff", "/v1/captions?since=%fe:3",
                 "/v1/captions?stream=a&since=%ed%a0%80", "/v1/ingest?stream=%ff",
                 "/v1/realtime?intent=transcription&stream=a%c3"):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(base + path):
                pass
        response = refused.value.response
        assert response.status_code == 400, path
        assert response.body == (b"the query is not UTF-8 once percent-decoded: "
                                 b"encode each character's UTF-8 bytes\n"), path
    # UTF-8 is taken; a blank item names no stream, as an empty one (every stream).
    for query, listed in (("?stream=%ef%bf%bd", ["\ufffd"]), ("?stream=%20", ["\ufffd"])):
        async with connect(f"{base}/v1/captions{query}") as ws:
            assert json.loads(await ws.recv())["streams"] == listed
    for s in engine.streams.values():
        await s.close()


def _caption(seq: int, text: str) -> CaptionEvent:
    return CaptionEvent(stream="load", segment=seq, seq=seq, final=True, text=text,
                        plain_text=text, stable=text, unstable="", tags=(), start=0.0,
                        end=1.0, latency=0.1)


async def test_subscriber_that_never_reads_is_dropped_and_others_get_everything() -> None:
    cfg = config(**{"server.subscriber_queue": 32})
    n_events = 3000
    text = "x" * 2000
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        stuck = await asyncio.to_thread(raw_ws_handshake, server.port)
        received = 0

        async with connect(f"ws://127.0.0.1:{server.port}/v1/captions") as good:
            await good.recv()  # hello

            async def read_all() -> None:
                nonlocal received
                while received < n_events:
                    json.loads(await good.recv())
                    received += 1

            reader = asyncio.ensure_future(read_all())
            while server.broadcaster.subscribers < 2:
                await asyncio.sleep(0.01)
            for seq in range(1, n_events + 1):
                server.broadcaster.publish(_caption(seq, text))
                # Pace the publisher to the good subscriber, never to the stuck one.
                while seq - received > 16:
                    await asyncio.sleep(0.001)
            await asyncio.wait_for(reader, 30)
        assert received == n_events
        assert server.broadcaster.dropped_subscribers == 1
        # The stuck client's connection was closed by the server.
        stuck.setblocking(False)
        await asyncio.sleep(0.5)
        drained, closed = 0, False
        for _ in range(2000):
            try:
                chunk = stuck.recv(65536)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            drained += len(chunk)
        stuck.close()
        assert closed, f"server kept the slow subscriber open ({drained} bytes read)"


async def test_a_stalled_subscriber_that_reads_again_gets_a_prefix_then_1013() -> None:
    """docs/protocol.md: a subscriber dropped as too slow that reads again
    soon gets what was sent to it, in order and from the first, then close
    1013; nothing published after it fell behind (its queue full) reaches it."""
    cfg = config(**{"server.subscriber_queue": 16})
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        stuck = await asyncio.to_thread(raw_ws_handshake, server.port)
        try:
            while server.broadcaster.subscribers < 1:
                await asyncio.sleep(0.01)
            seq = 0
            while server.broadcaster.dropped_subscribers == 0:
                seq += 1
                server.broadcaster.publish(_caption(seq, "z" * 5000))
                await asyncio.sleep(0)
            got, code = await asyncio.to_thread(read_slowly, stuck, 0)
        finally:
            stuck.close()
    assert code == 1013
    seqs = [m["seq"] for m in got if m["type"] == "caption"]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < seq


async def test_a_subscriber_that_talks_gets_an_error_and_stays(
    served: tuple[Engine, CaptionServer],
) -> None:
    engine, server = served
    async with connect(f"ws://127.0.0.1:{server.port}/v1/captions") as ws:
        await ws.recv()
        await ws.send("{not json")
        err = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert err["type"] == "error" and err["code"] == "unexpected_message"
        assert err["message"] == "/v1/captions takes no messages, got '{not json'"
        # A long one is quoted cut, and says so, as every codec error does.
        await ws.send("x" * 1000)
        err = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert err["message"].endswith(", got '" + "x" * 59 + "...")
        engine.open_stream("later", source="test")
        started = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert started["type"] == "stream.started"
        for s in engine.streams.values():
            await s.close()
    async with connect(f"ws://127.0.0.1:{server.port}/v1/captions?since=x") as ws:
        err = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert err["code"] == "bad_query"
    # A bare SEQ names no stream without ?stream= (docs/protocol.md, bad_query),
    # and says so in the protocol's words: --stream is a client's flag.
    async with connect(f"ws://127.0.0.1:{server.port}/v1/captions?since=5") as ws:
        err = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert err["code"] == "bad_query"
        assert err["message"] == "since=SEQ needs ?stream=ID (or use STREAM:SEQ)"
    async with connect(f"ws://127.0.0.1:{server.port}/v1/captions?stream=a&since=b:5") as ws:
        err = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert err["code"] == "bad_query" and "(?stream=ID)" in err["message"]


async def test_a_second_config_is_bad_message_whatever_it_holds(
    served: tuple[Engine, CaptionServer],
) -> None:
    """docs/protocol.md: a second ``config`` is ``bad_message`` and the
    stream goes on. One with a bad value used to get ``bad_config`` instead,
    the code the table says closes the connection (1008), which it did not."""
    _, server = served
    async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream=twice") as ws:
        await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
        assert json.loads(await ws.recv())["type"] == "ingest.ready"
        for again in ({"sample_rate": 16000}, {"sample_rate": 1}, {"format": "mp3"}):
            await ws.send(json.dumps({"type": "config", **again}))
        await ws.send(json.dumps({"type": "end"}))
        messages = []
        while (m := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] \
                != "ingest.summary":
            messages.append(m)
    assert [m["code"] for m in messages if m["type"] == "error"] == ["bad_message"] * 3
    assert ws.close_code == 1000


async def test_readyz_and_metrics(served: tuple[Engine, CaptionServer]) -> None:
    engine, server = served
    assert await http_get(f"http://127.0.0.1:{server.port}/readyz") == (200, "ready\n")
    stream = engine.open_stream("m", source="test")
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    await feed_samples(stream, audio, 1600, realtime=False)
    status, body = await http_get(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200
    from prometheus_client.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(body)}
    assert any("latency" in n for n in names), names


async def test_a_subscriber_vanishing_mid_send_affects_no_one_else() -> None:
    cfg = config(**{"server.subscriber_queue": 4096})
    n_events = 400
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        vanisher = await asyncio.to_thread(raw_ws_handshake, server.port)
        async with connect(f"ws://127.0.0.1:{server.port}/v1/captions") as good:
            await good.recv()
            while server.broadcaster.subscribers < 2:
                await asyncio.sleep(0.01)
            for seq in range(1, n_events + 1):
                server.broadcaster.publish(_caption(seq, "y" * 500))
                if seq == n_events // 2:
                    # Gone without a close frame, in the middle of the stream.
                    vanisher.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    vanisher.close()
                await asyncio.sleep(0)
            got = [json.loads(await asyncio.wait_for(good.recv(), 10))["seq"]
                   for _ in range(n_events)]
        assert got == list(range(1, n_events + 1))
        for _ in range(100):
            if server.broadcaster.subscribers == 0:
                break
            await asyncio.sleep(0.05)
        assert server.broadcaster.subscribers == 0, "the vanished subscriber was cleaned up"


async def _shutdown_with_a_slow_subscriber(
    read_delay_s: float | None, **overrides: object,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int | None, float]:
    """Streams whose open segments the engine's drain turns into finals
    while a subscriber reads nothing, so many of them are still in flight
    (in its queue) when the server's close begins. It then reads 4 KiB every
    ``read_delay_s`` (None: never again). Gives what the engine produced
    and what the subscriber got (finals and ``stream.ended``), its close
    code, and how long the server's close took."""
    cfg = config(**overrides)
    text = "word " * 800
    produced: list[dict[str, Any]] = []
    async with Engine(cfg, ScriptedBackend(lambda a: text)) as engine:
        server = CaptionServer(engine, cfg.server)
        await server.start()
        sock = await asyncio.to_thread(raw_ws_handshake, server.port)
        try:
            while server.broadcaster.subscribers < 1:
                await asyncio.sleep(0.01)
            # A slow link: the kernel's send buffer, which autotunes to
            # megabytes on loopback, held small as on a congested network.
            (conn,) = server._live
            conn.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            engine.add_listener(lambda e: produced.append(json.loads(encode_event(e))))
            speech = to_int16(buzz(1.0))
            for i in range(40):
                engine.open_stream(f"s{i}", source="test").push(speech)
            assert await engine.drain()
            (sub,) = server.broadcaster._subs
            assert sub.queue.qsize() > 10, "nothing left in flight: the test shows nothing"
            assert server.broadcaster.dropped_subscribers == 0
            got, code, took = await close_while_reading(server.aclose, sock, read_delay_s)
        finally:
            sock.close()
    wanted = {"caption", "stream.ended"}
    return ([m for m in produced if m["type"] in wanted and m.get("final", True)],
            [m for m in got if m["type"] in wanted and m.get("final", True)], code, took)


async def test_a_slow_subscriber_gets_every_final_and_stream_ended_before_the_shutdown(
) -> None:
    """docs/protocol.md: at shutdown a subscriber within its queue gets the
    drained finals and ``stream.ended`` before 1001. The server used to close
    it right after the drain, dropping what its queue still held."""
    produced, got, code, took = await _shutdown_with_a_slow_subscriber(0.002)
    assert len(produced) == 80
    assert got == produced
    assert code == 1001
    # Read in well under the time the server waits for a subscriber's queue.
    assert took < config().server.shutdown_flush_s + 3


async def test_a_stalled_subscriber_does_not_hold_the_shutdown_up() -> None:
    """A subscriber that stopped reading with its buffers full blocked the
    server's close frame, and the close waited for the keepalive (20 s),
    past ``docker stop``'s 10 s grace."""
    _, _, _, took = await _shutdown_with_a_slow_subscriber(
        None, **{"server.shutdown_flush_s": 0.5})
    # The wait for its queue, the close handshake's 2 s and a second more,
    # then it is aborted.
    assert 0.5 <= took < 0.5 + CLOSE_TIMEOUT_S + 1 + 2
