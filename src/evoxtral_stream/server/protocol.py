"""Wire protocol v1 codecs: engine events to JSON text and back.

Pure functions, no sockets. The messages are documented in
``docs/protocol.md`` (with a JSON Schema for each).
"""

from __future__ import annotations

import enum
import json
import math
import re
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
import numpy.typing as npt

from .. import __version__
from ..events import (
    CaptionEvent,
    EngineEvent,
    StreamEnded,
    StreamError,
    StreamStarted,
    TagMark,
)
from ..text.chars import mend_surrogates, shown
from ..text.tags import TagKind, plain_text

__all__ = [
    "MAX_INGEST_RATE",
    "MAX_LOST_S",
    "MIN_INGEST_RATE",
    "PROTOCOL_VERSION",
    "RESUME_QUERY_BYTES",
    "EndOfStream",
    "IngestFormat",
    "IngestProgress",
    "LostAudio",
    "ProtocolError",
    "SampleFormat",
    "caption_from_dict",
    "caption_to_dict",
    "decode_audio_frame",
    "decode_caption",
    "encode_error",
    "encode_event",
    "encode_hello",
    "encode_message",
    "event_to_dict",
    "finite_seconds",
    "hello_epoch",
    "load_client_json",
    "new_epoch",
    "parse_epoch",
    "parse_ingest_message",
    "parse_since",
    "resume_since",
]

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A message does not follow the protocol; ``code`` goes on the wire."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def caption_to_dict(ev: CaptionEvent) -> dict[str, Any]:
    return {
        "type": "caption",
        "stream": ev.stream,
        "segment": ev.segment,
        "seq": ev.seq,
        "final": ev.final,
        "text": ev.text,
        "plain_text": ev.plain_text,
        "stable": ev.stable,
        "unstable": ev.unstable,
        "tags": [
            {"tag": t.tag, "kind": t.kind, "index": t.index, "t": round(t.t, 3),
             "known": t.known}
            for t in ev.tags
        ],
        "start": round(ev.start, 3),
        "end": round(ev.end, 3),
        "latency": None if ev.latency is None else round(ev.latency, 4),
        # Only where true: a reader that does not know it misses nothing else.
        **({"continues": True} if ev.continues else {}),
    }


def event_to_dict(ev: EngineEvent) -> dict[str, Any]:
    if isinstance(ev, CaptionEvent):
        return caption_to_dict(ev)
    if isinstance(ev, StreamStarted):
        return {"type": "stream.started", "stream": ev.stream, "source": ev.source}
    if isinstance(ev, StreamEnded):
        return {
            "type": "stream.ended", "stream": ev.stream,
            "duration": round(ev.duration_s, 3), "segments": ev.segments, "finals": ev.finals,
        }
    if isinstance(ev, StreamError):
        # A backend's exception may name a path whose bytes are no UTF-8:
        # a lone surrogate, which no frame or file can take.
        return {
            "type": "error", "stream": ev.stream, "code": ev.code,
            "message": mend_surrogates(ev.message), "segment": ev.segment,
        }
    raise TypeError(f"not an engine event: {ev!r}")


def encode_event(ev: EngineEvent) -> str:
    return _dumps(event_to_dict(ev))


def encode_hello(backend: str, streams: Sequence[str], capabilities: Sequence[str],
                 languages: Sequence[str] = (), adapters: Sequence[str] = (), *,
                 epoch: str) -> str:
    """The ``hello`` message. ``languages`` lists what an ingest stream may
    ask for, the default (``model.language``) first; ``adapters`` likewise
    (empty: the backend cannot switch); ``epoch`` names the server's seq
    numbering (see :func:`parse_epoch`)."""
    return _dumps({
        "type": "hello",
        "v": PROTOCOL_VERSION,
        "server": "evoxtral-stream",
        "version": __version__,
        "epoch": epoch,
        "backend": backend,
        "capabilities": list(capabilities),
        "streams": list(streams),
        "languages": list(languages),
        "adapters": list(adapters),
    })


def encode_error(code: str, message: str, stream: str | None = None) -> str:
    return _dumps({"type": "error", "code": code, "message": message, "stream": stream})


#: The values a tag's ``kind`` may take.
_TAG_KINDS = tuple(kind.value for kind in TagKind)


