"""The MQTT publisher's queue policy on its own (pure: no broker).

The same policy through a real publisher and mosquitto is
test_mqtt.py::test_overflow_keeps_finals_and_drops_partials_first.
"""

from __future__ import annotations

import itertools

from evoxtral_stream.events import CaptionEvent, StreamStarted
from evoxtral_stream.server.mqtt_backlog import Backlog, QueuedEvent

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
