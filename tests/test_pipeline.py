"""The whole pipeline on real speech with the embedded model."""

from __future__ import annotations

import itertools

import pytest

from evoxtral_stream.audio.sources import read_audio_file
from evoxtral_stream.config import load_config
from evoxtral_stream.data import sample_path, sample_text
from evoxtral_stream.engine.backends.base import Backend
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import CaptionEvent, StreamEnded
from evoxtral_stream.run import FileJob, LatencyLog, final_text, transcribe_samples
from tests.speech import have_espeak, speak
from tests.text_norm import loose_wer

SAMPLE_TEXT = sample_text()


def check_captions(captions: list[CaptionEvent]) -> None:
    seqs = [c.seq for c in captions]
    assert seqs == sorted(set(seqs)), "seq strictly increases"
    for seg in {c.segment for c in captions}:
        mine = [c for c in captions if c.segment == seg]
        assert mine[-1].final
        assert sum(c.final for c in mine) == 1
        # Across partials stable text only grows; the final is the decode of
        # the whole segment and may correct it (stream.final_replaces_stable).
        stables = [c.stable for c in mine if not c.final]
        for a, b in itertools.pairwise(stables):
            assert b.startswith(a), "stable text only grows"


async def test_bundled_sample_through_the_pipeline(whisper_backend: Backend) -> None:
    cfg = load_config()
    record = LatencyLog()
    async with Engine(cfg, whisper_backend) as engine:
        engine.add_listener(record)
        (summary,) = await transcribe_samples(
            cfg, engine, [FileJob("sample", read_audio_file(sample_path()))], realtime=False)
    captions = record.captions("sample")
    check_captions(captions)
    finals = [c for c in captions if c.final]
    assert len(finals) == 5 == summary.finals  # five sentences, five pauses
    for seg in range(5):
        kinds = [c.final for c in captions if c.segment == seg]
        assert kinds[0] is False, f"segment {seg}: a partial arrives before the final"
    wer = loose_wer(SAMPLE_TEXT, final_text(captions))
    assert wer <= 0.15, f"WER {wer:.2f}: {final_text(captions)!r}"
    assert isinstance(record.events[-1], StreamEnded)


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
async def test_concurrent_streams_share_the_worker(whisper_backend: Backend) -> None:
    cfg = load_config()
    texts = {"a": "I was thinking maybe we could try that new restaurant downtown.",
             "b": "Please remember to turn off your phone before the show."}
    record = LatencyLog()
    async with Engine(cfg, whisper_backend) as engine:
        engine.add_listener(record)
        jobs = [FileJob(k, speak(v)) for k, v in texts.items()]
        await transcribe_samples(cfg, engine, jobs, realtime=False)
    for name, text in texts.items():
        check_captions(record.captions(name))
        assert loose_wer(text, final_text(record.captions(name))) <= 0.25
