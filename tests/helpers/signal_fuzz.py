"""A seeded fuzz of ``serve`` stopped by signals at random moments.

Each seed draws a :class:`Plan`: a few ingest streams of espeak speech sent at
real-time pace or faster, a few caption subscribers, and a signal (SIGTERM,
SIGINT, SIGINT twice, SIGHUP then SIGTERM, SIGTERM while a client is still in
its opening handshake, or SIGTERM while the model loads) sent at a drawn
moment. :func:`run_plan` runs it against a real ``serve`` process (journal
on, in a test's folder) and returns what went wrong against what README.md
and docs/config.md promise: the exit status, one line and no traceback, every
journaled final at every subscriber that stayed, ``stream.ended`` for every
stream, whole journal lines and no stray files, a bounded exit, and (for some
seeds) a restart on the same journal that replays the finals to
``since=STREAM:0`` and numbers a reopened stream after every seq given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import connect

from tests.helpers.http import free_port
from tests.speech import speak

__all__ = ["KINDS", "Plan", "Serve", "draw_plan", "run_plan"]

KINDS = ("term", "int", "int_twice", "hup_term", "term_handshake", "term_loading")

_SENTENCES = ("the weather is lovely today", "thank you for listening",
              "please close the door behind you", "we will meet again tomorrow morning")
_EXIT_S = 40.0   # default worker.drain_timeout_s (8 s) plus a busy 2-core machine's slack


@dataclass(frozen=True)
class Plan:
    seed: int
    kind: str
    delay_s: float        # from the first audio sent to the signal
    second_s: float       # int_twice: to the second SIGINT; hup_term: to the SIGTERM
    ingests: int
    pace: float           # audio seconds sent per wall second
    sentences: tuple[int, ...]
    subscribers: int
    restart: bool


def draw_plan(seed: int) -> Plan:
    rng = random.Random(seed)
    return Plan(seed=seed, kind=rng.choice(KINDS), delay_s=rng.uniform(0.0, 4.0),
                second_s=rng.uniform(0.0, 1.0), ingests=rng.randint(1, 3),
                pace=rng.choice((1.0, 2.0, 4.0)),
                sentences=tuple(rng.sample(range(len(_SENTENCES)), rng.randint(1, 3))),
                subscribers=rng.randint(1, 2), restart=rng.random() < 0.5)


@dataclass
class Serve:
    """A ``serve`` process whose stderr a thread keeps reading."""

    proc: subprocess.Popen[str]
    err: list[str] = field(default_factory=list)
    serving: threading.Event = field(default_factory=threading.Event)
    loading: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, port: int, journal: Path) -> Serve:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evoxtral_stream", "serve", "--source", "none", "--no-print",
             "--port", str(port), "--set", "journal.enabled=true",
             "--set", f"journal.dir={str(journal)!r}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
        serve = cls(proc)
        threading.Thread(target=serve._read, daemon=True).start()
        return serve

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)
            if "backend:" in line:
                self.loading.set()
            if "serving captions on " in line:
                self.serving.set()
        self.loading.set()
        self.serving.set()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


@dataclass
class Client:
    name: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    ready: bool = False


async def _subscribe(url: str, client: Client, connected: asyncio.Event) -> None:
    async with connect(url) as ws:
        connected.set()
        async for raw in ws:
            client.messages.append(json.loads(raw))
        client.close_code = ws.close_code


async def _ingest(port: int, stream: str, pcm: bytes, pace: float, client: Client,
                  started: asyncio.Event) -> None:
    async with connect(f"ws://127.0.0.1:{port}/v1/ingest?stream={stream}") as ws:
        await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))

        async def read() -> None:
            async for raw in ws:
                msg = json.loads(raw)
                client.messages.append(msg)
                if msg["type"] == "ingest.ready":
                    client.ready = True
                    started.set()

        reader = asyncio.ensure_future(read())
        while not client.ready and not reader.done():
            await asyncio.sleep(0.01)
        step = 3200  # 0.1 s of PCM16
        t0 = time.monotonic()
        with contextlib.suppress(Exception):
            for i in range(0, len(pcm), step):
                await ws.send(pcm[i:i + step])
                await asyncio.sleep(max(0.0, t0 + (i + step) / 32000 / pace - time.monotonic()))
            await ws.send(json.dumps({"type": "end"}))
        await reader
        client.close_code = ws.close_code


def _half_handshake(port: int) -> socket.socket:
    """A client still in its opening handshake: half a request sent."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
    return s


