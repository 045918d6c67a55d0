"""Compile cache: a restarted engine's warm-up, with and without a surviving cache.

    python bench/compile_cache.py [--max-batch 8] [--device cpu] [--static-cache] [--json OUT]

Builds the tiny Voxtral checkpoint, then starts the backend three times, each
in a process of its own (a restart), with ``model.voxtral.encoder_compile``
on (and the slot cache with ``--static-cache``, which compiles only on CUDA),
and times the worker's warm-up:

1. the first start, with an empty cache folder;
2. a restart with the same folder: ``model.voxtral.compile_cache_dir`` set;
3. a restart with a new, empty folder: what torch's default folder gives
   under systemd's ``PrivateTmp`` or in a new container (the reference).

Prints a table of warm-up times and how many compiled graphs came from the
cache; ``--json`` rows also hold a digest of the encoder's hidden states for
3 s of noise after the warm-up (a restart's, from the cache, equals the first
start's). On the CPU inductor compiles C++, on a GPU Triton kernels; the
figures are the tiny model's, about the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_CHILD = """
import dataclasses, json, sys, time
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.backends.voxtral.backend import load_voxtral_backend
from evoxtral_stream.engine.backends.voxtral.compile_cache import CacheTally
ckpt, cache, device, static, max_batch = sys.argv[1:6]
cfg = dataclasses.replace(
    load_config(env={}).model.voxtral, base=ckpt + "/base", adapter=ckpt + "/lora",
    device=device, dtype="float32", encoder_compile=True, static_cache=static == "1",
    compile_cache_dir=cache)
t = time.perf_counter()
backend = load_voxtral_backend(cfg, "en")
loaded = time.perf_counter() - t
tally = CacheTally()
t = time.perf_counter()
said = backend.warm_up(int(max_batch))
warm = time.perf_counter() - t
hits, total = tally.counts()
import hashlib, numpy, torch
from evoxtral_stream.engine.backends.voxtral.encoder import encoder_parts
noise = numpy.random.default_rng(41).standard_normal(48000).astype(numpy.float32) * 0.05
feats = backend.features([noise]).to(backend.loaded.dtype)
with torch.inference_mode():
    states = encoder_parts(backend.model)[0](feats).last_hidden_state
digest = hashlib.sha256(states.float().cpu().contiguous().numpy().tobytes()).hexdigest()
print(json.dumps({"load_s": loaded, "warm_up_s": warm, "hits": hits, "graphs": total,
                  "said": said, "encoder_sha256": digest}))
"""

RUNS = (
    ("first start", "empty", "first"),
    ("restart, same folder (compile_cache_dir)", "kept", "first"),
    ("restart, new folder (PrivateTmp; reference)", "empty", "second"),
)


def _start(ckpt: Path, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ckpt), str(cache), args.device,
         "1" if args.static_cache else "0", str(args.max_batch)],
        env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"a start failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| start | cache folder | warm-up | compiled graphs from the cache | vs reference |",
             "|---|---|---|---|---|"]
    ref = rows[-1]["warm_up_s"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['folder']} | {r['warm_up_s']:.2f} s | "
                     f"{r['hits']} of {r['graphs']} | {ref / r['warm_up_s']:.1f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--static-cache", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from evoxtral_stream.engine.backends.voxtral.tiny import build_checkpoint, write_lora_adapter

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_checkpoint(root / "ckpt" / "base", seed=0)
        write_lora_adapter(model, root / "ckpt" / "lora", rank=4, alpha=8, seed=1)
        rows = []
        for run, folder, name in RUNS:
            t = time.perf_counter()
            result = _start(root / "ckpt", root / name, args)
            rows.append({"run": run, "folder": folder, **result,
                         "process_s": time.perf_counter() - t})
            print(f"{run}: warm-up {result['warm_up_s']:.2f} s ({result['said']})", flush=True)
    print()
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv,
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
