"""The engine glue: failures stay with their segment, backlogged finals are not lost."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
import pytest

from evoxtral_stream.config import load_config
from evoxtral_stream.engine import engine as engine_module
from evoxtral_stream.engine.engine import Engine, Stream
from evoxtral_stream.engine.session import StreamSession
from evoxtral_stream.events import (
    CaptionEvent,
    DecodeFailure,
    DecodeRequest,
    Hypothesis,
    RequestKind,
    StreamEnded,
    StreamError,
)
from evoxtral_stream.run import LatencyLog, feed_samples
from tests.engine.test_journal import talk
from tests.fakes import GatedBackend, ScriptedBackend, SteppingScriptedBackend, words_so_far
from tests.speech import clipped_speech, have_espeak, speech_with_pauses

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")

SENTENCES = ["Good evening and welcome to the live captioning demo.",
             "I was thinking maybe we could try that new restaurant downtown.",
             "Thank you for listening, and have a wonderful night."]



def final_lengths(audio: np.ndarray) -> list[int]:
    """The audio length of each final, as the engine's session will cut them."""
    cfg = load_config()
    session = StreamSession("probe", cfg.vad, cfg.stream)
    reqs = session.push(audio, 0.0) + session.finish(0.0)
    return [len(r.audio) for r in reqs if r.kind is RequestKind.FINAL]


@pytest.mark.parametrize("partials", [True, False])
async def test_a_failed_final_does_not_hold_back_later_segments(partials: bool) -> None:
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.2)
    bad = final_lengths(audio)[0]
    backend = ScriptedBackend(words_so_far, fail_when=lambda a: len(a) == bad)
    # The failure is keyed on the final's audio length, which a partial made
    # at the pause would share: decode the finals themselves here.
    cfg = load_config(overrides={"stream.pause_partial": False} if partials
                      else {"stream.partial_interval_ms": 0})
    record = LatencyLog()
    async with Engine(cfg, backend) as engine:
        engine.add_listener(record)
        summary = await feed_samples(engine.open_stream("s"), audio, 1600, realtime=False)
    errors = [e for e in record.events if isinstance(e, StreamError)]
    assert [(e.code, e.segment) for e in errors] == [("decode_failed", 0)]
    finals = [e for e in record.events if isinstance(e, CaptionEvent) and e.final]
    assert [f.segment for f in finals if f.segment > 0] == [1, 2]
    assert all(f.text.startswith("w0 w1") for f in finals if f.segment > 0)
    if partials:
        # What was shown of the failed segment is closed as its final.
        assert finals[0].segment == 0
    assert isinstance(record.events[-1], StreamEnded)
    assert summary.errors == 1


async def test_a_final_closed_after_its_decode_failed_says_how_long_it_took() -> None:
    """A final whose decode failed is closed with the text its last partial
    showed, and used to carry that partial's latency too (milliseconds here):
    /metrics' final latency then read fastest exactly when finals failed.
    Now its latency runs from its own request's ready time to its close."""
    audio, _ = speech_with_pauses(SENTENCES[:2], pause_s=1.2)
    bad = final_lengths(audio)[0]

    class SlowToFail(ScriptedBackend):
        def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
            if any(len(a) == bad for a in batch):
                time.sleep(0.5)
            return super().transcribe(batch)

    backend = SlowToFail(words_so_far, fail_when=lambda a: len(a) == bad)
    cfg = load_config(overrides={"stream.pause_partial": False})
    record = LatencyLog()
    async with Engine(cfg, backend) as engine:
        engine.add_listener(record)
        await feed_samples(engine.open_stream("s"), audio, 1600, realtime=False)
    finals = [e for e in record.events if isinstance(e, CaptionEvent) and e.final]
    closed = [f for f in finals if f.segment == 0]
    assert len(closed) == 1 and closed[0].text, finals
    assert closed[0].latency is not None and closed[0].latency >= 0.5, closed[0]


