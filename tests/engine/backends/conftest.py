"""Tiny Voxtral checkpoints and adapters, built once per test run (no downloads)."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("mistral_common")

import torch

from evoxtral_stream.config import VoxtralConfig, load_config
from evoxtral_stream.engine.backends.voxtral.backend import VoxtralBackend, load_voxtral_backend
from evoxtral_stream.engine.backends.voxtral.tiny import (
    build_checkpoint,
    lora_deltas,
    write_lora_adapter,
)

# One intra-op thread: the tiny model's ops are far too small to gain from two,
# and torch's OpenMP threads wait for each other at every op, spinning while the
# other is off the CPU. On a loaded machine (pytest -n 3 on 2 cores beside other
# work) that made a test ten times slower in CPU and wall time alike
# (test_unmerged_adapters_run_one_at_a_time: 358 s, past pytest-timeout's 300 s).
# It holds for the test process: the tests that run torch in it run tiny models.
torch.set_num_threads(1)

__all__ = ["Tiny"]

RANK, ALPHA = 4, 8


@dataclass(frozen=True)
class Tiny:
    """Paths of the tiny checkpoint and its adapters, with the ground truth.

    ``deltas``/``deltas_rl`` map current module names to ``B @ A * scaling``
    of ``adapter`` (old key layout) and ``adapter_rl`` (current layout).
    """

    base: Path
    adapter: Path
    adapter_rl: Path
    deltas: dict[str, torch.Tensor]
    deltas_rl: dict[str, torch.Tensor]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny-voxtral")
    model = build_checkpoint(root / "base", seed=0)
    pairs = write_lora_adapter(model, root / "lora-old", rank=RANK, alpha=ALPHA, seed=1)
    pairs_rl = write_lora_adapter(
        model, root / "lora-rl", rank=RANK, alpha=ALPHA, seed=2, old_layout=False
    )
    return Tiny(
        base=root / "base",
        adapter=root / "lora-old",
        adapter_rl=root / "lora-rl",
        deltas=lora_deltas(pairs, rank=RANK, alpha=ALPHA),
        deltas_rl=lora_deltas(pairs_rl, rank=RANK, alpha=ALPHA),
    )


@pytest.fixture(scope="session")
def tiny_cfg(tiny: Tiny) -> VoxtralConfig:
    """model.voxtral pointing at the tiny checkpoint, on the CPU in float32.

    A low token rate keeps greedy decoding of the random model short.
    """
    return dataclasses.replace(
        load_config().model.voxtral,
        base=str(tiny.base),
        adapter=str(tiny.adapter),
        device="cpu",
        dtype="float32",
        tokens_per_second=2.0,
        min_new_tokens=6,
    )


@pytest.fixture(scope="session")
def merged(tiny_cfg: VoxtralConfig) -> VoxtralBackend:
    return load_voxtral_backend(tiny_cfg, "en")


@pytest.fixture(scope="session")
def unmerged(tiny_cfg: VoxtralConfig, tiny: Tiny) -> VoxtralBackend:
    cfg = dataclasses.replace(tiny_cfg, merge_lora=False)
    return load_voxtral_backend(cfg, "en", extra_adapters={"rl": str(tiny.adapter_rl)})


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    quiet: Any = hf_logging.disable_progress_bar
    quiet()
