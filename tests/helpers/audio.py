"""Test audio: signal generators, espeak-ng speech, and a checker that turns a
segmenter's event stream into segments while asserting its grammar."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soxr

from evoxtral_stream.events import (
    SAMPLE_RATE,
    Int16Array,
    SegmentEvent,
    SpeechAudio,
    SpeechEnded,
    SpeechStarted,
)

__all__ = [
    "HAVE_ESPEAK",
    "HAVE_SOX",
    "Segment",
    "buzz",
    "collect_segments",
    "dominant_frequency",
    "espeak_wav",
    "frame_energies",
    "noise",
    "norm",
    "resample_to_16k",
    "rms",
    "sine",
    "sox_synth",
    "spans",
    "to_int16",
    "voiced_span",
]

Float64Array = npt.NDArray[np.float64]

HAVE_ESPEAK = shutil.which("espeak-ng") is not None
HAVE_SOX = shutil.which("sox") is not None


# --- generators (float64 in [-1, 1]) -----------------------------------------


def sine(freq: float, seconds: float, rate: int = SAMPLE_RATE, amp: float = 0.5) -> Float64Array:
    t = np.arange(round(seconds * rate)) / rate
    out: Float64Array = amp * np.sin(2 * np.pi * freq * t)
    return out


def buzz(seconds: float, rate: int = SAMPLE_RATE, f0: float = 130.0, amp: float = 0.3
         ) -> Float64Array:
    """A harmonic-rich tone (sawtooth-like): webrtcvad calls it voiced."""
    t = np.arange(round(seconds * rate)) / rate
    b = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 30) if f0 * k < rate / 2)
    b = np.asarray(b, dtype=np.float64)
    out: Float64Array = b / np.max(np.abs(b)) * amp
    return out


def noise(seconds: float, level: float = 0.002, seed: int = 0, rate: int = SAMPLE_RATE
          ) -> Float64Array:
    """Gaussian noise (std ``level``): a quiet room floor webrtcvad calls unvoiced."""
    out: Float64Array = np.random.default_rng(seed).normal(0.0, level, round(seconds * rate))
    return out


def to_int16(x: Float64Array) -> Int16Array:
    return np.clip(np.rint(x * 32767), -32768, 32767).astype(np.int16)


# --- measurements -------------------------------------------------------------


def rms(x: npt.NDArray[np.generic]) -> float:
    f = np.asarray(x, dtype=np.float64)
    return float(np.sqrt(np.mean(f * f))) if len(f) else 0.0


def dominant_frequency(x: npt.NDArray[np.generic], rate: int) -> float:
    """Frequency (Hz) of the largest FFT bin, Hann-windowed, parabola-refined."""
    f = np.asarray(x, dtype=np.float64)
    spec = np.abs(np.fft.rfft(f * np.hanning(len(f))))
    k = int(np.argmax(spec[1:-1])) + 1
    a, b, c = np.log(spec[k - 1 : k + 2] + 1e-12)
    shift = 0.5 * (a - c) / (a - 2 * b + c)
    return float((k + shift) * rate / len(f))


def frame_energies(x: Int16Array, frame: int) -> Float64Array:
    """Mean-square energy of each whole ``frame``-sample frame from sample 0."""
    n = len(x) // frame
    f = x[: n * frame].astype(np.float64).reshape(n, frame)
    out: Float64Array = np.mean(f * f, axis=1)
    return out


def voiced_span(x: Int16Array, threshold: int = 300) -> tuple[int, int]:
    """First and one-past-last sample above ``threshold``: where speech is."""
    idx = np.nonzero(np.abs(x.astype(np.int32)) > threshold)[0]
    assert len(idx), "no audio above the threshold"
    return int(idx[0]), int(idx[-1]) + 1


# --- speech ----------------------------------------------------------------------


def espeak_wav(text: str, out: Path, *, wpm: int = 150, word_gap: int | None = None) -> Path:
    """Write ``text`` spoken by espeak-ng (voice en, 22.05 kHz) to ``out``."""
    cmd = ["espeak-ng", "-v", "en", "-s", str(wpm), "-w", str(out)]
    if word_gap is not None:
        cmd += ["-g", str(word_gap)]
    subprocess.run([*cmd, text], check=True, capture_output=True)
    return out


def sox_synth(effects: str, pad_s: float = 0.3) -> Int16Array:
    """16 kHz mono int16 made by ``sox -n ... <effects>`` (``synth 1
    pinknoise vol 0.3``, say), with ``pad_s`` of silence either side as a
    VAD segment has; repeatable (``sox -R``: the same noise every run)."""
    cmd = ["sox", "-R", "-n", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-e", "signed",
           "-t", "raw", "-", *effects.split(), "pad", str(pad_s), str(pad_s)]
    raw = subprocess.run(cmd, check=True, capture_output=True).stdout
    return np.frombuffer(raw, "<i2").astype(np.int16)


def resample_to_16k(x: Float64Array, rate: int) -> Float64Array:
    out: Float64Array = soxr.resample(x, rate, SAMPLE_RATE)
    return out


# --- event checking ---------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    forced: bool
    audio: Int16Array

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE


def collect_segments(events: Iterable[SegmentEvent], source: Int16Array | None = None
                     ) -> list[Segment]:
    """Assert the event grammar and return the segments.

    Grammar: ``SpeechStarted(s)``, ``SpeechAudio``s contiguous from ``s``,
    ``SpeechEnded(e)``. A natural end has delivered exactly ``[s, e)``; a
    forced one may have delivered past ``e``, and the next segment must start
    at ``e`` and re-deliver that audio first. Segments must not overlap. With
    ``source``, each segment's audio must equal ``source[s:e]``.
    """
    segments: list[Segment] = []
    start: int | None = None
    parts: list[Int16Array] = []
    delivered = 0
    redeliver: Int16Array | None = None
    for ev in events:
        if isinstance(ev, SpeechStarted):
            assert start is None, f"{ev} while a segment is open"
            if segments:
                assert ev.sample >= segments[-1].end, f"{ev} overlaps {segments[-1]}"
            start, parts, delivered = ev.sample, [], ev.sample
            if redeliver is not None:
                assert segments[-1].forced
                assert ev.sample == segments[-1].end
        elif isinstance(ev, SpeechAudio):
            assert start is not None, f"audio at {ev.start_sample} outside a segment"
            assert ev.start_sample == delivered, (
                f"audio not contiguous: expected {delivered}, got {ev.start_sample}"
            )
            assert ev.samples.dtype == np.int16
            assert len(ev.samples) > 0
            if redeliver is not None:
                assert np.array_equal(ev.samples, redeliver), "forced cut re-delivered other audio"
                redeliver = None
            parts.append(ev.samples)
            delivered = ev.end_sample
        else:
            assert isinstance(ev, SpeechEnded)
            assert start is not None, f"{ev} without a segment"
            assert redeliver is None, "the re-delivery after a forced cut is missing"
            assert start < ev.sample <= delivered, (start, ev.sample, delivered)
            if not ev.forced:
                assert ev.sample == delivered, "natural end must match the audio delivered"
            audio = np.concatenate(parts)
            seg = Segment(start, ev.sample, ev.forced, audio[: ev.sample - start])
            if ev.forced and delivered > ev.sample:
                redeliver = audio[ev.sample - start :]
            if source is not None:
                assert np.array_equal(seg.audio, source[seg.start : seg.end])
            segments.append(seg)
            start = None
    assert redeliver is None, "the re-delivery after a forced cut is missing"
    return segments


def norm(events: Sequence[SegmentEvent]) -> list[tuple[object, ...]]:
    """Events as comparable tuples (``SpeechAudio`` by its bytes): two event
    streams are the same iff their ``norm`` are equal."""
    out: list[tuple[object, ...]] = []
    for e in events:
        if isinstance(e, SpeechAudio):
            out.append(("audio", e.start_sample, e.samples.tobytes()))
        elif isinstance(e, SpeechStarted):
            out.append(("start", e.sample))
        else:
            out.append(("end", e.sample, e.forced))
    return out


def spans(segments: Sequence[Segment]) -> list[tuple[int, int]]:
    return [(s.start, s.end) for s in segments]
