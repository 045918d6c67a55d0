"""Soak test: does memory stay flat over many hours of audio?

Runs the engine and its WebSocket server (loopback, port 0) in this process,
with the journal on in a temporary folder (small ``journal.max_bytes`` and
``journal.retention_s``, so files rotate and are pruned during the run). A
second process (this script with ``--client``) plays the clients, so the
server's memory is measured alone and the clients get the second core:

- ``--streams`` ingest clients push the bundled sample, looped, over
  ``/v1/ingest``, faster than real time. Each reconnects as a new stream (a
  new stream id) every ``--stream-minutes`` of audio, so streams open and
  close all along. Pacing: at most ``--speed`` times real time per stream
  (0: no cap), and never more than ``--max-lead-s`` seconds of audio ahead
  of the newest caption its connection received (waiting at most
  ``--lead-wait-s`` wall seconds, so silence cannot stall it). So a slow
  model (Whisper) sets the pace and still gets its partials, as
  ``evoxtral_stream.run.feed_samples`` does for a file.
- ``--subscribers`` clients subscribe to every stream on ``/v1/captions``
  and reconnect every ``--subscriber-minutes`` of audio (per stream) after a
  short random pause, resuming with ``?since=STREAM:SEQ,...`` for every
  stream they are not done with. They know the stream ids from the ingest
  clients, as a dashboard knows its rooms (an ingest client names its next
  id a whole connection ahead).

Backends: ``scripted`` returns one word per half second of audio (the idea of
``tests/fakes.py``'s ``words_so_far``) with no model time, so the run is
about the pipeline's own memory; ``whisper`` is the embedded Whisper tiny.en.

Every ``--sample-minutes`` of audio per stream (and at 25% and 100% of the
run) the server process records, after a ``gc.collect()``: audio hours done,
RSS (VmRSS of /proc/self/status), the Python heap (tracemalloc, with
``--tracemalloc``), engine streams open, journal files open, broadcaster
subscribers, gc objects, open file descriptors, threads and the captions
the broadcaster retains for resume. The report is a markdown table of the
samples, a growth summary (RSS and heap at 25% vs 100%, least-squares slope
in MB per audio-hour over the samples from 25% on), with ``--tracemalloc``
the 10 allocation sites that grew most between the 25% snapshot and the
end, and the correctness check: the finals each ingest connection's summary
counted, against those every subscriber received (lost must be 0).

Usage: ``python bench/soak.py --backend scripted --hours 5 --streams 20
--subscribers 4 --tracemalloc``
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from evoxtral_stream.audio.sources import read_audio_file
from evoxtral_stream.config import load_config
from evoxtral_stream.data import sample_path
from evoxtral_stream.engine.backends import load_backend
from evoxtral_stream.engine.backends.base import Backend
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.engine.journal import parse_file_name
from evoxtral_stream.events import SAMPLE_RATE
from evoxtral_stream.server.app import CaptionServer

__all__ = ["Sample", "SoakParams", "SoakResult", "WordsBackend", "main", "run_soak"]

log = logging.getLogger("soak")

_POLL_S = 0.2
_SCRIPT = Path(__file__).resolve()
_CLIENT_DONE_S = 120.0  # how long subscribers may take to catch up once ingest ended


@dataclass(frozen=True)
class SoakParams:
    backend: str = "scripted"
    hours: float = 1.0
    """Hours of audio per ingest client (over all its connections)."""
    streams: int = 4
    subscribers: int = 2
    stream_minutes: float = 10.0
    """Audio per ingest connection: a new stream id after that much."""
    subscriber_minutes: float = 5.0
    """Subscribers reconnect after this much audio per stream."""
    sample_minutes: float = 10.0
    """A sample every this much audio per stream."""
    speed: float = 0.0
    """Cap per stream, times real time (0: none; the lead still paces)."""
    max_lead_s: float = 6.0
    lead_wait_s: float = 2.0
    chunk_ms: int = 100
    tracemalloc: bool = False
    journal_max_bytes: int = 16384
    journal_keep: int = 2
    journal_retention_s: float = 60.0
    seed: int = 0


@dataclass(frozen=True)
class Sample:
    label: str
    audio_h: float
    """Audio received by the engine, all streams together."""
    audio_h_per_stream: float
    wall_s: float
    rss_mb: float
    heap_mb: float | None
    streams_open: int
    journal_open_files: int
    subscribers: int
    gc_objects: int
    fds: int
    threads: int
    retained_captions: int
    journal_files: int
    journal_max_index: int
    """Highest rotation index among the files on disk (0: none)."""


@dataclass(frozen=True)
class GrowthSite:
    where: str
    size_kb: float
    count: int


@dataclass(frozen=True)
class SoakResult:
    params: SoakParams
    samples: list[Sample]
    end: Sample
    """After every client left and the streams closed."""
    streams_opened: int
    audio_h: float
    finals_expected: int
    finals_ingest: int
    """Finals the ingest connections received themselves."""
    finals_min_received: int
    finals_lost: int
    """Worst subscriber: finals of the summaries it never received."""
    finals_extra: int
    """Finals received twice, or more than the summaries counted."""
    gaps: int
    partials: int
    subscriber_sessions: int
    dropped_subscribers: int
    client_errors: dict[str, int]
    warnings: int
    first_warnings: list[str]
    lead_wait_s: float
    """Wall seconds the ingest clients waited for captions (all together)."""
    lead_timeouts: int
    journal_appends: int
    journal_pruned: int
    journal_max_index: int
    worker: dict[str, Any]
    wall_s: float
    rss_25_mb: float
    rss_100_mb: float
    rss_slope_mb_per_audio_h: float
    heap_25_mb: float | None
    heap_100_mb: float | None
    heap_slope_mb_per_audio_h: float | None
    top_growth: list[GrowthSite] = field(default_factory=list)


class WordsBackend:
    """Scripted: one word per half second of audio, as ``tests/fakes.py``'s
    ``words_so_far``; partials grow with the segment, finals hold it all."""

    name = "scripted-words"

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        return [" ".join(f"w{i}" for i in range(len(a) // 8000)) for a in batch]


# --- measuring (server process) ---------------------------------------------


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def _threads() -> int:
    return _status_kb("Threads")


def _journal_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".jsonl")] if folder.is_dir() else []


class _Sampler:
    def __init__(self, engine: Engine, server: CaptionServer, journal_dir: Path,
                 streams: int, t0: float) -> None:
        self._engine = engine
        self._server = server
        self._dir = journal_dir
        self._streams = streams
        self._t0 = t0

    def audio_s(self) -> float:
        return self._engine.stats().audio_s

    def take(self, label: str) -> Sample:
        gc.collect()
        st = self._engine.stats()
        return Sample(
            label=label, audio_h=st.audio_s / 3600,
            audio_h_per_stream=st.audio_s / 3600 / self._streams,
            wall_s=time.monotonic() - self._t0, rss_mb=_rss_mb(),
            heap_mb=(tracemalloc.get_traced_memory()[0] / 2**20
                     if tracemalloc.is_tracing() else None),
            streams_open=st.streams, journal_open_files=st.journal_open_files,
            subscribers=self._server.broadcaster.subscribers,
            gc_objects=len(gc.get_objects()), fds=len(os.listdir("/proc/self/fd")),
            threads=_threads(), retained_captions=self._server.broadcaster.retained_captions,
            journal_files=len(files := _journal_files(self._dir)),
            journal_max_index=max((info.index for f in files
                                   if (info := parse_file_name(f.name)) is not None), default=0),
        )


class _CountWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(f"{record.name}: {record.getMessage()}"[:200])


async def _poll(done: Callable[[], bool], limit_s: float, every_s: float) -> None:
    """Return once ``done()``, or after about ``limit_s`` (counters with no event)."""
    for _ in range(math.ceil(limit_s / every_s)):
        if done():
            return
        await asyncio.sleep(every_s)


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    if len(xs) < 2 or max(xs) - min(xs) <= 0:
        return 0.0
    return float(np.polyfit(np.asarray(xs), np.asarray(ys), 1)[0])


def _thresholds(p: SoakParams) -> list[float]:
    """Audio seconds per stream at which to sample."""
    total = p.hours * 3600
    step = p.sample_minutes * 60
    marks = {round(k * step, 6) for k in range(1, int(total // step) + 1)}
    marks |= {round(0.25 * total, 6), round(total, 6)}
    return sorted(m for m in marks if 0 < m <= total)


def _top_growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot,
                n: int = 10) -> list[GrowthSite]:
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__),
              tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
              tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
              tracemalloc.Filter(False, "<unknown>")]
    diff = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "lineno")
    grew = sorted((d for d in diff if d.size_diff > 0), key=lambda d: -d.size_diff)[:n]
    return [GrowthSite(f"{d.traceback[0].filename}:{d.traceback[0].lineno}",
                       d.size_diff / 1024, d.count_diff) for d in grew]


async def run_soak(p: SoakParams) -> SoakResult:
    """Run the soak once and return what was measured."""
    warnings = _CountWarnings()
    logging.getLogger("evoxtral_stream").addHandler(warnings)
    try:
        with tempfile.TemporaryDirectory(prefix="soak-journal-") as tmp:
            return await _run_soak(p, Path(tmp), warnings)
    finally:
        logging.getLogger("evoxtral_stream").removeHandler(warnings)


async def _run_soak(p: SoakParams, journal_dir: Path, warnings: _CountWarnings) -> SoakResult:
    overrides: dict[str, object] = {
        "server.port": 0, "server.max_streams": p.streams + 10,
        "server.max_ingest_speed": 0.0,
        "journal.enabled": True, "journal.dir": str(journal_dir),
        "journal.max_bytes": p.journal_max_bytes, "journal.keep": p.journal_keep,
        "journal.retention_s": p.journal_retention_s,
    }
    if p.backend == "whisper":
        overrides["model.backend"] = "whisper"
    cfg = load_config(overrides=overrides)
    backend: Backend = WordsBackend() if p.backend == "scripted" else load_backend(cfg.model)
    if p.tracemalloc:
        tracemalloc.start()
    try:
        t0 = time.monotonic()
        async with Engine(cfg, backend) as engine, CaptionServer(engine, cfg.server) as server:
            sampler = _Sampler(engine, server, journal_dir, p.streams, t0)
            samples = [sampler.take("start")]
            marks = _thresholds(p)
            quarter = 0.25 * p.hours * 3600
            snap25: tracemalloc.Snapshot | None = None
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(_SCRIPT), "--client",
                json.dumps({**dataclasses.asdict(p), "port": server.port}),
                stdout=asyncio.subprocess.PIPE)
            assert proc.stdout is not None
            out_task = asyncio.ensure_future(proc.stdout.read())
            while not out_task.done():
                per_stream = sampler.audio_s() / p.streams
                while marks and per_stream >= marks[0] - 1e-6:
                    mark = marks.pop(0)
                    label = f"{mark / (p.hours * 3600):.0%}"
                    samples.append(sampler.take(label))
                    s = samples[-1]
                    log.info("%s: %.2f audio h, %.0f s, RSS %.1f MB, heap %s MB", label,
                             s.audio_h, s.wall_s, s.rss_mb, _mb(s.heap_mb))
                    if snap25 is None and mark >= quarter - 1e-6 and p.tracemalloc:
                        snap25 = tracemalloc.take_snapshot()
                await asyncio.wait({out_task}, timeout=_POLL_S)
            rc = await proc.wait()
            raw = out_task.result().decode()
            if rc != 0 or not raw.strip():
                raise RuntimeError(f"soak client process failed (exit status {rc})")
            clients: dict[str, Any] = json.loads(raw.strip().splitlines()[-1])
            # The server side of the last connections winds down on its own.
            await _poll(lambda: not (server.broadcaster.subscribers
                                     or engine.stats().streams), 10.0, 0.05)
            end = sampler.take("end")
            top = (_top_growth(snap25, tracemalloc.take_snapshot())
                   if snap25 is not None else [])
            st = engine.stats()
            dropped = server.broadcaster.dropped_subscribers
    finally:
        if p.tracemalloc:
            tracemalloc.stop()
    return _result(p, samples, end, clients, st, dropped, warnings,
                   max(x.journal_max_index for x in [*samples, end]), top, time.monotonic() - t0)


def _result(p: SoakParams, samples: list[Sample], end: Sample, clients: dict[str, Any],
            st: Any, dropped: int, warnings: _CountWarnings, max_index: int,
            top: list[GrowthSite], wall_s: float) -> SoakResult:
    expected: dict[str, int] = clients["expected"]
    total = sum(expected.values())
    lost, extra, received = [], [], []
    for sub in clients["subscribers"]:
        got: dict[str, int] = sub["finals"]
        lost.append(sum(max(0, n - got.get(s, 0)) for s, n in expected.items()))
        extra.append(sum(max(0, n - expected.get(s, 0)) for s, n in got.items())
                     + int(sub["duplicates"]))
        received.append(sum(min(n, got.get(s, 0)) for s, n in expected.items()))
    by_label = {s.label: s for s in samples}
    s25, s100 = by_label["25%"], by_label["100%"]
    later = [s for s in samples if s.audio_h >= s25.audio_h - 1e-9]
    heap_slope = (_slope([s.audio_h for s in later], [s.heap_mb or 0.0 for s in later])
                  if p.tracemalloc else None)
    w = st.worker
    return SoakResult(
        params=p, samples=samples, end=end, streams_opened=int(clients["streams_opened"]),
        audio_h=end.audio_h, finals_expected=total,
        finals_ingest=sum(clients["ingest_finals"].values()),
        finals_min_received=min(received, default=0),
        finals_lost=max(lost, default=0), finals_extra=max(extra, default=0),
        gaps=sum(int(s["gaps"]) for s in clients["subscribers"]),
        partials=int(clients["partials"]),
        subscriber_sessions=sum(int(s["sessions"]) for s in clients["subscribers"]),
        dropped_subscribers=dropped, client_errors=dict(clients["errors"]),
        warnings=warnings.count, first_warnings=list(warnings.first),
        lead_wait_s=float(clients["lead_wait_s"]), lead_timeouts=int(clients["lead_timeouts"]),
        journal_appends=st.journal_appends,
        journal_pruned=st.journal_pruned, journal_max_index=max_index,
        worker={"decoded": w.decoded, "superseded": w.superseded, "refused": w.refused,
                "failed": w.failed, "busy_s": round(w.busy_s, 1),
                "partials_refused": st.partials_refused},
        wall_s=wall_s, rss_25_mb=s25.rss_mb, rss_100_mb=s100.rss_mb,
        rss_slope_mb_per_audio_h=_slope([s.audio_h for s in later],
                                        [s.rss_mb for s in later]),
        heap_25_mb=s25.heap_mb, heap_100_mb=s100.heap_mb,
        heap_slope_mb_per_audio_h=heap_slope, top_growth=top,
    )


# --- clients (second process) ------------------------------------------------


@dataclass
class _Directory:
    """What the ingest clients tell the subscribers: stream ids, in order, and
    the finals each ended stream's summary counted."""

    ids: list[str] = field(default_factory=list)
    expected: dict[str, int] = field(default_factory=dict)
    ingest_finals: dict[str, int] = field(default_factory=dict)
    sent_s: float = 0.0
    partials: int = 0
    opened: int = 0
    lead_wait_s: float = 0.0
    lead_timeouts: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ingest_done: asyncio.Event = field(default_factory=asyncio.Event)

    def register(self, stream: str) -> None:
        if stream not in self.expected and stream not in self.ids:
            self.ids.append(stream)


