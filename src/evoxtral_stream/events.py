"""Typed events that flow between the pipeline stages.

Audio is mono 16 kHz throughout; positions are stream-relative sample
indices (``SAMPLE_RATE`` per second). Times that come from a clock
(``*_at``) are ``time.monotonic()`` seconds, stamped only at the threaded and
async edges; the pure cores pass them through untouched.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import numpy.typing as npt

from .text.chars import CONTROL, HIDDEN

__all__ = [
    "MAX_STREAM_ID",
    "MAX_STREAM_ID_ENCODED",
    "SAMPLE_RATE",
    "STREAM_ERROR_CODES",
    "CaptionEvent",
    "DecodeFailure",
    "DecodeRequest",
    "EngineEvent",
    "Float32Array",
    "Hypothesis",
    "Int16Array",
    "RequestKind",
    "SegmentEvent",
    "SpeechAudio",
    "SpeechEnded",
    "SpeechStarted",
    "StreamEnded",
    "StreamError",
    "StreamStarted",
    "TagMark",
    "stream_id_problem",
]

SAMPLE_RATE = 16_000

#: The longest stream id, in characters.
MAX_STREAM_ID = 128
#: The longest stream id once percent-encoded as UTF-8 (what a journal file
#: name holds: with its index and start it stays under 255 bytes).
MAX_STREAM_ID_ENCODED = 200


_CONTROL = re.compile(f"[{CONTROL}]")
_HIDDEN = re.compile(f"[{HIDDEN}]")


def stream_id_problem(stream_id: str) -> str | None:
    """Why ``stream_id`` cannot name a stream (one line), or None when it can:
    1 to :data:`MAX_STREAM_ID` characters and at most
    :data:`MAX_STREAM_ID_ENCODED` bytes percent-encoded, no control character,
    no invisible format character (:data:`~.text.chars.HIDDEN`: a bidi
    override shows the id reordered on the page and in logs, a zero-width
    space makes two ids that look the same), no lone surrogate, no comma and
    no white space at either end (``?stream=`` and ``since=`` list streams
    comma-separated and trim each, so such a stream could be neither
    subscribed to by name nor resumed)."""
    shown = f"{stream_id[:40]!r}{'...' if len(stream_id) > 40 else ''}"
    if not stream_id or len(stream_id) > MAX_STREAM_ID:
        return (f"a stream id has 1 to {MAX_STREAM_ID} characters, got "
                f"{len(stream_id)}: {shown}")
    if _CONTROL.search(stream_id):
        return f"a stream id holds no control characters, got {stream_id!r}"
    if _HIDDEN.search(stream_id):
        # repr() writes them as escapes (they are not printable), so the
        # message shows where they are.
        return (f"a stream id holds no invisible format characters (bidi controls, "
                f"zero-width spaces...), got {stream_id!r}")
    if any("\ud800" <= c <= "\udfff" for c in stream_id):
        # Not text, cannot be sent: a file name's byte that is no UTF-8
        # (Python's surrogateescape), or JSON's "\ud800".
        return f"a stream id is text: it holds no lone surrogate, got {stream_id!r}"
    if "," in stream_id:
        return f"a stream id holds no comma (stream lists are comma-separated), got {shown}"
    if stream_id != stream_id.strip():
        return (f"a stream id neither begins nor ends with white space (stream lists trim "
                f"it), got {shown}")
    encoded = len(quote(stream_id, safe=""))
    if encoded > MAX_STREAM_ID_ENCODED:
        return (f"a stream id is at most {MAX_STREAM_ID_ENCODED} bytes percent-encoded "
                f"(fewer characters when they are not ASCII letters or digits), got "
                f"{encoded}: {shown}")
    return None

Int16Array = npt.NDArray[np.int16]
Float32Array = npt.NDArray[np.float32]


# --- segmenter output -------------------------------------------------------


@dataclass(frozen=True)
class SpeechStarted:
    """A segment opens at ``sample`` (pre-roll included)."""

    sample: int


@dataclass(frozen=True)
class SpeechAudio:
    """Audio of the open segment, starting at ``start_sample``.

    Consecutive ``SpeechAudio`` events of one segment are contiguous.
    """

    start_sample: int
    samples: Int16Array

    @property
    def end_sample(self) -> int:
        return self.start_sample + len(self.samples)


@dataclass(frozen=True)
class SpeechEnded:
    """The open segment ends at ``sample`` (exclusive).

    ``forced`` is true when the segment was cut because it reached the maximum
    length; then audio already delivered past ``sample`` belongs to the next
    segment, which starts at ``sample`` and re-delivers it.
    """

    sample: int
    forced: bool


SegmentEvent = SpeechStarted | SpeechAudio | SpeechEnded


# --- model worker -----------------------------------------------------------


class RequestKind(enum.Enum):
    PARTIAL = "partial"
    FINAL = "final"


@dataclass(frozen=True, eq=False)
class DecodeRequest:
    """Decode ``audio`` (float32 in [-1, 1], 16 kHz) of one segment.

    ``revision`` increases with every request of a segment, so a newer request
    supersedes an older partial. ``ready_at`` is when the engine had the
    audio (the end-of-speech decision for a final); latency counts from it.
    ``prefix`` is text already committed for this segment (``stream.prefix_reuse``):
    a backend that supports it may continue from it instead of decoding it
    again, so the hypothesis then starts with it; others ignore it.
    ``draft`` is the token ids of the segment's last hypothesis
    (``stream.draft``): a backend may verify them instead of generating them
    one by one; the text it returns is the same either way.
    ``at_pause`` marks a partial made when a pause passed the end tail
    (``stream.pause_partial``): its audio is all the segment has if the
    pause becomes its end. ``reuse`` is set on a final whose audio is exactly
    that of the partial of that revision: the engine answers it with that
    partial's text instead of decoding the same audio again.
    ``language`` is the stream's language (None: ``model.language``).
    ``paced`` is false for audio fed faster than it plays (a file
    transcribed as fast as the model allows, a pipe found ahead of the
    clock): how long such a request waits says nothing about the model
    keeping up, so it is not counted as lag.
    """

    stream: str
    segment: int
    revision: int
    kind: RequestKind
    audio: Float32Array
    start_sample: int
    end_sample: int
    ready_at: float
    forced_end: bool = False
    adapter: str | None = None
    prefix: str = ""
    language: str | None = None
    draft: tuple[int, ...] = ()
    at_pause: bool = False
    reuse: int | None = None
    paced: bool = True


@dataclass(frozen=True)
class Hypothesis:
    """The model's text for one request; ``token_ids`` are the model's tokens
    of it where the backend reports them (a later request's ``draft``)."""

    stream: str
    segment: int
    revision: int
    kind: RequestKind
    text: str
    start_sample: int
    end_sample: int
    ready_at: float
    done_at: float
    forced_end: bool = False
    token_ids: tuple[int, ...] = ()

    @property
    def final(self) -> bool:
        return self.kind is RequestKind.FINAL

    @property
    def latency(self) -> float:
        return self.done_at - self.ready_at


@dataclass(frozen=True)
class DecodeFailure:
    """The backend failed on a request; ``message`` is for people."""

    stream: str
    segment: int
    revision: int
    kind: RequestKind
    message: str


# --- captions ---------------------------------------------------------------


@dataclass(frozen=True)
class TagMark:
    """An inline tag: canonical name, kind, the index of the plain-text word it
    precedes, and an estimate of its time in stream seconds."""

    tag: str
    kind: str
    index: int
    t: float
    known: bool = True


@dataclass(frozen=True)
class CaptionEvent:
    """One caption update for a segment.

    ``text`` is the whole segment's tagged text, ``stable + unstable``:
    the stable part never changes in later events of the segment; the
    unstable tail may. A final event's text is the segment's last word.
    ``seq`` increases strictly per stream.
    """

    stream: str
    segment: int
    seq: int
    final: bool
    text: str
    plain_text: str
    stable: str
    unstable: str
    tags: tuple[TagMark, ...]
    start: float
    end: float
    latency: float | None
    continues: bool = False
    """The segment goes on with the speech of the one before it, cut at
    ``vad.max_segment_s`` (a forced split), and its text was stitched onto
    that one's: the emotion and delivery tags still in effect there are left
    out of it (the merger's carry-over)."""


# --- stream lifecycle (broadcast beside captions) ----------------------------


@dataclass(frozen=True)
class StreamStarted:
    """A stream was opened (microphone, file or network ingest)."""

    stream: str
    source: str


@dataclass(frozen=True)
class StreamEnded:
    """A stream's input ended and every final of it has been emitted."""

    stream: str
    duration_s: float
    segments: int
    finals: int


STREAM_ERROR_CODES = ("decode_failed", "model_stalled", "journal_failed", "final_lost",
                      "audio_input_lost")
"""The codes of the :class:`StreamError` events the engine and ``serve``
send; ``/metrics`` exports a count of each from the start (at 0)."""


@dataclass(frozen=True)
class StreamError:
    """Something failed for one stream; other streams are unaffected."""

    stream: str
    code: str
    message: str
    segment: int | None = None
    closes_segment: bool = False
    """No caption of ``segment`` follows: its final failed or was lost and
    nothing of it had been shown (else that text comes as its final, at
    once or, held behind an earlier segment still open, after it). Not
    on the wire (clients see the code); consumers that wait for a
    segment's end, such as the realtime endpoint, close it here."""


EngineEvent = CaptionEvent | StreamStarted | StreamEnded | StreamError
