"""Microphone capture driven through its PortAudio callback without a sound
card, and input device listing through a stand-in sounddevice module."""

from __future__ import annotations

import asyncio
import importlib.abc
import importlib.machinery
import logging
import subprocess
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import _sounddevice  # type: ignore[import-untyped]  # sounddevice's cffi definitions
import numpy as np
import pytest

from evoxtral_stream.audio import microphone
from evoxtral_stream.audio.microphone import (
    MAX_OVERFLOW_GAP_S,
    SILENCE_CHUNK,
    ChannelRoute,
    InputDevice,
    MicrophoneCapture,
    list_input_devices,
    resolve_input_device,
)
from evoxtral_stream.audio.resample import SILENCE_PIECES_PER_TURN, int16_to_float32, resample
from evoxtral_stream.audio.sources import AudioInputError
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import SAMPLE_RATE, Float32Array, Int16Array
from evoxtral_stream.run import LatencyLog
from tests.fakes import ScriptedBackend, words_so_far
from tests.helpers.audio import dominant_frequency, rms, sine
from tests.helpers.portaudio import LiveStream, tone
from tests.helpers.threads import threads_refused
from tests.speech import have_espeak, speech_with_pauses

# --- sounddevice stand-ins -------------------------------------------------------------


class FakeStream:
    """Records what MicrophoneCapture asks of a PortAudio stream."""

    def __init__(self, fail_start: bool = False, fail_stop: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_start = fail_start
        self.fail_stop = fail_stop

    def start(self) -> None:
        self.calls.append("start")
        if self.fail_start:
            raise RuntimeError("device busy")

    def stop(self) -> None:
        self.calls.append("stop")
        if self.fail_stop:
            raise RuntimeError("Unanticipated host error")

    def close(self) -> None:
        self.calls.append("close")


class FakeFactory:
    def __init__(self, fail_start: bool = False) -> None:
        self.opened: list[tuple[InputDevice, int, int, int]] = []
        self.stream = FakeStream(fail_start)

    def __call__(
        self, device: InputDevice, samplerate: int, channels: int, blocksize: int,
        callback: Callable[..., None],
    ) -> FakeStream:
        self.opened.append((device, samplerate, channels, blocksize))
        return self.stream


class Flags:
    def __init__(self, input_overflow: bool = False) -> None:
        self.input_overflow = input_overflow

    def __bool__(self) -> bool:
        return self.input_overflow


def fake_device(rate: float = 48000.0, channels: int = 2) -> InputDevice:
    return InputDevice(index=3, name="Fake Mic", channels=channels,
                       default_samplerate=rate, is_default=True)


class Received:
    """``on_audio`` target: collects blocks and the thread they arrived on."""

    def __init__(self) -> None:
        self.blocks: list[Int16Array] = []
        self.threads: set[int] = set()

    def __call__(self, samples: Int16Array) -> None:
        self.blocks.append(samples)
        self.threads.add(threading.get_ident())

    @property
    def audio(self) -> Int16Array:
        return np.concatenate(self.blocks) if self.blocks else np.zeros(0, np.int16)


async def settle(cap: MicrophoneCapture) -> None:
    """Let the loop run scheduled drains."""
    for _ in range(5):
        await asyncio.sleep(0)


# --- microphone capture -------------------------------------------------------------


@pytest.mark.parametrize("rate", [44100, 48000])
async def test_capture_resamples_stereo_blocks_from_the_portaudio_thread(rate: int) -> None:
    got = Received()
    factory = FakeFactory()
    cap = MicrophoneCapture(got, device=fake_device(rate), block_ms=20,
                            max_pending_blocks=1000, stream_factory=factory)
    cap.start()
    assert factory.opened == [(fake_device(rate), rate, 2, rate // 50)]
    assert factory.stream.calls == ["start"]
    # Recorded frames: 1 s of a 440 Hz tone, louder on the left.
    seconds = 1.0
    stereo = np.stack((sine(440, seconds, rate, amp=0.6), sine(440, seconds, rate, amp=0.2)),
                      axis=1).astype(np.float32)
    block = rate // 50
    indata = np.empty((block, 2), np.float32)  # PortAudio reuses its buffer

    def portaudio() -> None:
        for i in range(0, len(stereo), block):
            n = len(stereo[i : i + block])
            indata[:n] = stereo[i : i + block]
            cap._callback(indata[:n], n, None, Flags())
            indata[:] = 0.0  # the buffer is overwritten after the callback returns

    t = threading.Thread(target=portaudio)
    t.start()
    while t.is_alive():
        await asyncio.sleep(0.001)
    t.join()
    await settle(cap)
    cap.stop()
    assert factory.stream.calls == ["start", "stop", "close"]
    out = got.audio
    assert got.threads == {threading.get_ident()}  # delivered on the loop's thread
    assert out.dtype == np.int16
    assert abs(len(out) - seconds * SAMPLE_RATE) <= 2
    assert cap.samples_delivered == len(out)
    mid = out[2000:-2000]
    assert dominant_frequency(mid, SAMPLE_RATE) == pytest.approx(440, abs=1.0)
    assert rms(mid) / 32768 == pytest.approx(0.4 / np.sqrt(2), rel=0.02)
    assert cap.dropped_blocks == 0


async def test_overflow_drops_and_counts_blocks(caplog: pytest.LogCaptureFixture) -> None:
    got = Received()
    cap = MicrophoneCapture(got, device=fake_device(SAMPLE_RATE, 1), block_ms=20,
                            max_pending_blocks=3, stream_factory=FakeFactory())
    cap.start()
    blocks = [np.full((320, 1), (i + 1) / 100, np.float32) for i in range(10)]
    # The loop is busy (this coroutine does not yield): the handoff fills up.
    for b in blocks:
        cap._callback(b, len(b), None, Flags())
    assert cap.dropped_blocks == 7
    assert got.blocks == []  # nothing is processed on the PortAudio thread
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream.audio.sources"):
        await settle(cap)
    # The first three blocks made it, in order.
    assert [int(b[0]) for b in got.blocks] == [328, 655, 983]
    assert any("dropped 7 audio block" in r.getMessage() for r in caplog.records)
    # Once drained, there is room again; the next block comes after as much
    # silence as was dropped (7 blocks of 320), so it keeps its place in time.
    cap._callback(blocks[0], 320, None, Flags())
    await settle(cap)
    assert [len(b) for b in got.blocks[3:]] == [1600, 640, 320]
    assert not got.audio[960:-320].any() and int(got.blocks[-1][0]) == 328
    assert cap.dropped_blocks == 7 and cap.silence_samples == 7 * 320
    cap.stop()


async def feed_with_a_jam(cap: MicrophoneCapture, audio: Float32Array, block: int,
                          jam: range) -> list[int]:
    """Call back ``audio`` block by block, the loop draining around each one,
    except for the block indexes in ``jam`` (the loop is held up then).
    Returns the indexes of the blocks the capture dropped."""
    dropped: list[int] = []
    for i, start in enumerate(range(0, len(audio), block)):
        if i not in jam:
            await settle(cap)
        before = cap.dropped_blocks
        chunk = audio[start : start + block]
        cap._callback(chunk, len(chunk), None, Flags())
        if cap.dropped_blocks != before:
            dropped.append(i)
        if i not in jam:
            await settle(cap)
    return dropped


def stereo_tone_bursts(rate: int, seconds: float) -> Float32Array:
    """A 440 Hz tone switched on and off every 0.3 s, left louder than right."""
    wave = sine(440, seconds, rate, amp=0.5)
    wave[(np.arange(len(wave)) * 10 // (3 * rate)) % 2 == 1] = 0.0
    return np.stack((wave, wave * 0.5), axis=1).astype(np.float32)


@pytest.mark.parametrize("rate", [SAMPLE_RATE, 44100, 48000])
async def test_dropped_blocks_become_silence_so_later_audio_keeps_its_time(rate: int) -> None:
    block = rate // 50
    audio = stereo_tone_bursts(rate, 4.0)
    got = Received()
    cap = MicrophoneCapture(got, device=fake_device(rate), block_ms=20, max_pending_blocks=10,
                            stream_factory=FakeFactory())
    cap.start()
    # The loop is held up for 1.2 s from 1 s in: 10 blocks wait, 50 are dropped.
    dropped = await feed_with_a_jam(cap, audio, block, range(50, 110))
    cap.stop()
    assert dropped == list(range(60, 110))

    # What a capture that kept up delivers for the same input with the
    # dropped blocks silent: the same timeline, the same audio after the gap.
    heard = audio.copy()
    heard[60 * block : 110 * block] = 0.0
    ref = Received()
    kept_up = MicrophoneCapture(ref, device=fake_device(rate), block_ms=20,
                                max_pending_blocks=10, stream_factory=FakeFactory())
    kept_up.start()
    assert await feed_with_a_jam(kept_up, heard, block, range(0)) == []
    kept_up.stop()
    out, want = got.audio.astype(np.int32), ref.audio.astype(np.int32)
    assert abs(len(out) - len(want)) <= 1
    assert abs(len(out) - len(audio) * SAMPLE_RATE / rate) <= 2
    gap = slice(60 * SAMPLE_RATE // 50, 110 * SAMPLE_RATE // 50)
    assert not out[gap.start + 40 : gap.stop - 40].any()
    n = min(len(out), len(want))
    # Every sound after the gap is where it was captured (to the sample; the
    # restarted resampler filter differs from the continuous one by rounding).
    assert np.abs(out[:n] - want[:n]).max() <= (0 if rate == SAMPLE_RATE else 1)
    assert cap.silence_samples == 50 * SAMPLE_RATE // 50
    assert max(len(b) for b in got.blocks) <= max(SILENCE_CHUNK, SAMPLE_RATE // 50)


@pytest.mark.parametrize("rate", [SAMPLE_RATE, 48000])
async def test_blocks_dropped_after_the_last_queued_one_are_filled_at_stop(rate: int) -> None:
    got = Received()
    cap = MicrophoneCapture(got, device=fake_device(rate, 1), block_ms=20, max_pending_blocks=4,
                            stream_factory=FakeFactory())
    cap.start()
    block = np.full((rate // 50, 1), 0.25, np.float32)
    for _ in range(30):  # the loop never gets to run: 26 blocks are dropped
        cap._callback(block, len(block), None, Flags())
    cap.stop()
    assert cap.dropped_blocks == 26
    assert abs(cap.samples_delivered - 30 * SAMPLE_RATE // 50) <= 1
    assert not got.audio[4 * SAMPLE_RATE // 50 + 40 :].any()
    assert abs(cap.silence_samples - 26 * SAMPLE_RATE // 50) <= 1


async def test_blocks_dropped_before_the_device_is_lost_are_filled_then() -> None:
    delivered_at_stall: list[int] = []
    got = Received()
    cap = MicrophoneCapture(got, device=fake_device(48000), block_ms=20, max_pending_blocks=4,
                            stream_factory=FakeFactory(), stall_timeout_s=0.2,
                            reopen_interval_s=0.1,
                            on_stall=lambda _: delivered_at_stall.append(cap.samples_delivered))
    cap.start()
    block = np.full((960, 2), 0.25, np.float32)
    for _ in range(30):  # 26 dropped, then the device goes quiet
        cap._callback(block, 960, None, Flags())
    await until(lambda: delivered_at_stall != [], "the stall report")
    # The segment is ended (on_stall) after all the captured time is in the stream.
    assert abs(delivered_at_stall[0] - 30 * 320) <= 1
    assert cap.dropped_blocks == 26
    cap.stop()


async def test_no_audio_comes_after_the_stall_report_from_a_late_callback() -> None:
    """The device is given up while a callback (the device's last, come at
    the edge of the stall timeout) is still on PortAudio's thread: it had
    seen the capture accepting, so it queued its block after the capture
    had delivered what it held and reported the stall, and that block went
    out after the end that on_stall marks (into the resampler already
    flushed, at a device rate other than 16 kHz)."""
    entered, gate = threading.Event(), threading.Event()

    class Held(np.ndarray):
        """A block whose copy (the callback's handoff) waits for ``gate``:
        a PortAudio callback caught mid-way on its thread."""

        def copy(self, order: Any = "C") -> Any:
            entered.set()
            assert gate.wait(10)
            return np.asarray(self).copy()

    stalled_at: list[int] = []
    got = Received()
    back = threading.Event()                  # the device stays away until then

    def refresh() -> None:
        assert back.wait(10)

    cap = MicrophoneCapture(got, device=fake_device(SAMPLE_RATE, 1), block_ms=20,
                            max_pending_blocks=8, stream_factory=FakeFactory(),
                            stall_timeout_s=0.2,
                            reopen_interval_s=0.1, refresh_devices=refresh,
                            on_stall=lambda _: stalled_at.append(cap.samples_delivered))
    cap.start()
    for _ in range(5):
        cap._callback(np.full((320, 1), 0.25, np.float32), 320, None, Flags())
    await settle(cap)
    # At the device's rate the resampler holds nothing back: what is queued comes out.
    late = np.full((320, 1), 0.5, np.float32).view(Held)
    thread = threading.Thread(target=cap._callback, args=(late, 320, None, Flags()))
    thread.start()
    try:
        assert await asyncio.to_thread(entered.wait, 5)
        await until(lambda: stalled_at != [], "the stall report")
    finally:
        gate.set()
        await asyncio.to_thread(thread.join, 5)
    await settle(cap)
    try:
        assert stalled_at[0] == 5 * 320
        assert cap.samples_delivered == stalled_at[0]
        assert not (np.abs(got.audio) > 12000).any()  # the late block never came out
    finally:
        back.set()
    await until(lambda: cap.reopens == 1, "the reopen")
    cap.stop()
    assert cap.samples_delivered == stalled_at[0]


async def test_a_long_drop_run_is_filled_in_bounded_pieces() -> None:
    got = Received()
    cap = MicrophoneCapture(got, device=fake_device(48000), block_ms=20, max_pending_blocks=1,
                            stream_factory=FakeFactory())
    cap.start()
    block = np.zeros((960, 2), np.float32)
    for _ in range(3001):  # 60 s dropped while the loop is held up
        cap._callback(block, 960, None, Flags())
    assert got.blocks == []
    await settle(cap)
    cap._callback(np.full((960, 2), 0.5, np.float32), 960, None, Flags())
    await settle(cap)
    cap.stop()
    assert cap.dropped_blocks == 3000
    assert abs(cap.samples_delivered - 3002 * 320) <= 1
    # The loud block is where it was captured: after 60.02 s.
    loud = np.flatnonzero(np.abs(got.audio) > 8000)
    assert abs(int(loud[0]) - 3001 * 320) <= 10
    assert max(len(b) for b in got.blocks) == SILENCE_CHUNK
    assert cap.silence_samples == 60 * SAMPLE_RATE


async def test_a_long_gap_is_filled_over_many_turns_of_the_loop() -> None:
    turn = 0

    async def ticker() -> None:
        nonlocal turn
        while True:
            turn += 1
            await asyncio.sleep(0)

    silence_turns: list[int] = []
    got = Received()

    def on_audio(samples: Int16Array) -> None:
        got(samples)
        if len(samples) == SILENCE_CHUNK and not samples.any():
            silence_turns.append(turn)

    cap = MicrophoneCapture(on_audio, device=fake_device(48000), block_ms=20,
                            max_pending_blocks=1, stream_factory=FakeFactory())
    cap.start()
    for _ in range(3001):  # 60 s dropped while the loop is held up
        cap._callback(np.zeros((960, 2), np.float32), 960, None, Flags())
    ticking = asyncio.ensure_future(ticker())
    await settle(cap)  # the first block goes
    cap._callback(np.full((960, 2), 0.5, np.float32), 960, None, Flags())
    await until(lambda: cap.silence_samples == 60 * SAMPLE_RATE, "the gap filled")
    await settle(cap)
    ticking.cancel()
    cap.stop()
    # The loop went on between every second of the silence.
    assert len(silence_turns) == 600
    per_turn = np.unique(silence_turns, return_counts=True)[1]
    assert per_turn.max() <= SILENCE_PIECES_PER_TURN and len(per_turn) >= 60
    # And the block after the gap still comes after all of it, at its time.
    loud = np.flatnonzero(np.abs(got.audio) > 8000)
    assert abs(int(loud[0]) - 3001 * 320) <= 10
    assert abs(cap.samples_delivered - 3002 * 320) <= 1

Finals = list[tuple[int, float, float]]


def two_sentences(rate: int) -> tuple[Float32Array, list[tuple[int, int]], int]:
    """Two spoken sentences 3 s apart at ``rate`` (frames x 1 channel), their
    16 kHz spans, and the 20 ms block 0.5 s into the pause."""
    speech, spans = speech_with_pauses(["Good evening and welcome to the show.",
                                        "Tonight we talk about the weather."], pause_s=3.0)
    audio = resample(int16_to_float32(speech), SAMPLE_RATE, rate)[:, None]
    return audio, spans, spans[0][1] * 50 // SAMPLE_RATE + 25


async def finals_through_engine(
        rate: int, feed: Callable[[MicrophoneCapture], Awaitable[object]]
) -> tuple[Finals, MicrophoneCapture]:
    """(segment, start, end) of the finals a real engine makes of what ``feed``
    gives a capture of a fake ``rate`` device, and that capture."""
    cfg = load_config(overrides={"stream.partial_interval_ms": 0})
    record = LatencyLog()
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine:
        engine.add_listener(record)
        stream = engine.open_stream("mic", source="mic")
        cap = MicrophoneCapture(stream.push, device=fake_device(rate, 1), block_ms=20,
                                max_pending_blocks=10, stream_factory=FakeFactory())
        cap.start()
        await feed(cap)
        cap.stop()
        await stream.close()
    return [(c.segment, c.start, c.end) for c in record.captions() if c.final], cap


def assert_same_times(got: Finals, kept_up: Finals, spans: list[tuple[int, int]]) -> None:
    """``got`` has the finals ``kept_up`` has, at the same times (within 2 ms)."""
    assert len(kept_up) == 2
    assert kept_up[1][1] == pytest.approx(spans[1][0] / SAMPLE_RATE, abs=0.5)
    assert [s for s, _, _ in got] == [s for s, _, _ in kept_up]
    for (_, start, end), (_, want_start, want_end) in zip(got, kept_up, strict=True):
        assert start == pytest.approx(want_start, abs=0.002)
        assert end == pytest.approx(want_end, abs=0.002)


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
@pytest.mark.parametrize("rate", [SAMPLE_RATE, 48000])
async def test_captions_after_a_drop_run_keep_their_times(rate: int) -> None:
    audio, spans, jam_at = two_sentences(rate)
    block = rate // 50
    # The loop is held up 0.5 s into the pause, for 1.4 s: 1.2 s are dropped.
    jam = range(jam_at, jam_at + 70)
    kept_up, none = await finals_through_engine(
        rate, lambda cap: feed_with_a_jam(cap, audio, block, range(0)))
    jammed, dropped = await finals_through_engine(
        rate, lambda cap: feed_with_a_jam(cap, audio, block, jam))
    assert none.dropped_blocks == 0 and dropped.dropped_blocks == 60
    assert_same_times(jammed, kept_up, spans)


async def test_status_overflow_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    cap = MicrophoneCapture(Received(), device=fake_device(), block_ms=20,
                            max_pending_blocks=10, stream_factory=FakeFactory())
    cap.start()
    block = np.zeros((960, 2), np.float32)
    cap._callback(block, 960, None, Flags(input_overflow=True))
    cap._callback(block, 960, None, Flags())
    assert cap.status_overflows == 1
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream.audio.sources"):
        await settle(cap)
    assert any("overflowed 1 time" in r.getMessage() for r in caplog.records)
    cap.stop()


async def test_drops_and_overflows_are_logged_at_most_every_ten_seconds(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that overflows on every other block (ALSA xruns on a busy
    USB hub), or a handoff too small for the loop, logged a warning on each
    drain the loop keeps up with: 25 lines a second. Now one line, then what
    came since in the next, at most every 10 s, and the rest at stop."""

    def counted(what: str) -> list[int]:
        # "<what> N time(s)/block(s) (M in total)": each line's N.
        return [int(r.getMessage().split(what)[1].split()[0]) for r in caplog.records
                if what in r.getMessage()]

    cap = MicrophoneCapture(Received(), device=fake_device(), block_ms=20,
                            max_pending_blocks=1, stream_factory=FakeFactory())
    cap.start()
    block = np.zeros((960, 2), np.float32)
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream.audio.microphone"):
        for i in range(100):
            cap._callback(block, 960, None, Flags(input_overflow=i % 2 == 1))
            if i % 4 == 3:  # the loop is late once in a while: one block dropped
                cap._callback(block, 960, None, Flags())
            await settle(cap)
        assert (counted("overflowed "), counted("dropped ")) == ([1], [1])
        # Past the interval, the next drain says what came meanwhile.
        monkeypatch.setattr(microphone, "REPORT_EVERY_S", 0.0)
        cap._callback(block, 960, None, Flags())
        await settle(cap)
        assert (counted("overflowed "), counted("dropped ")) == ([1, 49], [1, 24])
        monkeypatch.setattr(microphone, "REPORT_EVERY_S", 10.0)
        cap._callback(block, 960, None, Flags(input_overflow=True))
        cap._callback(block, 960, None, Flags())  # dropped: the handoff holds one
        await settle(cap)
        cap.stop()  # what the interval held back is logged at stop
    assert (counted("overflowed "), counted("dropped ")) == ([1, 49, 1], [1, 24, 1])
    assert (cap.status_overflows, cap.dropped_blocks) == (51, 26)


# --- PortAudio input overflows ---------------------------------------------------------


def adc_time(adc: float) -> Any:
    """What sounddevice hands the callback as ``time``: PortAudio's
    ``PaStreamCallbackTimeInfo *``, a cffi pointer to the real struct."""
    return _sounddevice.ffi.new("PaStreamCallbackTimeInfo *", {
        "inputBufferAdcTime": adc, "currentTime": adc + 0.005, "outputBufferDacTime": 0.0})


async def feed_with_an_overflow(cap: MicrophoneCapture, audio: Float32Array, block: int,
                                lost: range, times: Callable[[int], Any]) -> None:
    """Call back ``audio`` block by block with ``times(i)`` as ``time_info``,
    the loop draining around each one, except that the blocks in ``lost``
    never come (PortAudio overflowed): the next one has ``input_overflow``."""
    for i, start in enumerate(range(0, len(audio), block)):
        if i in lost:
            continue
        chunk = audio[start : start + block]
        overflow = bool(lost) and i == lost.stop
        cap._callback(chunk, len(chunk), times(i), Flags(input_overflow=overflow))
        await settle(cap)


@pytest.mark.parametrize("rate", [SAMPLE_RATE, 44100, 48000])
async def test_an_input_overflow_is_measured_from_adc_times_and_filled_with_silence(
        rate: int, caplog: pytest.LogCaptureFixture) -> None:
    block = rate // 50
    audio = stereo_tone_bursts(rate, 4.0)
    start = 5021.125  # PortAudio's times have no set origin
    got = Received()
    cap = MicrophoneCapture(got, device=fake_device(rate), block_ms=20, max_pending_blocks=10,
                            stream_factory=FakeFactory())
    cap.start()
    # PortAudio loses 1 s from 1.1 s in: the block after comes with an
    # overflow, 50 blocks later than the one before by its ADC time.
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream.audio.microphone"):
        await feed_with_an_overflow(cap, audio, block, range(55, 105),
                                    lambda i: adc_time(start + i * block / rate))
    cap.stop()

    # A capture that got every block, the lost ones silent: the same timeline.
    heard = audio.copy()
    heard[55 * block : 105 * block] = 0.0
    ref = Received()
    kept_up = MicrophoneCapture(ref, device=fake_device(rate), block_ms=20,
                                max_pending_blocks=10, stream_factory=FakeFactory())
    kept_up.start()
    await feed_with_an_overflow(kept_up, heard, block, range(0),
                                lambda i: adc_time(start + i * block / rate))
    kept_up.stop()
    out, want = got.audio.astype(np.int32), ref.audio.astype(np.int32)
    assert abs(len(out) - len(audio) * SAMPLE_RATE / rate) <= 2
    assert abs(len(out) - len(want)) <= 1
    gap = slice(55 * SAMPLE_RATE // 50, 105 * SAMPLE_RATE // 50)
    assert not out[gap.start + 40 : gap.stop - 40].any()
    n = min(len(out), len(want))
    # Every sound after the gap is where it was captured (to the sample; the
    # restarted resampler filter differs from the continuous one by rounding).
    assert np.abs(out[:n] - want[:n]).max() <= (0 if rate == SAMPLE_RATE else 1)
    assert cap.silence_samples == 50 * SAMPLE_RATE // 50
    assert cap.status_overflows == 1 and cap.overflows_unmeasured == 0
    assert cap.overflow_lost_s == pytest.approx(1.0, abs=1 / rate)
    assert cap.dropped_blocks == 0
    assert "1.000 s of it measured from PortAudio's timestamps and filled with silence" \
        in caplog.text


async def test_an_overflow_while_the_handoff_is_full_is_filled_too() -> None:
    # The overflow comes while the loop is held up: the block it precedes is
    # dropped, and the lost frames go before the next queued block with its gap.
    got = Received()
    cap = MicrophoneCapture(got, device=fake_device(SAMPLE_RATE, 1), block_ms=20,
                            max_pending_blocks=2, stream_factory=FakeFactory())
    cap.start()
    block = np.full((320, 1), 0.25, np.float32)
    for i in (0, 1, 2, 10):  # 7 blocks lost to the overflow before block 10
        cap._callback(block, 320, adc_time(7.0 + i * 0.02), Flags(input_overflow=i == 10))
    await settle(cap)
    cap._callback(np.full((320, 1), 0.5, np.float32), 320, adc_time(7.0 + 11 * 0.02), Flags())
    await settle(cap)
    cap.stop()
    assert cap.samples_delivered == 12 * 320 and cap.silence_samples == 9 * 320
    assert int(got.audio[-1]) == 16384  # the last block is where it was captured
    assert cap.dropped_blocks == 2 and cap.overflow_lost_s == pytest.approx(0.14)


async def test_overflows_the_adc_times_cannot_measure_are_only_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    block = 960

    def ramp(i: int) -> float:
        return 100.0 + i * 0.02

    cases: dict[str, Callable[[int], Any]] = {
        "no time_info": lambda i: None,
        "zero (host API without timestamps)": lambda i: adc_time(0.0),
        "below zero (ALSA without timestamps: 0 less the delay)": lambda i: adc_time(-0.013),
        "standing still": lambda i: adc_time(42.0),
        "running back": lambda i: adc_time(ramp(i) - (3.0 if i >= 6 else 0.0)),
        "a jump past MAX_OVERFLOW_GAP_S": (
            lambda i: adc_time(ramp(i) + (MAX_OVERFLOW_GAP_S + 1 if i >= 6 else 0.0))),
        "not a number": lambda i: adc_time(float("nan")),
        "no previous block": lambda i: adc_time(ramp(i)),
    }
    for case, times in cases.items():
        got = Received()
        cap = MicrophoneCapture(got, device=fake_device(), block_ms=20,
                                max_pending_blocks=100, stream_factory=FakeFactory())
        cap.start()
        caplog.clear()
        # Block 5 never comes; 6 overflowed (or is the first one).
        blocks = range(6, 10) if case == "no previous block" else [*range(5), *range(6, 10)]
        with caplog.at_level(logging.WARNING, logger="evoxtral_stream.audio.microphone"):
            for i in blocks:
                cap._callback(np.zeros((block, 2), np.float32), block, times(i),
                              Flags(input_overflow=i == 6))
            await settle(cap)
        cap.stop()
        assert (cap.status_overflows, cap.overflows_unmeasured) == (1, 1), case
        assert cap.overflow_lost_s == 0.0 and cap.silence_samples == 0, case
        assert abs(cap.samples_delivered - len(blocks) * 320) <= 1, case
        assert "1 overflow(s) not measurable (no usable timestamps)" in caplog.text, case
        assert "filled with silence" not in caplog.text, case


async def test_the_callback_reads_sounddevice_s_own_arguments() -> None:
    # What sounddevice's InputStream passes: a NumPy view of PortAudio's buffer,
    # the frame count, a PaStreamCallbackTimeInfo pointer and CallbackFlags.
    # PortAudio reuses the buffer and the struct after the callback returns.
    from evoxtral_stream.audio import microphone

    try:
        sd = microphone._import_sounddevice()
    except AudioInputError as e:
        pytest.skip(str(e))
    ffi = _sounddevice.ffi
    rate, block = 48000, 960
    got = Received()
    cap = MicrophoneCapture(got, device=fake_device(rate, 1), block_ms=20,
                            max_pending_blocks=100, stream_factory=FakeFactory())
    cap.start()
    raw = ffi.new("float[]", block)
    info = ffi.new("PaStreamCallbackTimeInfo *")
    for i in [*range(10), *range(30, 40)]:  # 20 blocks (0.4 s) lost before block 30
        indata = np.frombuffer(ffi.buffer(raw), np.float32).reshape(-1, 1)
        indata[:] = 0.5 if i == 39 else 0.0
        info.inputBufferAdcTime = 812.5 + i * block / rate
        info.currentTime = info.inputBufferAdcTime + 0.01
        status = sd.CallbackFlags()
        status.input_overflow = i == 30
        cap._callback(indata, block, info, status)
        info.inputBufferAdcTime = 0.0  # PortAudio's next use of the struct
        indata[:] = -1.0
        await settle(cap)
    cap.stop()
    assert abs(cap.samples_delivered - 40 * 320) <= 1
    loud = np.flatnonzero(got.audio > 8000)
    assert abs(int(loud[0]) - 39 * 320) <= 10 and not (got.audio < -8000).any()
    assert cap.status_overflows == 1 and cap.overflows_unmeasured == 0
    assert cap.overflow_lost_s == pytest.approx(0.4)


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
@pytest.mark.parametrize("rate", [SAMPLE_RATE, 48000])
async def test_captions_after_an_input_overflow_keep_their_times(rate: int) -> None:
    audio, spans, lost_at = two_sentences(rate)
    block = rate // 50

    def feed(lost: range) -> Callable[[MicrophoneCapture], Awaitable[object]]:
        return lambda cap: feed_with_an_overflow(cap, audio, block, lost,
                                                 lambda i: adc_time(3.5 + i * 0.02))

    kept_up, cap = await finals_through_engine(rate, feed(range(0)))
    assert cap.status_overflows == 0
    # PortAudio loses 1.2 s from 0.5 s into the pause.
    overflowed, cap = await finals_through_engine(rate, feed(range(lost_at, lost_at + 60)))
    assert cap.status_overflows == 1
    assert_same_times(overflowed, kept_up, spans)


async def test_one_wakeup_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    wakes: list[object] = []
    real = loop.call_soon_threadsafe

    def counting(cb: Callable[..., object], *args: Any, **kw: Any) -> asyncio.Handle:
        wakes.append(cb)
        return real(cb, *args, **kw)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    got = Received()
    cap = MicrophoneCapture(got, device=fake_device(SAMPLE_RATE, 1), block_ms=20,
                            max_pending_blocks=100, stream_factory=FakeFactory())
    cap.start(loop)
    block = np.full((320, 1), 0.25, np.float32)
    for _ in range(5):
        cap._callback(block, 320, None, Flags())
    assert len(wakes) == 1
    await settle(cap)
    assert len(got.blocks) == 5
    cap._callback(block, 320, None, Flags())
    assert len(wakes) == 2  # a new batch wakes the loop again
    await settle(cap)
    cap.stop()
    assert len(got.blocks) == 6


async def test_channels_capped_at_two_and_mono_devices(tmp_path: Path) -> None:
    for channels, expect in ((8, 2), (1, 1)):
        factory = FakeFactory()
        cap = MicrophoneCapture(Received(), device=fake_device(44100, channels), block_ms=10,
                                max_pending_blocks=10, stream_factory=factory)
        cap.start()
        cap.stop()
        assert factory.opened[0][1:] == (44100, expect, 441)


async def test_each_route_gets_the_mix_of_its_own_channels_and_the_same_timeline() -> None:
    """A 6-channel interface, a different tone on each channel: one output per
    microphone (channels 2 and 5), one mixing channels 1 and 3, one mixing
    the first two (the default); blocks dropped on the way are silence in
    every output alike."""
    rate, block = 48000, 960
    freqs = [300.0, 500.0, 700.0, 900.0, 1100.0, 1300.0]
    outs = {name: Received() for name in ("ch2", "ch5", "ch1+3", "default")}
    routes = [ChannelRoute(outs["ch2"], (2,)), ChannelRoute(outs["ch5"], (5,)),
              ChannelRoute(outs["ch1+3"], (1, 3)), ChannelRoute(outs["default"])]
    factory = FakeFactory()
    cap = MicrophoneCapture(routes, device=fake_device(rate, 6), block_ms=20,
                            max_pending_blocks=5, stream_factory=factory)
    cap.start()
    assert factory.opened[0][2] == 5          # PortAudio opens the first five
    seconds = 2.0
    audio = np.stack([sine(f, seconds, rate, amp=0.5) for f in freqs[:5]],
                     axis=1).astype(np.float32)
    dropped = await feed_with_a_jam(cap, audio, block, range(40, 50))
    cap.stop()
    assert dropped, "the jam should have dropped blocks"
    lengths = {name: len(o.audio) for name, o in outs.items()}
    assert len(set(lengths.values())) == 1, lengths
    assert abs(lengths["ch2"] - seconds * SAMPLE_RATE) <= 2
    assert cap.samples_delivered == lengths["ch2"]
    # Where the blocks were dropped, every output is silent; elsewhere each
    # carries its own channels only.
    assert dropped == list(range(dropped[0], dropped[-1] + 1))
    gap = slice(int(0.02 * dropped[0] * SAMPLE_RATE) + 400,
                int(0.02 * (dropped[-1] + 1) * SAMPLE_RATE) - 400)
    head = slice(2000, 12000)
    for name, o in outs.items():
        assert not o.audio[gap].any(), name
    assert dominant_frequency(outs["ch2"].audio[head], SAMPLE_RATE) == pytest.approx(500, abs=2)
    assert dominant_frequency(outs["ch5"].audio[head], SAMPLE_RATE) == pytest.approx(1100, abs=2)
    for name, (lo, hi) in {"ch1+3": (300, 700), "default": (300, 500)}.items():
        spectrum = np.abs(np.fft.rfft(outs[name].audio[head].astype(np.float64)))
        hz = np.fft.rfftfreq(len(outs[name].audio[head]), 1 / SAMPLE_RATE)
        peaks = sorted(hz[np.argsort(spectrum)[-2:]].round())
        assert peaks == pytest.approx([lo, hi], abs=2), name
    assert rms(outs["ch5"].audio[head]) / 32768 == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


class Refusing(Received):
    """A receiver that raises on the calls numbered in ``fail`` (from 0), as
    a stream closed under the capture does; ``offered`` counts every call."""

    def __init__(self, fail: set[int]) -> None:
        super().__init__()
        self.fail = fail
        self.offered: list[int] = []

    def __call__(self, samples: Int16Array) -> None:
        call = len(self.offered)
        self.offered.append(len(samples))
        if call in self.fail:
            raise RuntimeError(f"stream closed (call {call})")
        super().__call__(samples)


async def test_a_route_whose_receiver_raises_costs_the_other_routes_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    """Three routes, the middle one's receiver raising on some blocks: the
    routes after it used to miss those blocks (and the blocks queued after
    them waited for the next callback), and a raise in stop() left the
    last ones undelivered. Now every other route gets every block, the
    raising one is offered every block (its timeline stays the others'),
    and each run of failures is logged once, with its traceback."""
    first, second = Received(), Received()
    refusing = Refusing({2, 3, 4, 7})
    cap = MicrophoneCapture(
        [ChannelRoute(first), ChannelRoute(refusing), ChannelRoute(second)],
        device=fake_device(SAMPLE_RATE, 1), block_ms=20, max_pending_blocks=100,
        stream_factory=FakeFactory())
    cap.start()
    blocks = [np.full((320, 1), (i + 1) / 100, np.float32) for i in range(12)]
    caplog.set_level(logging.INFO, logger="evoxtral_stream.audio")  # the capture and its receivers
    for b in blocks[:10]:  # the loop is held up: one drain takes all ten
        cap._callback(b, 320, None, Flags())
    await settle(cap)
    assert len(first.blocks) == len(second.blocks) == 10
    refusing.fail = set(range(10, 100))  # from now on it refuses everything
    for b in blocks[10:]:
        cap._callback(b, 320, None, Flags())
    cap.stop()  # delivers the two queued blocks; must not raise
    want = [round(32767 * (i + 1) / 100) for i in range(12)]
    assert [int(b[0]) for b in first.blocks] == want
    assert [int(b[0]) for b in second.blocks] == want
    assert refusing.offered == [320] * 12
    assert [int(b[0]) for b in refusing.blocks] == [want[i] for i in (0, 1, 5, 6, 8, 9)]
    assert cap.samples_delivered == 12 * 320 and cap.receiver_failures == 6
    # Three runs of failures: the first is logged with its traceback and
    # its end; the two after it come within REPORT_EVERY_S, so they are
    # counted, and the count is logged at stop.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "audio route 2 of 3" in errors[0].getMessage()
    assert errors[0].exc_info and "stream closed (call 2)" in str(errors[0].exc_info[1])
    assert "audio route 2 of 3 takes audio again after 3 failed block(s)" in caplog.text
    assert "audio route 2 of 3 failed 3 more block(s) (6 in all)" in caplog.text
    assert not [r for r in caplog.records if "Exception in callback" in r.getMessage()]


async def test_a_route_asking_for_a_channel_the_device_lacks_is_one_clear_error() -> None:
    factory = FakeFactory()
    cap = MicrophoneCapture([ChannelRoute(Received(), (1, 3))], device=fake_device(48000, 2),
                            block_ms=10, max_pending_blocks=10, stream_factory=factory)
    with pytest.raises(AudioInputError, match=r"audio.channels asks for channel 3, but audio "
                                              r"device 'Fake Mic' has 2 input channel\(s\)"):
        cap.start()
    assert factory.opened == []
    with pytest.raises(ValueError, match="distinct"):
        ChannelRoute(Received(), (2, 2))


async def test_a_device_without_a_usable_rate_is_one_clear_error() -> None:
    for rate in (0.0, float("nan")):
        factory = FakeFactory()
        cap = MicrophoneCapture(Received(), device=fake_device(rate), block_ms=10,
                                max_pending_blocks=10, stream_factory=factory)
        with pytest.raises(AudioInputError, match="'Fake Mic' reports no usable sample rate"):
            cap.start()
        assert not cap.running and factory.opened == []


async def test_context_manager_and_callbacks_after_stop() -> None:
    factory = FakeFactory()
    got = Received()
    with MicrophoneCapture(got, device=fake_device(SAMPLE_RATE, 1), block_ms=20,
                           max_pending_blocks=10, stream_factory=factory) as cap:
        assert cap.running
        cap._callback(np.full((320, 1), 0.5, np.float32), 320, None, Flags())
    # stop() delivered the pending block without waiting for the loop.
    assert factory.stream.calls == ["start", "stop", "close"]
    assert len(got.blocks) == 1
    assert not cap.running
    cap._callback(np.full((320, 1), 0.5, np.float32), 320, None, Flags())  # late: ignored
    await settle(cap)
    assert len(got.blocks) == 1


async def test_a_device_that_fails_to_stop_still_delivers_its_audio(
        caplog: pytest.LogCaptureFixture) -> None:
    """A device unplugged just before the capture stops can make PortAudio's
    stop fail: stop() used to raise out of the caller's shutdown, leaving the
    queued blocks (the last words) and the resampler's tail undelivered."""
    factory = FakeFactory()
    factory.stream.fail_stop = True
    got = Received()
    cap = MicrophoneCapture(got, device=fake_device(48000, 1), block_ms=20,
                            max_pending_blocks=10, stream_factory=factory)
    cap.start()
    for _ in range(3):
        cap._callback(np.full((960, 1), 0.5, np.float32), 960, None, Flags())
    with caplog.at_level(logging.WARNING):
        cap.stop()
    assert factory.stream.calls == ["start", "stop", "close"]
    assert not cap.running
    assert cap.samples_delivered == 3 * 320  # every block, the filter's tail included
    assert "Unanticipated host error" in caplog.text
    cap._callback(np.full((960, 1), 0.5, np.float32), 960, None, Flags())  # late: ignored
    await settle(cap)
    assert cap.samples_delivered == 3 * 320


async def test_stream_start_failure_is_an_audio_input_error() -> None:
    factory = FakeFactory(fail_start=True)
    cap = MicrophoneCapture(Received(), device=fake_device(), block_ms=20,
                            max_pending_blocks=10, stream_factory=factory)
    with pytest.raises(AudioInputError, match=r"Fake Mic.*device busy"):
        cap.start()
    assert factory.stream.calls == ["start", "close"]
    assert not cap.running
    # A stream that fails to close too (PortAudio on a device it cannot
    # start): still the one clear error, not the close's RuntimeError.

    def close() -> None:
        factory.stream.calls.append("close")
        raise RuntimeError("Unanticipated host error")

    factory.stream.close = close  # type: ignore[method-assign]
    with pytest.raises(AudioInputError, match=r"Fake Mic.*device busy"):
        cap.start()
    assert not cap.running


# --- devices (a stand-in sounddevice module) ---------------------------------------


def fake_sounddevice(devices: Sequence[dict[str, Any]], default_input: int
                     ) -> types.ModuleType:
    mod = types.ModuleType("sounddevice")
    mod.query_devices = lambda: list(devices)  # type: ignore[attr-defined]
    mod.default = types.SimpleNamespace(device=[default_input, -1])  # type: ignore[attr-defined]
    return mod


DEVICES = [
    {"index": 0, "name": "HDA Intel PCH: ALC3246 Analog", "max_input_channels": 2,
     "default_samplerate": 44100.0},
    {"index": 1, "name": "HDMI output", "max_input_channels": 0,
     "default_samplerate": 48000.0},
    {"index": 2, "name": "USB Headset Mic", "max_input_channels": 1,
     "default_samplerate": 48000.0},
    {"index": 3, "name": "Studio Mic²", "max_input_channels": 1,
     "default_samplerate": 48000.0},
]


def test_list_and_resolve_input_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice(DEVICES, 2))
    devices = list_input_devices()
    assert devices == [
        InputDevice(0, "HDA Intel PCH: ALC3246 Analog", 2, 44100.0, False),
        InputDevice(2, "USB Headset Mic", 1, 48000.0, True),
        InputDevice(3, "Studio Mic²", 1, 48000.0, False),
    ]
    assert resolve_input_device("").index == 2
    assert resolve_input_device(None).index == 2
    # Blank (a config value of white space) is the default too: it matched
    # every name as a substring, so the first device was taken.
    assert resolve_input_device("  ").index == 2
    assert resolve_input_device("0").index == 0
    assert resolve_input_device(0).index == 0
    assert resolve_input_device("headset").index == 2
    # A digit that is no decimal digit is part of a name, not an index.
    assert resolve_input_device("²").index == 3
    with pytest.raises(AudioInputError, match="no audio input device matches 'webcam'"):
        resolve_input_device("webcam")
    with pytest.raises(AudioInputError, match="device 1 does not exist"):
        resolve_input_device("1")  # an output-only device


async def test_capture_opens_the_resolved_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice(DEVICES, -1))
    factory = FakeFactory()
    cap = MicrophoneCapture(Received(), device="", block_ms=20, max_pending_blocks=10,
                            stream_factory=factory)
    cap.start()
    cap.stop()
    # No system default: the first input device, at its native rate.
    assert factory.opened[0][0].index == 0
    assert factory.opened[0][1:] == (44100, 2, 882)


async def test_no_input_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice(DEVICES[1:2], -1))
    assert list_input_devices() == []
    cap = MicrophoneCapture(Received(), device="", block_ms=20, max_pending_blocks=10)
    with pytest.raises(AudioInputError, match="no audio input device found"):
        cap.start()


class _NoPortAudio(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import sounddevice`` fail as it does without libportaudio."""

    def find_spec(self, name: str, path: Any = None, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name == "sounddevice":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        raise OSError("PortAudio library not found")


async def test_missing_portaudio_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoPortAudio(), *sys.meta_path])
    expected = r"PortAudio library not found: install it with `apt-get install libportaudio2`"
    with pytest.raises(AudioInputError, match=expected):
        list_input_devices()
    cap = MicrophoneCapture(Received(), device="", block_ms=20, max_pending_blocks=10)
    with pytest.raises(AudioInputError, match=expected):
        cap.start()


def test_importing_audio_modules_does_not_import_sounddevice() -> None:
    code = (
        "import sys, evoxtral_stream.audio.sources, evoxtral_stream.audio.microphone, "
        "evoxtral_stream.audio.vad; "
        "sys.exit('sounddevice' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


async def test_default_stream_factory_reports_open_failures() -> None:
    from evoxtral_stream.audio import microphone

    try:
        microphone._import_sounddevice()
    except AudioInputError as e:
        pytest.skip(str(e))
    # No device has index 9999: PortAudio refuses it, we explain it.
    bogus = InputDevice(9999, "Nowhere", 1, 16000.0, False)
    cap = MicrophoneCapture(Received(), device=bogus, block_ms=20, max_pending_blocks=4)
    with pytest.raises(AudioInputError, match="cannot open audio input device 'Nowhere'"):
        cap.start()
    assert not cap.running


# --- a device that is lost and comes back -------------------------------------------


class LiveFactory:
    """Opens :class:`LiveStream` s; the next ``fail_starts`` ones fail to start."""

    def __init__(self) -> None:
        self.streams: list[LiveStream] = []
        self.opened: list[tuple[InputDevice, int, int, int]] = []
        self.fail_starts = 0

    def __call__(self, device: InputDevice, samplerate: int, channels: int, blocksize: int,
                 callback: Callable[..., None]) -> LiveStream:
        self.opened.append((device, samplerate, channels, blocksize))
        fail, self.fail_starts = self.fail_starts > 0, max(0, self.fail_starts - 1)
        stream = LiveStream(tone(rate=samplerate), samplerate, channels, blocksize, callback,
                            fail_start=fail)
        self.streams.append(stream)
        return stream


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_a_lost_device_is_reported_closed_and_reopened_when_plugged_back(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    usb = {"index": 2, "name": "USB Headset Mic", "max_input_channels": 1,
           "default_samplerate": 48000.0}
    listed: list[dict[str, Any]] = [DEVICES[0], usb]
    sd = fake_sounddevice(listed, 0)
    sd.query_devices = lambda: list(listed)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    refreshes: list[float] = []
    stalls: list[str] = []
    resumes: list[str] = []
    got = Received()
    factory = LiveFactory()
    cap = MicrophoneCapture(
        got, device="headset", block_ms=20, max_pending_blocks=100, stream_factory=factory,
        stall_timeout_s=0.3, reopen_interval_s=0.1, on_stall=stalls.append,
        on_resume=resumes.append, refresh_devices=lambda: refreshes.append(time.monotonic()))
    caplog.set_level(logging.INFO, logger="evoxtral_stream.audio.microphone")
    cap.start()
    first = factory.streams[0]
    await until(lambda: cap.samples_delivered >= SAMPLE_RATE // 2, "audio")
    assert stalls == [] and not cap.lost

    # Unplugged: the device stops calling back and leaves the device list.
    listed.remove(usb)
    first.unplug()
    await until(lambda: stalls != [], "the stall report")
    assert "'USB Headset Mic' delivered no audio for" in stalls[0]
    assert cap.lost and cap.running and cap.stalls == 1
    await until(lambda: "close" in first.calls, "the lost stream closed")
    # Every frame the device delivered reached on_audio, the resampler's tail too.
    assert abs(cap.samples_delivered - first.frames * SAMPLE_RATE // 48000) <= 2
    # While it is away, each try refreshes the device list and finds nothing.
    await until(lambda: len(refreshes) >= 3, "reopen attempts")
    assert resumes == [] and len(factory.streams) == 1
    gaps = np.diff(refreshes)
    assert all(g >= 0.09 for g in gaps)
    assert caplog.text.count("audio input not back yet") == 1  # warned once, not per try

    # Plugged back in under a new index and rate; its first start fails.
    factory.fail_starts = 1
    listed.append({**usb, "index": 7, "default_samplerate": 44100.0})
    await until(lambda: resumes != [], "the resume report")
    assert "'USB Headset Mic' is back after" in resumes[0]
    assert len(factory.streams) == 3 and factory.streams[1].calls == ["start", "close"]
    assert factory.opened[-1][0].index == 7 and factory.opened[-1][1] == 44100
    assert not cap.lost and cap.reopens == 1 and cap.samplerate == 44100
    before = cap.samples_delivered
    await until(lambda: cap.samples_delivered >= before + SAMPLE_RATE // 2, "audio again")
    mid = got.audio[-SAMPLE_RATE // 4:]
    assert dominant_frequency(mid, SAMPLE_RATE) == pytest.approx(440, abs=2.0)

    cap.stop()
    assert not cap.running
    assert factory.streams[2].calls == ["start", "stop", "close"]
    await asyncio.sleep(0.5)  # the watchdog is gone: nothing is reported any more
    assert len(stalls) == 1 and len(factory.streams) == 3


async def test_a_held_up_loop_is_not_taken_for_a_lost_device() -> None:
    # The callback thread counts blocks even while the loop cannot run.
    stalls: list[str] = []
    factory = LiveFactory()
    cap = MicrophoneCapture(Received(), device=fake_device(), block_ms=20,
                            max_pending_blocks=1000, stream_factory=factory,
                            stall_timeout_s=0.3, reopen_interval_s=0.1,
                            on_stall=stalls.append)
    cap.start()
    await asyncio.sleep(0.1)
    time.sleep(0.8)  # noqa: ASYNC251  the loop is held up for longer than the stall timeout
    await asyncio.sleep(0.5)
    assert stalls == [] and cap.stalls == 0 and len(factory.streams) == 1
    cap.stop()


async def test_the_stall_check_can_be_turned_off() -> None:
    stalls: list[str] = []
    factory = LiveFactory()
    cap = MicrophoneCapture(Received(), device=fake_device(), block_ms=20,
                            max_pending_blocks=100, stream_factory=factory,
                            stall_timeout_s=0.0, on_stall=stalls.append)
    cap.start()
    factory.streams[0].unplug()
    await asyncio.sleep(0.8)
    assert stalls == [] and not cap.lost and len(factory.streams) == 1
    cap.stop()


async def test_a_stall_timeout_shorter_than_five_blocks_is_refused() -> None:
    # A device calling back every 200 ms, checked for 0.1 s of silence, was
    # taken for lost between every two blocks: 16 stalls in 2 s, each a cut
    # segment and a reopened stream.
    with pytest.raises(ValueError, match=r"at least 5 blocks \(1 s\), got 0.1"):
        MicrophoneCapture(Received(), device=fake_device(), block_ms=200,
                          max_pending_blocks=100, stream_factory=LiveFactory(),
                          stall_timeout_s=0.1)
    stalls: list[str] = []
    factory = LiveFactory()
    cap = MicrophoneCapture(Received(), device=fake_device(), block_ms=200,
                            max_pending_blocks=100, stream_factory=factory,
                            stall_timeout_s=1.0, on_stall=stalls.append)
    cap.start()
    await asyncio.sleep(1.5)
    cap.stop()
    assert stalls == [] and len(factory.streams) == 1 and cap.blocks_seen >= 5


async def test_a_failing_status_callback_does_not_stop_the_reopening(
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(message: str) -> None:
        raise RuntimeError("listener bug")

    resumes: list[str] = []
    factory = LiveFactory()
    cap = MicrophoneCapture(Received(), device=fake_device(), block_ms=20,
                            max_pending_blocks=100, stream_factory=factory,
                            stall_timeout_s=0.3, reopen_interval_s=0.1, on_stall=broken,
                            on_resume=resumes.append)
    cap.start()
    factory.streams[0].unplug()
    await until(lambda: resumes != [], "the resume report")
    assert "an audio input status callback failed" in caplog.text
    assert cap.stalls == cap.reopens == 1
    cap.stop()


async def test_a_lost_stream_that_cannot_get_a_close_thread_still_reopens(
        caplog: pytest.LogCaptureFixture) -> None:
    """At the process's thread limit the lost stream's close (on a thread of
    its own, as PortAudio may hang in it) cannot start: the watchdog says so
    and goes on looking for the device, which comes back, instead of dying
    with the RuntimeError and leaving the input lost for good."""
    resumes: list[str] = []
    factory = LiveFactory()
    cap = MicrophoneCapture(Received(), device=fake_device(), block_ms=20,
                            max_pending_blocks=100, stream_factory=factory,
                            stall_timeout_s=0.3, reopen_interval_s=0.1,
                            on_resume=resumes.append)
    cap.start()
    with threads_refused("audio-close") as refused:
        factory.streams[0].unplug()
        await until(lambda: resumes != [], "the resume report")
    assert refused == ["audio-close"]
    assert "cannot close the lost audio input" in caplog.text
    assert cap.stalls == cap.reopens == 1 and not cap.lost
    before = cap.samples_delivered
    await until(lambda: cap.samples_delivered > before, "audio again")
    cap.stop()


@pytest.mark.parametrize("when", ["refreshing", "between tries"])
async def test_stop_while_a_lost_device_is_looked_for_opens_and_delivers_nothing_after(
        when: str) -> None:
    """stop() comes while the reopen loop's device refresh is blocked in its
    thread (or while it waits for its next try): it returns at once, and
    once the refresh returns nothing is opened and nothing is delivered."""
    refreshing, release = threading.Event(), threading.Event()
    refreshes: list[float] = []

    def refresh() -> None:
        refreshes.append(time.monotonic())
        refreshing.set()
        if when == "between tries":
            raise AudioInputError("not back yet")
        assert release.wait(10)

    got = Received()
    factory = LiveFactory()
    cap = MicrophoneCapture(got, device=fake_device(), block_ms=20, max_pending_blocks=100,
                            stream_factory=factory, stall_timeout_s=0.3,
                            reopen_interval_s=0.3, refresh_devices=refresh)
    cap.start()
    await until(lambda: cap.samples_delivered > 0, "audio")
    factory.streams[0].unplug()
    assert await asyncio.to_thread(refreshing.wait, 10)
    await asyncio.sleep(0.05)  # between tries: into the wait for the next one
    t0 = time.monotonic()
    cap.stop()
    assert time.monotonic() - t0 < 1.0
    stopped_at, delivered = time.monotonic(), cap.samples_delivered
    release.set()
    await asyncio.sleep(1.0)  # a reopen would come now, and tries after it
    assert not cap.running and cap.reopens == 0
    assert len(factory.streams) == 1 and factory.streams[0].calls == ["start", "close"]
    assert cap.samples_delivered == delivered == len(got.audio)
    assert not [t for t in refreshes if t > stopped_at]
