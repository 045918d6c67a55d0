"""Load test on loopback: many ingest streams and subscribers through the real server.

Starts the engine and its WebSocket server in this process, and runs the
clients in a second process (this script with ``--client``), so that what
this process spends is the server's own: ``--streams`` ingest clients, each
sending speech at real-time pace over ``/v1/ingest`` for ``--seconds``, and
``--subscribers`` ``/v1/captions`` subscribers of all streams. Each stream
starts at its own place in the bundled sample and its own phase of the
100 ms chunk clock, as independent speakers do (``--in-phase``: all
together, the worst case).

Backends: ``model`` (the default) is the configured model (the embedded
Whisper on a CPU); ``scripted`` is ``bench/soak.py``'s ``WordsBackend``, one
word per half second of audio with no model time, so what is measured is the
host side: WebSocket ingest, resampling and VAD, sessions, merger, broadcast,
and with ``--journal on`` the journal (as ``serve`` runs in production).

Reports: finals expected (each ingest client's own summary) vs finals
received by every subscriber (lost must be 0), the ``latency`` field of
finals p50/p95 (engine: end of speech decided → caption ready), end of speech
→ final received by a subscriber p50/p95 (client side: from when the client
sent the chunk that completes the hangover, the final's audio end plus
``vad.end_silence_ms`` − ``vad.end_tail_ms``, so it counts ingest lag, the
event loop's lag and the network too), partials, partials
per stream per second (the ingest summaries' count), dropped subscribers,
the worker's refused/superseded counts, the server process's CPU (user + sys,
all its threads) while the streams were sent, as % of one core for the
whole process and per stream (CPU seconds per audio second per stream), the
event loop's lag p95 and max (a 50 ms ticker in the server), how late the
clients sent their chunks (p95: if that grows the client process, not the
server, was short of CPU), the clients' CPU, and the growth of the server
process's resident memory. Every loop is bounded in count and time, and all
traffic stays on 127.0.0.1.

``--profile FILE`` runs cProfile on the server's event-loop thread while the
streams are sent (pstats to FILE, the top entries to stderr); it slows that
thread, so its CPU row is not a measurement.

Usage: ``python bench/load.py --streams 50 --subscribers 200 --seconds 60``;
host side only: ``python bench/load.py --backend scripted --streams 100
--subscribers 20 --seconds 60 --journal on``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import io
import json
import math
import pstats
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from evoxtral_stream.audio.sources import read_audio_file
from evoxtral_stream.config import load_config
from evoxtral_stream.data import sample_path
from evoxtral_stream.engine.backends import load_backend
from evoxtral_stream.engine.backends.base import Backend
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import SAMPLE_RATE
from evoxtral_stream.server.app import CaptionServer

_SCRIPT = Path(__file__).resolve()
_HERE = _SCRIPT.parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
from soak import WordsBackend  # noqa: E402

__all__ = ["BACKENDS", "LoadResult", "main", "run_clients", "run_load"]

BACKENDS = ("model", "scripted")
_CHUNK_S = 0.1
_TICK_S = 0.05
_CATCH_UP_S = 60.0  # how long subscribers may take to get every final once ingest ended


@dataclass(frozen=True)
class LoadResult:
    streams: int
    subscribers: int
    seconds: float
    finals_expected: int
    finals_min_received: int
    finals_lost: int
    partials: int
    """Partials subscriber 0 received (all streams)."""
    latency_p50: float
    latency_p95: float
    dropped_subscribers: int
    refused: int
    superseded: int
    rss_growth_mb: float
    wall_s: float
    backend: str
    journal: bool
    partials_per_stream_s: float
    """The ingest summaries' partials per stream per audio second."""
    e2e_p50: float
    e2e_p95: float
    """End of speech → final received by subscriber 0, seconds (client side)."""
    ingest_s: float
    """Wall seconds from the first chunk sent to the last ingest summary."""
    server_cpu_s: float
    """User + sys CPU seconds of the server process over ``ingest_s``."""
    server_cpu_pct: float
    """``server_cpu_s`` as % of one core over ``ingest_s``."""
    cpu_pct_per_stream: float
    """Server CPU seconds per audio second per stream, as % of one core."""
    loop_lag_p95_ms: float
    loop_lag_max_ms: float
    send_lag_p95_ms: float
    """How late the clients sent their chunks (p95), ms."""
    client_loop_lag_p95_ms: float
    """The client process's own loop lag: high, and the clients were the bottleneck."""
    client_cpu_s: float


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


# --- clients (second process) ------------------------------------------------