async def test_a_failed_final_held_behind_an_open_segment_does_not_close_it() -> None:
    """Segment 1's final failed while segment 0's was still owed (the worker
    runs finals before partials, so 0's final, waiting for its pause
    partial, can come after 1's): the merger keeps 1's last partial as its
    final, to follow 0's. The error used to say ``closes_segment`` all the
    same, so a realtime client closed segment 1 before its caption came."""
    async with Engine(load_config(), ScriptedBackend(words_so_far)) as engine:
        record = LatencyLog()
        engine.add_listener(record)
        engine.open_stream("s")

        def result(seg: int, kind: RequestKind, text: str) -> None:
            engine._on_result(Hypothesis("s", seg, 0, kind, text, seg * 16000,
                                         (seg + 1) * 16000, 0.0, 0.0))

        result(0, RequestKind.PARTIAL, "Good evening")
        result(1, RequestKind.PARTIAL, "I was thinking")
        engine._on_result(DecodeFailure("s", 1, 1, RequestKind.FINAL, "boom"))
        result(0, RequestKind.FINAL, "Good evening.")
        events = list(record.events)
    errors = [e for e in events if isinstance(e, StreamError)]
    assert [(e.code, e.segment, e.closes_segment) for e in errors] == [
        ("decode_failed", 1, False)]
    finals = [e for e in events if isinstance(e, CaptionEvent) and e.final]
    assert [(f.segment, f.text) for f in finals] == [
        (0, "Good evening."), (1, "I was thinking")]


async def test_finals_refused_by_a_full_worker_are_retried_not_lost() -> None:
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.2)
    cfg = load_config(overrides={"worker.max_queue": 1, "worker.max_batch": 1,
                                 "stream.partial_interval_ms": 0})
    backend = ScriptedBackend(words_so_far, delay_s=0.05)
    record = LatencyLog()
    async with Engine(cfg, backend) as engine:
        engine.add_listener(record)
        streams = [engine.open_stream(f"s{i}") for i in range(4)]
        # Push everything at once: far more finals than the inbox holds.
        for s in streams:
            s.push(audio)
        refused_early = engine.stats().finals_backlog
        summaries = [await s.close() for s in streams]
    assert refused_early > 0, "the test must overflow the worker inbox"
    assert [s.finals for s in summaries] == [3, 3, 3, 3]
    finals = [e for e in record.events if isinstance(e, CaptionEvent) and e.final]
    assert len(finals) == 12


def _one_slot_engine() -> Engine:
    """A slow scripted model behind an inbox of one: finals back up."""
    cfg = load_config(overrides={"worker.max_queue": 1, "worker.max_batch": 1,
                                 "stream.partial_interval_ms": 0})
    return Engine(cfg, ScriptedBackend(words_so_far, delay_s=0.05))


async def test_a_backlog_of_finals_logs_a_few_lines_not_one_per_final(
        caplog: pytest.LogCaptureFixture) -> None:
    """Overload used to write one warning per refused final (30 lines in
    0.3 s for 8 burst streams with a small inbox): a log flood exactly when
    the operator needs the log."""
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.2)
    async with _one_slot_engine() as engine:
        streams = [engine.open_stream(f"s{i}") for i in range(8)]
        with caplog.at_level("WARNING", logger="evoxtral_stream.engine.engine"):
            for s in streams:
                s.push(audio)
            backlog = engine.stats().finals_backlog
            summaries = [await s.close() for s in streams]
    assert backlog >= 10, "the test must back up many finals"
    assert [s.finals for s in summaries] == [3] * 8
    lines = [r.getMessage() for r in caplog.records if "inbox full" in r.getMessage()]
    assert 1 <= len(lines) <= 2, lines


