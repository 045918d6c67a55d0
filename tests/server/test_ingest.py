"""Audio ingest and resume over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from evoxtral_stream.audio.resample import int16_to_float32, resample
from evoxtral_stream.config import Config, load_config
from evoxtral_stream.engine.backends.base import Backend
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.engine.session import StreamSession
from evoxtral_stream.events import SAMPLE_RATE, CaptionEvent, DecodeRequest, RequestKind
from evoxtral_stream.server.app import CaptionServer
from tests.docs_schema import validate_message
from tests.fakes import (
    AdapterScriptedBackend,
    GatedSource,
    LanguageScriptedBackend,
    ScriptedBackend,
    words_so_far,
)
from tests.helpers.http import (
    answer_close,
    client_binary_frame,
    client_text_frame,
    close_code_of,
    drain,
    raw_ws_handshake,
    read_slowly,
    send_until_closed,
)
from tests.speech import have_espeak, speech_with_pauses
from tests.text_norm import loose_wer

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")

SENTENCES = ["Good evening and welcome to the live captioning demo.",
             "Thank you for listening, and have a wonderful night."]


def config(**overrides: object) -> Config:
    return load_config(overrides={"server.port": 0, **overrides})



@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Engine, CaptionServer]]:
    cfg = config(**{"server.history": 1000})
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        yield engine, server


async def recv_json(ws: ClientConnection, timeout: float = 20) -> dict[str, Any]:
    return validate_message(json.loads(await asyncio.wait_for(ws.recv(), timeout)))


async def until_closed(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every message until the server closes the connection."""
    out: list[dict[str, Any]] = []
    try:
        while True:
            out.append(await recv_json(ws))
    except ConnectionClosed:
        return out


async def until_ended(ws: ClientConnection) -> list[dict[str, Any]]:
    """The messages up to and including the next ``stream.ended`` (at least one)."""
    got = [await recv_json(ws)]
    while got[-1]["type"] != "stream.ended":
        got.append(await recv_json(ws))
    return got


async def next_error(ws: ClientConnection) -> dict[str, Any]:
    """Skip the stream's own events until an error arrives."""
    while (msg := await recv_json(ws))["type"] != "error":
        pass
    return msg


