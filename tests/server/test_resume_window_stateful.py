"""A stateful model of a subscriber's resume window (Hypothesis RuleBasedStateMachine).

A :class:`~evoxtral_stream.server.broadcast.ResumeWindow` of 1 to 8 events
(so it fills often) gets the live events a resuming subscriber would: partials
and finals of several streams and segments, errors, and ``stream.started``/
``.ended`` (an id reused after its end numbers its segments from 0 again). A
reference model made of lists holds what the class doc promises, checked after
every step: a later partial of the same segment of the same run, or its final,
replaces the earlier partial and takes its place at the end; what is held is in
publish order, each stream's seqs increasing; at most ``limit`` events are
held, the one past that is refused and the window takes nothing more.

The subscribers' own queues are ``asyncio.Queue`` inside
:class:`~evoxtral_stream.server.broadcast.Subscription`, no pure class: their
policy (a full queue drops the subscriber) is tested over real WebSockets.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from evoxtral_stream.events import (
    CaptionEvent,
    EngineEvent,
    StreamEnded,
    StreamError,
    StreamStarted,
)
from evoxtral_stream.server.broadcast import ResumeWindow

STREAMS = ("a", "b")
streams = st.sampled_from(STREAMS)
segments = st.sampled_from((0, 1, 2))


@dataclass(frozen=True)
class Held:
    """One event the model holds: its message, and for a caption its stream,
    seq and segment (the run of the stream id it belongs to, the segment)."""

    message: str
    stream: str
    seq: int | None
    partial_of: tuple[str, int, int] | None


class ResumeWindowMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.window = ResumeWindow(1)
        self.limit = 1
        self._n = itertools.count()
        self._seq = dict.fromkeys(STREAMS, 0)
        # Each stream.started/ended begins a new run of the id: its segments
        # are numbered from 0 again.
        self._run = dict.fromkeys(STREAMS, 0)
        self.held: list[Held] = []
        self.full = False

    @initialize(limit=st.integers(1, 8))
    def start(self, limit: int) -> None:
        self.window = ResumeWindow(limit)
        self.limit = limit

    def _add(self, event: EngineEvent, held: Held, replaces: tuple[str, int, int] | None
             ) -> None:
        took = self.window.add(event, held.message)
        if self.full:
            assert not took, "a window that refused an event takes nothing more"
            return
        if replaces is not None:
            self.held = [h for h in self.held if h.partial_of != replaces]
        if len(self.held) >= self.limit:
            assert not took, "the event past the limit is refused"
            self.full = True
            return
        assert took
        self.held.append(held)

    def _caption(self, stream: str, segment: int, final: bool) -> None:
        self._seq[stream] += 1
        seq = self._seq[stream]
        event = CaptionEvent(stream=stream, segment=segment, seq=seq, final=final, text="so",
                             plain_text="so", stable="so" if final else "",
                             unstable="" if final else "so", tags=(), start=0.0, end=1.0,
                             latency=None)
        key = (stream, self._run[stream], segment)
        self._add(event, Held(f"m{next(self._n)}", stream, seq, None if final else key), key)

    @rule(stream=streams, segment=segments)
    def partial(self, stream: str, segment: int) -> None:
        self._caption(stream, segment, False)

    @rule(stream=streams, segment=segments)
    def final(self, stream: str, segment: int) -> None:
        self._caption(stream, segment, True)

    @rule(stream=streams, segment=st.none() | segments)
    def error(self, stream: str, segment: int | None) -> None:
        event = StreamError(stream, "decode_failed", "the model failed", segment)
        self._add(event, Held(f"m{next(self._n)}", stream, None, None), None)

    @rule(stream=streams, ended=st.booleans())
    def lifecycle(self, stream: str, ended: bool) -> None:
        event = StreamEnded(stream, 1.0, 1, 1) if ended else StreamStarted(stream, "test")
        self._run[stream] += 1
        self._add(event, Held(f"m{next(self._n)}", stream, None, None), None)

    @invariant()
    def holds_what_the_model_holds(self) -> None:
        assert self.window.messages() == [h.message for h in self.held]
        assert len(self.window) == len(self.held) <= self.limit
        assert self.window.full == self.full

    @invariant()
    def in_publish_order(self) -> None:
        numbers = [int(h.message[1:]) for h in self.held]
        assert numbers == sorted(numbers)
        for stream in STREAMS:
            seqs = [h.seq for h in self.held if h.stream == stream and h.seq is not None]
            assert seqs == sorted(seqs), stream
        keys = [h.partial_of for h in self.held if h.partial_of is not None]
        assert len(keys) == len(set(keys)), "at most one partial per segment"


ResumeWindowMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_resume_window_policy = ResumeWindowMachine.TestCase