@dataclass
class _Subscriber:
    index: int
    last_seq: dict[str, int] = field(default_factory=dict)
    finals: Counter[str] = field(default_factory=Counter)
    tracking: dict[str, None] = field(default_factory=dict)
    seen_ids: int = 0
    duplicates: int = 0
    gaps: int = 0
    sessions: int = 0
    aborted: int = 0
    closed_by_server: int = 0


def _stream_id(client: int, gen: int) -> str:
    return f"soak{client:02d}-{gen:05d}"


async def _ingest_connection(port: int, stream: str, pcm: bytes, start: int, n_bytes: int,
                             p: SoakParams, d: _Directory) -> None:
    chunk = SAMPLE_RATE * p.chunk_ms // 1000 * 2
    newest = [0.0]  # end (audio s) of the newest caption this connection received
    got_caption = asyncio.Event()
    summary: dict[str, Any] = {}
    finals = [0]

    async def read(ws: ClientConnection) -> None:
        async for raw in ws:
            msg = json.loads(raw)
            kind = msg["type"]
            if kind == "caption":
                newest[0] = max(newest[0], float(msg["end"]))
                finals[0] += bool(msg["final"])
                got_caption.set()
            elif kind == "ingest.summary":
                summary.update(msg)
            elif kind == "error":
                d.errors[f"ingest:{msg['code']}"] += 1

    # No permessage-deflate: PCM hardly compresses, and inflating it would
    # cost the server's loop more than the pipeline itself.
    async with connect(f"ws://127.0.0.1:{port}/v1/ingest?stream={stream}", max_size=None,
                       open_timeout=60, close_timeout=10, compression=None) as ws:
        await ws.send(json.dumps({"type": "config", "sample_rate": SAMPLE_RATE}))
        reader = asyncio.ensure_future(read(ws))
        d.opened += 1
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sent = 0
        while sent < n_bytes:
            size = min(chunk, n_bytes - sent)
            pos = (start + sent) % len(pcm)
            data = pcm[pos:pos + size]
            if len(data) < size:
                data += pcm[: size - len(data)]
            await ws.send(data)
            sent += size
            d.sent_s += size / 2 / SAMPLE_RATE
            audio_s = sent / 2 / SAMPLE_RATE
            if p.speed > 0:
                await asyncio.sleep(max(0.0, t0 + audio_s / p.speed - loop.time()))
            if p.max_lead_s > 0:
                began = loop.time()
                waited_until = began + p.lead_wait_s
                while audio_s - newest[0] > p.max_lead_s:
                    got_caption.clear()
                    try:
                        await asyncio.wait_for(got_caption.wait(), waited_until - loop.time())
                    except TimeoutError:
                        d.lead_timeouts += 1
                        break
                d.lead_wait_s += loop.time() - began
            if p.speed <= 0:
                await asyncio.sleep(0)
        await ws.send(json.dumps({"type": "end"}))
        await asyncio.wait_for(reader, 600)
    if not summary:
        raise RuntimeError(f"{stream}: no ingest.summary")
    d.expected[stream] = int(summary["finals"])
    d.ingest_finals[stream] = finals[0]
    d.partials += int(summary["partials"])


