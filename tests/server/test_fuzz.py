"""Fuzzing every decoder that reads client input.

The contract: any input either decodes to a typed value or raises the
decoder's own protocol error, whose message goes back to the client. Any
other exception would tear down a connection handler instead of answering
with an error event.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evoxtral_stream.config import ConfigError, load_config, parse_override
from evoxtral_stream.server.protocol import (
    EndOfStream,
    IngestFormat,
    ProtocolError,
    SampleFormat,
    decode_audio_frame,
    decode_caption,
    parse_ingest_message,
)
from evoxtral_stream.server.realtime import (
    RealtimeProtocolError,
    RealtimeTranscription,
    parse_client_event,
)
from evoxtral_stream.text.manifest import ManifestError, parse_manifest

# FUZZ_EXAMPLES raises the count for a long run (recorded in bench/RESULTS.md).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=5),
    max_leaves=20,
)


def objects_with_type(types: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """JSON objects whose ``type`` is a real message type, other fields random."""
    return st.builds(lambda t, rest: {**rest, "type": t}, st.sampled_from(types),
                     st.dictionaries(st.sampled_from(
                         ["sample_rate", "channels", "format", "adapter", "session", "audio",
                          "event_id", "item_id", "stream", "seq", "final", "text", "segment"]),
                         json_values, max_size=6))


messages = (st.binary(max_size=300) | st.text(max_size=300)
            | json_values.map(json.dumps) | st.builds(json.dumps, objects_with_type(
                ["config", "end", "caption", "session.update", "transcription_session.update",
                 "input_audio_buffer.append", "input_audio_buffer.commit",
                 "input_audio_buffer.clear"])))


@FUZZ
@given(messages)
def test_ingest_messages_decode_or_raise_protocol_error(message: str | bytes) -> None:
    try:
        parsed = parse_ingest_message(message)
    except ProtocolError as e:
        assert e.code and str(e)
        return
    assert isinstance(parsed, IngestFormat | EndOfStream)
    if isinstance(parsed, IngestFormat):
        assert 8000 <= parsed.sample_rate <= 192000 and 1 <= parsed.channels <= 8


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from(list(SampleFormat)),
       st.integers(min_value=1, max_value=8))
def test_audio_frames_decode_or_raise_protocol_error(data: bytes, fmt: SampleFormat,
                                                     channels: int) -> None:
    spec = IngestFormat(16000, channels, fmt)
    try:
        frames = decode_audio_frame(data, spec)
    except ProtocolError as e:
        assert e.code in {"odd_length", "bad_audio"}
        return
    assert frames.shape == (len(data) // spec.frame_bytes, channels)
    assert np.isfinite(frames).all()


@FUZZ
@given(messages)
def test_caption_decoder(message: str | bytes) -> None:
    try:
        obj = decode_caption(message)
    except ProtocolError:
        return
    assert obj["type"] == "caption"


@FUZZ
@given(messages)
def test_realtime_client_events_decode_or_raise_protocol_error(message: str | bytes) -> None:
    try:
        parse_client_event(message)
    except RealtimeProtocolError as e:
        assert e.code and str(e)


@settings(max_examples=max(150, EXAMPLES // 4), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, max_size=6))
def test_realtime_session_answers_every_message(batch: list[str | bytes]) -> None:
    """The whole translation core, not only its parser: never raises."""
    core = RealtimeTranscription(load_config().vad, model="test")
    core.start()
    for message in batch:
        core.receive(message)


@FUZZ
@given(st.text(max_size=400))
def test_manifest_parser(text: str) -> None:
    try:
        entries = parse_manifest(text)
    except ManifestError as e:
        assert str(e)
        return
    assert entries and all(isinstance(e.text, str) for e in entries)


@FUZZ
@given(st.text(max_size=80))
def test_config_overrides(text: str) -> None:
    try:
        key, value = parse_override(text)
        load_config(overrides={key: value}, env={})
    except ConfigError as e:
        assert str(e)
