"""Conversions, downmixing and polyphase resampling."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import soxr

from evoxtral_stream.audio.resample import (
    StreamResampler,
    float_to_int16,
    int16_to_float32,
    resample,
    to_mono,
)
from evoxtral_stream.events import SAMPLE_RATE
from tests.helpers.audio import dominant_frequency, rms, sine


def test_to_mono_averages_channels() -> None:
    x = np.array([[0.2, 0.4], [-1.0, 1.0], [0.5, 0.5]], dtype=np.float32)
    out = to_mono(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.3, 0.0, 0.5], atol=1e-7)
    ints = np.array([[32767, 32767], [-32768, -32767], [1, 2]], dtype=np.int16)
    # Averaged in float: no int16 overflow; halves round to even.
    np.testing.assert_array_equal(to_mono(ints), np.array([32767, -32768, 2], dtype=np.int16))
    mono = np.arange(5, dtype=np.int16)
    assert to_mono(mono) is mono
    np.testing.assert_array_equal(to_mono(mono[:, None]), mono)
    with pytest.raises(ValueError, match="shape"):
        to_mono(np.zeros((2, 2, 2), np.float32))


def test_float_int16_conversions_scale_and_clip() -> None:
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, np.nan, 1 / 32768], dtype=np.float32)
    np.testing.assert_array_equal(
        float_to_int16(x), [0, 16384, -16384, 32767, -32768, 32767, -32768, 0, 1]
    )
    allints = np.arange(-32768, 32768, dtype=np.int16)
    f = int16_to_float32(allints)
    assert f.dtype == np.float32
    assert f.min() == -1.0
    assert f.max() < 1.0
    assert f[32768 + 16384] == 0.5
    np.testing.assert_array_equal(float_to_int16(f), allints)  # lossless round trip


def test_infinite_samples_saturate_without_a_warning() -> None:
    """A float WAV holding inf (a broken mixer's export) saturates like 2.0.
    Scaling inf (or 1e308) overflowed first: a RuntimeWarning with a code
    line on stderr in the middle of transcribe's output."""
    x = np.array([np.inf, -np.inf, 1e308, -1e308, np.nan, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(float_to_int16(x), [32767, -32768, 32767, -32768, 0, 16384])


def test_infinite_and_huge_channels_downmix_without_a_warning() -> None:
    """A multi-channel float WAV with +inf in one channel and -inf in another
    at the same frame, or huge values whose sum overflows float32: the
    downmix warned ("RuntimeWarning: invalid value encountered in reduce",
    with a numpy code line) on stderr in the middle of transcribe's output.
    Such a frame is as bad as its samples: NaN, inf, then 0 or saturated."""
    x = np.array([[np.inf, -np.inf], [3e38, 3e38], [-3e38, -3e38], [np.nan, 0.5],
                  [0.25, 0.75]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mono = to_mono(x)
        out = StreamResampler(48000, 48000, 2).process(x)
        resampled = StreamResampler(48000, SAMPLE_RATE, 2).process(np.repeat(x, 400, axis=0))
    assert np.isnan(mono[0]) and np.isnan(mono[3])
    assert mono[1] == np.inf and mono[2] == -np.inf and mono[4] == 0.5
    np.testing.assert_array_equal(out, [0, 32767, -32768, 0, 16384])
    assert resampled.dtype == np.int16


@pytest.mark.parametrize("rate", [8000, 11025, SAMPLE_RATE, 22050, 44100, 48000, 96000])
def test_one_bad_float_sample_is_one_clipped_sample_not_a_hole(rate: int) -> None:
    """A NaN or infinite sample (a broken driver's, a float WAV's) is one
    sample of 0 or of full scale, as at 16 kHz where no filter runs: it
    reached soxr's filter, whose every output within its reach was then
    NaN, so 30 to 100 ms of audio around it came out as silence. Any value
    past full scale is clipped before the filter, as after it."""
    x = sine(440, 1.0, rate, amp=0.5).astype(np.float32)
    at = rate // 2
    for bad, same_as in ((np.nan, 0.0), (np.inf, 1.0), (-np.inf, -1.0), (1e30, 1.0),
                         (-3.0, -1.0)):
        outs = []
        for value in (bad, same_as):
            y = x.copy()
            y[at] = value
            r = StreamResampler(rate)
            block = rate // 50
            parts = [r.process(y[i : i + block]) for i in range(0, len(y), block)]
            outs.append(np.concatenate([*parts, r.flush()]))
        np.testing.assert_array_equal(outs[0], outs[1], err_msg=f"{bad} at {rate} Hz")


@pytest.mark.parametrize("rate", [44100, 48000])
def test_stream_resampler_keeps_frequency_and_amplitude(rate: int) -> None:
    seconds = 2.0
    left = sine(1000, seconds, rate, amp=0.5)
    right = sine(1000, seconds, rate, amp=0.3)
    stereo = np.stack((left, right), axis=1).astype(np.float32)
    r = StreamResampler(rate, channels=2)
    block = rate // 50  # 20 ms, as the microphone delivers
    parts = [r.process(stereo[i : i + block]) for i in range(0, len(stereo), block)]
    parts.append(r.flush())
    out = np.concatenate(parts)
    assert out.dtype == np.int16
    assert abs(len(out) - seconds * SAMPLE_RATE) <= 2
    mid = out[SAMPLE_RATE // 4 : -SAMPLE_RATE // 4]  # away from filter edges
    assert dominant_frequency(mid, SAMPLE_RATE) == pytest.approx(1000, abs=0.5)
    # Mono is the channel average (amplitude 0.4), sine RMS = amp / sqrt 2.
    assert rms(mid) / 32768 == pytest.approx(0.4 / np.sqrt(2), rel=0.01)


def test_stream_resampler_filters_instead_of_dropping_samples() -> None:
    # 10 kHz is above the new Nyquist (8 kHz). Dropping samples would fold it to
    # 6 kHz at full level; a real resampler's low-pass removes it.
    x = sine(10_000, 1.0, 48000, amp=0.5).astype(np.float32)
    r = StreamResampler(48000)
    out = np.concatenate((r.process(x), r.flush()))
    assert rms(out[1000:-1000]) < 0.005 * rms(x * 32768)
    # And 7 kHz, below it, passes.
    y = sine(7000, 1.0, 48000, amp=0.5).astype(np.float32)
    out = np.concatenate((r.process(y), r.flush()))
    assert rms(out[1000:-1000]) == pytest.approx(rms(y * 32768), rel=0.02)


def test_stream_output_does_not_depend_on_block_sizes() -> None:
    x = (sine(440, 1.0, 44100, amp=0.4) + sine(3000, 1.0, 44100, amp=0.2)).astype(np.float32)
    whole = float_to_int16(soxr.resample(x, 44100, SAMPLE_RATE))
    for sizes in ([1, 7, 1000], [4410], [13, 2205, 3]):
        r = StreamResampler(44100)
        parts, pos, i = [], 0, 0
        while pos < len(x):
            n = sizes[i % len(sizes)]
            parts.append(r.process(x[pos : pos + n]))
            pos, i = pos + n, i + 1
        parts.append(r.flush())
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_stream_resampler_accepts_int16_and_can_be_reused_after_flush() -> None:
    x = float_to_int16(sine(440, 0.5, 22050, amp=0.5))
    r = StreamResampler(22050)
    first = np.concatenate((r.process(x), r.flush()))
    second = np.concatenate((r.process(x), r.flush()))
    np.testing.assert_array_equal(first, second)
    assert abs(len(first) - SAMPLE_RATE // 2) <= 1


def test_stream_resampler_passthrough_at_16k() -> None:
    r = StreamResampler(SAMPLE_RATE, channels=2)
    assert r.passthrough
    ints = np.array([[100, 300], [-5, -7]], dtype=np.int16)
    np.testing.assert_array_equal(r.process(ints), [200, -6])
    floats = np.array([[0.5, 0.5], [-1.0, -1.0]], dtype=np.float32)
    np.testing.assert_array_equal(r.process(floats), [16384, -32768])
    assert len(r.flush()) == 0
    with pytest.raises(ValueError, match="channels"):
        r.process(np.zeros((4, 3), np.float32))


def test_resample_whole_arrays() -> None:
    x = float_to_int16(sine(440, 1.0, 8000, amp=0.5))
    y = resample(x, 8000, SAMPLE_RATE)
    assert y.dtype == np.int16
    assert len(y) == 2 * len(x)
    assert dominant_frequency(y, SAMPLE_RATE) == pytest.approx(440, abs=0.5)
    assert resample(x, 8000, 8000) is x
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0, SAMPLE_RATE)


@pytest.mark.parametrize(("rate", "channels"), [(16000, 1), (44100, 2), (48000, 1),
                                                (22050, 1), (192000, 2), (37123, 1)])
def test_a_gap_keeps_the_output_counting_every_input_frame(rate: int, channels: int) -> None:
    """Blocks and gaps of any length: after each gap, the output (audio,
    filter tails and the silence owed) is exactly the input's time so far."""
    rng = np.random.default_rng(rate)
    r = StreamResampler(rate, channels=channels)
    frames = out = 0
    for _ in range(40):
        n = int(rng.integers(0, rate // 5))
        block = rng.normal(0, 0.1, (n, channels)).astype(np.float32)
        out += len(r.process(block))
        frames += n
        lost = int(rng.integers(0, rate // 3))
        tail, silence = r.gap(lost)
        out += len(tail) + silence
        frames += lost
        if lost:
            assert out == round(frames * SAMPLE_RATE / rate)
    assert r.silence > 0
    tail, silence = r.gap(0)
    assert (len(tail), silence) == (0, 0)
    with pytest.raises(ValueError, match="0 frames or more"):
        r.gap(-1)
