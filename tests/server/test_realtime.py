"""The OpenAI-Realtime-compatible transcription endpoint, ``/v1/realtime``.

The pure core is driven with real speech (its mirrored segmenter needs it)
and scripted captions; the endpoint is driven by the official ``openai`` SDK
against a real engine with the embedded Whisper model.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from openai import AsyncOpenAI
from openai.resources.realtime.realtime import AsyncRealtimeConnection
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from evoxtral_stream.audio.resample import resample
from evoxtral_stream.audio.vad import Segmenter, SegmenterState
from evoxtral_stream.config import Config, load_config
from evoxtral_stream.engine.backends.base import Backend
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import (
    SAMPLE_RATE,
    CaptionEvent,
    Int16Array,
    SpeechEnded,
    SpeechStarted,
    StreamError,
)
from evoxtral_stream.server import app, realtime
from evoxtral_stream.server.app import CaptionServer
from evoxtral_stream.server.broadcast import Broadcaster
from evoxtral_stream.server.protocol import encode_event
from evoxtral_stream.server.realtime import (
    INPUT_RATE,
    CutSegment,
    Output,
    PushAudio,
    RealtimeError,
    RealtimeTranscription,
    SetLanguage,
    encode_server_event,
    server_event_to_dict,
)
from tests.fakes import LanguageScriptedBackend, ScriptedBackend
from tests.helpers.audio import voiced_span
from tests.helpers.http import (
    answer_close,
    client_text_frame,
    close_while_reading,
    raw_ws_handshake,
    read_slowly_to_close,
    send_until_closed,
)
from tests.speech import clipped_speech, have_espeak, speak, speech_with_pauses
from tests.text_norm import loose_wer

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")

SENTENCES = ["Good evening and welcome to the live captioning demo.",
             "Thank you for listening, and have a wonderful night."]
MANUAL = "Our next speaker will talk about renewable energy."
JUNK = "Please ignore this sentence entirely."

ERROR_KEYS = {"type", "code", "message", "param", "event_id"}


def config(**overrides: object) -> Config:
    return load_config(overrides={"server.port": 0, **overrides})


def pcm24(audio: Int16Array) -> bytes:
    """16 kHz test speech as the API's input: PCM16 little-endian, 24 kHz."""
    return resample(audio, SAMPLE_RATE, INPUT_RATE).astype("<i2").tobytes()


def append_msg(data: bytes, event_id: str | None = None) -> str:
    msg: dict[str, Any] = {"type": "input_audio_buffer.append",
                           "audio": base64.b64encode(data).decode()}
    if event_id is not None:
        msg["event_id"] = event_id
    return json.dumps(msg)


def update_msg(turn_detection: dict[str, Any] | None) -> str:
    return json.dumps({"type": "session.update", "session": {
        "type": "transcription",
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                            "turn_detection": turn_detection}}}})


def feed(core: RealtimeTranscription, data: bytes, chunk_ms: int = 100) -> list[Output]:
    step = INPUT_RATE * 2 * chunk_ms // 1000
    out: list[Output] = []
    for i in range(0, len(data), step):
        out += core.receive(append_msg(data[i:i + step]))
    return out


def events(outputs: Sequence[Output]) -> list[dict[str, Any]]:
    return [server_event_to_dict(o) for o in outputs
            if not isinstance(o, PushAudio | CutSegment | SetLanguage)]


def pushed(outputs: Sequence[Output]) -> Int16Array:
    parts = [o.samples for o in outputs if isinstance(o, PushAudio)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int16)


def assert_one_cut_after_audio(outputs: Sequence[Output]) -> None:
    """One :class:`CutSegment`, and no audio pushed after it."""
    cuts = [i for i, o in enumerate(outputs) if isinstance(o, CutSegment)]
    assert len(cuts) == 1, outputs
    assert not any(isinstance(o, PushAudio) for o in outputs[cuts[0]:])


