"""Real speech for tests, synthesised with espeak-ng (voice ``en``)."""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from evoxtral_stream.audio.resample import resample
from evoxtral_stream.events import SAMPLE_RATE, Int16Array
from tests.helpers.audio import HAVE_ESPEAK, espeak_wav, voiced_span

__all__ = ["clipped_speech", "have_espeak", "speak", "speech_with_pauses"]

_CACHE = Path(tempfile.gettempdir()) / "evoxtral-test-speech"


def have_espeak() -> bool:
    return HAVE_ESPEAK


@functools.lru_cache(maxsize=64)
def speak(text: str, wpm: int = 150) -> Int16Array:
    """``text`` spoken by espeak-ng, as 16 kHz mono int16 (cached on disk)."""
    _CACHE.mkdir(exist_ok=True)
    key = hashlib.sha1(f"{wpm}:{text}".encode()).hexdigest()[:16]
    path = _CACHE / f"{key}.wav"
    if not path.exists():
        # Test processes (pytest -n) share the cache: each writes its own file.
        tmp = espeak_wav(text, path.with_suffix(f".{os.getpid()}.tmp.wav"), wpm=wpm)
        tmp.replace(path)
    data, rate = sf.read(path, dtype="int16")
    out: Int16Array = resample(np.asarray(data, dtype=np.int16), int(rate), SAMPLE_RATE)
    return out


def speech_with_pauses(sentences: list[str], pause_s: float, lead_s: float = 0.5
                       ) -> tuple[Int16Array, list[tuple[int, int]]]:
    """Sentences separated by silence; returns audio and each sentence's span."""
    gap = np.zeros(int(pause_s * SAMPLE_RATE), np.int16)
    parts: list[Int16Array] = [np.zeros(int(lead_s * SAMPLE_RATE), np.int16)]
    spans: list[tuple[int, int]] = []
    pos = len(parts[0])
    for s in sentences:
        audio = speak(s)
        spans.append((pos, pos + len(audio)))
        parts += [audio, gap]
        pos += len(audio) + len(gap)
    return np.concatenate(parts), spans


def clipped_speech(text: str, speech_ms: int, lead_s: float = 0.5) -> Int16Array:
    """``lead_s`` of silence, then ``text`` spoken and cut ``speech_ms`` after
    its first audible sample: a word clipped short (push-to-talk released
    early), to stay under ``vad.min_speech_ms``."""
    audio = speak(text)
    onset, _ = voiced_span(audio)
    lead = np.zeros(int(lead_s * SAMPLE_RATE), np.int16)
    return np.concatenate((lead, audio[: onset + speech_ms * SAMPLE_RATE // 1000]))
