"""The MQTT publisher's bounded queue and its overflow policy (pure: no I/O, no clock).

:class:`Backlog` holds the events waiting to be published, at most ``size``
of them. Partial captions wait apart, at most one per segment; finals and
lifecycle events wait in a FIFO; :meth:`Backlog.pop` merges both by arrival
order (:attr:`QueuedEvent.order`).

While a partial waits, a newer partial or the final of the same segment
replaces it (a caption carries the whole segment's text, so nothing is lost;
counted as ``superseded``).

Overflow policy, when the queue is full: a new partial pushes out the oldest
waiting partial, or is itself dropped when only finals and lifecycle events
wait; a new final or lifecycle event pushes out the oldest waiting partial,
or else the oldest waiting final/lifecycle event (the newest are worth most
to live viewers, and the last final is the one retained). A final or
lifecycle event put back after a failed publish goes to the head; when the
queue is full it pushes out the oldest waiting partial, or else is itself
dropped. Every drop is counted
(``dropped_partials``; ``dropped_finals`` counts lifecycle events too).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from ..events import CaptionEvent, EngineEvent

__all__ = ["Backlog", "PartialKey", "QueuedEvent"]

PartialKey = tuple[str, int]
"""(stream, segment) of a caption."""


@dataclass(frozen=True)
class QueuedEvent:
    """An event waiting to be published, with where and how it goes.

    ``order`` is its arrival number (increasing); ``key`` is the (stream,
    segment) of a caption, None for other events; ``attempts`` counts failed
    publishes so far.
    """

    order: int
    event: EngineEvent
    topic: str
    qos: int
    retain: bool
    key: PartialKey | None
    attempts: int = 0

    @property
    def partial(self) -> bool:
        return isinstance(self.event, CaptionEvent) and not self.event.final


class Backlog:
    """The bounded queue with the publisher's overflow policy (see the module doc).

    Never holds more than ``size`` events; ``superseded``,
    ``dropped_partials`` and ``dropped_finals`` count what the policy removed.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._reliable: deque[QueuedEvent] = deque()
        self._partials: OrderedDict[PartialKey, QueuedEvent] = OrderedDict()
        self.superseded = 0
        self.dropped_partials = 0
        self.dropped_finals = 0

    def __len__(self) -> int:
        return len(self._reliable) + len(self._partials)

    def push(self, item: QueuedEvent) -> None:
        """Queue a new event, applying the overflow policy."""
        if item.partial:
            assert item.key is not None
            if self._partials.pop(item.key, None) is not None:
                self.superseded += 1
            elif len(self) >= self.size and not self._drop_oldest_partial():
                # Only finals and lifecycle events wait: they are worth more.
                self.dropped_partials += 1
                return
            self._partials[item.key] = item
            return
        if item.key is not None and self._partials.pop(item.key, None) is not None:
            self.superseded += 1
        if len(self) >= self.size and not self._drop_oldest_partial():
            self._reliable.popleft()
            self.dropped_finals += 1
        self._reliable.append(item)

    def put_back(self, item: QueuedEvent) -> bool:
        """Return an unsent final or lifecycle event to the head; False if it was dropped."""
        if len(self) >= self.size and not self._drop_oldest_partial():
            self.dropped_finals += 1
            return False
        self._reliable.appendleft(item)
        return True

    def pop(self) -> QueuedEvent | None:
        """The earliest-arrived waiting event, removed; None when empty."""
        r = self._reliable[0] if self._reliable else None
        p = next(iter(self._partials.values())) if self._partials else None
        if p is not None and (r is None or p.order < r.order):
            self._partials.popitem(last=False)
            return p
        if r is not None:
            self._reliable.popleft()
        return r

    def clear(self) -> int:
        """Empty the queue; the number of events removed (not counted as drops)."""
        n = len(self)
        self._reliable.clear()
        self._partials.clear()
        return n

    def _drop_oldest_partial(self) -> bool:
        if not self._partials:
            return False
        self._partials.popitem(last=False)
        self.dropped_partials += 1
        return True