async def test_a_final_retried_while_the_inbox_is_full_is_refused_once() -> None:
    """``evoxtral_worker_refused_total`` is "requests refused by a full
    inbox": the engine's retries (every 10 ms) of a final it already counted
    used to count again, hundreds of times for a few finals."""
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.2)
    async with _one_slot_engine() as engine:
        streams = [engine.open_stream(f"s{i}") for i in range(4)]
        for s in streams:
            s.push(audio)
        backlog = engine.stats().finals_backlog
        for s in streams:
            await s.close()
        stats = engine.stats()
    assert backlog > 0, "the test must overflow the worker inbox"
    # Each final was refused at most once (12 finals, no partials).
    assert 0 < stats.worker.refused <= 12
    assert stats.worker.submitted == 12


async def test_every_final_a_full_inbox_refused_is_counted_once() -> None:
    """A final that goes straight behind its stream's waiting finals is not
    offered then; when it was later refused, it went uncounted (its offers
    all counted as "again"): ``evoxtral_worker_refused_total`` read low
    exactly under overload. Now each final the inbox refused counts once."""
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.2)
    refused: set[tuple[str, int]] = set()
    async with _one_slot_engine() as engine:
        worker = engine._worker
        assert worker is not None
        submit = worker.submit

        def recording(req: DecodeRequest, *, again: bool = False) -> bool:
            taken = submit(req, again=again)
            if not taken:
                refused.add((req.stream, req.segment))
            return taken

        worker.submit = recording  # type: ignore[method-assign,assignment]
        streams = [engine.open_stream(f"s{i}") for i in range(4)]
        for s in streams:
            s.push(audio)
        for s in streams:
            await s.close()
        stats = engine.stats()
    assert refused, "the test must overflow the worker inbox"
    assert stats.worker.refused == len(refused)


async def test_a_file_read_without_partials_stays_a_batch_of_finals_ahead() -> None:
    """transcribe --no-partials at full speed: nothing held the reader back,
    so every final of a file was handed over at once, each with its audio,
    and those the inbox could not take waited in the engine's backlog (all
    of a long file's). The reader now waits while max_batch finals of its
    stream are outstanding, and every final still comes."""
    audio, _ = speech_with_pauses(SENTENCES * 4, pause_s=1.0)
    # An inbox that holds the bound (4) whether or not the worker has taken
    # any yet: with 2 it depended on the worker thread's timing (CI saw 1).
    cfg = load_config(overrides={"worker.max_queue": 4, "worker.max_batch": 3,
                                 "stream.partial_interval_ms": 0})
    async with Engine(cfg, ScriptedBackend(words_so_far, delay_s=0.02)) as engine:
        stream = engine.open_stream("file")
        peak = [0, 0]

        def sample(_: object) -> None:
            peak[0] = max(peak[0], stream.session.finals_outstanding)
            peak[1] = max(peak[1], engine.stats().finals_backlog)

        engine.add_listener(sample)
        task = asyncio.ensure_future(feed_samples(stream, audio, 1600, realtime=False))
        while not task.done():
            sample(None)
            await asyncio.sleep(0.001)
        summary = await task
    assert summary.finals == summary.segments == 12
    # One chunk can end one segment past the bound; none waits in the backlog.
    assert peak[0] <= 4 and peak[1] == 0, peak


async def test_cut_ends_the_open_segment_and_the_stream_goes_on() -> None:
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=0.0)
    half = len(audio) // 2
    record = LatencyLog()
    async with Engine(load_config(), ScriptedBackend(words_so_far)) as engine:
        engine.add_listener(record)
        stream = engine.open_stream("s")
        stream.push(audio[:half])
        stream.cut()
        stream.cut()  # nothing open: nothing happens
        stream.push(audio[half:])
        summary = await stream.close()
        with pytest.raises(RuntimeError, match="closed"):
            stream.cut()
    finals = [e for e in record.events if isinstance(e, CaptionEvent) and e.final]
    assert [f.segment for f in finals] == [0, 1]
    # Neither segment reaches across the cut.
    assert finals[0].end <= half / 16000 + 1e-6 <= finals[1].start + 2e-6
    assert summary.segments == summary.finals == 2
    assert summary.duration_s == pytest.approx(len(audio) / 16000)


