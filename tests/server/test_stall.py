"""A model thread stuck in one backend call: error events, health checks, recovery.

The real part that cannot run here is a hung GPU; a backend that blocks on an
event stands in for it. Everything around it is real: the worker thread, the
engine's watch, the WebSocket server and its HTTP health routes.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
from websockets.asyncio.client import connect

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.engine.worker import ModelWorker, WorkerResult
from evoxtral_stream.events import CaptionEvent, DecodeRequest, RequestKind
from evoxtral_stream.server.app import CaptionServer
from tests.engine.test_journal import talk
from tests.fakes import GatedBackend
from tests.helpers.http import http_get


def _request(segment: int) -> DecodeRequest:
    return DecodeRequest(stream="s", segment=segment, revision=0, kind=RequestKind.FINAL,
                         audio=np.zeros(1600, np.float32), start_sample=0, end_sample=1600,
                         ready_at=time.monotonic())


def test_the_worker_reports_how_long_its_call_runs_and_when_it_is_stalled() -> None:
    cfg = load_config(overrides={"worker.stall_timeout_s": 0.2}).worker
    backend = GatedBackend()
    results: list[WorkerResult] = []
    worker = ModelWorker(backend, cfg, results.append)
    worker.start()
    try:
        assert worker.call_age() == 0.0 and not worker.stalled and worker.ready
        assert worker.submit(_request(0))
        assert backend.entered.wait(5)
        deadline = time.monotonic() + 10
        while not worker.stalled and time.monotonic() < deadline:
            time.sleep(0.01)
        st = worker.stats()
        assert st.stalled and st.call_s >= 0.2 and not st.ready and not worker.ready
        backend.release()
        deadline = time.monotonic() + 10
        while not results and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [r.segment for r in results] == [0]
        assert worker.call_age() == 0.0 and not worker.stalled and worker.ready
    finally:
        backend.release()
        worker.stop(10)


def test_zero_turns_the_stall_check_off() -> None:
    cfg = load_config(overrides={"worker.stall_timeout_s": 0}).worker
    backend = GatedBackend()
    worker = ModelWorker(backend, cfg, lambda r: None)
    worker.start()
    try:
        assert worker.submit(_request(0))
        assert backend.entered.wait(5)
        time.sleep(0.3)
        assert worker.call_age() >= 0.3
        assert not worker.stalled and worker.ready
    finally:
        backend.release()
        worker.stop(10)


async def test_a_stall_is_announced_to_subscribers_and_health_checks_then_clears() -> None:
    cfg = load_config(overrides={"server.port": 0, "worker.stall_timeout_s": 0.4,
                                 "stream.partial_interval_ms": 0})
    backend = GatedBackend()
    async with Engine(cfg, backend) as engine, CaptionServer(engine, cfg.server) as server:
        base = f"http://127.0.0.1:{server.port}"
        assert await http_get(f"{base}/healthz") == (200, "ok\n")
        async with connect(f"ws://127.0.0.1:{server.port}/v1/captions") as ws:
            assert json.loads(await ws.recv())["type"] == "hello"
            stream = engine.open_stream("desk")
            stream.push(talk(2))
            assert await asyncio.to_thread(backend.entered.wait, 5)

            # The first call hangs: the error event comes, health goes 503.
            messages: list[dict[str, object]] = []
            while not any(m.get("code") == "model_stalled" for m in messages):
                messages.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            err = next(m for m in messages if m.get("code") == "model_stalled")
            assert err["type"] == "error" and err["stream"] == "desk"
            assert "has not answered" in str(err["message"])
            assert await http_get(f"{base}/healthz") == (503, "model stalled\n")
            assert (await http_get(f"{base}/readyz"))[0] == 503
            assert not engine.healthy and engine.stats().stalls == 1
            status, metrics = await http_get(f"{base}/metrics")
            assert status == 200
            call_s = next(float(line.split()[-1]) for line in metrics.splitlines()
                          if line.startswith("evoxtral_worker_call_seconds "))
            assert call_s >= 0.4
            assert "evoxtral_worker_stalls_total 1.0" in metrics

            # Announced once, not on every check while it lasts.
            await asyncio.sleep(1.0)
            backend.release()
            summary = await asyncio.wait_for(stream.close(), 20)
            assert summary.finals == 2                      # nothing was lost
            finals: list[dict[str, object]] = []
            while len(finals) < 2:
                m = json.loads(await asyncio.wait_for(ws.recv(), 10))
                messages.append(m)
                if m.get("type") == "caption" and m.get("final"):
                    finals.append(m)
            assert [m.get("code") for m in messages].count("model_stalled") == 1

        deadline = time.monotonic() + 10
        while not engine.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await http_get(f"{base}/healthz") == (200, "ok\n")
        assert await http_get(f"{base}/readyz") == (200, "ready\n")
        assert engine.stats().stalls == 1


async def test_every_open_stream_hears_of_the_stall() -> None:
    """Also a stream with nothing waiting: all of them depend on the one model."""
    cfg = load_config(overrides={"worker.stall_timeout_s": 0.3,
                                 "stream.partial_interval_ms": 0})
    backend = GatedBackend()
    seen: list[object] = []
    async with Engine(cfg, backend) as engine:
        engine.add_listener(seen.append)
        busy = engine.open_stream("busy")
        quiet = engine.open_stream("quiet")
        busy.push(talk(1))
        assert await asyncio.to_thread(backend.entered.wait, 5)
        deadline = time.monotonic() + 10
        while engine.stats().stalls == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        codes = {(getattr(e, "stream", None), getattr(e, "code", None)) for e in seen}
        assert {("busy", "model_stalled"), ("quiet", "model_stalled")} <= codes
        backend.release()
        await asyncio.wait_for(busy.close(), 20)
        await asyncio.wait_for(quiet.close(), 20)
    assert any(isinstance(e, CaptionEvent) and e.final and e.stream == "busy" for e in seen)