def _speech(plan: Plan, i: int) -> bytes:
    parts = [np.zeros(4000, np.int16)]
    for k in plan.sentences[i % len(plan.sentences):] + plan.sentences[:i % len(plan.sentences)]:
        parts += [speak(_SENTENCES[k]), np.zeros(16000, np.int16)]
    return np.concatenate(parts).tobytes()


def _journal_lines(journal: Path) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """``(file name, record)`` of every line; a line that is not whole JSON
    is yielded as its raw text."""
    for path in sorted(journal.glob("*.jsonl")):
        data = path.read_text()
        lines = data.split("\n")
        if lines[-1]:
            yield path.name, f"unterminated last line {lines[-1]!r:.80}"
        for line in lines[:-1]:
            try:
                yield path.name, json.loads(line)
            except ValueError:
                yield path.name, f"damaged line {line!r:.80}"


def _finals(messages: list[dict[str, Any]]) -> set[tuple[str, int, str]]:
    return {(m["stream"], m["seq"], m["text"]) for m in messages
            if m.get("type") == "caption" and m.get("final")}


def _bad_stderr(err: str, allowed: tuple[str, ...]) -> list[str]:
    out = []
    if "Traceback" in err:
        out.append(f"a traceback on stderr: {err[-1500:]}")
    for line in err.splitlines():
        if line.startswith(("ERROR", "CRITICAL")) and not any(a in line for a in allowed):
            out.append(f"an error line: {line}")
    return out


async def run_plan(plan: Plan, tmp: Path) -> list[str]:
    """Run ``plan``; every broken promise, one string each (none: all kept)."""
    journal = tmp / f"journal-{plan.seed}"
    port = free_port()
    serve = Serve.start(port, journal)
    problems: list[str] = []
    try:
        if plan.kind == "term_loading":
            await asyncio.to_thread(serve.loading.wait, 60)
            await asyncio.sleep(plan.second_s * 0.3)
            serve.proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(serve.wait, _EXIT_S)
            err = "".join(serve.err)
            if rc is None:
                return [f"no exit within {_EXIT_S} s of a SIGTERM while loading"]
            if rc not in (0, -signal.SIGTERM):
                problems.append(f"exit status {rc} at a SIGTERM while loading")
            problems += _bad_stderr(err, ())
            problems += _check_journal(journal)
            return problems
        await asyncio.to_thread(serve.serving.wait, 60)
        assert serve.proc.poll() is None, "".join(serve.err)
        problems += await _session(plan, serve, port, journal)
    finally:
        if serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait()
    return problems


