"""Malformed input against the protocol codecs and the sockets they serve.

Hand-picked cases and a seeded mutation fuzz of the v1 codecs
(``server/protocol.py``) and the ``/v1/realtime`` client events: each input
decodes to a typed value or raises the codec's own error, whose message is
one bounded line naming the field; never another exception. Then the
encoders: every event the server emits, with hostile text, is valid UTF-8
JSON of the documented schema and reads back as it was. Then the same over
real WebSockets: the documented error event, and the connection, the other
streams and their finals going on.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from websockets.asyncio.client import connect

from evoxtral_stream.audio.resample import resample
from evoxtral_stream.config import Config, load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import SAMPLE_RATE
from evoxtral_stream.server.app import CaptionServer
from evoxtral_stream.server.realtime import INPUT_RATE
from tests.fakes import ScriptedBackend
from tests.speech import have_espeak, speak

needs_espeak = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")

SENTENCE = "Good evening and welcome to the live captioning demo."


def config(**overrides: object) -> Config:
    return load_config(overrides={"server.port": 0, **overrides})


def pcm24(audio: npt.NDArray[np.int16]) -> bytes:
    return resample(audio, SAMPLE_RATE, INPUT_RATE).astype("<i2").tobytes()


def append_msg(data: bytes) -> str:
    return json.dumps({"type": "input_audio_buffer.append",
                       "audio": base64.b64encode(data).decode()})


class SurrogateFailingBackend(ScriptedBackend):
    """Fails every call as a backend whose model file has a name that is no
    UTF-8 would: the exception's text holds a lone surrogate (Python's
    ``surrogateescape``)."""

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        raise RuntimeError("cannot read /models/caf\udce9.bin")


# --- over real sockets ----------------------------------------------------------------


@needs_espeak
async def test_a_realtime_error_whose_message_is_no_utf8_is_sent_and_the_session_goes_on(
        ) -> None:
    """An engine error (a failed decode) whose message holds a lone
    surrogate (an exception naming a file whose name is no UTF-8) could not
    be encoded for the frame: the session's send loop died, the session
    ended with a normal close (1000) and the item's completed never came.
    /v1/captions wrote it as U+FFFD; so does /v1/realtime now."""
    cfg = config(**{"stream.partial_interval_ms": 0})
    async with Engine(cfg, SurrogateFailingBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        url = f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription"
        speech = pcm24(np.concatenate([speak(SENTENCE), np.zeros(16_000, np.int16)]))
        async with connect(url) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == \
                "session.created"
            step = INPUT_RATE * 2 // 5
            for i in range(0, len(speech), step):
                await ws.send(append_msg(speech[i:i + step]))
            got: list[dict[str, Any]] = []
            while not got or got[-1]["type"] != \
                    "conversation.item.input_audio_transcription.completed":
                got.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            errors = [e["error"] for e in got if e["type"] == "error"]
            assert errors and errors[0]["code"] == "decode_failed"
            assert "caf\ufffd.bin" in errors[0]["message"]
            # Still serving: a clear is answered.
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != \
                    "input_audio_buffer.cleared":
                pass
