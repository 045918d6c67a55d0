"""Fan-out of engine events to subscribers, each behind its own bounded queue.

Overflow policy: :meth:`Broadcaster.publish` never waits. When a
subscriber's queue is full the subscriber is marked overflowed and removed;
its relay task then closes the connection (close code 1013, "subscriber too
slow"). Other subscribers are unaffected. Each event is encoded once,
whatever the number of subscribers. While :meth:`Broadcaster.resume` reads
the source, the subscriber's live events wait in a :class:`ResumeWindow`
instead (the read is not the subscriber being slow), partials coalesced; one
past its ``resume_window`` events drops the subscriber too, which is sent
the backlog and what the window held, then closed with 1013 ("too many
events during the resume").

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
bounded whatever the stream's journal holds. The source is read once per
resumed stream, by :meth:`Broadcaster.resume` on a worker thread (a resume
of 300 journaled streams of 1000 finals held the loop for 2 s), with what
the broadcaster held when the resume was asked; one that cannot be read (an
``OSError``) gives a ``gap`` for what it would have held, and the resume goes
on. The replay ends with the source's
``stream.ended`` (a stream that ended before the restart) unless the stream
is live now (its id opened again, maybe without captions yet) or has ended
in this run (then its own end rules).
The broadcaster knows which streams are live from their ``stream.started``
and ``stream.ended`` (a set bounded by the live streams), so it must be a
listener before any stream opens (the server adds it as it starts).

Outboxes: a connection that fills its own bounded send queue (a
``/v1/realtime`` session) registers it with :meth:`Broadcaster.add_outbox`,
so the shutdown's :meth:`Broadcaster.flush` waits for it as for the
subscriptions' queues; :attr:`Broadcaster.outboxes` counts them (the
server's realtime sessions in ``/metrics``), and
:attr:`Broadcaster.dropped_outboxes` those given up on for being too slow
(:meth:`Broadcaster.drop_outbox`), apart from the subscribers' counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from ..engine.engine import SEQ_REMEMBERED
from ..events import CaptionEvent, EngineEvent, StreamEnded, StreamStarted
from .protocol import encode_message

__all__ = ["ENDS_REMEMBERED", "RESUME_WINDOW", "Broadcaster", "HistorySource",
           "ResumeWindow", "SourceRecord", "SourceReplay", "Subscription"]

log = logging.getLogger(__name__)

#: The ends of the streams that ended most recently, kept for resume apart
#: from their captions (a ``stream.ended`` event each, a few hundred bytes):
#: as many as the engine keeps the last seqs of, so the resume that can name
#: what such a stream's subscriber missed can also say that it ended.
ENDS_REMEMBERED = SEQ_REMEMBERED
#: The default of ``resume_window`` (``server.resume_window``).
RESUME_WINDOW = 1024
# How often a flush looks again for subscriptions that went away or whose
# backlog (not in the queue) was sent.
_FLUSH_POLL_S = 0.05


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
    When ``cut`` (its resume window overflowed) it closes as too slow right
    after the backlog, with ``close_reason``, instead of going on.
    """

    def __init__(self, streams: frozenset[str] | None, maxsize: int,
                 backlog: list[str]) -> None:
        self.streams = streams
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize)
        self.backlog = backlog
        self.overflowed = asyncio.Event()
        # While a resume reads the source: the live events meanwhile.
        self.window: ResumeWindow | None = None
        self.cut = False
        self.close_reason = "subscriber too slow"

    def wants(self, stream: str) -> bool:
        return self.streams is None or stream in self.streams


