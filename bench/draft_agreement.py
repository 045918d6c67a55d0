"""How far a segment's last partial predicts its next decode (``stream.draft``).

With ``stream.draft`` on, every request of a segment after its first partial
carries the model's tokens of that partial. A backend that verifies drafts
(Voxtral, continuous batching) keeps the leading draft tokens that equal
what greedy decoding writes, so a request needs one decode step less for
each kept token. This script measures that agreement with a real model on
real speech: it streams espeak-ng renderings of the seed's scripts through
the live pipeline with the embedded Whisper tiny.en (which reports token ids
but ignores drafts, so its captions are unchanged) and, for every request
that carried a draft, counts the longest common prefix of the draft and the
tokens the model then wrote.

It is a proxy: Voxtral's partials may agree with its finals more or less
than Whisper tiny.en's do; only real Voxtral weights can say.

Usage: ``python bench/draft_agreement.py ../shared/data/evoxtral_scripts.json --n 60``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from evoxtral_stream.audio.sources import read_audio_file
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.backends import load_backend
from evoxtral_stream.engine.backends.base import Done, Job, JobBackend
from evoxtral_stream.evaluation import streaming_predictions
from evoxtral_stream.events import DecodeRequest, Int16Array, RequestKind
from evoxtral_stream.text.tags import plain_text

__all__ = ["Agreement", "Recorder", "common_prefix", "main"]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Agreement:
    """Tallies for one request kind."""

    requests: int = 0
    drafted: int = 0
    tokens: int = 0
    """Tokens written for the drafted requests."""
    kept: int = 0
    """Of those, the ones a verifying backend takes from the draft."""
    whole: int = 0
    """Drafted requests whose every token the draft predicted."""

    @property
    def kept_share(self) -> float:
        return self.kept / self.tokens if self.tokens else 0.0

    @property
    def steps_plain(self) -> float:
        """Decode steps per drafted request without a draft: one per token
        after the first (which the prefill gives) and one that writes EOS."""
        return self.tokens / self.drafted if self.drafted else 0.0

    @property
    def steps_drafted(self) -> float:
        return (self.tokens - self.kept) / self.drafted if self.drafted else 0.0


@dataclass
class Recorder:
    """A :class:`JobBackend` in front of another that tallies draft agreement."""

    inner: JobBackend
    by_kind: dict[str, Agreement] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.inner.name

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        return [d.text for d in self.transcribe_jobs([Job(i, a) for i, a in enumerate(batch)])]

    def transcribe_jobs(self, jobs: Sequence[Job]) -> list[Done]:
        done = self.inner.transcribe_jobs(jobs)
        for job, d in zip(jobs, done, strict=True):
            kind = job.key.kind if isinstance(job.key, DecodeRequest) else RequestKind.FINAL
            tally = self.by_kind.setdefault(kind.value, Agreement())
            tally.requests += 1
            if job.draft and d.token_ids:
                kept = common_prefix(job.draft, d.token_ids)
                tally.drafted += 1
                tally.tokens += len(d.token_ids)
                tally.kept += kept
                tally.whole += kept == len(d.token_ids)
        return done


def table(by_kind: dict[str, Agreement]) -> str:
    lines = ["| request | requests | with a draft | tokens written | kept from the draft | "
             "share kept | whole text predicted | decode steps per request: plain → drafted |",
             "|---|---|---|---|---|---|---|---|"]
    for kind in ("partial", "final"):
        t = by_kind.get(kind)
        if t is None:
            continue
        lines.append(
            f"| {kind} | {t.requests} | {t.drafted} | {t.tokens} | {t.kept} | "
            f"{100 * t.kept_share:.1f} % | {t.whole} | "
            f"{t.steps_plain:.1f} → {t.steps_drafted:.1f} |")
    return "\n".join(lines)


def synthesize(texts: Sequence[str], folder: Path) -> list[Int16Array]:
    """espeak-ng renderings of ``texts``, 16 kHz mono."""
    out = []
    for i, text in enumerate(texts):
        wav = folder / f"{i:03d}.wav"
        subprocess.run(["espeak-ng", "-v", "en", "-s", "150", "-w", str(wav), text],
                       check=True, capture_output=True)
        out.append(read_audio_file(str(wav)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("scripts", type=Path, help="a JSON list of scripts with plain_text")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--pause-partial", action="store_true",
                    help="stream.pause_partial on (finals at a pause's end are then not decoded)")
    args = ap.parse_args(argv)
    data = json.loads(args.scripts.read_text())
    # The seed's scripts (objects with plain_text), or the tests' sample of
    # them ({"scripts": [tagged text, ...]}).
    scripts = data["scripts"] if isinstance(data, dict) else data
    sample = random.Random(args.seed).sample(scripts, min(args.n, len(scripts)))
    texts = [s if isinstance(s, str) else s["plain_text"] for s in sample]
    texts = [plain_text(t) for t in texts]
    # Without partials at pauses: with them, a final whose audio a partial
    # already decoded takes that partial's text and is not decoded at all.
    cfg = load_config(overrides={"stream.draft": True, "stream.prefix_reuse": "off",
                                 "stream.pause_partial": args.pause_partial})
    backend = load_backend(cfg.model)
    if not isinstance(backend, JobBackend):
        print(f"{backend.name} reports no tokens (not a JobBackend)", file=sys.stderr)
        return 2
    recorder = Recorder(backend)
    with tempfile.TemporaryDirectory() as tmp:
        audio = synthesize(texts, Path(tmp))
    t0 = time.monotonic()
    asyncio.run(streaming_predictions(cfg, recorder, audio))
    seconds = time.monotonic() - t0
    audio_s = sum(len(a) for a in audio) / 16000
    print(f"backend: {backend.name}; {len(sample)} scripts (seed {args.seed}), "
          f"{audio_s:.0f} s of speech, streamed in {seconds:.0f} s; "
          f"stream.pause_partial = {str(args.pause_partial).lower()}")
    print(table(recorder.by_kind))
    if args.json is not None:
        args.json.write_text(json.dumps(
            {"n": len(sample), "seed": args.seed, "audio_s": audio_s,
             "by_kind": {k: asdict(v) | {"kept_share": v.kept_share}
                         for k, v in recorder.by_kind.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
