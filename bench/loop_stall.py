"""What reading a file costs the event loop that serves every other stream.

``serve --source FILE`` and ``transcribe`` feed a file's audio to its
streams on the event loop that also serves every WebSocket client, MQTT and
the other streams. This feeds a 48 kHz stereo FLAC of ``--minutes`` to one
stream as fast as the engine takes it (transcribe's path, with a scripted
model: no model time), once whole and once damaged at 90 % (bytes
scrambled: the pass reads the file again up to the damage), with its blocks
decoded on the worker threads (``run._Steps``) and, the reference, on the
loop (the same steps taken there, as before ``b8a5195``). A task beats
every 5 ms meanwhile; the table gives the longest gap between two beats,
the 99th percentile, and the feed's wall time. Both paths feed the same
samples (checked).

Usage: ``python bench/loop_stall.py [--minutes 10] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from evoxtral_stream import run
from evoxtral_stream.audio.filereader import FileMix, open_audio_file
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine, Stream
from evoxtral_stream.events import SAMPLE_RATE, Int16Array

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
from soak import WordsBackend  # noqa: E402

__all__ = ["Row", "main", "measure"]

BEAT_S = 0.005
RATE = 48000


@dataclass(frozen=True)
class Row:
    file: str
    decoded: str
    audio_s: float
    longest_gap_ms: float
    p99_gap_ms: float
    wall_s: float


class _OnLoop(run._Steps):
    """The reference: every step taken on the loop, as before the threads."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._threaded = False


def make_files(folder: Path, minutes: float) -> tuple[Path, Path]:
    """A tone over quiet noise (FLAC compresses it as it does speech, about
    half), whole, and a copy with 4 KB scrambled at 90 % of its bytes."""
    frames = int(minutes * 60 * RATE)
    rng = np.random.default_rng(0)
    whole = folder / "whole.flac"
    with sf.SoundFile(whole, "w", RATE, 2, subtype="PCM_16") as f:
        for at in range(0, frames, RATE * 10):
            n = min(RATE * 10, frames - at)
            t = (at + np.arange(n)) / RATE
            tone = 0.3 * np.sin(2 * np.pi * 220 * t)
            f.write(np.stack([tone, tone], axis=1) + rng.normal(0, 0.01, (n, 2)))
    data = bytearray(whole.read_bytes())
    cut = len(data) * 9 // 10
    data[cut:cut + 4096] = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    damaged = folder / "damaged.flac"
    damaged.write_bytes(bytes(data))
    return whole, damaged


async def _feed(path: Path, threaded: bool) -> tuple[list[float], float, Int16Array]:
    cfg = load_config(env={})
    chunk = cfg.audio.file_chunk_ms * SAMPLE_RATE // 1000
    got: list[Int16Array] = []
    gaps: list[float] = []
    real_push = Stream.push

    def push(self: Stream, samples: Int16Array) -> None:
        got.append(samples.copy())
        real_push(self, samples)

    async def beat() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(BEAT_S)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    saved = run._Steps
    Stream.push = push  # type: ignore[method-assign]
    if not threaded:
        run._Steps = _OnLoop  # type: ignore[misc]
    try:
        with open_audio_file(path, [()]) as audio:
            async with Engine(cfg, WordsBackend()) as engine:
                beating = asyncio.ensure_future(beat())
                t0 = time.perf_counter()
                stream = engine.open_stream("file", source="file", paced=False)
                await run.feed_samples(stream, FileMix(audio, 0), chunk, realtime=False)
                wall = time.perf_counter() - t0
                beating.cancel()
    finally:
        Stream.push = real_push  # type: ignore[method-assign]
        run._Steps = saved  # type: ignore[misc]
    return gaps, wall, np.concatenate(got) if got else np.zeros(0, np.int16)


def measure(minutes: float) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in make_files(Path(tmp), minutes):
            fed: dict[bool, Int16Array] = {}
            for threaded in (False, True):
                gaps, wall, samples = asyncio.run(_feed(path, threaded))
                fed[threaded] = samples
                ms = np.array(gaps) * 1000
                rows.append(Row(path.stem, "worker thread" if threaded else
                                "event loop (reference)", round(len(samples) / SAMPLE_RATE, 1),
                                round(float(ms.max()), 1), round(float(np.percentile(ms, 99)), 1),
                                round(wall, 2)))
                print(_line(rows[-1]), flush=True)
            if not np.array_equal(fed[False], fed[True]):
                raise AssertionError(f"{path.name}: the two paths fed other samples")
    return rows


_HEAD = ("| file | decoded on | audio fed (s) | longest loop gap (ms) | p99 gap (ms) | wall (s) |\n"
         "|---|---|---:|---:|---:|---:|")


def _line(r: Row) -> str:
    return (f"| {r.file} | {r.decoded} | {r.audio_s} | {r.longest_gap_ms} | {r.p99_gap_ms} "
            f"| {r.wall_s} |")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0,
                   help="length of the 48 kHz stereo FLAC (default 10)")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    print(_HEAD, flush=True)
    rows = measure(args.minutes)
    if args.json:
        args.json.write_text(json.dumps({"minutes": args.minutes,
                                         "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
