"""Load test on loopback: many ingest streams and subscribers through the real server.

Starts the engine and its WebSocket server in this process (embedded model by
default), then from the same event loop runs ``--streams`` ingest clients,
each sending speech at real-time pace over ``/v1/ingest`` for ``--seconds``,
and ``--subscribers`` ``/v1/captions`` subscribers of all streams. Reports:
finals expected (each ingest client's own summary) vs finals received by
every subscriber (lost must be 0), final latency p50/p95, partials, dropped
subscribers, the worker's refused/superseded counts, and the growth of the
process's resident memory. Every loop is bounded in count and time, and all
traffic stays on 127.0.0.1.

Usage: ``python bench/load.py --streams 50 --subscribers 200 --seconds 60``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from evoxtral_stream.audio.sources import read_audio_file
from evoxtral_stream.config import load_config
from evoxtral_stream.data import sample_path
from evoxtral_stream.engine.backends import load_backend
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import SAMPLE_RATE
from evoxtral_stream.server.app import CaptionServer

__all__ = ["LoadResult", "run_load"]


@dataclass(frozen=True)
class LoadResult:
    streams: int
    subscribers: int
    seconds: float
    finals_expected: int
    finals_min_received: int
    finals_lost: int
    partials: int
    latency_p50: float
    latency_p95: float
    dropped_subscribers: int
    refused: int
    superseded: int
    rss_growth_mb: float
    wall_s: float


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


async def _ingest(port: int, name: str, pcm: bytes, speed: float) -> dict[str, Any]:
    async with connect(f"ws://127.0.0.1:{port}/v1/ingest?stream={name}",
                       max_size=None) as ws:
        await ws.send(json.dumps({"type": "config", "sample_rate": SAMPLE_RATE}))
        chunk = SAMPLE_RATE // 10 * 2  # 100 ms of PCM16
        t0 = asyncio.get_running_loop().time()
        for i in range(0, len(pcm), chunk):
            await ws.send(pcm[i:i + chunk])
            due = t0 + (i + chunk) / 2 / SAMPLE_RATE / speed
            await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
        await ws.send(json.dumps({"type": "end"}))
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "ingest.summary":
                return dict(msg)
    raise RuntimeError(f"{name}: no summary")


async def _subscribe(port: int, ready: asyncio.Event, stop: asyncio.Event,
                     finals: list[int], latencies: list[float], partials: list[int],
                     index: int) -> None:
    async with connect(f"ws://127.0.0.1:{port}/v1/captions", max_size=None,
                       open_timeout=60) as ws:
        await ws.recv()
        ready.set()
        while not stop.is_set():
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.5)
            except TimeoutError:
                continue
            except ConnectionClosed:
                return  # counted: its finals fall short of the others'
            msg = json.loads(raw)
            if msg["type"] == "caption":
                if msg["final"]:
                    finals[index] += 1
                    if index == 0 and msg["latency"] is not None:
                        latencies.append(float(msg["latency"]))
                elif index == 0:
                    partials[0] += 1


async def run_load(streams: int, subscribers: int, seconds: float, *,
                   speed: float = 1.0, overrides: dict[str, object] | None = None
                   ) -> LoadResult:
    """Run the load once and return what was measured."""
    cfg = load_config(overrides={"server.port": 0, "server.max_streams": streams + 10,
                                 **(overrides or {})})
    backend = load_backend(cfg.model)
    audio = read_audio_file(sample_path())
    reps = int(np.ceil(seconds * SAMPLE_RATE / len(audio)))
    pcm = np.concatenate([audio] * reps)[: int(seconds * SAMPLE_RATE)].astype("<i2").tobytes()
    rss0 = _rss_mb()
    t0 = time.monotonic()
    async with Engine(cfg, backend) as engine, CaptionServer(engine, cfg.server) as server:
        stop = asyncio.Event()
        finals = [0] * subscribers
        latencies: list[float] = []
        partials = [0]
        readies = [asyncio.Event() for _ in range(subscribers)]
        subs = [asyncio.ensure_future(_subscribe(server.port, readies[i], stop, finals,
                                                 latencies, partials, i))
                for i in range(subscribers)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
        summaries = await asyncio.wait_for(asyncio.gather(*(
            _ingest(server.port, f"load-{i:03d}", pcm, speed) for i in range(streams))),
            seconds / speed + 600)
        expected = sum(int(s["finals"]) for s in summaries)
        deadline = time.monotonic() + 60
        while min(finals) < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*subs, return_exceptions=True)
        stats = engine.stats().worker
        dropped = server.broadcaster.dropped_subscribers
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return LoadResult(
        streams=streams, subscribers=subscribers, seconds=seconds,
        finals_expected=expected, finals_min_received=min(finals),
        finals_lost=expected - min(finals), partials=partials[0],
        latency_p50=float(np.percentile(lat, 50)), latency_p95=float(np.percentile(lat, 95)),
        dropped_subscribers=dropped, refused=stats.refused, superseded=stats.superseded,
        rss_growth_mb=_rss_mb() - rss0, wall_s=time.monotonic() - t0,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--subscribers", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--no-partials", action="store_true")
    args = ap.parse_args()
    overrides: dict[str, object] = {"stream.partial_interval_ms": 0} if args.no_partials else {}
    r = asyncio.run(run_load(args.streams, args.subscribers, args.seconds, overrides=overrides))
    print("| streams | subscribers | audio s/stream | finals expected | finals lost | "
          "final latency p50 | p95 | partials (1 subscriber) | dropped subscribers | "
          "partials refused | superseded | RSS growth | wall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {r.streams} | {r.subscribers} | {r.seconds:.0f} | {r.finals_expected} | "
          f"{r.finals_lost} | {r.latency_p50:.2f} s | {r.latency_p95:.2f} s | {r.partials} | "
          f"{r.dropped_subscribers} | {r.refused} | {r.superseded} | "
          f"{r.rss_growth_mb:.0f} MB | {r.wall_s:.0f} s |")


if __name__ == "__main__":
    main()
