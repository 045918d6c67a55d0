"""``serve`` from the microphone when the microphone is lost mid-sentence.

The real ``serve`` code path (engine, server, microphone capture, subscribers
over a real WebSocket) with one stand-in: there is no sound card here, so a
PortAudio stream that plays speech in real time replaces sounddevice's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from evoxtral_stream.audio import microphone
from evoxtral_stream.audio.microphone import InputDevice
from evoxtral_stream.cli import _serve
from evoxtral_stream.config import load_config
from evoxtral_stream.events import SAMPLE_RATE
from tests.fakes import ScriptedBackend, words_so_far
from tests.helpers.http import free_port
from tests.helpers.portaudio import LiveStream, playback
from tests.speech import have_espeak, speak

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")


async def test_a_lost_microphone_ends_the_open_segment_and_tells_subscribers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lead = np.zeros(SAMPLE_RATE // 2, np.int16)
    first = np.concatenate([lead, speak("The weather is lovely today, isn't it?")])
    second = np.concatenate([lead, speak("Yes, and tomorrow too."), lead, lead, lead])
    unplug_at = len(lead) + (len(first) - len(lead)) * 3 // 5  # mid-sentence
    streams: list[LiveStream] = []

    def factory(device: InputDevice, samplerate: int, channels: int, blocksize: int,
                callback: Callable[..., None]) -> LiveStream:
        assert (samplerate, channels) == (SAMPLE_RATE, 1)
        audio, cut = (first, unplug_at) if not streams else (second, None)
        streams.append(LiveStream(playback(audio.astype(np.float32) / 32768), samplerate,
                                  channels, blocksize, callback, unplug_at=cut))
        return streams[-1]

    sd = types.ModuleType("sounddevice")
    sd.query_devices = lambda: [  # type: ignore[attr-defined]
        {"index": 0, "name": "Desk Mic", "max_input_channels": 1,
         "default_samplerate": float(SAMPLE_RATE)}]
    sd.default = types.SimpleNamespace(device=[0, -1])  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    monkeypatch.setattr(microphone, "_sounddevice_stream", factory)
    port = free_port()
    cfg = load_config(env={}, overrides={
        "server.port": port, "audio.stall_timeout_s": 0.5, "audio.reopen_interval_s": 0.2,
        "stream.partial_interval_ms": 500})
    args = argparse.Namespace(stream=None, no_print=True, exit_at_end=False)
    serving = asyncio.ensure_future(
        _serve(args, cfg, ScriptedBackend(words_so_far), "mic", None))
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while True:
        try:
            ws = await connect(f"ws://127.0.0.1:{port}/v1/captions")
            break
        except OSError:
            assert time.monotonic() < deadline and not serving.done()
            await asyncio.sleep(0.05)
    async with ws:
        async def read() -> None:
            async for raw in ws:
                messages.append(json.loads(raw))

        reader = asyncio.ensure_future(read())

        def finals() -> list[dict[str, Any]]:
            return [m for m in messages if m["type"] == "caption" and m["final"]]

        def errors() -> list[dict[str, Any]]:
            return [m for m in messages if m["type"] == "error"]

        async def until(cond: Callable[[], bool], what: str) -> float:
            deadline = time.monotonic() + 30
            while not cond():
                assert time.monotonic() < deadline, f"no {what}: {messages}"
                await asyncio.sleep(0.02)
            return time.monotonic()

        lost = await until(lambda: bool(errors()), "error event")
        assert errors()[0]["code"] == "audio_input_lost" and errors()[0]["stream"] == "mic"
        assert "'Desk Mic' delivered no audio" in errors()[0]["message"]
        # The sentence cut short is final at once: it does not wait for the device.
        got_final = await until(lambda: len(finals()) >= 1, "final of the cut segment")
        assert got_final - lost < 5.0
        cut = finals()[0]
        assert cut["segment"] == 0 and cut["text"]
        assert cut["end"] <= unplug_at / SAMPLE_RATE + 0.05
        # The device comes back (reopened by the watchdog) and captions go on.
        await until(lambda: len(finals()) >= 2, "final after the device came back")
        assert len(streams) == 2 and finals()[1]["segment"] == 1
        assert finals()[1]["start"] >= cut["end"]
        os.kill(os.getpid(), signal.SIGTERM)   # as Ctrl-C would: drain and exit
        assert await asyncio.wait_for(serving, 30) == 0
        await asyncio.wait_for(reader, 10)
    assert len(errors()) == 1
    assert [m["type"] for m in messages][-1] == "stream.ended"