@dataclass(frozen=True)
class _ClientSpec:
    port: int
    streams: int
    subscribers: int
    seconds: float
    speed: float
    in_phase: bool
    hangover_s: float
    """vad.end_silence_ms − vad.end_tail_ms: a final's audio end → end of speech."""


@dataclass
class _Clients:
    finals: list[int]
    partials: int = 0
    latencies: list[float] = dataclasses.field(default_factory=list)
    received: list[tuple[str, float, float]] = dataclasses.field(default_factory=list)
    """Subscriber 0's finals: stream, audio end, monotonic time received."""
    started: dict[str, float] = dataclasses.field(default_factory=dict)
    send_lags: list[float] = dataclasses.field(default_factory=list)


async def _ingest(spec: _ClientSpec, index: int, pcm: bytes, c: _Clients) -> dict[str, Any]:
    name = f"load-{index:03d}"
    chunk = int(SAMPLE_RATE * _CHUNK_S) * 2  # 100 ms of PCM16
    n_bytes = int(spec.seconds * SAMPLE_RATE) * 2
    loop = asyncio.get_running_loop()
    if not spec.in_phase:
        # Speakers are independent: each stream on its own phase of the chunk
        # clock and at its own place in the sample.
        await asyncio.sleep(_CHUNK_S * index / spec.streams)
        offset = (len(pcm) // 2 - n_bytes // 2) * index // spec.streams * 2
    else:
        offset = 0
    async with connect(f"ws://127.0.0.1:{spec.port}/v1/ingest?stream={name}",
                       max_size=None) as ws:
        await ws.send(json.dumps({"type": "config", "sample_rate": SAMPLE_RATE}))
        # Read while sending: the stream's own captions come back on this
        # connection, and unread they would stall it (pongs queue behind them).
        reader = asyncio.ensure_future(_summary(ws))
        t0 = loop.time()
        c.started[name] = t0
        for i in range(0, n_bytes, chunk):
            due = t0 + i / 2 / SAMPLE_RATE / spec.speed
            c.send_lags.append(max(0.0, loop.time() - due))
            await ws.send(pcm[offset + i:offset + min(i + chunk, n_bytes)])
            due = t0 + (i + chunk) / 2 / SAMPLE_RATE / spec.speed
            await asyncio.sleep(max(0.0, due - loop.time()))
        await ws.send(json.dumps({"type": "end"}))
        summary = await reader
    if summary is None:
        raise RuntimeError(f"{name}: no summary")
    return summary


async def _summary(ws: ClientConnection) -> dict[str, Any] | None:
    async for raw in ws:
        msg = json.loads(raw)
        if msg["type"] == "ingest.summary":
            return dict(msg)
    return None


async def _subscribe(spec: _ClientSpec, ready: asyncio.Event, c: _Clients, index: int) -> None:
    """Count what arrives until cancelled (no timeout per message: that would
    cost the client a task per caption)."""
    loop = asyncio.get_running_loop()
    async with connect(f"ws://127.0.0.1:{spec.port}/v1/captions", max_size=None,
                       open_timeout=60) as ws:
        await ws.recv()
        ready.set()
        try:
            async for raw in ws:
                _count(json.loads(raw), c, index, loop.time())
        except ConnectionClosed:
            return  # counted: its finals fall short of the others'


def _count(msg: dict[str, Any], c: _Clients, index: int, now: float) -> None:
    if msg["type"] == "caption":
        if msg["final"]:
            c.finals[index] += 1
            if index == 0:
                c.received.append((str(msg["stream"]), float(msg["end"]), now))
                if msg["latency"] is not None:
                    c.latencies.append(float(msg["latency"]))
        elif index == 0:
            c.partials += 1


async def run_clients(spec: _ClientSpec, out: Any = None) -> dict[str, Any]:
    """The client side: subscribers, then the ingest streams; returns their counts.

    Writes ``subscribed`` and ``ingested`` lines to ``out`` (stdout) as the
    ingest starts and once every summary is in, so the server can time it."""
    out = out if out is not None else sys.stdout
    audio = read_audio_file(sample_path())
    n = int(spec.seconds * SAMPLE_RATE)
    reps = int(np.ceil(2 * n / len(audio))) + 1
    pcm = np.concatenate([audio] * reps)[: n + len(audio)].astype("<i2").tobytes()
    c = _Clients(finals=[0] * spec.subscribers)
    readies = [asyncio.Event() for _ in range(spec.subscribers)]
    subs = [asyncio.ensure_future(_subscribe(spec, readies[i], c, i))
            for i in range(spec.subscribers)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
    lags: list[float] = []
    ticker = asyncio.ensure_future(_ticker(lags))
    print("subscribed", file=out, flush=True)
    summaries = await asyncio.wait_for(asyncio.gather(*(
        _ingest(spec, i, pcm, c) for i in range(spec.streams))),
        spec.seconds / spec.speed + 600)
    print("ingested", file=out, flush=True)
    ticker.cancel()
    expected = sum(int(s["finals"]) for s in summaries)
    deadline = time.monotonic() + _CATCH_UP_S
    while min(c.finals) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    for t in subs:
        t.cancel()
    await asyncio.gather(*subs, return_exceptions=True)
    # From when the chunk that completes the hangover was sent (a chunk goes
    # at the start of its 100 ms). A final cut by the stream's end (flushed by
    # ``end``) had no end of speech.
    e2e = [at - (c.started[s] + math.floor((end + spec.hangover_s) / _CHUNK_S + 1e-9)
                 * _CHUNK_S / spec.speed)
           for s, end, at in c.received if end < spec.seconds - 0.05]
    return {
        "expected": expected, "finals": c.finals, "partials": c.partials,
        "summary_partials": sum(int(s["partials"]) for s in summaries),
        "latencies": c.latencies, "e2e": e2e,
        "send_lag_p95": _pct(c.send_lags, 95), "loop_lag_p95": _pct(lags, 95),
        "cpu_s": _cpu_s(),
    }


# --- server (this process) ----------------------------------------------------


async def _ticker(lags: list[float]) -> None:
    """Records how late a 50 ms sleep wakes: the event loop's lag."""
    loop = asyncio.get_running_loop()
    due = loop.time() + _TICK_S
    while True:
        await asyncio.sleep(max(0.0, due - loop.time()))
        now = loop.time()
        lags.append(max(0.0, now - due))
        due = now + _TICK_S


async def _expect(stream: asyncio.StreamReader, word: str, limit_s: float) -> None:
    line = (await asyncio.wait_for(stream.readline(), limit_s)).decode().strip()
    if line != word:
        raise RuntimeError(f"load client process: expected {word!r}, got {line!r}")


async def run_load(streams: int, subscribers: int, seconds: float, *,
                   speed: float = 1.0, overrides: dict[str, object] | None = None,
                   backend: str = "model", journal: bool = False, in_phase: bool = False,
                   profile: Path | None = None) -> LoadResult:
    """Run the load once and return what was measured."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    with tempfile.TemporaryDirectory(prefix="load-journal-") as tmp:
        return await _run_load(streams, subscribers, seconds, speed=speed,
                               overrides=overrides, backend=backend, journal=journal,
                               journal_dir=tmp, in_phase=in_phase, profile=profile)


async def _run_load(streams: int, subscribers: int, seconds: float, *, speed: float,
                    overrides: dict[str, object] | None, backend: str, journal: bool,
                    journal_dir: str, in_phase: bool, profile: Path | None) -> LoadResult:
    cfg = load_config(overrides={"server.port": 0, "server.max_streams": streams + 10,
                                 "journal.enabled": journal, "journal.dir": journal_dir,
                                 **(overrides or {})})
    model: Backend = WordsBackend() if backend == "scripted" else load_backend(cfg.model)
    rss0 = _rss_mb()
    t0 = time.monotonic()
    lags: list[float] = []
    prof = cProfile.Profile() if profile is not None else None
    async with Engine(cfg, model) as engine, CaptionServer(engine, cfg.server) as server:
        spec = _ClientSpec(port=server.port, streams=streams, subscribers=subscribers,
                           seconds=seconds, speed=speed, in_phase=in_phase,
                           hangover_s=(cfg.vad.end_silence_ms - cfg.vad.end_tail_ms) / 1000)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(_SCRIPT), "--client",
            json.dumps(dataclasses.asdict(spec)), stdout=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            await _expect(proc.stdout, "subscribed", 120)
            ticker = asyncio.ensure_future(_ticker(lags))
            cpu0, ingest0 = _cpu_s(), time.monotonic()
            if prof is not None:
                prof.enable()
            try:
                await _expect(proc.stdout, "ingested", seconds / speed + 600)
            finally:
                if prof is not None:
                    prof.disable()
                ticker.cancel()
            cpu_s, ingest_s = _cpu_s() - cpu0, time.monotonic() - ingest0
            raw = await asyncio.wait_for(proc.stdout.read(), _CATCH_UP_S + 60)
            if await proc.wait() != 0 or not raw.strip():
                raise RuntimeError(f"load client process failed (exit status {proc.returncode})")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        clients: dict[str, Any] = json.loads(raw.decode().strip().splitlines()[-1])
        stats = engine.stats().worker
        dropped = server.broadcaster.dropped_subscribers
    if prof is not None and profile is not None:
        prof.dump_stats(str(profile))
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
        print(text.getvalue(), file=sys.stderr)
    finals: list[int] = clients["finals"]
    expected = int(clients["expected"])
    lat, e2e = clients["latencies"], clients["e2e"]
    return LoadResult(
        streams=streams, subscribers=subscribers, seconds=seconds,
        finals_expected=expected, finals_min_received=min(finals),
        finals_lost=expected - min(finals), partials=int(clients["partials"]),
        latency_p50=_pct(lat, 50), latency_p95=_pct(lat, 95),
        dropped_subscribers=dropped, refused=stats.refused, superseded=stats.superseded,
        rss_growth_mb=_rss_mb() - rss0, wall_s=time.monotonic() - t0,
        backend=backend, journal=journal,
        partials_per_stream_s=int(clients["summary_partials"]) / streams / seconds,
        e2e_p50=_pct(e2e, 50), e2e_p95=_pct(e2e, 95),
        ingest_s=ingest_s, server_cpu_s=cpu_s,
        server_cpu_pct=100 * cpu_s / ingest_s,
        cpu_pct_per_stream=100 * cpu_s / (streams * seconds),
        loop_lag_p95_ms=1000 * _pct(lags, 95), loop_lag_max_ms=1000 * max(lags, default=0.0),
        send_lag_p95_ms=1000 * float(clients["send_lag_p95"]),
        client_loop_lag_p95_ms=1000 * float(clients["loop_lag_p95"]),
        client_cpu_s=float(clients["cpu_s"]),
    )


def report(r: LoadResult) -> str:
    """The result as markdown: the first table as before, then the host's costs."""
    return "\n".join([
        "| streams | subscribers | audio s/stream | finals expected | finals lost | "
        "final latency p50 | p95 | partials (1 subscriber) | dropped subscribers | "
        "partials refused | superseded | RSS growth | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r.streams} | {r.subscribers} | {r.seconds:.0f} | {r.finals_expected} | "
        f"{r.finals_lost} | {r.latency_p50:.2f} s | {r.latency_p95:.2f} s | {r.partials} | "
        f"{r.dropped_subscribers} | {r.refused} | {r.superseded} | "
        f"{r.rss_growth_mb:.0f} MB | {r.wall_s:.0f} s |",
        "",
        "| backend | journal | streams | server CPU (% of 1 core) | per stream | "
        "loop lag p95 | max | end of speech → final received p50 | p95 | "
        "partials/stream/s | client send lag p95 | client loop lag p95 | client CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r.backend} | {'on' if r.journal else 'off'} | {r.streams} | "
        f"{r.server_cpu_pct:.0f} % | {r.cpu_pct_per_stream:.2f} % | "
        f"{r.loop_lag_p95_ms:.1f} ms | {r.loop_lag_max_ms:.0f} ms | "
        f"{r.e2e_p50 * 1000:.0f} ms | {r.e2e_p95 * 1000:.0f} ms | "
        f"{r.partials_per_stream_s:.2f} | {r.send_lag_p95_ms:.1f} ms | "
        f"{r.client_loop_lag_p95_ms:.1f} ms | {r.client_cpu_s:.0f} s |",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--subscribers", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--no-partials", action="store_true")
    ap.add_argument("--backend", choices=BACKENDS, default="model",
                    help="model: the configured one; scripted: no model time "
                         "(default %(default)s)")
    ap.add_argument("--journal", choices=("on", "off"), default="off",
                    help="the journal in a temporary folder (default %(default)s)")
    ap.add_argument("--in-phase", action="store_true",
                    help="every stream at the same place in the sample and chunk clock")
    ap.add_argument("--profile", type=Path, help="cProfile the server's event loop to FILE")
    ap.add_argument("--json", type=Path, help="also write the result as JSON")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client is not None:
        out = asyncio.run(run_clients(_ClientSpec(**json.loads(args.client))))
        print(json.dumps(out), flush=True)
        return 0
    if args.streams < 1 or args.subscribers < 1 or args.seconds <= 0:
        raise SystemExit("--streams, --subscribers and --seconds must be positive")
    overrides: dict[str, object] = {"stream.partial_interval_ms": 0} if args.no_partials else {}
    r = asyncio.run(run_load(args.streams, args.subscribers, args.seconds,
                             overrides=overrides, backend=args.backend,
                             journal=args.journal == "on", in_phase=args.in_phase,
                             profile=args.profile))
    print(report(r))
    if args.json is not None:
        args.json.write_text(json.dumps(dataclasses.asdict(r), indent=1))
    return 0 if r.finals_lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
