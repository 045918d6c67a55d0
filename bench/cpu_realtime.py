"""Real-time factor and end-of-speech → final latency on the CPU.

Streams speech at real-time pace through the real engine (segmenter,
sessions, model worker, merger, and a WebSocket subscriber) and reports:

- RTF: seconds the model thread was busy per second of audio, with partials
  every ``stream.partial_interval_ms`` (and with partials off, for contrast);
- final latency: from the end-of-speech decision to the final caption event,
  p50/p95/max, as received by a real WebSocket subscriber;
- with ``--prefix-reuse`` (one or more of off, partials, all: run side by
  side, ``--repeat`` times in turn), one row per mode, with the requests that
  carried a prefix and the tokens the model generated (prefixes not counted);
- with ``--pause-partial``, ``stream.pause_partial`` on and off side by side
  (``--repeat`` times in turn), with the finals the model decoded (the
  others took the text of the partial made at their pause).

Usage: ``python bench/cpu_realtime.py [--plays N] [--streams K] [--audio FILE]
[--prefix-reuse MODE ...] [--repeat R] [--no-reference]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from websockets.asyncio.client import connect

from evoxtral_stream.audio.sources import read_audio_file
from evoxtral_stream.config import Config, load_config
from evoxtral_stream.data import sample_path
from evoxtral_stream.engine.backends import load_backend
from evoxtral_stream.engine.backends.base import Backend, Done, Job, JobBackend
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import SAMPLE_RATE, DecodeRequest, RequestKind
from evoxtral_stream.run import FileJob, transcribe_samples
from evoxtral_stream.server.app import CaptionServer


@dataclass(frozen=True)
class Row:
    label: str
    streams: int
    audio_s: float
    wall_s: float
    busy_s: float
    finals: int
    partials: int
    lat_p50: float
    lat_p95: float
    lat_max: float
    requests: int = 0
    prefixed: int = 0
    tokens: int = 0
    final_decodes: int = 0

    @property
    def rtf(self) -> float:
        return self.busy_s / (self.audio_s * self.streams)


class Counting:
    """Passes jobs to a :class:`JobBackend` and counts them: requests, those
    with a prefix, and tokens generated. Called from the model thread only."""

    def __init__(self, inner: JobBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.requests = self.prefixed = self.tokens = self.final_decodes = 0
        self._lock = threading.Lock()

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        return [d.text for d in self.transcribe_jobs([Job(i, a) for i, a in enumerate(batch)])]

    def transcribe_jobs(self, jobs: Sequence[Job]) -> list[Done]:
        done = self.inner.transcribe_jobs(jobs)
        with self._lock:
            self.requests += len(jobs)
            self.prefixed += sum(1 for j in jobs if j.prefix)
            self.tokens += sum(d.tokens for d in done)
            self.final_decodes += sum(1 for j in jobs if isinstance(j.key, DecodeRequest)
                                      and j.key.kind is RequestKind.FINAL)
        return done


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


async def run_once(cfg: Config, backend: Backend, audio: np.ndarray, streams: int,
                   label: str) -> Row:
    latencies: list[float] = []
    finals = partials = 0
    async with Engine(cfg, backend) as engine, CaptionServer(engine, cfg.server) as server:
        async with connect(f"ws://127.0.0.1:{server.port}/v1/captions") as ws:
            await ws.recv()
            done = asyncio.Event()
            ended = 0

            async def read() -> None:
                nonlocal finals, partials, ended
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg["type"] == "caption":
                        if msg["final"]:
                            finals += 1
                            latencies.append(msg["latency"])
                        else:
                            partials += 1
                    elif msg["type"] == "stream.ended":
                        ended += 1
                        if ended == streams:
                            done.set()
                            return

            reader = asyncio.ensure_future(read())
            t0 = time.monotonic()
            jobs = [FileJob(f"s{i}", audio) for i in range(streams)]
            await transcribe_samples(cfg, engine, jobs, realtime=True)
            await asyncio.wait_for(done.wait(), 60)
            wall = time.monotonic() - t0
            reader.cancel()
        busy = engine.stats().worker.busy_s
    counts = (backend.requests, backend.prefixed, backend.tokens,
              backend.final_decodes) if isinstance(backend, Counting) else (0, 0, 0, 0)
    return Row(label, streams, len(audio) / SAMPLE_RATE, wall, busy, finals, partials,
               pct(latencies, 50), pct(latencies, 95), max(latencies, default=float("nan")),
               *counts)


def table(rows: list[Row]) -> str:
    counted = any(r.requests for r in rows)
    extra = (" requests | with prefix | tokens generated | finals decoded |"
             if counted else "")
    head = ("| run | streams | audio s/stream | RTF | finals | partials | "
            f"final latency p50 | p95 | max |{extra}\n"
            f"|---|---|---|---|---|---|---|---|---|{'---|---|---|---|' if counted else ''}")
    lines = [f"| {r.label} | {r.streams} | {r.audio_s:.1f} | {r.rtf:.3f} | {r.finals} | "
             f"{r.partials} | {r.lat_p50:.3f} s | {r.lat_p95:.3f} s | {r.lat_max:.3f} s |"
             + (f" {r.requests} | {r.prefixed} | {r.tokens} | {r.final_decodes} |"
                if counted else "")
             for r in rows]
    return "\n".join([head, *lines])


async def compare_settings(audio: np.ndarray, streams: int, key: str,
                           values: Sequence[object], repeat: int) -> tuple[str, list[Row]]:
    """One row per value of config ``key`` and repeat, the values taking turns
    (so a slow spell of the machine falls on all of them), on one loaded model."""
    base = load_config(overrides={"server.port": 0})
    backend = load_backend(base.model)
    backend.transcribe([np.zeros(SAMPLE_RATE, np.float32)])  # warm-up
    if not isinstance(backend, JobBackend):
        raise SystemExit(f"{backend.name} takes no jobs (not a JobBackend)")
    rows: list[Row] = []
    for r in range(repeat):
        for value in values:
            cfg = load_config(overrides={"server.port": 0, key: value})
            shown = ("on" if value else "off") if isinstance(value, bool) else value
            label = f"{key.split('.')[-1]} = {shown}" + (f" (run {r + 1})" if repeat > 1 else "")
            rows.append(await run_once(cfg, Counting(backend), audio, streams, label))
    return backend.name, rows


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--plays", type=int, default=4, help="repeat the audio this many times")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--audio", default=None, help="audio file (default: the bundled sample)")
    ap.add_argument("--prefix-reuse", nargs="+", choices=("off", "partials", "all"),
                    default=None, metavar="MODE",
                    help="compare stream.prefix_reuse modes (off, partials, all) side by side")
    ap.add_argument("--repeat", type=int, default=1,
                    help="with --prefix-reuse: run the modes this many times, in turn")
    ap.add_argument("--pause-partial", action="store_true",
                    help="compare stream.pause_partial on and off side by side")
    ap.add_argument("--no-reference", action="store_true",
                    help="with --prefix-reuse: skip the 30 s window and finals-only rows")
    args = ap.parse_args()
    audio = read_audio_file(args.audio or sample_path())
    audio = np.concatenate([audio] * args.plays)
    machine = (f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; "
               f"python {platform.python_version()}")
    if args.pause_partial:
        name, compared = await compare_settings(audio, args.streams, "stream.pause_partial",
                                                (True, False), args.repeat)
        print(f"backend: {name}; stream.pause_partial, partials every 1 s; {machine}")
        print(table(compared))
        return
    if args.prefix_reuse:
        name, compared = await compare_settings(audio, args.streams, "stream.prefix_reuse",
                                                args.prefix_reuse, args.repeat)
        print(f"backend: {name}; stream.prefix_reuse, partials every 1 s; {machine}")
        print(table(compared))
        if args.no_reference:
            return
        print()
    base = load_config(overrides={"server.port": 0})
    backend = load_backend(base.model)
    backend.transcribe([np.zeros(SAMPLE_RATE, np.float32)])  # warm-up
    # The reference: the same model padded to Whisper's classic 30 s window,
    # as faster-whisper's WhisperModel.transcribe always does.
    classic = load_config(overrides={"server.port": 0, "model.whisper.min_window_s": 30.0})
    classic_backend = load_backend(classic.model)
    classic_backend.transcribe([np.zeros(SAMPLE_RATE, np.float32)])
    rows = [
        await run_once(base, backend, audio, args.streams,
                       f"partials every 1 s, window ≥ {base.model.whisper.min_window_s:g} s"),
        await run_once(classic, classic_backend, audio, args.streams,
                       "partials every 1 s, 30 s window (reference)"),
        await run_once(load_config(overrides={"server.port": 0,
                                               "stream.partial_interval_ms": 0}),
                       backend, audio, args.streams, "finals only"),
    ]
    print(f"backend: {backend.name}; {machine}")
    print(table(rows))
    p95 = rows[0].lat_p95
    print(f"\nRTF with 1 s partials: {rows[0].rtf:.3f} (target ≤ 0.3); "
          f"final latency p95: {p95:.3f} s (target ≤ 1.0 s)")


if __name__ == "__main__":
    asyncio.run(main())
