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
import contextlib
import copy
import functools
import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from evoxtral_stream.audio.resample import resample
from evoxtral_stream.config import Config, load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import (
    SAMPLE_RATE,
    CaptionEvent,
    StreamEnded,
    StreamError,
    StreamStarted,
    TagMark,
)
from evoxtral_stream.server.app import CaptionServer
from evoxtral_stream.server.protocol import (
    MAX_INGEST_RATE,
    MIN_INGEST_RATE,
    EndOfStream,
    IngestFormat,
    LostAudio,
    ProtocolError,
    caption_from_dict,
    decode_caption,
    encode_error,
    encode_event,
    encode_hello,
    parse_ingest_message,
)
from evoxtral_stream.server.realtime import (
    INPUT_RATE,
    AudioAppend,
    AudioClear,
    AudioCommit,
    BufferCleared,
    BufferCommitted,
    BufferSpeechStarted,
    BufferSpeechStopped,
    RealtimeError,
    RealtimeProtocolError,
    RealtimeTranscription,
    SessionCreated,
    SessionUpdate,
    SessionUpdated,
    TranscriptionCompleted,
    TranscriptionDelta,
    encode_server_event,
    parse_client_event,
    server_event_to_dict,
)
from evoxtral_stream.text.chars import mend_surrogates
from evoxtral_stream.text.tags import TagKind
from tests.docs_schema import validate_message
from tests.fakes import ScriptedBackend, words_so_far
from tests.helpers.fuzz import fuzz_seeds
from tests.speech import have_espeak, speak, speech_with_pauses

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


