"""Fan-out of engine events to subscribers, each behind its own bounded queue.

Overflow policy: :meth:`Broadcaster.publish` never waits. When a
subscriber's queue is full the subscriber is marked overflowed and removed;
its relay task then closes the connection (close code 1013, "subscriber too
slow"). Other subscribers are unaffected. Each event is encoded once,
whatever the number of subscribers.

Resume: the last ``history`` caption events of each stream are kept (for at
most ``history_streams`` streams, the least recently active forgotten first),
so a subscriber that reconnects with ``since={stream: seq}`` first gets every
retained caption after ``seq`` (and the stream's ``stream.ended`` if it has
ended: the ends of the :data:`ENDS_REMEMBERED` streams that ended last are
kept apart from their captions). Captions no longer retained are announced by
an explicit ``gap`` message, never skipped silently: a resume of a stream
none of whose captions is retained gets a gap from ``seq + 1`` to the last
seq given under its id (``last_seq``, the engine's), and one from that last
seq gets none (it missed nothing). A ``gap`` whose ``to``
is None says the server cannot relate the client's seq to its own (it has
no history of the stream, or the seq is past any it gave the stream, the
journal's included: it restarted without the journal, or the journal forgot
the stream); the client should forget the seq it had,
since what follows may be numbered anew. A resume whose seqs come from
another numbering (``renumbered``: the client's epoch is not the server's)
gets that gap for every stream it names with a seq above 0, then each such
stream's replay from seq 0: a seq of an earlier run is never compared with
this run's seqs, where it could silently skip this run's first captions.

Journal-backed resume: given a ``source`` (the engine's journal), a resume
whose ``since`` reaches before the retained history (after an engine restart
nothing is retained) first replays the source's finals after ``since`` and
before the oldest retained caption; a ``gap`` then covers only what neither
holds. The source gives at most ``history`` finals, the newest after
``since`` (a gap announces the older ones), so what one resume holds is
bounded whatever the stream's journal holds. The source is read on the event
loop, once per resumed stream; one that cannot be read (an ``OSError``) gives
a ``gap`` for what it would have held, and the resume goes on. The replay ends with the source's
``stream.ended`` (a stream that ended before the restart) unless the stream
is live now (its id opened again, maybe without captions yet) or has ended
in this run (then its own end rules).
The broadcaster knows which streams are live from their ``stream.started``
and ``stream.ended`` (a set bounded by the live streams), so it must be a
listener before any stream opens (the server adds it as it starts).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from ..engine.engine import SEQ_REMEMBERED
from ..events import CaptionEvent, EngineEvent, StreamEnded, StreamStarted
from .protocol import encode_message

__all__ = ["ENDS_REMEMBERED", "Broadcaster", "HistorySource", "SourceRecord", "SourceReplay",
           "Subscription"]

log = logging.getLogger(__name__)

#: The ends of the streams that ended most recently, kept for resume apart
#: from their captions (a ``stream.ended`` event each, a few hundred bytes):
#: as many as the engine keeps the last seqs of, so the resume that can name
#: what such a stream's subscriber missed can also say that it ended.
ENDS_REMEMBERED = SEQ_REMEMBERED


class SourceRecord(Protocol):
    """One replayable caption: its seq and its encoded message."""

    @property
    def seq(self) -> int: ...
    @property
    def message(self) -> str: ...


class SourceReplay(Protocol):
    """Finals after some seq (in order), the lowest seq from which the
    source holds every final (older ones may be missing: a gap), and the
    stream's ``stream.ended`` message when the source knows it ended (None:
    live, or its end unknown)."""

    @property
    def records(self) -> tuple[SourceRecord, ...]: ...
    @property
    def covered_from(self) -> int: ...
    @property
    def ended(self) -> str | None: ...


class HistorySource(Protocol):
    """Older captions than the broadcaster retains (the engine's journal).

    ``replay`` gives the finals with ``since < seq < before``, only the newest
    ``limit`` of them when given (``covered_from`` then past those left out).
    """

    def replay(self, stream: str, since: int, before: int | None = None,
               limit: int | None = None) -> SourceReplay | None: ...


class Subscription:
    """One subscriber: a replay backlog, a queue of live messages, a filter.

    The relay sends ``backlog`` first, then ``queue`` items, calling
    ``queue.task_done()`` after each send so ``queue.join()`` means "all sent".
    """

    def __init__(self, streams: frozenset[str] | None, maxsize: int,
                 backlog: list[str]) -> None:
        self.streams = streams
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize)
        self.backlog = backlog
        self.overflowed = asyncio.Event()

    def wants(self, stream: str) -> bool:
        return self.streams is None or stream in self.streams


class Broadcaster:
    """Delivers every event to the subscriptions that want its stream."""

    def __init__(
        self,
        queue_size: int,
        encode: Callable[[EngineEvent], str],
        *,
        history: int = 0,
        history_streams: int = 64,
        source: HistorySource | None = None,
        last_seq: Callable[[str], int] | None = None,
    ) -> None:
        self._queue_size = queue_size
        self._encode = encode
        self._history = history
        self._history_streams = history_streams
        self._retained: OrderedDict[str, deque[tuple[int, str]]] = OrderedDict()
        # Ended streams, the latest end last: kept past their captions
        # (history 0, or evicted), so a resume still ends with the end.
        self._ended: OrderedDict[str, StreamEnded] = OrderedDict()
        # Streams started and not ended: a source's end is not theirs.
        self._live: set[str] = set()
        self._subs: set[Subscription] = set()
        self.source = source
        # The last seq given under a stream id (the engine's), 0 if none: what
        # a resume from 0 of a stream with nothing retained has missed.
        self._last_seq = last_seq
        self.dropped_subscribers = 0

    def subscribe(
        self,
        streams: Iterable[str] | None = None,
        since: Mapping[str, int] | None = None,
        *,
        renumbered: bool = False,
    ) -> Subscription:
        """Subscribe to ``streams`` (None: all); replay captions after
        ``since``, or all retained ones after a ``gap`` when ``renumbered``
        (``since`` holds seqs of another numbering)."""
        backlog: list[str] = []
        for stream, seq in (since or {}).items():
            if renumbered:
                backlog += [self._gap(stream, seq + 1, None)] if seq > 0 else []
                backlog += self._replay(stream, 0)
            else:
                backlog += self._replay(stream, seq)
        sub = Subscription(None if streams is None else frozenset(streams), self._queue_size,
                           backlog)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    @property
    def retained_captions(self) -> int:
        """Captions held for resume, all streams together (at most
        ``history`` x ``history_streams``)."""
        return sum(len(kept) for kept in self._retained.values())

    def _replay(self, stream: str, since: int) -> list[str]:
        kept = self._retained.get(stream)
        first_kept = kept[0][0] if kept else None
        if since > 0 and self._last_seq is not None and since > max(
                self._last_seq(stream), kept[-1][0] if kept else 0):
            # Past every seq given under the id (the journal's included): of
            # another numbering, which is no point in the journal either.
            return [self._gap(stream, since + 1, None), *self._replay(stream, 0)]
        if self.source is not None and (first_kept is None or since + 1 < first_kept):
            # At most `history` finals, the newest: a resume from seq 0 of a
            # stream live for days must not hold its whole journal (80 MB by
            # default) in this subscriber's backlog; the rest is a gap.
            try:
                older = self.source.replay(stream, since, first_kept, limit=self._history)
            except OSError as e:
                # A file gone bad since the start (a disk error, a permission):
                # what it held is announced as missing, never skipped silently.
                log.error("cannot read the journal to resume %s after seq %d (%s); the "
                          "subscriber gets a gap", stream, since, e)
                out = [self._gap(stream, since + 1, None if first_kept is None
                                 else first_kept - 1)]
                out += [msg for seq, msg in (kept or ()) if seq > since]
                ended = self._end(stream)
                return [*out, ended] if ended is not None else out
            if older is not None:
                return self._replay_with(stream, since, older, kept)
        ended = self._end(stream)
        if not kept:
            if self._last_seq is None:
                # Unknown stream: if the client saw captions of it, we cannot
                # say how many followed.
                out = [self._gap(stream, since + 1, None)] if since > 0 else []
            else:
                # None retained (history 0, or evicted): every caption after
                # since up to the last given under the id is missing (since
                # is not past it: checked above), and a gap says so.
                last = self._last_seq(stream)
                out = [self._gap(stream, since + 1, last)] if since < last else []
            return [*out, ended] if ended is not None else out
        first = kept[0][0]
        if since > kept[-1][0]:
            # The client's seq is past any this server gave the stream: it
            # comes from an earlier numbering (a restart without the journal).
            # Say so, then replay all there is, numbered anew.
            out = [self._gap(stream, since + 1, None), *(msg for _, msg in kept)]
            return [*out, ended] if ended is not None else out
        out = [self._gap(stream, since + 1, first - 1)] if since + 1 < first else []
        out += [msg for seq, msg in kept if seq > since]
        return [*out, ended] if ended is not None else out

    def _replay_with(self, stream: str, since: int, older: SourceReplay,
                     kept: deque[tuple[int, str]] | None) -> list[str]:
        # The source covers from covered_from, the retained captions from
        # their first: a gap never names a caption replayed after it.
        covered = older.covered_from if not kept else min(older.covered_from, kept[0][0])
        out = [self._gap(stream, since + 1, covered - 1)] if since + 1 < covered else []
        out += [r.message for r in older.records]
        out += [msg for seq, msg in (kept or ()) if seq > since]
        ended = self._end(stream)
        if ended is None and stream not in self._live:
            # Not live and no end retained: the source's end is the latest
            # (from before a restart, or one of this run not retained), or
            # None: its end is unknown (a crash).
            ended = older.ended
        return [*out, ended] if ended is not None else out

    def _end(self, stream: str) -> str | None:
        """The ``stream.ended`` message of ``stream`` if it ended in this run
        (among the :data:`ENDS_REMEMBERED` latest) and is not live again."""
        ended = self._ended.get(stream)
        return None if ended is None else self._encode(ended)

    @staticmethod
    def _gap(stream: str, first_missing: int, last_missing: int | None) -> str:
        return encode_message("gap", stream=stream, **{"from": first_missing}, to=last_missing)

    def _retain(self, event: CaptionEvent, message: str) -> None:
        kept = self._retained.get(event.stream)
        if kept is None:
            kept = self._retained[event.stream] = deque(maxlen=self._history)
            while len(self._retained) > self._history_streams:
                self._retained.popitem(last=False)
        else:
            self._retained.move_to_end(event.stream)
        kept.append((event.seq, message))

    def publish(self, event: EngineEvent) -> None:
        """Queue ``event`` for every interested subscriber; never blocks."""
        message: str | None = None
        if self._history and isinstance(event, CaptionEvent):
            message = self._encode(event)
            self._retain(event, message)
        elif isinstance(event, StreamEnded):
            self._live.discard(event.stream)
            # A client resuming after the end learns that the stream ended,
            # its captions retained or not.
            self._ended[event.stream] = event
            self._ended.move_to_end(event.stream)
            while len(self._ended) > ENDS_REMEMBERED:
                self._ended.popitem(last=False)
        elif isinstance(event, StreamStarted):
            # The id is live again (reused after its end): a resume must not
            # close with the old run's end, nor with one from before a restart.
            self._live.add(event.stream)
            self._ended.pop(event.stream, None)
        for sub in list(self._subs):
            if not sub.wants(event.stream):
                continue
            if message is None:
                message = self._encode(event)
            try:
                sub.queue.put_nowait(message)
            except asyncio.QueueFull:
                self._subs.discard(sub)
                sub.overflowed.set()
                self.dropped_subscribers += 1
                log.warning("subscriber fell %d messages behind; disconnecting it",
                            self._queue_size)
