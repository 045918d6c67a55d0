"""Whisper log-mel features computed with torch on the model's device.

Matches what ``VoxtralProcessor`` gets from ``WhisperFeatureExtractor``: the
audio is zero-padded to a whole number of 30 s windows, the STFT (Hann window,
centred, reflect padding) runs over the whole padded signal, the last frame is
dropped, power goes through the Slaney mel bank, then ``log10``, a floor 8
below the maximum of that audio, and ``(x + 4) / 4``. The result is cut into
windows of ``frames_per_window`` frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from .prompt import PromptSpec

__all__ = ["LogMel"]


class LogMel:
    """Turns a batch of 16 kHz float32 arrays into encoder input windows."""

    def __init__(self, spec: PromptSpec, device: torch.device) -> None:
        from transformers.audio_utils import mel_filter_bank

        self.spec = spec
        self.device = device
        # The same filter bank WhisperFeatureExtractor builds for these sizes.
        filters = mel_filter_bank(
            num_frequency_bins=1 + spec.n_fft // 2,
            num_mel_filters=spec.num_mel_bins,
            min_frequency=0.0,
            max_frequency=spec.sampling_rate / 2,
            sampling_rate=spec.sampling_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        self._mel_t = torch.from_numpy(np.ascontiguousarray(filters.T)).to(device, torch.float32)
        self._window = torch.hann_window(spec.n_fft, device=device)

    def _group(self, waves: torch.Tensor) -> torch.Tensor:
        """(B, W * samples) padded audio -> (B * W, mels, frames) features."""
        spec = self.spec
        stft = torch.stft(
            waves, spec.n_fft, spec.hop_length, window=self._window, return_complex=True
        )
        power = (stft[..., :-1].abs() ** 2).contiguous()
        log_spec = torch.clamp(self._mel_t @ power, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
        b, mels, frames = log_spec.shape
        n_win = frames // spec.frames_per_window
        out = log_spec.reshape(b, mels, n_win, spec.frames_per_window).permute(0, 2, 1, 3)
        return out.reshape(b * n_win, mels, spec.frames_per_window)

    def __call__(self, batch: Sequence[npt.NDArray[np.float32]]) -> torch.Tensor:
        """Features of every window of every array, in batch order.

        Returns a float32 tensor of shape (total windows, mels, frames) on
        ``device``; array i contributes ``spec.windows(len(array))`` rows.
        """
        spec = self.spec
        n_win = [spec.windows(len(a)) for a in batch]
        # Arrays with the same window count share one STFT call; mixing
        # counts would change the reflect padding at the end of the shorter.
        parts: list[torch.Tensor | None] = [None] * len(batch)
        for w in sorted(set(n_win)):
            idx = [i for i, n in enumerate(n_win) if n == w]
            shape = (len(idx), w * spec.samples_per_window)
            if self.device.type == "cuda":
                # Pinned: the copy is queued behind the GPU's work instead of
                # waiting for it (the allocator keeps the block until it is done).
                staged = torch.zeros(shape, dtype=torch.float32, pin_memory=True)
            else:
                staged = torch.zeros(shape, dtype=torch.float32)
            host = staged.numpy()
            for row, i in enumerate(idx):
                host[row, : len(batch[i])] = batch[i]
            feats = self._group(staged.to(self.device, non_blocking=True))
            for row, i in enumerate(idx):
                parts[i] = feats[row * w : (row + 1) * w]
        return torch.cat([p for p in parts if p is not None])
