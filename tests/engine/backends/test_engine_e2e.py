"""The whole engine runs the bundled speech file through the Voxtral backend."""

from __future__ import annotations

import dataclasses
from importlib import resources

import pytest

from evoxtral_stream.audio.sources import read_audio_file
from evoxtral_stream.config import VoxtralConfig, load_config
from evoxtral_stream.engine.backends.base import Done, Job
from evoxtral_stream.engine.backends.voxtral.backend import VoxtralBackend, load_voxtral_backend
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.engine.worker import WorkerStats
from evoxtral_stream.events import CaptionEvent, StreamEnded
from evoxtral_stream.run import FileJob, LatencyLog, transcribe_samples


async def _run(backend: VoxtralBackend, batching: str, *, draft: bool = False,
               stats: list[WorkerStats] | None = None
               ) -> tuple[list[CaptionEvent], LatencyLog]:
    base = load_config()
    cfg = dataclasses.replace(base, worker=dataclasses.replace(base.worker, batching=batching),
                              stream=dataclasses.replace(base.stream, draft=draft))
    samples = read_audio_file(str(resources.files("evoxtral_stream").joinpath("data/sample.ogg")))
    record = LatencyLog()
    async with Engine(cfg, backend) as engine:
        engine.add_listener(record)
        (summary,) = await transcribe_samples(
            cfg, engine, [FileJob("sample", samples)], realtime=False
        )
        if stats is not None:
            stats.append(engine.stats().worker)
    captions = record.captions("sample")
    finals = [c for c in captions if c.final]
    assert summary.finals == len(finals) == 5  # five sentences in the sample
    assert any(not c.final for c in captions), "partials come before finals"
    assert isinstance(record.events[-1], StreamEnded)
    return finals, record


async def test_speech_file_through_the_engine_in_both_batching_modes(
    merged: VoxtralBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []
    admitted: list[int] = []
    real_batch, real_step, real_admit = merged.transcribe_jobs, merged.step, merged.admit

    def batch_path(jobs: list[Job]) -> list[Done]:
        done = real_batch(jobs)
        written.extend(d.text for d in done)
        return done

    def admit(jobs: list[Job]) -> list[Done]:
        admitted.append(len(jobs))
        done = real_admit(jobs)
        written.extend(d.text for d in done)
        return done

    def step() -> list[Done]:
        done = real_step()
        written.extend(d.text for d in done)
        return done

    monkeypatch.setattr(merged, "transcribe_jobs", batch_path)
    monkeypatch.setattr(merged, "admit", admit)
    monkeypatch.setattr(merged, "step", step)

    continuous, _ = await _run(merged, "continuous")
    assert admitted, "the continuous mode stepped the Voxtral backend"
    stepped = list(written)
    written.clear()
    batch, _ = await _run(merged, "batch")
    assert written, "the batch mode called the backend once per batch"
    # Greedy decoding gives the same finals whichever way requests are batched.
    assert [c.text for c in continuous] == [c.text for c in batch]
    # The random model's words are arbitrary, but every word of every final
    # comes from the backend (the merger may keep a partial's stable words).
    words = {w for t in stepped + written for w in t.split()}
    for c in continuous:
        assert c.text
        assert set(c.text.split()) <= words, c.text


@pytest.mark.parametrize("lookahead", [False, True], ids=["slots", "lookahead"])
async def test_slot_cache_gives_the_engine_the_same_finals(merged: VoxtralBackend,
                                                           lookahead: bool) -> None:
    from evoxtral_stream.engine.backends.voxtral.slots import SlotDecoder

    cfg = dataclasses.replace(merged._cfg, static_cache=True, lookahead=lookahead)
    slots = VoxtralBackend(merged.loaded, cfg)
    with_slots, _ = await _run(slots, "continuous")
    assert isinstance(slots._decoder, SlotDecoder)
    assert slots._decoder.lookahead is lookahead
    assert slots._decoder.columns > 0, "the engine stepped the slot decoder"
    dynamic, _ = await _run(merged, "continuous")
    assert [c.text for c in with_slots] == [c.text for c in dynamic]


async def test_drafts_from_partials_reach_the_backend_and_change_no_caption(
    merged: VoxtralBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    drafts: list[tuple[int, ...]] = []
    real_admit = merged.admit

    def admit(jobs: list[Job]) -> list[Done]:
        drafts.extend(j.draft for j in jobs)
        return real_admit(jobs)

    monkeypatch.setattr(merged, "admit", admit)
    plain, _ = await _run(merged, "continuous")
    assert not any(drafts)
    proposed = merged.draft_tokens
    seen: list[WorkerStats] = []
    drafted, _ = await _run(merged, "continuous", draft=True, stats=seen)
    (stats,) = seen
    # Every request after a segment's first partial carries that segment's
    # latest tokens; the random model's partials rarely agree with the next
    # decode, so few are kept, but none changes a caption.
    assert sum(1 for d in drafts if d) >= 5
    assert merged.draft_tokens > proposed
    assert [c.text for c in drafted] == [c.text for c in plain]
    # The worker's counters (and so /metrics) saw the same drafts.
    assert stats.draft_tokens == merged.draft_tokens - proposed
    assert stats.draft_kept <= stats.draft_tokens


async def test_compiled_encoder_layers_give_the_engine_the_same_finals(
    merged: VoxtralBackend, tiny_cfg: VoxtralConfig, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker compiles them on its model thread as it warms up, then serves."""
    import logging

    import torch

    from evoxtral_stream.engine.backends.voxtral import backend as backend_module
    from evoxtral_stream.engine.backends.voxtral.encoder import encoder_parts

    caplog.set_level(logging.INFO, logger="evoxtral_stream.engine.worker")
    monkeypatch.setitem(backend_module.ENCODER_COMPILE, "backend", "aot_eager")
    torch._dynamo.reset()
    try:
        compiled = load_voxtral_backend(dataclasses.replace(tiny_cfg, encoder_compile=True),
                                        "en")
        with_compiled, _ = await _run(compiled, "continuous")
    finally:
        torch._dynamo.reset()
    assert "encoder layers compiled in" in caplog.text
    layers = encoder_parts(compiled.model)[0].get_submodule("layers")
    assert all(layer._compiled_call_impl is not None for layer in layers.children())
    dynamic, _ = await _run(merged, "continuous")
    assert [c.text for c in with_compiled] == [c.text for c in dynamic]
