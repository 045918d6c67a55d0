"""Prometheus metrics of the engine and the broadcaster, and readiness.

:class:`Metrics` owns its own ``CollectorRegistry`` (never the global one, so
two engines in one process, or tests, do not collide). It is fed two ways:

- :meth:`Metrics.on_event` is an engine listener (``engine.add_listener``):
  it observes caption latencies and counts captions, errors and streams.
  It only updates in-memory counters, so it never blocks the loop.
- at scrape time, a collector reads ``engine.stats()`` and the broadcaster's
  counts: queue depth, refusals, superseded requests, decode failures,
  restarts, the real-time factor, subscribers, realtime sessions (the
  broadcaster's outboxes, apart from its subscribers), open streams, and the GPU
  memory in use when torch is already imported and CUDA is available
  (otherwise that metric is absent; torch is never imported for it), and,
  once :meth:`Metrics.watch_mqtt` is given a publisher's ``stats``, the MQTT
  publisher's connection and counters.

:meth:`Metrics.render` gives the Prometheus text format (serve it with
``prometheus_client.CONTENT_TYPE_LATEST``); :meth:`Metrics.ready` is the
``/readyz`` answer: the model loaded and its worker thread serving.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..engine.engine import Engine
from ..events import STREAM_ERROR_CODES, CaptionEvent, EngineEvent, StreamError, StreamStarted
from .broadcast import Broadcaster

if TYPE_CHECKING:
    from .mqtt import MqttStats

__all__ = ["LATENCY_BUCKETS", "Metrics"]

# Seconds; captioning cares about 0.1 s steps below 2 s, and a tail to 30 s.
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


class Metrics:
    """Metrics of one engine (and optionally its broadcaster)."""

    def __init__(self, engine: Engine, broadcaster: Broadcaster | None = None) -> None:
        self._engine = engine
        self._broadcaster = broadcaster
        self.registry = CollectorRegistry(auto_describe=True)
        # Not registered themselves: _StatsCollector exports them without
        # the *_created series prometheus_client adds (undocumented gauges of
        # a start time, which no other counter here has).
        self.final_latency = Histogram(
            "evoxtral_final_latency_seconds",
            "End of speech to final caption (queueing and decoding).",
            buckets=LATENCY_BUCKETS, registry=None)
        self.partial_latency = Histogram(
            "evoxtral_partial_latency_seconds",
            "Age of a partial caption's audio when shown (request ready to result).",
            buckets=LATENCY_BUCKETS, registry=None)
        self.captions = Counter(
            "evoxtral_captions", "Caption events emitted.", ["kind"], registry=None)
        self.stream_errors = Counter(
            "evoxtral_stream_errors", "Stream error events, by code.", ["code"],
            registry=None)
        # Every label value known ahead is exported at 0 from the start: a
        # series that appeared only with its first event would hide that
        # event from increase() and rate(), and so from alerts.
        for kind in ("partial", "final"):
            self.captions.labels(kind)
        for code in STREAM_ERROR_CODES:
            self.stream_errors.labels(code)
        self.streams_started = Counter(
            "evoxtral_streams_started", "Streams opened.", registry=None)
        self._collector = _StatsCollector(
            engine, broadcaster, (self.final_latency, self.partial_latency, self.captions,
                                  self.stream_errors, self.streams_started))
        self.registry.register(self._collector)

    def watch_mqtt(self, stats: Callable[[], MqttStats] | None) -> None:
        """Export an MQTT publisher's counters (``publisher.stats``); None stops."""
        self._collector.mqtt = stats

    def on_event(self, event: EngineEvent) -> None:
        """Engine listener; add with ``engine.add_listener(metrics.on_event)``."""
        if isinstance(event, CaptionEvent):
            kind = "final" if event.final else "partial"
            self.captions.labels(kind).inc()
            if event.latency is not None:
                hist = self.final_latency if event.final else self.partial_latency
                hist.observe(max(0.0, event.latency))
        elif isinstance(event, StreamError):
            self.stream_errors.labels(event.code).inc()
        elif isinstance(event, StreamStarted):
            self.streams_started.inc()

    def render(self) -> bytes:
        """Every metric, in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def ready(self) -> bool:
        """True when the model is loaded and its worker serves requests."""
        return self._engine.ready

    def healthy(self) -> bool:
        """False while the model thread is stalled (see ``worker.stall_timeout_s``)
        and once the worker gave up for good (see ``worker.restart_limit``)."""
        return self._engine.healthy

    def unhealthy_reason(self) -> str | None:
        """Why :meth:`healthy` is false (``"model stalled"``, ``"model down"``)."""
        return self._engine.unhealthy_reason


class _StatsCollector(Collector):
    """Reads the engine's and broadcaster's counters at scrape time."""

    def __init__(self, engine: Engine, broadcaster: Broadcaster | None,
                 events: Iterable[Counter | Histogram] = ()) -> None:
        self._engine = engine
        self._broadcaster = broadcaster
        self._events = tuple(events)
        self.mqtt: Callable[[], MqttStats] | None = None

    def describe(self) -> list[Metric]:
        # Nothing to describe ahead: these metrics exist only once started.
        return []

    def collect(self) -> Iterator[Metric]:
        for metric in self._events:
            for family in metric.collect():
                family.samples = [s for s in family.samples
                                  if not s.name.endswith("_created")]
                yield family
        e = self._engine
        yield GaugeMetricFamily("evoxtral_ready", "1 when the model is loaded and serving.",
                                value=1.0 if e.ready else 0.0)
        # Before start (or after close) there are no engine numbers to give.
        st = e.stats() if e.started else None
        if st is not None:
            w = st.worker
            gauges = {
                "evoxtral_worker_pending": ("Requests waiting for the model thread.",
                                            w.pending),
                "evoxtral_finals_backlog": ("Finals waiting for room in the inbox.",
                                            st.finals_backlog),
                "evoxtral_streams_open": ("Streams open now.", st.streams),
                "evoxtral_worker_running": ("Requests in the continuous batch now.",
                                            w.running),
                "evoxtral_worker_call_seconds": (
                    "Seconds the backend call in progress has run (0: idle).", w.call_s),
                "evoxtral_journal_open_files": (
                    "Journal files held open (at most one per live stream).",
                    st.journal_open_files),
                "evoxtral_real_time_factor": (
                    "Model busy seconds per second of audio received, all streams together, "
                    "since start (with N streams live at once, the model keeps up only "
                    "below 1/N; rate(evoxtral_worker_busy_seconds_total) near 1 means "
                    "saturated now).",
                    w.busy_s / st.audio_s if st.audio_s else 0.0),
            }
            for name, (doc, value) in gauges.items():
                yield GaugeMetricFamily(name, doc, value=float(value))
            counters = {
                "evoxtral_worker_submitted": ("Requests accepted by the worker.", w.submitted),
                "evoxtral_worker_refused": ("Requests refused by a full inbox.", w.refused),
                "evoxtral_partials_refused": ("Partials dropped: the inbox was full, or finals "
                                              "were waiting for it.",
                                              st.partials_refused),
                "evoxtral_worker_superseded": ("Pending requests superseded by newer ones.",
                                               w.superseded),
                "evoxtral_worker_cancelled": (
                    "Running partials stopped mid-decode by a newer request.", w.cancelled),
                "evoxtral_worker_decoded": ("Requests decoded.", w.decoded),
                "evoxtral_worker_batches": (
                    "Backend calls (batches, or admissions to the continuous batch) "
                    "that succeeded.", w.batches),
                "evoxtral_worker_steps": ("Continuous-batching decode steps.", w.steps),
                "evoxtral_tokens_generated": ("Tokens the model generated.", w.tokens),
                "evoxtral_draft_tokens": (
                    "Draft tokens (a segment's last partial, stream.draft) the model checked.",
                    w.draft_tokens),
                "evoxtral_draft_tokens_kept": (
                    "Draft tokens the model kept instead of decoding them step by step.",
                    w.draft_kept),
                "evoxtral_decode_failures": ("Requests answered with a decode failure.",
                                             w.failed),
                "evoxtral_worker_restarts": ("Model thread restarts after a death.",
                                             w.restarts),
                "evoxtral_worker_busy_seconds": ("Seconds spent in the backend.", w.busy_s),
                "evoxtral_audio_seconds": ("Seconds of audio received.", st.audio_s),
                "evoxtral_journal_appends": ("Finals written to the journal.",
                                             st.journal_appends),
                "evoxtral_journal_failures": (
                    "Journal writes that failed (finals, seq reservations, stream ends, "
                    "interval fsyncs).",
                    st.journal_failures),
                "evoxtral_worker_stalls": (
                    "Times a backend call ran past worker.stall_timeout_s.", st.stalls),
                "evoxtral_journal_streams_pruned": (
                    "Streams whose journal files were deleted after journal.retention_s.",
                    st.journal_pruned),
            }
            for name, (doc, value) in counters.items():
                yield CounterMetricFamily(name, doc, value=float(value))
        b = self._broadcaster
        if b is not None:
            yield GaugeMetricFamily("evoxtral_subscribers",
                                    "Connected caption subscribers, ingest connections "
                                    "(each takes its own stream's events) included.",
                                    value=float(b.subscribers))
            yield CounterMetricFamily("evoxtral_subscribers_dropped",
                                      "Subscribers (ingest connections included) "
                                      "disconnected for being too slow, or for too many "
                                      "live events while their resume read the journal.",
                                      value=float(b.dropped_subscribers))
            # Not in evoxtral_subscribers: a session reads the engine itself,
            # in another protocol, and is an ingest stream too.
            yield GaugeMetricFamily("evoxtral_realtime_sessions",
                                    "Open /v1/realtime sessions (not counted in "
                                    "evoxtral_subscribers).",
                                    value=float(b.outboxes))
            yield CounterMetricFamily("evoxtral_realtime_sessions_dropped",
                                      "/v1/realtime sessions closed (1013) for being too "
                                      "slow (not counted in evoxtral_subscribers_dropped).",
                                      value=float(b.dropped_outboxes))
        if self.mqtt is not None:
            yield from _mqtt_metrics(self.mqtt())
        gpu = _gpu_memory_bytes()
        if gpu is not None:
            yield GaugeMetricFamily("evoxtral_gpu_memory_allocated_bytes",
                                    "CUDA memory held by tensors (torch).", value=float(gpu))


def _mqtt_metrics(m: MqttStats) -> Iterator[Metric]:
    yield GaugeMetricFamily("evoxtral_mqtt_connected", "1 while connected to the MQTT broker.",
                            value=1.0 if m.connected else 0.0)
    yield GaugeMetricFamily("evoxtral_mqtt_queued",
                            "Messages waiting to be published (events and removals).",
                            value=float(m.queued))
    counters = {
        "evoxtral_mqtt_published": (
            "Messages the broker accepted (events, removals, restated statuses).", m.published),
        "evoxtral_mqtt_superseded": (
            "Partials replaced while waiting by a newer partial or their final.",
            m.superseded),
        "evoxtral_mqtt_failed": (
            "Messages given up on: a failed publish, refused by the broker or over its "
            "maximum packet size, or left at close.",
            m.failed),
        "evoxtral_mqtt_connects": ("Connections made to the broker.", m.connects),
        "evoxtral_mqtt_connect_failures": ("Connection attempts that failed.",
                                           m.connect_failures),
    }
    for name, (doc, value) in counters.items():
        yield CounterMetricFamily(name, doc, value=float(value))
    dropped = CounterMetricFamily(
        "evoxtral_mqtt_dropped",
        "Events dropped by the backlog's overflow policy (final: finals and lifecycle events).",
        labels=["kind"])
    dropped.add_metric(["partial"], float(m.dropped_partials))
    dropped.add_metric(["final"], float(m.dropped_finals))
    yield dropped


def _gpu_memory_bytes() -> int | None:
    torch = sys.modules.get("torch")  # only if the backend already imported it
    if torch is None or not torch.cuda.is_available():
        return None
    return int(torch.cuda.memory_allocated())
