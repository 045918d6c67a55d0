"""The jobs behind the CLI (:mod:`evoxtral_stream.run`), with a scripted model."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf  # type: ignore[import-untyped,unused-ignore]

from evoxtral_stream.audio.filereader import FileMix, FilePass, open_audio_file
from evoxtral_stream.audio.sources import read_audio_channels
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine, Stream
from evoxtral_stream.events import (
    SAMPLE_RATE,
    EngineEvent,
    Int16Array,
    StreamEnded,
    StreamError,
)
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


@pytest.mark.parametrize("realtime", [False, True])
async def test_a_file_is_fed_as_it_is_decoded_the_samples_of_the_whole_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, realtime: bool) -> None:
    """A 44.1 kHz stereo file split in its channels and a 48 kHz mono one,
    each a mix of a file decoded as it is fed: every stream is pushed what
    read whole gives it, sample for sample, in chunks of file_chunk_ms; the
    channels of the file in step (at most a chunk apart) in real time."""
    cfg = load_config(overrides={"audio.file_chunk_ms": 100}, env={})
    rng = np.random.default_rng(4)
    stereo, mono = tmp_path / "talk.flac", tmp_path / "desk.wav"
    sf.write(stereo, rng.uniform(-0.5, 0.5, (int(2.2 * 44100), 2)), 44100, subtype="PCM_16")
    sf.write(mono, rng.uniform(-0.5, 0.5, int(1.3 * 48000)), 48000, subtype="PCM_16")
    pushes: dict[str, list[Int16Array]] = {}
    order: list[tuple[str, int]] = []
    real_push = Stream.push

    def push(self: Stream, samples: Int16Array) -> None:
        pushes.setdefault(self.id, []).append(samples.copy())
        order.append((self.id, sum(len(x) for x in pushes[self.id])))
        real_push(self, samples)

    monkeypatch.setattr(Stream, "push", push)
    with open_audio_file(stereo, [(1,), (2,)]) as talk, open_audio_file(mono, [()]) as desk:
        jobs = [FileJob("talk-1", FileMix(talk, 0), file="talk"),
                FileJob("talk-2", FileMix(talk, 1), file="talk"),
                FileJob("desk", FileMix(desk, 0), file="desk")]
        async with Engine(cfg, ScriptedBackend(lambda a: "hi")) as engine:
            summaries = await transcribe_samples(cfg, engine, jobs, realtime=realtime)
    want = dict(zip(["talk-1", "talk-2"], read_audio_channels(stereo, [(1,), (2,)]),
                    strict=True))
    want["desk"] = read_audio_channels(mono, [()])[0]
    for name, samples in want.items():
        np.testing.assert_array_equal(np.concatenate(pushes[name]), samples)
        assert {len(x) for x in pushes[name][:-1]} == {SAMPLE_RATE // 10}
    assert [s.errors for s in summaries] == [0, 0, 0]
    if realtime:
        for i, (name, at) in enumerate(order):
            if name.startswith("talk-"):
                other = "talk-2" if name == "talk-1" else "talk-1"
                done = max((n for s, n in order[:i] if s == other), default=0)
                assert at - done <= SAMPLE_RATE // 10


@pytest.mark.parametrize("realtime", [False, True])
async def test_a_file_gone_before_it_is_fed_ends_its_streams_the_others_go_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, realtime: bool) -> None:
    """A file deleted after its probe (while the model loads): its stream
    logs one error line, gets an audio_input_lost error and ends (counted
    in its summary's errors); the other file's stream gets all its audio
    and its finals."""
    cfg = load_config(overrides={"audio.file_chunk_ms": 100}, env={})
    audio, spans = speech_with_pauses(["hello there", "good morning"], pause_s=1.0) \
        if have_espeak() else (_noise(1.5, 5), [])
    good, gone = tmp_path / "good.wav", tmp_path / "gone.wav"
    sf.write(good, audio, SAMPLE_RATE)
    sf.write(gone, audio, SAMPLE_RATE)
    events: list[EngineEvent] = []
    caplog.set_level(logging.INFO)
    with open_audio_file(good, [()]) as a, open_audio_file(gone, [()]) as b:
        gone.unlink()
        jobs = [FileJob("good", FileMix(a, 0), file="good"),
                FileJob("gone", FileMix(b, 0), file="gone")]
        captions = LatencyLog()
        async with Engine(cfg, ScriptedBackend(words_so_far)) as engine:
            engine.add_listener(captions)
            engine.add_listener(events.append)
            summaries = await transcribe_samples(cfg, engine, jobs, realtime=realtime)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"cannot read audio file {gone} past 0.0 s" in errors[0], errors
    (lost,) = [e for e in events if isinstance(e, StreamError)]
    assert (lost.stream, lost.code, lost.message) == ("gone", "audio_input_lost", errors[0])
    assert [s.errors for s in summaries] == [0, 1]
    assert summaries[0].duration_s == pytest.approx(len(audio) / SAMPLE_RATE)
    assert summaries[1].duration_s == 0
    assert [e.stream for e in events if isinstance(e, StreamEnded)] in (
        ["good", "gone"], ["gone", "good"])
    assert summaries[0].finals == len([c for c in captions.captions("good") if c.final])
    assert summaries[0].finals >= len(spans)


@pytest.mark.parametrize("realtime", [False, True])
async def test_a_split_file_gone_before_it_is_fed_is_one_error_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, realtime: bool) -> None:
    """A stereo file split in its channels and deleted after its probe: not
    paced, each channel's stream reads the file in a pass of its own, and
    each pass logged the same error line (one a channel); the file is one
    error line, and each of its streams still gets its audio_input_lost."""
    cfg = load_config(overrides={"audio.file_chunk_ms": 100}, env={})
    gone = tmp_path / "gone.wav"
    sf.write(gone, np.stack([_noise(1.0, 6), _noise(1.0, 7)], axis=1), SAMPLE_RATE)
    events: list[EngineEvent] = []
    caplog.set_level(logging.INFO)
    with open_audio_file(gone, [(1,), (2,)]) as audio:
        gone.unlink()
        jobs = [FileJob(f"gone-{i + 1}", FileMix(audio, i), file="gone") for i in range(2)]
        async with Engine(cfg, ScriptedBackend(lambda a: "hi")) as engine:
            engine.add_listener(events.append)
            summaries = await transcribe_samples(cfg, engine, jobs, realtime=realtime)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"cannot read audio file {gone} past 0.0 s" in errors[0], errors
    lost = sorted((e.stream, e.code) for e in events if isinstance(e, StreamError))
    assert lost == [("gone-1", "audio_input_lost"), ("gone-2", "audio_input_lost")]
    assert [s.errors for s in summaries] == [1, 1]


def _slow_passes(monkeypatch: pytest.MonkeyPatch, seconds: float,
                 ) -> tuple[list[int], list[str], threading.Event]:
    """Make each block of every file pass take ``seconds`` more to decode;
    the threads that decoded them, ``"step"``/``"close"`` in the order the
    passes were read and closed (a close during a step: ``"overlap"``), and
    an event set while a block decodes."""
    threads: list[int] = []
    order: list[str] = []
    busy = threading.Event()
    real_next, real_close = FilePass.__next__, FilePass.close

    def slow_next(self: FilePass) -> list[Int16Array]:
        busy.set()
        try:
            threads.append(threading.get_ident())
            time.sleep(seconds)
            return real_next(self)
        finally:
            busy.clear()
            order.append("step")

    def close(self: FilePass) -> None:
        order.append("overlap" if busy.is_set() else "close")
        real_close(self)

    monkeypatch.setattr(FilePass, "__next__", slow_next)
    monkeypatch.setattr(FilePass, "close", close)
    return threads, order, busy


@pytest.mark.parametrize("realtime", [False, True])
async def test_a_slow_decode_holds_up_nothing_else_on_the_event_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, realtime: bool) -> None:
    """A block slow to decode (a damaged file is read again up to its
    damage: seconds for an hour of FLAC) is decoded on a worker thread: the
    event loop, which serves every other stream and connection, goes on
    meanwhile; the stream still gets all of its audio."""
    cfg = load_config(overrides={"audio.file_chunk_ms": 100}, env={})
    flac = tmp_path / "talk.flac"
    sf.write(flac, _noise(1.5, 6), SAMPLE_RATE)
    beats_while_decoding = 0

    async def beat() -> None:
        nonlocal beats_while_decoding
        while True:
            await asyncio.sleep(0.01)
            beats_while_decoding += busy.is_set()

    with open_audio_file(flac, [()]) as audio:
        threads, order, busy = _slow_passes(monkeypatch, 0.6)
        async with Engine(cfg, ScriptedBackend(lambda a: "hi")) as engine:
            beating = asyncio.ensure_future(beat())
            summaries = await transcribe_samples(cfg, engine, [FileJob("talk", FileMix(audio, 0))],
                                                 realtime=realtime)
            beating.cancel()
    assert summaries[0].duration_s == pytest.approx(1.5)
    # About 60 a block (none where a block held the loop); a few even under load.
    assert beats_while_decoding >= 5
    assert len(threads) >= 2 and threading.get_ident() not in threads
    assert order[-1] == "close" and "overlap" not in order


async def test_an_mp3_is_decoded_on_the_loop_where_its_prints_are_caught(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """libmpg123 prints on descriptor 2, caught while an MP3's block decodes
    (FilePass): on the loop's own thread, so that nothing the loop writes
    there meanwhile is taken for the decoder's."""
    cfg = load_config(overrides={"audio.file_chunk_ms": 100}, env={})
    mp3 = tmp_path / "talk.mp3"
    try:
        sf.write(mp3, _noise(1.5, 7), SAMPLE_RATE, format="MP3")
    except Exception as e:  # libsndfile built without LAME: nothing to test
        pytest.skip(f"this libsndfile cannot write MP3: {e}")
    with open_audio_file(mp3, [()]) as audio:
        assert audio.prints
        threads, _, _ = _slow_passes(monkeypatch, 0)
        async with Engine(cfg, ScriptedBackend(lambda a: "hi")) as engine:
            summaries = await transcribe_samples(cfg, engine, [FileJob("talk", FileMix(audio, 0))],
                                                 realtime=False)
    assert summaries[0].duration_s > 1.4
    assert threads and set(threads) == {threading.get_ident()}


async def test_a_stop_while_a_block_decodes_closes_its_file_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (``stop``) while a block decodes on its thread: the feed ends,
    and its pass is closed only once that block is decoded (a generator
    closed while another thread runs it raises, and the file would be shut
    under the decoder); the stream ends with the audio fed until then."""
    cfg = load_config(overrides={"audio.file_chunk_ms": 100}, env={})
    flac = tmp_path / "talk.flac"
    sf.write(flac, _noise(6.0, 8), SAMPLE_RATE)
    stop = asyncio.Event()
    with open_audio_file(flac, [()]) as audio:
        _, order, _ = _slow_passes(monkeypatch, 0.8)
        async with Engine(cfg, ScriptedBackend(lambda a: "hi")) as engine:
            asyncio.get_running_loop().call_later(0.4, stop.set)
            t0 = time.monotonic()
            summaries = await transcribe_samples(cfg, engine, [FileJob("talk", FileMix(audio, 0))],
                                                 realtime=True, stop=stop)
            took = time.monotonic() - t0
    assert order == ["step", "close"]
    assert took < 5
    assert summaries[0].duration_s < 6


async def test_a_wav_read_past_its_header_is_decoded_on_a_worker_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A WAV whose header says no audio (its recorder killed before it
    wrote the sizes) is read to the end of the file by the stream decoder
    (WavStreamDecoder), which prints nothing; its probe returned before it
    said so, and such a file was taken for one whose decoder prints, its
    blocks decoded on the event loop as an MP3's are."""
    cfg = load_config(overrides={"audio.file_chunk_ms": 100}, env={})
    wav = tmp_path / "rec.wav"
    sf.write(wav, _noise(1.5, 9), SAMPLE_RATE, subtype="PCM_16")
    data = bytearray(wav.read_bytes())
    at = data.index(b"data")
    data[at + 4:at + 8] = bytes(4)
    wav.write_bytes(bytes(data))
    with open_audio_file(wav, [()]) as audio:
        threads, _, _ = _slow_passes(monkeypatch, 0)
        async with Engine(cfg, ScriptedBackend(lambda a: "hi")) as engine:
            summaries = await transcribe_samples(cfg, engine, [FileJob("rec", FileMix(audio, 0))],
                                                 realtime=False)
    assert summaries[0].duration_s == pytest.approx(1.5)
    assert threads and threading.get_ident() not in threads
