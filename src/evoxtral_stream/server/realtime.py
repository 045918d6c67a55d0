"""OpenAI-Realtime-compatible transcription sessions on ``/v1/realtime``.

``/v1/realtime?intent=transcription`` speaks the transcription-session subset
of the OpenAI Realtime API (GA shapes, as the ``openai`` SDK sends and parses
them), so an unmodified OpenAI client can caption through this engine. See
``docs/protocol.md`` for what is supported and where it differs.

Two layers, like the rest of the server:

- :class:`RealtimeTranscription` is pure and synchronous: client messages
  (JSON text) and engine events in, typed server events and
  :class:`PushAudio` / :class:`CutSegment` actions out. No sockets, no clock,
  no engine reference.
- :func:`serve_realtime` is the thin asyncio adapter: it opens one engine
  stream per connection, pushes what the core asks for, feeds the stream's
  engine events back to the core and sends the core's events, each
  connection behind its own bounded queue (``server.subscriber_queue``; a
  client that falls that far behind is closed at once with 1013).

Turns. The engine's own segmenter decides where speech starts and ends. The
engine does not publish segment boundaries, so the core runs a second
:class:`~evoxtral_stream.audio.vad.Segmenter` with the same configuration
over exactly the audio it pushes to the stream. The segmenter is
deterministic and independent of chunking, so both see the same segments
(segment ``k`` of the mirror is segment ``k`` of the stream's captions); the
adapter checks the count after every push and logs if they ever disagree.

Committing on demand. A segment is ended early (``input_audio_buffer.commit``,
``.clear``, switching turn detection off) by cutting it: the mirror's
segmenter and the engine stream's (:meth:`Stream.cut
<evoxtral_stream.engine.engine.Stream.cut>`) both flush at the same sample,
so the segment ends as at a natural end and the next one cannot reach back
before the cut. Nothing is added to the stream: its timeline (what
``/v1/captions`` subscribers see) is the client's audio as pushed. Times
reported to the client (``audio_start_ms``, ``audio_end_ms``) are mapped
back to the client's own audio, which differs from the stream's only by
audio held and then cleared in manual mode.

Items. With ``server_vad`` each engine segment is one conversation item:
``speech_started`` when the segment opens (``item_id`` announced there),
``speech_stopped`` and ``committed`` when it ends, ``delta`` events as text
becomes *stable* (partial captions' stable prefix only grows; the unstable
tail is never sent), ``completed`` with the final text. With turn detection
off, audio is held here until ``commit``; then the whole buffer is pushed
and closed as one item, which may span several engine segments (its
transcript joins their finals with spaces). Speech the segmenters have not
yet confirmed when turn detection goes off is not cut (a cut would discard
it): it stays pending in both, and the next item begins with it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import logging
import secrets
from bisect import bisect_right
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ..audio.resample import StreamResampler
from ..audio.vad import Segmenter, SegmenterState
from ..config import ServerConfig, VadConfig
from ..engine.engine import Engine, EngineStopping, Stream
from ..events import (
    SAMPLE_RATE,
    CaptionEvent,
    EngineEvent,
    Int16Array,
    SegmentEvent,
    SpeechEnded,
    SpeechStarted,
    StreamError,
    stream_id_problem,
)
from .broadcast import Broadcaster

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
    "RealtimeTranscription",
    "ServerEvent",
    "SessionCreated",
    "SessionUpdate",
    "SessionUpdated",
    "SetLanguage",
    "TranscriptionCompleted",
    "TranscriptionDelta",
    "encode_server_event",
    "parse_client_event",
    "refuse_realtime",
    "serve_realtime",
    "server_event_to_dict",
]

log = logging.getLogger(__name__)

#: The only input format: PCM16 little-endian mono at 24 kHz (``audio/pcm``).
INPUT_RATE = 24_000
#: A manual commit needs at least this much audio (as OpenAI requires).
MIN_COMMIT_MS = 100
#: Audio held for a manual commit is capped at this many seconds; more is
#: refused with an error (``input_audio_buffer_full``) and dropped.
MAX_BUFFER_S = 600.0

_CLOSE_POLICY = 1008
_CLOSE_INTERNAL = 1011
_CLOSE_TOO_SLOW = 1013

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


def _turn_detection(value: object, param: str, event_id: str | None) -> TurnDetection:
    if value is None:
        return "none"
    td = _obj(value, param, event_id)
    kind = td.get("type")
    if kind == "server_vad":
        return "server_vad"
    raise RealtimeProtocolError(
        "invalid_value",
        f"unsupported turn detection {kind!r}: use {{\"type\": \"server_vad\"}} or null",
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
    return (value.strip() or None) if value else None, True


def _parse_session_update(obj: Mapping[str, Any], event_id: str | None) -> SessionUpdate:
    session = _obj(obj.get("session"), "session", event_id)
    kind = session.get("type", "transcription")
    if kind != "transcription":
        raise RealtimeProtocolError(
            "invalid_value",
            f"only transcription sessions are served here: 'session.type' must be "
            f"'transcription', got {kind!r}", "session.type", event_id)
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
                if fmt.get("type", "audio/pcm") != "audio/pcm":
                    raise RealtimeProtocolError(
                        "invalid_value",
                        f"unsupported audio format {fmt.get('type')!r}: only 'audio/pcm' "
                        f"(PCM16 mono, 24 kHz) is accepted",
                        "session.audio.input.format.type", event_id)
                if fmt.get("rate", INPUT_RATE) != INPUT_RATE:
                    raise RealtimeProtocolError(
                        "invalid_value",
                        f"unsupported sample rate {fmt.get('rate')!r}: audio/pcm must be "
                        f"{INPUT_RATE} Hz", "session.audio.input.format.rate", event_id)
            if "turn_detection" in inp:
                turn = _turn_detection(inp["turn_detection"],
                                       "session.audio.input.turn_detection", event_id)
    return SessionUpdate(event_id, turn, language=language[0], language_given=language[1])


def _parse_beta_update(obj: Mapping[str, Any], event_id: str | None) -> SessionUpdate:
    session = _obj(obj.get("session"), "session", event_id)
    fmt = session.get("input_audio_format", "pcm16")
    if fmt != "pcm16":
        raise RealtimeProtocolError(
            "invalid_value", f"unsupported input_audio_format {fmt!r}: only 'pcm16' "
            f"(24 kHz) is accepted", "session.input_audio_format", event_id)
    turn: TurnDetection | None = None
    if "turn_detection" in session:
        turn = _turn_detection(session["turn_detection"], "session.turn_detection", event_id)
    language: tuple[str | None, bool] = (None, False)
    if session.get("input_audio_transcription") is not None:
        param = "session.input_audio_transcription"
        language = _language(_obj(session["input_audio_transcription"], param, event_id),
                             param, event_id)
    return SessionUpdate(event_id, turn, beta=True, language=language[0],
                         language_given=language[1])


def _byte_size(message: str | bytes) -> int:
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
        obj = json.loads(message)
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
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise RealtimeProtocolError("missing_required_parameter",
                                    "missing required parameter: 'type'", "type", event_id)
    if kind == "input_audio_buffer.append":
        audio = obj.get("audio")
        if audio is None:
            raise RealtimeProtocolError("missing_required_parameter",
                                        "missing required parameter: 'audio'", "audio", event_id)
        if not isinstance(audio, str):
            raise RealtimeProtocolError("invalid_type", "'audio' must be a base64 string",
                                        "audio", event_id)
        try:
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
    raise RealtimeProtocolError("invalid_value", f"unknown client event type {kind!r}",
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
    after the audio pushed before this action."""


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
        return {"type": "error", "event_id": ev.event_id,
                "error": {"type": ev.error_type, "code": ev.code, "message": ev.message,
                          "param": ev.param, "event_id": ev.client_event_id}}
    raise TypeError(f"not a server event: {ev!r}")