async def send_audio(ws: ClientConnection, data: bytes, chunk: int = 8192,
                     bytes_per_s: float | None = None) -> None:
    """Send ``data`` in chunks, paced to ``bytes_per_s`` when given."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i in range(0, len(data), chunk):
        await ws.send(data[i:i + chunk])
        if bytes_per_s:
            await asyncio.sleep(max(0.0, t0 + (i + chunk) / bytes_per_s - loop.time()))
        else:
            await asyncio.sleep(0)


async def ingest(port: int, stream: str, fmt: dict[str, Any], data: bytes,
                 speed: float | None = None) -> list[dict[str, Any]]:
    """Run one ingest session to its summary; return everything received."""
    async with connect(f"ws://127.0.0.1:{port}/v1/ingest?stream={stream}") as ws:
        await ws.send(json.dumps({"type": "config", **fmt}))
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ingest.ready" and ready["stream"] == stream
        width = 4 if fmt.get("format") == "float32" else 2
        rate = None if speed is None else (
            speed * fmt["sample_rate"] * fmt.get("channels", 1) * width)
        sender = asyncio.ensure_future(send_audio(ws, data, bytes_per_s=rate))
        received: list[dict[str, Any]] = []
        await sender
        await ws.send(json.dumps({"type": "end"}))
        while True:
            try:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
            except ConnectionClosed:
                break
            received.append(msg)
        assert ws.close_code == 1000
        return received


def finals_text(messages: list[dict[str, Any]]) -> str:
    finals = [m for m in messages if m["type"] == "caption" and m["final"]]
    return " ".join(m["text"] for m in sorted(finals, key=lambda m: m["segment"]))


async def test_ingest_two_formats_produce_the_words(whisper_backend: Backend) -> None:
    cfg = config()
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.2)
    # 44.1 kHz stereo float32, and 24 kHz mono PCM16.
    f44 = resample(int16_to_float32(audio), SAMPLE_RATE, 44100)
    stereo = np.stack([f44, f44 * 0.5], axis=1).astype("<f4").tobytes()
    pcm24 = resample(audio, SAMPLE_RATE, 24000).astype("<i2").tobytes()
    async with Engine(cfg, whisper_backend) as engine, \
            CaptionServer(engine, cfg.server) as server:
        a, b = await asyncio.gather(
            ingest(server.port, "float44", {"sample_rate": 44100, "channels": 2,
                                            "format": "float32"}, stereo, speed=1.5),
            ingest(server.port, "pcm24", {"sample_rate": 24000, "format": "pcm16"}, pcm24,
                   speed=1.5),
        )
    for messages in (a, b):
        summary = messages[-1]
        assert summary["type"] == "ingest.summary" and summary["finals"] == 2
        assert abs(summary["duration"] - len(audio) / SAMPLE_RATE) < 0.1
        text = finals_text(messages)
        assert loose_wer(" ".join(SENTENCES), text) <= 0.25, text
        # Fed at 1.5x real time, the one model thread still fits in partials.
        assert any(m["type"] == "caption" and not m["final"] for m in messages)


@pytest.mark.parametrize(("first", "code"), [
    (b"\x00\x01", "not_configured"),
    ("{not json", "bad_json"),
    ("[" * 100_000, "bad_json"),                                   # nested past recursion
    ('{"type": "config", "sample_rate": ' + "1" * 5000 + "}", "bad_json"),  # int digit limit
    (json.dumps({"type": "config", "sample_rate": 7}), "bad_config"),
    (json.dumps({"type": "config", "sample_rate": 16000, "format": "mp3"}), "bad_config"),
    (json.dumps({"type": "config", "sample_rate": 16000, "progress": "yes"}), "bad_config"),
    (json.dumps({"type": "config", "sample_rate": 16000, "progress": 1}), "bad_config"),
    (json.dumps({"type": "hello"}), "bad_message"),
    (json.dumps({"type": "lost", "samples": 160}), "not_configured"),
])
async def test_bad_first_message_gets_error_then_close(
    scripted: tuple[Engine, CaptionServer], first: str | bytes, code: str,
) -> None:
    _, server = scripted
    async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream=x") as ws:
        await ws.send(first)
        err = await recv_json(ws)
        assert err["type"] == "error" and err["code"] == code
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008


@pytest.mark.parametrize(("query", "why"), [
    ("a" * 129, "a stream id has 1 to 128 characters, got 129"),
    ("line%0Abreak", "a stream id holds no control characters, got 'line\\nbreak'"),
    ("studio%E2%80%AE1", "a stream id holds no invisible format characters (bidi controls, "
                         "zero-width spaces...), got 'studio\\u202e1'"),
    ("a%2Cb", "a stream id holds no comma (stream lists are comma-separated), got 'a,b'"),
    ("%20talk", "a stream id neither begins nor ends with white space (stream lists trim "
                "it), got ' talk'"),
])
async def test_an_unusable_stream_id_is_refused(
    scripted: tuple[Engine, CaptionServer], query: str, why: str,
) -> None:
    engine, server = scripted
    async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream={query}") as ws:
        err = await recv_json(ws)
        assert (err["code"], err["message"].split(":")[0]) == ("bad_query", why.split(":")[0])
        assert err["message"].startswith(why)
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008
    assert engine.streams == {}
    # The longest usable id works.
    messages = await ingest(server.port, "b" * 128, {"sample_rate": 16000},
                            speech_with_pauses(SENTENCES[:1], 0.8)[0].astype("<i2").tobytes())
    assert any(m["type"] == "caption" and m["final"] for m in messages)


async def test_misbehaving_ingest_keeps_its_finals_and_spares_other_streams(
    scripted: tuple[Engine, CaptionServer],
) -> None:
    engine, server = scripted
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.2)
    pcm = audio.astype("<i2").tobytes()
    async with connect(f"ws://127.0.0.1:{server.port}/v1/captions?stream=bad") as watcher:
        await watcher.recv()  # hello
        good = asyncio.ensure_future(ingest(server.port, "good",
                                            {"sample_rate": 16000}, pcm))
        async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream=bad") as ws:
            await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
            await ws.recv()  # ready
            await send_audio(ws, pcm[: len(pcm) // 2 // 2 * 2])
            await ws.send("{oops")                       # recoverable: error, go on
            assert (await next_error(ws))["code"] == "bad_json"
            await ws.send("[" * 100_000)                 # so is JSON nested too deep
            assert (await next_error(ws))["code"] == "bad_json"
            await ws.send(b"\x00\x01\x02")               # odd length: fatal
            codes = [m["code"] for m in await until_closed(ws) if m["type"] == "error"]
            assert codes == ["odd_length"] and ws.close_code == 1008
        # The audio received before the fault still became a final.
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["type"] != "stream.ended":
            seen.append(await recv_json(watcher))
        assert any(m["type"] == "caption" and m["final"] for m in seen)
        good_messages = await good
    assert good_messages[-1]["finals"] == 2
    assert "bad" not in engine.streams


async def test_an_ingest_client_behind_on_its_own_events_is_closed_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As a slow subscriber is: once it falls ``server.subscriber_queue``
    events behind, its stream ends and it is closed with 1013, not only
    once it ends its audio."""
    from evoxtral_stream.server import app

    # The 1013 comes behind the megabytes the server still holds for the
    # client, and the 2 s close handshake cut a reader a loaded machine held
    # back before it read that far. The client answers the close, so a long
    # handshake costs nothing.
    monkeypatch.setattr(app, "CLOSE_TIMEOUT_S", 60.0)
    cfg = config(**{"server.subscriber_queue": 8})
    text = "x" * 2000
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        deaf = await asyncio.to_thread(raw_ws_handshake, server.port, "/v1/ingest?stream=deaf")
        try:
            deaf.sendall(client_text_frame(json.dumps({"type": "config", "sample_rate": 16000})))
            async with asyncio.timeout(30):
                while "deaf" not in engine.streams:
                    await asyncio.sleep(0.01)
                # The client reads nothing: the stream's events pile up.
                seq = 0
                while "deaf" in engine.streams:
                    seq += 1
                    server.broadcaster.publish(CaptionEvent(
                        stream="deaf", segment=seq, seq=seq, final=True, text=text,
                        plain_text=text, stable=text, unstable="", tags=(), start=0.0,
                        end=1.0, latency=0.1))
                    await asyncio.sleep(0)
            assert server.broadcaster.dropped_subscribers == 1
            _, code = await asyncio.to_thread(read_slowly, deaf, 0)
            assert code == 1013
        finally:
            deaf.close()


async def test_an_ingest_client_still_sending_ends_its_too_slow_close_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/protocol.md: what a client closed 1013 still sends is read and
    dropped, so its answer to the close ends the connection as soon as it
    comes. An ingest client falls behind on its events while it streams
    audio; once the server stops reading it, websockets stops reading the
    socket after max_queue messages, and the answer behind them went
    unread: the close waited out its handshake (here 60 s) and the abort."""
    from evoxtral_stream.server import app

    monkeypatch.setattr(app, "CLOSE_TIMEOUT_S", 60.0)
    # No speed limit: the client sends as fast as the socket takes it, which
    # here must end in 1013, not in too_fast's 1008.
    cfg = config(**{"server.subscriber_queue": 8, "server.max_ingest_speed": 0})
    audio = client_binary_frame(bytes(3200))  # 100 ms of silence
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        deaf = await _deaf_ingest(engine, server, "deaf")

        def stream_audio() -> None:
            # Until the stream is closed, then a second more while the close
            # runs: a client learns of it only once it reads that far.
            send_until_closed(deaf, audio, lambda: "deaf" in engine.streams,
                              time.monotonic() + 30)
            send_until_closed(deaf, audio, lambda: True, time.monotonic() + 1)

        try:
            sending = asyncio.ensure_future(asyncio.to_thread(stream_audio))
            async with asyncio.timeout(30):
                while "deaf" in engine.streams:  # it reads none of them
                    _flood(server, "deaf")
                    await asyncio.sleep(0.05)
            await sending
            assert server.broadcaster.dropped_subscribers == 1
            assert await answer_close(deaf, lambda: bool(server._live), 15) == 1013
        finally:
            deaf.close()


async def test_an_ingest_client_too_fast_ends_its_close_at_once_while_it_sends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/protocol.md: what a client closed after a fatal error still sends
    is read and dropped. A client too fast is still sending when it is closed
    1008 (too_fast): its answer to the close came behind what nothing read
    any more, and the close waited out its handshake (here 60 s)."""
    from evoxtral_stream.server import app

    monkeypatch.setattr(app, "CLOSE_TIMEOUT_S", 60.0)  # before the server starts
    cfg = config(**{"server.max_ingest_speed": 2.0, "server.ingest_burst_s": 1.0})
    audio = client_binary_frame(bytes(3200))  # 100 ms of silence, sent unpaced
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        fast = await _deaf_ingest(engine, server, "fast")
        try:
            # Refused within its first 2 s of audio; it sends on for 2 s
            # (over 20 s of audio) before it reads what came.
            await asyncio.to_thread(send_until_closed, fast, audio, lambda: True,
                                    time.monotonic() + 2)
            assert await answer_close(fast, lambda: bool(server._live), 15) == 1008
            assert "fast" not in engine.streams
        finally:
            fast.close()


