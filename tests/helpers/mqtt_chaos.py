"""A seeded chaos fuzz of the MQTT publisher against a real mosquitto.

:func:`run_chaos` feeds a random stream of engine events (streams opened,
ended and opened again under unicode ids, two of which share a topic level;
growing partials, finals with tags, errors) to a :class:`MqttPublisher` and,
beside it, a :class:`Broadcaster` (the WebSocket captions' fan-out), the way
the engine calls its listeners. Meanwhile it disrupts the broker at random
moments: stopped and restarted (SIGTERM with persistence, SIGKILL without),
frozen (SIGSTOP/SIGCONT) for less or more than ``timeout_s``, the
publisher's connection cut, its uplink stalled, new connections refused for a
while (it reaches the broker through :class:`ChaosRelay`, which can also play
a broker that speaks MQTT 3.1.1 only). The configuration is random too:
protocol, queue size (down to 1: overflow), ``retain_final``,
``forget_ended_s``.

A subscriber with a persistent session (:class:`Recorder`) records what
arrives. It reconnects and subscribes again before the publisher may
reconnect after a restart, and the broker is stopped without persistence
only once what was published reached it, so that every loss is the
publisher's.

:func:`check` holds the outcome against docs/config.md's ``[mqtt]``: every
final and error arrives unless the counters say it was dropped or failed,
in order per stream; the counters account for every event; drops are logged;
each topic's retained status and last final are its last state (removed
after ``forget_ended_s``, expired by MQTT 5 brokers, cleared at a clean stop
when nothing else would); the presence says ``online`` while the engine runs
and ``offline`` after; nothing is logged as an error or with a traceback;
``aclose`` ends in bounded time; the listener call never blocks or raises,
and the broadcaster gets every event. It returns the problems found (empty:
none), so a failing seed can be read and rerun.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from evoxtral_stream.config import MqttConfig, load_config
from evoxtral_stream.events import (
    CaptionEvent,
    EngineEvent,
    StreamEnded,
    StreamError,
    StreamStarted,
    TagMark,
)
from evoxtral_stream.server.broadcast import Broadcaster
from evoxtral_stream.server.mqtt import (
    ENGINE_OFFLINE,
    ENGINE_ONLINE,
    MqttPublisher,
    MqttStats,
    topic_level,
)
from evoxtral_stream.server.protocol import encode_event
from tests.helpers.http import Relay, pipe
from tests.server.conftest import MosquittoBroker
from tests.server.test_mqtt import read_packet

__all__ = ["ChaosRelay", "Outcome", "Plan", "Recorder", "check", "run_chaos"]

#: Stream ids: unicode, MQTT wildcards and separators, a noncharacter; "a/b"
#: and "a_b" share one topic level.
STREAMS = ("mic", "café ☕", "a/b", "a_b", "日本語 talk", "x+y#z", "talk\ufdd0", "🎉")
WORDS = ("hello", "naïve", "日本", "🎉", "été", 'a"b', "back\\slash", "ok.", "Ünïcödé", "—")
TAGS = ("laughs", "sighs", "whispers")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """One seed's configuration."""

    seed: int
    protocol: str
    v311_only: bool
    """The broker is fronted by a relay that refuses MQTT 5 as a 3.1.1-only broker does."""
    queue_size: int
    retain_final: bool
    forget_ended_s: float
    timeout_s: float
    drain_s: float
    persistence: bool

    @staticmethod
    def of(seed: int) -> Plan:
        rng = random.Random(f"plan-{seed}")
        protocol = rng.choice(("auto", "5", "3.1.1"))
        return Plan(
            seed=seed, protocol=protocol,
            v311_only=protocol != "5" and rng.random() < 0.3,
            queue_size=rng.choice((1, 2, 3, 8, 1024, 1024)),
            retain_final=rng.random() < 0.7,
            forget_ended_s=rng.choice((0.0, 0.6, 1.5, 3600.0)),
            timeout_s=rng.choice((0.4, 0.8)),
            drain_s=2.0,
            persistence=rng.random() < 0.5,
        )

    def config(self, port: int, prefix: str) -> MqttConfig:
        return load_config(overrides={
            "mqtt.enabled": True, "mqtt.port": port, "mqtt.prefix": prefix,
            "mqtt.protocol": self.protocol, "mqtt.queue_size": self.queue_size,
            "mqtt.retain_final": self.retain_final, "mqtt.forget_ended_s": self.forget_ended_s,
            "mqtt.timeout_s": self.timeout_s, "mqtt.drain_s": self.drain_s,
            "mqtt.reconnect_min_s": 0.05, "mqtt.reconnect_max_s": 0.3,
        }).mqtt


