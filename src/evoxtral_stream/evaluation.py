"""The ``eval`` job: score the engine on a manifest, streaming vs offline.

Streaming: every file goes through the live pipeline (segmenter, partials,
merger), and its prediction is its finals joined in segment order. Offline:
the same backend decodes each whole file in one call (30 s pieces for longer
files, the model's window). Both are scored with the seed's metrics
(:mod:`evoxtral_stream.text.metrics`); the difference is what streaming
costs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from .audio.resample import int16_to_float32
from .audio.sources import AudioInputError, read_audio_file
from .config import Config
from .engine.backends.base import Backend
from .engine.engine import Engine
from .events import SAMPLE_RATE, Int16Array
from .run import FileJob, LatencyLog, final_text, transcribe_samples
from .text.manifest import ManifestEntry
from .text.metrics import EvalReport, evaluate

__all__ = ["EvalRun", "load_audio", "offline_predictions", "run_eval", "streaming_predictions"]

_WINDOW = 30 * SAMPLE_RATE


@dataclass(frozen=True)
class EvalRun:
    """Predictions and reports; ``offline`` is None unless it was asked for."""

    references: tuple[str, ...]
    streaming_texts: tuple[str, ...]
    streaming: EvalReport
    offline_texts: tuple[str, ...] | None = None
    offline: EvalReport | None = None

    @property
    def identical(self) -> int:
        """Files whose streaming text equals the offline text exactly."""
        if self.offline_texts is None:
            return 0
        return sum(a == b for a, b in zip(self.streaming_texts, self.offline_texts, strict=True))


def load_audio(entries: Sequence[ManifestEntry], *,
               source: str = "manifest") -> list[Int16Array]:
    """Read every file of the manifest; an :class:`AudioInputError` names the
    manifest (``source``), the line and the file that cannot be read."""
    audio: list[Int16Array] = []
    for e in entries:
        try:
            audio.append(read_audio_file(e.audio))
        except AudioInputError as err:
            raise AudioInputError(f"{source} line {e.line}: {err}") from None
    return audio


def offline_predictions(backend: Backend, audio: Sequence[Int16Array]) -> list[str]:
    """One decode of each whole file (in 30 s pieces when longer)."""
    out: list[str] = []
    for samples in audio:
        pieces = [samples[i:i + _WINDOW] for i in range(0, max(len(samples), 1), _WINDOW)]
        texts = backend.transcribe([int16_to_float32(p) for p in pieces])
        out.append(" ".join(t for t in texts if t))
    return out


async def streaming_predictions(cfg: Config, backend: Backend,
                                audio: Sequence[Int16Array]) -> list[str]:
    """Each file through the live pipeline, one stream at a time."""
    out: list[str] = []
    async with Engine(cfg, backend) as engine:
        for i, samples in enumerate(audio):
            record = LatencyLog()
            engine.add_listener(record)
            await transcribe_samples(cfg, engine, [FileJob(f"eval-{i}", samples)],
                                     realtime=False)
            engine.remove_listener(record)
            out.append(final_text(record.captions()))
    return out


def run_eval(cfg: Config, backend: Backend, entries: Sequence[ManifestEntry],
             audio: Sequence[Int16Array], *, compare_offline: bool) -> EvalRun:
    """Score streaming (and, when asked, offline) predictions on ``entries``,
    whose files are ``audio`` (:func:`load_audio`, before the model loads)."""
    refs = tuple(e.text for e in entries)
    streamed = tuple(asyncio.run(streaming_predictions(cfg, backend, audio)))
    report = evaluate(list(zip(refs, streamed, strict=True)))
    if not compare_offline:
        return EvalRun(refs, streamed, report)
    offline = tuple(offline_predictions(backend, audio))
    return EvalRun(refs, streamed, report, offline,
                   evaluate(list(zip(refs, offline, strict=True))))
