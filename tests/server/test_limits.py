"""Server limits over real sockets: speed, idleness, dead peers, stream count, bad UTF-8."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect
from websockets.uri import parse_uri

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.server import app as app_module
from evoxtral_stream.server.app import CaptionServer
from evoxtral_stream.server.auth import IngestRate, StreamSlots
from evoxtral_stream.server.protocol import MAX_LOST_S, IngestFormat, decode_audio_frame
from tests.fakes import ScriptedBackend
from tests.helpers.audio import buzz

SECOND = b"\0\0" * 16000  # one second of 16 kHz PCM16 silence


def test_ingest_rate_is_a_bucket_of_audio_seconds() -> None:
    rate = IngestRate(max_speed=4.0, burst_s=2.0, now=0.0)
    assert rate.take(2.0, 0.0)          # the burst, at once
    assert not rate.take(0.5, 0.0)      # nothing left
    rate = IngestRate(4.0, 2.0, 0.0)
    # Exactly 4x real time for a minute never trips it.
    assert all(rate.take(0.4, t / 10) for t in range(600))
    assert not rate.take(3.0, 60.0)
    # A long quiet spell refills only up to the burst.
    rate = IngestRate(4.0, 1.0, 0.0)
    assert rate.take(1.0, 1000.0) and not rate.take(0.1, 1000.0)
    assert IngestRate(0.0, 0.0, 0.0).take(1e9, 0.0)  # 0 disables it


def test_stream_slots_count_reserved_and_open() -> None:
    slots = StreamSlots(2)
    assert slots.reserve("a", {"mic"}) is None
    assert slots.reserve("a", set()) == "stream_busy"
    assert slots.reserve("mic", {"mic"}) == "stream_busy"
    assert slots.reserve("b", {"mic"}) == "too_many_streams"
    assert slots.check({"a"}) is None          # "a" reserved and open counts once
    assert slots.reserved("a") and not slots.reserved("mic")
    slots.release("a")
    assert slots.reserve("b", {"mic"}) is None


@asynccontextmanager
async def running(**overrides: object) -> AsyncIterator[CaptionServer]:
    cfg = load_config(overrides={"server.port": 0, **overrides}, env={})
    async with Engine(cfg, ScriptedBackend(lambda a: "hi")) as engine, \
            CaptionServer(engine, cfg.server) as server:
        yield server


@asynccontextmanager
async def ingesting(server: CaptionServer, stream: str) -> AsyncIterator[ClientConnection]:
    async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream={stream}") as ws:
        await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
        assert json.loads(await ws.recv())["type"] == "ingest.ready"
        yield ws


async def until_closed(ws: ClientConnection, timeout: float = 15) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        while True:
            out.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    except ConnectionClosed:
        return out


async def test_too_fast_ingest_is_closed() -> None:
    async with running(**{"server.max_ingest_speed": 2.0, "server.ingest_burst_s": 1.0}) \
            as server, ingesting(server, "fast") as ws:
        try:
            for _ in range(3):
                await ws.send(SECOND)
        except ConnectionClosed:
            pass
        messages = await until_closed(ws)
        errors = [m for m in messages if m["type"] == "error"]
        assert [e["code"] for e in errors] == ["too_fast"]
        assert "server.max_ingest_speed" in errors[0]["message"]
        assert ws.close_code == 1008


async def test_lost_audio_past_its_allowance_is_too_fast() -> None:
    """One outage of up to MAX_LOST_S may be declared at once (a client back
    after a server restart); more lost audio right after it is refused, as
    audio pushed too fast is."""
    async with running(**{"server.max_ingest_speed": 2.0}) as server, \
            connect(f"ws://127.0.0.1:{server.port}/v1/captions?stream=lossy") as watcher:
        await watcher.recv()  # hello
        async with ingesting(server, "lossy") as ws:
            await ws.send(SECOND)
            await ws.send(json.dumps({"type": "lost", "samples": 16000 * MAX_LOST_S}))
            await ws.send(json.dumps({"type": "lost", "samples": 16000 * 30}))
            messages = await until_closed(ws)
        errors = [m for m in messages if m["type"] == "error"]
        assert [e["code"] for e in errors] == ["too_fast"]
        assert "lost audio" in errors[0]["message"]
        assert "server.max_ingest_speed" in errors[0]["message"]
        assert ws.close_code == 1008
        # The first was filled in: the stream's timeline holds it.
        while (ended := json.loads(await asyncio.wait_for(watcher.recv(), 15)))["type"] \
                != "stream.ended":
            pass
        assert ended["duration"] == pytest.approx(1 + MAX_LOST_S, abs=0.01)


async def test_ingest_within_the_speed_limit_is_fine() -> None:
    async with running(**{"server.max_ingest_speed": 4.0, "server.ingest_burst_s": 0.5}) \
            as server, ingesting(server, "paced") as ws:
        for _ in range(8):                          # 2 s of audio in about 1 s
            await ws.send(SECOND[: len(SECOND) // 4])
            await asyncio.sleep(0.125)
        await ws.send(json.dumps({"type": "end"}))
        messages = await until_closed(ws)
        assert messages[-1]["type"] == "ingest.summary"
        assert not [m for m in messages if m["type"] == "error"]
        assert ws.close_code == 1000


async def test_idle_ingest_is_flushed_and_closed() -> None:
    async with running(**{"server.idle_timeout_s": 1.0}) as server, \
            ingesting(server, "quiet") as ws:
        loop = asyncio.get_running_loop()
        await ws.send(SECOND)
        t0 = loop.time()
        messages = await until_closed(ws)
        assert 0.3 < loop.time() - t0 < 8
        assert [m["type"] for m in messages][-2:] == ["stream.ended", "error"]
        assert messages[-1]["code"] == "idle_timeout" and messages[-1]["stream"] == "quiet"
        assert ws.close_code == 1008


@pytest.mark.parametrize(("message", "every_s"), [
    (b"", 0.2),                                         # empty binary: no audio
    (b"", 0.01),                                        # and faster than a late read
    (json.dumps({"type": "lost", "samples": 0}), 0.01),  # declared loss: no audio
], ids=["empty", "empty-fast", "lost-fast"])
async def test_messages_without_audio_do_not_keep_an_ingest_from_idling(
        message: str | bytes, every_s: float) -> None:
    """A client that sends only messages that hold no audio (empty binary
    frames, ``lost`` messages) is idle: it is flushed and closed with
    idle_timeout, however often it sends them."""
    async with running(**{"server.idle_timeout_s": 1.0}) as server, \
            ingesting(server, "muted") as ws:
        loop = asyncio.get_running_loop()
        await ws.send(SECOND)
        t0 = loop.time()

        async def keep_sending() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await ws.send(message)
                    await asyncio.sleep(every_s)

        sender = asyncio.ensure_future(keep_sending())
        try:
            messages = await until_closed(ws, timeout=10)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        assert 0.3 < loop.time() - t0 < 8
        assert [m["type"] for m in messages][-2:] == ["stream.ended", "error"]
        assert messages[-1]["code"] == "idle_timeout"
        assert ws.close_code == 1008


async def test_audio_that_arrived_while_the_server_was_busy_is_not_idleness(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The process was busy for longer than idle_timeout_s while it handled a
    # message (its event loop starved: the model thread, a loaded machine),
    # and the client kept sending: the audio waiting in the socket is read,
    # not refused with idle_timeout because the clock ran out before the
    # server could look (Python 3.11's wait_for(…, 0) gives up unlooked).
    go, sent = threading.Event(), threading.Event()
    real = decode_audio_frame

    def busy_once(data: bytes, fmt: IngestFormat) -> Any:
        if not go.is_set():
            go.set()
            assert sent.wait(10)
            time.sleep(1.5)  # on the event loop: nothing else runs
        return real(data, fmt)

    monkeypatch.setattr(app_module, "decode_audio_frame", busy_once)
    async with running(**{"server.idle_timeout_s": 1.0}) as server:
        url = f"ws://127.0.0.1:{server.port}/v1/ingest?stream=busy"
        messages: list[dict[str, Any]] = []
        close: list[int | None] = []

        def client() -> None:
            with sync_connect(url) as ws:
                ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
                messages.append(json.loads(ws.recv(10)))
                ws.send(SECOND[:16000])
                assert go.wait(10)
                for _ in range(3):
                    ws.send(SECOND[:3200])
                sent.set()
                ws.send(json.dumps({"type": "end"}))
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        messages.append(json.loads(ws.recv(15)))
                close.append(ws.close_code)

        worker = threading.Thread(target=client, daemon=True)
        worker.start()
        await asyncio.to_thread(worker.join, 30)
        assert not worker.is_alive()
        assert messages[0]["type"] == "ingest.ready"
        assert [m["code"] for m in messages if m["type"] == "error"] == []
        assert messages[-1]["type"] == "ingest.summary"
        assert messages[-1]["duration"] == pytest.approx(0.8)
        assert close == [1000]


async def test_max_streams_is_enforced() -> None:
    async with running(**{"server.max_streams": 1}) as server:
        base = f"ws://127.0.0.1:{server.port}"
        async with ingesting(server, "one") as first:
            async with connect(f"{base}/v1/ingest?stream=two") as second:
                err = json.loads(await asyncio.wait_for(second.recv(), 10))
                assert err["type"] == "error" and err["code"] == "too_many_streams"
                assert "server.max_streams" in err["message"]
                await asyncio.wait_for(second.wait_closed(), 10)
                assert second.close_code == 1008
            async with connect(f"{base}/v1/realtime?intent=transcription") as rt:
                err = json.loads(await asyncio.wait_for(rt.recv(), 10))
                assert err["type"] == "error" and err["error"]["code"] == "too_many_streams"
            await first.send(json.dumps({"type": "end"}))
            await until_closed(first)
        async with ingesting(server, "two") as again:   # the slot came back
            await again.send(json.dumps({"type": "end"}))
            assert (await until_closed(again))[-1]["type"] == "ingest.summary"


async def test_invalid_utf8_closes_only_that_connection() -> None:
    async with running() as server, ingesting(server, "bad") as bad, \
            ingesting(server, "good") as good:
        # websockets itself fails a text frame that is not UTF-8 (close 1007),
        # before the server sees a message; documented in docs/protocol.md.
        await bad.send(b"\xff\xfe{}", text=True)
        await until_closed(bad)
        assert bad.close_code == 1007
        await good.send(SECOND)
        await good.send(json.dumps({"type": "end"}))
        messages = await until_closed(good)
        assert messages[-1]["type"] == "ingest.summary" and good.close_code == 1000


async def _vanishing_ingest(port: int, stream: str, audio: bytes) -> asyncio.StreamWriter:
    """An ingest client that sends ``audio`` and then goes silent without
    closing: it never reads again, so it answers no ping (a peer whose network
    vanished). Returns the writer so the test decides when the socket goes."""
    proto = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/v1/ingest?stream={stream}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    proto.send_request(proto.connect())
    writer.write(b"".join(proto.data_to_send()))
    while proto.handshake_exc is None and proto.state.name == "CONNECTING":
        proto.receive_data(await asyncio.wait_for(reader.read(4096), 10))
    assert proto.handshake_exc is None, proto.handshake_exc
    proto.send_text(json.dumps({"type": "config", "sample_rate": 16000}).encode())
    proto.send_binary(audio)
    writer.write(b"".join(proto.data_to_send()))
    await writer.drain()
    return writer


async def test_a_peer_that_vanishes_is_pinged_out_and_its_open_segment_flushed() -> None:
    async with running(**{"server.ping_interval_s": 1.0, "server.ping_timeout_s": 1.0,
                          "server.idle_timeout_s": 0}) as server, \
            connect(f"ws://127.0.0.1:{server.port}/v1/captions") as sub:
        assert json.loads(await sub.recv())["type"] == "hello"
        speech = (buzz(1.0) * 32767).astype("<i2").tobytes()   # speech, still open
        writer = await _vanishing_ingest(server.port, "gone", speech)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["type"] != "stream.ended":
            seen.append(json.loads(await asyncio.wait_for(sub.recv(), 15)))
        # Found out by the missing pong, not by a TCP close: the socket is still open.
        assert not writer.is_closing()
        assert loop.time() - t0 < 10
        finals = [m for m in seen if m["type"] == "caption" and m["final"]]
        assert [(m["stream"], m["text"]) for m in finals] == [("gone", "hi")]
        writer.close()


async def test_audio_still_arriving_while_the_engine_drains_is_dropped_quietly(
        caplog: pytest.LogCaptureFixture) -> None:
    """Shutdown closes the streams while peers may still be sending: their
    frames go nowhere, their finals still come, no handler fails, and a new
    ingest is turned away with shutting_down."""
    cfg = load_config(overrides={"server.port": 0}, env={})
    speech = (buzz(0.1, rate=48_000) * 32767).astype("<i2").tobytes()
    async with Engine(cfg, ScriptedBackend(lambda a: "hi")) as engine, \
            CaptionServer(engine, cfg.server) as server:
        base = f"ws://127.0.0.1:{server.port}/v1/ingest"
        ws = await connect(f"{base}?stream=live")
        await ws.send(json.dumps({"type": "config", "sample_rate": 48000}))
        for _ in range(10):
            await ws.send(speech)
        await asyncio.sleep(0.3)
        assert await engine.drain() is True
        for _ in range(10):                       # the peer has not noticed yet
            await ws.send(speech)
        async with connect(f"{base}?stream=late") as late:
            await late.send(json.dumps({"type": "config", "sample_rate": 16000}))
            refused = await until_closed(late)
            assert [m["code"] for m in refused if m["type"] == "error"] == ["shutting_down"]
            assert late.close_code == 1001
    messages = await until_closed(ws)
    assert ws.close_code == 1001                  # the server went away
    finals = [m for m in messages if m["type"] == "caption" and m["final"]]
    assert [m["text"] for m in finals] == ["hi"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