async def test_oversized_frame_is_refused_with_1009() -> None:
    cfg = config(**{"server.max_message_bytes": 4096})
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server, \
            connect(f"ws://127.0.0.1:{server.port}/v1/ingest") as ws:
        await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
        ready = json.loads(await ws.recv())
        assert ready["stream"].startswith("ingest-")
        await ws.send(b"\x00" * 6000)
        assert (await next_error(ws))["code"] == "too_large"
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1009


async def test_an_unnamed_stream_never_takes_an_id_open_or_numbered_before(
        tmp_path: Path) -> None:
    """The server names an unnamed ingest stream ingest-N. Not one a client
    holds open by name (it was refused as busy), nor one numbered before,
    here or in the journal (its captions would continue that stream's: after
    a restart the count starts at 1 again)."""
    cfg = config(**{"journal.enabled": True, "journal.dir": str(tmp_path / "j")})
    pcm = speech_with_pauses(SENTENCES[:1], pause_s=1.0)[0].astype("<i2").tobytes()
    url = "ws://127.0.0.1:{}/v1/ingest{}"

    async def unnamed(port: int, audio: bytes = b"") -> str:
        async with connect(url.format(port, "")) as ws:
            await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
            ready = await recv_json(ws)
            assert ready["type"] == "ingest.ready", ready
            await send_audio(ws, audio)
            await ws.send(json.dumps({"type": "end"}))
            await until_closed(ws)
        return str(ready["stream"])

    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        assert await unnamed(server.port, pcm) == "ingest-1"
        assert engine.last_seq("ingest-1") > 0
        async with connect(url.format(server.port, "?stream=ingest-2")) as held:
            await held.send(json.dumps({"type": "config", "sample_rate": 16000}))
            assert (await recv_json(held))["stream"] == "ingest-2"
            assert await unnamed(server.port) == "ingest-3"
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        # ingest-1 is journaled; ingest-2 and -3 never had a caption.
        assert await unnamed(server.port) == "ingest-2"


async def test_resume_after_disconnect_loses_no_final(
    scripted: tuple[Engine, CaptionServer],
) -> None:
    _, server = scripted
    audio, _ = speech_with_pauses(SENTENCES * 2, pause_s=1.2)
    pcm = audio.astype("<i2").tobytes()
    url = f"ws://127.0.0.1:{server.port}/v1/captions?stream=talk"
    first: list[dict[str, Any]] = []
    async with connect(url) as ws:
        await ws.recv()
        job = asyncio.ensure_future(ingest(server.port, "talk", {"sample_rate": 16000}, pcm))
        while sum(1 for m in first if m.get("final")) < 1:
            first.append(await recv_json(ws))
    # Disconnected while the stream goes on; come back with the last seq seen.
    last_seq = max(m["seq"] for m in first if m["type"] == "caption")
    await job
    async with connect(f"{url}&since={last_seq}") as ws:
        await ws.recv()
        rest: list[dict[str, Any]] = []
        while len([m for m in first + rest if m["type"] == "caption" and m["final"]]) < 4:
            rest.append(await recv_json(ws))
    seqs = [m["seq"] for m in first + rest if m["type"] == "caption"]
    assert seqs == list(range(1, len(seqs) + 1)), "every caption exactly once, in order"


async def test_resume_beyond_history_announces_a_gap() -> None:
    # Three finals, two captions kept (partials count too): the first is
    # always missing, whether partials took seqs too or (a busy machine,
    # audio sent at full speed) none was made.
    cfg = config(**{"server.history": 2})
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        audio, _ = speech_with_pauses([*SENTENCES, SENTENCES[0]], pause_s=1.2)
        await ingest(server.port, "talk", {"sample_rate": 16000},
                     audio.astype("<i2").tobytes())
        async with connect(f"ws://127.0.0.1:{server.port}/v1/captions?since=talk:0") as ws:
            await ws.recv()
            gap = await recv_json(ws)
            kept = [await recv_json(ws), await recv_json(ws)]
        assert gap["type"] == "gap" and gap["from"] == 1 and gap["to"] == kept[0]["seq"] - 1
        assert all(m["type"] == "caption" for m in kept) and kept[1]["final"]
        assert kept[1]["seq"] == kept[0]["seq"] + 1 and kept[0]["seq"] > 1
        async with connect(f"ws://127.0.0.1:{server.port}/v1/captions?since=nosuch:5") as ws:
            await ws.recv()
            unknown = await recv_json(ws)
        assert unknown == {"type": "gap", "stream": "nosuch", "from": 6, "to": None}
        assert engine.streams == {}


async def test_a_resume_from_0_of_a_stream_not_retained_gets_a_gap() -> None:
    """``since=STREAM:0`` (the resume point a gap to null leaves) of a stream
    that gave captions none of which is retained (``history = 0``, or its
    history evicted past ``history_streams``) used to get nothing at all:
    every caption of it skipped silently. It gets a gap naming them."""
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    pcm = audio.astype("<i2").tobytes()
    for overrides in ({"server.history": 0},
                      {"server.history": 5, "server.history_streams": 1}):
        cfg = config(**overrides)
        async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
                CaptionServer(engine, cfg.server) as server:
            await ingest(server.port, "talk", {"sample_rate": 16000}, pcm)
            await ingest(server.port, "other", {"sample_rate": 16000}, pcm)
            last = engine.last_seq("talk")
            assert last > 0
            async with connect(f"ws://127.0.0.1:{server.port}/v1/captions"
                               f"?since=talk:0") as ws:
                await recv_json(ws)
                assert await recv_json(ws, timeout=5) == {
                    "type": "gap", "stream": "talk", "from": 1, "to": last}, overrides
            # A seq past every one given is still of another numbering.
            async with connect(f"ws://127.0.0.1:{server.port}/v1/captions"
                               f"?since=talk:{last + 7}") as ws:
                await recv_json(ws)
                assert await recv_json(ws, timeout=5) == {
                    "type": "gap", "stream": "talk", "from": last + 8, "to": None}


