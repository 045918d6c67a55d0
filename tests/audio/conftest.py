"""Fixtures for the audio tests: the default VAD config and espeak-ng speech."""

from __future__ import annotations

import random
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf  # type: ignore[import-untyped,unused-ignore]

from evoxtral_stream.config import VadConfig
from evoxtral_stream.events import SAMPLE_RATE, Int16Array
from tests.helpers.audio import (
    HAVE_ESPEAK,
    espeak_wav,
    noise,
    resample_to_16k,
    to_int16,
    voiced_span,
)

needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")


@dataclass(frozen=True)
class Speech:
    """Speech audio (16 kHz int16, quiet noise floor added) and where each
    utterance's sound really is (first/last sample above a threshold)."""

    audio: Int16Array
    spans: list[tuple[int, int]]


@pytest.fixture(scope="session")
def vad_cfg() -> VadConfig:
    """The documented ``[vad]`` defaults from the packaged config.toml (read
    directly, so these tests don't depend on the other sections)."""
    text = resources.files("evoxtral_stream").joinpath("config.toml").read_text("utf-8")
    return VadConfig(**tomllib.loads(text)["vad"])


def _speech_16k(text: str, path: Path, **kw: int) -> Int16Array:
    espeak_wav(text, path, **kw)
    data, rate = sf.read(str(path), dtype="float64")
    return to_int16(resample_to_16k(np.asarray(data, dtype=np.float64), int(rate)))


@pytest.fixture(scope="session")
def two_sentences(tmp_path_factory: pytest.TempPathFactory) -> Speech:
    """1 s lead, sentence, 1.5 s of silence, sentence, 1 s tail."""
    if not HAVE_ESPEAK:
        pytest.skip("espeak-ng is not installed")
    d = tmp_path_factory.mktemp("speech")
    first = _speech_16k("The quick brown fox jumps over the lazy dog.", d / "a.wav")
    second = _speech_16k("Please call me back when you get home tonight.", d / "b.wav")
    # Trim espeak's own leading/trailing silence so the gap is exactly 1.5 s.
    parts: list[Int16Array] = []
    spans: list[tuple[int, int]] = []
    pos = SAMPLE_RATE
    parts.append(np.zeros(SAMPLE_RATE, np.int16))
    for i, s in enumerate((first, second)):
        on, off = voiced_span(s)
        s = s[on:off]
        spans.append((pos, pos + len(s)))
        parts.append(s)
        gap = int(1.5 * SAMPLE_RATE) if i == 0 else SAMPLE_RATE
        parts.append(np.zeros(gap, np.int16))
        pos += len(s) + gap
    clean = np.concatenate(parts)
    audio = to_int16(clean / 32767 + noise(len(clean) / SAMPLE_RATE, seed=7)[: len(clean)])
    return Speech(audio, spans)


@pytest.fixture(scope="session")
def long_utterance(tmp_path_factory: pytest.TempPathFactory) -> Speech:
    """About 45 s of speech without a pause long enough to end a segment."""
    if not HAVE_ESPEAK:
        pytest.skip("espeak-ng is not installed")
    words = [
        "the", "river", "carries", "water", "from", "distant", "mountains", "through",
        "quiet", "valleys", "where", "farmers", "grow", "wheat", "and", "barley", "under",
        "wide", "open", "skies", "while", "children", "play", "beside", "old", "stone",
        "bridges", "and", "birds", "sing", "from", "tall", "green", "trees",
    ]
    rng = random.Random(3)
    text = " ".join(rng.choice(words) for _ in range(122))
    s = _speech_16k(text, tmp_path_factory.mktemp("long") / "long.wav")
    on, off = voiced_span(s)
    s = s[on:off]
    lead = np.zeros(SAMPLE_RATE // 2, np.int16)
    clean = np.concatenate((lead, s, lead))
    audio = to_int16(clean / 32767 + noise(len(clean) / SAMPLE_RATE, seed=8)[: len(clean)])
    return Speech(audio, [(len(lead), len(lead) + len(s))])