def caption_from_dict(obj: Mapping[str, Any]) -> CaptionEvent:
    """The :class:`CaptionEvent` a caption message carries (inverse of
    :func:`caption_to_dict`); ProtocolError when a field is missing or of the
    wrong type. Fields a reader can do without (``plain_text``, ``stable``,
    ``unstable``, ``tags``, ``latency``, ``continues``, a tag's ``known``)
    default when absent; every number that is a time (``start``, ``end``, ``latency``, a
    tag's ``t``) must be finite (:func:`_finite`). ``seq`` is an integer from
    1, ``segment`` one from 0, ``start`` and ``end`` are from 0. A tag's
    ``kind`` is a :class:`TagKind` value, its ``index`` an integer from 0,
    its ``known`` true or false (as the schema in docs/protocol.md says)."""
    if obj.get("type") != "caption":
        raise ProtocolError("bad_message", "not a caption message")

    def field(key: str, tp: type | tuple[type, ...], default: Any = ...) -> Any:
        value = obj.get(key, default)
        if value is ...:
            raise ProtocolError("bad_message", f"caption field {key!r} is missing")
        if not isinstance(value, tp) or (isinstance(value, bool) and bool not in (
                tp if isinstance(tp, tuple) else (tp,))):
            raise ProtocolError("bad_message", f"caption field {key!r} has the wrong type: "
                                               f"{shown(value)}")
        if isinstance(value, str):
            _check_utf8(value, f"caption field {key!r}")
        return value

    text = field("text", str)
    tags = []
    for t in field("tags", list, []):
        # bool is an int: true is no index or time.
        if not (isinstance(t, Mapping) and isinstance(t.get("tag"), str)
                and isinstance(t.get("kind"), str)
                and isinstance(t.get("index"), int) and not isinstance(t["index"], bool)
                and t["index"] >= 0
                and isinstance(t.get("t"), int | float) and not isinstance(t["t"], bool)):
            raise ProtocolError("bad_message", f"caption tag {shown(t)} is not a tag object")
        _check_utf8(t["tag"], "caption tag")
        _check_utf8(t["kind"], "caption tag kind")
        if t["kind"] not in _TAG_KINDS:
            raise ProtocolError("bad_message", f"caption tag kind {shown(t['kind'])} is none of "
                                               f"{', '.join(_TAG_KINDS)}")
        # Not bool(): "no" would read as true.
        known = t.get("known", True)
        if not isinstance(known, bool):
            raise ProtocolError("bad_message", f"caption tag 'known' is not true or false: "
                                               f"{shown(known)}")
        tags.append(TagMark(t["tag"], t["kind"], t["index"], _finite(t["t"], "caption tag 't'"),
                            known))

    def seconds(key: str) -> float:
        return _at_least(_finite(field(key, (int, float)), f"caption field {key!r}"), 0,
                         f"caption field {key!r}")

    latency = field("latency", (int, float, type(None)), None)
    if latency is not None:
        latency = _finite(latency, "caption field 'latency'")
    return CaptionEvent(
        stream=field("stream", str),
        segment=_at_least(field("segment", int), 0, "caption field 'segment'"),
        seq=_at_least(field("seq", int), 1, "caption field 'seq'"),
        final=field("final", bool), text=text,
        plain_text=field("plain_text", (str, type(None)), None) or plain_text(text),
        stable=field("stable", str, text), unstable=field("unstable", str, ""),
        tags=tuple(tags), start=seconds("start"), end=seconds("end"),
        latency=latency, continues=field("continues", bool, False))


_Number = TypeVar("_Number", int, float)


def _at_least(value: _Number, lo: int, what: str) -> _Number:
    """``value``; ProtocolError when it is below ``lo`` (the schema's minimum)."""
    if value < lo:
        raise ProtocolError("bad_message", f"{what} must be at least {lo}, "
                                           f"got {shown(value, 40)}")
    return value


def _finite(value: float, what: str) -> float:
    """``value`` as a float; ProtocolError when it is not finite: json.loads
    takes the literals ``NaN``, ``Infinity`` and ``-Infinity`` (no JSON) and
    reads ``1e999`` as infinity, and an integer past a float's range has no
    float at all."""
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ProtocolError("bad_message", f"{what} is not a finite number: "
                                           f"{shown(value, 40)}")
    return number