def encode_server_event(ev: ServerEvent) -> str:
    return json.dumps(server_event_to_dict(ev), ensure_ascii=False, separators=(",", ":"))


# --- the pure core --------------------------------------------------------------


@dataclass
class _Item:
    """One conversation item: the engine segments whose text it carries."""

    id: str
    segments: list[int] = field(default_factory=list)
    stable: dict[int, str] = field(default_factory=dict)
    finals: dict[int, str] = field(default_factory=dict)
    committed: bool = False
    sent: str = ""
    audio_samples: int = 0

    def view(self) -> str:
        """Final texts of the leading closed segments, then the stable text of
        the first open one: text that will not change."""
        parts: list[str] = []
        for seg in self.segments:
            if seg in self.finals:
                parts.append(self.finals[seg])
            else:
                parts.append(self.stable.get(seg, ""))
                break
        return " ".join(p for p in parts if p)

    @property
    def closed(self) -> bool:
        return self.committed and all(seg in self.finals for seg in self.segments)


_EndReason = Literal["vad", "commit", "clear"]


class RealtimeTranscription:
    """One transcription session: the sans-I/O core of ``/v1/realtime``.

    Calling contract: call :meth:`start` once and send what it returns; pass
    every client message to :meth:`receive` and every engine event *of this
    session's stream* to :meth:`on_engine_event`. Execute the returned outputs
    in order: :class:`PushAudio` and :class:`CutSegment` go to the engine
    stream (which must get nothing else), :class:`SetLanguage` to the
    stream's language, server events go to the client.

    ``vad`` must be the engine's segmenter configuration; ``model`` is only
    reported. ``language`` is the server's default language and
    ``languages`` the others a client may ask for (``session.update``'s
    transcription language); asking for any other is an ``invalid_value``
    error. ``prefix`` makes the ids of this session unique across sessions.
    """

    def __init__(self, vad: VadConfig, *, model: str, language: str | None = None,
                 languages: Collection[str] = (), prefix: str = "",
                 max_message_bytes: int | None = None) -> None:
        self._vad = vad
        self._model = model
        self._default_language = language
        self._language = language
        self._languages = frozenset(languages)
        self._prefix = prefix
        self._max_message = max_message_bytes
        self._event_ids: Iterator[int] = itertools.count(1)
        self._item_ids: Iterator[int] = itertools.count(1)
        self._server_vad = True
        self._segmenter = Segmenter(vad, SAMPLE_RATE)
        self._resampler = StreamResampler(INPUT_RATE, SAMPLE_RATE)
        self._carry = b""
        # Manual mode: resampled audio waiting for a commit.
        self._pending: list[tuple[int, Int16Array]] = []
        self._pending_len = 0
        # Manual mode: an unconfirmed speech candidate of server VAD, already in
        # the stream (its segmenter still pending), that opens the next item.
        self._candidate_len = 0
        # Positions: audio received from the client, audio pushed to the stream,
        # and runs of client audio in the stream (stream start, client start, length).
        self._client_pos = 0
        self._stream_pos = 0
        self._run_stream: list[int] = []
        self._run_client: list[int] = []
        self._run_len: list[int] = []
        self._dirty = False
        # Segments and items.
        self._next_segment = 0
        self._open_start = 0
        self._open_item: _Item | None = None
        self._collect: _Item | None = None
        self._end_reason: _EndReason = "vad"
        self._items: dict[int, _Item] = {}
        self._previous_item: str | None = None
        self.session_id = f"sess_{prefix.rstrip('_') or 'local'}"

    # --- public ------------------------------------------------------------------

    @property
    def server_vad(self) -> bool:
        return self._server_vad

    @property
    def segments_opened(self) -> int:
        """Segments the mirrored segmenter has opened (the stream's count too)."""
        return self._next_segment

    @property
    def buffered_ms(self) -> int:
        """Audio held for a manual commit (a kept speech candidate included)."""
        return self._held_len * 1000 // SAMPLE_RATE

    @property
    def _held_len(self) -> int:
        return self._pending_len + self._candidate_len

    def start(self) -> list[Output]:
        return [SessionCreated(self._event_id(), self.session_config())]

    def error(self, code: str, message: str, param: str | None = None,
              client_event_id: str | None = None,
              error_type: str = "invalid_request_error") -> RealtimeError:
        return RealtimeError(self._event_id(), code, message, param, client_event_id,
                             error_type)

    def session_config(self, *, beta: bool = False) -> dict[str, Any]:
        """The effective configuration, in GA (or beta) shape."""
        td: dict[str, Any] | None = None
        if self._server_vad:
            td = {"type": "server_vad", "prefix_padding_ms": self._vad.pre_roll_ms,
                  "silence_duration_ms": self._vad.end_silence_ms}
        transcription = {"model": self._model, "language": self._language}
        if beta:
            return {"id": self.session_id, "object": "realtime.transcription_session",
                    "input_audio_format": "pcm16", "input_audio_transcription": transcription,
                    "turn_detection": td, "input_audio_noise_reduction": None,
                    "include": None}
        return {
            "type": "transcription", "id": self.session_id,
            "object": "realtime.transcription_session",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": INPUT_RATE},
                                "transcription": transcription, "noise_reduction": None,
                                "turn_detection": td}},
            "include": None,
        }

    def receive(self, message: str | bytes) -> list[Output]:
        """One client message in; the outputs it causes (errors included)."""
        if self._max_message is not None and _byte_size(message) > self._max_message:
            return [self.error("message_too_large",
                               f"message of {_byte_size(message)} bytes exceeds the server limit "
                               f"of {self._max_message} (server.max_message_bytes): send "
                               f"audio in smaller appends")]
        try:
            event = parse_client_event(message)
            if isinstance(event, AudioAppend):
                return self._append(event)
            if isinstance(event, AudioCommit):
                return self._commit(event)
            if isinstance(event, AudioClear):
                return self._clear()
            return self._update(event)
        except RealtimeProtocolError as e:
            return [self.error(e.code, str(e), e.param, e.event_id)]

    def on_engine_event(self, ev: EngineEvent) -> list[Output]:
        """An event of this session's engine stream in; the server events out."""
        if isinstance(ev, StreamError):
            return [self.error(ev.code, ev.message, client_event_id=None,
                               error_type="server_error")]
        if not isinstance(ev, CaptionEvent):
            return []
        out: list[Output] = []
        if ev.final:
            # Finals come in segment order: every earlier segment is closed,
            # even one whose final never came (a failed decode).
            for seg in sorted(s for s in self._items if s < ev.segment):
                earlier = self._items.get(seg)
                if earlier is not None and earlier.committed:
                    earlier.finals.setdefault(seg, earlier.stable.get(seg, ""))
                    out += self._progress(earlier)
        item = self._items.get(ev.segment)
        if item is None:
            return out
        if ev.final:
            item.finals[ev.segment] = ev.text
        else:
            item.stable[ev.segment] = ev.stable
        return out + self._progress(item)

    # --- client events -------------------------------------------------------------

    def _update(self, ev: SessionUpdate) -> list[Output]:
        out: list[Output] = []
        if ev.language_given:
            # Checked before anything changes: a refused update changes nothing.
            wanted = ev.language or self._default_language
            if wanted != self._default_language and wanted not in self._languages:
                param = ("session.input_audio_transcription.language" if ev.beta
                         else "session.audio.input.transcription.language")
                known = ", ".join(sorted({*self._languages, self._default_language or ""} - {""}))
                return [self.error("invalid_value", f"unsupported language {wanted!r}: this "
                                   f"server transcribes {known}", param, ev.event_id)]
            if wanted != self._language:
                self._language = wanted
                out.append(SetLanguage(None if wanted == self._default_language else wanted))
        want_vad = None if ev.turn_detection is None else ev.turn_detection == "server_vad"
        if want_vad is not None and want_vad != self._server_vad:
            if want_vad:
                # Held audio becomes live audio, as if appended now; a kept
                # candidate goes on where it stood.
                self._server_vad = True
                self._candidate_len = 0
                out += self._push_pending(collect=None)
            else:
                # The resampler's held-back tail is this turn's audio, as at a commit.
                out += self._take(self._resampler.flush(), ev.event_id)
                candidate = self._segmenter.candidate_start
                if candidate is not None:
                    # Speech not yet confirmed is no turn to commit, and cutting
                    # would discard it: it stays in the buffer (and the stream's
                    # segmenter), so the next manual item starts with it.
                    self._candidate_len = self._stream_pos - candidate
                elif self._dirty:
                    self._end_reason = "commit"
                    out += self._cut()
                self._server_vad = False
        out.append(SessionUpdated(self._event_id(), self.session_config(beta=ev.beta),
                                  beta=ev.beta))
        return out

    def _append(self, ev: AudioAppend) -> list[Output]:
        data = self._carry + ev.data
        whole = len(data) - len(data) % 2
        self._carry = data[whole:]
        if not whole:
            return []
        pcm = np.frombuffer(data[:whole], dtype="<i2").astype(np.int16)
        return self._take(self._resampler.process(pcm), ev.event_id)

    def _take(self, samples: Int16Array, event_id: str | None) -> list[Output]:
        """Resampled client audio: live in server-VAD mode, held otherwise."""
        if not len(samples):
            return []
        start = self._client_pos
        self._client_pos += len(samples)
        if self._server_vad:
            return self._push_client(samples, start)
        if self._held_len + len(samples) > MAX_BUFFER_S * SAMPLE_RATE:
            return [self.error("input_audio_buffer_full",
                               f"the input audio buffer holds at most {MAX_BUFFER_S:g} s; "
                               f"commit or clear it (this audio was dropped)",
                               "audio", event_id)]
        self._pending.append((start, samples))
        self._pending_len += len(samples)
        return []

    def _commit(self, ev: AudioCommit) -> list[Output]:
        out = self._take(self._resampler.flush(), ev.event_id)
        if self._server_vad:
            if self._segmenter.state is not SegmenterState.ACTIVE:
                return [*out, self.error(
                    "input_audio_buffer_commit_empty",
                    "no speech to commit: with server_vad, turns are committed when "
                    "speech ends", None, ev.event_id)]
            self._end_reason = "commit"
            return out + self._cut()
        if self._held_len < MIN_COMMIT_MS * SAMPLE_RATE // 1000:
            have = self._held_len * 1000 / SAMPLE_RATE
            return [*out, self.error(
                "input_audio_buffer_commit_empty",
                f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, "
                f"the buffer has {have:.2f} ms", None, ev.event_id)]
        item = _Item(self._item_id(), audio_samples=self._held_len)
        self._candidate_len = 0
        out += self._push_pending(collect=item)
        out += self._cut()
        self._collect = None
        item.committed = True
        out.append(BufferCommitted(self._event_id(), item.id, self._previous_item))
        self._previous_item = item.id
        # No speech in the buffer: the empty transcript comes at once.
        out += self._progress(item)
        return out

    def _clear(self) -> list[Output]:
        self._carry = b""
        # The resampler's held-back tail is uncommitted audio too.
        self._client_pos += len(self._resampler.flush())
        out: list[Output] = []
        if self._server_vad:
            if self._dirty:
                self._end_reason = "clear"
                out += self._cut()
        else:
            self._pending, self._pending_len = [], 0
            if self._dirty:
                # A kept speech candidate (see _update) is dropped too.
                self._candidate_len = 0
                self._end_reason = "clear"
                out += self._cut()
        out.append(BufferCleared(self._event_id()))
        return out

    # --- audio into the stream ---------------------------------------------------------

    def _push_pending(self, collect: _Item | None) -> list[Output]:
        if not self._pending:
            return []
        chunks, self._pending, self._pending_len = self._pending, [], 0
        self._collect = collect
        # One push per contiguous run of client audio (a refused append leaves a hole).
        out: list[Output] = []
        run_start = run_end = chunks[0][0]
        run: list[Int16Array] = []
        for start, samples in chunks:
            if start != run_end:
                out += self._push_client(np.concatenate(run), run_start)
                run_start, run = start, []
            run.append(samples)
            run_end = start + len(samples)
        return out + self._push_client(np.concatenate(run), run_start)

    def _push_client(self, samples: Int16Array, client_start: int) -> list[Output]:
        """Client audio into the stream (and the mirrored segmenter)."""
        s = self._stream_pos
        if (self._run_len and self._run_stream[-1] + self._run_len[-1] == s
                and self._run_client[-1] + self._run_len[-1] == client_start):
            self._run_len[-1] += len(samples)
        else:
            self._run_stream.append(s)
            self._run_client.append(client_start)
            self._run_len.append(len(samples))
        self._stream_pos += len(samples)
        self._dirty = True
        self._end_reason = "vad"
        return [PushAudio(samples), *self._segments(self._segmenter.feed(samples))]

    def _cut(self) -> list[Output]:
        """End the open segment (if any) here, in the mirror and the stream alike."""
        events = self._segmenter.flush()
        self._dirty = False
        out: list[Output] = [CutSegment(), *self._segments(events)]
        self._end_reason = "vad"
        return out

    def _client_ms(self, stream_sample: int) -> int:
        i = bisect_right(self._run_stream, stream_sample) - 1
        if i < 0:
            return 0
        offset = min(stream_sample - self._run_stream[i], self._run_len[i])
        return (self._run_client[i] + offset) * 1000 // SAMPLE_RATE

    def _segments(self, events: list[SegmentEvent]) -> list[Output]:
        out: list[Output] = []
        for ev in events:
            if isinstance(ev, SpeechStarted):
                seg = self._next_segment
                self._next_segment += 1
                self._open_start = ev.sample
                if self._collect is not None:
                    self._collect.segments.append(seg)
                    self._items[seg] = self._collect
                    continue
                item = _Item(self._item_id(), [seg])
                self._items[seg] = item
                self._open_item = item
                out.append(BufferSpeechStarted(self._event_id(), item.id,
                                               self._client_ms(ev.sample)))
            elif isinstance(ev, SpeechEnded):
                item_or_none, self._open_item = self._open_item, None
                if self._collect is not None or item_or_none is None:
                    continue
                item = item_or_none
                if self._end_reason == "clear":
                    for seg in item.segments:
                        self._items.pop(seg, None)
                    continue
                item.audio_samples = ev.sample - self._open_start
                if self._end_reason == "vad":
                    out.append(BufferSpeechStopped(self._event_id(), item.id,
                                                   self._client_ms(ev.sample)))
                item.committed = True
                out.append(BufferCommitted(self._event_id(), item.id, self._previous_item))
                self._previous_item = item.id
                out += self._progress(item)
        return out

    # --- text -------------------------------------------------------------------------

    def _progress(self, item: _Item) -> list[Output]:
        """The delta of newly stable text, and ``completed`` once the item closes."""
        out: list[Output] = []
        view = item.view()
        if view.startswith(item.sent):
            if len(view) > len(item.sent):
                out.append(TranscriptionDelta(self._event_id(), item.id, view[len(item.sent):]))
                item.sent = view
        else:
            log.debug("item %s: text %r does not extend what was sent (%r)",
                      item.id, view, item.sent)
        if item.closed:
            out.append(TranscriptionCompleted(self._event_id(), item.id, view,
                                              item.audio_samples / SAMPLE_RATE))
            for seg in item.segments:
                self._items.pop(seg, None)
        return out

    def _event_id(self) -> str:
        return f"event_{self._prefix}{next(self._event_ids)}"

    def _item_id(self) -> str:
        return f"item_{self._prefix}{next(self._item_ids)}"