def types(evs: Sequence[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in evs]


def caption(segment: int, text: str, stable: str, *, final: bool = False) -> CaptionEvent:
    return CaptionEvent(stream="rt", segment=segment, seq=1, final=final, text=text,
                        plain_text=text, stable=text if final else stable,
                        unstable="" if final else text[len(stable):], tags=(),
                        start=0.0, end=1.0, latency=0.1)


def new_core() -> RealtimeTranscription:
    return RealtimeTranscription(load_config().vad, model="test-model", language="en",
                                 prefix="t_")


# --- the pure core ---------------------------------------------------------------


def test_session_created_then_updates_report_the_effective_config() -> None:
    core = new_core()
    vad = load_config().vad
    (created,) = events(core.start())
    assert created["type"] == "session.created"
    session = created["session"]
    assert session["type"] == "transcription"
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["input"]["turn_detection"] == {
        "type": "server_vad", "prefix_padding_ms": vad.pre_roll_ms,
        "silence_duration_ms": vad.end_silence_ms}

    (updated,) = events(core.receive(update_msg(None)))
    assert updated["type"] == "session.updated"
    assert updated["session"]["audio"]["input"]["turn_detection"] is None
    assert not core.server_vad
    # An update that does not mention turn detection leaves it alone.
    (same,) = events(core.receive(json.dumps(
        {"type": "session.update", "session": {"type": "transcription"}})))
    assert same["session"]["audio"]["input"]["turn_detection"] is None

    # The beta event is answered in the beta shape.
    (beta,) = events(core.receive(json.dumps({
        "type": "transcription_session.update",
        "session": {"input_audio_format": "pcm16", "turn_detection": {"type": "server_vad"}}})))
    assert beta["type"] == "transcription_session.updated"
    assert beta["session"]["turn_detection"]["type"] == "server_vad"
    assert core.server_vad
    ids = [created["event_id"], updated["event_id"], same["event_id"], beta["event_id"]]
    assert len(set(ids)) == 4


def test_a_beta_turn_detection_without_type_is_server_vad() -> None:
    """The beta ``transcription_session.update`` makes ``turn_detection.type``
    optional (server_vad is the only kind a transcription session has): an
    update that tunes it without a type was refused as an unsupported turn
    detection, and nothing in it applied (its language, say)."""
    core = RealtimeTranscription(load_config().vad, model="m", language="en",
                                 languages=("fr",))
    core.start()
    core.receive(update_msg(None))
    out = core.receive(json.dumps({"type": "transcription_session.update", "event_id": "c1",
                                   "session": {"input_audio_transcription": {"language": "fr"},
                                               "turn_detection": {"silence_duration_ms": 800}}}))
    (updated,) = events(out)
    assert updated["type"] == "transcription_session.updated", updated
    assert updated["session"]["turn_detection"]["type"] == "server_vad"
    assert updated["session"]["input_audio_transcription"]["language"] == "fr"
    assert core.server_vad
    assert [o.language for o in out if isinstance(o, SetLanguage)] == ["fr"]


def language_update(language: object, *, beta: bool = False) -> str:
    if beta:
        return json.dumps({"type": "transcription_session.update", "event_id": "c2",
                           "session": {"input_audio_transcription": {"language": language}}})
    return json.dumps({"type": "session.update", "event_id": "c2", "session": {
        "type": "transcription", "audio": {"input": {"transcription": {"language": language}}}}})


def test_a_session_update_sets_the_language_the_engine_offers() -> None:
    core = RealtimeTranscription(load_config().vad, model="m", language="en",
                                 languages=("en", "fr", "de"))
    core.start()

    def reported(out: Sequence[Output]) -> object:
        (ev,) = events(out)
        session = ev["session"]
        if ev["type"] == "transcription_session.updated":
            return session["input_audio_transcription"]["language"]
        return session["audio"]["input"]["transcription"]["language"]

    out = core.receive(language_update("fr"))
    assert [o.language for o in out if isinstance(o, SetLanguage)] == ["fr"]
    assert reported(out) == "fr"
    # The same again changes nothing in the engine; null goes back to the default.
    out = core.receive(language_update("fr"))
    assert not [o for o in out if isinstance(o, SetLanguage)] and reported(out) == "fr"
    out = core.receive(language_update(None, beta=True))
    assert [o.language for o in out if isinstance(o, SetLanguage)] == [None]
    assert reported(out) == "en"
    # An update without a language leaves it alone.
    out = core.receive(language_update("de"))
    out = core.receive(update_msg(None))
    assert not [o for o in out if isinstance(o, SetLanguage)] and reported(out) == "de"

    # A language the engine lacks is refused, and nothing in the update applies.
    refused = json.dumps({"type": "session.update", "event_id": "c3", "session": {
        "type": "transcription", "audio": {"input": {
            "transcription": {"language": "ja"}, "turn_detection": {"type": "server_vad"}}}}})
    (err,) = events(core.receive(refused))
    assert err["error"]["code"] == "invalid_value"
    assert err["error"]["param"] == "session.audio.input.transcription.language"
    assert err["error"]["event_id"] == "c3"
    assert err["error"]["message"] == (
        "unsupported language 'ja': this server transcribes de, en, fr")
    assert not core.server_vad
    assert reported(core.receive(update_msg(None))) == "de"


def test_a_language_is_matched_exactly_as_hello_lists_it() -> None:
    """A code is compared as it is, as an ingest config's and
    ``model.language`` are: " fr" was trimmed to "fr" here (and "  " taken
    for the default) while an ingest config asking for " fr" is refused;
    "FR" was refused, so the match was never case-free either."""
    core = RealtimeTranscription(load_config().vad, model="m", language="en",
                                 languages=("fr",))
    core.start()
    for asked in (" fr", "fr\n", "FR", "  "):
        out = core.receive(language_update(asked))
        (err,) = events(out)
        assert err["error"]["code"] == "invalid_value", (asked, err)
        assert err["error"]["message"].startswith(f"unsupported language {asked!r}"), err
        assert not [o for o in out if isinstance(o, SetLanguage)]
    # "" (as null) is still the default.
    core.receive(language_update("fr"))
    out = core.receive(language_update(""))
    assert [o.language for o in out if isinstance(o, SetLanguage)] == [None]


def test_a_server_that_offers_no_language_says_so() -> None:
    """With no default language and none offered, a language asked for
    was refused with "this server transcribes " and an empty list."""
    core = RealtimeTranscription(load_config().vad, model="m")
    core.start()
    (err,) = events(core.receive(language_update("fr")))
    assert err["error"]["code"] == "invalid_value"
    assert err["error"]["message"] == (
        "unsupported language 'fr': no language can be set on this server (only null or "
        "\"\", its default)")
    # One offered beside no default is listed.
    core = RealtimeTranscription(load_config().vad, model="m", languages=("es",))
    core.start()
    (err,) = events(core.receive(language_update("fr")))
    assert err["error"]["message"] == "unsupported language 'fr': this server transcribes es"


BAD_MESSAGES: list[tuple[str | bytes, str, str | None]] = [
    ("{not json", "invalid_json", None),
    ("[1, 2]", "invalid_type", None),
    (b"\x00\x01", "invalid_type", None),
    (json.dumps({"event_id": "c1"}), "missing_required_parameter", "type"),
    (json.dumps({"type": 5, "event_id": "c1"}), "invalid_type", "type"),
    ('{"type": "input_audio_buffer.commit", "event_id": "c1", "type": "session.update"}',
     "invalid_value", None),
    (json.dumps({"type": "nope", "event_id": "c1"}), "invalid_value", "type"),
    (json.dumps({"type": "response.create", "event_id": "c1"}), "invalid_value", "type"),
    (json.dumps({"type": "input_audio_buffer.append", "event_id": "c1"}),
     "missing_required_parameter", "audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%", "event_id": "c1"}),
     "invalid_value", "audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": 5, "event_id": "c1"}),
     "invalid_type", "audio"),
    (json.dumps({"type": "session.update", "event_id": "c1",
                 "session": {"type": "realtime"}}), "invalid_value", "session.type"),
    (json.dumps({"type": "session.update", "event_id": "c1", "session": {
        "type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}}}}}),
     "invalid_value", "session.audio.input.format.type"),
    (json.dumps({"type": "session.update", "event_id": "c1", "session": {
        "type": "transcription",
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}}),
     "invalid_value", "session.audio.input.format.rate"),
    (json.dumps({"type": "session.update", "event_id": "c1", "session": {
        "type": "transcription",
        "audio": {"input": {"turn_detection": None, "format": {"type": "audio/pcmu"}}}}}),
     "invalid_value", "session.audio.input.format.type"),
    (json.dumps({"type": "session.update", "event_id": "c1", "session": {
        "type": "transcription",
        "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}}),
     "invalid_value", "session.audio.input.turn_detection.type"),
    (json.dumps({"type": "transcription_session.update", "event_id": "c1",
                 "session": {"input_audio_format": "g711_ulaw"}}),
     "invalid_value", "session.input_audio_format"),
    (language_update("fr").replace("c2", "c1"), "invalid_value",
     "session.audio.input.transcription.language"),
    (language_update(5).replace("c2", "c1"), "invalid_type",
     "session.audio.input.transcription.language"),
    (language_update("fr", beta=True).replace("c2", "c1"), "invalid_value",
     "session.input_audio_transcription.language"),
    (json.dumps({"type": "session.update", "event_id": "c1", "session": {
        "type": "transcription", "audio": {"input": {"transcription": "fr"}}}}),
     "invalid_type", "session.audio.input.transcription"),
    # A field of the wrong type is invalid_type, not an unsupported value.
    *[(json.dumps({"type": "session.update", "event_id": "c1", "session": {
        "type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm",
                                                                "rate": rate}}}}}),
       "invalid_type", "session.audio.input.format.rate") for rate in (True, "24000")],
    (json.dumps({"type": "session.update", "event_id": "c1", "session": {
        "type": "transcription", "audio": {"input": {"format": {"type": 5}}}}}),
     "invalid_type", "session.audio.input.format.type"),
    (json.dumps({"type": "session.update", "event_id": "c1", "session": {"type": 5}}),
     "invalid_type", "session.type"),
    (json.dumps({"type": "session.update", "event_id": "c1", "session": {
        "type": "transcription", "audio": {"input": {"turn_detection": {"type": 1}}}}}),
     "invalid_type", "session.audio.input.turn_detection.type"),
    (json.dumps({"type": "transcription_session.update", "event_id": "c1",
                 "session": {"input_audio_format": 16}}),
     "invalid_type", "session.input_audio_format"),
]


@pytest.mark.parametrize(("message", "code", "param"), BAD_MESSAGES)
def test_bad_messages_get_an_error_and_change_nothing(
    message: str | bytes, code: str, param: str | None,
) -> None:
    core = new_core()
    core.start()
    (err,) = events(core.receive(message))
    assert err["type"] == "error"
    assert err["event_id"].startswith("event_")
    assert set(err["error"]) == ERROR_KEYS
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["code"] == code
    assert err["error"]["param"] == param
    client_id = "c1" if isinstance(message, str) and '"c1"' in message else None
    assert err["error"]["event_id"] == client_id
    # The session is unchanged (turn detection on, no audio) and goes on serving.
    assert core.server_vad
    assert core.segments_opened == 0
    assert len(pushed(core.receive(append_msg(b"\x00\x00" * 2400)))) > 0


def test_a_message_over_the_size_limit_is_refused_by_its_bytes() -> None:
    core = RealtimeTranscription(load_config().vad, model="test-model", language="en",
                                 max_message_bytes=4000)
    core.start()
    fits = append_msg(b"\x00\x00" * 1200)          # 3,200 base64 characters
    assert len(pushed(core.receive(fits))) > 0
    # 3,000 characters, 6,000 bytes of UTF-8: over the limit.
    wide = json.dumps({"type": "session.update", "pad": "é" * 2950}, ensure_ascii=False)
    assert len(wide) < 4000 < len(wide.encode())
    (err,) = events(core.receive(wide))
    assert (err["type"], err["error"]["code"]) == ("error", "message_too_large")
    assert f"message of {len(wide.encode())} bytes" in err["error"]["message"]
    (err,) = events(core.receive(append_msg(b"\x00\x00" * 1600)))
    assert err["error"]["code"] == "message_too_large"


def test_server_vad_turns_follow_the_engine_segmenter() -> None:
    vad = load_config().vad
    audio, spans = speech_with_pauses(SENTENCES, pause_s=1.2)
    core = new_core()
    core.start()
    outs = feed(core, pcm24(audio))
    evs = events(outs)
    assert types(evs) == ["input_audio_buffer.speech_started",
                          "input_audio_buffer.speech_stopped",
                          "input_audio_buffer.committed"] * 2
    first, second = evs[:3], evs[3:]
    for (start, stop, committed), (a, b) in zip((first, second), spans, strict=True):
        item = start["item_id"]
        assert stop["item_id"] == item
        assert committed["item_id"] == item
        # Pre-roll included, as OpenAI's prefix_padding_ms.
        assert a * 1000 // SAMPLE_RATE - vad.pre_roll_ms - 120 <= start["audio_start_ms"]
        assert start["audio_start_ms"] <= a * 1000 // SAMPLE_RATE + 120
        assert abs(stop["audio_end_ms"] - b * 1000 // SAMPLE_RATE) <= 400
    assert first[2]["previous_item_id"] is None
    assert second[2]["previous_item_id"] == first[0]["item_id"]
    # The stream got the client's audio; the engine's own segmenter, fed the
    # same samples, opens the same segments the core announced.
    stream_audio = pushed(outs)
    assert 0 <= len(audio) - len(stream_audio) < 0.05 * SAMPLE_RATE  # soxr holds a tail
    reference = Segmenter(vad).feed(stream_audio)
    assert sum(isinstance(e, SpeechStarted) for e in reference) == core.segments_opened == 2

    # Captions of segment 0: only newly stable text goes out as deltas.
    item = first[0]["item_id"]
    text_events = events(
        core.on_engine_event(caption(0, "Good evening and", "Good evening"))
        + core.on_engine_event(caption(0, "Good evening and welcome", "Good evening"))
        + core.on_engine_event(caption(0, "Good evening and welcome to", "Good evening and"))
        + core.on_engine_event(caption(0, "[laughs] no", "", final=True))
    )
    deltas = [e["delta"] for e in text_events if e["type"].endswith(".delta")]
    assert deltas == ["Good evening", " and"]
    (done,) = [e for e in text_events if e["type"].endswith(".completed")]
    # A final that contradicts sent text is authoritative in `completed`.
    assert done["item_id"] == item
    assert done["transcript"] == "[laughs] no"
    assert done["usage"]["type"] == "duration"
    assert done["usage"]["seconds"] > 1.0
    # The second item: a final that revised its head sends no further delta.
    text_events = events(
        core.on_engine_event(caption(1, "Thank you for", "Thank you"))
        + core.on_engine_event(caption(1, "[laughs] Thank you for listening.",
                                       "[laughs] Thank you for listening.", final=True)))
    assert types(text_events)[-1] == "conversation.item.input_audio_transcription.completed"
    deltas = [e["delta"] for e in text_events if e["type"].endswith(".delta")]
    assert text_events[-1]["transcript"] == "[laughs] Thank you for listening."
    assert deltas == ["Thank you"]  # the final revised the head: nothing more appended
    # Events of unknown segments (cleared, or not ours) are ignored.
    assert core.on_engine_event(caption(7, "x", "x", final=True)) == []


def test_deltas_add_up_to_the_completed_transcript() -> None:
    core = new_core()
    core.start()
    feed(core, pcm24(speech_with_pauses(SENTENCES[:1], pause_s=1.0)[0]))
    views = [("Good", ""), ("Good evening", "Good"), ("Good evening and we", "Good evening"),
             ("Good evening and welcome", "Good evening and")]
    out: list[Output] = []
    for text, stable in views:
        out += core.on_engine_event(caption(0, text, stable))
    out += core.on_engine_event(caption(0, "Good evening and welcome, everyone.", "",
                                        final=True))
    evs = events(out)
    deltas = "".join(e["delta"] for e in evs if e["type"].endswith(".delta"))
    assert evs[-1]["transcript"] == deltas == "Good evening and welcome, everyone."


def test_commit_and_clear_in_server_vad_mode() -> None:
    speech = pcm24(speak(SENTENCES[0]))
    core = new_core()
    core.start()
    # Half a sentence: speech is open; commit ends it now, without speech_stopped.
    fed = feed(core, speech[: len(speech) // 2])
    evs = events(fed)
    assert types(evs) == ["input_audio_buffer.speech_started"]
    outs = core.receive(json.dumps({"type": "input_audio_buffer.commit"}))
    assert types(events(outs)) == ["input_audio_buffer.committed"]
    assert events(outs)[0]["item_id"] == evs[0]["item_id"]
    # The engine's segment is cut too, after the resampler's held-back tail;
    # the stream gets the client's audio and nothing else.
    assert_one_cut_after_audio(outs)
    client_16k = len(speech) // 2 // 2 * SAMPLE_RATE // INPUT_RATE
    assert abs(len(pushed(fed)) + len(pushed(outs)) - client_16k) <= 1
    # Nothing open: a commit is an error.
    (err,) = events(core.receive(json.dumps({"type": "input_audio_buffer.commit",
                                             "event_id": "c9"})))
    assert err["error"]["code"] == "input_audio_buffer_commit_empty"
    assert err["error"]["event_id"] == "c9"
    # Clear drops the open item: no committed, and its captions are ignored.
    # (A delta sent before the clear was sent: docs/protocol.md says so.)
    evs = events(feed(core, speech[: len(speech) // 2]))
    assert types(evs) == ["input_audio_buffer.speech_started"]
    (delta,) = events(core.on_engine_event(caption(1, "and welcome", "and")))
    assert (delta["item_id"], delta["delta"]) == (evs[0]["item_id"], "and")
    assert types(events(core.receive('{"type": "input_audio_buffer.clear"}'))) == [
        "input_audio_buffer.cleared"]
    assert core.segments_opened == 2
    evs = events(core.on_engine_event(caption(0, "Good evening", "", final=True)))
    assert types(evs)[-1] == "conversation.item.input_audio_transcription.completed"
    assert core.on_engine_event(caption(1, "and welcome", "", final=True)) == []


def test_clears_in_server_vad_mode_keep_the_streams_audio_whole() -> None:
    """docs/protocol.md: with server_vad every appended sample reaches the
    stream; a clear flushes the resampler's held-back tail into it, so 20
    clears in silence do not make the stream's timeline fall behind the
    client's (they cost 8-20 ms each when the tail was dropped)."""
    silence = b"\x00\x00" * (INPUT_RATE // 10)  # 100 ms
    core = new_core()
    core.start()
    outs: list[Output] = []
    for _ in range(20):
        outs += core.receive(append_msg(silence))
        outs += core.receive('{"type": "input_audio_buffer.clear"}')
    client_16k = 20 * SAMPLE_RATE // 10
    assert abs(len(pushed(outs)) - client_16k) <= 20, len(pushed(outs))  # rounding per run
    assert core.received_samples == len(pushed(outs))


def test_manual_commit_makes_one_item_of_the_buffer() -> None:
    core = new_core()
    core.start()
    core.receive(update_msg(None))
    # Nothing reaches the engine before the commit.
    assert feed(core, pcm24(speak(JUNK))) == []
    assert core.buffered_ms > 1000
    assert types(events(core.receive('{"type": "input_audio_buffer.clear"}'))) == [
        "input_audio_buffer.cleared"]
    assert core.buffered_ms == 0
    (err,) = events(core.receive('{"type": "input_audio_buffer.commit"}'))
    assert err["error"]["code"] == "input_audio_buffer_commit_empty"

    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.2)
    assert feed(core, pcm24(audio)) == []
    outs = core.receive('{"type": "input_audio_buffer.commit"}')
    evs = events(outs)
    assert types(evs) == ["input_audio_buffer.committed"]  # no VAD events in manual mode
    item = evs[0]["item_id"]
    # The buffer (no added silence), then the cut that closes its last segment.
    assert abs(len(pushed(outs)) - len(audio)) <= 1
    assert_one_cut_after_audio(outs)
    assert core.segments_opened == 2  # two segments of the stream, one item
    evs = events(core.on_engine_event(caption(0, SENTENCES[0], "", final=True)))
    assert types(evs) == ["conversation.item.input_audio_transcription.delta"]
    evs = events(core.on_engine_event(caption(1, SENTENCES[1], "", final=True)))
    assert types(evs)[-1] == "conversation.item.input_audio_transcription.completed"
    assert evs[-1]["item_id"] == item
    assert evs[-1]["transcript"] == " ".join(SENTENCES)
    assert abs(evs[-1]["usage"]["seconds"] - len(audio) / SAMPLE_RATE) < 0.05

    # A buffer of silence is an item with an empty transcript, at once.
    feed(core, b"\x00\x00" * INPUT_RATE)
    evs = events(core.receive('{"type": "input_audio_buffer.commit"}'))
    assert types(evs) == ["input_audio_buffer.committed",
                          "conversation.item.input_audio_transcription.completed"]
    assert evs[0]["previous_item_id"] == item
    assert evs[1]["transcript"] == ""


def test_a_manual_item_joins_chinese_segments_without_a_space() -> None:
    """An item of several segments joined their finals with spaces: a
    Chinese transcript read "你好。 我很好。", with a space Chinese is
    not written with. The deltas add up to the transcript."""
    core = new_core()
    core.start()
    core.receive(update_msg(None))
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.2)
    feed(core, pcm24(audio))
    evs = events(core.receive('{"type": "input_audio_buffer.commit"}'))
    assert types(evs) == ["input_audio_buffer.committed"]
    assert core.segments_opened == 2
    deltas: list[str] = []
    for ev in [caption(0, "你好。", "", final=True), caption(1, "[laughs]我很", "[laughs]我"),
               caption(1, "[laughs]我很好。", "", final=True)]:
        evs = events(core.on_engine_event(ev))
        deltas += [e["delta"] for e in evs if e["type"].endswith(".delta")]
    assert deltas == ["你好。", "[laughs]我", "很好。"]
    assert types(evs)[-1] == "conversation.item.input_audio_transcription.completed"
    assert evs[-1]["transcript"] == "你好。[laughs]我很好。"


def short_yes(pause_ms: int = 0) -> bytes:
    """A "Yes" clipped by push-to-talk, after 0.5 s of silence: speech the
    segmenter detects but holds less voiced audio than ``vad.min_speech_ms``.
    ``pause_ms`` of silence follow it (the button released a moment later);
    then the "Yes" is clipped harder (120 ms), as webrtcvad's own hangover
    calls a few frames of the silence after speech voiced."""
    yes = clipped_speech("Yes.", 120 if pause_ms else 200)
    yes = np.concatenate((yes, np.zeros(pause_ms * SAMPLE_RATE // 1000, np.int16)))
    vad = load_config().vad
    reference = Segmenter(vad)
    assert reference.feed(yes) == []  # a click to plain end of input
    # Under way, or already ended (as a click would) after end_silence_ms.
    ended = pause_ms >= vad.end_silence_ms + vad.frame_ms
    assert reference.state is (SegmenterState.IDLE if ended else SegmenterState.PENDING)
    return pcm24(yes)


def test_a_manual_commit_keeps_speech_shorter_than_min_speech() -> None:
    """The client says the buffer is an utterance: its short speech is a
    segment of the item, not a click dropped at the cut."""
    core = new_core()
    core.start()
    core.receive(update_msg(None))
    assert feed(core, short_yes()) == []
    outs = core.receive('{"type": "input_audio_buffer.commit"}')
    assert types(events(outs)) == ["input_audio_buffer.committed"]  # no empty completed
    assert_one_cut_after_audio(outs)
    assert [o for o in outs if isinstance(o, CutSegment)] == [CutSegment(keep_candidate=True)]
    assert core.segments_opened == 1
    evs = events(core.on_engine_event(caption(0, "Yes.", "", final=True)))
    assert evs[-1]["type"] == "conversation.item.input_audio_transcription.completed"
    assert evs[-1]["transcript"] == "Yes."


def test_a_server_vad_commit_makes_short_speech_a_turn() -> None:
    """Speech detected but not yet a turn (no ``speech_started``): a commit
    makes it one instead of refusing an empty buffer; a clear drops it."""
    core = new_core()
    core.start()
    assert events(feed(core, short_yes())) == []
    outs = core.receive('{"type": "input_audio_buffer.commit"}')
    evs = events(outs)
    assert types(evs) == ["input_audio_buffer.speech_started", "input_audio_buffer.committed"]
    assert evs[0]["item_id"] == evs[1]["item_id"]
    assert 500 - load_config().vad.pre_roll_ms - 30 <= evs[0]["audio_start_ms"] <= 500
    assert [o for o in outs if isinstance(o, CutSegment)] == [CutSegment(keep_candidate=True)]
    assert core.segments_opened == 1
    (done,) = events(core.on_engine_event(caption(0, "Yes.", "", final=True)))[-1:]
    assert (done["item_id"], done["transcript"]) == (evs[0]["item_id"], "Yes.")

    feed(core, short_yes())
    assert types(events(core.receive('{"type": "input_audio_buffer.clear"}'))) == [
        "input_audio_buffer.cleared"]
    assert core.segments_opened == 1
    (err,) = events(core.receive('{"type": "input_audio_buffer.commit"}'))
    assert err["error"]["code"] == "input_audio_buffer_commit_empty"


def test_a_commit_keeps_short_speech_that_ended_before_it() -> None:
    """Push-to-talk released a moment after a short "Yes": the speech ended
    (``vad.end_silence_ms`` of silence) before the commit, and nothing came
    after it. The commit still makes it the item (turn detection off) or a
    turn (server_vad); a turn after it drops it (the click filter)."""
    vad = load_config().vad
    core = new_core()
    core.start()
    core.receive(update_msg(None))
    assert feed(core, short_yes(pause_ms=700)) == []
    outs = core.receive('{"type": "input_audio_buffer.commit"}')
    assert types(events(outs)) == ["input_audio_buffer.committed"]  # no empty completed
    assert core.segments_opened == 1
    (done,) = events(core.on_engine_event(caption(0, "Yes.", "", final=True)))[-1:]
    assert done["transcript"] == "Yes."
    assert done["usage"]["seconds"] > 1.3  # the whole buffer: 0.5 s, "Ye", 0.7 s

    core = new_core()
    core.start()
    assert events(feed(core, short_yes(pause_ms=700))) == []
    outs = core.receive('{"type": "input_audio_buffer.commit"}')
    evs = events(outs)
    assert types(evs) == ["input_audio_buffer.speech_started", "input_audio_buffer.committed"]
    assert 500 - vad.pre_roll_ms - 30 <= evs[0]["audio_start_ms"] <= 500
    assert [o for o in outs if isinstance(o, CutSegment)] == [CutSegment(keep_candidate=True)]
    assert core.segments_opened == 1
    (done,) = events(core.on_engine_event(caption(0, "Yes.", "", final=True)))[-1:]
    assert (done["item_id"], done["transcript"]) == (evs[0]["item_id"], "Yes.")
    assert done["usage"]["seconds"] < 0.5 + vad.pre_roll_ms / 1000  # the speech, not the pause

    # Turn detection switched off meanwhile: it is speech not yet a turn,
    # kept in the buffer for the next manual commit, as speech under way is.
    core = new_core()
    core.start()
    feed(core, short_yes(pause_ms=700))
    outs = core.receive(update_msg(None))
    assert types(events(outs)) == ["session.updated"]
    assert not [o for o in outs if isinstance(o, CutSegment)]
    feed(core, b"\x00\x00" * INPUT_RATE)
    assert types(events(core.receive('{"type": "input_audio_buffer.commit"}'))) == [
        "input_audio_buffer.committed"]
    assert core.segments_opened == 1

    # A turn after it: that turn was the answer; the commit has nothing to add.
    core = new_core()
    core.start()
    yes = short_yes(pause_ms=700)
    yes_ms = len(yes) // 2 * 1000 // INPUT_RATE
    sentence = pcm24(np.concatenate((speak(SENTENCES[0]), np.zeros(SAMPLE_RATE, np.int16))))
    evs = events(feed(core, yes + sentence))
    assert types(evs)[:3] == ["input_audio_buffer.speech_started",
                              "input_audio_buffer.speech_stopped",
                              "input_audio_buffer.committed"]
    # The sentence's turn, without the "Yes".
    assert evs[0]["audio_start_ms"] >= yes_ms - vad.pre_roll_ms - vad.frame_ms
    (err,) = events(core.receive('{"type": "input_audio_buffer.commit"}'))
    assert err["error"]["code"] == "input_audio_buffer_commit_empty"
    assert core.segments_opened == 1


def test_a_commit_whose_held_back_tail_ends_the_turn_is_not_refused() -> None:
    """A commit pushes the resampler's held-back tail (~30 ms) first; where
    that tail completed ``vad.end_silence_ms`` of silence, the turn ended
    there (speech_stopped, committed) and the commit then found no speech
    and answered ``input_audio_buffer_commit_empty`` too: an error for the
    speech it did commit, decided by 30 ms of filter delay (found by the
    stateful test)."""
    speech = pcm24(np.concatenate((speak(SENTENCES[0]), np.zeros(SAMPLE_RATE, np.int16))))
    ended_by_tail = 0
    for ms in range(400, 1000, 10):  # where the pause ends the turn: 10 ms steps
        core = new_core()
        core.start()
        before = types(events(feed(core, speech[: len(speech) - INPUT_RATE * 2 * ms // 1000])))
        if "input_audio_buffer.committed" in before:
            continue  # ended before the commit: that one is refused, rightly
        evs = types(events(core.receive('{"type": "input_audio_buffer.commit"}')))
        assert evs in (["input_audio_buffer.committed"],
                       ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]), (
            ms, evs)
        ended_by_tail += evs[0] == "input_audio_buffer.speech_stopped"
    assert ended_by_tail  # the case this is about came up


def test_switching_turn_detection_off_commits_the_open_turn() -> None:
    speech = pcm24(speak(SENTENCES[0]))
    core = new_core()
    core.start()
    assert types(events(feed(core, speech[: len(speech) // 2]))) == [
        "input_audio_buffer.speech_started"]
    assert types(events(core.receive(update_msg(None)))) == [
        "input_audio_buffer.committed", "session.updated"]
    # Back on: audio held meanwhile is pushed as live audio.
    assert feed(core, speech) == []
    outs = core.receive(update_msg({"type": "server_vad"}))
    assert len(pushed(outs)) > 0
    assert types(events(outs)) == ["input_audio_buffer.speech_started", "session.updated"]



def test_switching_turn_detection_off_cuts_where_the_clients_audio_stands() -> None:
    """As a commit does: the resampler's held-back tail (~30 ms) belongs to
    the turn being committed, not to the next manual item."""
    speech = pcm24(speak(SENTENCES[0]))
    half = speech[: len(speech) // 4 * 2]
    client_16k = len(half) // 2 * SAMPLE_RATE // INPUT_RATE
    for switch in ('{"type": "input_audio_buffer.commit"}', update_msg(None)):
        core = new_core()
        core.start()
        outs = feed(core, half)
        outs += core.receive(switch)
        assert types(events(outs))[1] == "input_audio_buffer.committed"
        assert abs(len(pushed(outs)) - client_16k) <= 1, switch


def unconfirmed_speech() -> tuple[bytes, bytes]:
    """1 s of silence and the first 200 ms of a sentence (speech detected,
    shorter than ``vad.min_speech_ms``: no ``speech_started`` yet), then the
    rest of the sentence."""
    speech = pcm24(speak(SENTENCES[0]))
    head = INPUT_RATE * 2  # 1 s of silence
    lead = b"\x00\x00" * INPUT_RATE + speech
    split = head + INPUT_RATE * 2 // 5  # 200 ms of speech
    return lead[:split], lead[split:]


def test_switching_turn_detection_off_keeps_unconfirmed_speech_in_the_buffer() -> None:
    """Speech not yet confirmed as a turn is no turn to commit, and not lost:
    it opens the next manual item, or the next turn when turn detection
    comes back on, with the client's times."""
    vad = load_config().vad
    head, rest = unconfirmed_speech()
    core = new_core()
    core.start()
    outs = feed(core, head)
    outs += core.receive(update_msg(None))
    assert types(events(outs)) == ["session.updated"]
    reference = Segmenter(vad)
    reference.feed(pushed(outs))
    assert reference.state is SegmenterState.PENDING  # a candidate, unconfirmed
    assert core.buffered_ms >= 200
    assert feed(core, rest) == []
    evs = events(core.receive('{"type": "input_audio_buffer.commit"}'))
    assert types(evs) == ["input_audio_buffer.committed"]
    assert core.segments_opened == 1
    # The item's one segment starts with the candidate: it holds the whole
    # sentence (and the pre-roll), not its tail from the switch on.
    (done,) = events(core.on_engine_event(caption(0, "words", "", final=True)))[-1:]
    assert done["item_id"] == evs[0]["item_id"]
    sentence_s = len(rest) / 2 / INPUT_RATE + 0.2
    assert done["usage"]["seconds"] >= sentence_s, done

    # Back on before a commit: the candidate goes on as a turn from its start.
    core = new_core()
    core.start()
    feed(core, head)
    core.receive(update_msg(None))
    feed(core, rest)
    evs = events(core.receive(update_msg({"type": "server_vad"})))
    (started,) = [e for e in evs if e["type"] == "input_audio_buffer.speech_started"]
    assert 1000 - vad.pre_roll_ms - 60 <= started["audio_start_ms"] <= 1000 + 60, started

    # A clear drops it: nothing of it reaches the next item.
    core = new_core()
    core.start()
    feed(core, head)
    core.receive(update_msg(None))
    assert types(events(core.receive('{"type": "input_audio_buffer.clear"}'))) == [
        "input_audio_buffer.cleared"]
    assert core.buffered_ms == 0
    (err,) = events(core.receive('{"type": "input_audio_buffer.commit"}'))
    assert err["error"]["code"] == "input_audio_buffer_commit_empty"


def test_a_commit_right_after_switching_off_makes_the_kept_speech_its_item() -> None:
    """A commit with only the speech kept at the switch (no append since)
    pushed nothing, so its item did not collect the segment the cut
    confirmed: the client got speech_started/speech_stopped (never sent
    with turn detection off) and a second item committed *before* its own,
    which completed at once with an empty transcript."""
    head, _ = unconfirmed_speech()
    core = new_core()
    core.start()
    feed(core, head)
    core.receive(update_msg(None))
    evs = events(core.receive('{"type": "input_audio_buffer.commit"}'))
    assert types(evs) == ["input_audio_buffer.committed"], evs
    assert core.segments_opened == 1
    (done,) = events(core.on_engine_event(caption(0, "yes", "", final=True)))[-1:]
    assert (done["item_id"], done["transcript"]) == (evs[0]["item_id"], "yes"), done


def test_audio_refused_as_buffer_full_leaves_a_hole_in_client_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Later audio keeps its own client times: speech appended after 5.0 s
    of client audio (3 s of it refused) starts near 5.0 s, not 2.0 s."""
    monkeypatch.setattr(realtime.core, "MAX_BUFFER_S", 3.0)
    core = new_core()
    core.start()
    core.receive(update_msg(None))
    silence = b"\x00\x00" * INPUT_RATE  # 1 s
    feed(core, silence)
    (err,) = events(core.receive(append_msg(silence * 3)))
    assert err["error"]["code"] == "input_audio_buffer_full"
    feed(core, silence + pcm24(speak(SENTENCES[0])))
    evs = events(core.receive(update_msg({"type": "server_vad"})))
    (started,) = [e for e in evs if e["type"] == "input_audio_buffer.speech_started"]
    # Speech starts a little after 5.0 s; pre-roll reaches back up to 300 ms.
    assert started["audio_start_ms"] >= 5000 - 300 - 60, started


def test_a_commit_never_refuses_audio_its_appends_were_allowed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The resampler holds back ~30 ms of each append until the commit: a
    buffer filled to the cap by appends that were all accepted lost that
    tail at the commit, which answered ``input_audio_buffer_full`` (this
    audio was dropped) as well as ``committed`` (found by the stateful
    test)."""
    monkeypatch.setattr(realtime.core, "MAX_BUFFER_S", 1.0)
    core = new_core()
    core.start()
    core.receive(update_msg(None))
    appended = b"\x00\x00" * (INPUT_RATE * 101 // 100)  # 1.01 s
    assert feed(core, appended) == []  # within the cap: accepted
    outs = core.receive('{"type": "input_audio_buffer.commit", "event_id": "c1"}')
    assert types(events(outs)) == ["input_audio_buffer.committed",
                                   "conversation.item.input_audio_transcription.completed"]
    assert abs(len(pushed(outs)) - len(appended) // 2 * SAMPLE_RATE // INPUT_RATE) <= 1


def test_an_append_refused_as_buffer_full_drops_its_own_audio_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal was decided on the resampler's output: the last ~30 ms
    of the accepted append before it (held back in the filter) were
    dropped with it, and the refused append's own last ~30 ms were held and
    committed (found by the stateful test)."""
    monkeypatch.setattr(realtime.core, "MAX_BUFFER_S", 1.0)
    speech = speak(SENTENCES[0])[: SAMPLE_RATE * 9 // 10]  # 0.9 s, voiced to its end
    core = new_core()
    core.start()
    core.receive(update_msg(None))
    assert feed(core, pcm24(speech)) == []
    (err,) = events(core.receive(append_msg(b"\x00\x00" * (INPUT_RATE // 2))))
    assert err["error"]["code"] == "input_audio_buffer_full"
    outs = core.receive('{"type": "input_audio_buffer.commit"}')
    assert types(events(outs)) == ["input_audio_buffer.committed"]
    got = pushed(outs).astype(np.float64)
    want = resample(resample(speech, SAMPLE_RATE, INPUT_RATE), INPUT_RATE,
                    SAMPLE_RATE).astype(np.float64)
    assert abs(len(got) - len(want)) <= 1
    n = min(len(got), len(want))
    tail = SAMPLE_RATE // 20  # the last 50 ms: the accepted speech, not silence
    assert np.sqrt(np.mean(got[n - tail:n] ** 2)) > 0.5 * np.sqrt(np.mean(want[n - tail:n] ** 2))
    # The refused half second is a hole in client time, to the sample.
    assert core.received_samples == len(want) + SAMPLE_RATE // 2


def test_an_event_id_that_is_not_utf8_is_echoed_so_it_can_be_sent() -> None:
    core = new_core()
    core.start()
    (err,) = core.receive(json.dumps({"type": "nope", "event_id": "a\ud800"}))
    assert isinstance(err, RealtimeError)
    text = encode_server_event(err)
    text.encode("utf-8")  # what the WebSocket layer must do with it
    assert json.loads(text)["error"]["event_id"] == "a?"


# --- over sockets, with the openai SDK ------------------------------------------------


def sdk_client(port: int) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="test", base_url=f"http://127.0.0.1:{port}/v1",
                       websocket_base_url=f"ws://127.0.0.1:{port}/v1")


async def until(conn: AsyncRealtimeConnection, last: str, count: int = 1,
                seen: list[Any] | None = None) -> list[Any]:
    """Events up to and including the ``count``-th of type ``last``."""
    got: list[Any] = [] if seen is None else seen
    n = 0
    async with asyncio.timeout(60):
        async for event in conn:
            got.append(event)
            if event.type == last:
                n += 1
                if n == count:
                    break
    return got


async def send_paced(conn: AsyncRealtimeConnection, data: bytes, speed: float = 4.0,
                     engine: Engine | None = None) -> None:
    """``data`` in 100 ms appends, ``speed`` times real time at most. With
    ``engine``, each append waits until its model worker has answered every
    request made so far (:func:`worker_idle`)."""
    step = INPUT_RATE * 2 // 10  # 100 ms
    for i in range(0, len(data), step):
        if engine is not None:
            async with asyncio.timeout(60):
                while not worker_idle(engine):
                    await asyncio.sleep(0.01)
        await conn.input_audio_buffer.append(audio=base64.b64encode(data[i:i + step]).decode())
        await asyncio.sleep(0.1 / speed)


def worker_idle(engine: Engine) -> bool:
    """Every request the model worker took is answered or dropped: none
    waits, none is in a backend call."""
    w = engine.stats().worker
    return w.submitted == w.decoded + w.failed + w.superseded + w.cancelled


async def vad_session(port: int, engine: Engine) -> list[Any]:
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.2)
    async with sdk_client(port).realtime.connect(
            model="evoxtral", extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(session={
            "type": "transcription",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                "turn_detection": {"type": "server_vad"}}}})
        # Twice real time, but no faster than the model keeps up: a worker
        # behind (a loaded machine, the 20x session beside this one) thins
        # the partials, and deltas need two partials to agree, so on a slow
        # enough machine none would come before the turn ends. Waiting for
        # the worker holds "deltas come while the person speaks" where the
        # engine has the time to decode the partials, whatever the CPU.
        sender = asyncio.ensure_future(send_paced(conn, pcm24(audio), speed=2.0,
                                                  engine=engine))
        events = await until(conn, "conversation.item.input_audio_transcription.completed", 2)
        await sender
    return events


async def manual_session(port: int) -> list[Any]:
    async with sdk_client(port).realtime.connect(
            model="evoxtral", extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(session={
            "type": "transcription", "audio": {"input": {"turn_detection": None}}})
        # Four bad messages; the session survives them all.
        await conn.send_raw("{not json")
        await conn.send_raw(json.dumps({"type": "bogus", "event_id": "evt_bad"}))
        await conn.input_audio_buffer.append(audio="not base64 at all!")
        await conn.session.update(session={
            "type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}}}})
        await conn.input_audio_buffer.commit(event_id="evt_empty")
        # Speech that is cleared never shows up.
        await send_paced(conn, pcm24(speak(JUNK)), speed=20)
        await conn.input_audio_buffer.clear()
        await send_paced(conn, pcm24(speak(MANUAL)), speed=20)
        await conn.input_audio_buffer.commit()
        return await until(conn, "conversation.item.input_audio_transcription.completed")


async def finals_until_ended(
        sub: ClientConnection) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The final captions a subscriber receives up to its stream's
    stream.ended, and that stream.ended."""
    finals: list[dict[str, Any]] = []
    while (msg := json.loads(await asyncio.wait_for(sub.recv(), 20)))["type"] \
            != "stream.ended":
        if msg["type"] == "caption" and msg["final"]:
            finals.append(msg)
    return finals, msg


async def test_openai_sdk_transcribes_with_server_vad_and_manual_commit(
    whisper_backend: Backend,
) -> None:
    cfg = config()
    async with Engine(cfg, whisper_backend) as engine, \
            CaptionServer(engine, cfg.server) as server:
        vad, manual = await asyncio.gather(vad_session(server.port, engine),
                                           manual_session(server.port))
        # Leaving, each session closes its engine stream.
        async with asyncio.timeout(10):
            while engine.streams:
                await asyncio.sleep(0.05)

    # -- server_vad ---------------------------------------------------------------
    kinds = [e.type for e in vad]
    assert kinds[:2] == ["session.created", "session.updated"]
    assert vad[0].session.type == "transcription"
    assert vad[1].session.audio.input.turn_detection.type == "server_vad"
    assert "error" not in kinds
    assert len({e.event_id for e in vad}) == len(vad)

    def of(kind: str, events: list[Any]) -> list[Any]:
        return [e for e in events if e.type == f"input_audio_buffer.{kind}"
                or e.type == f"conversation.item.input_audio_transcription.{kind}"]

    started, stopped, committed = of("speech_started", vad), of("speech_stopped", vad), \
        of("committed", vad)
    completed = of("completed", vad)
    assert len(started) == len(stopped) == len(committed) == len(completed) == 2
    assert committed[0].previous_item_id is None
    assert committed[1].previous_item_id == committed[0].item_id
    for i, sentence in enumerate(SENTENCES):
        item = started[i].item_id
        assert stopped[i].item_id == committed[i].item_id == completed[i].item_id == item
        assert started[i].audio_start_ms < stopped[i].audio_end_ms
        assert vad.index(started[i]) < vad.index(stopped[i]) < vad.index(committed[i]) \
            < vad.index(completed[i])
        deltas = [e.delta for e in of("delta", vad) if e.item_id == item]
        assert deltas, "no delta for an item"
        # Deltas are the stable text as it grew, and add up to the transcript.
        assert "".join(deltas) == completed[i].transcript
        assert loose_wer(sentence, completed[i].transcript) <= 0.25, completed[i].transcript
    assert started[1].audio_start_ms > stopped[0].audio_end_ms
    # Deltas come while the person speaks, before the turn has ended.
    assert any(vad.index(e) < vad.index(stop) for stop in stopped for e in of("delta", vad)
               if e.item_id == stop.item_id)

    # -- manual commit, with bad messages on the way ----------------------------------
    kinds = [e.type for e in manual]
    assert kinds[:2] == ["session.created", "session.updated"]
    assert manual[1].session.audio.input.turn_detection is None
    errors = [e.error for e in manual if e.type == "error"]
    assert [(e.code, e.param, e.event_id) for e in errors] == [
        ("invalid_json", None, None),
        ("invalid_value", "type", "evt_bad"),
        ("invalid_value", "audio", None),
        ("invalid_value", "session.audio.input.format.type", None),
        ("input_audio_buffer_commit_empty", None, "evt_empty"),
    ]
    assert all(e.type == "invalid_request_error" for e in errors)
    assert "input_audio_buffer.speech_started" not in kinds
    assert kinds.count("input_audio_buffer.cleared") == 1
    (commit,) = of("committed", manual)
    (done,) = of("completed", manual)
    assert done.item_id == commit.item_id
    assert loose_wer(MANUAL, done.transcript) <= 0.25, done.transcript
    assert "ignore" not in done.transcript.lower()
    assert len({e.event_id for e in manual}) == len(manual)


async def until_transcript(conn: AsyncRealtimeConnection) -> list[Any]:
    """Events up to the first transcript (``completed``) or error."""
    got: list[Any] = []
    async with asyncio.timeout(30):
        async for event in conn:
            got.append(event)
            if event.type in ("error", "conversation.item.input_audio_transcription.completed"):
                break
    return got


async def push_to_talk(backend: Backend, turn_detection: dict[str, str] | None,
                       audio: bytes) -> list[Any]:
    """``audio`` appended and committed once through /v1/realtime (the openai
    SDK) with ``turn_detection``: the events up to its transcript or error."""
    cfg = config()
    async with Engine(cfg, backend) as engine, \
            CaptionServer(engine, cfg.server) as server, \
            sdk_client(server.port).realtime.connect(
                model="evoxtral", extra_query={"intent": "transcription"}) as conn:
        session: Any = {"type": "transcription",
                        "audio": {"input": {"turn_detection": turn_detection}}}
        await conn.session.update(session=session)
        await conn.input_audio_buffer.append(audio=base64.b64encode(audio).decode())
        await conn.input_audio_buffer.commit()
        return await until_transcript(conn)


@pytest.mark.parametrize("turn_detection", [None, {"type": "server_vad"}])
async def test_a_push_to_talk_yes_shorter_than_min_speech_is_transcribed(
    whisper_backend: Backend, turn_detection: dict[str, str] | None,
) -> None:
    """A clipped "Yes" committed by hand: the answer, not an empty transcript
    (turn detection off) or an empty-buffer error (server_vad)."""
    got = await push_to_talk(whisper_backend, turn_detection, short_yes())
    assert got[-1].type != "error", got[-1]
    done = got[-1]
    assert done.transcript.lower().startswith("ye"), done.transcript  # Whisper: "Yeah."


@pytest.mark.parametrize("turn_detection", [None, {"type": "server_vad"}])
async def test_a_push_to_talk_yes_released_after_a_pause_is_transcribed(
    turn_detection: dict[str, str] | None,
) -> None:
    """Push-to-talk released 700 ms after a short "Yes" (past
    ``vad.end_silence_ms``): the commit still transcribes it, with the
    speech's own segment (pre-roll, the "Yes", end tail; not the pause).
    Whisper tiny hears a 120 ms "Ye" as "(beep)", so the backend says "Yes."
    for any audio louder than silence."""
    vad = load_config().vad
    yes = short_yes(pause_ms=700)
    # Where the speech's segment would be if it were long enough.
    reference = Segmenter(dataclasses.replace(vad, min_speech_ms=0))
    evs = reference.feed(resample(np.frombuffer(yes, "<i2").astype(np.int16), INPUT_RATE,
                                  SAMPLE_RATE))
    (start,) = [e.sample for e in evs if isinstance(e, SpeechStarted)]
    (end,) = [e.sample for e in evs if isinstance(e, SpeechEnded)]
    backend = ScriptedBackend(lambda a: "Yes." if len(a) and np.abs(a).max() > 0.05 else "")
    got = await push_to_talk(backend, turn_detection, yes)
    assert got[-1].type != "error", got[-1]
    assert got[-1].transcript == "Yes."
    # The speech's segment (pre-roll, voiced frames, end tail: about 0.7 s),
    # not the pause after it.
    frame = vad.frame_ms * SAMPLE_RATE // 1000
    assert abs(backend.batches[-1][0] - (end - start)) <= frame, backend.batches
    if turn_detection is not None:
        (started,) = [e for e in got if e.type == "input_audio_buffer.speech_started"]
        assert abs(started.audio_start_ms - start * 1000 // SAMPLE_RATE) <= vad.frame_ms


async def test_the_sdk_picks_the_language_of_its_session() -> None:
    cfg = config()
    backend = LanguageScriptedBackend(lambda a: "words")
    async with Engine(cfg, backend) as engine, CaptionServer(engine, cfg.server) as server, \
            sdk_client(server.port).realtime.connect(
                model="evoxtral", extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(session={
            "type": "transcription",
            "audio": {"input": {"transcription": {"model": "evoxtral", "language": "fr"},
                                "turn_detection": None}}})
        await send_paced(conn, pcm24(speak(MANUAL)), speed=20)
        await conn.input_audio_buffer.commit()
        got = await until(conn, "conversation.item.input_audio_transcription.completed")
        updated = next(e for e in got if e.type == "session.updated")
        assert updated.session.audio.input.transcription.language == "fr"
        assert got[-1].transcript == "fr: words"
        await conn.session.update(session={
            "type": "transcription",
            "audio": {"input": {"transcription": {"language": "ja"}}}})
        err = await until(conn, "error")
        assert err[-1].error.param == "session.audio.input.transcription.language"
    assert {j.language for j in backend.jobs} == {"fr"}


async def test_an_update_s_language_applies_to_the_audio_its_turn_detection_moves() -> None:
    """An update's language applies to every turn not ended when it
    arrives (docs/protocol.md), the ones its own turn detection switch
    moves included: the open turn that switching off ends, and the held
    audio that switching on hands to server VAD."""
    cfg = config()
    backend = LanguageScriptedBackend(lambda a: "words")
    speech = speak(MANUAL)
    speech = speech[:voiced_span(speech)[1]]  # no pause after it: the turn stays open
    async with Engine(cfg, backend) as engine, CaptionServer(engine, cfg.server) as server, \
            sdk_client(server.port).realtime.connect(
                model="evoxtral", extra_query={"intent": "transcription"}) as conn:
        await send_paced(conn, pcm24(speech), speed=20)
        await until(conn, "input_audio_buffer.speech_started")
        await conn.session.update(session={
            "type": "transcription",
            "audio": {"input": {"transcription": {"language": "fr"}, "turn_detection": None}}})
        got = await until(conn, "conversation.item.input_audio_transcription.completed")
        assert not [e for e in got if e.type == "input_audio_buffer.speech_stopped"], got
        assert got[-1].transcript == "fr: words"
        # Held for a commit, then handed to server VAD by a switch to German.
        await send_paced(conn, pcm24(np.concatenate([speech, np.zeros(SAMPLE_RATE, np.int16)])),
                         speed=20)
        await conn.session.update(session={
            "type": "transcription", "audio": {"input": {
                "transcription": {"language": "de"}, "turn_detection": {"type": "server_vad"}}}})
        got = await until(conn, "conversation.item.input_audio_transcription.completed")
        assert got[-1].transcript == "de: words"


@pytest.fixture
async def scripted() -> AsyncIterator[CaptionServer]:
    cfg = config()
    async with Engine(cfg, ScriptedBackend(lambda a: "scripted words")) as engine, \
            CaptionServer(engine, cfg.server) as server:
        yield server


@pytest.mark.parametrize("query", ["", "?intent=conversation", "?model=gpt-realtime"])
async def test_only_transcription_sessions_are_served(
    scripted: CaptionServer, query: str,
) -> None:
    async with connect(f"ws://127.0.0.1:{scripted.port}/v1/realtime{query}") as ws:
        err = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert err["type"] == "error"
        assert err["error"]["code"] == "unsupported_intent"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 1008


async def test_a_bad_event_id_gets_its_error_and_the_session_goes_on(
        scripted: CaptionServer) -> None:
    url = f"ws://127.0.0.1:{scripted.port}/v1/realtime?intent=transcription"
    async with connect(url) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "session.created"
        await ws.send(json.dumps({"type": "nope", "event_id": "\ud800"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "error"
        await ws.send(update_msg(None))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "session.updated"


async def test_a_client_behind_on_its_events_is_closed_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its events wait in a queue of ``server.subscriber_queue``; a client that
    falls that far behind is closed with 1013 and its stream ends, while it
    is still sending. Its answer to the close, behind what it sent that
    nothing reads any more, ends the connection at once."""
    # The 1013 comes behind what the server still holds for the client (half
    # a megabyte), and the 2 s close handshake cut a reader a loaded machine
    # held back before it read that far. The client answers the close, so a
    # long handshake costs nothing.
    monkeypatch.setattr(app, "CLOSE_TIMEOUT_S", 60.0)
    cfg = config(**{"server.subscriber_queue": 8})
    # Each gets an error that echoes its 30 kB event_id.
    bad = client_text_frame(json.dumps({"type": "nope", "event_id": "x" * 30_000}))
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        deaf = await asyncio.to_thread(
            raw_ws_handshake, server.port, "/v1/realtime?intent=transcription&stream=deaf")

        try:
            async with asyncio.timeout(10):
                while "deaf" not in engine.streams:
                    await asyncio.sleep(0.01)
            await asyncio.to_thread(send_until_closed, deaf, bad,
                                    lambda: "deaf" in engine.streams, time.monotonic() + 30)
            assert "deaf" not in engine.streams, "the server kept the client open"
            assert await answer_close(deaf, lambda: bool(server._live), 10) == 1013
        finally:
            deaf.close()


async def test_a_client_too_slow_mid_output_still_gives_the_stream_its_audio() -> None:
    """The connection stopped at the first event its full queue refused, so
    audio and cuts after that event in the same batch of outputs never
    reached the stream, though the core counted them pushed: audio lost for
    the stream's other subscribers and its finals. Its queue, which will not
    drain, no longer holds up the shutdown's flush."""
    from evoxtral_stream.server.realtime.connection import _Connection

    cfg = config(**{"server.subscriber_queue": 1})
    broadcaster = Broadcaster(1, encode_event)
    async with Engine(cfg, ScriptedBackend()) as engine:
        stream = engine.open_stream("rt")
        core = new_core()
        conn = _Connection(cast(Any, SimpleNamespace(remote_address=("x", 1))), engine, core,
                           stream, cfg.server, broadcaster)
        broadcaster.add_outbox(conn._queue)  # as run() does
        speech = speak(SENTENCES[0])
        outputs: list[Output] = [
            *core.receive('{"type": "nope"}'), *core.receive('{"type": "nope"}'),
            PushAudio(speech), CutSegment()]
        conn._deliver(outputs)
        assert conn._overflow.is_set()
        assert stream.session.stats().samples_in == len(speech)
        assert stream.session.stats().finals_requested == 1
        assert await asyncio.wait_for(broadcaster.flush(30), 5) == 0
        await stream.close()


async def test_a_client_too_slow_leaves_its_finals_and_nothing_else_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/protocol.md: a session that falls ``server.subscriber_queue``
    events behind is closed with 1013, reason ``client too slow``; the audio
    already in its stream still becomes finals for ``/v1/captions``
    subscribers and the journal (with server_vad all of it: here a turn still
    open when the client is dropped, whose final is requested only then);
    the connection leaves no outbox, engine listener or task behind."""
    # As in test_a_client_behind_on_its_events_is_closed_at_once: the client
    # answers the close frame it reads behind the server's backlog, which a
    # loaded machine may hold back past the 2 s handshake.
    monkeypatch.setattr(app, "CLOSE_TIMEOUT_S", 60.0)
    cfg = config(**{"server.subscriber_queue": 8, "journal.enabled": True,
                    "journal.dir": str(tmp_path / "j")})
    speech = speak(MANUAL)
    pcm = pcm24(speech[:voiced_span(speech)[1]])  # no pause after it: the turn stays open
    step = INPUT_RATE * 2 // 10
    appends = b"".join(client_text_frame(append_msg(pcm[i:i + step]))
                       for i in range(0, len(pcm), step))
    # Each gets an error that echoes its 30 kB event_id.
    bad = client_text_frame(json.dumps({"type": "nope", "event_id": "x" * 30_000}))
    async with Engine(cfg, ScriptedBackend(lambda a: "scripted words")) as engine, \
            CaptionServer(engine, cfg.server) as server, \
            connect(f"ws://127.0.0.1:{server.port}/v1/captions?stream=deaf") as sub:
        assert json.loads(await asyncio.wait_for(sub.recv(), 10))["type"] == "hello"
        listeners, tasks = list(engine._listeners), asyncio.all_tasks()
        deaf = await asyncio.to_thread(
            raw_ws_handshake, server.port, "/v1/realtime?intent=transcription&stream=deaf")
        try:
            await asyncio.to_thread(deaf.sendall, appends)
            async with asyncio.timeout(10):
                while ("deaf" not in engine.streams
                       or engine.streams["deaf"].session.stats().samples_in
                       < len(pcm) // 2 * SAMPLE_RATE // INPUT_RATE - SAMPLE_RATE // 10):
                    await asyncio.sleep(0.01)
            assert engine.streams["deaf"].session.stats().segments == 1
            assert engine.streams["deaf"].session.stats().finals_requested == 0
            await asyncio.to_thread(send_until_closed, deaf, bad,
                                    lambda: "deaf" in engine.streams, time.monotonic() + 30)
            assert "deaf" not in engine.streams, "the server kept the client open"
            _, frame = await asyncio.to_thread(read_slowly_to_close, deaf, 0)
            assert frame == (1013, "client too slow")
        finally:
            deaf.close()
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(20):
            while not got or got[-1]["type"] != "stream.ended":
                got.append(json.loads(await sub.recv()))
        finals = [m for m in got if m["type"] == "caption" and m["final"]]
        assert [(m["segment"], m["text"]) for m in finals] == [(0, "scripted words")], got
        assert got[-1]["finals"] == 1
        # Nothing of the connection is left: its queue is no outbox of the
        # shutdown's flush, its listener is gone, and so are its tasks.
        assert not server.broadcaster._outboxes
        assert engine._listeners == listeners
        async with asyncio.timeout(10):
            while left := {t for t in asyncio.all_tasks() - tasks if not t.done()}:
                await asyncio.sleep(0.01)
        assert not left
    # The journal's lines of finals are their caption messages.
    journaled = [json.loads(line) for f in (tmp_path / "j").glob("deaf.*")
                 for line in f.read_text().splitlines()]
    assert [(m["segment"], m["text"]) for m in journaled if m["type"] == "caption"] == [
        (0, "scripted words")], journaled


async def test_beta_update_and_a_named_stream(scripted: CaptionServer) -> None:
    url = f"ws://127.0.0.1:{scripted.port}/v1/realtime?intent=transcription&stream=desk"
    async with connect(url) as ws:
        created = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert created["type"] == "session.created"
        await ws.send(json.dumps({"type": "transcription_session.update",
                                  "session": {"input_audio_format": "pcm16",
                                              "turn_detection": None}}))
        updated = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert updated["type"] == "transcription_session.updated"
        assert updated["session"]["turn_detection"] is None
        # A second session cannot take the same stream.
        async with connect(url) as other:
            err = json.loads(await asyncio.wait_for(other.recv(), 10))
            assert err["error"]["code"] == "stream_busy"
        await ws.send(append_msg(pcm24(speak(MANUAL))))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        got: list[dict[str, Any]] = []
        while not got or got[-1]["type"] != \
                "conversation.item.input_audio_transcription.completed":
            got.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
        assert got[0]["type"] == "input_audio_buffer.committed"
        assert got[-1]["transcript"] == "scripted words"


@pytest.mark.parametrize(("stream", "why"), [
    ("a" * 129, "a stream id has 1 to 128 characters"),
    ("rtl%E2%80%8Fmark", "a stream id holds no invisible format characters"),
])
async def test_an_unusable_stream_id_is_refused(scripted: CaptionServer, stream: str,
                                                why: str) -> None:
    url = f"ws://127.0.0.1:{scripted.port}/v1/realtime?intent=transcription&stream={stream}"
    async with connect(url) as ws:
        err = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert (err["error"]["code"], err["error"]["param"]) == ("invalid_value", "stream")
        assert err["error"]["message"].startswith(why)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 1008


async def test_unconfirmed_speech_at_switch_off_is_transcribed_in_the_next_item() -> None:
    """Turn detection switched off 200 ms into speech (no ``speech_started``
    yet): the committed item is transcribed from where that speech began,
    as subscribers of the stream see too."""
    cfg = config()
    async with Engine(cfg, ScriptedBackend(lambda a: f"{len(a)} samples")) as engine, \
            CaptionServer(engine, cfg.server) as server:
        port = server.port
        head, rest = unconfirmed_speech()
        async with connect(f"ws://127.0.0.1:{port}/v1/captions?stream=late") as sub:
            assert json.loads(await asyncio.wait_for(sub.recv(), 10))["type"] == "hello"
            url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription&stream=late"
            async with connect(url) as ws:
                assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == \
                    "session.created"
                await ws.send(append_msg(head))
                await ws.send(update_msg(None))
                await ws.send(append_msg(rest))
                await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                got: list[dict[str, Any]] = []
                while not got or got[-1]["type"] != \
                        "conversation.item.input_audio_transcription.completed":
                    got.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
            finals, _ = await finals_until_ended(sub)
    assert [e["type"] for e in got] == [
        "session.updated", "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed"]
    # The whole sentence was transcribed: the speech from 1.0 s, pre-roll before it.
    sentence = len(rest) // 2 * SAMPLE_RATE // INPUT_RATE + SAMPLE_RATE // 5
    decoded = int(got[-1]["transcript"].split()[0])
    assert decoded >= sentence, (decoded, sentence)
    (final,) = finals
    assert final["start"] <= 1.0 < final["end"], final


async def test_commits_add_nothing_to_the_streams_timeline(scripted: CaptionServer) -> None:
    """Two commits mid-speech: subscribers of the stream see two finals within
    the client's own audio, and the stream lasts exactly that long."""
    speech = pcm24(speak(SENTENCES[0]))
    half = len(speech) // 4 * 2
    client_s = len(speech) / 2 / INPUT_RATE
    port = scripted.port
    async with connect(f"ws://127.0.0.1:{port}/v1/captions?stream=cuts") as sub:
        hello = json.loads(await asyncio.wait_for(sub.recv(), 10))
        assert hello["type"] == "hello"
        url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription&stream=cuts"
        async with connect(url) as ws:
            for part in (speech[:half], speech[half:]):
                await ws.send(append_msg(part))
                await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                while json.loads(await asyncio.wait_for(ws.recv(), 20))["type"] != \
                        "conversation.item.input_audio_transcription.completed":
                    pass
        finals, ended = await finals_until_ended(sub)
    assert len(finals) == 2
    assert finals[0]["end"] <= finals[1]["start"] + 1e-6
    # A padded commit would have put about a second of silence after each cut.
    assert finals[1]["start"] - finals[0]["end"] < 0.35  # at most the pre-roll
    assert finals[1]["end"] <= client_s + 0.05
    assert abs(ended["duration"] - client_s) < 0.05


async def test_clears_move_no_caption_off_the_clients_time(scripted: CaptionServer) -> None:
    """Silence appended with a clear after every 100 ms, then a sentence: its
    final on /v1/captions starts where speech_started says it does in the
    client's audio, and the stream lasts as long as the client's audio."""
    clears = 30
    silence = b"\x00\x00" * (INPUT_RATE // 10)
    speech = pcm24(speak(SENTENCES[0])) + b"\x00\x00" * INPUT_RATE
    client_s = clears / 10 + len(speech) / 2 / INPUT_RATE
    port = scripted.port
    async with connect(f"ws://127.0.0.1:{port}/v1/captions?stream=clears") as sub:
        assert json.loads(await asyncio.wait_for(sub.recv(), 10))["type"] == "hello"
        url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription&stream=clears"
        async with connect(url) as ws:
            for _ in range(clears):
                await ws.send(append_msg(silence))
                await ws.send('{"type": "input_audio_buffer.clear"}')
            await ws.send(append_msg(speech))
            await ws.send('{"type": "input_audio_buffer.commit"}')
            started: dict[str, Any] | None = None
            while (msg := json.loads(await asyncio.wait_for(ws.recv(), 20)))["type"] != \
                    "conversation.item.input_audio_transcription.completed":
                if msg["type"] == "input_audio_buffer.speech_started":
                    started = msg
        finals, ended = await finals_until_ended(sub)
    assert started is not None
    (final,) = finals
    # The same sample, in ms (client) and s (stream): 30 dropped tails made it 0.25 s+.
    assert abs(final["start"] - started["audio_start_ms"] / 1000) < 0.02, (final, started)
    assert abs(ended["duration"] - client_s) < 0.05, (ended, client_s)


async def test_a_session_left_mid_speech_gives_the_stream_all_its_audio(
        scripted: CaptionServer) -> None:
    """docs/protocol.md: with server_vad, all of a session's audio becomes
    finals when it ends, the resampler's held-back tail (10-35 ms) too: the
    stream lasts exactly as long as the client's audio."""
    speech = pcm24(speak(SENTENCES[0]))
    client_s = len(speech) / 2 / INPUT_RATE
    port = scripted.port
    async with connect(f"ws://127.0.0.1:{port}/v1/captions?stream=left") as sub:
        assert json.loads(await asyncio.wait_for(sub.recv(), 10))["type"] == "hello"
        url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription&stream=left"
        async with connect(url) as ws:
            step = INPUT_RATE * 2 // 10
            for i in range(0, len(speech), step):
                await ws.send(append_msg(speech[i:i + step]))
            while json.loads(await asyncio.wait_for(ws.recv(), 20))["type"] != \
                    "input_audio_buffer.speech_started":
                pass
        finals, ended = await finals_until_ended(sub)
    assert len(finals) == 1
    assert abs(ended["duration"] - client_s) < 0.002, (ended, client_s)


async def test_a_session_whose_stream_is_closed_under_it_ends_with_server_error() -> None:
    """docs/protocol.md: `server_error` and close 1011 once the session's engine
    stream is gone (as at shutdown), at the client's next audio."""
    cfg = config()
    async with Engine(cfg, ScriptedBackend(lambda a: "scripted words")) as engine, \
            CaptionServer(engine, cfg.server) as server:
        url = f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription&stream=desk"
        async with connect(url) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == \
                "session.created"
            await engine.streams["desk"].close()
            await ws.send(append_msg(bytes(4800)))  # 100 ms of silence
            err = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert (err["type"], err["error"]["type"], err["error"]["code"]) == \
                ("error", "server_error", "server_error")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1011


async def test_a_turn_open_at_shutdown_is_committed_and_completed() -> None:
    """At shutdown (``Engine.drain``, as ``serve`` does before closing its
    connections) the open segment becomes a final: the client whose turn
    it is gets ``committed`` and ``completed`` for it, not a bare delta."""
    cfg = config()
    async with Engine(cfg, ScriptedBackend(lambda a: "scripted words")) as engine, \
            CaptionServer(engine, cfg.server) as server:
        url = f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription&stream=bye"
        speech = pcm24(speak(SENTENCES[0]))
        async with connect(url) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == \
                "session.created"
            await ws.send(append_msg(speech[: len(speech) // 4 * 2]))  # speech still open
            got = [json.loads(await asyncio.wait_for(ws.recv(), 20))]
            assert got[0]["type"] == "input_audio_buffer.speech_started"
            await engine.drain()
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                while got[-1]["type"] != \
                        "conversation.item.input_audio_transcription.completed":
                    got.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
    item = got[0]["item_id"]
    assert [(e["type"], e.get("item_id")) for e in got[1:] if "delta" not in e] == [
        ("input_audio_buffer.committed", item),
        ("conversation.item.input_audio_transcription.completed", item)], got
    deltas = [e for e in got if e["type"].endswith(".delta")]
    assert {e["item_id"] for e in deltas} == {item}
    assert "".join(e["delta"] for e in deltas) == got[-1]["transcript"] == "scripted words"
    assert 0.5 < got[-1]["usage"]["seconds"] <= len(speech) / 4 / INPUT_RATE + 0.35


@pytest.mark.parametrize("meanwhile_s", [0.1, 1.0])
async def test_a_turn_open_at_shutdown_completes_for_a_client_still_sending(
        meanwhile_s: float) -> None:
    """As above, for a live client (a microphone) that sends its next 100 ms
    while the drain waits for the final: that audio used to end the session
    with server_error at once (1011), the turn never committed or completed.
    The finals come first; then the error. Audio that would end the turn in
    the session's own segmenter (1 s of silence) got the turn's completed
    without its committed: the session took the audio (its turn ended, the
    committed owed) before the closed stream refused it, and the events
    were dropped. Nothing is taken once the stream is closed."""
    cfg = config()
    backend = ScriptedBackend(lambda a: "scripted words", delay_s=0.5)
    async with Engine(cfg, backend) as engine, CaptionServer(engine, cfg.server) as server:
        url = f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription&stream=bye"
        speech = pcm24(speak(SENTENCES[0]))
        async with connect(url) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == \
                "session.created"
            await ws.send(append_msg(speech[: len(speech) // 4 * 2]))  # speech still open
            while json.loads(await asyncio.wait_for(ws.recv(), 20))["type"] != \
                    "input_audio_buffer.speech_started":
                pass
            drain = asyncio.ensure_future(engine.drain())
            await asyncio.sleep(0.1)
            # The microphone's next audio: silence.
            await ws.send(append_msg(bytes(int(INPUT_RATE * 2 * meanwhile_s))))
            got: list[dict[str, Any]] = []
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                while True:
                    got.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        await drain
    kinds = [e["type"] for e in got if "delta" not in e["type"]]
    assert kinds == ["input_audio_buffer.committed",
                     "conversation.item.input_audio_transcription.completed", "error"], got
    assert got[-2]["transcript"] == "scripted words"
    assert got[-1]["error"]["code"] == "server_error"


@pytest.mark.parametrize("read_delay_s", [0.002, None])
async def test_a_slow_client_gets_every_completed_before_the_shutdown_closes_it(
        read_delay_s: float | None, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """docs/protocol.md: at shutdown a session's ``completed`` events come
    before 1001, as a ``/v1/captions`` subscriber's finals do. The server's
    flush waited for subscribers' queues only: a session whose client read
    slowly was closed with its last ``completed`` still in its own queue.
    One that reads nothing any more (``read_delay_s`` None) holds the close
    up no longer than a stalled subscriber does, and is counted as behind."""
    from evoxtral_stream.server.realtime.connection import _Connection

    sessions: list[_Connection] = []
    init = _Connection.__init__

    def recording(self: _Connection, *args: Any) -> None:
        init(self, *args)
        sessions.append(self)

    monkeypatch.setattr(_Connection, "__init__", recording)
    flush_s = 2.0 if read_delay_s is not None else 0.5
    cfg = config(**{"server.shutdown_flush_s": flush_s})
    text = "word " * 8000  # 40 kB a delta or completed: the client's buffers hold few
    half = speak(SENTENCES[1])
    audio = np.concatenate([speak(SENTENCES[0]), np.zeros(int(1.2 * SAMPLE_RATE), np.int16),
                            half[: len(half) // 2]])  # a first turn, a second still open
    speech = pcm24(audio)
    step = INPUT_RATE * 2 // 10
    async with Engine(cfg, ScriptedBackend(lambda a: text)) as engine:
        server = CaptionServer(engine, cfg.server)
        await server.start()
        sock = await asyncio.to_thread(
            raw_ws_handshake, server.port, "/v1/realtime?intent=transcription&stream=slow")
        try:
            async with asyncio.timeout(10):
                while not sessions:
                    await asyncio.sleep(0.01)
            (session,) = sessions
            # A slow link, as for the slow subscriber in test_app.py.
            (conn,) = server._live
            conn.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            frames = b"".join(client_text_frame(append_msg(speech[i:i + step]))
                              for i in range(0, len(speech), step))
            await asyncio.to_thread(sock.sendall, frames)
            # All of it in the stream before the drain (later audio would end
            # the session with server_error): the resampler holds < 600 samples.
            async with asyncio.timeout(20):
                while session._core.received_samples < len(audio) - 1000:
                    await asyncio.sleep(0.01)
            assert await engine.drain()
            assert session._queue.qsize() > 1, "nothing left in flight: the test shows nothing"
            got, code, took = await close_while_reading(server.aclose, sock, read_delay_s)
        finally:
            sock.close()
    if read_delay_s is None:
        assert flush_s <= took < flush_s + 3 + 2
        # Counted as behind, after the wait server.shutdown_flush_s sets.
        assert [r.getMessage() for r in caplog.records
                if "had not read their last events" in r.getMessage()] == [
            "closing: 1 subscriber(s) or realtime session(s) had not read their last events "
            "after 0.5 s (server.shutdown_flush_s); closed without them"]
        return
    started = [e["item_id"] for e in got if e["type"] == "input_audio_buffer.speech_started"]
    completed = [e for e in got
                 if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert len(started) == 2
    assert [e["item_id"] for e in completed] == started, [e["type"] for e in got]
    assert all(e["transcript"] == text.strip() for e in completed)
    assert got[-1] is completed[-1]
    assert code == 1001
    assert took < flush_s + 3


@pytest.mark.parametrize("manual", [False, True])
async def test_a_turn_whose_final_failed_with_nothing_shown_still_completes(
        manual: bool) -> None:
    """The model failed on the turn's final and had shown nothing of it: the
    client got the error, and its item's completed only when a later item's
    final came, so a client that commits once and waits (manual mode) hung.
    Now the empty completed comes at once, after the error."""
    cfg = config(**{"stream.partial_interval_ms": 0})
    backend = ScriptedBackend(lambda a: "never", fail_when=lambda a: True)
    async with Engine(cfg, backend) as engine, CaptionServer(engine, cfg.server) as server:
        url = f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription"
        speech = pcm24(np.concatenate([speak(SENTENCES[0]), np.zeros(16_000, np.int16)]))
        async with connect(url) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == \
                "session.created"
            if manual:
                await ws.send(update_msg(None))
            step = INPUT_RATE * 2 // 5
            for i in range(0, len(speech), step):
                await ws.send(append_msg(speech[i:i + step]))
            if manual:
                await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            got: list[dict[str, Any]] = []
            while not got or got[-1]["type"] != \
                    "conversation.item.input_audio_transcription.completed":
                got.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
    kinds = [e["type"] for e in got if not e["type"].startswith("session.")]
    assert kinds[-3:] == ["input_audio_buffer.committed", "error",
                          "conversation.item.input_audio_transcription.completed"], kinds
    assert got[-2]["error"]["code"] == "decode_failed"
    assert got[-1]["transcript"] == "" and got[-1]["item_id"] == got[-3]["item_id"]


async def test_an_unnamed_session_never_takes_an_open_or_numbered_stream_id(
        tmp_path: Path) -> None:
    """realtime-N came from a count over the process: a session holding
    realtime-1 by name made the next unnamed one fail as stream_busy, and
    after a restart with the journal unnamed sessions continued the earlier
    run's streams. N is now the next whose id is neither open nor numbered."""
    cfg = config(**{"journal.enabled": True, "journal.dir": str(tmp_path / "j")})

    async def session(server: CaptionServer, name: str = "") -> ClientConnection:
        ws = await connect(f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription"
                           + (f"&stream={name}" if name else ""))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "session.created"
        return ws

    async with Engine(cfg, ScriptedBackend(lambda a: "words")) as engine, \
            CaptionServer(engine, cfg.server) as server:
        held = await session(server, "realtime-1")
        talk = await session(server)
        assert set(engine.streams) == {"realtime-1", "realtime-2"}
        speech = pcm24(np.concatenate([speak(SENTENCES[0]), np.zeros(16_000, np.int16)]))
        await talk.send(append_msg(speech))
        while not engine.last_seq("realtime-2"):
            await asyncio.sleep(0.02)
        await talk.close()
        await held.close()
    async with Engine(cfg, ScriptedBackend(lambda a: "words")) as engine, \
            CaptionServer(engine, cfg.server) as server:
        again = await session(server)
        # realtime-1 never had a caption; realtime-2 is journaled.
        assert set(engine.streams) == {"realtime-1"}
        third = await session(server)
        assert set(engine.streams) == {"realtime-1", "realtime-3"}
        await again.close()
        await third.close()


def test_a_failed_partial_closes_nothing() -> None:
    """Only an error that says no caption of its segment follows (a failed
    final with nothing shown) ends the segment's part of the item: a
    partial's failure must not complete an item whose final is still due."""
    core = new_core()
    core.start()
    out = feed(core, pcm24(np.concatenate([speak(SENTENCES[0]),
                                           np.zeros(16_000, np.int16)])))
    (item,) = {e["item_id"] for e in events(out) if e["type"].endswith(".committed")}
    failed = StreamError("rt", "decode_failed", "boom", 0)
    assert types(events(core.on_engine_event(failed))) == ["error"]
    done = events(core.on_engine_event(caption(0, "the words", "", final=True)))
    assert [(e["type"], e.get("transcript")) for e in done][-1] == (
        "conversation.item.input_audio_transcription.completed", "the words")
    assert done[-1]["item_id"] == item


@pytest.mark.parametrize("manual", [False, True])
async def test_audio_appended_too_fast_is_refused_as_on_ingest(manual: bool) -> None:
    """server.max_ingest_speed holds here too: one session pushing hours of
    audio at full speed would hold every other stream's finals back behind
    its own (and the server's memory) without end."""
    cfg = config(**{"server.max_ingest_speed": 2.0, "server.ingest_burst_s": 3.0})
    async with Engine(cfg, ScriptedBackend(lambda a: "scripted words")) as engine, \
            CaptionServer(engine, cfg.server) as server:
        port = server.port
        speech, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
        async with connect(f"ws://127.0.0.1:{port}/v1/captions?stream=hog") as sub:
            url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription&stream=hog"
            async with connect(url) as ws:
                assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == \
                    "session.created"
                if manual:
                    await ws.send(update_msg(None))
                # Speech first (a final for subscribers), then silence at full speed.
                await ws.send(append_msg(pcm24(speech)))
                second = bytes(INPUT_RATE * 2)
                got: list[dict[str, Any]] = []
                with contextlib.suppress(ConnectionClosed):
                    for _ in range(10):  # 10 s at once: past 3 s + 2x real time
                        await ws.send(append_msg(second))
                    while True:
                        got.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                errors = [e["error"] for e in got if e["type"] == "error"]
                assert [e["code"] for e in errors] == ["too_fast"], got
                assert "server.max_ingest_speed" in errors[0]["message"]
                assert ws.close_code == 1008
            # The stream's audio so far still becomes its finals, then it ends.
            msgs: list[dict[str, Any]] = []
            while not msgs or msgs[-1]["type"] != "stream.ended":
                msgs.append(json.loads(await asyncio.wait_for(sub.recv(), 20)))
        finals = [m for m in msgs if m["type"] == "caption" and m["final"]]
        assert not manual or not finals  # manual audio never committed is dropped
        if not manual:
            assert finals and finals[0]["text"] == "scripted words"


async def test_audio_appended_at_real_time_pace_is_never_too_fast(
        scripted: CaptionServer) -> None:
    url = f"ws://127.0.0.1:{scripted.port}/v1/realtime?intent=transcription"
    async with connect(url) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "session.created"
        tenth = bytes(INPUT_RATE * 2 // 10)
        for _ in range(40):  # the default burst (30 s) is never touched at this pace
            await ws.send(append_msg(tenth))
            await asyncio.sleep(0.1)
        await ws.send(update_msg(None))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "session.updated"


def test_client_time_kept_for_a_push_to_talk_client_stays_bounded() -> None:
    """A manual-mode client that clears held audio before each turn (a
    push-to-talk button) puts a hole in client time at every turn; the map
    from stream to client time kept one run per hole for the life of the
    session (about 100 bytes a turn, for a 24/7 kiosk without end). Runs
    no segment event can name any more are forgotten, and the times
    reported after many turns are still the client's."""
    core = new_core()
    core.start()
    core.receive(update_msg(None))
    tenth = b"\x00\x00" * (INPUT_RATE // 10)
    turns = 1500
    for _ in range(turns):
        feed(core, tenth)  # heard before the button: dropped
        core.receive('{"type": "input_audio_buffer.clear"}')
        feed(core, tenth * 2)
        core.receive('{"type": "input_audio_buffer.commit"}')
    assert len(core._run_stream) <= 3, len(core._run_stream)
    assert len(core._run_stream) == len(core._run_client) == len(core._run_len)
    # 0.3 s of client audio a turn; then speech, live.
    core.receive(update_msg({"type": "server_vad"}))
    evs = events(feed(core, tenth * 10 + pcm24(speak(SENTENCES[0]))))
    (started,) = [e for e in evs if e["type"] == "input_audio_buffer.speech_started"]
    client_s = turns * 0.3 + 1.0
    # Speech starts a little after client_s; pre-roll reaches back up to 300 ms.
    assert client_s * 1000 - 300 - 60 <= started["audio_start_ms"] <= client_s * 1000 + 1000
