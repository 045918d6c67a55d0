"""The MQTT publisher's bounded queue and its overflow policy (pure: no I/O, no clock).

:class:`Backlog` holds the events waiting to be published, at most ``size``
of them. Partial captions wait apart, at most one per segment; finals and
errors wait in one FIFO, lifecycle events (``stream.started``/``.ended``,
published retained as the stream's state, and :class:`RetainedClear`, which
removes an ended stream's retained messages) in another; :meth:`Backlog.pop`
merges them by arrival order (:attr:`QueuedEvent.order`).

While a partial waits, a newer partial or the final of the same segment
replaces it (a caption carries the whole segment's text, so nothing is lost;
counted as ``superseded``).

Overflow policy: the queue takes the new event, and when that makes it one
too many gives one up, the first of: the oldest waiting partial (the new
partial itself when no other waits); the oldest final or error (the new one
itself when no other waits); the oldest lifecycle event whose status topic
has a newer lifecycle event waiting (superseded as retained state, e.g. a
``stream.started`` followed by its ``stream.ended``); the oldest lifecycle
event. So the retained status of a stream is wrong only when the queue holds
nothing but lifecycle events, each its topic's last; dropping the
``stream.ended`` of a stream whose ``stream.started`` went out would leave
the broker saying the stream is live for good. A final, error or lifecycle
event put back after a failed publish goes to the head and the same policy
applies (it may be the one given up). Every drop is counted
(``dropped_partials``; ``dropped_finals`` counts errors and lifecycle events
too). Each push, put-back and pop costs O(log size) at most.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

from ..events import CaptionEvent, EngineEvent, StreamEnded, StreamStarted

__all__ = ["Backlog", "PartialKey", "QueuedEvent", "RetainedClear"]

PartialKey = tuple[str, int]
"""(stream, segment) of a caption."""


@dataclass(frozen=True)
class RetainedClear:
    """Remove the retained message of a topic of the stream whose topic level
    is ``level`` (an empty retained publish): its status or last final, once
    it has ended long enough ago."""

    level: str


@dataclass(frozen=True)
class QueuedEvent:
    """An event waiting to be published, with where and how it goes.

    ``order`` is its arrival number (increasing); ``key`` is the (stream,
    segment) of a caption, None for other events; ``attempts`` counts failed
    publishes so far.
    """

    order: int
    event: EngineEvent | RetainedClear
    topic: str
    qos: int
    retain: bool
    key: PartialKey | None
    attempts: int = 0

    @property
    def partial(self) -> bool:
        return isinstance(self.event, CaptionEvent) and not self.event.final

    @property
    def lifecycle(self) -> bool:
        """A ``stream.started``/``stream.ended`` or a :class:`RetainedClear`:
        the retained state of its topic."""
        return isinstance(self.event, StreamStarted | StreamEnded | RetainedClear)


class Backlog:
    """The bounded queue with the publisher's overflow policy (see the module doc).

    Never holds more than ``size`` events; ``superseded``,
    ``dropped_partials`` and ``dropped_finals`` count what the policy removed.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        # All three keep arrival order: pushes append, a put-back (always the
        # earliest arrival waiting) goes first.
        self._partials: OrderedDict[PartialKey, QueuedEvent] = OrderedDict()
        self._finals: OrderedDict[int, QueuedEvent] = OrderedDict()
        self._states: OrderedDict[int, QueuedEvent] = OrderedDict()
        # Per status topic, the order of its newest waiting lifecycle event;
        # the orders of the others waiting (superseded) are in a heap, so the
        # oldest of them is found without a scan.
        self._newest_state: dict[str, int] = {}
        self._superseded: list[int] = []
        self.superseded = 0
        self.dropped_partials = 0
        self.dropped_finals = 0

    def __len__(self) -> int:
        return len(self._partials) + len(self._finals) + len(self._states)

    def push(self, item: QueuedEvent) -> None:
        """Queue a new event, applying the overflow policy."""
        if item.key is not None and self._partials.pop(item.key, None) is not None:
            self.superseded += 1
        if item.partial:
            assert item.key is not None
            self._partials[item.key] = item
        elif item.lifecycle:
            self._states[item.order] = item
            newer_than = self._newest_state.get(item.topic)
            if newer_than is not None:
                heapq.heappush(self._superseded, newer_than)
            self._newest_state[item.topic] = item.order
        else:
            self._finals[item.order] = item
        self._overflow()

    def put_back(self, item: QueuedEvent) -> bool:
        """Return an unsent final, error or lifecycle event to the head; False if it was dropped.

        For one publish in flight at a time (the publisher's): ``item`` is
        then older than everything waiting, so the head is its place. It
        supersedes no waiting partial (a partial of its segment can only
        have come after it)."""
        if item.lifecycle:
            self._states[item.order] = item
            self._states.move_to_end(item.order, last=False)
            if item.topic in self._newest_state:
                # Anything waiting arrived after it: it is the oldest superseded.
                heapq.heappush(self._superseded, item.order)
            else:
                self._newest_state[item.topic] = item.order
        else:
            self._finals[item.order] = item
            self._finals.move_to_end(item.order, last=False)
        return self._overflow() is not item

    def pop(self) -> QueuedEvent | None:
        """The earliest-arrived waiting event, removed; None when empty."""
        heads = [next(iter(q.values())) for q in (self._partials, self._finals, self._states)
                 if q]
        if not heads:
            return None
        item = min(heads, key=lambda h: h.order)
        if item.partial:
            self._partials.popitem(last=False)
        elif item.lifecycle:
            self._remove_state(self._states.popitem(last=False)[1])
        else:
            self._finals.popitem(last=False)
        return item

    def clear(self) -> int:
        """Empty the queue; the number of events removed (not counted as drops)."""
        n = len(self)
        self._partials.clear()
        self._finals.clear()
        self._states.clear()
        self._newest_state.clear()
        self._superseded.clear()
        return n

    def _overflow(self) -> QueuedEvent | None:
        """Drop one event by the policy if the queue is over ``size``; the one dropped."""
        if len(self) <= self.size:
            return None
        if self._partials:
            self.dropped_partials += 1
            return self._partials.popitem(last=False)[1]
        self.dropped_finals += 1
        if self._finals:
            return self._finals.popitem(last=False)[1]
        if self._superseded:
            return self._states.pop(heapq.heappop(self._superseded))
        victim = self._states.popitem(last=False)[1]
        self._remove_state(victim)
        return victim

    def _remove_state(self, item: QueuedEvent) -> None:
        """Forget a lifecycle event leaving the queue as its oldest one."""
        if self._newest_state.get(item.topic) == item.order:
            del self._newest_state[item.topic]
        else:
            # Superseded, and the oldest lifecycle event waiting: the heap's least.
            oldest = heapq.heappop(self._superseded)
            assert oldest == item.order
