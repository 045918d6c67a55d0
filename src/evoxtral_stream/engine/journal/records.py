"""The journal's lines: what each record is, and its codec (pure).

A journal file (named as :mod:`.files` says) holds one record per line. A
line is either the protocol v1 caption message
(:func:`~evoxtral_stream.server.protocol.encode_event`) of one *final*, which
can be sent to a resuming subscriber as it is (:class:`JournalRecord`), a seq
reservation, ``{"type":"seq.reserved","stream":S,"seq":R}``, which is never
sent (:class:`SeqReservation`), the stream's end record, its protocol v1
``stream.ended`` message as it is, with no seq (:class:`EndRecord`), or a
loss record, ``{"type":"seq.lost","stream":S,"seqs":[...],"seq":N}``
(:class:`LostRecord`). Partials are not journaled: a final supersedes them.
A line that is none of them whole, or whose seq is below 1, decodes to None:
damage, which the reader skips with a warning. When each record is written,
and what a replay or a restore makes of it, is the store's contract
(:mod:`.store`).

The lines of :data:`~.store.PRUNED_FILE`, ``{"stream": S, "seq": N}``, are
coded here too.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

from ...events import CaptionEvent, StreamEnded
from ...server.protocol import encode_event

__all__ = [
    "EndRecord",
    "JournalRecord",
    "LostRecord",
    "SeqReservation",
    "decode_end",
    "decode_line",
    "decode_lost",
    "decode_record",
    "decode_reservation",
    "encode_end",
    "encode_lost",
    "encode_record",
    "encode_reservation",
]

_RESERVED = "seq.reserved"
_ENDED = "stream.ended"
_LOST = "seq.lost"


@dataclass(frozen=True)
class JournalRecord:
    """One journaled final: its stream, its seq and the wire message."""

    stream: str
    seq: int
    message: str


@dataclass(frozen=True)
class SeqReservation:
    """A reservation line: ``stream`` may have been given seqs up to ``seq``."""

    stream: str
    seq: int


@dataclass(frozen=True)
class EndRecord:
    """An end record: ``stream`` ended; ``message`` is its ``stream.ended``."""

    stream: str
    message: str


@dataclass(frozen=True)
class LostRecord:
    """A loss record: the appends of ``stream``'s finals ``seqs`` (the first
    :data:`~.store.LOST_LISTED` lost in a row) failed; ``seq`` is the highest lost,
    past ``seqs[-1]`` when more failed than are listed."""

    stream: str
    seqs: tuple[int, ...]
    seq: int



def encode_record(event: CaptionEvent) -> str:
    """The journal line of a final caption (without the newline)."""
    if not event.final:
        raise ValueError("only final captions are journaled")
    return encode_event(event)


def decode_line(line: str) -> JournalRecord | SeqReservation | EndRecord | LostRecord | None:
    """Parse one journal line (once): a final, a reservation, an end record
    or a loss record; None when it is none of them whole, or a seq is below
    1 (seqs count from 1: a lower one is damage, and read as a seq it would
    stop a replay's backward read there)."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # the latter: nested past json's reach
        return None
    if not isinstance(obj, dict) or not isinstance(stream := obj.get("stream"), str):
        return None
    kind, seq = obj.get("type"), obj.get("seq")
    if kind == _ENDED:
        return EndRecord(stream, line)
    if kind == _LOST:
        return _lost_of(stream, obj.get("seqs"), seq)
    if (kind not in ("caption", _RESERVED) or not isinstance(seq, int)
            or isinstance(seq, bool) or seq < 1):
        return None
    return JournalRecord(stream, seq, line) if kind == "caption" else SeqReservation(stream, seq)


def decode_record(line: str) -> JournalRecord | None:
    """Parse one journal line; None when it is not a whole caption record."""
    record = decode_line(line)
    return record if isinstance(record, JournalRecord) else None


def _seq(value: object) -> int | None:
    """``value`` as a seq (an int of at least 1), else None."""
    return value if type(value) is int and value >= 1 else None


def _lost_of(stream: str, seqs: object, seq: object) -> LostRecord | None:
    """The loss record of a decoded line's fields; None unless ``seqs`` is
    a non-empty ascending list of seqs and ``seq`` a seq at or past its last."""
    if not isinstance(seqs, list) or not seqs or (top := _seq(seq)) is None:
        return None
    listed = tuple(x for x in seqs if _seq(x) is not None)
    if len(listed) < len(seqs) or top < listed[-1] or any(
            a >= b for a, b in itertools.pairwise(listed)):
        return None
    return LostRecord(stream, listed, top)


def encode_lost(stream: str, seqs: tuple[int, ...], seq: int) -> str:
    """The loss record (without the newline) of ``stream``'s finals
    ``seqs`` (ascending, at most :data:`~.store.LOST_LISTED`), ``seq`` the highest
    lost: ``{"type":"seq.lost","stream":S,"seqs":[...],"seq":N}``."""
    return json.dumps({"type": _LOST, "stream": stream, "seqs": list(seqs), "seq": seq},
                      ensure_ascii=False, separators=(",", ":"))


def decode_lost(line: str) -> LostRecord | None:
    """Parse one journal line; None when it is not a whole loss record."""
    record = decode_line(line)
    return record if isinstance(record, LostRecord) else None


def encode_reservation(stream: str, seq: int) -> str:
    """The journal line reserving seqs up to ``seq`` (without the newline)."""
    return json.dumps({"type": _RESERVED, "stream": stream, "seq": seq},
                      ensure_ascii=False, separators=(",", ":"))


def decode_reservation(line: str) -> SeqReservation | None:
    """Parse one journal line; None when it is not a whole reservation."""
    record = decode_line(line)
    return record if isinstance(record, SeqReservation) else None


def encode_end(event: StreamEnded) -> str:
    """The end record of a stream: its ``stream.ended`` message (no newline)."""
    return encode_event(event)


def decode_end(line: str) -> EndRecord | None:
    """Parse one journal line; None when it is not a whole end record."""
    record = decode_line(line)
    return record if isinstance(record, EndRecord) else None


def _encode_pruned(stream: str, seq: int) -> bytes:
    return (json.dumps({"stream": stream, "seq": seq}, ensure_ascii=False) + "\n").encode()


def _decode_pruned(line: bytes) -> tuple[str, int] | None:
    """A :data:`~.store.PRUNED_FILE` line's stream and seq; None if damaged."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # the latter: nested past json's reach
        return None
    if not isinstance(obj, dict):
        return None
    stream, seq = obj.get("stream"), obj.get("seq")
    if not isinstance(stream, str) or type(seq) is not int or seq < 1:
        return None
    return stream, seq
