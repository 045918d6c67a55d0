"""The jobs behind the CLI (:mod:`evoxtral_stream.run`), with a scripted model."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine, Stream
from evoxtral_stream.events import SAMPLE_RATE, EngineEvent, Int16Array, StreamEnded
from evoxtral_stream.run import FileJob, LatencyLog, transcribe_samples
from tests.fakes import ScriptedBackend, words_so_far
from tests.speech import have_espeak, speech_with_pauses


def _noise(seconds: float, seed: int) -> Int16Array:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * SAMPLE_RATE)) * 3000).astype(np.int16)


async def test_realtime_plays_a_file_s_channel_streams_on_one_clock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``transcribe --realtime`` with a file's channels split: the channel
    streams are fed in lock step, every one its chunk before any gets the
    next, as ``serve --source FILE`` plays them, even after a busy moment
    between two pushes (each stream used to keep a clock of its own, started
    when its feeder first ran: a stall then put one channel ahead of the
    other for the rest of the file). Another file keeps its own clock: its
    stream ends with its audio, not with the longest file's."""
    cfg = load_config(overrides={"audio.file_chunk_ms": 100}, env={})
    chunk = SAMPLE_RATE // 10
    # One file split in two channels (equally long), and a shorter file.
    jobs = [FileJob("talk-1", _noise(2.0, 1), file="talk"),
            FileJob("talk-2", _noise(2.0, 2), file="talk"),
            FileJob("short", _noise(0.5, 3), file="short")]
    log: list[tuple[str, str, int]] = []  # ("push"|"ended", stream, its samples so far)
    pushed = {job.stream: 0 for job in jobs}
    real_push = Stream.push
    stalled: list[str] = []

    def push(self: Stream, samples: Int16Array) -> None:
        real_push(self, samples)
        pushed[self.id] += len(samples)
        log.append(("push", self.id, pushed[self.id]))
        if not stalled:
            stalled.append(self.id)
            time.sleep(0.3)  # the process busy: the event loop stands still

    def record(event: EngineEvent) -> None:
        if isinstance(event, StreamEnded):
            log.append(("ended", event.stream, pushed[event.stream]))

    monkeypatch.setattr(Stream, "push", push)
    async with Engine(cfg, ScriptedBackend(lambda a: "hi")) as engine:
        engine.add_listener(record)
        summaries = await transcribe_samples(cfg, engine, jobs, realtime=True)
    assert [s.duration_s for s in summaries] == pytest.approx([2.0, 2.0, 0.5])
    # No channel of the file ever runs more than its one chunk ahead.
    for kind, stream, at in log:
        if kind == "push" and stream.startswith("talk-"):
            other = "talk-2" if stream == "talk-1" else "talk-1"
            assert at - pushed_at(log, other, log.index((kind, stream, at))) <= chunk, log
    # The short file ended long before the long one's audio did.
    ended = log.index(("ended", "short", int(0.5 * SAMPLE_RATE)))
    last = log.index(("push", "talk-1", 2 * SAMPLE_RATE))
    assert ended < last, log


def pushed_at(log: list[tuple[str, str, int]], stream: str, index: int) -> int:
    """How much of ``stream`` had been pushed by ``log[index]``."""
    return max((at for kind, s, at in log[:index] if kind == "push" and s == stream), default=0)


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed")
async def test_realtime_a_channel_whose_push_raises_costs_the_other_channel_nothing(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """One channel's stream of a two-channel file refuses its third to fifth
    chunks, then every one from its tenth (a bug; a stream closed under the
    feeder): the first raise used to end the feeder for every channel, so
    the other channel's captions stopped with it. Now, as a capture's routes
    are (RouteReceiver), the first failure is logged with its traceback, the
    rest are counted, the refusing stream is offered every chunk, and the
    other channel gets its whole audio and every final."""
    cfg = load_config(overrides={"audio.file_chunk_ms": 100}, env={})
    audio, spans = speech_with_pauses(["hello there", "good morning to you"], pause_s=1.0)
    jobs = [FileJob("talk-1", audio, file="talk"), FileJob("talk-2", audio.copy(), file="talk")]
    real_push = Stream.push
    offered = {job.stream: 0 for job in jobs}

    def push(self: Stream, samples: Int16Array) -> None:
        offered[self.id] += 1
        if self.id == "talk-1" and (3 <= offered[self.id] <= 5 or offered[self.id] >= 10):
            raise RuntimeError(f"talk-1 refuses chunk {offered[self.id]}")
        real_push(self, samples)

    monkeypatch.setattr(Stream, "push", push)
    captions = LatencyLog()
    caplog.set_level(logging.INFO)
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine:
        engine.add_listener(captions)
        summaries = await transcribe_samples(cfg, engine, jobs, realtime=True)
    chunks = -(-len(audio) // (SAMPLE_RATE // 10))
    assert offered == {"talk-1": chunks, "talk-2": chunks}  # both offered every chunk
    talk2 = summaries[1]
    assert talk2.duration_s == pytest.approx(len(audio) / SAMPLE_RATE)
    finals = [c for c in captions.captions("talk-2") if c.final]
    assert talk2.segments == talk2.finals == len(finals) == len(spans), finals
    assert all(c.text for c in finals), finals
    # The refusing channel: the chunks it took.
    assert summaries[0].duration_s == pytest.approx(0.6)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "audio route 1 of 2 (stream talk-1)" in errors[0].getMessage()
    assert errors[0].exc_info and "talk-1 refuses chunk 3" in str(errors[0].exc_info[1])
    assert "(stream talk-1) takes audio again after 3 failed block(s)" in caplog.text
    refused = chunks - 9
    assert f"(stream talk-1) failed {refused} more block(s) ({refused + 3} in all)" \
        in caplog.text
