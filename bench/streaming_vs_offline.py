"""Streaming vs offline with the same backend, on speech made from the seed's scripts.

Synthesises ``--n`` scripts (seeded sample) with espeak-ng, writes a
manifest whose references are the scripts' tagged texts, and runs
``evoxtral_stream.evaluation.run_eval`` with ``compare_offline=True``: each
file once through the live pipeline (partials on) and once as one whole
decode. Prints the seed's metrics side by side and the share of utterances
whose streaming text equals the offline text.

Usage: ``python bench/streaming_vs_offline.py /path/to/evoxtral_scripts.json --n 60``
(espeak-ng speaks the plain text: it cannot perform the tags, so tag scores
measure the backend, not the merger).

``--prefix-reuse off partials all`` streams the same files once per
``stream.prefix_reuse`` mode (``--repeat`` times, the modes taking turns),
against one offline decode, and adds a table
of the modes side by side: the time each streaming pass took, the time
spent in the model, the requests that carried a prefix and the tokens the
model generated (prefixes not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.backends import load_backend
from evoxtral_stream.engine.backends.base import Done, Job, JobBackend
from evoxtral_stream.evaluation import load_audio, offline_predictions, streaming_predictions
from evoxtral_stream.text.manifest import read_manifest
from evoxtral_stream.text.metrics import Comparison, compare, evaluate, format_comparison
from evoxtral_stream.text.tags import normalize


class Timed:
    """Passes jobs to a :class:`JobBackend`, adding up the time spent in it,
    the requests (and those with a prefix) and the tokens generated."""

    def __init__(self, inner: JobBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.busy_s = 0.0
        self.requests = self.prefixed = self.tokens = 0

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        return [d.text for d in self.transcribe_jobs([Job(i, a) for i, a in enumerate(batch)])]

    def transcribe_jobs(self, jobs: Sequence[Job]) -> list[Done]:
        t0 = time.perf_counter()
        done = self.inner.transcribe_jobs(jobs)
        self.busy_s += time.perf_counter() - t0
        self.requests += len(jobs)
        self.prefixed += sum(1 for j in jobs if j.prefix)
        self.tokens += sum(d.tokens for d in done)
        return done


@dataclass(frozen=True)
class ModeResult:
    label: str
    comparison: Comparison
    identical: int
    seconds: float
    model_s: float = 0.0
    requests: int = 0
    prefixed: int = 0
    tokens: int = 0


def modes_table(results: list[ModeResult], n: int) -> str:
    head = ("| prefix_reuse | WER offline | WER streaming | streaming − offline | "
            "corpus WER Δ | identical to offline | streaming pass | model time | "
            "requests (with prefix) | tokens generated |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = []
    for r in results:
        c = r.comparison
        d = c.delta()
        lines.append(
            f"| {r.label} | {c.offline.wer:.4f} | {c.streaming.wer:.4f} | "
            f"{100 * d['wer']:+.2f} points | "
            f"{100 * d['corpus_wer']:+.2f} points | {r.identical}/{n} | {r.seconds:.0f} s | "
            f"{r.model_s:.1f} s | {r.requests} ({r.prefixed}) | {r.tokens} |")
    return "\n".join([head, *lines])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("scripts", type=Path)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--prefix-reuse", nargs="+", choices=("off", "partials", "all"),
                    default=None, metavar="MODE",
                    help="stream once per stream.prefix_reuse mode (default: the config's)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="stream the modes this many times, in turn (model time varies)")
    args = ap.parse_args()
    scripts = json.loads(args.scripts.read_text())
    sample = random.Random(args.seed).sample(scripts, args.n)
    base = load_config()
    modes = args.prefix_reuse or [base.stream.prefix_reuse]
    results: list[ModeResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        lines = []
        for i, s in enumerate(sample):
            wav = folder / f"{i:03d}.wav"
            subprocess.run(["espeak-ng", "-v", "en", "-s", "150", "-w", str(wav),
                            s["plain_text"]], check=True, capture_output=True)
            lines.append(json.dumps({"audio": wav.name, "text": s["tagged_text"]}))
        manifest = folder / "manifest.jsonl"
        manifest.write_text("\n".join(lines) + "\n")
        entries = read_manifest(manifest)
        audio = load_audio(entries)
        backend = load_backend(base.model)
        # Scored as `eval` scores them: as captions read (canonical tags).
        refs = [normalize(e.text) for e in entries]
        t0 = time.monotonic()
        offline_texts, failed = offline_predictions(backend, audio)
        if failed:
            raise SystemExit(f"offline: a decode failed on script(s) {failed} (logged): "
                             "the numbers would not be the model's")
        offline = evaluate(list(zip(refs, offline_texts, strict=True)))
        offline_s = time.monotonic() - t0
        if not isinstance(backend, JobBackend):
            raise SystemExit(f"{backend.name} takes no prefixes (not a JobBackend)")
        runs = [(mode, f"{mode} (run {r + 1})" if args.repeat > 1 else mode)
                for r in range(args.repeat) for mode in modes]
        for mode, label in runs:
            cfg = load_config(overrides={"stream.prefix_reuse": mode})
            timed = Timed(backend)
            t0 = time.monotonic()
            texts, failed = asyncio.run(streaming_predictions(cfg, timed, audio))
            seconds = time.monotonic() - t0
            if failed:
                raise SystemExit(f"{label}: a decode failed on script(s) {failed} (logged): "
                                 "the numbers would not be the model's")
            streaming = evaluate(list(zip(refs, texts, strict=True)))
            identical = sum(a == b for a, b in zip(texts, offline_texts, strict=True))
            results.append(ModeResult(label, compare(offline, streaming), identical, seconds,
                                      timed.busy_s, timed.requests, timed.prefixed,
                                      timed.tokens))
    print(f"backend: {backend.name}; {args.n} scripts (seed {args.seed}); "
          f"offline pass {offline_s:.0f} s")
    for r in results:
        comparison = r.comparison
        print(f"\n## stream.prefix_reuse = {r.label} (streaming pass {r.seconds:.0f} s, "
              f"model {r.model_s:.1f} s; {r.prefixed} of {r.requests} requests with a prefix)")
        print(format_comparison(comparison))
        print(f"utterances whose streaming text equals the offline text: "
              f"{r.identical}/{args.n} ({100 * r.identical / args.n:.1f}%)")
        print(f"WER(streaming) - WER(offline): {100 * comparison.delta()['wer']:+.2f} points "
              f"(per-utterance mean), corpus {100 * comparison.delta()['corpus_wer']:+.2f} "
              "points")
    if len(results) > 1:
        print()
        print(modes_table(results, args.n))
    if args.json:
        out = {r.label: {"comparison": r.comparison.to_dict(samples=False),
                        "identical": r.identical, "seconds": r.seconds, "model_s": r.model_s,
                        "requests": r.requests, "prefixed": r.prefixed, "tokens": r.tokens}
               for r in results}
        args.json.write_text(json.dumps({"modes": out, "n": args.n}, indent=2))


if __name__ == "__main__":
    main()
