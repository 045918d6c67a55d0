"""The MQTT publisher's queue policy on its own (pure: no broker).

The same policy through a real publisher and mosquitto is
test_mqtt.py::test_overflow_keeps_finals_and_drops_partials_first.
"""

from __future__ import annotations

import itertools
import random

from evoxtral_stream.events import CaptionEvent, StreamEnded, StreamStarted
from evoxtral_stream.server.mqtt_backlog import Backlog, QueuedEvent, RetainedClear

_order = itertools.count()


def caption(stream: str, segment: int, final: bool) -> QueuedEvent:
    event = CaptionEvent(stream=stream, segment=segment, seq=0, final=final, text="x",
                         plain_text="x", stable="x" if final else "",
                         unstable="" if final else "x", tags=(), start=0.0, end=1.0,
                         latency=None)
    return QueuedEvent(next(_order), event, f"{stream}/{segment}/{final}", 1 if final else 0,
                       final, (stream, segment))


def started(stream: str) -> QueuedEvent:
    return QueuedEvent(next(_order), StreamStarted(stream, "test"), f"{stream}/status", 1,
                       True, None)


def ended(stream: str) -> QueuedEvent:
    return QueuedEvent(next(_order), StreamEnded(stream, 1.0, 1, 1), f"{stream}/status", 1,
                       True, None)


def drain(b: Backlog) -> list[QueuedEvent]:
    out = []
    while (item := b.pop()) is not None:
        out.append(item)
    return out


def test_pop_merges_partials_and_finals_by_arrival() -> None:
    b = Backlog(10)
    items = [started("s"), caption("s", 0, False), caption("t", 0, True),
             caption("s", 1, False), caption("s", 2, True)]
    for item in items:
        b.push(item)
    assert len(b) == 5
    assert drain(b) == items
    assert len(b) == 0


def test_a_superseded_partial_gives_up_its_place() -> None:
    b = Backlog(10)
    old, other = caption("s", 0, False), caption("t", 0, False)
    new = caption("s", 0, False)
    for item in (old, other, new):
        b.push(item)
    # The replacement waits at its own arrival, behind the partial that came between.
    assert drain(b) == [other, new]
    assert (b.superseded, b.dropped_partials, b.dropped_finals) == (1, 0, 0)


def test_put_back_goes_to_the_head_and_pushes_out_a_partial_when_full() -> None:
    b = Backlog(2)
    sent = caption("s", 0, True)
    p, f = caption("t", 0, False), caption("u", 0, True)
    b.push(p)
    b.push(f)
    assert b.put_back(sent)
    assert drain(b) == [sent, f]
    assert (b.dropped_partials, b.dropped_finals) == (1, 0)


def test_overflow_drops_the_oldest_final_before_any_lifecycle_event() -> None:
    b = Backlog(3)
    start, f1, f2 = started("s"), caption("s", 0, True), caption("s", 1, True)
    for item in (start, f1, f2):
        b.push(item)
    end = ended("s")
    b.push(end)
    # The stream's state outranks its oldest caption, though it arrived earlier.
    assert drain(b) == [start, f2, end]
    assert (b.dropped_partials, b.dropped_finals) == (0, 1)


def test_overflow_drops_a_superseded_lifecycle_event_before_a_stream_s_last() -> None:
    b = Backlog(3)
    a_start, b_start, b_end = started("a"), started("b"), ended("b")
    for item in (a_start, b_start, b_end):
        b.push(item)
    c_start = started("c")
    b.push(c_start)
    # b's start is no longer its state; a's start, though the oldest, still is.
    assert drain(b) == [a_start, b_end, c_start]
    assert b.dropped_finals == 1


def test_the_oldest_superseded_lifecycle_event_goes_first() -> None:
    b = Backlog(5)
    a_start, b_start, b_end = started("a"), started("b"), ended("b")
    a_end, c_start = ended("a"), started("c")
    for item in (a_start, b_start, b_end, a_end, c_start):
        b.push(item)  # a's start was superseded after b's, but arrived before it
    c_end = ended("c")
    b.push(c_end)
    assert drain(b) == [b_start, b_end, a_end, c_start, c_end]