async def test_a_resume_from_the_last_seq_of_a_stream_not_retained_gets_no_gap() -> None:
    """A client that holds the last seq of a stream none of whose captions is
    retained has missed nothing: it used to get a gap to null, which told it
    to forget that seq (the stream would be numbered anew) when it was not."""
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    pcm = audio.astype("<i2").tobytes()
    for overrides in ({"server.history": 0},
                      {"server.history": 5, "server.history_streams": 1}):
        cfg = config(**overrides)
        async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
                CaptionServer(engine, cfg.server) as server:
            await ingest(server.port, "talk", {"sample_rate": 16000}, pcm)
            await ingest(server.port, "other", {"sample_rate": 16000}, pcm)
            last = engine.last_seq("talk")
            # Resumes are answered in the order since= names them: what comes
            # before other's replay is all talk got.
            async with connect(f"ws://127.0.0.1:{server.port}/v1/captions"
                               f"?since=talk:{last},other:0") as ws:
                await recv_json(ws)
                talk = []
                while (got := await recv_json(ws, timeout=5))["stream"] != "other":
                    talk.append(got)
            assert [m["type"] for m in talk] == ["stream.ended"], (overrides, talk)


async def test_a_resume_of_an_ended_stream_not_retained_ends_with_its_end() -> None:
    """Without the journal, a stream whose captions are not retained (history
    0, or evicted past history_streams) lost its ``stream.ended`` with them: a
    client resuming after the end got the gap (to null) and never learnt the
    stream had ended, so one waiting for the end waited forever. It gets the
    gap to the last seq given, then the end, as for a retained stream."""
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    pcm = audio.astype("<i2").tobytes()
    for overrides in ({"server.history": 0},
                      {"server.history": 5, "server.history_streams": 1}):
        cfg = config(**overrides)
        async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
                CaptionServer(engine, cfg.server) as server:
            got = await ingest(server.port, "talk", {"sample_rate": 16000}, pcm)
            end = next(m for m in got if m["type"] == "stream.ended")
            await ingest(server.port, "other", {"sample_rate": 16000}, pcm)
            last = engine.last_seq("talk")
            for since in sorted({0, last - 1, last}):
                async with connect(f"ws://127.0.0.1:{server.port}/v1/captions"
                                   f"?since=talk:{since}") as ws:
                    await recv_json(ws)
                    replay = await until_ended(ws)
                gap = {"type": "gap", "stream": "talk", "from": since + 1, "to": last}
                assert replay == ([gap] if since < last else []) + [end], (overrides, since)


async def test_a_since_from_before_a_restart_gets_a_null_gap_then_all_there_is() -> None:
    """A server restarted without its journal numbers streams from 1 again: a
    resume with a seq it never gave says so (gap to null), then replays every
    retained caption, so a client that forgets its seq there misses nothing."""
    cfg = config()
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
        await ingest(server.port, "talk", {"sample_rate": 16000},
                     audio.astype("<i2").tobytes())
        async with connect(f"ws://127.0.0.1:{server.port}/v1/captions?since=talk:500") as ws:
            await ws.recv()
            replay = await until_ended(ws)
        assert replay[0] == {"type": "gap", "stream": "talk", "from": 501, "to": None}
        seqs = [m["seq"] for m in replay if m["type"] == "caption"]
        assert seqs == list(range(1, len(seqs) + 1)) and seqs
        for message in replay:
            validate_message(message)


async def test_a_since_past_every_seq_journaled_gets_a_null_gap_after_a_restart(
        tmp_path: Path) -> None:
    """With the journal on, after a restart (nothing retained) a resume with
    a seq past every one given the stream (of another numbering: a journal
    folder made anew, a stream pruned and forgotten) used to get the
    journal's ``stream.ended`` alone: the stream's captions skipped silently.
    It gets a gap to null, then the finals there are, as without it."""
    cfg = config(**{"journal.enabled": True, "journal.dir": str(tmp_path / "j")})
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        await ingest(server.port, "talk", {"sample_rate": 16000},
                     audio.astype("<i2").tobytes())
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        assert 0 < engine.last_seq("talk") < 500
        async with connect(f"ws://127.0.0.1:{server.port}/v1/captions?since=talk:500") as ws:
            await ws.recv()
            replay = await until_ended(ws)
        assert replay[0] == {"type": "gap", "stream": "talk", "from": 501, "to": None}
        finals = [m for m in replay if m["type"] == "caption"]
        assert finals and all(m["final"] for m in finals)


async def test_a_resume_from_the_journal_lets_other_clients_be_served_meanwhile(
        tmp_path: Path) -> None:
    """A resume read the journal on the event loop: one naming hundreds of
    journaled streams held every other client up meanwhile (300 streams of
    1000 finals: 2 s on a 2-core machine). It is read on a worker thread:
    while that read is held, another subscriber gets its hello; the resume
    then gets the journal's finals and the stream's end."""
    cfg = config(**{"journal.enabled": True, "journal.dir": str(tmp_path / "j")})
    async with _restarted_with_held_journal(cfg) as (_, gated, url):
        async with connect(f"{url}?since=talk:0") as resumed:
            assert await asyncio.to_thread(gated.entered.wait, 10)
            async with connect(url) as other:
                assert (await recv_json(other, timeout=10))["type"] == "hello"
            gated.release()
            assert (await recv_json(resumed))["type"] == "hello"
            replay = await until_ended(resumed)
        assert gated.released, "the read held the loop: the other client waited for it"
        finals = [m for m in replay if m["type"] == "caption"]
        assert finals and all(m["final"] for m in finals)


def _live(stream: str, segment: int, seq: int, final: bool) -> CaptionEvent:
    text = f"s{segment} at {seq}"
    return CaptionEvent(stream=stream, segment=segment, seq=seq, final=final, text=text,
                        plain_text=text, stable="" if not final else text,
                        unstable="" if final else text, tags=(), start=float(segment),
                        end=segment + 1.0, latency=0.1)


