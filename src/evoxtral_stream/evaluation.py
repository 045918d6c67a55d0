"""The ``eval`` job: score the engine on a manifest, streaming vs offline.

Streaming: every file goes through the live pipeline (segmenter, partials,
merger), and its prediction is its finals joined in segment order. Offline:
the same backend decodes each whole file in one call (30 s pieces for longer
files, the model's window), and its text is normalised as a caption's is
(canonical tags, single spaces). Both are scored, against the references
normalised the same way, with the seed's metrics
(:mod:`evoxtral_stream.text.metrics`); the difference is what streaming
costs.
"""

from __future__ import annotations

import asyncio
import logging
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
from .text.tags import join_texts, normalize

__all__ = ["EvalRun", "load_audio", "offline_predictions", "run_eval", "streaming_predictions"]

_WINDOW = 30 * SAMPLE_RATE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalRun:
    """Predictions and reports; ``offline`` is None unless it was asked for."""

    references: tuple[str, ...]
    streaming_texts: tuple[str, ...]
    streaming: EvalReport
    offline_texts: tuple[str, ...] | None = None
    offline: EvalReport | None = None
    failed: tuple[int, ...] = ()
    """The indexes of the files a decode failed on, streaming or offline:
    their text is what was decoded (a final closed with its last partial's
    text; nothing offline)."""

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


def offline_predictions(backend: Backend, audio: Sequence[Int16Array], max_batch: int = 8
                        ) -> tuple[list[str], list[int]]:
    """One decode of each whole file (in 30 s pieces when longer, at most
    ``max_batch`` pieces per backend call, as the worker batches): the texts,
    normalised as a caption's text is, and the indexes of the files the
    backend failed on (logged; text "")."""
    out: list[str] = []
    failed: list[int] = []
    step = max(1, max_batch)
    for n, samples in enumerate(audio):
        pieces = [int16_to_float32(samples[i:i + _WINDOW])
                  for i in range(0, max(len(samples), 1), _WINDOW)]
        try:
            # An hour of audio is 120 pieces: one call would ask a GPU for
            # 120 windows' activations at once.
            texts = [t for i in range(0, len(pieces), step)
                     for t in backend.transcribe(pieces[i:i + step])]
        except Exception as e:  # as the worker takes it: one file's failure (out of memory)
            log.error("backend failed on file %d of the offline pass: %s: %s", n + 1,
                      type(e).__name__, e)
            failed.append(n)
            texts = []
        # As the merger renders a final ([LAUGHTER] is [laughs]): scored raw,
        # the tags the captions canonicalise would count as streaming's gain.
        # Windows join as finals do: a space between Chinese ones would be a
        # word boundary to WER.
        out.append(normalize(join_texts(texts)))
    return out, failed


async def streaming_predictions(cfg: Config, backend: Backend, audio: Sequence[Int16Array]
                                ) -> tuple[list[str], list[int]]:
    """Each file through the live pipeline, one stream at a time: the texts,
    and the indexes of the files a decode failed on (``decode_failed`` or
    ``final_lost``: their text is not all the model's)."""
    out: list[str] = []
    failed: list[int] = []
    async with Engine(cfg, backend) as engine:
        for i, samples in enumerate(audio):
            record = LatencyLog()
            engine.add_listener(record)
            [summary] = await transcribe_samples(cfg, engine, [FileJob(f"eval-{i}", samples)],
                                                 realtime=False)
            engine.remove_listener(record)
            out.append(final_text(record.captions()))
            if summary.errors:
                failed.append(i)
    return out, failed


def run_eval(cfg: Config, backend: Backend, entries: Sequence[ManifestEntry],
             audio: Sequence[Int16Array], *, compare_offline: bool) -> EvalRun:
    """Score streaming (and, when asked, offline) predictions on ``entries``,
    whose files are ``audio`` (:func:`load_audio`, before the model loads).

    The references are scored as captions read (canonical tags): a caption
    says ``[laughs]`` whatever the model wrote, so a reference's
    ``[laughing]`` could never be matched. ``references`` keeps them as the
    manifest wrote them."""
    refs = tuple(e.text for e in entries)
    scored = [normalize(r) for r in refs]
    texts, failed = asyncio.run(streaming_predictions(cfg, backend, audio))
    streamed = tuple(texts)
    report = evaluate(list(zip(scored, streamed, strict=True)))
    if not compare_offline:
        return EvalRun(refs, streamed, report, failed=tuple(failed))
    offline_texts, offline_failed = offline_predictions(backend, audio,
                                                        cfg.worker.max_batch)
    offline = tuple(offline_texts)
    return EvalRun(refs, streamed, report, offline,
                   evaluate(list(zip(scored, offline, strict=True))),
                   tuple(sorted({*failed, *offline_failed})))