async def _session(plan: Plan, serve: Serve, port: int, journal: Path) -> list[str]:
    problems: list[str] = []
    subs = [Client(f"sub{i}") for i in range(plan.subscribers)]
    ingests = [Client(f"s{i}") for i in range(plan.ingests)]
    tasks: list[asyncio.Task[None]] = []
    for sub in subs:
        connected = asyncio.Event()
        tasks.append(asyncio.create_task(
            _subscribe(f"ws://127.0.0.1:{port}/v1/captions", sub, connected)))
        await asyncio.wait_for(connected.wait(), 10)
    started = asyncio.Event()
    for i, ing in enumerate(ingests):
        tasks.append(asyncio.create_task(
            _ingest(port, ing.name, _speech(plan, i), plan.pace, ing, started)))
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.sleep(plan.delay_s)
    opening: socket.socket | None = None
    pid = serve.proc.pid
    t_signal = time.monotonic()
    if plan.kind == "term_handshake":
        opening = await asyncio.to_thread(_half_handshake, port)
        os.kill(pid, signal.SIGTERM)
    elif plan.kind == "hup_term":
        os.kill(pid, signal.SIGHUP)
        await asyncio.sleep(plan.second_s)
        os.kill(pid, signal.SIGTERM)
    else:
        os.kill(pid, signal.SIGTERM if plan.kind == "term" else signal.SIGINT)
        if plan.kind == "int_twice":
            await asyncio.sleep(plan.second_s)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
    rc = await asyncio.to_thread(serve.wait, _EXIT_S)
    took = time.monotonic() - t_signal
    done, pending = await asyncio.wait(tasks, timeout=10)
    for t in pending:
        t.cancel()
    if opening is not None:
        opening.close()
    if rc is None:
        return [f"no exit within {_EXIT_S} s of the signal"]
    err = "".join(serve.err)
    cut = "not decoded; closing them" in err
    allowed = {0} | ({1} if plan.kind == "int_twice" else set())
    if rc not in allowed:
        problems.append(f"exit status {rc} (expected {sorted(allowed)}) after {took:.1f} s; "
                        f"stderr ends: {err[-600:]}")
    if cut and rc != 1:
        problems.append(f"a drain cut short exited {rc}, not 1")
    # A second Ctrl-C cuts the drain short: README's Shutdown says so, and
    # that a segment which showed nothing then loses its final (final_lost).
    problems += _bad_stderr(err, ("shutdown: asked to stop at once",
                                  "nothing had been shown for them")
                            if plan.kind == "int_twice" else ())
    if pending:
        problems.append(f"{len(pending)} client(s) still connected after the exit")
    for t in done:
        if not t.cancelled() and t.exception() is not None:
            exc = t.exception()
            problems.append(f"a client failed: {exc!r}")
    records = list(_journal_lines(journal))
    problems += [f"{name}: {r}" for name, r in records if isinstance(r, str)]
    journaled = _finals([r for _, r in records if isinstance(r, dict)])
    ended = {r["stream"] for _, r in records if isinstance(r, dict)
             and r.get("type") == "stream.ended"}
    problems += _check_journal(journal)
    seen_streams = {ing.name for ing in ingests if ing.ready}
    for sub in subs:
        got = _finals(sub.messages)
        if got != {f for f in journaled if f[0] in seen_streams}:
            problems.append(f"{sub.name}: finals {sorted(got)} but the journal has "
                            f"{sorted(journaled)}")
        sub_ended = {m["stream"] for m in sub.messages if m.get("type") == "stream.ended"}
        if not seen_streams <= sub_ended:
            problems.append(f"{sub.name}: no stream.ended of {sorted(seen_streams - sub_ended)}")
        if sub.close_code not in (1000, 1001):
            problems.append(f"{sub.name}: close code {sub.close_code}")
    for ing in ingests:
        own = {f for f in journaled if f[0] == ing.name}
        if ing.ready and _finals(ing.messages) - own:
            problems.append(f"{ing.name}: finals not journaled: "
                            f"{sorted(_finals(ing.messages) - own)}")
    for stream in seen_streams:
        if any(f[0] == stream for f in journaled) and stream not in ended:
            problems.append(f"journal: no stream.ended record of {stream}")
    if plan.restart and not problems:
        seqs = [m["seq"] for c in [*subs, *ingests] for m in c.messages if "seq" in m]
        problems += await _restart(plan, port, journal, journaled,
                                   max(seqs, default=0), sorted(seen_streams))
    return problems


def _check_journal(journal: Path) -> list[str]:
    """Files the journal does not write: ``.part`` or temporary ones left behind."""
    if not journal.exists():
        return []
    stray = [p.name for p in journal.iterdir()
             if p.suffix != ".jsonl" and p.name not in ("epoch", "lock", "pruned")]
    return [f"journal: stray files {stray}"] if stray else []


async def _restart(plan: Plan, port: int, journal: Path,
                   journaled: set[tuple[str, int, str]], top: int,
                   streams: list[str]) -> list[str]:
    """Serve again on the same journal: ``since=STREAM:0`` replays every
    final, and a stream reopened numbers after every seq given before."""
    problems: list[str] = []
    serve = Serve.start(port, journal)
    try:
        await asyncio.to_thread(serve.serving.wait, 60)
        if serve.proc.poll() is not None:
            return [f"the restart did not serve: {''.join(serve.err)[-800:]}"]
        for stream in streams:
            want = {f for f in journaled if f[0] == stream}
            got: list[dict[str, Any]] = []
            async with connect(f"ws://127.0.0.1:{port}/v1/captions?stream={stream}"
                               "&since=0") as ws:
                with contextlib.suppress(TimeoutError):
                    while _finals(got) != want:
                        got.append(json.loads(await asyncio.wait_for(ws.recv(), 3)))
            if _finals(got) != want:
                problems.append(f"restart: since=0 of {stream} replayed {sorted(_finals(got))}, "
                                f"the journal has {sorted(want)}")
        again = Client(streams[0])
        started = asyncio.Event()
        pcm = np.concatenate([speak(_SENTENCES[0]), np.zeros(16000, np.int16)]).tobytes()
        await asyncio.wait_for(_ingest(port, again.name, pcm, 8.0, again, started), 60)
        seqs = [m["seq"] for m in again.messages if m.get("type") == "caption"]
        if not seqs or min(seqs) <= top:
            problems.append(f"restart: {again.name} reopened numbered {seqs[:3]}, "
                            f"not past {top}")
        serve.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(serve.wait, _EXIT_S)
        if rc != 0:
            problems.append(f"restart: exit status {rc}")
    finally:
        if serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait()
    return problems
