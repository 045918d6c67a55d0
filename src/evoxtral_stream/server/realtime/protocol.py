"""The client and server events of ``/v1/realtime``: parsing and encoding.

Pure: JSON text in, typed client events (or :class:`RealtimeProtocolError`)
out; typed server events in, JSON text out. The actions the core asks the
adapter to carry out (:class:`PushAudio`, :class:`SetLanguage`,
:class:`CutSegment`) are defined here too, as part of the core's output.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ...events import Int16Array
from ...text.chars import mend_surrogates, shown
from ..protocol import load_client_json

__all__ = [
    "INPUT_RATE",
    "MAX_BUFFER_S",
    "MIN_COMMIT_MS",
    "AudioAppend",
    "AudioClear",
    "AudioCommit",
    "BufferCleared",
    "BufferCommitted",
    "BufferSpeechStarted",
    "BufferSpeechStopped",
    "ClientEvent",
    "CutSegment",
    "Output",
    "PushAudio",
    "RealtimeError",
    "RealtimeProtocolError",
    "ServerEvent",
    "SessionCreated",
    "SessionUpdate",
    "SessionUpdated",
    "SetLanguage",
    "TranscriptionCompleted",
    "TranscriptionDelta",
    "encode_server_event",
    "parse_client_event",
    "server_event_to_dict",
]

#: The only input format: PCM16 little-endian mono at 24 kHz (``audio/pcm``).
INPUT_RATE = 24_000
#: A manual commit needs at least this much audio (as OpenAI requires).
MIN_COMMIT_MS = 100
#: Audio held for a manual commit is capped at this many seconds; an append
#: past it is refused with an error (``input_audio_buffer_full``) and
#: dropped whole. The resampler's tail of accepted appends (~30 ms, see the
#: core) is held even past the cap.
MAX_BUFFER_S = 600.0

# Client events of the Realtime API that a transcription session does not take.
_UNSUPPORTED = frozenset({
    "response.create", "response.cancel", "conversation.item.create",
    "conversation.item.delete", "conversation.item.retrieve", "conversation.item.truncate",
    "output_audio_buffer.clear", "session.close",
})


# --- client events (parsed) ---------------------------------------------------


class RealtimeProtocolError(ValueError):
    """A client event that cannot be applied; becomes an ``error`` event.

    ``code``, ``param`` and ``event_id`` (the client's) go on the wire as in
    OpenAI's error object.
    """

    def __init__(self, code: str, message: str, param: str | None = None,
                 event_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param
        self.event_id = event_id


TurnDetection = Literal["server_vad", "none"]


@dataclass(frozen=True)
class SessionUpdate:
    """``session.update`` (or the beta ``transcription_session.update``).

    ``turn_detection`` is ``"server_vad"`` for ``{"type": "server_vad"}``,
    ``"none"`` for ``null``, and None when the update leaves it unchanged.
    ``language`` is the transcription language asked for when
    ``language_given`` (None: the server's default, as ``null`` or ``""``).
    """

    event_id: str | None
    turn_detection: TurnDetection | None
    beta: bool = False
    language: str | None = None
    language_given: bool = False


@dataclass(frozen=True)
class AudioAppend:
    """``input_audio_buffer.append``: the decoded bytes of PCM16 24 kHz audio."""

    event_id: str | None
    data: bytes


@dataclass(frozen=True)
class AudioCommit:
    event_id: str | None


@dataclass(frozen=True)
class AudioClear:
    event_id: str | None


ClientEvent = SessionUpdate | AudioAppend | AudioCommit | AudioClear


def _obj(value: object, param: str, event_id: str | None) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise RealtimeProtocolError("invalid_type", f"'{param}' must be an object",
                                    param, event_id)
    return value


def _str(value: object, default: str, param: str, event_id: str | None) -> str:
    """``value`` when it is a string, ``default`` when absent (None); a wrong
    type is ``invalid_type`` (an unsupported string is the caller's
    ``invalid_value``)."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise RealtimeProtocolError("invalid_type", f"'{param}' must be a string",
                                    param, event_id)
    return value


def _turn_detection(value: object, param: str, event_id: str | None,
                    default: str = "") -> TurnDetection:
    """``default`` is the type of an object without one (the beta shape's
    ``type`` is optional: server_vad)."""
    if value is None:
        return "none"
    td = _obj(value, param, event_id)
    kind = _str(td.get("type"), default, f"{param}.type", event_id)
    if kind == "server_vad":
        return "server_vad"
    raise RealtimeProtocolError(
        "invalid_value",
        f"unsupported turn detection {shown(td.get('type'))}: use {{\"type\": \"server_vad\"}} "
        f"or null",
        f"{param}.type", event_id)


def _language(transcription: Mapping[str, Any], param: str,
              event_id: str | None) -> tuple[str | None, bool]:
    """(language, given) from an ``input_audio_transcription``-shaped object."""
    if "language" not in transcription:
        return None, False
    value = transcription["language"]
    if value is not None and not isinstance(value, str):
        raise RealtimeProtocolError("invalid_type", f"'{param}.language' must be a string",
                                    f"{param}.language", event_id)
    # Exactly the code, as an ingest config's and model.language are: hello
    # lists the codes, and " fr" or "FR" is no code of them.
    return value or None, True


def _parse_session_update(obj: Mapping[str, Any], event_id: str | None) -> SessionUpdate:
    session = _obj(obj.get("session"), "session", event_id)
    kind = _str(session.get("type"), "transcription", "session.type", event_id)
    if kind != "transcription":
        raise RealtimeProtocolError(
            "invalid_value",
            f"only transcription sessions are served here: 'session.type' must be "
            f"'transcription', got {shown(kind)}", "session.type", event_id)
    turn: TurnDetection | None = None
    language: tuple[str | None, bool] = (None, False)
    if "audio" in session:
        audio = _obj(session["audio"], "session.audio", event_id)
        if "input" in audio:
            inp = _obj(audio["input"], "session.audio.input", event_id)
            if inp.get("transcription") is not None:
                param = "session.audio.input.transcription"
                language = _language(_obj(inp["transcription"], param, event_id), param,
                                     event_id)
            if inp.get("format") is not None:
                fmt = _obj(inp["format"], "session.audio.input.format", event_id)
                param = "session.audio.input.format"
                if _str(fmt.get("type"), "audio/pcm", f"{param}.type", event_id) != "audio/pcm":
                    raise RealtimeProtocolError(
                        "invalid_value",
                        f"unsupported audio format {shown(fmt.get('type'))}: only 'audio/pcm' "
                        f"(PCM16 mono, 24 kHz) is accepted",
                        "session.audio.input.format.type", event_id)
                rate = fmt.get("rate")
                # bool is an int in Python, but true is no rate in JSON.
                if rate is not None and (isinstance(rate, bool)
                                         or not isinstance(rate, int | float)):
                    raise RealtimeProtocolError(
                        "invalid_type", f"'{param}.rate' must be a number",
                        f"{param}.rate", event_id)
                if rate is not None and rate != INPUT_RATE:
                    raise RealtimeProtocolError(
                        "invalid_value",
                        f"unsupported sample rate {shown(rate)}: audio/pcm must be "
                        f"{INPUT_RATE} Hz", "session.audio.input.format.rate", event_id)
            if "turn_detection" in inp:
                turn = _turn_detection(inp["turn_detection"],
                                       "session.audio.input.turn_detection", event_id)
    return SessionUpdate(event_id, turn, language=language[0], language_given=language[1])


def _parse_beta_update(obj: Mapping[str, Any], event_id: str | None) -> SessionUpdate:
    session = _obj(obj.get("session"), "session", event_id)
    fmt = _str(session.get("input_audio_format"), "pcm16", "session.input_audio_format",
               event_id)
    if fmt != "pcm16":
        raise RealtimeProtocolError(
            "invalid_value", f"unsupported input_audio_format {shown(fmt)}: only 'pcm16' "
            f"(24 kHz) is accepted", "session.input_audio_format", event_id)
    turn: TurnDetection | None = None
    if "turn_detection" in session:
        turn = _turn_detection(session["turn_detection"], "session.turn_detection", event_id,
                               default="server_vad")
    language: tuple[str | None, bool] = (None, False)
    if session.get("input_audio_transcription") is not None:
        param = "session.input_audio_transcription"
        language = _language(_obj(session["input_audio_transcription"], param, event_id),
                             param, event_id)
    return SessionUpdate(event_id, turn, beta=True, language=language[0],
                         language_given=language[1])


def wire_size(message: str | bytes) -> int:
    """The size of ``message`` on the wire (a text frame is UTF-8)."""
    if isinstance(message, bytes) or message.isascii():
        return len(message)
    return len(message.encode("utf-8", "surrogatepass"))


def parse_client_event(message: str | bytes) -> ClientEvent:
    """Parse one client message; :class:`RealtimeProtocolError` when it is bad."""
    if isinstance(message, bytes):
        raise RealtimeProtocolError(
            "invalid_type", "binary messages are not accepted: send JSON client events "
                            "as text (audio goes base64 in input_audio_buffer.append)")
    try:
        obj, twice = load_client_json(message)
    except (ValueError, RecursionError) as e:
        raise RealtimeProtocolError("invalid_json",
                                    f"the message is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RealtimeProtocolError("invalid_type", "a client event must be a JSON object")
    raw_id = obj.get("event_id")
    event_id = raw_id if isinstance(raw_id, str) else None
    if event_id is not None and not event_id.isascii():
        # Echoed in errors: a lone surrogate ("\\ud800" in JSON) cannot go out as UTF-8.
        event_id = event_id.encode("utf-8", "replace").decode("utf-8")
    if twice is not None:
        raise RealtimeProtocolError(
            "invalid_value", f"the event names the key {shown(twice)} twice in one object",
            None, None if twice == "event_id" else event_id)
    kind = obj.get("type")
    if kind is None:
        # null is no type, as an append's "audio": null is no audio.
        raise RealtimeProtocolError("missing_required_parameter",
                                    "missing required parameter: 'type'", "type", event_id)
    if not isinstance(kind, str):
        raise RealtimeProtocolError("invalid_type", "'type' must be a string", "type",
                                    event_id)
    if kind == "input_audio_buffer.append":
        audio = obj.get("audio")
        if audio is None:
            raise RealtimeProtocolError("missing_required_parameter",
                                        "missing required parameter: 'audio'", "audio", event_id)
        if not isinstance(audio, str):
            raise RealtimeProtocolError("invalid_type", "'audio' must be a base64 string",
                                        "audio", event_id)
        try:
            # b64decode(validate=True) takes padding past a multiple of 4
            # ("AAAA=") or after a whole quantum ("AAAA===="): RFC 4648 does not.
            if len(audio) % 4 or audio.endswith("==="):
                raise ValueError
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeProtocolError("invalid_value", "'audio' is not valid base64",
                                        "audio", event_id) from None
        return AudioAppend(event_id, data)
    if kind == "input_audio_buffer.commit":
        return AudioCommit(event_id)
    if kind == "input_audio_buffer.clear":
        return AudioClear(event_id)
    if kind == "session.update":
        return _parse_session_update(obj, event_id)
    if kind == "transcription_session.update":
        return _parse_beta_update(obj, event_id)
    if kind in _UNSUPPORTED:
        raise RealtimeProtocolError(
            "invalid_value", f"{kind!r} is not supported on a transcription session",
            "type", event_id)
    raise RealtimeProtocolError("invalid_value", f"unknown client event type {shown(kind)}",
                                "type", event_id)


# --- server events and actions --------------------------------------------------


@dataclass(frozen=True)
class SessionCreated:
    event_id: str
    session: Mapping[str, Any]


@dataclass(frozen=True)
class SessionUpdated:
    """``session.updated``; ``beta`` answers ``transcription_session.update``."""

    event_id: str
    session: Mapping[str, Any]
    beta: bool = False


@dataclass(frozen=True)
class BufferSpeechStarted:
    event_id: str
    item_id: str
    audio_start_ms: int


@dataclass(frozen=True)
class BufferSpeechStopped:
    event_id: str
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True)
class BufferCommitted:
    event_id: str
    item_id: str
    previous_item_id: str | None


@dataclass(frozen=True)
class BufferCleared:
    event_id: str


@dataclass(frozen=True)
class TranscriptionDelta:
    event_id: str
    item_id: str
    delta: str


@dataclass(frozen=True)
class TranscriptionCompleted:
    """The item's final, tagged transcript; ``audio_s`` is reported as usage."""

    event_id: str
    item_id: str
    transcript: str
    audio_s: float


@dataclass(frozen=True)
class RealtimeError:
    """An ``error`` event; ``client_event_id`` names the client event at fault."""

    event_id: str
    code: str
    message: str
    param: str | None = None
    client_event_id: str | None = None
    error_type: str = "invalid_request_error"


ServerEvent = (SessionCreated | SessionUpdated | BufferSpeechStarted | BufferSpeechStopped
               | BufferCommitted | BufferCleared | TranscriptionDelta | TranscriptionCompleted
               | RealtimeError)


@dataclass(frozen=True, eq=False)
class PushAudio:
    """Action: push these 16 kHz samples to the connection's engine stream."""

    samples: Int16Array


@dataclass(frozen=True)
class SetLanguage:
    """Action: decode the engine stream's next requests in ``language``
    (None: the server's default); the core has checked it is allowed."""

    language: str | None


@dataclass(frozen=True)
class CutSegment:
    """Action: end the engine stream's open segment now (``Stream.cut``),
    after the audio pushed before this action. ``keep_candidate``: the
    client committed an utterance, so speech too short yet for a segment
    becomes one (``Stream.cut(keep_candidate=True)``)."""

    keep_candidate: bool = False


Output = ServerEvent | PushAudio | CutSegment | SetLanguage


def server_event_to_dict(ev: ServerEvent) -> dict[str, Any]:
    if isinstance(ev, SessionCreated):
        return {"type": "session.created", "event_id": ev.event_id, "session": ev.session}
    if isinstance(ev, SessionUpdated):
        kind = "transcription_session.updated" if ev.beta else "session.updated"
        return {"type": kind, "event_id": ev.event_id, "session": ev.session}
    if isinstance(ev, BufferSpeechStarted):
        return {"type": "input_audio_buffer.speech_started", "event_id": ev.event_id,
                "item_id": ev.item_id, "audio_start_ms": ev.audio_start_ms}
    if isinstance(ev, BufferSpeechStopped):
        return {"type": "input_audio_buffer.speech_stopped", "event_id": ev.event_id,
                "item_id": ev.item_id, "audio_end_ms": ev.audio_end_ms}
    if isinstance(ev, BufferCommitted):
        return {"type": "input_audio_buffer.committed", "event_id": ev.event_id,
                "item_id": ev.item_id, "previous_item_id": ev.previous_item_id}
    if isinstance(ev, BufferCleared):
        return {"type": "input_audio_buffer.cleared", "event_id": ev.event_id}
    if isinstance(ev, TranscriptionDelta):
        return {"type": "conversation.item.input_audio_transcription.delta",
                "event_id": ev.event_id, "item_id": ev.item_id, "content_index": 0,
                "delta": ev.delta}
    if isinstance(ev, TranscriptionCompleted):
        return {"type": "conversation.item.input_audio_transcription.completed",
                "event_id": ev.event_id, "item_id": ev.item_id, "content_index": 0,
                "transcript": ev.transcript,
                "usage": {"type": "duration", "seconds": round(ev.audio_s, 3)}}
    if isinstance(ev, RealtimeError):
        # An engine error's message may quote an exception naming a path whose
        # bytes are no UTF-8: a lone surrogate, which no text frame can take
        # (its send failed and ended the session), as on /v1/captions.
        return {"type": "error", "event_id": ev.event_id,
                "error": {"type": ev.error_type, "code": ev.code,
                          "message": mend_surrogates(ev.message),
                          "param": ev.param, "event_id": ev.client_event_id}}
    raise TypeError(f"not a server event: {ev!r}")


def encode_server_event(ev: ServerEvent) -> str:
    return json.dumps(server_event_to_dict(ev), ensure_ascii=False, separators=(",", ":"))


