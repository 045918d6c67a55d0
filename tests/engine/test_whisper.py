"""The embedded Whisper backend: what it answers for empty audio."""

from __future__ import annotations

import numpy as np

from evoxtral_stream.engine.backends.base import Backend, Job
from evoxtral_stream.engine.backends.whisper import WhisperBackend


def test_empty_audio_gives_empty_text(whisper_backend: Backend) -> None:
    """As Voxtral does; padded to a window and decoded, tiny.en said "you"."""
    assert isinstance(whisper_backend, WhisperBackend)
    empty = np.zeros(0, np.float32)
    assert whisper_backend.transcribe([empty]) == [""]
    assert whisper_backend.transcribe([]) == []
    rng = np.random.default_rng(0)
    noise = (0.01 * rng.standard_normal(16000)).astype(np.float32)
    (alone,) = whisper_backend.transcribe_jobs([Job(1, noise)])
    jobs = [Job(0, empty), Job(1, noise), Job(2, empty, prefix="Hello")]
    done = whisper_backend.transcribe_jobs(jobs)
    assert [d.job for d in done] == jobs
    assert [(d.text, d.tokens, d.token_ids) for d in done] == [
        ("", 0, ()), (alone.text, alone.tokens, alone.token_ids), ("", 0, ())]
    assert whisper_backend.transcribe([empty, noise, empty]) == ["", alone.text, ""]