@contextlib.asynccontextmanager
async def _restarted_with_held_journal(
        cfg: Config, *gate: int) -> AsyncIterator[tuple[CaptionServer, GatedSource, str]]:
    """A first run leaves a journal of the stream ``talk`` (ended) in
    ``cfg``'s folder; then a server restarted on it, whose journal reads wait
    for :class:`GatedSource` (``gate``: its arguments after the source).
    Yields the server, the gate and the captions URL."""
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        await ingest(server.port, "talk", {"sample_rate": 16000},
                     audio.astype("<i2").tobytes())
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        assert server.broadcaster.source is not None
        gated = server.broadcaster.source = GatedSource(server.broadcaster.source, *gate)
        yield server, gated, f"ws://127.0.0.1:{server.port}/v1/captions"


async def test_live_events_during_a_journal_read_do_not_drop_the_resume_as_too_slow(
        tmp_path: Path) -> None:
    """The live events that came while a resume read the journal waited in
    the subscriber's queue of ``server.subscriber_queue``: a burst of them
    (a busy server just restarted) filled it and the subscriber was closed
    with 1013 as too slow before it could read anything, and again on every
    reconnect. Meanwhile the partials are coalesced (a later one of the same
    segment, or its final, replaces the earlier): the subscriber gets the
    hello, the replay, then every final and each open segment's newest
    partial, in order, and stays connected."""
    cfg = config(**{"journal.enabled": True, "journal.dir": str(tmp_path / "j"),
                    "server.subscriber_queue": 8})
    async with _restarted_with_held_journal(cfg, 10) as (server, gated, url):
        async with connect(f"{url}?since=talk:0") as resumed:
            assert await asyncio.to_thread(gated.entered.wait, 10)
            # 5 segments of 20 partials and a final, then 20 partials of a
            # sixth still open: 125 events through a queue of 8.
            seq, sent = 0, []
            for segment in range(6):
                for i in range(21 if segment < 5 else 20):
                    seq += 1
                    sent.append(_live("busy", segment, seq, final=i == 20))
                    server.broadcaster.publish(sent[-1])
            gated.release()
            assert (await recv_json(resumed))["type"] == "hello"
            replay = await until_ended(resumed)
            assert replay[-1]["stream"] == "talk"
            tail = [await recv_json(resumed) for _ in range(6)]
            # Live again, through the queue.
            server.broadcaster.publish(_live("busy", 5, seq + 1, final=True))
            last = await recv_json(resumed)
        assert resumed.close_code in (None, 1000), "dropped as too slow"
        assert server.broadcaster.dropped_subscribers == 0
        finals = [m for m in replay if m["type"] == "caption"]
        assert finals and all(m["final"] and m["stream"] == "talk" for m in finals)
        assert [(m["segment"], m["seq"], m["final"]) for m in tail] == [
            *((e.segment, e.seq, True) for e in sent if e.final), (5, seq, False)]
        assert (last["seq"], last["final"]) == (seq + 1, True)


async def test_a_resume_window_that_overflows_sends_what_it_holds_then_1013(
        tmp_path: Path) -> None:
    """docs/protocol.md: past ``server.resume_window`` live events during a
    journal read, the subscriber gets the replay and the events the window
    holds, in order, then close code 1013 (reason ``too many events during
    the resume``); its resume from the last seq it got then gets the rest,
    none missing."""
    cfg = config(**{"journal.enabled": True, "journal.dir": str(tmp_path / "j"),
                    "server.subscriber_queue": 8, "server.resume_window": 4})
    async with _restarted_with_held_journal(cfg, 10) as (server, gated, url):
        async with connect(f"{url}?since=talk:0") as resumed:
            assert await asyncio.to_thread(gated.entered.wait, 10)
            seq, finals = 0, []
            for segment in range(10):
                for i in range(4):
                    seq += 1
                    event = _live("busy", segment, seq, final=i == 3)
                    server.broadcaster.publish(event)
                finals.append(event.seq)
            gated.release()
            got = await until_closed(resumed)
        assert (resumed.close_code, resumed.close_reason) == (
            1013, "too many events during the resume")
        assert server.broadcaster.dropped_subscribers == 1
        assert got[0]["type"] == "hello"
        end = next(i for i, m in enumerate(got) if m["type"] == "stream.ended")
        assert all(m["stream"] == "talk" for m in got[1:end + 1])
        # The first four segments' finals (each replacing its partials).
        assert [(m["seq"], m["final"]) for m in got[end + 1:]] == [(s, True) for s in finals[:4]]
        async with connect(f"{url}?stream=busy&since=busy:{finals[3]}") as again:
            assert (await recv_json(again))["type"] == "hello"
            rest = [await recv_json(again) for _ in range(6 * 4)]
        assert [m["seq"] for m in rest] == list(range(finals[3] + 1, seq + 1))


async def test_a_since_of_another_epoch_is_not_taken_for_this_runs_seqs() -> None:
    """After a restart without the journal, the new numbering soon passes the
    seq a client holds: with the epoch it got that seq under, its resume gets
    a gap to null and the new run from seq 1, where a bare seq would skip it."""
    cfg = config()
    url = "ws://127.0.0.1:{}/v1/captions?since=talk:{}{}"

    async def replay(port: int, since: int, epoch: str = "") -> tuple[str, list[Any]]:
        async with connect(url.format(port, since, epoch and f"&epoch={epoch}")) as ws:
            hello = await recv_json(ws)
            got = await until_ended(ws)
        return hello["epoch"], [m["seq"] if m["type"] == "caption" else m for m in got[:-1]]

    one, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        await ingest(server.port, "talk", {"sample_rate": 16000}, one.astype("<i2").tobytes())
        before, seqs = await replay(server.port, 0)
    held = seqs[-1]
    three, _ = speech_with_pauses([*SENTENCES, SENTENCES[0]], pause_s=1.0)
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        await ingest(server.port, "talk", {"sample_rate": 16000}, three.astype("<i2").tobytes())
        now, new = await replay(server.port, 0)
        assert now != before and new[-1] > held, "the new run passed the held seq"
        assert (await replay(server.port, held, before))[1] == [
            {"type": "gap", "stream": "talk", "from": held + 1, "to": None}, *new]
        # Of this numbering: the resume it always was.
        assert (await replay(server.port, held, now))[1] == [n for n in new if n > held]
        # An ingest connection's captions are of it too (the page tells them
        # from its subscription's by it).
        async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream=mic") as ws:
            await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
            ready = await recv_json(ws)
        assert ready["type"] == "ingest.ready" and ready["epoch"] == now == engine.epoch
        async with connect(url.format(server.port, held, "&epoch=a&epoch=b")) as ws:
            refused = await recv_json(ws)
            await ws.wait_closed()
        assert (refused["type"], refused["code"], ws.close_code) == ("error", "bad_query", 1008)