class _MendSurrogates(logging.Filter):
    """Writes a record's message and traceback with U+FFFD for each lone
    surrogate. pytest keeps a test's log for its report, and an xdist worker
    cannot send a report holding one (execnet's DumpError ends the worker,
    and the run with it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = mend_surrogates(record.getMessage()), None
        if record.exc_info:
            record.exc_text = mend_surrogates(
                logging.Formatter().formatException(record.exc_info))
        return True


@pytest.fixture
def mended_worker_log() -> Iterator[None]:
    """The model worker's log lines (its "backend failed ..." names the
    exception) without lone surrogates, for :class:`SurrogateFailingBackend`."""
    worker_log = logging.getLogger("evoxtral_stream.engine.worker")
    mend = _MendSurrogates()
    worker_log.addFilter(mend)
    try:
        yield
    finally:
        worker_log.removeFilter(mend)


# --- the decoders: hand-picked cases ---------------------------------------------------

#: The longest message an error may carry: a sentence and a short quote of the value.
MAX_ERROR_CHARS = 240
INGEST_CODES = {"bad_json", "bad_message", "bad_config"}
REALTIME_CODES = {"invalid_json", "invalid_type", "invalid_value", "missing_required_parameter"}
HUGE = "x" * 100_000
DEEP = "[" * 100_000 + "]" * 100_000
#: Deep, but within what json.loads takes: the decoder sees it and quotes it.
NESTED = "[" * 800 + "]" * 800


def check_message(message: str) -> None:
    """One short line of text a frame can carry."""
    assert len(message) <= MAX_ERROR_CHARS, f"{len(message)} chars: {message[:120]!r}..."
    assert message.splitlines() == [message], repr(message)  # no \n, \r, U+2028, ...
    message.encode("utf-8")
    assert message.isprintable(), repr(message)


def ingest_error(message: str | bytes, sample_rate: int | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_ingest_message(message, sample_rate)
    check_message(str(caught.value))
    assert caught.value.code in INGEST_CODES
    return caught.value


def config_msg(**fields: Any) -> str:
    return json.dumps({"type": "config", "sample_rate": 16000, **fields})


BAD_INGEST: list[tuple[str | bytes, str, str]] = [
    # (message, code, a word the message names)
    (b'{"type": "end"}\xff', "bad_json", "UTF-8"),
    (b"\xc3\x28", "bad_json", "UTF-8"),
    ("", "bad_json", "JSON"),
    ("{", "bad_json", "JSON"),
    ('{"type": "end"', "bad_json", "JSON"),
    (DEEP, "bad_json", "JSON"),
    ('{"type": "lost", "samples": ' + "9" * 5000 + "}", "bad_json", "JSON"),
    ("[]", "bad_message", "object"),
    ('"config"', "bad_message", "object"),
    ("null", "bad_message", "object"),
    ("NaN", "bad_message", "object"),
    ("{}", "bad_message", "type"),
    ('{"type": "Config", "sample_rate": 16000}', "bad_message", "type"),
    ('{"type": "END"}', "bad_message", "type"),
    ('{"type": " end"}', "bad_message", "type"),
    ('{"type": ["end"]}', "bad_message", "type"),
    ('{"type": 5}', "bad_message", "type"),
    ('{"type": "\\ud800"}', "bad_message", "type"),
    ('{"type": "\\u2028"}', "bad_message", "type"),
    (json.dumps({"type": HUGE}), "bad_message", "type"),
    ('{"type": ' + NESTED + "}", "bad_message", "type"),
    ('{"type": "config"}', "bad_config", "sample_rate"),
    (config_msg(sample_rate=True), "bad_config", "sample_rate"),
    (config_msg(sample_rate=16000.0), "bad_config", "sample_rate"),
    (config_msg(sample_rate="16000"), "bad_config", "sample_rate"),
    (config_msg(sample_rate=-0), "bad_config", "sample_rate"),
    (config_msg(sample_rate=7999), "bad_config", "sample_rate"),
    (config_msg(sample_rate=192001), "bad_config", "sample_rate"),
    (config_msg(sample_rate=10 ** 400), "bad_config", "sample_rate"),
    (config_msg(sample_rate=HUGE), "bad_config", "sample_rate"),
    ('{"type": "config", "sample_rate": NaN}', "bad_config", "sample_rate"),
    ('{"type": "config", "sample_rate": Infinity}', "bad_config", "sample_rate"),
    ('{"type": "config", "sample_rate": -Infinity}', "bad_config", "sample_rate"),
    ('{"type": "config", "sample_rate": 1e999}', "bad_config", "sample_rate"),
    ('{"type": "config", "sample_rate": -0.0}', "bad_config", "sample_rate"),
    ('{"type": "config", "sample_rate": ' + NESTED + "}", "bad_config", "sample_rate"),
    (config_msg(channels=True), "bad_config", "channels"),
    (config_msg(channels=2.0), "bad_config", "channels"),
    (config_msg(channels=0), "bad_config", "channels"),
    (config_msg(channels=9), "bad_config", "channels"),
    (config_msg(channels=None), "bad_config", "channels"),
    (config_msg(format="PCM16"), "bad_config", "format"),
    (config_msg(format=["pcm16"]), "bad_config", "format"),
    (config_msg(format=None), "bad_config", "format"),
    (config_msg(format=HUGE), "bad_config", "format"),
    (config_msg(adapter=""), "bad_config", "adapter"),
    (config_msg(adapter=5), "bad_config", "adapter"),
    (config_msg(adapter=[HUGE]), "bad_config", "adapter"),
    (config_msg(language=False), "bad_config", "language"),
    (config_msg(language={"code": "en"}), "bad_config", "language"),
    (config_msg(progress="true"), "bad_config", "progress"),
    (config_msg(progress=1), "bad_config", "progress"),
    (config_msg(progress=None), "bad_config", "progress"),
    (config_msg(progress=HUGE), "bad_config", "progress"),
    ('{"type": "lost"}', "bad_message", "samples"),
    ('{"type": "lost", "samples": 1.5}', "bad_message", "samples"),
    ('{"type": "lost", "samples": true}', "bad_message", "samples"),
    ('{"type": "lost", "samples": -1}', "bad_message", "samples"),
    ('{"type": "lost", "samples": "4800"}', "bad_message", "samples"),
    ('{"type": "lost", "samples": NaN}', "bad_message", "samples"),
    ('{"type": "lost", "samples": 1e999}', "bad_message", "samples"),
    (json.dumps({"type": "lost", "samples": HUGE}), "bad_message", "samples"),
    ('{"type": "lost", "samples": 115200001}', "bad_message", "samples"),
    # A key named twice: json.loads would keep the last value without a word.
    ('{"type": "end", "type": "x"}', "bad_message", "'type' twice"),
    ('{"type": "end", "type": "end"}', "bad_message", "'type' twice"),
    ('{"type": "lost", "samples": 0, "samples": 4800}', "bad_message", "'samples' twice"),
    ('{"type": "config", "sample_rate": 16000, "sample_rate": 48000}', "bad_message",
     "'sample_rate' twice"),
    ('{"type": "end", "x": [{"a": 1, "a": 2}]}', "bad_message", "'a' twice"),
    ('{"type": "end", "\\ud800": 1, "\\ud800": 2}', "bad_message", "twice"),
    (f'{{"type": "end", "{HUGE}": 1, "{HUGE}": 2}}', "bad_message", "twice"),
]


@pytest.mark.parametrize(("message", "code", "names"), BAD_INGEST,
                         ids=[f"{i}" for i in range(len(BAD_INGEST))])
def test_malformed_ingest_messages_get_their_code_and_one_short_line(
        message: str | bytes, code: str, names: str) -> None:
    e = ingest_error(message)
    assert e.code == code, str(e)
    assert names in str(e), str(e)


def test_ingest_messages_that_are_well_formed_with_extras_decode() -> None:
    """Unknown fields are ignored; a second config is refused whatever it holds."""
    assert parse_ingest_message(config_msg(extra={"a": [1, None]}, **{"": 1})) == \
        parse_ingest_message(config_msg())
    assert parse_ingest_message('{"type": "end", "why": "\\ud800"}') == EndOfStream()
    assert parse_ingest_message('{"type": "lost", "samples": 0}') == LostAudio(0)
    # A language or adapter is the engine's to check (a lone surrogate included).
    fmt = parse_ingest_message(config_msg(language="\ud800", adapter=HUGE))
    assert isinstance(fmt, IngestFormat) and fmt.language == "\ud800"
    e = ingest_error(config_msg(sample_rate=HUGE), sample_rate=16000)
    assert e.code == "bad_message" and "once" in str(e)


def realtime_error(message: str | bytes) -> RealtimeProtocolError:
    with pytest.raises(RealtimeProtocolError) as caught:
        parse_client_event(message)
    check_message(str(caught.value))
    assert caught.value.code in REALTIME_CODES
    return caught.value


def update(session: Any, kind: str = "session.update") -> str:
    return json.dumps({"type": kind, "session": session})


def ga(**inp: Any) -> str:
    return update({"type": "transcription", "audio": {"input": inp}})


FMT = "session.audio.input.format"
TD = "session.audio.input.turn_detection"
BAD_REALTIME: list[tuple[str | bytes, str, str | None]] = [
    # (message, code, param)
    (b'{"type": "input_audio_buffer.commit"}', "invalid_type", None),
    ("", "invalid_json", None),
    ("{not json", "invalid_json", None),
    (DEEP, "invalid_json", None),
    ('{"type": "x", "n": ' + "9" * 5000 + "}", "invalid_json", None),
    ("[]", "invalid_type", None),
    ("null", "invalid_type", None),
    ('"input_audio_buffer.commit"', "invalid_type", None),
    ("{}", "missing_required_parameter", "type"),
    ('{"type": null}', "missing_required_parameter", "type"),
    # Present but not a string: the wrong type, as for any other field.
    ('{"type": 5}', "invalid_type", "type"),
    ('{"type": true}', "invalid_type", "type"),
    ('{"type": ["input_audio_buffer.commit"]}', "invalid_type", "type"),
    ('{"type": {"type": "input_audio_buffer.commit"}}', "invalid_type", "type"),
    ('{"type": "Input_Audio_Buffer.Commit"}', "invalid_value", "type"),
    ('{"type": "SESSION.UPDATE"}', "invalid_value", "type"),
    ('{"type": "\\ud800"}', "invalid_value", "type"),
    ('{"type": "response.create"}', "invalid_value", "type"),
    (json.dumps({"type": HUGE}), "invalid_value", "type"),
    ('{"type": "input_audio_buffer.append"}', "missing_required_parameter", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": null}',
     "missing_required_parameter", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": 5}', "invalid_type", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": ["AAAA"]}', "invalid_type", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": "AAA"}', "invalid_value", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": "A"}', "invalid_value", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": "AA==AA=="}', "invalid_value", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": "AAAA AAAA"}', "invalid_value", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": "AAAA\\nAAAA"}', "invalid_value",
     "audio"),
    ('{"type": "input_audio_buffer.append", "audio": " AAAA"}', "invalid_value", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": "-_-_"}', "invalid_value", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": "AA\\u00c4A"}', "invalid_value", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": "AA\\ud800A"}', "invalid_value", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": "AAAA\\u0000"}', "invalid_value",
     "audio"),
    # Padding RFC 4648 forbids, which base64.b64decode(validate=True) takes:
    # beyond a multiple of 4, or after a whole quantum.
    *[(json.dumps({"type": "input_audio_buffer.append", "audio": audio}), "invalid_value",
       "audio")
      for audio in ("AAAA=", "AAAA==", "AAAA===", "AAAA====", "AAAA=====", "AAAAAAAA====",
                    "AA==" + "=" * 4, "AAA=" + "=" * 4, "AA===", "AAA==")],
    # A key named twice: json.loads would keep the last value without a word.
    ('{"type": "input_audio_buffer.commit", "type": "input_audio_buffer.clear"}',
     "invalid_value", None),
    ('{"type": "input_audio_buffer.commit", "event_id": "a", "event_id": "b"}',
     "invalid_value", None),
    (update({"type": "transcription"}).replace('"transcription"',
                                               '"transcription", "type": "realtime"'),
     "invalid_value", None),
    (f'{{"type": "input_audio_buffer.commit", "{HUGE}": 1, "{HUGE}": 2}}',
     "invalid_value", None),
    (update(5), "invalid_type", "session"),
    (update([]), "invalid_type", "session"),
    (update({"type": "Transcription"}), "invalid_value", "session.type"),
    (update({"type": "realtime"}), "invalid_value", "session.type"),
    (update({"type": HUGE}), "invalid_value", "session.type"),
    (update({"type": 5}), "invalid_type", "session.type"),
    (update({"type": "transcription", "audio": []}), "invalid_type", "session.audio"),
    (update({"type": "transcription", "audio": {"input": "pcm"}}), "invalid_type",
     "session.audio.input"),
    (ga(format=5), "invalid_type", FMT),
    (ga(format={"type": "audio/PCM"}), "invalid_value", f"{FMT}.type"),
    (ga(format={"type": "audio/pcmu"}), "invalid_value", f"{FMT}.type"),
    (ga(format={"type": HUGE}), "invalid_value", f"{FMT}.type"),
    (ga(format={"type": True}), "invalid_type", f"{FMT}.type"),
    (ga(format={"type": "audio/pcm", "rate": True}), "invalid_type", f"{FMT}.rate"),
    (ga(format={"type": "audio/pcm", "rate": "24000"}), "invalid_type", f"{FMT}.rate"),
    (ga(format={"type": "audio/pcm", "rate": 16000}), "invalid_value", f"{FMT}.rate"),
    (ga(format={"type": "audio/pcm", "rate": -0}), "invalid_value", f"{FMT}.rate"),
    (ga(format={"type": "audio/pcm", "rate": 10 ** 400}), "invalid_value", f"{FMT}.rate"),
    (ga(format={"type": "audio/pcm", "rate": 24000.5}), "invalid_value", f"{FMT}.rate"),
    (ga(format={"type": "audio/pcm", "rate": math.nan}), "invalid_value", f"{FMT}.rate"),
    (ga(format={"type": "audio/pcm", "rate": math.inf}), "invalid_value", f"{FMT}.rate"),
    (ga(format={"type": "audio/pcm", "rate": -math.inf}), "invalid_value", f"{FMT}.rate"),
    (ga(turn_detection=5), "invalid_type", TD),
    (ga(turn_detection=False), "invalid_type", TD),
    (ga(turn_detection=[]), "invalid_type", TD),
    (ga(turn_detection={}), "invalid_value", f"{TD}.type"),
    (ga(turn_detection={"type": "SERVER_VAD"}), "invalid_value", f"{TD}.type"),
    (ga(turn_detection={"type": "semantic_vad"}), "invalid_value", f"{TD}.type"),
    (ga(turn_detection={"type": HUGE}), "invalid_value", f"{TD}.type"),
    (ga(turn_detection={"type": 1}), "invalid_type", f"{TD}.type"),
    (ga(transcription=5), "invalid_type", "session.audio.input.transcription"),
    (ga(transcription={"language": 5}), "invalid_type",
     "session.audio.input.transcription.language"),
    (ga(transcription={"language": ["en"]}), "invalid_type",
     "session.audio.input.transcription.language"),
    # Every field wrong: the first refused is named, nothing changes.
    (update({"type": 5, "audio": 5, "include": 5}), "invalid_type", "session.type"),
    (update({"type": "transcription", "audio": {"input": {
        "format": {"type": 5, "rate": "x"}, "turn_detection": 7, "transcription": 8}}}),
     "invalid_type", "session.audio.input.transcription"),
    (update(5, "transcription_session.update"), "invalid_type", "session"),
    (update({"input_audio_format": "g711_ulaw"}, "transcription_session.update"),
     "invalid_value", "session.input_audio_format"),
    (update({"input_audio_format": HUGE}, "transcription_session.update"),
     "invalid_value", "session.input_audio_format"),
    (update({"input_audio_format": ["pcm16"]}, "transcription_session.update"),
     "invalid_type", "session.input_audio_format"),
    (update({"turn_detection": {"type": "none"}}, "transcription_session.update"),
     "invalid_value", "session.turn_detection.type"),
    (update({"turn_detection": 0}, "transcription_session.update"),
     "invalid_type", "session.turn_detection"),
    (update({"input_audio_transcription": {"language": 1}}, "transcription_session.update"),
     "invalid_type", "session.input_audio_transcription.language"),
]


def test_a_key_named_twice_is_refused_by_its_name_and_the_event_still_named() -> None:
    """json.loads keeps the last value of a key named twice without a word:
    a client sending {"type": "end", "type": "x"} has a bug it should hear
    about. The realtime error still names the client's event, unless its
    event_id is the key named twice (which one would it be?)."""
    e = realtime_error('{"type": "input_audio_buffer.commit", "event_id": "c1", '
                       '"session": {"type": 1, "type": 2}}')
    assert "'type' twice" in str(e) and e.event_id == "c1", str(e)
    e = realtime_error('{"type": "input_audio_buffer.commit", "event_id": "a", "event_id": "b"}')
    assert "'event_id' twice" in str(e) and e.event_id is None, str(e)
    ingest = ingest_error('{"type": "end", "\\ud800": 1, "\\ud800": 2}')
    assert "'\\ud800' twice" in str(ingest), str(ingest)
    # A caption from a server is read alike.
    caption = encode_event(random_caption(random.Random(1)))
    with pytest.raises(ProtocolError, match="'seq' twice"):
        decode_caption(caption.replace('"seq":', '"seq":0,"seq":', 1))


@pytest.mark.parametrize(("message", "code", "param"), BAD_REALTIME,
                         ids=[f"{i}" for i in range(len(BAD_REALTIME))])
def test_malformed_realtime_events_get_their_code_param_and_one_short_line(
        message: str | bytes, code: str, param: str | None) -> None:
    e = realtime_error(message)
    assert (e.code, e.param) == (code, param), str(e)


def test_realtime_events_well_formed_with_extras_decode() -> None:
    """Unknown fields are taken and ignored, base64 as RFC 4648 writes it
    (any length of audio: an odd byte waits for the next append), a rate
    written 24000.0 is 24000."""
    commit = parse_client_event('{"type": "input_audio_buffer.commit", "x": [1, {"y": null}]}')
    assert commit == AudioCommit(None)
    assert parse_client_event('{"type": "input_audio_buffer.clear", "event_id": 5}') == \
        AudioClear(None)
    for data in (b"", b"\x01", b"\x01\x02", b"\x01\x02\x03", bytes(range(256))):
        assert parse_client_event(json.dumps({
            "type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode(),
            "event_id": "e"})) == AudioAppend("e", data)
    assert parse_client_event(ga(format={"type": "audio/pcm", "rate": 24000.0})) == \
        SessionUpdate(None, None)
    ev = parse_client_event('{"type": "input_audio_buffer.commit", "event_id": "a\\ud800"}')
    assert ev == AudioCommit("a?")


def test_malformed_captions_get_bad_message_and_one_short_line() -> None:
    good = json.loads(
        '{"type": "caption", "stream": "mic", "segment": 3, "seq": 17, "final": true,'
        ' "text": "[laughs] hi", "plain_text": "hi", "stable": "[laughs] hi",'
        ' "unstable": "", "tags": [{"tag": "laughs", "kind": "non-verbal", "index": 0,'
        ' "t": 1.0, "known": true}], "start": 1.0, "end": 2.0, "latency": 0.1}')
    caption_from_dict(good)
    values: list[Any] = [None, True, "1", 1.5, [], {}, HUGE, "\ud800", [HUGE], math.nan]
    for key in set(good) - {"type"}:
        for value in values:
            error = decode_error(functools.partial(caption_from_dict, {**good, key: value}))
            if error is not None:
                assert error.code == "bad_message"
                check_message(str(error))
    for tag_value in (None, HUGE, {"tag": HUGE}, [1] * 10_000):
        with pytest.raises(ProtocolError) as caught:
            caption_from_dict({**good, "tags": [tag_value]})
        check_message(str(caught.value))
    for message in (DEEP, "[]", b"\xff", '{"type": "caption"}'):
        with pytest.raises(ProtocolError) as caught:
            decode_caption(message)
        check_message(str(caught.value))


# --- the decoders: a seeded mutation fuzz --------------------------------------------------

HOSTILE: list[Any] = [
    None, True, False, 0, -0.0, -1, 1.5, 2 ** 63, 10 ** 30, 10 ** 400, math.nan, math.inf,
    -math.inf, "", " ", "x" * 5000, "\ud800", "\udfff", "\u2028", "\x00\n\r\t\x7f",
    "\U0001d11e", '"\\', "\u202e", [], {}, [None], {"type": None}, [[[[[[[[[[]]]]]]]]]],
    "AAA", "AA==", "-_-_", "AA AA", "server_vad", "SERVER_VAD", "audio/pcm", "pcm16",
    "transcription", "config", "end", "lost", 24000, 16000, 48000, 8, 2,
]
VALID_INGEST: list[dict[str, Any]] = [
    {"type": "config", "sample_rate": 48000, "channels": 2, "format": "float32",
     "adapter": "default", "language": "en", "progress": True},
    {"type": "lost", "samples": 4800},
    {"type": "end"},
]
VALID_REALTIME: list[dict[str, Any]] = [
    {"type": "input_audio_buffer.append", "event_id": "e1", "audio": "AAAAAA=="},
    {"type": "input_audio_buffer.commit", "event_id": "e2"},
    {"type": "input_audio_buffer.clear"},
    {"type": "session.update", "event_id": "e3", "session": {
        "type": "transcription", "include": None,
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                            "transcription": {"model": "x", "language": "en"},
                            "turn_detection": {"type": "server_vad", "threshold": 0.5}}}}},
    {"type": "transcription_session.update", "session": {
        "input_audio_format": "pcm16", "turn_detection": None,
        "input_audio_transcription": {"language": ""}}},
]


def hostile(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(HOSTILE))


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def mutate(rng: random.Random, base: dict[str, Any]) -> str | bytes:
    """``base`` with a few of its values replaced, removed, added or
    re-cased, then maybe damaged as text or bytes."""
    obj: Any = copy.deepcopy(base)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_paths(obj))
        what = rng.random()
        if not path:
            if what < 0.1:
                obj = hostile(rng)
            elif isinstance(obj, dict):
                obj[rng.choice(["type", "x", "audio", "session", "samples", ""])] = hostile(rng)
            continue
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if what < 0.6:
            parent[key] = hostile(rng)
        elif what < 0.75 and isinstance(parent, dict):
            del parent[key]
        elif what < 0.9 and isinstance(parent[key], str):
            value = parent[key]
            parent[key] = rng.choice([value.upper(), value.title(), f" {value}",
                                      value + "\u0000", value[:-1]])
        elif isinstance(parent, dict):
            parent[rng.choice(["extra", "type", "event_id"])] = hostile(rng)
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
    damage = rng.random()
    if damage < 0.05:
        return text.encode("utf-8", "surrogatepass") + b"\xff"
    if damage < 0.1:
        cut = rng.randrange(len(text) + 1)
        return text[:cut]
    if damage < 0.15:
        # A duplicate key: json.loads keeps the last.
        return text[:-1] + ', "type": ' + json.dumps(hostile(rng)) + "}" \
            if text.startswith("{") and len(text) > 2 else text
    if damage < 0.2:
        return "[" * rng.randint(1, 3000) + text + "]" * rng.randint(0, 3000)
    return text


def decode_error(decode: Callable[[], object]) -> ProtocolError | RealtimeProtocolError | None:
    """The codec error ``decode()`` raises, None when it decodes."""
    try:
        decode()
    except (ProtocolError, RealtimeProtocolError) as e:
        return e
    return None


def outcome(decode: Callable[[], object], codes: set[str]) -> object:
    """What ``decode()`` returns, or the codec error it raises, checked."""
    error = decode_error(decode)
    if error is None:
        return decode()
    assert error.code in codes, (error.code, str(error))
    check_message(str(error))
    return error


@pytest.mark.parametrize("seed", fuzz_seeds(4))
def test_mutated_messages_decode_or_get_a_short_typed_error(seed: int) -> None:
    """Every message either decodes to a typed value within the documented
    bounds or raises the codec's error with a documented code and one short
    line; the realtime core answers each with events a frame can carry."""
    rng = random.Random(seed)
    core = RealtimeTranscription(load_config().vad, model="m", language="en",
                                 languages=("fr",), max_message_bytes=1 << 20)
    core.start()
    for _ in range(600):
        message = mutate(rng, rng.choice(VALID_INGEST))
        for rate in (None, 16000):
            got = outcome(functools.partial(parse_ingest_message, message, rate), INGEST_CODES)
            if isinstance(got, IngestFormat):
                assert rate is None
                assert MIN_INGEST_RATE <= got.sample_rate <= MAX_INGEST_RATE
                assert 1 <= got.channels <= 8 and isinstance(got.progress, bool)
                assert got.adapter is None or (isinstance(got.adapter, str) and got.adapter)
            elif isinstance(got, LostAudio):
                assert type(got.samples) is int
                assert 0 <= got.samples <= (rate or MAX_INGEST_RATE) * 600
            else:
                assert isinstance(got, EndOfStream | ProtocolError)
        message = mutate(rng, rng.choice(VALID_REALTIME))
        got = outcome(functools.partial(parse_client_event, message), REALTIME_CODES)
        if isinstance(got, AudioAppend):
            assert isinstance(got.data, bytes)
        if isinstance(got, SessionUpdate):
            assert got.turn_detection in (None, "server_vad", "none")
            assert got.language is None or isinstance(got.language, str)
        for out in core.receive(message):
            if not hasattr(out, "event_id"):
                continue  # an action for the engine stream
            text = encode_server_event(out)  # type: ignore[arg-type]
            text.encode("utf-8")
            event = json.loads(text)
            if event["type"] == "error":
                check_message(event["error"]["message"])


# --- the encoders ----------------------------------------------------------------------

#: Text no frame, line or parser may stumble on: quotes, backslashes, line
#: breaks JSON escapes, ones it does not (U+2028, U+2029, NEL), non-BMP
#: characters, a BOM, a bidi override, NUL.
NASTY = ['"', "\\", "\n", "\r\n", "\t", "\x00", "\x1b[31m", "\x7f", "\x85", "\u2028",
         "\u2029", "\U0001f600", "\U0001d11e", "\ufeff", "\u202e", "</script>", "é",
         "日本", "\ufffd", "{", "}", "[laughs]", " ", "'", "\\u0000", "%s", "\x1c"]


def nasty_text(rng: random.Random) -> str:
    return "".join(rng.choice([*NASTY, "word", "a"]) for _ in range(rng.randint(1, 12)))


def random_caption(rng: random.Random) -> CaptionEvent:
    stable, unstable = nasty_text(rng), rng.choice(["", nasty_text(rng)])
    text = stable + unstable
    start = rng.randint(0, 10 ** 7) / 1000
    tags = tuple(TagMark(nasty_text(rng), rng.choice([k.value for k in TagKind]),
                         rng.randint(0, 50), rng.randint(0, 10 ** 7) / 1000,
                         rng.random() < 0.5) for _ in range(rng.randint(0, 3)))
    return CaptionEvent(
        stream=nasty_text(rng), segment=rng.randint(0, 10 ** 6), seq=rng.randint(1, 2 ** 62),
        final=rng.random() < 0.5, text=text, plain_text=nasty_text(rng), stable=stable,
        unstable=unstable, tags=tags, start=start,
        end=round(start + rng.randint(0, 60_000) / 1000, 3),
        latency=rng.choice([None, rng.randint(0, 10 ** 5) / 10 ** 4]),
        continues=rng.random() < 0.2)


def check_frame(frame: str) -> dict[str, Any]:
    """A text frame: UTF-8, one line of JSON (a JSON-lines recording of it
    stays one line), strict JSON (no NaN)."""
    frame.encode("utf-8")
    assert "\n" not in frame and "\r" not in frame
    obj: dict[str, Any] = json.loads(frame, parse_constant=lambda c: pytest.fail(c))
    return obj


@pytest.mark.parametrize("seed", fuzz_seeds(4))
def test_every_v1_event_with_nasty_text_keeps_the_schema_and_reads_back(seed: int) -> None:
    rng = random.Random(seed)
    for i in range(300):
        # The schema's check is slow (30 ms): the first messages get it.
        schema = validate_message if i < 20 else (lambda obj: obj)
        caption = random_caption(rng)
        obj = schema(check_frame(encode_event(caption)))
        assert caption_from_dict(obj) == caption
        assert decode_caption(encode_event(caption)) == obj
        stream = nasty_text(rng)
        message = nasty_text(rng) + "\udce9"  # an exception naming a file that is no UTF-8
        for event in (StreamStarted(stream, nasty_text(rng)),
                      StreamEnded(stream, rng.randint(0, 10 ** 6) / 1000, 3, 2),
                      StreamError(stream, "decode_failed", message, rng.choice([None, 4]))):
            obj = schema(check_frame(encode_event(event)))
            assert obj["stream"] == stream
        assert obj["message"] == message.replace("\udce9", "\ufffd")
        schema(check_frame(encode_hello(
            nasty_text(rng), [stream], ["captions"], ["en", nasty_text(rng)], [nasty_text(rng)],
            epoch="0123456789abcdef")))
        schema(check_frame(encode_error("bad_config", nasty_text(rng), stream)))


@pytest.mark.parametrize("seed", fuzz_seeds(2))
def test_every_realtime_event_with_nasty_text_is_one_frame_of_utf8_json(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        item, text = nasty_text(rng), nasty_text(rng)
        for event in (
                SessionCreated("e1", {"model": text, "language": None}),
                SessionUpdated("e2", {"x": [text]}, beta=rng.random() < 0.5),
                BufferSpeechStarted("e3", item, rng.randint(0, 10 ** 9)),
                BufferSpeechStopped("e4", item, rng.randint(0, 10 ** 9)),
                BufferCommitted("e5", item, rng.choice([None, item])),
                BufferCleared("e6"),
                TranscriptionDelta("e7", item, text),
                TranscriptionCompleted("e8", item, text, rng.randint(0, 10 ** 6) / 1000),
                RealtimeError("e9", "decode_failed", text + "\udce9", None, text + "\ufffd",
                              "server_error")):
            obj = check_frame(encode_server_event(event))
            expected = server_event_to_dict(event)
            if isinstance(event, RealtimeError):
                expected["error"]["message"] = event.message.replace("\udce9", "\ufffd")
            assert obj == expected


# --- over real sockets ----------------------------------------------------------------


@needs_espeak
@pytest.mark.usefixtures("mended_worker_log")
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


async def recv_json(ws: Any, timeout: float = 20) -> dict[str, Any]:
    return validate_message(json.loads(await asyncio.wait_for(ws.recv(), timeout)))


async def ingest_speech(port: int, stream: str, pcm: bytes) -> list[dict[str, Any]]:
    """One well-behaved ingest connection, to its summary."""
    async with connect(f"ws://127.0.0.1:{port}/v1/ingest?stream={stream}") as ws:
        await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
        got = [await recv_json(ws)]
        for i in range(0, len(pcm), 8192):
            await ws.send(pcm[i:i + 8192])
        await ws.send('{"type": "end"}')
        with contextlib.suppress(ConnectionClosed):
            while True:
                got.append(await recv_json(ws))
        assert ws.close_code == 1000
    return got


@needs_espeak
async def test_malformed_ingest_messages_over_a_socket_get_short_errors_and_lose_nothing(
        ) -> None:
    """Every malformed text message after the config gets its error event
    (bad_json or bad_message: a second config is one whatever it holds), of
    one short line, and changes nothing: the connection's audio and another
    stream's still become every final. A first message refused gets its
    error and 1008, also in one short line when it quotes an adapter or
    language of 100,000 characters the engine does not know."""
    cfg = config()
    audio, _ = speech_with_pauses([SENTENCE, SENTENCE], pause_s=1.2)
    pcm = audio.astype("<i2").tobytes()
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        for field in ("adapter", "language"):
            async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream=x") as ws:
                await ws.send(config_msg(**{field: HUGE}))
                err = await recv_json(ws)
                assert err["code"] == "bad_config" and field in err["message"]
                check_message(err["message"])
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 1008
        good = asyncio.ensure_future(ingest_speech(server.port, "good", pcm))
        async with connect(f"ws://127.0.0.1:{server.port}/v1/ingest?stream=bad") as ws:
            await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
            assert (await recv_json(ws))["type"] == "ingest.ready"
            half = len(pcm) // 4 * 2
            await ws.send(pcm[:half])
            for message, code, _ in BAD_INGEST:
                if isinstance(message, bytes):
                    continue  # binary: audio (a text frame that is no UTF-8 is a 1007)
                await ws.send(message)
                while (err := await recv_json(ws))["type"] != "error":
                    pass
                expected = "bad_message" if code == "bad_config" else code
                assert (err["code"], err["stream"]) == (expected, "bad"), (message[:80], err)
                check_message(err["message"])
            await ws.send(pcm[half:])
            await ws.send('{"type": "end"}')
            got: list[dict[str, Any]] = []
            with contextlib.suppress(ConnectionClosed):
                while True:
                    got.append(await recv_json(ws))
            assert ws.close_code == 1000
        assert got[-1]["type"] == "ingest.summary"
        assert got[-1]["finals"] == 2 and got[-1]["errors"] == 0
        assert (await good)[-1]["finals"] == 2


@needs_espeak
async def test_malformed_realtime_events_over_a_socket_get_their_error_and_the_session_goes_on(
        ) -> None:
    """Each malformed client event gets one OpenAI-shaped error with its
    code and param, in one short line; the session then transcribes."""
    cfg = config(**{"stream.partial_interval_ms": 0})
    async with Engine(cfg, ScriptedBackend(lambda a: "hello there")) as engine, \
            CaptionServer(engine, cfg.server) as server:
        url = f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription"
        async with connect(url) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            # The language is the core's to refuse: the engine does not offer it.
            language = ("invalid_value", "session.audio.input.transcription.language")
            for message, code, param in [*BAD_REALTIME,
                                         (ga(transcription={"language": HUGE}), *language)]:
                await ws.send(message)
                event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert event["type"] == "error", (message[:80], event)
                assert (event["error"]["code"], event["error"]["param"]) == (code, param)
                check_message(event["error"]["message"])
            speech = pcm24(np.concatenate([speak(SENTENCE), np.zeros(16_000, np.int16)]))
            await ws.send(append_msg(speech))
            while (event := json.loads(await asyncio.wait_for(ws.recv(), 20)))["type"] != \
                    "conversation.item.input_audio_transcription.completed":
                assert event["type"] != "error", event
            assert event["transcript"] == "hello there"


@needs_espeak
async def test_a_realtime_text_frame_that_is_no_utf8_closes_that_session_and_keeps_its_finals(
        ) -> None:
    """The WebSocket layer fails the connection with 1007 before the server
    sees the message (as on /v1/ingest); the session's audio still becomes
    its final for /v1/captions, and another session goes on."""
    cfg = config(**{"stream.partial_interval_ms": 0})
    speech = pcm24(np.concatenate([speak(SENTENCE), np.zeros(16_000, np.int16)]))
    async with Engine(cfg, ScriptedBackend(lambda a: "hello there")) as engine, \
            CaptionServer(engine, cfg.server) as server:
        base = f"ws://127.0.0.1:{server.port}"
        async with connect(f"{base}/v1/captions?stream=bad") as watcher, \
                connect(f"{base}/v1/realtime?intent=transcription&stream=bad") as bad, \
                connect(f"{base}/v1/realtime?intent=transcription&stream=good") as good:
            assert (await recv_json(watcher))["type"] == "hello"
            for ws in (bad, good):
                assert json.loads(await ws.recv())["type"] == "session.created"
            # Speech, and no silence after it: the turn is open at the fault.
            await bad.send(append_msg(speech[:len(speech) * 2 // 3 // 2 * 2]))
            await bad.send(b'{"type": "input_audio_buffer.commit"}\xff', text=True)
            await asyncio.wait_for(bad.wait_closed(), 20)
            assert bad.close_code == 1007
            seen = [await recv_json(watcher)]
            while seen[-1]["type"] != "stream.ended":
                seen.append(await recv_json(watcher))
            assert [m["text"] for m in seen if m["type"] == "caption" and m["final"]] == \
                ["hello there"]
            await good.send(append_msg(speech))
            while (event := json.loads(await asyncio.wait_for(good.recv(), 20)))["type"] != \
                    "conversation.item.input_audio_transcription.completed":
                pass
            assert event["transcript"] == "hello there"
