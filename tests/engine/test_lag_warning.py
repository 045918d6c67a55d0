"""The model-lag warning: true for live (paced) streams, silent for files
transcribed as fast as the model allows.

Real speech (espeak-ng), the real engine, worker, segmenter and merger; a
scripted backend with a fixed delay per call stands in for a model slower
than the streams need (the real one cannot be made slow on demand).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.run import FileJob, transcribe_samples
from tests.fakes import ScriptedBackend, words_so_far
from tests.speech import have_espeak, speech_with_pauses

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")

_WORKER_LOG = "evoxtral_stream.engine.worker"


def _behind(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == _WORKER_LOG and "behind" in r.getMessage()]


async def test_a_file_fed_faster_than_it_plays_is_not_reported_behind(
        caplog: pytest.LogCaptureFixture) -> None:
    """transcribe --no-partials without --realtime queues every final of
    each file at once; each waits its turn by design. That used to be logged
    as the model being seconds "behind" (and "partials are thinned first",
    with no partials at all), more so the longer the files."""
    cfg = load_config(env={}, overrides={"stream.partial_interval_ms": 0,
                                         "worker.max_batch": 1})
    audio, _ = speech_with_pauses(["The committee met on Tuesday.",
                                   "Several members raised concerns.",
                                   "The chair promised a full report."], 0.8)
    backend = ScriptedBackend(words_so_far, delay_s=0.3)
    with caplog.at_level(logging.WARNING, logger=_WORKER_LOG):
        async with Engine(cfg, backend) as engine:
            summaries = await transcribe_samples(
                cfg, engine, [FileJob(f"f{i}", audio) for i in range(3)], realtime=False)
            lag = engine.stats().worker.max_lag_s
    assert sum(s.finals for s in summaries) >= 9
    # The case under test did happen: the last final waited behind 8 others.
    assert len(backend.batches) >= 9
    assert _behind(caplog) == [], caplog.text
    assert lag == 0.0


async def test_a_live_stream_the_model_cannot_keep_up_with_is_reported_behind(
        caplog: pytest.LogCaptureFixture) -> None:
    """The guard of the test above: live streams (paced, as serve's sources
    are) whose finals wait over a second for a slow model are still logged
    as the model being behind, with the wait."""
    cfg = load_config(env={}, overrides={"stream.partial_interval_ms": 0,
                                         "worker.max_batch": 1})
    audio, _ = speech_with_pauses(["The committee met on Tuesday."], 1.0)
    audio = np.concatenate([audio, np.zeros(8000, np.int16)])
    backend = ScriptedBackend(words_so_far, delay_s=0.8)
    with caplog.at_level(logging.WARNING, logger=_WORKER_LOG):
        async with Engine(cfg, backend) as engine:
            await transcribe_samples(
                cfg, engine, [FileJob(f"live{i}", audio) for i in range(3)], realtime=True)
            lag = engine.stats().worker.max_lag_s
    behind = _behind(caplog)
    assert behind, caplog.text
    assert "partials are thinned" not in behind[0], "there are no partials to thin"
    assert lag >= 1.0
