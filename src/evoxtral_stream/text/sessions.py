"""Recorded captions back into their streams' sessions.

A recording (the journal's files, ``transcribe --jsonl``, a subscriber's
log) holds the protocol messages of one or more streams, and a stream id may
have been opened several times: a session each, whose segment indices and
times start again at 0. :class:`SessionSplitter` takes the final captions
and stream ends in the order they were recorded and gives back each
session's finals in order, without the repeats a resume replays. What
``evoxtral-stream subtitles`` writes subtitles from. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..events import CaptionEvent

__all__ = ["Session", "SessionSplitter"]


@dataclass(frozen=True)
class Session:
    """One opening of a stream: ``number`` counts from 1 among the stream's
    sessions; ``ended`` says its ``stream.ended`` was recorded (a session
    cut by a crash, or still running, has none), ``duration`` the seconds of
    audio that message gave (None without one)."""

    stream: str
    number: int
    finals: tuple[CaptionEvent, ...]
    ended: bool
    duration: float | None = None


@dataclass
class _Open:
    stream: str
    number: int
    finals: list[CaptionEvent] = field(default_factory=list)
    ended: bool = False
    duration: float | None = None


class SessionSplitter:
    """Split recorded finals into sessions (see the module doc).

    A final starts a new session of its stream when the stream's last
    session has ended, when its segment index is not past the last final's
    (a session has one final per segment, in order: the stream was opened
    again and numbered on, as the journal does), or when its seq is not past
    the last final's (another recording's numbering). A repeat, the same
    seq, segment, text, times and latency as a final of any of the stream's
    sessions (a resume replays finals, those of earlier sessions too when
    its ``since`` is older than the stream's last opening), is dropped
    first.
    """

    def __init__(self) -> None:
        self._all: list[_Open] = []
        self._open: dict[str, _Open] = {}
        # Every final of each stream so far, by seq, whichever its session
        # (sessions of different numberings can share a seq).
        self._seen: dict[str, dict[int, list[CaptionEvent]]] = {}
        self.repeats = 0
        """Finals dropped as repeats."""

    def add_final(self, event: CaptionEvent) -> None:
        if not event.final:
            raise ValueError("only final captions make up a session")
        seen = self._seen.setdefault(event.stream, {})
        if any(_same(before, event) for before in seen.get(event.seq, ())):
            self.repeats += 1
            return
        session = self._open.get(event.stream)
        if session is not None:
            last = session.finals[-1]
            if session.ended or event.seq <= last.seq or event.segment <= last.segment:
                session = None
        if session is None:
            session = self._start(event.stream)
        session.finals.append(event)
        seen.setdefault(event.seq, []).append(event)

    def add_end(self, stream: str, duration: float | None = None) -> None:
        """``stream``'s ``stream.ended`` (with its ``duration``): its open
        session is over."""
        session = self._open.get(stream)
        if session is not None and not session.ended:
            session.ended, session.duration = True, duration

    def sessions(self) -> list[Session]:
        """Every session, in the order each began."""
        return [Session(s.stream, s.number, tuple(s.finals), s.ended, s.duration)
                for s in self._all]

    def _start(self, stream: str) -> _Open:
        old = self._open.get(stream)
        session = _Open(stream, 1 if old is None else old.number + 1)
        self._open[stream] = session
        self._all.append(session)
        return session


def _same(a: CaptionEvent, b: CaptionEvent) -> bool:
    """``b`` repeats ``a`` (whose seq it has): a replay sends the very message,
    its latency too, which another run that captioned alike measures anew."""
    return ((a.segment, a.text, a.start, a.end, a.latency)
            == (b.segment, b.text, b.start, b.end, b.latency))