class ResumeWindow:
    """The live events of one subscription while its resume reads the source.

    They wait here, not in the subscriber's queue, so the time the read takes
    is not counted as the subscriber being slow. Partials are coalesced: a
    later partial of the same stream and segment, or its final, replaces the
    earlier (the later one takes its place at the end, so what is kept is in
    publish order, each stream's seqs increasing). A stream's
    ``stream.started`` or ``stream.ended`` ends that coalescing: a reused id
    numbers its segments from 0 again. At most ``limit`` events
    are kept; the one past that is refused (:meth:`add` returns False) and the
    window takes nothing more: the subscriber gets what it holds, then a 1013,
    and resumes from there.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held: dict[int, str] = {}     # in publish order (dicts keep it)
        self._partial: dict[tuple[str, int], int] = {}  # the open segment's key in _held
        self._next = 0
        self.full = False

    def add(self, event: EngineEvent, message: str) -> bool:
        """Hold ``event`` (encoded as ``message``); False once full."""
        if self.full:
            return False
        if isinstance(event, CaptionEvent):
            # Superseded: a later partial of the segment, or its final, says
            # all the earlier one did.
            earlier = self._partial.pop((event.stream, event.segment), None)
            if earlier is not None:
                del self._held[earlier]
        elif isinstance(event, StreamStarted | StreamEnded):
            # A reused id numbers its segments from 0 again: a partial of
            # the old run must not be replaced by one of the new.
            for key in [k for k in self._partial if k[0] == event.stream]:
                del self._partial[key]
        if len(self._held) >= self._limit:
            self.full = True
            return False
        self._held[self._next] = message
        if isinstance(event, CaptionEvent) and not event.final:
            self._partial[(event.stream, event.segment)] = self._next
        self._next += 1
        return True

    def messages(self) -> list[str]:
        return list(self._held.values())

    def __len__(self) -> int:
        return len(self._held)


@dataclass(frozen=True)
class _Read:
    """One stream's part of a resume that needs the source: what to ask it,
    and what the broadcaster held when the resume was asked, to compose the
    answer with (off the loop, the source is read later)."""

    stream: str
    since: int
    before: int | None
    first_kept: int | None
    kept: tuple[str, ...]       # the retained captions after since
    ended: str | None           # the stream's end in this run, if not live again
    live: bool
    local: tuple[str, ...]      # the replay if the source has nothing of it


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
        resume_window: int = RESUME_WINDOW,
    ) -> None:
        self._queue_size = queue_size
        self._resume_window = resume_window
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
        self._outboxes: set[asyncio.Queue[str]] = set()
        self.source = source
        # The last seq given under a stream id (the engine's), 0 if none: what
        # a resume from 0 of a stream with nothing retained has missed.
        self._last_seq = last_seq
        self.dropped_subscribers = 0
        self.dropped_outboxes = 0

    def subscribe(
        self,
        streams: Iterable[str] | None = None,
        since: Mapping[str, int] | None = None,
        *,
        renumbered: bool = False,
    ) -> Subscription:
        """Subscribe to ``streams`` (None: all); replay captions after
        ``since``, or all retained ones after a ``gap`` when ``renumbered``
        (``since`` holds seqs of another numbering). Reads the source on
        the calling thread: with a ``since`` on the loop, use :meth:`resume`."""
        plan = self._plan(since or {}, renumbered)
        backlog = self._compose(plan, [self._read(r) for r in plan if isinstance(r, _Read)])
        sub = Subscription(None if streams is None else frozenset(streams), self._queue_size,
                           backlog)
        self._subs.add(sub)
        return sub

    async def resume(
        self,
        streams: Iterable[str] | None = None,
        since: Mapping[str, int] | None = None,
        *,
        renumbered: bool = False,
    ) -> Subscription:
        """:meth:`subscribe`, reading the source on a worker thread, so a
        resume of many journaled streams never holds up the loop.

        The subscription gets live events from the call on; its backlog
        (ready on return) is what was retained then, with the source's finals
        before it: the source is asked only for seqs given before the call
        (the newer ones are live events), and its end of a stream is used
        only when the stream was neither live nor ended in this run at the
        call and has not started since (else its own events say it). The
        live events during the read end the backlog, held in a
        :class:`ResumeWindow` of ``resume_window`` events; when they did not
        fit, the subscription is ``cut``: it was already dropped (counted in
        :attr:`dropped_subscribers`) and closes after its backlog.
        """
        plan = self._plan(since or {}, renumbered)
        sub = Subscription(None if streams is None else frozenset(streams), self._queue_size,
                           [])
        self._subs.add(sub)
        reads = [r for r in plan if isinstance(r, _Read)]
        if not reads:
            sub.backlog = self._compose(plan, [])
            return sub
        # The live events until the read is done wait in the window, not in
        # the queue: the read's time is not the subscriber being slow.
        window = sub.window = ResumeWindow(self._resume_window)
        try:
            found = await asyncio.to_thread(lambda: [self._read(r) for r in reads])
        except BaseException:
            self._subs.discard(sub)
            raise
        finally:
            sub.window = None
        sub.backlog = [*self._compose(plan, found), *window.messages()]
        if window.full:
            log.warning("%d live events came while a resume read the journal "
                        "(server.resume_window); the subscriber gets them, then 1013",
                        len(window))
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def drop_subscriber(self, sub: Subscription) -> None:
        """:meth:`unsubscribe` for a connection closed as too slow (1013)
        though its queue did not overflow (an ingest client not taking its
        last events); counted in :attr:`dropped_subscribers` once, however
        often it is called, as an overflow is."""
        if sub in self._subs:
            self._subs.discard(sub)
            self.dropped_subscribers += 1

    def add_outbox(self, queue: asyncio.Queue[str]) -> None:
        """Have :meth:`flush` wait for ``queue`` too: the send queue of a
        connection that fills it itself, whose sender calls ``task_done()``
        after each send. The connection removes it (:meth:`remove_outbox`)
        once it stops sending it: it ended, or fell too far behind."""
        self._outboxes.add(queue)

    def remove_outbox(self, queue: asyncio.Queue[str]) -> None:
        self._outboxes.discard(queue)

    def drop_outbox(self, queue: asyncio.Queue[str]) -> None:
        """:meth:`remove_outbox` for a connection closed because ``queue``
        overflowed (its client too slow); counted in :attr:`dropped_outboxes`
        once, however often it is called."""
        if queue in self._outboxes:
            self._outboxes.discard(queue)
            self.dropped_outboxes += 1

    async def flush(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` until every subscription has sent its
        backlog and what is queued now, and every outbox what is queued now
        (or is gone); the number of both still behind then. For a shutdown:
        the drained finals reach subscribers and realtime sessions before
        their connections close, and a stalled one holds it up no longer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        joins = {sub: asyncio.ensure_future(sub.queue.join()) for sub in self._subs}
        outboxes = {q: asyncio.ensure_future(q.join()) for q in self._outboxes}
        try:
            while True:
                # A subscription or outbox gone meanwhile (its peer left)
                # never joins.
                behind = [j for sub, j in joins.items()
                          if sub in self._subs and (not j.done() or sub.backlog
                                                    or sub.window is not None)]
                behind += [j for q, j in outboxes.items()
                           if q in self._outboxes and not j.done()]
                left = deadline - loop.time()
                if not behind or left <= 0:
                    return len(behind)
                waiting = [j for j in behind if not j.done()]
                if waiting:
                    await asyncio.wait(waiting, timeout=min(left, _FLUSH_POLL_S))
                else:
                    await asyncio.sleep(min(left, _FLUSH_POLL_S))
        finally:
            for j in (*joins.values(), *outboxes.values()):
                j.cancel()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    @property
    def outboxes(self) -> int:
        """Outboxes registered now: the realtime sessions still sending."""
        return len(self._outboxes)

    @property
    def retained_captions(self) -> int:
        """Captions held for resume, all streams together (at most
        ``history`` x ``history_streams``)."""
        return sum(len(kept) for kept in self._retained.values())

    def _plan(self, since: Mapping[str, int], renumbered: bool) -> list[str | _Read]:
        """The backlog of a resume from ``since`` as of now: messages, and
        the reads of the source they wait for."""
        plan: list[str | _Read] = []
        for stream, seq in since.items():
            if renumbered:
                plan += [self._gap(stream, seq + 1, None)] if seq > 0 else []
                plan += self._replay(stream, 0)
            else:
                plan += self._replay(stream, seq)
        return plan

    def _read(self, read: _Read) -> SourceReplay | OSError | None:
        """The source's part of ``read``; any thread."""
        assert self.source is not None
        try:
            return self.source.replay(read.stream, read.since, read.before,
                                      limit=self._history)
        except OSError as e:
            return e

    def _compose(self, plan: list[str | _Read],
                 found: list[SourceReplay | OSError | None]) -> list[str]:
        """``plan`` with each read replaced by its messages (``found``, in order)."""
        answers = iter(found)
        out: list[str] = []
        for item in plan:
            out += [item] if isinstance(item, str) else self._replay_with(item, next(answers))
        return out

    def _replay(self, stream: str, since: int) -> list[str | _Read]:
        kept = self._retained.get(stream)
        first_kept = kept[0][0] if kept else None
        if since > 0 and self._last_seq is not None and since > max(
                self._last_seq(stream), kept[-1][0] if kept else 0):
            # Past every seq given under the id (the journal's included): of
            # another numbering, which is no point in the journal either.
            return [self._gap(stream, since + 1, None), *self._replay(stream, 0)]
        local = self._replay_retained(stream, since, kept)
        if self.source is not None and (first_kept is None or since + 1 < first_kept):
            # At most `history` finals, the newest: a resume from seq 0 of a
            # stream live for days must not hold its whole journal (80 MB by
            # default) in this subscriber's backlog; the rest is a gap. Only
            # seqs given by now: a read off the loop may find later ones,
            # which reach the subscriber live.
            before = first_kept if first_kept is not None else (
                self._last_seq(stream) + 1 if self._last_seq is not None else None)
            return [_Read(stream, since, before, first_kept,
                          tuple(msg for seq, msg in (kept or ()) if seq > since),
                          self._end(stream), stream in self._live, tuple(local))]
        return list(local)

    def _replay_retained(self, stream: str, since: int,
                         kept: deque[tuple[int, str]] | None) -> list[str]:
        """The replay from what is retained alone (no source, or it has
        nothing of the stream)."""
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

    def _replay_with(self, read: _Read, older: SourceReplay | OSError | None) -> list[str]:
        """The replay of ``read`` given what the source had; on the loop."""
        stream, since = read.stream, read.since
        if older is None:
            return list(read.local)
        if isinstance(older, OSError):
            # A file gone bad since the start (a disk error, a permission):
            # what it held is announced as missing, never skipped silently.
            log.error("cannot read the journal to resume %s after seq %d (%s); the "
                      "subscriber gets a gap", stream, since, older)
            out = [self._gap(stream, since + 1, None if read.first_kept is None
                             else read.first_kept - 1), *read.kept]
            return [*out, read.ended] if read.ended is not None else out
        # The source covers from covered_from, the retained captions from
        # their first: a gap never names a caption replayed after it.
        covered = older.covered_from if read.first_kept is None \
            else min(older.covered_from, read.first_kept)
        out = [self._gap(stream, since + 1, covered - 1)] if since + 1 < covered else []
        out += [r.message for r in older.records]
        out += read.kept
        ended = read.ended
        if ended is None and not read.live and not (stream in self._live
                                                    or stream in self._ended):
            # Not live and no end retained (nor since: it would have started
            # after the resume was asked, and its events come live): the
            # source's end is the latest (from before a restart, or one of
            # this run not retained), or None: its end is unknown (a crash).
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
            if sub.window is not None:
                if not sub.window.add(event, message):
                    # Sent what it holds, then closed: the client resumes
                    # after the last seq it got, and misses nothing.
                    self._subs.discard(sub)
                    sub.cut = True
                    sub.close_reason = "too many events during the resume"
                    self.dropped_subscribers += 1
                continue
            try:
                sub.queue.put_nowait(message)
            except asyncio.QueueFull:
                self._subs.discard(sub)
                sub.overflowed.set()
                self.dropped_subscribers += 1
                log.warning("subscriber fell %d messages behind; disconnecting it",
                            self._queue_size)