def test_only_lifecycle_events_each_its_stream_s_last_drops_the_oldest() -> None:
    b = Backlog(2)
    waiting = [started("a"), started("b")]
    for item in waiting:
        b.push(item)
    f = caption("c", 0, True)
    b.push(f)  # the new final is the oldest (only) final: it goes
    new = started("c")
    b.push(new)  # no final waits, nothing superseded: the oldest goes
    assert drain(b) == [waiting[1], new]
    assert (b.dropped_partials, b.dropped_finals) == (0, 2)


def test_a_put_back_lifecycle_event_pushes_out_the_oldest_final() -> None:
    b = Backlog(2)
    end = ended("s")
    b.push(end)
    assert b.pop() is end  # being published...
    waiting = [caption("t", 0, True), caption("u", 0, True)]
    for item in waiting:
        b.push(item)
    assert b.put_back(end)  # ...and failed: a final makes room
    assert drain(b) == [end, waiting[1]]
    assert b.dropped_finals == 1


def test_a_put_back_lifecycle_event_superseded_while_it_was_out_is_dropped_first() -> None:
    b = Backlog(2)
    start = started("s")
    b.push(start)
    assert b.pop() is start  # being published...
    end, other = ended("s"), started("t")
    b.push(end)
    b.push(other)
    assert not b.put_back(start)  # ...and failed: the stream's state is now its end
    assert drain(b) == [end, other]


def test_a_long_overflow_keeps_every_stream_s_last_state() -> None:
    """Streams start, caption and end faster than the queue drains: whatever
    is dropped, the last lifecycle event published on each status topic (the
    retained state) is the last one queued for it."""
    rng = random.Random(7)
    b = Backlog(16)
    queued: dict[str, str] = {}
    published: dict[str, str] = {}
    live: list[str] = []
    for n in range(5000):
        if live and rng.random() < 0.7:
            s = rng.choice(live)
            if rng.random() < 0.1:
                item = ended(s)
                live.remove(s)
            else:
                item = caption(s, n, rng.random() < 0.5)
        else:
            s = f"s{rng.randrange(40)}"
            if s in live:
                continue
            item = started(s)
            live.append(s)
        if not item.partial and item.key is None:
            queued[item.topic] = type(item.event).__name__
        b.push(item)
        assert len(b) <= 16
        if rng.random() < 0.3:  # the broker takes about one event in three
            got = b.pop()
            if got is not None and got.key is None:
                published[got.topic] = type(got.event).__name__
    for got in drain(b):
        if got.key is None:
            published[got.topic] = type(got.event).__name__
    assert b.dropped_finals > 500, "the run must overflow with finals and lifecycle events"
    assert published == queued


def test_put_back_into_a_queue_full_of_finals_is_dropped_and_counted() -> None:
    b = Backlog(2)
    waiting = [caption("t", 0, True), caption("u", 0, True)]
    for item in waiting:
        b.push(item)
    assert not b.put_back(caption("s", 0, True))
    assert drain(b) == waiting
    assert (b.dropped_partials, b.dropped_finals) == (0, 1)


def test_clear_empties_without_counting_drops() -> None:
    b = Backlog(4)
    for item in (started("s"), caption("s", 0, False), caption("s", 1, True)):
        b.push(item)
    assert b.clear() == 3
    assert b.pop() is None
    assert (b.superseded, b.dropped_partials, b.dropped_finals) == (0, 0, 0)


def test_a_retained_clear_is_its_topics_state_and_gives_way_when_superseded() -> None:
    # The removal of an ended stream's retained status, queued before the
    # stream is opened again: arrival order keeps the new state last, and on
    # overflow the clear, no longer the topic's state, is dropped first.
    def clear(stream: str) -> QueuedEvent:
        return QueuedEvent(next(_order), RetainedClear(stream), f"{stream}/status", 1, True,
                           None)

    b = Backlog(10)
    first = clear("s")
    assert first.lifecycle and not first.partial
    b.push(first)
    b.push(started("s"))
    assert [i.event for i in drain(b)] == [RetainedClear("s"), StreamStarted("s", "test")]
    b = Backlog(2)
    b.push(clear("s"))
    b.push(started("s"))
    b.push(ended("t"))
    assert [i.event for i in drain(b)] == [StreamStarted("s", "test"), StreamEnded("t", 1.0, 1, 1)]
    assert b.dropped_finals == 1