def _check_utf8(value: str, what: str) -> None:
    """ProtocolError for a string no UTF-8 text can hold: json.loads takes
    an escaped lone surrogate (``"\\ud800"``), which is no character."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("bad_message", f"{what} holds a lone surrogate: "
                                           f"{shown(value)}") from None


def decode_caption(text: str | bytes) -> dict[str, Any]:
    """Parse a caption message (for clients and tests); ProtocolError if it is
    not one, by the rules of :func:`caption_from_dict`."""
    obj = _load_json(text)
    caption_from_dict(obj)
    return obj


# --- audio ingest (client -> server) -----------------------------------------

MIN_INGEST_RATE = 8_000
MAX_INGEST_RATE = 192_000
_MAX_CHANNELS = 8
#: The most lost audio (seconds) one ``lost`` message may declare; also what
#: an ingest connection may declare at once before ``server.max_ingest_speed``
#: applies to it (docs/protocol.md).
MAX_LOST_S = 600


class SampleFormat(enum.Enum):
    """Binary sample encodings accepted on ``/v1/ingest`` (little-endian)."""

    PCM16 = "pcm16"
    FLOAT32 = "float32"

    @property
    def width(self) -> int:
        return 2 if self is SampleFormat.PCM16 else 4


@dataclass(frozen=True)
class IngestFormat:
    """The ``config`` message: what the binary frames that follow contain."""

    sample_rate: int
    channels: int
    sample_format: SampleFormat
    adapter: str | None = None
    language: str | None = None
    progress: bool = False
    """The client asked for ``ingest.progress`` messages (:class:`IngestProgress`)."""

    @property
    def frame_bytes(self) -> int:
        """Bytes per sample frame (one sample of every channel)."""
        return self.channels * self.sample_format.width


@dataclass(frozen=True)
class EndOfStream:
    """The ``end`` message: no more audio; flush and summarise."""


@dataclass(frozen=True)
class LostAudio:
    """The ``lost`` message: the client lost ``samples`` sample frames (at its
    configured rate) here and will not send them; the server puts as much
    silence in their place."""

    samples: int


def load_client_json(text: str | bytes) -> tuple[Any, str | None]:
    """``json.loads(text)`` and the first key that an object in it names
    twice (None: no such key), for every decoder of a client's message.

    json.loads keeps the last value of such a key without a word; a client
    that sends ``{"type": "end", "type": "x"}`` has a bug it should hear
    about, so the decoders refuse the message by that key's name. The whole
    text is still read, so a decoder can name the event at fault. Raises
    what json.loads raises."""
    twice: list[str] = []

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) < len(pairs) and not twice:
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    twice.append(key)
                    break
                seen.add(key)
        return obj

    value = json.loads(text, object_pairs_hook=unique)
    return value, (twice[0] if twice else None)


def _load_json(text: str | bytes) -> dict[str, Any]:
    try:
        obj, twice = load_client_json(text)
    except UnicodeDecodeError:
        # Only bytes handed to a codec get here: the server never reads a text
        # frame that is not UTF-8 (websockets closes it with 1007 first).
        raise ProtocolError("bad_json", "message is not valid UTF-8 text") from None
    except (ValueError, RecursionError) as e:
        # Beside malformed text: nesting past the recursion limit, and
        # integers past Python's digit limit for int().
        raise ProtocolError("bad_json", f"message is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", "message must be a JSON object")
    if twice is not None:
        raise ProtocolError("bad_message", f"message names the key {shown(twice)} twice in "
                                           f"one object")
    return obj


def _int_field(obj: Mapping[str, Any], key: str, lo: int, hi: int,
               code: str = "bad_config") -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(code, f"{key} must be an integer {lo}..{hi}, got {shown(value)}")
    return value


def parse_ingest_message(text: str | bytes, sample_rate: int | None = None
                         ) -> IngestFormat | EndOfStream | LostAudio:
    """Parse a text message sent on ``/v1/ingest``.

    ``{"type": "config", "sample_rate": 48000, "channels": 2, "format": "pcm16"}``
    (optionally ``"adapter": NAME``, ``"language": CODE`` and ``"progress": true``),
    ``{"type": "lost", "samples": N}`` or ``{"type": "end"}``; anything else
    raises :class:`ProtocolError`. ``sample_rate`` is the stream's configured
    rate, which bounds a ``lost`` message's ``samples`` to :data:`MAX_LOST_S`
    (None: before the config, :data:`MAX_INGEST_RATE`); a bad ``samples`` is
    ``bad_message``, and so is any ``config`` once there is one. Whether the
    engine knows the adapter or language is checked by the caller.
    """
    obj = _load_json(text)
    kind = obj.get("type")
    if kind == "end":
        return EndOfStream()
    if kind == "lost":
        most = (sample_rate or MAX_INGEST_RATE) * MAX_LOST_S
        return LostAudio(_int_field(obj, "samples", 0, most, "bad_message"))
    if kind != "config":
        raise ProtocolError("bad_message",
                            f"unknown message type {shown(kind)} (config, lost or end)")
    if sample_rate is not None:
        # Whatever it holds: its values are never used, so none is bad_config.
        raise ProtocolError("bad_message", "config may be sent only once")
    rate = _int_field(obj, "sample_rate", MIN_INGEST_RATE, MAX_INGEST_RATE)
    channels = _int_field(obj, "channels", 1, _MAX_CHANNELS) if "channels" in obj else 1
    fmt = obj.get("format", "pcm16")
    try:
        sample_format = SampleFormat(fmt)
    except ValueError:
        raise ProtocolError(
            "bad_config", f"format must be 'pcm16' or 'float32', got {shown(fmt)}") from None
    adapter, language = obj.get("adapter"), obj.get("language")
    for key, value in (("adapter", adapter), ("language", language)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ProtocolError("bad_config",
                                f"{key} must be a non-empty string, got {shown(value)}")
    progress = obj.get("progress", False)
    if not isinstance(progress, bool):
        raise ProtocolError("bad_config",
                            f"progress must be true or false, got {shown(progress)}")
    return IngestFormat(rate, channels, sample_format, adapter, language, progress)


class IngestProgress:
    """The ``ingest.progress`` messages of one ingest connection (docs/protocol.md).

    :meth:`add` counts the sample frames of each binary message once the
    server has handed it to the stream, and returns the message to send when
    at least half a second of frames (at the config's rate) came since the
    last one; :meth:`flush` (at ``end``) returns it for the frames since the
    last one, if any. Driven by the audio only: no clock.
    """

    def __init__(self, sample_rate: int) -> None:
        self.frames = 0
        """Frames of binary audio handed to the stream so far (not ``lost`` ones)."""
        self._reported = 0
        self._step = -(-sample_rate // 2)  # half a second, rounded up

    def add(self, frames: int) -> str | None:
        self.frames += frames
        return self.flush() if self.frames - self._reported >= self._step else None

    def flush(self) -> str | None:
        if self.frames == self._reported:
            return None
        self._reported = self.frames
        return encode_message("ingest.progress", frames=self.frames)


def decode_audio_frame(data: bytes, fmt: IngestFormat) -> npt.NDArray[Any]:
    """Decode one binary message to ``(frames, channels)`` int16 or float32.

    Raises :class:`ProtocolError` (``odd_length``) when the message does not
    hold a whole number of sample frames, and (``bad_audio``) for float
    samples that are not finite.
    """
    if len(data) % fmt.frame_bytes:
        raise ProtocolError(
            "odd_length",
            f"binary message of {len(data)} bytes is not a whole number of "
            f"{fmt.channels}-channel {fmt.sample_format.value} frames "
            f"({fmt.frame_bytes} bytes each)")
    dtype = "<i2" if fmt.sample_format is SampleFormat.PCM16 else "<f4"
    samples = np.frombuffer(data, dtype=dtype).reshape(-1, fmt.channels)
    if fmt.sample_format is SampleFormat.FLOAT32:
        if not np.isfinite(samples).all():
            raise ProtocolError("bad_audio", "float32 audio holds NaN or infinite samples")
        return samples.astype(np.float32)
    return samples.astype(np.int16)


def encode_message(kind: str, **fields: Any) -> str:
    """Any other server message: ``{"type": kind, **fields}``."""
    return _dumps({"type": kind, **fields})


_SEQ_DIGITS = 18  # any seq fits; more digits are not a seq


def parse_since(values: Iterable[str], streams: Sequence[str], *,
                streams_by: str = "?stream=ID") -> dict[str, int]:
    """Resume points: ``SEQ`` (for each of ``streams``) or ``STREAM:SEQ[,...]``.

    ``values`` are the raw ``since`` strings (query parameters or a client's
    ``--since``); ``streams`` the streams subscribed to (empty: all). Raises
    :class:`ProtocolError` (``bad_query``) for anything else, including a
    ``STREAM:SEQ`` whose stream is not among ``streams``: a resume replays
    only what the subscription would have delivered. Shared by the server and
    the clients so both read it alike; ``streams_by`` names where ``streams``
    come from in the messages (the query's ``?stream=ID``; a client passes
    its own flag).
    """
    since: dict[str, int] = {}
    for item in (v.strip() for value in values for v in value.split(",")):
        if not item:
            continue
        name, sep, seq = item.rpartition(":")
        # isdigit() alone takes "²" and other digits int() refuses.
        if not (seq.isascii() and seq.isdigit() and len(seq) <= _SEQ_DIGITS) \
                or (sep and not name):
            raise ProtocolError("bad_query", f"since takes SEQ or STREAM:SEQ, got {item[:80]!r}")
        if sep and streams and name not in streams:
            raise ProtocolError("bad_query", f"since names stream {name[:80]!r}, which is not "
                                             f"among the streams subscribed to ({streams_by})")
        if sep:
            since[name] = int(seq)
        elif streams:
            since.update(dict.fromkeys(streams, int(seq)))
        else:
            raise ProtocolError("bad_query",
                                f"since=SEQ needs {streams_by} (or use STREAM:SEQ)")
    return since


#: What an epoch may look like: the server makes them of hex digits
#: (:func:`new_epoch`); a client echoes the one its hello gave.
_EPOCH = re.compile(r"[A-Za-z0-9_-]{1,64}")


def new_epoch() -> str:
    """A fresh epoch: 16 random hex digits."""
    return secrets.token_hex(8)


def finite_seconds(value: object) -> float | None:
    """A time field of an event as a client reads it: ``value`` when it is a
    finite number, else None (another server may send a string, null, NaN,
    or an integer past a float: JSON's have no bound)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


def hello_epoch(value: object) -> str | None:
    """The epoch a client keeps from a hello's ``epoch`` field, to send back
    when it resumes: ``value`` when it is one :func:`parse_epoch` takes, else
    None (another server's, which a server of this protocol would refuse,
    or one no URL can carry: JSON holds lone surrogates)."""
    return value if isinstance(value, str) and _EPOCH.fullmatch(value) else None


def parse_epoch(values: Sequence[str]) -> str | None:
    """The ``epoch`` query parameter: the epoch of the hello that came with
    the client's ``since`` seqs (None: not given). Raises
    :class:`ProtocolError` (``bad_query``) for more than one, or one that no
    server makes (1 to 64 of ``A-Z a-z 0-9 _ -``).

    Seqs mean something only within one numbering: a server that restarts
    without its journal numbers every stream from 1 again and takes a new
    epoch, so a ``since`` from another epoch is not compared with its seqs.
    """
    if not values:
        return None
    if len(values) > 1:
        raise ProtocolError("bad_query", "epoch given more than once")
    if not _EPOCH.fullmatch(values[0]):
        raise ProtocolError("bad_query", f"epoch takes 1 to 64 of A-Z a-z 0-9 _ -, "
                                         f"got {values[0][:80]!r}")
    return values[0]


#: Most bytes of ``since=`` a reconnect sends (a server refuses a request line
#: over about 8 KB with HTTP 414; the websockets library's limit is 8192).
RESUME_QUERY_BYTES = 4096


def resume_since(last_seq: Mapping[str, int], ended: Collection[str],
                 max_bytes: int = RESUME_QUERY_BYTES) -> dict[str, int]:
    """The resume points a reconnect sends: those of the streams still live,
    then of the streams that ended, each group the most recently active
    first (``last_seq`` is in order of activity, the latest last), as many
    as fit in ``max_bytes`` of ``since=`` (percent-encoded). Pure; for
    clients (the TTS bridge, the viewer).

    A stream that ended has nothing more to replay unless its id is used
    again while the client is away; the streams that ended longest ago are
    the ones a server no longer remembers (``server.history_streams``).
    An id holding a lone surrogate (JSON carries them; no URL can) is left
    out: that stream gets live captions only."""
    latest_first = list(last_seq)[::-1]
    order = [s for s in latest_first if s not in ended] + [s for s in latest_first if s in ended]
    out: dict[str, int] = {}
    size = 0
    for stream in order:
        try:
            encoded = quote(stream, safe="")
        except UnicodeEncodeError:
            continue
        item = len(encoded) + len(f":{last_seq[stream]},")
        if size + item > max_bytes:
            break
        size += item
        out[stream] = last_seq[stream]
    return out
