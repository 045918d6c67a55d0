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
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.backends import load_backend
from evoxtral_stream.evaluation import run_eval
from evoxtral_stream.text.manifest import read_manifest
from evoxtral_stream.text.metrics import compare, format_comparison


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("scripts", type=Path)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    scripts = json.loads(args.scripts.read_text())
    sample = random.Random(args.seed).sample(scripts, args.n)
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
        cfg = load_config()
        backend = load_backend(cfg.model)
        t0 = time.monotonic()
        result = run_eval(cfg, backend, read_manifest(manifest), compare_offline=True)
        elapsed = time.monotonic() - t0
    assert result.offline is not None
    comparison = compare(result.offline, result.streaming)
    print(f"backend: {backend.name}; {args.n} scripts (seed {args.seed}); {elapsed:.0f} s")
    print(format_comparison(comparison))
    print(f"utterances whose streaming text equals the offline text: "
          f"{result.identical}/{args.n} ({100 * result.identical / args.n:.1f}%)")
    print(f"WER(streaming) - WER(offline): {100 * comparison.delta()['wer']:+.2f} points "
          f"(per-utterance mean), corpus {100 * comparison.delta()['corpus_wer']:+.2f} points")
    if args.json:
        args.json.write_text(json.dumps({"comparison": comparison.to_dict(samples=False),
                                         "identical": result.identical, "n": args.n}, indent=2))


if __name__ == "__main__":
    main()
