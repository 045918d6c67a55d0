"""Prometheus metrics from a real engine run with a scripted model."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import STREAM_ERROR_CODES, CaptionEvent
from evoxtral_stream.server import app as app_module
from evoxtral_stream.server.app import CaptionServer
from evoxtral_stream.server.broadcast import Broadcaster
from evoxtral_stream.server.metrics import Metrics
from evoxtral_stream.server.protocol import encode_event
from tests.engine.test_journal import talk
from tests.fakes import ScriptedBackend
from tests.helpers.http import (
    client_text_frame,
    http_get,
    raw_ws_handshake,
    read_slowly,
    send_until_closed,
)
from tests.server.test_ingest import ingest


def samples(metrics: Metrics) -> dict[str, float]:
    """Every sample of the rendered text, keyed by name and sorted labels."""
    return parse(metrics.render().decode())


def parse(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text, keyed by name and sorted labels."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def test_metrics_move_with_a_real_engine_run() -> None:
    cfg = load_config(env={}, overrides={"stream.partial_interval_ms": 500,
                                         "stream.min_partial_ms": 200})
    engine = Engine(cfg, ScriptedBackend(delay_s=0.002))
    b = Broadcaster(64, encode_event, history=10)
    metrics = Metrics(engine, b)
    assert not metrics.ready()
    before = samples(metrics)
    assert before["evoxtral_ready"] == 0.0
    assert "evoxtral_worker_pending" not in before          # no engine numbers yet
    async with engine:
        engine.add_listener(metrics.on_event)
        engine.add_listener(b.publish)
        sub = b.subscribe()
        assert metrics.ready()
        stream = engine.open_stream("mic")
        for chunk in range(0, len(audio := talk(3)), 1600):
            stream.push(audio[chunk:chunk + 1600])
            await stream.wait_idle()
        during = samples(metrics)
        await stream.close()
        after = samples(metrics)
        b.unsubscribe(sub)
    assert during["evoxtral_streams_open"] == 1.0
    assert during["evoxtral_subscribers"] == 1.0
    assert after["evoxtral_ready"] == 1.0
    assert after["evoxtral_streams_open"] == 0.0
    assert after["evoxtral_streams_started_total"] == 1.0
    assert after["evoxtral_captions_total{kind=final}"] == 3.0
    assert after["evoxtral_captions_total{kind=partial}"] >= 1.0
    assert after["evoxtral_final_latency_seconds_count"] == 3.0
    assert after["evoxtral_partial_latency_seconds_count"] >= 1.0
    assert after["evoxtral_final_latency_seconds_sum"] > 0.0
    assert after["evoxtral_worker_decoded_total"] >= 4.0
    assert after["evoxtral_audio_seconds_total"] == 6.0
    assert 0.0 < after["evoxtral_real_time_factor"] < 1.0
    assert after["evoxtral_decode_failures_total"] == 0.0
    # stream.draft is off (and the scripted model checks no drafts).
    assert after["evoxtral_draft_tokens_total"] == after["evoxtral_draft_tokens_kept_total"] == 0
    assert after["evoxtral_worker_pending"] == 0.0
    if "torch" not in sys.modules:   # torch is never imported just for the metric
        assert "evoxtral_gpu_memory_allocated_bytes" not in after
    # Its own registry: nothing leaks into the process-wide one.
    assert REGISTRY.get_sample_value("evoxtral_captions_total", {"kind": "final"}) is None


async def test_decode_failures_and_error_events_are_counted() -> None:
    cfg = load_config(env={}, overrides={"stream.partial_interval_ms": 0})
    engine = Engine(cfg, ScriptedBackend(fail_when=lambda a: True))
    metrics = Metrics(engine)
    async with engine:
        engine.add_listener(metrics.on_event)
        stream = engine.open_stream("mic")
        stream.push(talk(2))
        await stream.close()
        got = samples(metrics)
    assert got["evoxtral_decode_failures_total"] == 2.0
    assert got["evoxtral_stream_errors_total{code=decode_failed}"] == 2.0
    assert "evoxtral_subscribers" not in got                  # no broadcaster given


async def scrape(port: int) -> dict[str, float]:
    status, body = await http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, body
    return parse(body)


async def test_realtime_sessions_are_counted_apart_from_subscribers() -> None:
    """A ``/v1/realtime`` session is no broadcast subscription (it reads the
    engine itself): it has its own gauge, and ``evoxtral_subscribers`` counts
    only the ``/v1/captions`` subscriber beside it."""
    cfg = load_config(env={}, overrides={"server.port": 0})
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        assert (await scrape(server.port))["evoxtral_realtime_sessions"] == 0.0
        base = f"ws://127.0.0.1:{server.port}"
        async with connect(f"{base}/v1/realtime?intent=transcription") as one, \
                connect(f"{base}/v1/realtime?intent=transcription") as two, \
                connect(f"{base}/v1/captions") as sub:
            for ws in (one, two):
                assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] \
                    == "session.created"
            assert json.loads(await asyncio.wait_for(sub.recv(), 10))["type"] == "hello"
            during = await scrape(server.port)
        async with asyncio.timeout(10):  # each session ends once its client left
            while (after := await scrape(server.port))["evoxtral_realtime_sessions"]:
                await asyncio.sleep(0.05)
    assert during["evoxtral_realtime_sessions"] == 2.0
    assert during["evoxtral_subscribers"] == 1.0
    assert during["evoxtral_streams_open"] == 2.0
    assert after["evoxtral_subscribers"] == 0.0


async def test_a_realtime_session_closed_for_being_too_slow_is_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A session whose client never reads falls ``server.subscriber_queue``
    events behind and is closed with 1013: counted in
    ``evoxtral_realtime_sessions_dropped``, not as a subscriber dropped."""
    # The 1013 comes behind what the server still holds for the client: with
    # the 2 s close handshake, a reader a loaded machine held back found the
    # connection cut before it, and no close code. The client here answers
    # the close, so a long handshake costs nothing.
    monkeypatch.setattr(app_module, "CLOSE_TIMEOUT_S", 60.0)
    cfg = load_config(env={}, overrides={"server.port": 0, "server.subscriber_queue": 8})
    # Each gets an error event that echoes its 30 kB event_id.
    bad = client_text_frame(json.dumps({"type": "nope", "event_id": "x" * 30_000}))
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        before = await scrape(server.port)
        deaf = await asyncio.to_thread(
            raw_ws_handshake, server.port, "/v1/realtime?intent=transcription&stream=deaf")

        try:
            async with asyncio.timeout(10):
                while "deaf" not in engine.streams:
                    await asyncio.sleep(0.01)
            await asyncio.to_thread(send_until_closed, deaf, bad,
                                    lambda: "deaf" in engine.streams, time.monotonic() + 30)
            assert "deaf" not in engine.streams, "the server kept the client open"
            _, code = await asyncio.to_thread(read_slowly, deaf, 0)
            assert code == 1013
        finally:
            deaf.close()
        after = await scrape(server.port)
    assert before["evoxtral_realtime_sessions_dropped_total"] == 0.0
    assert after["evoxtral_realtime_sessions_dropped_total"] == 1.0
    assert after["evoxtral_subscribers_dropped_total"] == 0.0
    assert after["evoxtral_realtime_sessions"] == 0.0


PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def documented_error_codes() -> set[str]:
    """The codes docs/protocol.md's metrics table gives for
    ``evoxtral_stream_errors_total{code}``."""
    row = next(line for line in PROTOCOL_MD.read_text().splitlines()
               if line.startswith("| `evoxtral_stream_errors_total{code}`"))
    listed = re.search(r"\(([^)]*)\)", row.split("|")[3])  # "by `code` (`a`, `b`)"
    assert listed is not None, row
    return set(re.findall(r"`([a-z_]+)`", listed.group(1)))


async def test_every_documented_label_is_exported_at_zero_before_its_first_event() -> None:
    """A labelled series that appears only with its first event hides that
    event from ``increase()`` and ``rate()``, so an alert on
    ``increase(evoxtral_stream_errors_total{code="decode_failed"}[5m]) > 0``
    would miss the first failure after a start. Every documented ``kind``
    and ``code`` is there at 0 from the start, and a stream whose decodes
    all fail moves ``decode_failed`` by exactly the errors its client got."""
    codes = documented_error_codes()
    assert codes == set(STREAM_ERROR_CODES)
    cfg = load_config(env={}, overrides={"server.port": 0, "stream.partial_interval_ms": 0})
    async with Engine(cfg, ScriptedBackend(fail_when=lambda a: True)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        before = await scrape(server.port)
        got = await ingest(server.port, "desk", {"sample_rate": 16000}, talk(2).tobytes())
        after = await scrape(server.port)
    errors = [m for m in got if m["type"] == "error"]
    assert [m["code"] for m in errors] == ["decode_failed"] * 2
    for kind in ("partial", "final"):
        assert before[f"evoxtral_captions_total{{kind={kind}}}"] == 0.0
        assert after[f"evoxtral_captions_total{{kind={kind}}}"] == 0.0  # nothing was shown
    for code in codes:
        assert before[f"evoxtral_stream_errors_total{{code={code}}}"] == 0.0, code
        want = len(errors) if code == "decode_failed" else 0.0
        assert after[f"evoxtral_stream_errors_total{{code={code}}}"] == want, code


async def test_the_scrape_holds_only_documented_families_and_true_histograms() -> None:
    """After captions and errors, every family the HTTP scrape shows (as a
    Prometheus parser reads it back; a counter with its ``_total``) is a row
    of docs/protocol.md's table: no ``*_created`` gauges beside the counters
    and histograms. The final-latency histogram counts the finals the
    client got, its buckets are cumulative up to ``+Inf`` = ``_count``, and
    its sum is within the time the test itself waited for them."""
    from tests.test_docs import _documented_metrics
    documented = _documented_metrics(PROTOCOL_MD.read_text())
    cfg = load_config(env={}, overrides={"server.port": 0, "stream.partial_interval_ms": 200,
                                         "stream.min_partial_ms": 200})
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        t0 = time.monotonic()
        got = await ingest(server.port, "desk", {"sample_rate": 16000}, talk(3).tobytes())
        waited = time.monotonic() - t0
        status, text = await http_get(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200
    families = {f.name + "_total" if f.type == "counter" else f.name: f
                for f in text_string_to_metric_families(text)}
    assert not set(families) - documented, sorted(set(families) - documented)
    finals = [m for m in got if m["type"] == "caption" and m["final"]]
    assert len(finals) == 3
    hist = {(s.name, s.labels.get("le")): s.value
            for s in families["evoxtral_final_latency_seconds"].samples}
    buckets = sorted((float(le), v) for (name, le), v in hist.items()
                     if name.endswith("_bucket") and le is not None)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)      # cumulative
    assert buckets[-1] == (float("inf"), 3.0)
    assert hist[("evoxtral_final_latency_seconds_count", None)] == 3.0
    total = hist[("evoxtral_final_latency_seconds_sum", None)]
    assert 0.0 <= total <= 3 * waited
    assert abs(total - sum(m["latency"] for m in finals)) < 0.01  # the wire rounds it


async def test_an_ingest_client_closed_for_not_taking_its_last_events_is_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An ingest client that ends its audio but never reads its last events
    is closed with 1013 ("subscriber too slow") once ``_FINALS_SENT_S`` has
    passed, though its queue never overflowed: the operator counting slow
    clients in ``evoxtral_subscribers_dropped_total`` counts it too."""
    monkeypatch.setattr(app_module, "_FINALS_SENT_S", 0.5)
    # The 1013 comes behind the megabytes the server still holds for the
    # client: with the 2 s close handshake, a reader a loaded machine held
    # back found the connection cut before it, and no close code. The client
    # here answers the close, so a long handshake costs nothing.
    monkeypatch.setattr(app_module, "CLOSE_TIMEOUT_S", 60.0)
    cfg = load_config(env={}, overrides={"server.port": 0, "server.subscriber_queue": 64})
    text = "x" * 200_000  # a few of these fill every buffer between server and client
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        before = await scrape(server.port)
        deaf = await asyncio.to_thread(raw_ws_handshake, server.port, "/v1/ingest?stream=deaf")
        try:
            deaf.sendall(client_text_frame(json.dumps({"type": "config", "sample_rate": 16000})))
            async with asyncio.timeout(10):
                while "deaf" not in engine.streams:
                    await asyncio.sleep(0.01)
            for seq in range(1, 31):  # fewer than server.subscriber_queue
                server.broadcaster.publish(CaptionEvent(
                    stream="deaf", segment=seq, seq=seq, final=True, text=text,
                    plain_text=text, stable=text, unstable="", tags=(), start=0.0,
                    end=1.0, latency=0.1))
            deaf.sendall(client_text_frame(json.dumps({"type": "end"})))
            _, code = await asyncio.to_thread(read_slowly, deaf, 0)
            assert code == 1013
        finally:
            deaf.close()
        after = await scrape(server.port)
    assert before["evoxtral_subscribers_dropped_total"] == 0.0
    assert after["evoxtral_subscribers_dropped_total"] == 1.0
    assert after["evoxtral_subscribers"] == 0.0