async def test_ingest_chooses_an_adapter_per_stream() -> None:
    cfg = config()
    backend = AdapterScriptedBackend(words_so_far)
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    pcm = audio.astype("<i2").tobytes()
    async with Engine(cfg, backend) as engine, CaptionServer(engine, cfg.server) as server:
        rl, plain = await asyncio.gather(
            ingest(server.port, "rl", {"sample_rate": 16000, "adapter": "rl"}, pcm),
            ingest(server.port, "plain", {"sample_rate": 16000}, pcm),
        )
        async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream=x") as ws:
            await ws.send(json.dumps({"type": "config", "sample_rate": 16000,
                                      "adapter": "nosuch"}))
            err = await recv_json(ws)
            assert err["code"] == "bad_config" and "nosuch" in err["message"]
    assert finals_text(rl).startswith("rl: w0")
    assert finals_text(plain).startswith("default: w0")
    assert any(c == ["rl"] or "rl" in c for c in backend.adapter_calls)


async def test_ingest_chooses_a_language_per_stream() -> None:
    cfg = config()
    backend = LanguageScriptedBackend(words_so_far)
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    pcm = audio.astype("<i2").tobytes()
    async with Engine(cfg, backend) as engine, CaptionServer(engine, cfg.server) as server:
        async with connect(f"ws://127.0.0.1:{server.port}/v1/captions") as ws:
            hello = await recv_json(ws)
            assert hello["languages"] == ["en", "de", "fr"]  # the default first
        url = f"ws://127.0.0.1:{server.port}/v1/ingest"
        for fmt, language in (({"language": "fr"}, "fr"), ({}, "en"), ({"language": "en"}, "en")):
            async with connect(f"{url}?stream=probe") as ws:
                await ws.send(json.dumps({"type": "config", "sample_rate": 16000, **fmt}))
                ready = await recv_json(ws)
                assert ready["type"] == "ingest.ready" and ready["language"] == language
            async with asyncio.timeout(10):
                while "probe" in engine.streams:
                    await asyncio.sleep(0.01)
        fr, plain = await asyncio.gather(
            ingest(server.port, "fr", {"sample_rate": 16000, "language": "fr"}, pcm),
            ingest(server.port, "plain", {"sample_rate": 16000}, pcm),
        )
        for bad, why in (("xx", "unknown language 'xx' (known: de, en, fr)"),
                         (7, "language must be a non-empty string, got 7")):
            async with connect(f"{url}?stream=x") as ws:
                await ws.send(json.dumps({"type": "config", "sample_rate": 16000,
                                          "language": bad}))
                err = await recv_json(ws)
                assert err["code"] == "bad_config" and err["message"] == why
    assert finals_text(fr).startswith("fr: w0")
    assert finals_text(plain).startswith("default: w0")
    keys = [j.key for j in backend.jobs if isinstance(j.key, DecodeRequest)]
    assert {k.language for k in keys if k.stream == "fr"} == {"fr"}
    assert {k.language for k in keys if k.stream == "plain"} == {None}


async def test_ingest_connection_sees_its_stream_start_and_resume_sees_the_end(
    scripted: tuple[Engine, CaptionServer],
) -> None:
    _, server = scripted
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    messages = await ingest(server.port, "once", {"sample_rate": 16000},
                            audio.astype("<i2").tobytes())
    types = [m["type"] for m in messages]
    assert types[0] == "stream.started"
    assert types[-2:] == ["stream.ended", "ingest.summary"]
    last_final = max(m["seq"] for m in messages if m["type"] == "caption")
    async with connect(f"ws://127.0.0.1:{server.port}/v1/captions?since=once:{last_final}") as ws:
        await ws.recv()  # hello
        ended = await recv_json(ws)
    assert ended["type"] == "stream.ended" and ended["stream"] == "once"
    # The id is reused: once it is live again, a resume no longer ends with
    # the old run's stream.ended.
    async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream=once") as ws:
        await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
        await ws.recv()  # ready
        async with connect(
                f"ws://127.0.0.1:{server.port}/v1/captions?since=once:{last_final}") as sub:
            await sub.recv()  # hello
            await send_audio(ws, audio.astype("<i2").tobytes())
            first = await recv_json(sub)
            assert (first["type"], first["seq"] > last_final) == ("caption", True), first


# --- lost audio ----------------------------------------------------------------


async def ingest_parts(port: int, stream: str, rate: int, parts: list[bytes | dict[str, Any]]
                       ) -> list[dict[str, Any]]:
    """One mono PCM16 ingest session of ``parts`` (audio, or a text message
    sent as JSON), in order, to its summary; everything received, validated."""
    async with connect(f"ws://127.0.0.1:{port}/v1/ingest?stream={stream}") as ws:
        await ws.send(json.dumps({"type": "config", "sample_rate": rate}))
        assert (await recv_json(ws))["type"] == "ingest.ready"
        for part in parts:
            if isinstance(part, bytes):
                await send_audio(ws, part)
            else:
                await ws.send(json.dumps(part))
        await ws.send(json.dumps({"type": "end"}))
        messages = await until_closed(ws)
        assert ws.close_code == 1000, messages
        return messages


def final_spans(messages: list[dict[str, Any]]) -> list[tuple[float, float, str]]:
    finals = sorted((m for m in messages if m["type"] == "caption" and m["final"]),
                    key=lambda m: m["segment"])
    return [(m["start"], m["end"], m["text"]) for m in finals]


