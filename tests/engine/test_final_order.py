"""Finals that come back out of segment order are all captioned, in order.

A stream's finals can reach the merger out of segment order: continuous
batching ends short segments first, a final may wait for its pause partial
while later finals are decoded, and a final can wait in the engine's
backlog. The engine answers every final it asks for (decoded, failed or
abandoned at shutdown), so its merger holds them until the earlier segments
close and never gives up on a segment by itself: it would drop that
segment's final when it came, with no error event.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import pytest

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import DecodeRequest, StreamError
from evoxtral_stream.run import LatencyLog, feed_samples
from tests.fakes import GatedBackend, ScriptedBackend, SteppingScriptedBackend, words_so_far
from tests.speech import have_espeak, speech_with_pauses

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")


def _closed_segments(record: LatencyLog, stream: str) -> list[int]:
    """Segments of ``stream`` with a final, or an error standing in for one."""
    finals = {c.segment for c in record.captions(stream) if c.final}
    errors = {e.segment for e in record.events
              if isinstance(e, StreamError) and e.stream == stream and e.segment is not None}
    return sorted(finals | errors)


async def test_a_final_waiting_for_its_pause_partial_is_not_lost_behind_later_finals() -> None:
    """Segment 0's final waits for its pause partial (``reuse``), and the
    stream asks for no other partial, so segments 1 to 4 end as plain finals.
    The busy model then decodes them in one batch, finals before partials:
    finals 1 to 4 come back before the partial that answers final 0."""
    cfg = load_config(overrides={"stream.partial_interval_ms": 60000,
                                 "stream.pause_partial": True})
    backend = GatedBackend(words_so_far)
    record = LatencyLog()
    async with Engine(cfg, backend) as engine:
        engine.add_listener(record)
        blocker = engine.open_stream("blocker")  # keeps the model busy
        b_audio, _ = speech_with_pauses(["Good evening and welcome."], pause_s=0.1)
        blocker.push(b_audio)
        blocker.cut()
        assert await asyncio.to_thread(backend.entered.wait, 5)
        stream = engine.open_stream("s")
        audio, _ = speech_with_pauses(["Yes.", "Right.", "Okay then.", "Sure thing.", "Fine."],
                                      pause_s=1.2)
        for i in range(0, len(audio), 1600):
            stream.push(audio[i:i + 1600])
        await asyncio.sleep(0.05)
        backend.release()
        summary = await stream.close()
        await blocker.close()
    assert summary.segments == 5
    assert _closed_segments(record, "s") == [0, 1, 2, 3, 4]
    assert [c.segment for c in record.captions("s") if c.final] == [0, 1, 2, 3, 4]


async def test_continuous_batching_a_long_final_is_not_lost_to_four_short_ones() -> None:
    """The default ``batching = "continuous"``, a file read without partials
    (``transcribe --no-partials``): the worker runs a stream's finals in one
    batch, and four short segments after a long one finish first."""
    cfg = load_config(overrides={"worker.batching": "continuous",
                                 "stream.partial_interval_ms": 0})
    audio, _ = speech_with_pauses(
        ["Good evening and welcome to the live captioning demo, everyone here tonight.",
         "Yes.", "Right.", "Okay.", "Sure."], pause_s=1.2)
    backend = SteppingScriptedBackend(step_delay_s=0.002)  # a word per 1000 samples, per step
    record = LatencyLog()
    async with Engine(cfg, backend) as engine:
        engine.add_listener(record)
        summary = await feed_samples(engine.open_stream("s"), audio, 1600, realtime=False)
    finals = {c.segment: c.text for c in record.captions("s") if c.final}
    assert summary.segments == 5
    assert sorted(finals) == [0, 1, 2, 3, 4]
    # The long segment's caption is its decode, not a stand-in.
    assert len(finals[0].split()) > 40
    assert len(finals[0].split()) == max(len(t.split()) for t in finals.values())


class _StepGate(ScriptedBackend):
    """Each call waits until :meth:`allow` lets that many calls through."""

    def __init__(self) -> None:
        super().__init__(words_so_far)
        self.calls = 0
        self.allowed = 0
        self.cond = threading.Condition()

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        with self.cond:
            self.calls += 1
            n = self.calls
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: self.allowed >= n, timeout=10)
        return super().transcribe(batch)

    def wait_calls(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.calls >= n, timeout=5)

    def allow(self, n: int) -> None:
        with self.cond:
            self.allowed = n
            self.cond.notify_all()


def _wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Block (the event loop too, on purpose) until ``cond`` holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


async def test_a_final_goes_to_the_model_behind_its_streams_backlogged_finals() -> None:
    """A final the full inbox refused waits in the engine's backlog; a later
    final of its stream must not take a slot the model frees before it (as
    when the pushes of many streams come before the backlog's retry): the
    model decodes a stream's finals in segment order."""
    cfg = load_config(overrides={"worker.max_queue": 1, "worker.max_batch": 1,
                                 "worker.max_wait_ms": 0, "stream.partial_interval_ms": 0})
    other_utt, _ = speech_with_pauses(["Good evening and welcome, everyone."], pause_s=1.2)
    # Longer and longer: the order of the decodes shows in their lengths.
    utts = [speech_with_pauses([" ".join(["one"] * (n + 1)) + "."], pause_s=1.2)[0]
            for n in range(5)]
    backend = _StepGate()
    record = LatencyLog()
    async with Engine(cfg, backend) as engine:
        engine.add_listener(record)
        other = engine.open_stream("other")
        other.push(other_utt)                # call 1, held
        backend.wait_calls(1)
        other.push(other_utt)                # fills the inbox
        stream = engine.open_stream("s")
        stream.push(utts[0])                 # segment 0: refused, backlogged
        assert engine.stats().finals_backlog == 1
        # No await in between: the backlog's retry gets no turn.
        for i in range(1, 5):
            backend.allow(i)
            _wait_until(lambda: engine.stats().worker.pending == 0)  # a slot is free
            stream.push(utts[i])
        backend.allow(10_000)
        summary = await stream.close()
        await other.close()
    assert summary.segments == 5
    assert _closed_segments(record, "s") == [0, 1, 2, 3, 4]
    other_len = backend.batches[0][0]
    decoded = [n for batch in backend.batches for n in batch if n != other_len]
    assert len(decoded) == 5
    assert decoded == sorted(decoded), decoded


async def test_a_partial_does_not_take_the_slot_a_backlogged_final_waits_for() -> None:
    """Finals wait in the engine's backlog for the inbox to take them; a
    partial of another stream that comes as the model frees a slot (before
    the backlog's retry) is refused and asked again at its next tick, so
    the slot goes to the final: finals before partials, at admission too."""
    cfg = load_config(overrides={"worker.max_queue": 1, "worker.max_batch": 1,
                                 "worker.max_wait_ms": 0, "stream.partial_interval_ms": 300,
                                 "stream.pause_partial": False})
    utt, _ = speech_with_pauses(["Good evening and welcome, everyone."], pause_s=1.2)
    talk_audio, _ = speech_with_pauses(["Yes, and then we went on talking for a while."],
                                       pause_s=0.0)
    backend = _StepGate()
    record = LatencyLog()
    async with Engine(cfg, backend) as engine:
        engine.add_listener(record)
        worker = engine._worker
        assert worker is not None
        accepted: list[tuple[str, str]] = []
        submit = worker.submit

        def spy(request: DecodeRequest, *, again: bool = False) -> bool:
            ok = submit(request, again=again)
            if ok:
                accepted.append((request.stream, request.kind.value))
            return ok

        worker.submit = spy  # type: ignore[method-assign]
        other = engine.open_stream("other")
        other.push(utt)                      # call 1, held
        backend.wait_calls(1)
        other.push(utt)                      # fills the inbox
        s = engine.open_stream("s")
        s.push(utt)                          # its final refused: backlogged
        assert engine.stats().finals_backlog == 1
        backend.allow(1)
        _wait_until(lambda: engine.stats().worker.pending == 0)  # a slot is free
        # No await in between: the backlog's retry gets no turn before p's partial.
        p = engine.open_stream("p")
        before = len(accepted)
        p.push(talk_audio[:16000])           # a second of speech: a partial is due
        assert ("p", "partial") not in accepted[before:]
        assert engine.stats().partials_refused >= 1
        backend.allow(10_000)
        await s.close()
        await p.close()
        await other.close()
    s_final = accepted.index(("s", "final"))
    assert all(a != ("p", "partial") for a in accepted[:s_final]), accepted
    assert [c.segment for c in record.captions("s") if c.final] == [0]
