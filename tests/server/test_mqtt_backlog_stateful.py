"""A stateful model of the MQTT publisher's queue (Hypothesis RuleBasedStateMachine).

A :class:`~evoxtral_stream.server.mqtt_backlog.Backlog` of 1 to 8 events
(so overflow is frequent) gets what the publisher queues: partials of
several streams and segments, finals, errors, ``stream.started``/``.ended``
and :class:`RetainedClear` on status and final topics; events are popped one
at a time as the publisher does, each publish succeeding or failing (a
failed final, error or lifecycle event is put back, a failed partial is
gone), and the queue is sometimes cleared. A reference model made of lists
holds what the module doc promises, checked after every step: what is held
and its pop order (arrival order, a put-back at the head), at most one
partial per segment (a newer partial or the segment's final supersedes it),
exactly the event the overflow policy names given up, the counters, and the
retained-state claim: a status topic's last lifecycle event is given up
only when the queue holds nothing but lifecycle events, each its topic's
last; else what a drain publishes last on each status topic is what was
queued last there.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from evoxtral_stream.events import CaptionEvent, StreamEnded, StreamError, StreamStarted
from evoxtral_stream.server.mqtt_backlog import Backlog, QueuedEvent, RetainedClear

STREAMS = ("a", "b", "c")
SEGMENTS = (0, 1, 2)
PREFIX = "ev"

streams = st.sampled_from(STREAMS)
segments = st.sampled_from(SEGMENTS)


def _topic(stream: str, leaf: str) -> str:
    return f"{PREFIX}/{stream}/{leaf}"


def _status(item: QueuedEvent) -> bool:
    return item.lifecycle and item.topic.endswith("/status")


def _drain(b: Backlog) -> list[QueuedEvent]:
    out = []
    while (item := b.pop()) is not None:
        out.append(item)
    return out


class BacklogMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.b = Backlog(1)
        self.size = 1
        self._order = itertools.count()
        self._seq = itertools.count(1)
        # The model: what waits, in the order pop gives it.
        self.held: list[QueuedEvent] = []
        self.superseded = 0
        self.dropped_partials = 0
        self.dropped_finals = 0
        # The event being published (popped, neither sent nor failed yet).
        self.in_flight: QueuedEvent | None = None
        # Per status topic: the last lifecycle event queued (pushed), and the
        # last one published; topics whose last queued event was given up
        # (as the policy allows only when nothing but such events wait).
        self.queued_state: dict[str, QueuedEvent] = {}
        self.published_state: dict[str, QueuedEvent] = {}
        self.lost_state: set[str] = set()

    @initialize(size=st.integers(1, 8))
    def start(self, size: int) -> None:
        self.b = Backlog(size)
        self.size = size

    # --- the model --------------------------------------------------------

    def _item(self, event: CaptionEvent | StreamStarted | StreamEnded | StreamError
              | RetainedClear, topic: str, *, qos: int = 1, retain: bool = False
              ) -> QueuedEvent:
        key = (event.stream, event.segment) if isinstance(event, CaptionEvent) else None
        return QueuedEvent(next(self._order), event, topic, qos, retain, key)

    def _victim(self) -> QueuedEvent:
        """The event the module doc's overflow policy gives up (the queue one too many)."""
        partials = [e for e in self.held if e.partial]
        if partials:
            return min(partials, key=lambda e: e.order)
        finals = [e for e in self.held if not e.partial and not e.lifecycle]
        if finals:
            return min(finals, key=lambda e: e.order)
        states = [e for e in self.held if e.lifecycle]
        superseded = [e for e in states
                      if any(o.topic == e.topic and o.order > e.order for o in states)]
        return min(superseded or states, key=lambda e: e.order)

    def _its_topics_last(self, item: QueuedEvent) -> bool:
        return not any(o.lifecycle and o.topic == item.topic and o.order > item.order
                       for o in self.held)

    def _overflow(self) -> QueuedEvent | None:
        if len(self.held) <= self.size:
            return None
        victim = self._victim()
        if _status(victim) and self._its_topics_last(victim):
            # The retained-state claim: the stream's state is lost only when
            # nothing but lifecycle events wait, each its topic's last.
            assert all(e.lifecycle and self._its_topics_last(e) for e in self.held), (
                victim, self.held)
            self.lost_state.add(victim.topic)
        if victim.partial:
            self.dropped_partials += 1
        else:
            self.dropped_finals += 1
        self.held.remove(victim)
        return victim

    def _push(self, item: QueuedEvent) -> None:
        self.b.push(item)
        if item.key is not None:
            before = len(self.held)
            self.held = [e for e in self.held if not (e.partial and e.key == item.key)]
            assert before - len(self.held) <= 1, "at most one partial per segment"
            self.superseded += before - len(self.held)
        self.held.append(item)
        if _status(item):
            self.queued_state[item.topic] = item
            self.lost_state.discard(item.topic)
        self._overflow()

    # --- what the publisher queues ------------------------------------------

    @rule(stream=streams, segment=segments)
    def partial(self, stream: str, segment: int) -> None:
        event = CaptionEvent(stream=stream, segment=segment, seq=next(self._seq), final=False,
                             text="so", plain_text="so", stable="", unstable="so", tags=(),
                             start=0.0, end=1.0, latency=None)
        self._push(self._item(event, _topic(stream, "partial"), qos=0))

    @rule(stream=streams, segment=segments, retain=st.booleans())
    def final(self, stream: str, segment: int, retain: bool) -> None:
        event = CaptionEvent(stream=stream, segment=segment, seq=next(self._seq), final=True,
                             text="so", plain_text="so", stable="so", unstable="", tags=(),
                             start=0.0, end=1.0, latency=None)
        self._push(self._item(event, _topic(stream, "final"), retain=retain))

    @rule(stream=streams, segment=st.none() | segments)
    def error(self, stream: str, segment: int | None) -> None:
        event = StreamError(stream, "decode_failed", "the model failed", segment)
        self._push(self._item(event, _topic(stream, "error")))

    @rule(stream=streams, ended=st.booleans())
    def lifecycle(self, stream: str, ended: bool) -> None:
        event = StreamEnded(stream, 1.0, 1, 1) if ended else StreamStarted(stream, "test")
        self._push(self._item(event, _topic(stream, "status"), retain=True))

    @rule(stream=streams, leaf=st.sampled_from(("status", "final")))
    def retained_clear(self, stream: str, leaf: str) -> None:
        self._push(self._item(RetainedClear(stream), _topic(stream, leaf), retain=True))

    # --- what the publisher's task does ----------------------------------------

    @precondition(lambda self: self.in_flight is None)
    @rule()
    def pop(self) -> None:
        got = self.b.pop()
        if not self.held:
            assert got is None
            return
        assert got == self.held.pop(0)
        self.in_flight = got

    @precondition(lambda self: self.in_flight is not None)
    @rule()
    def published(self) -> None:
        assert self.in_flight is not None
        if _status(self.in_flight):
            self.published_state[self.in_flight.topic] = self.in_flight
        self.in_flight = None

    @precondition(lambda self: self.in_flight is not None)
    @rule()
    def failed(self) -> None:
        item, self.in_flight = self.in_flight, None
        assert item is not None
        if item.partial:
            return  # a broken partial is counted as failed, not put back
        again = replace(item, attempts=item.attempts + 1)
        kept = self.b.put_back(again)
        self.held.insert(0, again)
        assert kept == (self._overflow() is not again)

    @rule()
    def clear(self) -> None:
        assert self.b.clear() == len(self.held)
        # What the publisher's stop leaves unpublished (counted as failed there).
        self.lost_state |= {e.topic for e in self.held if _status(e) and self._its_topics_last(e)}
        self.held.clear()

    @precondition(lambda self: self.in_flight is None)
    @rule()
    def drain(self) -> None:
        """Publish everything: each status topic ends with the state last
        queued for it, but where the policy gave that up."""
        for got in _drain(self.b):
            assert got == self.held.pop(0)
            if _status(got):
                self.published_state[got.topic] = got
        assert not self.held
        for topic, last in self.queued_state.items():
            if topic not in self.lost_state:
                assert self.published_state[topic].order == last.order, topic

    # --- after every step ----------------------------------------------------------

    @invariant()
    def holds_what_the_model_holds(self) -> None:
        assert len(self.b) == len(self.held) <= self.size
        # Drained from a copy: the queue's contents in pop order.
        waiting = _drain(copy.deepcopy(self.b))
        assert waiting == self.held
        orders = [e.order for e in waiting]
        assert orders == sorted(orders), "pop order is arrival order"
        keys = [e.key for e in waiting if e.partial]
        assert len(keys) == len(set(keys)), "at most one partial per segment"

    @invariant()
    def counters(self) -> None:
        assert (self.b.superseded, self.b.dropped_partials, self.b.dropped_finals) == (
            self.superseded, self.dropped_partials, self.dropped_finals)


BacklogMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_backlog_policy = BacklogMachine.TestCase