async def test_audio_refused_by_push_is_not_counted_and_the_stream_goes_on() -> None:
    """Samples that are not 1-D int16 are refused with a clear error; they
    used to be counted first, so the stream's duration (``stream.ended``)
    and the engine's ``audio_s`` (/metrics) included audio never heard."""
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    record = LatencyLog()
    async with Engine(load_config(), ScriptedBackend(words_so_far)) as engine:
        engine.add_listener(record)
        stream = engine.open_stream("s")
        stream.push(audio[:16000])
        with pytest.raises(ValueError, match="int16"):
            stream.push(audio[16000:32000].astype(np.float32))
        with pytest.raises(ValueError, match="int16"):
            stream.push(audio[16000:32000].reshape(-1, 2))
        stream.push(audio[16000:])
        assert engine.stats().audio_s == pytest.approx(len(audio) / 16000)
        summary = await stream.close()
    assert summary.duration_s == pytest.approx(len(audio) / 16000)
    (ended,) = [e for e in record.events if isinstance(e, StreamEnded)]
    assert ended.duration_s == pytest.approx(len(audio) / 16000)
    finals = [e for e in record.events if isinstance(e, CaptionEvent) and e.final]
    assert [f.segment for f in finals] == [0] and finals[0].text


async def test_an_explicit_cut_captions_speech_too_short_for_a_segment() -> None:
    """A clipped "Yes" under ``vad.min_speech_ms``: ``cut(keep_candidate=True)``
    (a client's commit) gets it a final; a plain cut drops it."""
    yes = clipped_speech("Yes.", 200)
    record = LatencyLog()
    async with Engine(load_config(), ScriptedBackend(words_so_far)) as engine:
        engine.add_listener(record)
        stream = engine.open_stream("s")
        stream.push(yes)
        stream.cut()
        stream.push(yes)
        stream.cut(keep_candidate=True)
        summary = await stream.close()
        with pytest.raises(RuntimeError, match="closed"):
            stream.cut(keep_candidate=True)
    (final,) = [e for e in record.events if isinstance(e, CaptionEvent) and e.final]
    assert final.text
    # The second push's speech, from its pre-roll to the cut.
    assert len(yes) / 16000 < final.start < 1.5 * len(yes) / 16000
    assert final.end == pytest.approx(2 * len(yes) / 16000)
    assert summary.segments == summary.finals == 1