async def _ingest_client(index: int, port: int, pcm: bytes, p: SoakParams,
                         d: _Directory) -> None:
    per_conn = int(p.stream_minutes * 60 * SAMPLE_RATE) * 2
    budget = int(p.hours * 3600 * SAMPLE_RATE) * 2
    # Out of phase: each client starts at its own place in the sample.
    offset = (len(pcm) // 2 * index // max(1, p.streams)) * 2
    gen = 0
    done = 0
    d.register(_stream_id(index, 0))
    while done < budget:
        # The first connection is shorter, by client, so that streams open
        # and close all along the run rather than all at once.
        first = per_conn * (index + 1) // p.streams // 2 * 2
        n = min(first if gen == 0 else per_conn, budget - done)
        if done + n < budget:
            d.register(_stream_id(index, gen + 1))  # a whole connection ahead
        await _ingest_connection(port, _stream_id(index, gen), pcm, offset + done, n, p, d)
        done += n
        gen += 1


def _since(sub: _Subscriber, d: _Directory) -> str:
    for stream in d.ids[sub.seen_ids:]:
        sub.tracking[stream] = None
    sub.seen_ids = len(d.ids)
    for stream in list(sub.tracking):
        if stream in d.expected and sub.finals[stream] >= d.expected[stream]:
            del sub.tracking[stream]
    return ",".join(f"{s}:{sub.last_seq.get(s, 0)}" for s in sub.tracking)


def _handle(sub: _Subscriber, msg: dict[str, Any]) -> None:
    kind = msg["type"]
    if kind == "caption":
        stream, seq = str(msg["stream"]), int(msg["seq"])
        if seq <= sub.last_seq.get(stream, 0):
            sub.duplicates += bool(msg["final"])
            return
        sub.last_seq[stream] = seq
        if msg["final"]:
            sub.finals[stream] += 1
    elif kind == "gap":
        sub.gaps += 1


async def _subscriber(sub: _Subscriber, port: int, p: SoakParams, d: _Directory,
                      stop: asyncio.Event) -> None:
    rng = random.Random(p.seed * 1000 + sub.index)
    every = p.subscriber_minutes * 60
    next_at = every * (sub.index + 1) / (p.subscribers + 1)
    while not stop.is_set():
        since = _since(sub, d)
        url = f"ws://127.0.0.1:{port}/v1/captions" + (f"?since={since}" if since else "")
        sub.sessions += 1
        try:
            async with connect(url, max_size=None, open_timeout=60) as ws:
                while not stop.is_set():
                    if d.sent_s / p.streams >= next_at:
                        while d.sent_s / p.streams >= next_at:
                            next_at += every
                        break
                    try:
                        raw = await asyncio.wait_for(ws.recv(), 0.25)
                    except TimeoutError:
                        continue
                    _handle(sub, json.loads(raw))
                await _leave(ws, sub, abrupt=rng.random() < 0.5)
        except ConnectionClosed:
            sub.closed_by_server += 1
            continue
        await asyncio.sleep(rng.uniform(0.0, 0.3))


async def _leave(ws: ClientConnection, sub: _Subscriber, *, abrupt: bool) -> None:
    """Leave as a crashed client does (the TCP connection aborted), or politely:
    a close handshake while still reading what the server sends until it
    answers (a client that stops reading while it closes stalls both ends
    until the close timeout: its receive queue is full)."""
    if abrupt:
        sub.aborted += 1
        ws.transport.abort()
        return
    closing = asyncio.ensure_future(ws.close())
    try:
        while True:
            _handle(sub, json.loads(await ws.recv()))
    except ConnectionClosed:
        pass
    await closing


async def run_clients(p: SoakParams, port: int) -> dict[str, Any]:
    """The client side: ingest streams and subscribers; returns their counts."""
    audio = read_audio_file(sample_path())
    pcm = audio.astype("<i2").tobytes()
    d = _Directory()
    for i in range(p.streams):
        d.register(_stream_id(i, 0))
    stop = asyncio.Event()
    subs = [_Subscriber(i) for i in range(p.subscribers)]
    sub_tasks = [asyncio.ensure_future(_subscriber(s, port, p, d, stop)) for s in subs]
    t0 = time.monotonic()
    try:
        await asyncio.gather(*(_ingest_client(i, port, pcm, p, d) for i in range(p.streams)))
    finally:
        d.ingest_done.set()
    # Subscribers catch up (those between two connections resume with since).
    await _poll(lambda: all(s.finals[k] >= n for s in subs for k, n in d.expected.items()),
                _CLIENT_DONE_S, 0.1)
    stop.set()
    await asyncio.gather(*sub_tasks)
    return {
        "expected": d.expected, "ingest_finals": d.ingest_finals, "partials": d.partials,
        "audio_s": d.sent_s, "streams_opened": d.opened,
        "lead_wait_s": d.lead_wait_s, "lead_timeouts": d.lead_timeouts, "errors": dict(d.errors),
        "wall_s": time.monotonic() - t0,
        "subscribers": [{"finals": dict(s.finals), "duplicates": s.duplicates,
                         "gaps": s.gaps, "sessions": s.sessions, "aborted": s.aborted,
                         "closed_by_server": s.closed_by_server} for s in subs],
    }


# --- report ---------------------------------------------------------------------


def _mb(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def report(r: SoakResult) -> str:
    p = r.params
    lines = [
        "| sample | audio h (all streams) | audio h/stream | wall s | RSS MB | heap MB | "
        "streams open | journal files open | subscriptions | gc objects | fds | threads | "
        "retained captions | journal files on disk |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in [*r.samples, r.end]:
        lines.append(
            f"| {s.label} | {s.audio_h:.2f} | {s.audio_h_per_stream:.2f} | {s.wall_s:.0f} | "
            f"{s.rss_mb:.1f} | {_mb(s.heap_mb)} | {s.streams_open} | "
            f"{s.journal_open_files} | {s.subscribers} | {s.gc_objects:,} | {s.fds} | "
            f"{s.threads} | {s.retained_captions:,} | {s.journal_files} |")
    lines += [
        "",
        f"Growth: RSS {r.rss_25_mb:.1f} MB at 25% → {r.rss_100_mb:.1f} MB at 100% "
        f"({r.rss_100_mb - r.rss_25_mb:+.1f} MB); slope from 25% on "
        f"{r.rss_slope_mb_per_audio_h:+.3f} MB per audio-hour "
        f"({r.rss_slope_mb_per_audio_h * 100:+.1f} MB per 100 audio-hours).",
    ]
    if r.heap_25_mb is not None and r.heap_100_mb is not None:
        slope = r.heap_slope_mb_per_audio_h or 0.0
        lines.append(
            f"Python heap (tracemalloc) {r.heap_25_mb:.2f} MB at 25% → {r.heap_100_mb:.2f} MB "
            f"at 100% ({r.heap_100_mb - r.heap_25_mb:+.2f} MB); slope {slope:+.4f} MB "
            "per audio-hour.")
    lines += [
        "",
        "| backend | streams × h | streams opened | subscribers | subscriber sessions | "
        "finals expected | finals lost (worst subscriber) | extra | gaps | "
        "partials | dropped subscribers | warnings logged | journal appends | "
        "journal max file index seen | streams pruned | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {p.backend} | {p.streams} × {p.hours:g} | {r.streams_opened} | {p.subscribers} | "
        f"{r.subscriber_sessions} | {r.finals_expected:,} | {r.finals_lost} | "
        f"{r.finals_extra} | {r.gaps} | {r.partials:,} | {r.dropped_subscribers} | "
        f"{r.warnings} | {r.journal_appends:,} | {r.journal_max_index} | "
        f"{r.journal_pruned} | {r.wall_s:.0f} s |",
        "",
        f"Worker: {r.worker}. Ingest connections received {r.finals_ingest:,} finals "
        f"themselves. Client errors: {r.client_errors or 'none'}. Ingest clients waited "
        f"{r.lead_wait_s:.1f} s for captions in all ({r.lead_timeouts} waits ran out).",
    ]
    if r.first_warnings:
        lines += ["", "First warnings: " + "; ".join(f"`{w}`" for w in r.first_warnings)]
    if r.top_growth:
        lines += ["", "Allocation sites that grew most from the 25% snapshot to the end "
                  "(tracemalloc, by line):", "", "| site | grew | blocks |", "|---|---|---|"]
        lines += [f"| `{_short(g.where)}` | {g.size_kb:+.1f} KiB | {g.count:+d} |"
                  for g in r.top_growth]
    return "\n".join(lines)


def _short(path: str) -> str:
    """A site's file as ``package/module.py`` (``stdlib:`` for the standard library)."""
    for marker in ("site-packages/", "/src/"):
        if marker in path:
            return path.split(marker, 1)[1]
    stdlib = re.search(r"/lib/python3\.[0-9]+/(.+)$", path)
    if stdlib is not None:
        return "stdlib:" + stdlib[1]
    return Path(path).name if path.startswith("/") else path


def _parser() -> argparse.ArgumentParser:
    d = SoakParams()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("scripted", "whisper"), default=d.backend)
    ap.add_argument("--hours", type=float, default=d.hours,
                    help="hours of audio per ingest client (default %(default)s)")
    ap.add_argument("--streams", type=int, default=d.streams)
    ap.add_argument("--subscribers", type=int, default=d.subscribers)
    ap.add_argument("--stream-minutes", type=float, default=d.stream_minutes,
                    help="audio per ingest connection; then a new stream (default %(default)s)")
    ap.add_argument("--subscriber-minutes", type=float, default=d.subscriber_minutes,
                    help="subscribers reconnect after this much audio per stream")
    ap.add_argument("--sample-minutes", type=float, default=d.sample_minutes,
                    help="a sample every this much audio per stream (default %(default)s)")
    ap.add_argument("--speed", type=float, default=d.speed,
                    help="cap per stream, times real time (0: none)")
    ap.add_argument("--max-lead-s", type=float, default=d.max_lead_s)
    ap.add_argument("--lead-wait-s", type=float, default=d.lead_wait_s)
    ap.add_argument("--chunk-ms", type=int, default=d.chunk_ms)
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--journal-max-bytes", type=int, default=d.journal_max_bytes)
    ap.add_argument("--journal-keep", type=int, default=d.journal_keep)
    ap.add_argument("--journal-retention-s", type=float, default=d.journal_retention_s)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--json", type=Path, help="also write the result as JSON")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.client is not None:
        spec = json.loads(args.client)
        port = int(spec.pop("port"))
        out = asyncio.run(run_clients(SoakParams(**spec), port))
        print(json.dumps(out))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # a line per sample on stderr: a long run shows progress
    params = SoakParams(**{f.name: getattr(args, f.name)
                           for f in dataclasses.fields(SoakParams)})
    if params.streams < 1 or params.hours <= 0 or params.sample_minutes <= 0:
        raise SystemExit("--streams, --hours and --sample-minutes must be positive")
    result = asyncio.run(run_soak(params))
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(dataclasses.asdict(result), indent=1))
    return 0 if result.finals_lost == 0 and result.gaps == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
