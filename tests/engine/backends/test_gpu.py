"""The tiny checkpoint on CUDA: bfloat16 by default, features on the device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from evoxtral_stream.config import VoxtralConfig
from evoxtral_stream.engine.backends.base import Done, Job
from evoxtral_stream.engine.backends.voxtral import voxtral_available
from evoxtral_stream.engine.backends.voxtral.backend import VoxtralBackend, load_voxtral_backend

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


def test_cuda_float32_continuous_equals_transcribe_jobs(tiny_cfg: VoxtralConfig) -> None:
    gpu = load_voxtral_backend(dataclasses.replace(tiny_cfg, device="cuda"), "en")
    batch = audio_batch([3.0, 35.0, 1.0, 5.0, 12.0], seed=13)
    jobs = [Job(i, a) for i, a in enumerate(batch)]
    want = {job: gpu.transcribe_jobs([job])[0] for job in jobs}
    out: dict[Job, Done] = {}
    # Staggered: the later jobs join a batch that already decoded a few steps.
    for group, steps in ((jobs[:2], 3), (jobs[2:], None)):
        out.update((d.job, d) for d in gpu.admit(group))
        n = 0
        while gpu.active and (steps is None or n < steps):
            out.update((d.job, d) for d in gpu.step())
            n += 1
    assert out == want
    assert gpu.decoder.width == 0
