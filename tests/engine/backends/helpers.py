"""Audio and forward-pass helpers for the Voxtral backend tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from evoxtral_stream.engine.backends.voxtral.backend import VoxtralBackend

__all__ = ["audio_batch", "int16_exact", "logits", "reference_model"]

SR = 16_000


def audio_batch(seconds: Sequence[float], seed: int = 0) -> list[npt.NDArray[np.float32]]:
    """Distinct test signals: noise plus a tone that differs per array."""
    rng = np.random.default_rng(seed)
    out = []
    for i, s in enumerate(seconds):
        n = round(s * SR)
        t = np.arange(n) / SR
        tone = 0.3 * np.sin(2 * np.pi * (150 + 70 * i) * t)
        out.append((tone + 0.05 * rng.standard_normal(n)).astype(np.float32))
    return out


def int16_exact(a: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """``a`` rounded to 16-bit PCM values, which survive the processor's WAV trip."""
    q = np.clip(np.round(a * 32768), -32768, 32767) / 32768
    return q.astype(np.float32)


def reference_model(base: Path, deltas: Mapping[str, torch.Tensor] | None) -> nn.Module:
    """The base model with ``deltas`` added to the named modules' weights directly."""
    from transformers import VoxtralForConditionalGeneration

    model: Any = VoxtralForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        for name, delta in (deltas or {}).items():
            model.get_submodule(name).weight += delta
    return model  # type: ignore[no-any-return]


def logits(
    model: nn.Module,
    backend: VoxtralBackend,
    batch: Sequence[npt.NDArray[np.float32]],
    continuation: Sequence[int] = (1000, 2000, 3000),
    keep: int = 8,
) -> torch.Tensor:
    """Logits at the last ``keep`` positions of the transcription prompts of
    ``batch`` plus a fixed continuation (every position attends to all audio;
    full logits over the 131k vocabulary would cost gigabytes)."""
    rows, masks = backend.spec.left_padded([len(a) for a in batch])
    ids = torch.tensor([r + list(continuation) for r in rows])
    mask = torch.tensor([m + [1] * len(continuation) for m in masks])
    with torch.inference_mode():
        out: Any = model(
            input_ids=ids,
            attention_mask=mask,
            input_features=backend.features(batch),
            logits_to_keep=keep,
        )
    return out.logits.float()  # type: ignore[no-any-return]
