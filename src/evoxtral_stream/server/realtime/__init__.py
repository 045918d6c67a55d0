"""OpenAI-Realtime-compatible transcription sessions on ``/v1/realtime``.

``/v1/realtime?intent=transcription`` speaks the transcription-session subset
of the OpenAI Realtime API (GA shapes, as the ``openai`` SDK sends and parses
them), so an unmodified OpenAI client can caption through this engine. See
``docs/protocol.md`` for what is supported and where it differs.

Three layers, like the rest of the server:

- :mod:`.protocol` parses client events and encodes server events (pure).
- :mod:`.core`: :class:`RealtimeTranscription` is pure and synchronous:
  client messages (JSON text) and engine events in, typed server events and
  :class:`PushAudio` / :class:`CutSegment` actions out. No sockets, no
  clock, no engine reference. Its module doc says how turns, commits and
  items map onto the engine's segments.
- :mod:`.connection`: :func:`serve_realtime` is the thin asyncio adapter,
  one engine stream per connection behind its own bounded queue.
"""

from __future__ import annotations

from .connection import (
    refuse_realtime,
    serve_realtime,
)
from .core import (
    RealtimeTranscription,
)
from .protocol import (
    INPUT_RATE,
    MAX_BUFFER_S,
    MIN_COMMIT_MS,
    AudioAppend,
    AudioClear,
    AudioCommit,
    BufferCleared,
    BufferCommitted,
    BufferSpeechStarted,
    BufferSpeechStopped,
    ClientEvent,
    CutSegment,
    Output,
    PushAudio,
    RealtimeError,
    RealtimeProtocolError,
    ServerEvent,
    SessionCreated,
    SessionUpdate,
    SessionUpdated,
    SetLanguage,
    TranscriptionCompleted,
    TranscriptionDelta,
    encode_server_event,
    parse_client_event,
    server_event_to_dict,
)

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