# --- the network between the publisher and the broker ---------------------------------


class ChaosRelay(Relay):
    """A relay to the broker that can cut its connections (:meth:`drop`),
    refuse new ones (``refusing``), stall what clients send (``flowing``
    cleared: not read, so it waits in the sockets) and, with ``v311_only``,
    answer an MQTT 5 CONNECT as a 3.1.1-only broker does."""

    def __init__(self, target: int, *, v311_only: bool) -> None:
        super().__init__(target)
        self.v311_only = v311_only
        self.refusing = False
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        first = b""
        if self.v311_only:
            try:
                fixed, body = await read_packet(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                return
            first = fixed + body
            if body[2 + int.from_bytes(body[:2], "big")] == 5:
                writer.write(b"\x20\x02\x00\x01")  # 3.1.1: unacceptable protocol version
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                writer.close()
                return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        if self.refusing:  # went down while connecting
            up_w.transport.abort()
            writer.transport.abort()
            return
        up_w.write(first)
        self._writers += [writer, up_w]
        for coro in (self.forward(reader, up_w), pipe(up_r, writer)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def forward(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self.flowing.wait()
                if not (data := await r.read(65536)):
                    break
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()


# --- the subscriber ----------------------------------------------------------------------


@dataclass(frozen=True)
class Got:
    """One message as the recorder got it."""

    t: float
    topic: str
    payload: bytes
    retain: bool


class Recorder:
    """A subscriber to ``{prefix}/#`` (QoS 1) with a persistent session, that
    reconnects at once when its connection breaks and subscribes again (a
    broker without persistence forgets the session). Retained messages are
    not sent at subscribe (retain handling 2): ``got`` holds what was
    published while it listened."""

    def __init__(self, port: int, prefix: str) -> None:
        self.port = port
        self.prefix = prefix
        self.identifier = f"rec-{secrets.token_hex(4)}"
        self.got: list[Got] = []
        self.generation = 0
        self.up = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Recorder:
        self._task = asyncio.create_task(self._run())
        await self.wait_up(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def wait_up(self, after: int, within: float = 15.0) -> None:
        """Until subscribed in a connection made after generation ``after``."""
        async with asyncio.timeout(within):
            while self.generation <= after or not self.up.is_set():
                self._changed.clear()
                await self._changed.wait()

    async def quiet(self, for_s: float = 0.3) -> None:
        """Until nothing arrived for ``for_s`` seconds."""
        n = -1
        while n != len(self.got):
            n = len(self.got)
            await asyncio.sleep(for_s)

    async def _run(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        while True:
            try:
                async with aiomqtt.Client(
                        "127.0.0.1", self.port, identifier=self.identifier,
                        protocol=aiomqtt.ProtocolVersion.V5, clean_start=False,
                        properties=props, timeout=2.0,
                        logger=logging.getLogger(f"{__name__}.recorder")) as client:
                    await client.subscribe(f"{self.prefix}/#", options=SubscribeOptions(
                        qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND))
                    self.generation += 1
                    self.up.set()
                    self._changed.set()
                    async for m in client.messages:
                        assert isinstance(m.payload, bytes)
                        self.got.append(Got(time.monotonic(), m.topic.value, m.payload,
                                            m.retain))
            except aiomqtt.MqttError:
                pass
            self.up.clear()
            await asyncio.sleep(0.05)


async def retained(port: int, prefix: str, quiet: float = 0.5) -> dict[str, bytes]:
    """The retained messages under ``prefix`` a new subscriber gets."""
    got: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"late-{secrets.token_hex(4)}",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(f"{prefix}/#", qos=1)
        messages = client.messages.__aiter__()
        with contextlib.suppress(TimeoutError):
            while True:
                m = await asyncio.wait_for(anext(messages), quiet)
                assert isinstance(m.payload, bytes)
                if m.retain:
                    got[m.topic.value] = m.payload
    return got


# --- the events ---------------------------------------------------------------------------


def _final(rng: random.Random, stream: str, segment: int, seq: int, t: float) -> CaptionEvent:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 6))]
    tags: list[TagMark] = []
    parts: list[str] = []
    for i, w in enumerate(words):
        if rng.random() < 0.25:
            tag = rng.choice(TAGS)
            tags.append(TagMark(tag, "non-verbal", i, round(t + i * 0.1, 3)))
            parts.append(f"[{tag}]")
        parts.append(w)
    text = " ".join(parts)
    return CaptionEvent(stream=stream, segment=segment, seq=seq, final=True, text=text,
                        plain_text=" ".join(words), stable=text, unstable="",
                        tags=tuple(tags), start=round(t, 3), end=round(t + 1, 3),
                        latency=round(rng.random(), 3))


def _partial(stream: str, segment: int, seq: int, n: int) -> CaptionEvent:
    text = " ".join(f"w{i}" for i in range(n))
    return CaptionEvent(stream=stream, segment=segment, seq=seq, final=False, text=text,
                        plain_text=text, stable="", unstable=text, tags=(), start=0.0,
                        end=float(n), latency=None)


def script(seed: int, n: int = 220) -> list[tuple[float, EngineEvent]]:
    """``n`` events in an order the engine could emit them, each after a pause (s)."""
    rng = random.Random(f"events-{seed}")
    live: dict[str, int] = {}          # stream -> segments so far
    seq: dict[str, int] = {}
    shown: dict[str, int] = {}         # stream -> words of the open segment's partial
    finals: dict[str, int] = {}
    errors = 0
    out: list[tuple[float, EngineEvent]] = []
    while len(out) < n:
        pause = 0.0 if rng.random() < 0.6 else rng.expovariate(1 / 0.04)
        idle = [s for s in STREAMS if s not in live]
        if idle and (not live or STREAMS[0] in idle or rng.random() < 0.1):
            s = STREAMS[0] if STREAMS[0] in idle else rng.choice(idle)
            live[s] = 0
            shown[s] = 0
            finals.setdefault(s, 0)
            out.append((pause, StreamStarted(s, rng.choice(("mic", "ingest", "file")))))
            continue
        s = rng.choice(sorted(live))
        r = rng.random()
        if r < 0.5:
            seq[s] = seq.get(s, 0) + 1
            shown[s] += rng.randint(1, 3)
            out.append((pause, _partial(s, live[s], seq[s], shown[s])))
        elif r < 0.8:
            seq[s] = seq.get(s, 0) + 1
            out.append((pause, _final(rng, s, live[s], seq[s], live[s] * 2.0)))
            live[s] += 1
            finals[s] += 1
            shown[s] = 0
        elif r < 0.87:
            errors += 1
            out.append((pause, StreamError(s, "decode_failed", f"boom #{errors} ✗", live[s])))
        elif s != STREAMS[0]:  # the microphone stays live: its status must survive it all
            out.append((pause, StreamEnded(s, live[s] * 2.0, live[s], finals[s])))
            del live[s]
    return out


def chaos(seed: int, timeout_s: float) -> list[tuple[float, str, float]]:
    """Disruptions: (pause before, kind, how long)."""
    rng = random.Random(f"chaos-{seed}")
    acts: list[tuple[float, str, float]] = []
    for _ in range(rng.randint(3, 5)):
        kind = rng.choice(("restart", "freeze", "freeze", "cut", "stall", "refuse"))
        if kind in ("freeze", "stall"):
            how = timeout_s * rng.choice((0.3, 1.7))
        elif kind == "cut":
            how = 0.0
        else:
            how = rng.uniform(0.2, 1.2)
        acts.append((rng.uniform(0.1, 0.8), kind, how))
    return acts


# --- a run --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened in one run."""

    plan: Plan
    prefix: str
    fed: list[tuple[float, EngineEvent]] = field(default_factory=list)
    acts: list[str] = field(default_factory=list)
    lost_retained_at: list[float] = field(default_factory=list)
    """When a broker without persistence was stopped (its retained messages lost)."""
    got: list[Got] = field(default_factory=list)
    stats: MqttStats | None = None
    online_before_close: dict[str, bytes] = field(default_factory=dict)
    settled: bool = True
    close_s: float = 0.0
    slowest_call_s: float = 0.0
    listener_errors: list[str] = field(default_factory=list)
    broadcast: list[str] = field(default_factory=list)
    records: list[logging.LogRecord] = field(default_factory=list)
    retained: dict[str, bytes] = field(default_factory=dict)
    checked_at: float = 0.0


class _Keep(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


def _with_persistence(broker: MosquittoBroker, workdir: Path) -> None:
    store = workdir / "store"
    store.mkdir()
    # As root, mosquitto would switch to its own user, who cannot write there.
    user = pwd.getpwuid(os.getuid()).pw_name
    broker.conf.write_text(broker.conf.read_text().replace(
        "persistence false\n",
        f"persistence true\npersistence_location {store}/\nuser {user}\n"))


async def run_chaos(seed: int, binary: str, workdir: Path) -> Outcome:
    """One seeded run against a mosquitto of its own in ``workdir``."""
    plan = Plan.of(seed)
    out = Outcome(plan, prefix=f"chaos{seed}")
    broker = MosquittoBroker(binary, workdir)
    if plan.persistence:
        _with_persistence(broker, workdir)
    keep = _Keep(out.records)
    logging.getLogger().addHandler(keep)
    broker.start()
    try:
        async with ChaosRelay(broker.port, v311_only=plan.v311_only) as relay, \
                Recorder(broker.port, out.prefix) as rec:
            await _run(out, broker, relay, rec)
    finally:
        logging.getLogger().removeHandler(keep)
        broker.stop()
    return out


async def _run(out: Outcome, broker: MosquittoBroker, relay: ChaosRelay, rec: Recorder
               ) -> None:
    plan = out.plan
    pub = MqttPublisher(plan.config(relay.port, out.prefix), rand=random.Random(plan.seed).random)
    fan = Broadcaster(100_000, encode_event)
    sub = fan.subscribe()
    listeners: list[Callable[[EngineEvent], None]] = [pub, fan.publish]
    t0 = time.monotonic()

    def note(what: str) -> None:
        out.acts.append(f"{time.monotonic() - t0:.2f}s {what}")

    async def feed() -> None:
        for pause, event in script(plan.seed):
            if pause:
                await asyncio.sleep(pause)
            out.fed.append((time.monotonic(), event))
            for listener in listeners:
                # As the engine's _emit calls its listeners.
                t = time.perf_counter()
                try:
                    listener(event)
                except Exception as e:
                    out.listener_errors.append(f"{listener!r} raised {e!r} for {event!r}")
                if listener is pub:
                    out.slowest_call_s = max(out.slowest_call_s, time.perf_counter() - t)

    async def disrupt(feeding: asyncio.Task[None]) -> None:
        for pause, kind, how in chaos(plan.seed, plan.timeout_s):
            await asyncio.sleep(pause)
            if feeding.done():
                return
            note(f"{kind} {how:.2f}s")
            if kind == "restart":
                relay.refusing = True
                relay.drop()
                if not plan.persistence:
                    # What was published must reach the recorder before the
                    # broker forgets it: losses must be the publisher's.
                    await rec.quiet()
                    out.lost_retained_at.append(time.monotonic())
                generation = rec.generation
                broker.stop(graceful=plan.persistence)
                await asyncio.sleep(how)
                broker.start()
                await rec.wait_up(generation)
                relay.refusing = False
            elif kind == "freeze":
                broker.freeze()
                try:
                    await asyncio.sleep(how)
                finally:
                    broker.thaw()
            elif kind == "cut":
                relay.drop()
            elif kind == "stall":
                relay.flowing.clear()
                await asyncio.sleep(how)
                relay.flowing.set()
            elif kind == "refuse":
                relay.refusing = True
                relay.drop()
                await asyncio.sleep(how)
                relay.refusing = False

    await pub.start()
    try:
        feeding = asyncio.create_task(feed())
        await disrupt(feeding)
        await feeding
        note("fed")
        # Everything healthy again: the queue must drain.
        try:
            async with asyncio.timeout(20):
                while not (pub.connected and pub.stats().queued == 0):
                    await asyncio.sleep(0.02)
        except TimeoutError:
            out.settled = False
        await rec.quiet()
        out.online_before_close = await retained(broker.port, f"{out.prefix}/status", 0.3)
    finally:
        t = time.monotonic()
        await pub.aclose()
        out.close_s = time.monotonic() - t
        note("closed")
    out.stats = pub.stats()
    await rec.quiet(0.5)
    out.got = list(rec.got)
    while not sub.queue.empty():
        out.broadcast.append(sub.queue.get_nowait())
    out.checked_at = time.monotonic()
    out.retained = await retained(broker.port, out.prefix)


# --- the checks ---------------------------------------------------------------------------


def _body(payload: bytes) -> dict[str, Any]:
    obj = json.loads(payload)
    assert isinstance(obj, dict)
    return obj


def _topic(prefix: str, stream: str, leaf: str) -> str:
    return f"{prefix}/{topic_level(stream)}/{leaf}"


def check(out: Outcome) -> list[str]:
    """The problems of ``out`` (see the module doc); empty: none."""
    plan, st, prefix = out.plan, out.stats, out.prefix
    assert st is not None
    problems: list[str] = []
    events = [e for _, e in out.fed]
    lossy = st.dropped_finals + st.failed

    # The publisher never blocks or raises; the other listeners get everything.
    problems += out.listener_errors
    # Microseconds when all is well; a blocking call (a publish awaited on
    # the broker) takes the timeout. 0.2 s leaves room for a busy machine.
    if out.slowest_call_s > 0.2:
        problems.append(f"a listener call took {out.slowest_call_s * 1000:.0f} ms")
    if out.broadcast != [encode_event(e) for e in events]:
        problems.append(f"the broadcaster got {len(out.broadcast)} messages for "
                        f"{len(events)} events")

    # Bounded close; a queue that drains once everything is healthy.
    limit = plan.drain_s + 2 * plan.timeout_s + 1.0
    if out.close_s > limit + 1.0:
        problems.append(f"aclose took {out.close_s:.1f} s (bound {limit:.1f} s)")
    if not out.settled:
        problems.append(f"the queue did not drain once the broker was back: {st}")
    if st.queued:
        problems.append(f"{st.queued} event(s) still queued after close")

    # Every event is accounted for (published also counts restates and removals).
    accounted = st.published + st.superseded + st.dropped_partials + lossy
    if accounted < len(events):
        problems.append(f"{len(events)} events fed, only {accounted} accounted for: {st}")

    # Finals and errors arrive, at least once, in order per stream, unless counted lost.
    index = {encode_event(e).encode(): i for i, e in enumerate(events)
             if isinstance(e, StreamError) or (isinstance(e, CaptionEvent) and e.final)}
    first: dict[bytes, int] = {}
    for n, g in enumerate(out.got):
        if g.payload in index and g.payload not in first:
            first[g.payload] = n
    missing = [p for p in index if p not in first]
    if len(missing) > lossy:
        problems.append(f"{len(missing)} final(s)/error(s) never arrived, but only {lossy} "
                        f"counted dropped or failed ({st}); first: "
                        f"{[p[:80] for p in missing[:3]]}")
    by_stream: dict[str, list[int]] = {}
    for p, _ in sorted(first.items(), key=lambda kv: kv[1]):
        by_stream.setdefault(_body(p)["stream"], []).append(index[p])
    for stream, order in by_stream.items():
        if order != sorted(order):
            problems.append(f"{stream!r}: finals/errors arrived out of order: {order}")

    # Drops are logged; nothing is logged as an error, nor with a traceback.
    said = [r.getMessage() for r in out.records]
    if st.dropped_partials + st.dropped_finals and not any("MQTT queue full" in m
                                                           for m in said):
        problems.append("events were dropped but no 'MQTT queue full' warning was logged")
    for r in out.records:
        if _tolerated(r):
            continue
        if r.levelno >= logging.ERROR or r.exc_info:
            problems.append(f"logged {r.levelname} {r.name}: {r.getMessage()[:300]}")

    # Presence.
    status = f"{prefix}/status"
    if out.online_before_close.get(status) != ENGINE_ONLINE:
        problems.append(f"retained presence while running: {out.online_before_close}")
    if out.retained.get(status) != ENGINE_OFFLINE:
        problems.append(f"retained presence after close: {out.retained.get(status)!r}")

    problems += _check_retained(out)
    return problems


def _tolerated(r: logging.LogRecord) -> bool:
    """ERROR records of the libraries below the publisher, left as they are.

    aiomqtt schedules its socket callbacks from paho's connect thread; one
    may run after a refused connection closed the socket (rare)."""
    m = r.getMessage()
    return r.name == "asyncio" and m.startswith(
        ("Exception in callback BaseSelectorEventLoop.add_writer",
         "Exception in callback BaseSelectorEventLoop.add_reader"))


def _check_retained(out: Outcome) -> list[str]:
    """Each topic's retained status and last final against its last state."""
    plan, st, prefix = out.plan, out.stats, out.prefix
    assert st is not None
    problems: list[str] = []
    v5 = st.protocol == "5"
    last_state: dict[str, tuple[float, EngineEvent]] = {}
    last_final: dict[str, tuple[float, CaptionEvent]] = {}
    ids: dict[str, set[str]] = {}
    for t, e in out.fed:
        ids.setdefault(topic_level(e.stream), set()).add(e.stream)
        if isinstance(e, StreamStarted | StreamEnded):
            last_state[_topic(prefix, e.stream, "status")] = (t, e)
        elif isinstance(e, CaptionEvent) and e.final:
            last_final[_topic(prefix, e.stream, "final")] = (t, e)
    arrived: dict[bytes, float] = {}
    for g in out.got:
        arrived[g.payload] = g.t

    def lost_since(payload: bytes) -> bool:
        """A broker without persistence stopped after it was published."""
        since = arrived.get(payload, 0.0)
        return any(t > since for t in out.lost_retained_at)

    # The overflow policy keeps each topic's last state unless the queue held
    # nothing but lifecycle events, each its topic's last: more topics than
    # the queue holds.
    strict = st.failed == 0 and (st.dropped_finals == 0 or plan.queue_size >= len(ids))
    ended_topics: set[str] = set()
    ok: set[bytes | None]
    for topic, (_, ev) in last_state.items():
        got = out.retained.get(topic)
        want = encode_event(ev).encode()
        shared = len(ids[topic.split("/")[1]]) > 1
        if isinstance(ev, StreamStarted):
            ok = {want} if strict or not shared else {want, None}
        else:
            ended_topics.add(topic.rsplit("/", 1)[0])
            if plan.forget_ended_s == 0:
                ok = {want}
            elif not v5:
                ok = {None}
            else:
                ok = {want, None}
                since = arrived.get(want)
                if since is not None and out.checked_at - since > plan.forget_ended_s + 1.0:
                    ok = {None}  # the broker expired it
            if lost_since(want):
                ok.add(None)
        if not strict:
            ok = {None} | {encode_event(e).encode() for _, e in out.fed
                           if isinstance(e, StreamStarted | StreamEnded)
                           and _topic(prefix, e.stream, "status") == topic}
        if got not in ok:
            problems.append(f"retained {topic}: {got[:90] if got else got!r}, expected one "
                            f"of {[o[:90] if o else o for o in ok]}")

    for topic, (_, fin) in last_final.items():
        got = out.retained.get(topic)
        want = encode_event(fin).encode()
        base = topic.rsplit("/", 1)[0]
        if not plan.retain_final or (base in ended_topics and plan.forget_ended_s > 0):
            ok = {None}
        else:
            ok = {want}
            if lost_since(want):
                ok.add(None)
        shared = len(ids[topic.split("/")[1]]) > 1
        if shared and plan.retain_final:
            ok.add(None)
            ok.add(want)
        if (st.failed or st.dropped_finals) and plan.retain_final:
            ok = {None} | {encode_event(e).encode() for _, e in out.fed
                           if isinstance(e, CaptionEvent) and e.final
                           and _topic(prefix, e.stream, "final") == topic}
        if got not in ok:
            problems.append(f"retained {topic}: {got[:90] if got else got!r}, expected one "
                            f"of {[o[:90] if o else o for o in ok]}")
    extra = set(out.retained) - set(last_state) - set(last_final) - {f"{prefix}/status"}
    if extra:
        problems.append(f"retained on topics never published: {sorted(extra)}")
    return problems