async def test_a_stream_id_used_again_goes_on_numbering(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the journal too: subscribers that drop what they have seen
    (seq <= last) must not drop a reconnected client's captions."""
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    record = LatencyLog()

    async def session(engine: Engine, stream_id: str) -> list[CaptionEvent]:
        start = len(record.events)
        stream = engine.open_stream(stream_id)
        await feed_samples(stream, audio, 1600, realtime=False)
        return [e for e in record.events[start:] if isinstance(e, CaptionEvent)]

    monkeypatch.setattr(engine_module, "SEQ_REMEMBERED", 2)
    async with Engine(load_config(env={}), ScriptedBackend(words_so_far)) as engine:
        engine.add_listener(record)
        first = await session(engine, "desk")
        again = await session(engine, "desk")
        assert [e.seq for e in first + again] == list(range(1, len(first + again) + 1))
        assert again[0].segment == 0  # segments count from 0 in each session
        # Only the most recently ended streams are remembered.
        for other in ("a", "b"):
            await session(engine, other)
        assert (await session(engine, "desk"))[0].seq == 1
        assert (await session(engine, "b"))[0].seq > 1


async def test_drafts_are_the_latest_partial_per_open_segment_and_bounded() -> None:
    import dataclasses

    from evoxtral_stream.events import DecodeFailure, DecodeRequest, Hypothesis

    base = load_config()
    cfg = dataclasses.replace(base, stream=dataclasses.replace(base.stream, draft=True))

    def hyp(segment: int, kind: RequestKind, ids: tuple[int, ...]) -> Hypothesis:
        return Hypothesis("s", segment, 1, kind, "x", 0, 1600, 0.0, 0.0, token_ids=ids)

    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine:
        stream = engine.open_stream("s")
        stream.note_draft(hyp(0, RequestKind.PARTIAL, (1, 2)))
        stream.note_draft(hyp(0, RequestKind.PARTIAL, (1, 2, 3)))
        stream.note_draft(hyp(1, RequestKind.PARTIAL, ()))  # a backend without ids
        assert stream.drafts == {0: (1, 2, 3)}
        req = DecodeRequest("s", 0, 2, RequestKind.FINAL, np.zeros(1600, np.float32),
                            0, 1600, 0.0)
        assert engine._with_draft(stream, req).draft == (1, 2, 3)
        # Never beside a prefix; no draft for a segment without a partial.
        assert engine._with_draft(stream, dataclasses.replace(req, prefix="a")).draft == ()
        assert engine._with_draft(stream, dataclasses.replace(req, segment=5)).draft == ()
        stream.note_draft(hyp(0, RequestKind.FINAL, (1, 2, 3, 4)))
        assert stream.drafts == {}
        for seg in range(10):
            stream.note_draft(hyp(seg, RequestKind.PARTIAL, (seg,)))
        assert sorted(stream.drafts) == [6, 7, 8, 9]
        stream.note_draft(DecodeFailure("s", 8, 2, RequestKind.FINAL, "boom"))
        assert sorted(stream.drafts) == [6, 7, 9]
        await stream.close()


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
@pytest.mark.parametrize("pause_partial", [True, False])
async def test_finals_at_a_pause_take_the_text_of_the_partial_of_the_same_audio(
        pause_partial: bool) -> None:
    from evoxtral_stream.engine.backends.base import Done, Job
    from evoxtral_stream.events import DecodeRequest

    class Kinds(ScriptedBackend):
        """Records the kind of every request it decodes."""

        def __init__(self) -> None:
            super().__init__(words_so_far)
            self.kinds: list[RequestKind] = []

        def transcribe_jobs(self, jobs: Sequence[Job]) -> list[Done]:
            self.kinds += [j.key.kind for j in jobs if isinstance(j.key, DecodeRequest)]
            return [Done(j, t) for j, t in
                    zip(jobs, self.transcribe([j.audio for j in jobs]), strict=True)]

    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.5)
    cfg = load_config(overrides={"stream.pause_partial": pause_partial})
    probe = StreamSession("probe", cfg.vad, cfg.stream)
    lengths = [len(r.audio) for r in probe.push(audio, 0.0) + probe.finish(0.0)
               if r.kind is RequestKind.FINAL]
    backend = Kinds()
    record = LatencyLog()
    async with Engine(cfg, backend) as engine:
        engine.add_listener(record)
        summary = await feed_samples(engine.open_stream("s"), audio, 1600, realtime=False)
    finals = [c for c in record.captions() if c.final]
    # The same finals either way: the text of exactly the segment's audio.
    assert [f.text for f in finals] == [words_so_far(np.zeros(n, np.float32)) for n in lengths]
    assert summary.finals == 3
    if pause_partial:
        assert RequestKind.FINAL not in backend.kinds  # every final came from its pause
        assert all(f.latency is not None and f.latency >= 0 for f in finals)
    else:
        assert backend.kinds.count(RequestKind.FINAL) == 3
    assert isinstance(record.events[-1], StreamEnded)


class _ScanCountingDeque(deque[tuple[Stream, DecodeRequest, bool]]):
    """The engine's backlog, counting the entries that scans of it read."""

    scanned = 0

    def __iter__(self) -> Iterator[tuple[Stream, DecodeRequest, bool]]:
        for item in super().__iter__():
            self.scanned += 1
            yield item