@pytest.mark.parametrize("rate", [16000, 48000])
async def test_lost_audio_keeps_the_later_captions_at_their_time(
    scripted: tuple[Engine, CaptionServer], rate: int,
) -> None:
    """A ``lost`` message between two sentences puts the second one exactly
    where sending as many zeros would: its captions come the lost time later
    than with nothing in between, at any input rate."""
    _, server = scripted
    before, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    after, _ = speech_with_pauses(SENTENCES[1:], pause_s=1.0, lead_s=0.3)

    def pcm(audio: npt.NDArray[np.int16]) -> bytes:
        at_rate = audio if rate == SAMPLE_RATE else resample(audio, SAMPLE_RATE, rate)
        return at_rate.astype("<i2").tobytes()

    lost_s = 1.5
    lost = int(lost_s * rate)
    declared, zeros, neither = await asyncio.gather(
        ingest_parts(server.port, "declared", rate,
                     [pcm(before), {"type": "lost", "samples": lost}, pcm(after)]),
        ingest_parts(server.port, "zeros", rate, [pcm(before), b"\0\0" * lost, pcm(after)]),
        ingest_parts(server.port, "neither", rate, [pcm(before), pcm(after)]),
    )
    assert not [m for m in declared if m["type"] == "error"]
    spans = final_spans(declared)
    assert len(spans) == 2 and spans == final_spans(zeros)
    first, second = final_spans(neither)
    assert spans[0] == first
    assert spans[1][2] == second[2]
    assert spans[1][0] == pytest.approx(second[0] + lost_s, abs=0.001)
    assert spans[1][1] == pytest.approx(second[1] + lost_s, abs=0.001)
    summaries = [m[-1] for m in (declared, zeros, neither)]
    assert [s["type"] for s in summaries] == ["ingest.summary"] * 3
    assert [s["lost"] for s in summaries] == [lost_s, 0, 0]
    assert summaries[0]["duration"] == summaries[1]["duration"]
    assert summaries[0]["duration"] == pytest.approx(summaries[2]["duration"] + lost_s,
                                                     abs=0.001)


@pytest.mark.parametrize("bad", [
    {"type": "lost"},
    {"type": "lost", "samples": None},
    {"type": "lost", "samples": 1.5},
    {"type": "lost", "samples": 1600.0},
    {"type": "lost", "samples": "1600"},
    {"type": "lost", "samples": True},
    {"type": "lost", "samples": -1},
    {"type": "lost", "samples": 16000 * 600 + 1},   # past MAX_LOST_S at this rate
    {"type": "lost", "samples": 10 ** 40},
])
async def test_a_bad_lost_message_is_an_error_and_adds_nothing(
    scripted: tuple[Engine, CaptionServer], bad: dict[str, Any],
) -> None:
    _, server = scripted
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    pcm = audio.astype("<i2").tobytes()
    half = len(pcm) // 4 * 2
    async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream=lossy") as ws:
        await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
        await recv_json(ws)  # ready
        await send_audio(ws, pcm[:half])
        await ws.send(json.dumps(bad))
        err = await next_error(ws)
        assert (err["code"], err["stream"]) == ("bad_message", "lossy")
        assert err["message"].startswith("samples must be an integer 0..9600000, got ")
        # Not fatal: the stream goes on, with nothing added to its timeline.
        await send_audio(ws, pcm[half:])
        await ws.send(json.dumps({"type": "end"}))
        messages = await until_closed(ws)
    assert ws.close_code == 1000
    summary = messages[-1]
    assert summary["type"] == "ingest.summary" and summary["lost"] == 0
    assert summary["duration"] == pytest.approx(len(audio) / SAMPLE_RATE, abs=0.001)
    assert not [m for m in messages if m["type"] == "error"]


async def test_the_summary_counts_the_streams_errors_not_the_connections() -> None:
    """docs/protocol.md: ``errors`` counts the stream's failed captions
    (``decode_failed``, ``final_lost``), not the errors about this
    connection's own messages, which change nothing in the stream."""
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.2)
    cfg = config(**{"stream.partial_interval_ms": 0, "stream.pause_partial": False})
    probe = StreamSession("probe", cfg.vad, cfg.stream)
    finals = [len(r.audio) for r in probe.push(audio, 0.0) + probe.finish(0.0)
              if r.kind is RequestKind.FINAL]
    assert len(finals) == 2
    backend = ScriptedBackend(words_so_far, fail_when=lambda a: len(a) == finals[0])
    pcm = audio.astype("<i2").tobytes()
    half = len(pcm) // 4 * 2
    async with Engine(cfg, backend) as engine, \
            CaptionServer(engine, cfg.server) as server, \
            connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream=s") as ws:
        await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
        await recv_json(ws)  # ready
        await send_audio(ws, pcm[:half])
        await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
        await ws.send(json.dumps({"type": "nonsense"}))
        await ws.send("{oops")
        await send_audio(ws, pcm[half:])
        await ws.send(json.dumps({"type": "end"}))
        messages = await until_closed(ws)
    assert ws.close_code == 1000
    codes = sorted(m["code"] for m in messages if m["type"] == "error")
    assert codes == ["bad_json", "bad_message", "bad_message", "decode_failed"]
    summary = messages[-1]
    assert summary["type"] == "ingest.summary"
    assert (summary["finals"], summary["errors"]) == (1, 1)


# --- progress acknowledgements --------------------------------------------------


