"""The whole engine runs the bundled speech file through the Voxtral backend."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

import numpy as np
import numpy.typing as npt
import pytest

from evoxtral_stream.audio.sources import read_audio_file
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.backends.voxtral.backend import VoxtralBackend
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import StreamEnded
from evoxtral_stream.run import FileJob, LatencyLog, transcribe_samples


async def test_speech_file_through_the_engine(
    merged: VoxtralBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config()
    samples = read_audio_file(str(resources.files("evoxtral_stream").joinpath("data/sample.ogg")))
    written: list[str] = []
    calls: list[int] = []
    real = merged.transcribe

    def recording(batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        calls.append(len(batch))
        texts = real(batch)
        written.extend(texts)
        return texts

    monkeypatch.setattr(merged, "transcribe", recording)
    record = LatencyLog()
    async with Engine(cfg, merged) as engine:
        engine.add_listener(record)
        (summary,) = await transcribe_samples(
            cfg, engine, [FileJob("sample", samples)], realtime=False
        )
    captions = record.captions("sample")
    finals = [c for c in captions if c.final]
    assert summary.finals == len(finals) == 5  # five sentences in the sample
    assert any(not c.final for c in captions), "partials come before finals"
    assert isinstance(record.events[-1], StreamEnded)
    assert calls, "the engine decoded through the Voxtral backend"
    # The random model's words are arbitrary, but every word of every final
    # comes from the backend (the merger may keep a partial's stable words).
    words = {w for t in written for w in t.split()}
    for c in finals:
        assert c.text
        assert set(c.text.split()) <= words, c.text