# --- the asyncio adapter ------------------------------------------------------------

_stream_ids = itertools.count(1)


class _StreamGone(Exception):
    """The engine stream was closed under us (engine shutting down)."""


class _Connection:
    def __init__(self, ws: ServerConnection, engine: Engine, core: RealtimeTranscription,
                 stream: Stream, queue_size: int) -> None:
        self._ws = ws
        self._engine = engine
        self._core = core
        self._stream = stream
        self._queue: asyncio.Queue[str] = asyncio.Queue(queue_size)
        self._overflow = asyncio.Event()
        self._failed = asyncio.Event()
        self._failure = ""
        self._diverged = False

    async def run(self) -> None:
        self._engine.add_listener(self._on_engine_event)
        tasks: set[asyncio.Future[Any]] = set()
        try:
            self._deliver(self._core.start())
            tasks = {asyncio.ensure_future(self._send_loop()),
                     asyncio.ensure_future(self._read_loop()),
                     asyncio.ensure_future(self._overflow.wait()),
                     asyncio.ensure_future(self._failed.wait())}
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            with contextlib.suppress(ValueError):
                self._engine.remove_listener(self._on_engine_event)
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, Exception) and not isinstance(r, ConnectionClosed):
                    log.error("realtime connection %s failed: %r", self._stream.id, r)
            # Uncommitted audio of an open segment still becomes a final for
            # the stream's other subscribers.
            await self._stream.close()
        if self._overflow.is_set():
            await self._close(_CLOSE_TOO_SLOW, "client too slow")
        elif self._failed.is_set():
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(encode_server_event(self._core.error(
                    "server_error", self._failure, error_type="server_error")))
            await self._close(_CLOSE_INTERNAL, "server error")

    async def _close(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(self._ws.close(code, reason), 3)
        except (TimeoutError, ConnectionClosed):
            pass
        finally:
            with contextlib.suppress(Exception):
                self._ws.transport.abort()

    async def _send_loop(self) -> None:
        while True:
            message = await self._queue.get()
            await self._ws.send(message)

    async def _read_loop(self) -> None:
        async for message in self._ws:
            try:
                self._deliver(self._core.receive(message))
            except _StreamGone:
                self._fail("the engine stream of this session was closed (server shutting "
                           "down?)")
                return

    def _fail(self, message: str) -> None:
        self._failure = message
        self._failed.set()

    def _on_engine_event(self, ev: EngineEvent) -> None:
        if ev.stream != self._stream.id:
            return
        try:
            self._deliver(self._core.on_engine_event(ev))
        except Exception:
            log.exception("realtime session %s failed on %r", self._stream.id, ev)
            self._fail("internal error while translating engine events; see the server log")

    def _deliver(self, outputs: list[Output]) -> None:
        pushed = False
        for out in outputs:
            if isinstance(out, PushAudio | CutSegment):
                try:
                    if isinstance(out, PushAudio):
                        self._stream.push(out.samples)
                    else:
                        self._stream.cut()
                except RuntimeError as e:
                    raise _StreamGone(str(e)) from e
                pushed = True
                continue
            if isinstance(out, SetLanguage):
                # The core allows only what the engine listed: this cannot fail.
                self._stream.set_language(out.language)
                continue
            try:
                self._queue.put_nowait(encode_server_event(out))
            except asyncio.QueueFull:
                log.warning("realtime client %s too slow; closing", self._ws.remote_address)
                self._overflow.set()
                return
        if pushed and not self._diverged:
            opened = self._stream.session.stats().segments
            if opened != self._core.segments_opened:
                self._diverged = True
                log.warning("stream %s: engine opened %d segments, realtime mirror %d; "
                            "item boundaries may be off", self._stream.id, opened,
                            self._core.segments_opened)


async def serve_realtime(ws: ServerConnection, query: dict[str, list[str]], engine: Engine,
                         broadcaster: Broadcaster, cfg: ServerConfig) -> None:
    """Serve one ``/v1/realtime`` connection until the client leaves.

    ``broadcaster`` is not used: this path needs typed engine events, which
    it takes from its own engine listener. The stream is named by
    ``?stream=ID`` or ``realtime-N`` and is visible to ``/v1/captions``.
    """
    del broadcaster
    core = RealtimeTranscription(engine.config.vad, model=engine.backend.name,
                                 language=engine.config.model.language,
                                 languages=engine.languages,
                                 prefix=secrets.token_hex(4) + "_",
                                 max_message_bytes=cfg.max_message_bytes)
    intent = query.get("intent", [])
    if intent != ["transcription"]:
        await _refuse(ws, core.error(
            "unsupported_intent", "only transcription sessions are served here: connect "
            "with ?intent=transcription", "intent"))
        return
    stream_id = (query.get("stream") or [f"realtime-{next(_stream_ids)}"])[0]
    problem = stream_id_problem(stream_id)
    if problem is not None:
        await _refuse(ws, core.error("invalid_value", problem, "stream"))
        return
    if stream_id in engine.streams:
        await _refuse(ws, core.error("stream_busy", f"stream {stream_id!r} is already open",
                                     "stream"))
        return
    try:
        stream = engine.open_stream(stream_id, source="realtime")
    except EngineStopping as e:
        await _refuse(ws, core.error("shutting_down", str(e), error_type="server_error"))
        return
    log.info("realtime transcription session %s on stream %s", core.session_id, stream_id)
    await _Connection(ws, engine, core, stream, cfg.subscriber_queue).run()


async def refuse_realtime(ws: ServerConnection, code: str, message: str) -> None:
    """Refuse a connection the server's limits turn away, in this path's error format.

    Sends one Realtime ``error`` event and closes with 1008; no session is made.
    """
    await _refuse(ws, RealtimeError(f"event_{secrets.token_hex(4)}_0", code, message))


async def _refuse(ws: ServerConnection, error: RealtimeError) -> None:
    with contextlib.suppress(ConnectionClosed):
        await ws.send(encode_server_event(error))
        await ws.close(_CLOSE_POLICY, error.code)
