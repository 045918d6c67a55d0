"""The tiny checkpoint on CUDA: bfloat16 by default, features on the device."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from evoxtral_stream.config import VoxtralConfig
from evoxtral_stream.engine.backends.base import Done, Job
from evoxtral_stream.engine.backends.voxtral import voxtral_available
from evoxtral_stream.engine.backends.voxtral.backend import VoxtralBackend, load_voxtral_backend
from evoxtral_stream.engine.backends.voxtral.continuous import ContinuousDecoder

from .helpers import audio_batch, logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_defaults_to_bfloat16(tiny_cfg: VoxtralConfig, merged: VoxtralBackend) -> None:
    cfg = dataclasses.replace(tiny_cfg, device="auto", dtype="auto")
    ok, why = voxtral_available(cfg)
    assert ok, why
    gpu = load_voxtral_backend(cfg, "en")
    assert gpu.loaded.device.type == "cuda"
    assert gpu.loaded.dtype == torch.bfloat16
    batch = audio_batch([3.0, 31.0, 7.0], seed=11)
    feats = gpu.features(batch)
    assert feats.device.type == "cuda"
    assert float((feats.cpu() - merged.features(batch)).abs().max()) <= 1e-3
    texts = gpu.transcribe(batch)
    assert len(texts) == 3
    got = logits(gpu.model, gpu, batch)[:, -1]
    want = logits(merged.model, merged, batch)[:, -1]
    rel = float((got.cpu() - want).norm() / want.norm())
    assert rel < 0.05, rel


def test_cuda_float32_batched_equals_one_by_one(tiny_cfg: VoxtralConfig) -> None:
    gpu = load_voxtral_backend(dataclasses.replace(tiny_cfg, device="cuda"), "en")
    batch = audio_batch([3.0, 35.0, 1.0, 5.0], seed=12)
    together = gpu.generate_tokens(batch)
    assert together == [gpu.generate_tokens([a])[0] for a in batch]


def _staggered_equals_alone(gpu: VoxtralBackend, seed: int) -> None:
    """Continuous batching on ``gpu`` gives every job what it gets alone;
    the later jobs join a batch that already decoded a few steps."""
    batch = audio_batch([3.0, 35.0, 1.0, 5.0, 12.0], seed=seed)
    jobs = [Job(i, a) for i, a in enumerate(batch)]
    want = {job: gpu.transcribe_jobs([job])[0] for job in jobs}
    out: dict[Job, Done] = {}
    for group, steps in ((jobs[:2], 3), (jobs[2:], None)):
        out.update((d.job, d) for d in gpu.admit(group))
        n = 0
        while gpu.active and (steps is None or n < steps):
            out.update((d.job, d) for d in gpu.step())
            n += 1
    assert out == want


def test_cuda_float32_continuous_equals_transcribe_jobs(tiny_cfg: VoxtralConfig) -> None:
    gpu = load_voxtral_backend(dataclasses.replace(tiny_cfg, device="cuda"), "en")
    _staggered_equals_alone(gpu, seed=13)
    decoder = gpu.decoder
    assert isinstance(decoder, ContinuousDecoder)
    assert decoder.width == 0


def test_cuda_graph_slot_steps_equal_transcribe_jobs(tiny_cfg: VoxtralConfig) -> None:
    from evoxtral_stream.engine.backends.voxtral.slots import SlotDecoder

    cfg = dataclasses.replace(tiny_cfg, device="cuda", static_cache=True)
    gpu = load_voxtral_backend(cfg, "en")
    decoder = gpu.decoder
    assert isinstance(decoder, SlotDecoder)
    assert decoder._step != decoder._forward  # compiled: CUDA graphs
    assert "batches 1, 2, 4, 8" in gpu.warm_up(8)
    _staggered_equals_alone(gpu, seed=14)


def test_cuda_graph_steps_run_in_a_thread_other_than_the_one_that_compiled(
    tiny_cfg: VoxtralConfig,
) -> None:
    # The engine's model thread (and a restarted worker's new one) is not the
    # thread that compiled; before torch 2.13 this failed an empty assert
    # (pytorch/pytorch#123177) on every step.
    cfg = dataclasses.replace(tiny_cfg, device="cuda", static_cache=True)
    gpu = load_voxtral_backend(cfg, "en")
    gpu.warm_up(2)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            _staggered_equals_alone(gpu, seed=15)
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    for _ in range(2):  # a restarted worker: a second new thread
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(timeout=600)
    assert not errors, errors


def test_encoder_graphs_equal_the_eager_encoder_and_decode_the_same(
    tiny_cfg: VoxtralConfig,
) -> None:
    from evoxtral_stream.engine.backends.voxtral.encoder import (
        EncoderGraphs,
        eager_encoder,
        encoder_parts,
    )

    cfg = dataclasses.replace(tiny_cfg, device="cuda", dtype="float32", encoder_graphs=True)
    gpu = load_voxtral_backend(cfg, "en")
    graphs = gpu.encoder
    assert isinstance(graphs, EncoderGraphs)
    assert "encoder graphs for 1, 2, 4 windows" in gpu.warm_up(4)
    eager = eager_encoder(encoder_parts(gpu.model)[0])
    feats = gpu.features(audio_batch([3.0, 35.0, 12.0], seed=16)).to(gpu.loaded.dtype)
    assert feats.shape[0] == 4  # 35 s: two windows
    with torch.inference_mode():
        want = eager(feats)
        torch.testing.assert_close(graphs(feats), want)  # bucket 4, all real
        torch.testing.assert_close(graphs(feats[:3]), want[:3])  # one zero window after
        torch.testing.assert_close(graphs(feats[:1]), want[:1])
    _staggered_equals_alone(gpu, seed=16)


def test_compiled_encoder_layers_replay_as_graphs_and_decode_the_same(
    tiny_cfg: VoxtralConfig,
) -> None:
    """Inductor's Triton kernels for the layers, captured in the encoder's graphs."""
    from evoxtral_stream.engine.backends.voxtral.encoder import (
        EncoderGraphs,
        eager_encoder,
        encoder_parts,
    )

    torch._dynamo.reset()
    eager_cfg = dataclasses.replace(tiny_cfg, device="cuda", dtype="float32")
    eager = eager_encoder(encoder_parts(load_voxtral_backend(eager_cfg, "en").model)[0])
    cfg = dataclasses.replace(eager_cfg, encoder_graphs=True, encoder_compile=True)
    gpu = load_voxtral_backend(cfg, "en")
    graphs = gpu.encoder
    assert isinstance(graphs, EncoderGraphs)
    said = gpu.warm_up(4)
    # Compiled first: the graphs capture the compiled layers.
    assert said.startswith("encoder layers compiled in ")
    assert "; encoder graphs for 1, 2, 4 windows" in said
    feats = gpu.features(audio_batch([3.0, 35.0, 12.0], seed=17)).to(gpu.loaded.dtype)
    with torch.inference_mode():
        want = eager(feats)
        for n in (4, 3, 1):
            torch.testing.assert_close(graphs(feats[:n]), want[:n], rtol=1e-4, atol=1e-4)
    _staggered_equals_alone(gpu, seed=17)
    torch._dynamo.reset()


def test_prefill_graphs_replay_the_prompt_prefill_and_decode_the_same(
    tiny_cfg: VoxtralConfig,
) -> None:
    """The prompt prefill captured per (rows, columns) bucket, then replayed
    for the three short jobs that join together (the 35 s job is too long
    for a bucket and takes the plain prefill)."""
    cfg = dataclasses.replace(tiny_cfg, device="cuda", dtype="float32", encoder_graphs=True,
                              prefill_graphs=True)
    gpu = load_voxtral_backend(cfg, "en")
    graphs = gpu.prefill_graphs
    assert graphs is not None
    said = gpu.warm_up(4)
    assert f"prefill graphs for {3 * len(graphs.columns)} (rows, columns) buckets" in said
    assert graphs.enabled and len(graphs.captured) == 3 * len(graphs.columns)
    _staggered_equals_alone(gpu, seed=18)


def test_cuda_graph_lookahead_steps_equal_transcribe_jobs(tiny_cfg: VoxtralConfig) -> None:
    """Steps launched ahead, fed on the device, read through pinned memory."""
    from evoxtral_stream.engine.backends.voxtral.slots import SlotDecoder

    cfg = dataclasses.replace(tiny_cfg, device="cuda", static_cache=True, lookahead=True)
    gpu = load_voxtral_backend(cfg, "en")
    decoder = gpu.decoder
    assert isinstance(decoder, SlotDecoder)
    assert decoder.lookahead and decoder._pinned
    gpu.warm_up(8)
    _staggered_equals_alone(gpu, seed=15)


def test_cuda_drafts_on_graph_steps_change_nothing(tiny_cfg: VoxtralConfig) -> None:
    """Drafts checked in the prefill, then CUDA-graph steps launched ahead."""
    cfg = dataclasses.replace(tiny_cfg, device="cuda", static_cache=True, lookahead=True)
    gpu = load_voxtral_backend(cfg, "en")
    gpu.warm_up(8)
    batch = audio_batch([3.0, 35.0, 1.0, 5.0, 12.0], seed=16)
    plain = [gpu.transcribe_jobs([Job(i, a)])[0] for i, a in enumerate(batch)]
    # Whole, cut short, wrong from the third token, and no draft.
    drafts = [d.token_ids for d in plain]
    drafts[1] = drafts[1][:2]
    drafts[2] = (*drafts[2][:2], drafts[2][2] + 1, *drafts[2][3:])
    drafts[4] = ()
    jobs = [Job(i, a, draft=d) for i, (a, d) in enumerate(zip(batch, drafts, strict=True))]
    out: dict[Job, Done] = {}
    for group in (jobs[:2], jobs[2:]):
        out.update((d.job, d) for d in gpu.admit(group))
        for _ in range(3):
            out.update((d.job, d) for d in gpu.step())
    while gpu.active:
        out.update((d.job, d) for d in gpu.step())
    for job, want in zip(jobs, plain, strict=True):
        assert (out[job].text, out[job].tokens, out[job].token_ids) == (
            want.text, want.tokens, want.token_ids)
    assert gpu.draft_kept > 0