async def test_progress_acknowledges_the_audio_the_server_has_taken(
    scripted: tuple[Engine, CaptionServer],
) -> None:
    """With ``progress: true``: while the client sends 48 kHz stereo audio in
    chunks that do not divide half a second, ingest.progress counts its
    frames, each at most what was sent when it arrived, growing by at least
    half a second (24,000 frames) and less than that plus a chunk; lost
    audio declared in between is not counted; at ``end`` a last one counts
    every frame, before the summary."""
    _, server = scripted
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    at48 = resample(audio, SAMPLE_RATE, 48000).astype("<i2")
    pcm = np.stack([at48, at48], axis=1).tobytes()
    chunk, frame = 1234, 4                       # frames per message, bytes per frame
    total = len(pcm) // frame
    sent = 0
    received: list[tuple[dict[str, Any], int]] = []

    async def read(ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                received.append((await recv_json(ws), sent))

    async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream=acked") as ws:
        await ws.send(json.dumps({"type": "config", "sample_rate": 48000, "channels": 2,
                                  "progress": True}))
        ready = await recv_json(ws)
        assert (ready["type"], ready["progress"]) == ("ingest.ready", True)
        reader = asyncio.ensure_future(read(ws))
        for i in range(0, total, chunk):
            if i == total // 2 // chunk * chunk:
                await ws.send(json.dumps({"type": "lost", "samples": 24000}))
            sent = min(total, i + chunk)         # counted before: the reply may come first
            await ws.send(pcm[i * frame:sent * frame])
            await asyncio.sleep(0.002)
        await ws.send(json.dumps({"type": "end"}))
        await asyncio.wait_for(reader, 60)
    assert ws.close_code == 1000

    types = [m["type"] for m, _ in received]
    progress = [(m["frames"], at) for m, at in received if m["type"] == "ingest.progress"]
    assert types[-1] == "ingest.summary"
    assert types.index("ingest.summary") > max(
        i for i, kind in enumerate(types) if kind == "ingest.progress")
    frames = [f for f, _ in progress]
    assert all(f <= at for f, at in progress), progress
    steps = np.diff([0, *frames[:-1]])
    assert all(24000 <= step < 24000 + chunk for step in steps), steps
    # The end's: the rest, under half a second; the lost frames not counted.
    assert 0 < frames[-1] - frames[-2] < 24000 and frames[-1] == total
    summary = received[-1][0]
    assert summary["lost"] == 0.5
    assert summary["duration"] == pytest.approx(total / 48000 + 0.5, abs=0.001)


@pytest.mark.parametrize("option", [{}, {"progress": False}])
async def test_no_progress_unless_asked(
    scripted: tuple[Engine, CaptionServer], option: dict[str, Any],
) -> None:
    _, server = scripted
    pcm = speech_with_pauses(SENTENCES[:1], pause_s=1.0)[0].astype("<i2").tobytes()
    async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream=quiet") as ws:
        await ws.send(json.dumps({"type": "config", "sample_rate": 16000, **option}))
        ready = await recv_json(ws)
        assert (ready["type"], ready["progress"]) == ("ingest.ready", False)
        await send_audio(ws, pcm)
        await ws.send(json.dumps({"type": "end"}))
        messages = await until_closed(ws)
    assert messages[-1]["type"] == "ingest.summary"
    assert messages[-1]["duration"] > 3
    assert not [m for m in messages if m["type"] == "ingest.progress"]


async def test_the_stream_id_is_free_once_the_summary_arrives(
    scripted: tuple[Engine, CaptionServer],
) -> None:
    """A client that got ``ingest.summary`` (its stream has ended) may open the
    same stream id again at once. It was refused with ``stream_busy`` until
    the first connection's close handshake had ended, which a slow (here: a
    silent) peer holds up for the server's close timeout."""
    _, server = scripted

    def first_until_summary() -> socket.socket:
        sock = raw_ws_handshake(server.port, "/v1/ingest?stream=room")
        sock.sendall(client_text_frame(json.dumps({"type": "config", "sample_rate": 16000})))
        sock.sendall(client_text_frame(json.dumps({"type": "end"})))
        sock.settimeout(20)
        got = b""
        while b"ingest.summary" not in got:
            got += sock.recv(65536)
        return sock  # never answers the server's close frame

    first = await asyncio.to_thread(first_until_summary)
    try:
        async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream=room") as ws:
            await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
            assert (await recv_json(ws, timeout=5))["type"] == "ingest.ready"
            await ws.send(json.dumps({"type": "end"}))
            assert (await until_closed(ws))[-1]["type"] == "ingest.summary"
    finally:
        first.close()


async def _deaf_ingest(engine: Engine, server: CaptionServer, stream: str) -> socket.socket:
    """A raw ingest connection, configured and open as ``stream``, that reads nothing."""
    sock = await asyncio.to_thread(raw_ws_handshake, server.port, f"/v1/ingest?stream={stream}")
    sock.sendall(client_text_frame(json.dumps({"type": "config", "sample_rate": 16000})))
    async with asyncio.timeout(10):
        while stream not in engine.streams:  # ingest.ready is on its way
            await asyncio.sleep(0.01)
    return sock


def _flood(server: CaptionServer, stream: str) -> None:
    """Publish 14 MB of partials for ``stream``: more than the socket buffers hold."""
    big = "word " * 200_000
    for seq in range(1000, 1008):
        server.broadcaster.publish(CaptionEvent(
            stream=stream, segment=0, seq=seq, final=False, text=big, plain_text=big,
            stable="", unstable=big, tags=(), start=0.0, end=1.0, latency=0.1))


async def test_a_stream_reopened_while_the_first_takes_its_finals_stays_apart(
    scripted: tuple[Engine, CaptionServer], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The id was freed as soon as the first connection's stream closed, while
    that connection was still being sent its last events: a second connection
    could open the id then, and its ``stream.started`` (and captions) reached
    the first connection's subscription before that one's summary. The id is
    now freed once the first connection has its events (so the second is
    refused ``stream_busy`` until then) and before its summary goes out."""
    from evoxtral_stream.server import app

    monkeypatch.setattr(app, "_FINALS_SENT_S", 60.0)  # a slow machine reads 14 MB in time
    engine, server = scripted
    sock = await _deaf_ingest(engine, server, "room")
    try:
        _flood(server, "room")
        sock.sendall(client_text_frame(json.dumps({"type": "end"})))
        async with asyncio.timeout(10):
            while "room" in engine.streams:  # closed; its events are still on their way
                await asyncio.sleep(0.01)
        async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream=room") as second:
            with contextlib.suppress(ConnectionClosed):  # refused at once, if at all
                await second.send(json.dumps({"type": "config", "sample_rate": 16000}))
            first_answer = await recv_json(second, timeout=5)
            assert (first_answer["type"], first_answer.get("code")) == ("error", "stream_busy")

        def until_summary() -> bytes:
            sock.settimeout(20)
            got = bytearray()
            while b"ingest.summary" not in got[-(1 << 21):]:  # the tail only: 14 MB come
                chunk = sock.recv(1 << 20)
                assert chunk, "closed before the summary"
                got += chunk
            return bytes(got)

        got = await asyncio.to_thread(until_summary)
    finally:
        sock.close()
    assert got.count(b'"type":"stream.started"') + got.count(b'"type": "stream.started"') == 1
    async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream=room") as again:
        await again.send(json.dumps({"type": "config", "sample_rate": 16000}))
        assert (await recv_json(again, timeout=5))["type"] == "ingest.ready"


async def test_a_client_too_slow_for_its_last_finals_is_closed_as_too_slow(
        scripted: tuple[Engine, CaptionServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """After ``end`` the server waits a while for the connection to take its
    last events. A client slower than that (here: it reads nothing for a
    while, behind 8 MB of them) used to be closed 1000, as a normal end,
    without its last events and the summary; it is closed 1013 now, as any
    subscriber too slow is, so it knows."""
    from evoxtral_stream.server import app

    monkeypatch.setattr(app, "_FINALS_SENT_S", 0.5)
    engine, server = scripted
    sock = await _deaf_ingest(engine, server, "slow")
    try:
        _flood(server, "slow")
        sock.sendall(client_text_frame(json.dumps({"type": "end"})))
        await asyncio.sleep(2.0)                # reads nothing meanwhile
        got = await asyncio.to_thread(drain, sock, 20)
    finally:
        sock.close()
    assert b"ingest.summary" not in got
    assert close_code_of(got) == 1013