def _assert_backlog_counted(engine: Engine) -> None:
    """The per-stream counts match the backlog's entries (read unscanned)."""
    entries = deque.__iter__(engine._backlog)
    assert engine._backlog_of == Counter(s.id for s, _, _ in entries)


async def test_a_large_backlog_is_not_scanned_per_final() -> None:
    """Each final (and each result of a closed stream) asked whether its
    stream had finals in the backlog by scanning all of it: a backlog of
    many streams' finals (an overload) cost quadratic time. The engine
    counts each stream's backlogged finals instead, in step with every
    change of the backlog: refusals, retries and drains."""
    n = 40
    cfg = load_config(overrides={"worker.max_queue": 1, "worker.max_batch": 1,
                                 "stream.partial_interval_ms": 0})
    backend = GatedBackend(words_so_far)
    record = LatencyLog()
    async with Engine(cfg, backend) as engine:
        engine._backlog = backlog = _ScanCountingDeque()
        engine.add_listener(record)
        engine.add_listener(lambda _: _assert_backlog_counted(engine))
        streams = [engine.open_stream(f"s{i}") for i in range(n)]
        streams[0].push(talk(1))
        assert await asyncio.to_thread(backend.entered.wait, 5)
        for s in streams[1:]:
            s.push(talk(1))                  # the inbox holds one: the rest wait
        assert engine.stats().finals_backlog == n - 2
        _assert_backlog_counted(engine)
        closing = asyncio.gather(*(s.close() for s in streams))
        await asyncio.sleep(0)
        _assert_backlog_counted(engine)
        backend.release()
        summaries = await closing
        _assert_backlog_counted(engine)
        assert engine._backlog_of == {}
    assert [s.finals for s in summaries] == [1] * n
    # Quadratic: about n * n / 2 entries read; per-stream counts read none.
    assert backlog.scanned < n, backlog.scanned


async def test_the_backlog_counts_follow_a_drain_that_drops_it() -> None:
    """A drain cut short drops the backlogged finals with their streams: no
    count of them may stay behind."""
    cfg = load_config(overrides={"worker.max_queue": 1, "worker.max_batch": 1,
                                 "stream.partial_interval_ms": 0,
                                 "worker.drain_timeout_s": 0.2})
    backend = GatedBackend(words_so_far)
    try:
        async with Engine(cfg, backend) as engine:
            streams = [engine.open_stream(f"s{i}") for i in range(4)]
            streams[0].push(talk(1))
            assert await asyncio.to_thread(backend.entered.wait, 5)
            for s in streams:
                s.push(talk(2))
            assert engine.stats().finals_backlog >= 6
            _assert_backlog_counted(engine)
            assert await engine.drain() is False
            backend.release()                # the worker stops without its grace
            assert engine.stats().finals_backlog == 0
            _assert_backlog_counted(engine)
            assert engine._backlog_of == {}
    finally:
        backend.release()


async def test_a_stream_naming_the_default_adapter_asks_as_one_naming_none() -> None:
    """A stream opened with the backend's default adapter by name ("default")
    used to send requests named so beside other streams' None (the default
    too). The worker keeps one adapter per running batch and compares names,
    so when idle it admitted the two in separate rounds. Now the engine names
    the default None, as check_language does for model.language; another
    adapter keeps its name and an unknown one is still refused."""
    backend = SteppingScriptedBackend(words_so_far)
    audio, _ = speech_with_pauses(["Good evening and welcome."], pause_s=1.0)
    async with Engine(load_config(), backend) as engine:
        named = engine.open_stream("named", adapter="default")
        assert engine.open_stream("rl", adapter="rl").adapter == "rl"
        with pytest.raises(ValueError, match="unknown adapter 'nosuch'"):
            engine.open_stream("bad", adapter="nosuch")
        named.push(audio)
        await named.close()
        await engine.close_streams()
    names = [name for admitted in backend.admitted_adapters for name in admitted]
    assert names and set(names) == {None}
