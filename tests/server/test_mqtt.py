"""The MQTT publisher against a real mosquitto: topics, QoS, retain, outages, overflow."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

try:
    import aiomqtt
except ImportError:  # the mqtt extra is optional
    pytest.skip("aiomqtt not installed (pip install -e '.[mqtt]')",
                allow_module_level=True)

from evoxtral_stream.config import ConfigError, MqttConfig, load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import (
    CaptionEvent,
    EngineEvent,
    StreamEnded,
    StreamError,
    StreamStarted,
)
from evoxtral_stream.run import feed_samples
from evoxtral_stream.server.mqtt import (
    ENGINE_OFFLINE,
    ENGINE_ONLINE,
    MqttPublisher,
    reconnect_delay,
    topic_level,
)
from evoxtral_stream.server.protocol import encode_event
from tests.fakes import ScriptedBackend
from tests.helpers.audio import buzz, noise, to_int16
from tests.helpers.http import http_get, pipe
from tests.server.conftest import MosquittoBroker, free_port
from tests.test_cli import _start_serve

pytestmark = pytest.mark.timeout(60)

Message = aiomqtt.Message


def mqtt_overrides(port: int, prefix: str, **over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "mqtt.enabled": True, "mqtt.port": port, "mqtt.prefix": prefix,
        "mqtt.reconnect_min_s": 0.05, "mqtt.reconnect_max_s": 0.2,
        "mqtt.timeout_s": 2.0, "mqtt.drain_s": 1.0,
    }
    base.update({f"mqtt.{k}": v for k, v in over.items()})
    return base


def mqtt_config(port: int, prefix: str, **over: object) -> MqttConfig:
    return load_config(overrides=mqtt_overrides(port, prefix, **over)).mqtt


def caption(stream: str, segment: int, seq: int, final: bool, text: str = "hello"
            ) -> CaptionEvent:
    return CaptionEvent(stream=stream, segment=segment, seq=seq, final=final, text=text,
                        plain_text=text, stable=text if final else "",
                        unstable="" if final else text, tags=(), start=0.0, end=1.0,
                        latency=0.1 if final else None)


def topic(m: Message) -> str:
    return m.topic.value


def payload(m: Message) -> bytes:
    assert isinstance(m.payload, bytes)
    return m.payload


def body(m: Message) -> dict[str, Any]:
    obj = json.loads(payload(m))
    assert isinstance(obj, dict)
    return obj


async def eventually(cond: Callable[[], bool], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


class Subscriber:
    """A real MQTT client that records everything it receives."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.got: list[Message] = []
        self._it = client.messages.__aiter__()

    async def until(self, pred: Callable[[list[Message]], bool], what: str,
                    within: float = 5.0) -> list[Message]:
        try:
            async with asyncio.timeout(within):
                while not pred(self.got):
                    self.got.append(await anext(self._it))
        except TimeoutError:
            seen = [(topic(m), payload(m)[:80]) for m in self.got]
            raise AssertionError(f"timed out waiting for {what}; got {seen}") from None
        return self.got

    async def settle(self, quiet: float = 0.3) -> list[Message]:
        """Everything that arrives until nothing has for ``quiet`` seconds."""
        with contextlib.suppress(TimeoutError):
            while True:
                self.got.append(await asyncio.wait_for(anext(self._it), quiet))
        return self.got

    def on(self, suffix: str) -> list[Message]:
        return [m for m in self.got if topic(m).endswith(suffix)]


@contextlib.asynccontextmanager
async def subscriber(port: int, *topics: str) -> AsyncIterator[Subscriber]:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"sub-{secrets.token_hex(4)}",
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        for t in topics:
            await client.subscribe(t, qos=1)
        yield Subscriber(client)


async def connected(pub: MqttPublisher, within: float = 5.0) -> None:
    await asyncio.wait_for(pub.wait_connected(), within)


# --- through a real engine ----------------------------------------------------------


def words_so_far(audio: np.ndarray) -> str:
    # A stand-in model: one word per half second of audio, so partials grow.
    return " ".join(f"w{i}" for i in range(len(audio) // 8000))


async def test_engine_events_reach_their_topics(mosquitto: MosquittoBroker) -> None:
    cfg = load_config(overrides={"server.port": 0, **mqtt_overrides(mosquitto.port, "e")})
    audio = to_int16(np.concatenate([noise(0.5), buzz(2.5), noise(1.2, seed=1), buzz(2.0),
                                     noise(1.2, seed=2)]))
    emitted: list[EngineEvent] = []
    async with subscriber(mosquitto.port, "e/#") as sub:
        async with MqttPublisher(cfg.mqtt) as pub:
            await connected(pub)
            async with Engine(cfg, ScriptedBackend(words_so_far)) as engine:
                engine.add_listener(emitted.append)
                engine.add_listener(pub)
                # A slash in the id must not open a new topic level.
                stream = engine.open_stream("talk/1", source="test")
                await feed_samples(stream, audio, 1600, realtime=False)
        stats = pub.stats()
        await sub.until(lambda got: len([m for m in got if topic(m) == "e/status"]) == 2,
                        "online and offline")
        await sub.settle()

    assert stats.protocol == "5"
    assert (stats.dropped_partials, stats.dropped_finals, stats.failed, stats.queued) == (
        0, 0, 0, 0)
    finals = [e for e in emitted if isinstance(e, CaptionEvent) and e.final]
    partials = [e for e in emitted if isinstance(e, CaptionEvent) and not e.final]
    assert len(finals) == 2, "the audio holds two utterances"
    assert partials, "the engine emitted partials"
    # One more: the stop removes the ended stream's retained last final,
    # which nothing would expire (an empty retained message).
    assert stats.published == len(emitted) - stats.superseded + 1

    stream_msgs = [m for m in sub.got if topic(m).startswith("e/talk_1/")]
    assert len(stream_msgs) == stats.published
    assert [payload(m) for m in sub.on("/final")] == [
        *(encode_event(e).encode() for e in finals), b""]
    assert all(m.qos == 1 for m in sub.on("/final"))
    stream_msgs = [m for m in stream_msgs if payload(m)]
    got_partials = sub.on("/partial")
    assert got_partials, "partials reached the broker"
    assert all(m.qos == 0 for m in got_partials)
    assert {payload(m) for m in got_partials} <= {encode_event(e).encode() for e in partials}
    assert all(body(m)["final"] is False for m in got_partials)
    status = [body(m) for m in sub.on("/talk_1/status")]
    assert [s["type"] for s in status] == ["stream.started", "stream.ended"]
    assert status[0]["stream"] == "talk/1"
    # One publisher, one connection: everything arrives in the engine's order.
    seqs = [body(m)["seq"] for m in stream_msgs if body(m)["type"] == "caption"]
    assert seqs == sorted(seqs)
    assert [payload(m) for m in sub.got if topic(m) == "e/status"] == [ENGINE_ONLINE,
                                                                      ENGINE_OFFLINE]


def _metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.split(" ", 1)[0] == name)


async def test_serve_exports_the_publisher_counters_in_metrics(
        mosquitto: MosquittoBroker) -> None:
    """What an operator alerts on: connected, published, dropped, failed."""
    proc, url = _start_serve("--source", "none", "--set", "mqtt.enabled=true",
                             "--set", f"mqtt.port={mosquitto.port}",
                             "--set", "mqtt.reconnect_min_s=0.05",
                             "--set", "mqtt.reconnect_max_s=0.2")
    try:
        base = url.replace("ws://", "http://").removesuffix("/v1/captions")
        ingest = url.replace("/v1/captions", "/v1/ingest?stream=desk")
        async with connect(ingest) as ws:
            await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
            assert json.loads(await ws.recv())["type"] == "ingest.ready"
            await ws.send(json.dumps({"type": "end"}))
            while json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] != "stream.ended":
                pass

        async def scrape() -> str:
            status, text = await http_get(f"{base}/metrics")
            assert status == 200
            return text

        deadline = time.monotonic() + 20
        while _metric(text := await scrape(), "evoxtral_mqtt_published_total") < 2:
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.1)
        assert _metric(text, "evoxtral_mqtt_connected") == 1.0
        assert _metric(text, "evoxtral_mqtt_connects_total") == 1.0
        assert _metric(text, "evoxtral_mqtt_failed_total") == 0.0
        assert 'evoxtral_mqtt_dropped_total{kind="final"} 0.0' in text

        mosquitto.stop()
        while _metric(text := await scrape(), "evoxtral_mqtt_connected") != 0.0 \
                or _metric(text, "evoxtral_mqtt_connect_failures_total") < 1:
            assert time.monotonic() < deadline + 20, text
            await asyncio.sleep(0.1)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


# --- topics, QoS, retain ----------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "retain_final"),
                         [("auto", True), ("3.1.1", True), ("auto", False)])
async def test_late_subscriber_gets_the_retained_last_final(
    mosquitto: MosquittoBroker, protocol: str, retain_final: bool,
) -> None:
    cfg = mqtt_config(mosquitto.port, "r", protocol=protocol, retain_final=retain_final)
    async with MqttPublisher(cfg) as pub:
        await connected(pub)
        pub(StreamStarted("s", "test"))
        pub(caption("s", 0, 1, True, "first"))
        pub(caption("s", 1, 2, False, "sec"))
        pub(caption("s", 1, 3, True, "second"))
        pub(StreamError("s", "decode_failed", "boom", 2))
        await eventually(lambda: pub.stats().queued == 0, "queue drained")
        # Counted at the broker's acknowledgement, which the last one taken
        # from the queue may still wait for.
        await eventually(lambda: pub.stats().published >= 4, "the four published")
        st = pub.stats()
        assert st.protocol == ("3.1.1" if protocol == "3.1.1" else "5")
        # The partial was replaced by its segment's final before it could go out.
        assert (st.published, st.superseded) == (4, 1)

        async with subscriber(mosquitto.port, "r/#") as late:
            await late.until(lambda got: any(topic(m) == "r/s/status" for m in got),
                             "retained status")
            got = await late.settle()
    finals = [m for m in got if topic(m) == "r/s/final"]
    if retain_final:
        assert len(finals) == 1
        assert body(finals[0])["text"] == "second"
        assert finals[0].retain
        assert finals[0].qos == 1
    else:
        assert finals == []
    assert [body(m)["type"] for m in got if topic(m) == "r/s/status"] == ["stream.started"]
    assert [payload(m) for m in got if topic(m) == "r/status"] == [ENGINE_ONLINE]
    assert not [m for m in got if topic(m) in ("r/s/partial", "r/s/error")], \
        "partials and errors are not retained"


async def test_an_empty_final_reaches_subscribers_but_leaves_the_last_caption_retained(
        mosquitto: MosquittoBroker) -> None:
    """A segment the model found no speech in (noise, a cough: Whisper's
    no_speech_threshold) gets an empty final. Retained, it replaced the last
    caption said on the broker, so a display subscribing after it showed
    nothing for the stream. It still goes out live (QoS 1), not retained."""
    cfg = mqtt_config(mosquitto.port, "n")
    async with subscriber(mosquitto.port, "n/+/final") as live, MqttPublisher(cfg) as pub:
        await connected(pub)
        pub(StreamStarted("s", "test"))
        pub(caption("s", 0, 1, True, "said"))
        pub(caption("s", 1, 2, False, "You"))
        pub(caption("s", 1, 3, True, ""))
        got = await live.until(lambda got: len(got) >= 2, "both finals")
        assert [(body(m)["text"], m.qos) for m in got] == [("said", 1), ("", 1)]
        await eventually(lambda: pub.stats().published >= 3, "all published")
        async with subscriber(mosquitto.port, "n/#") as late:
            await late.until(lambda got: any(topic(m) == "n/s/status" for m in got),
                             "retained status")
            retained = await late.settle()
    finals = [m for m in retained if topic(m) == "n/s/final"]
    assert [(body(m)["text"], m.retain) for m in finals] == [("said", True)]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_an_ended_streams_retained_messages_are_removed_after_forget_ended_s(
        mosquitto: MosquittoBroker, protocol: str) -> None:
    """Every stream id used to stay retained on the broker for good, so each
    new subscriber to {prefix}/+/status got every stream ever seen. Now an
    ended stream's status and last final are removed forget_ended_s after
    its end (live subscribers see an empty message); a stream opened again
    in the meantime, or still live, keeps them, as does one whose id shares
    the topic (x/y and x_y)."""
    cfg = mqtt_config(mosquitto.port, "f", protocol=protocol, forget_ended_s=1.0)
    async with subscriber(mosquitto.port, "f/+/status", "f/+/final") as live, \
            MqttPublisher(cfg) as pub:
        await connected(pub)
        for stream in ("gone", "back", "live"):
            pub(StreamStarted(stream, "test"))
            pub(caption(stream, 0, 1, True, f"{stream} said"))
        pub(StreamStarted("x/y", "test"))
        pub(StreamEnded("gone", 3.0, 1, 1))
        pub(StreamEnded("back", 3.0, 1, 1))
        pub(StreamEnded("x/y", 3.0, 0, 0))
        await asyncio.sleep(0.5)
        pub(StreamStarted("back", "test"))       # opened again before it is forgotten
        pub(caption("back", 0, 2, True, "back again"))
        pub(StreamStarted("x_y", "test"))        # the same topics as x/y
        pub(caption("x_y", 0, 1, True, "x_y said"))
        await eventually(lambda: pub.stats().queued == 0, "queue drained")
        cleared = await live.until(
            lambda got: len([m for m in got if payload(m) == b""]) >= 2, "the removals",
            within=10.0)
        assert sorted(topic(m) for m in cleared if payload(m) == b"") == [
            "f/gone/final", "f/gone/status"]
        await asyncio.sleep(1.5)                 # "back"'s old end is past its time too
        async with subscriber(mosquitto.port, "f/#") as late:
            await late.until(lambda got: len(got) >= 7, "retained messages")
            got = await late.settle(0.5)
    retained = {(topic(m), body(m)["type"], body(m).get("text")) for m in got
                if topic(m) != "f/status"}
    assert retained == {("f/back/status", "stream.started", None),
                        ("f/back/final", "caption", "back again"),
                        ("f/live/status", "stream.started", None),
                        ("f/live/final", "caption", "live said"),
                        ("f/x_y/status", "stream.started", None),
                        ("f/x_y/final", "caption", "x_y said")}, got
    assert [payload(m) for m in live.got if payload(m) == b""] == [b"", b""]


async def test_removals_due_after_an_outage_never_push_out_the_finals_it_kept(
        mosquitto: MosquittoBroker) -> None:
    """The removals of ended streams' retained messages that fell due while
    the broker was down used to be queued all at once at the reconnect: more
    of them than the queue had room for pushed out every final it had kept
    through the outage (and then each other). Now they are queued only as
    room allows, after what waits: nothing is dropped."""
    cfg = mqtt_config(mosquitto.port, "d", forget_ended_s=0.5, queue_size=8)
    async with MqttPublisher(cfg) as pub:
        await connected(pub)
        for i in range(10):
            pub(StreamStarted(f"e{i}", "test"))
            pub(StreamEnded(f"e{i}", 1.0, 0, 0))
            await eventually(lambda: pub.stats().queued == 0, "queue drained")
        pub(StreamStarted("live", "test"))
        await eventually(lambda: pub.stats().published == 21, "the 21 published")
        mosquitto.stop()
        await eventually(lambda: not pub.connected, "the loss noticed while idle")
        for seg in range(3):
            pub(caption("live", seg, seg + 1, True, f"final {seg}"))
        await asyncio.sleep(0.7)  # every ended stream's removal is due now
        mosquitto.start()
        await connected(pub)
        # 21 before the outage, the live status restated, 3 finals, 20
        # removals. Not "queued == 0": the last one may be in flight then
        # (popped, its PUBACK awaited), or removals still due (queued as
        # room allows).
        await eventually(lambda: pub.stats().published >= 21 + 1 + 3 + 20,
                         "everything published after the outage", within=10.0)
        await asyncio.sleep(0.3)
        st = pub.stats()
    assert (st.dropped_finals, st.dropped_partials, st.failed, st.queued) == (0, 0, 0, 0), st
    assert st.published == 21 + 1 + 3 + 20, st


async def test_a_queue_of_one_still_removes_both_retained_messages_of_an_ended_stream(
        mosquitto: MosquittoBroker) -> None:
    """With queue_size = 1 the two removals of an ended stream (its status and
    its last final) used to be queued at once into the empty queue, and the
    second pushed the first out: the stream's stream.ended status stayed
    retained for good. Now each is queued as the queue has room."""
    cfg = mqtt_config(mosquitto.port, "q1", protocol="3.1.1", forget_ended_s=0.3,
                      queue_size=1)
    async with MqttPublisher(cfg) as pub:
        await connected(pub)
        for event in (StreamStarted("gone", "test"), caption("gone", 0, 1, True, "said"),
                      StreamEnded("gone", 1.0, 1, 0)):
            pub(event)
            await eventually(lambda: pub.stats().queued == 0, "queue drained")
        await eventually(lambda: pub.stats().published == 5, "both removals published")
        st = pub.stats()
    assert (st.dropped_finals, st.dropped_partials, st.failed) == (0, 0, 0), st
    async with subscriber(mosquitto.port, "q1/#") as late:
        got = await late.settle(1.0)
    assert [topic(m) for m in got if topic(m) != "q1/status" and payload(m)] == [], got


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_an_engine_stopping_within_forget_ended_s_leaves_nothing_for_good(
        mosquitto: MosquittoBroker, protocol: str) -> None:
    """MQTT 3.1.1 has no message expiry: an ended stream's retained messages
    used to stay on the broker for good when the engine stopped within
    forget_ended_s. Now it clears them as it stops. With MQTT 5 the status
    stays until its expiry (the last final has none: it is cleared too), and
    a live stream's status stays either way."""
    cfg = mqtt_config(mosquitto.port, f"s{protocol[0]}", protocol=protocol,
                      forget_ended_s=3600.0)
    prefix = cfg.prefix
    async with MqttPublisher(cfg) as pub:
        await connected(pub)
        for stream in ("gone", "live"):
            pub(StreamStarted(stream, "test"))
            pub(caption(stream, 0, 1, True, f"{stream} said"))
        pub(StreamEnded("gone", 3.0, 1, 1))
        await eventually(lambda: pub.stats().queued == 0, "queue drained")
    async with subscriber(mosquitto.port, f"{prefix}/#") as late:
        got = await late.settle(1.0)
    retained = {(topic(m), body(m)["type"]) for m in got
                if topic(m) != f"{prefix}/status" and payload(m)}
    live = {(f"{prefix}/live/status", "stream.started"), (f"{prefix}/live/final", "caption")}
    gone = {(f"{prefix}/gone/status", "stream.ended")}
    assert retained == (live if protocol == "3.1.1" else live | gone), got


async def test_forget_ended_s_zero_keeps_an_ended_stream_retained(
        mosquitto: MosquittoBroker) -> None:
    cfg = mqtt_config(mosquitto.port, "k", forget_ended_s=0)
    async with MqttPublisher(cfg) as pub:
        await connected(pub)
        pub(StreamStarted("s", "test"))
        pub(caption("s", 0, 1, True, "kept"))
        pub(StreamEnded("s", 1.0, 1, 1))
        await eventually(lambda: pub.stats().queued == 0, "queue drained")
        await asyncio.sleep(1.2)
        async with subscriber(mosquitto.port, "k/s/#") as late:
            got = await late.until(lambda got: len(got) >= 2, "retained messages")
    assert {body(m)["type"] for m in got} == {"stream.ended", "caption"}


# --- broker outage -------------------------------------------------------------------------


async def test_broker_down_events_queue_and_flow_after_restart(
    mosquitto: MosquittoBroker,
) -> None:
    cfg = mqtt_config(mosquitto.port, "o")
    async with MqttPublisher(cfg) as pub:
        await connected(pub)
        mosquitto.stop()
        await eventually(lambda: not pub.connected, "the loss noticed while idle")

        worst = 0.0
        events: list[EngineEvent] = [StreamStarted("s", "test")]
        for seg in range(3):
            events += [caption("s", seg, 10 * seg + r, False) for r in range(5)]
            events.append(caption("s", seg, 10 * seg + 9, True, f"final {seg}"))
        events.append(StreamError("s", "decode_failed", "boom", 2))
        for ev in events:
            t0 = time.perf_counter()
            pub(ev)
            worst = max(worst, time.perf_counter() - t0)
        assert worst < 0.01, f"a listener call took {worst * 1000:.1f} ms with the broker down"

        await eventually(lambda: pub.stats().connect_failures >= 2, "reconnect attempts")
        st = pub.stats()
        assert not st.connected
        assert st.last_error
        assert (st.queued, st.published, st.superseded) == (5, 0, 15)
        assert st.unpublished == 0, "nothing is lost while the queue has room"

        mosquitto.start()
        async with subscriber(mosquitto.port, "o/#") as sub:
            # An event taken from the queue is neither queued nor published
            # until its QoS 1 acknowledgement: wait for the count, not the queue.
            await eventually(lambda: pub.stats().published + pub.stats().failed >= 5,
                             "reconnect and replay")
            st = pub.stats()
            assert (st.connects, st.reconnects, st.published, st.failed, st.queued) == (
                2, 1, 5, 0, 0)
            # The replay may beat our subscription: the retained last final is there anyway.
            await sub.until(lambda got: any(topic(m) == "o/s/final"
                                            and body(m)["text"] == "final 2" for m in got),
                            "the last final queued during the outage")
            pub(caption("s", 3, 99, True, "after"))
            got = await sub.until(lambda got: any(topic(m) == "o/s/final"
                                                  and body(m)["seq"] == 99 for m in got),
                                  "a final published after the reconnect")
            # Counted at the broker's acknowledgement, which may come after
            # the subscriber has the message.
            await eventually(lambda: pub.stats().published == 6, "the six acknowledged")
    after = [m for m in got if topic(m) == "o/s/final" and body(m)["seq"] == 99]
    assert after[0].qos == 1
    assert pub.stats().published == 6


async def test_a_broker_restarted_without_persistence_learns_the_live_streams_again(
    mosquitto: MosquittoBroker,
) -> None:
    """A broker without persistence forgets its retained messages when it
    restarts. A dashboard subscribing to {prefix}/+/status after that must
    still learn which streams are live (they said so once, before the
    restart); a stream that ended is not said to be live again."""
    cfg = mqtt_config(mosquitto.port, "r")
    async with MqttPublisher(cfg) as pub:
        await connected(pub)
        for event in (StreamStarted("live", "test"), StreamStarted("gone", "test"),
                      StreamEnded("gone", 1.0, 0, 0), StreamStarted("again", "test"),
                      StreamEnded("again", 1.0, 0, 0), StreamStarted("again", "test")):
            pub(event)
        await eventually(lambda: pub.stats().published == 6, "the six")
        mosquitto.stop()
        await eventually(lambda: not pub.connected, "the loss noticed while idle")
        mosquitto.start()
        await connected(pub)
        async with subscriber(mosquitto.port, "r/+/status") as late:
            await late.until(lambda got: len(got) >= 2, "the live streams' status")
            await late.settle()
        # Now retained on the broker (the first may have had them live).
        async with subscriber(mosquitto.port, "r/+/status") as later:
            got = await later.until(lambda got: len(got) >= 2, "the retained status")
            got = await later.settle()
    assert sorted((topic(m), body(m)["type"]) for m in late.got) == [
        ("r/again/status", "stream.started"), ("r/live/status", "stream.started")]
    assert sorted((topic(m), body(m)["type"], m.retain) for m in got) == [
        ("r/again/status", "stream.started", True), ("r/live/status", "stream.started", True)]
    # The six, then the two again (online is not counted), and at the stop
    # the removal of the last final of "gone", which ended.
    assert pub.stats().published == 9


async def test_backoff_is_bounded_and_close_does_not_hang() -> None:
    port = free_port()  # nothing listens here
    cfg = mqtt_config(port, "b", reconnect_min_s=0.02, reconnect_max_s=0.1, drain_s=0.3)
    pub = MqttPublisher(cfg, rand=lambda: 0.0)
    await pub.start()
    await asyncio.sleep(1.0)
    failures = pub.stats().connect_failures
    # 0.02, 0.04, 0.08, then every 0.1 s: about 11 attempts in 1 s. Unbounded
    # doubling would make 6, no backoff at all hundreds.
    assert 7 <= failures <= 15, failures
    pub(caption("s", 0, 1, True))
    t0 = time.monotonic()
    await pub.aclose()
    assert time.monotonic() - t0 < 0.3 + 1.0
    st = pub.stats()
    assert (st.connects, st.failed, st.queued, st.unpublished) == (0, 1, 0, 1)
    pub(caption("s", 1, 2, True))  # after close: counted, not queued, no error
    assert pub.stats().failed == 2


def test_reconnect_delay_doubles_up_to_the_bound() -> None:
    cfg = mqtt_config(1883, "x", reconnect_min_s=0.5, reconnect_max_s=4.0)
    assert [reconnect_delay(cfg, n, lambda: 0.0) for n in range(1, 7)] == [
        0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert reconnect_delay(cfg, 3, lambda: 0.999) == pytest.approx(2.0 * 0.75, rel=1e-2)
    assert reconnect_delay(cfg, 100_000, lambda: 0.0) == 4.0


# --- overflow policy ----------------------------------------------------------------------


async def test_overflow_keeps_finals_and_drops_partials_first(
    mosquitto: MosquittoBroker,
) -> None:
    # Events queue before start(), so what is kept is decided before anything is sent.
    a = MqttPublisher(mqtt_config(mosquitto.port, "qa", queue_size=4))
    a(StreamStarted("s", "test"))
    a(caption("s", 0, 1, False))
    a(caption("s", 0, 2, False))       # replaces seq 1 (same segment)
    a(caption("s", 0, 3, True))        # replaces seq 2 (its final)
    a(caption("s", 1, 4, False))
    a(caption("t", 0, 1, False))       # queue full: started, f0, p(s,1), p(t,0)
    a(caption("s", 1, 5, True))        # replaces p(s,1)
    a(caption("t", 0, 2, True))        # replaces p(t,0): started, f(s,0), f(s,1), f(t,0)
    a(caption("s", 2, 6, False))       # full of finals: the new partial is dropped
    a(caption("s", 2, 7, True))        # full, no partial: the oldest final (s,0) goes,
    st = a.stats()                     # not the stream's state (started)
    assert (st.queued, st.superseded, st.dropped_partials, st.dropped_finals) == (4, 4, 1, 1)

    b = MqttPublisher(mqtt_config(mosquitto.port, "qb", queue_size=2))
    b(caption("x", 0, 1, False))
    b(caption("y", 0, 1, False))
    b(caption("z", 0, 1, False))       # full of partials: the oldest (x) goes
    b(caption("w", 0, 1, True))        # a final pushes out the oldest partial (y)
    st = b.stats()
    assert (st.queued, st.superseded, st.dropped_partials, st.dropped_finals) == (2, 0, 2, 0)

    async with subscriber(mosquitto.port, "qa/+/+", "qb/+/+") as sub, a, b:
        got = await sub.until(lambda got: len(got) >= 6, "the six survivors")
        await sub.settle()
    assert [(topic(m), body(m).get("seq")) for m in got if topic(m).startswith("qa/")] == [
        ("qa/s/status", None), ("qa/s/final", 5), ("qa/t/final", 2), ("qa/s/final", 7)]
    assert [topic(m) for m in got if topic(m).startswith("qb/")] == [
        "qb/z/partial", "qb/w/final"]
    assert a.stats().published == 4
    assert b.stats().published == 2


# --- protocol version --------------------------------------------------------------------


async def read_packet(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One whole MQTT control packet from ``r``: its fixed header (type,
    flags and remaining length) and the rest."""
    fixed = await r.readexactly(1)
    length, mult = 0, 1
    while True:
        byte = await r.readexactly(1)
        fixed += byte
        length += (byte[0] & 0x7F) * mult
        mult *= 128
        if not byte[0] & 0x80:
            return fixed, await r.readexactly(length)


class Mqtt311Proxy:
    """A broker front that refuses MQTT 5 as a 3.1.1-only broker does, else relays.

    ``levels`` records the protocol level of every CONNECT; ``cut`` drops every
    relayed connection without a DISCONNECT, as a network failure would.
    """

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.levels: list[int] = []
        self.port = 0
        self._pipes: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Mqtt311Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self.cut()

    async def cut(self) -> None:
        pipes, self._pipes = self._pipes, set()
        for t in pipes:
            t.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        try:
            fixed, packet = await read_packet(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        level = packet[2 + int.from_bytes(packet[:2], "big")]
        self.levels.append(level)
        if level == 5:
            # MQTT 3.1.1, 3.1.2.2: CONNACK "unacceptable protocol version", then close.
            writer.write(b"\x20\x02\x00\x01")
            await writer.drain()
            writer.close()
            return
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        up_w.write(fixed + packet)
        self._pipes.update({asyncio.create_task(pipe(reader, up_w)),
                            asyncio.create_task(pipe(up_r, writer))})


async def test_auto_falls_back_to_311_and_the_will_says_offline(
    mosquitto: MosquittoBroker,
) -> None:
    async with Mqtt311Proxy(mosquitto.port) as proxy, \
            subscriber(mosquitto.port, "f/#") as sub:
        async with MqttPublisher(mqtt_config(proxy.port, "f")) as pub:
            await connected(pub)
            st = pub.stats()
            assert (st.protocol, st.connects, st.connect_failures) == ("3.1.1", 1, 0)
            assert proxy.levels == [5, 4]
            published = pub.stats().published
            pub(caption("s", 0, 1, True, "via 3.1.1"))
            await sub.until(lambda got: any(topic(m) == "f/s/final" for m in got),
                            "a final through the 3.1.1 connection")
            # Its PUBACK in too: one still on its way at the cut would have
            # the final sent again after the reconnect (QoS 1 allows that),
            # and the subscriber would get it twice.
            await eventually(lambda: pub.stats().published == published + 1,
                             "the final's acknowledgement")

            # The connection breaks without a DISCONNECT: the broker sends the will.
            await proxy.cut()
            await sub.until(lambda got: [payload(m) for m in got if topic(m) == "f/status"]
                            == [ENGINE_ONLINE, ENGINE_OFFLINE], "the last will")
            # The reconnect remembers that this broker speaks 3.1.1 only.
            await sub.until(lambda got: [payload(m) for m in got if topic(m) == "f/status"]
                            == [ENGINE_ONLINE, ENGINE_OFFLINE, ENGINE_ONLINE], "back online")
            assert proxy.levels == [5, 4, 4]
            assert pub.stats().reconnects == 1
            pub(caption("s", 1, 2, True, "after the cut"))
            got = await sub.until(lambda got: len([m for m in got if topic(m) == "f/s/final"])
                                  == 2, "a final after the reconnect")
        assert [body(m)["text"] for m in got if topic(m) == "f/s/final"] == [
            "via 3.1.1", "after the cut"]

        # Forcing MQTT 5 against the same broker never falls back.
        del proxy.levels[:]
        forced = MqttPublisher(mqtt_config(proxy.port, "g", protocol="5"))
        async with forced:
            await eventually(lambda: forced.stats().connect_failures >= 2, "refusals")
            assert not forced.connected
            assert forced.stats().protocol is None
        assert set(proxy.levels) == {5}


# --- small pieces ------------------------------------------------------------------------


def test_stream_ids_become_single_topic_levels() -> None:
    assert topic_level("talk") == "talk"
    assert topic_level("a/b+c#d\0") == "a_b_c_d_"
    assert topic_level("") == "_"


@pytest.mark.parametrize("code", [
    0x01, 0x1F, 0x7F, 0x85, 0x9F,        # control characters
    0xD800, 0xDFFF,                      # lone surrogates (not UTF-8 at all)
    0xFDD0, 0xFDEF, 0xFFFE, 0xFFFF,      # noncharacters...
    0x1FFFE, 0x10FFFF,                   # ...in every plane
], ids=hex)
def test_topic_levels_hold_no_character_a_broker_rejects(code: int) -> None:
    # mosquitto drops the connection for a topic holding one (MQTT 5, 1.5.4).
    assert topic_level(f"a{chr(code)}b") == "a_b"


def test_topic_levels_keep_other_unicode() -> None:
    for ok in ("caf\u00e9", "\u00a0", "\ufdcf\ufdf0\ufffd", "\U0001f600", "\U0010fffd"):
        assert topic_level(ok) == ok


def test_unknown_events_are_ignored_not_raised() -> None:
    pub = MqttPublisher(mqtt_config(1883, "u"))
    pub(StreamEnded("s", 1.0, 1, 1))
    pub(object())  # type: ignore[arg-type]
    assert pub.stats().queued == 1


@pytest.mark.parametrize(("override", "message"), [
    ({"mqtt.protocol": "4"}, "mqtt.protocol must be one of 'auto', '5', '3.1.1', got '4'"),
    ({"mqtt.protocol": 4}, "mqtt.protocol must be one of 'auto', '5', '3.1.1', got '4'"),
    ({"mqtt.port": 0}, "mqtt.port must be 1..65535, got 0"),
    ({"mqtt.queue_size": 0}, "mqtt.queue_size must be 1..1000000, got 0"),
    ({"mqtt.prefix": "a/#"}, "mqtt.prefix must be a non-empty topic"),
    ({"mqtt.prefix": ""}, "got ''"),
    ({"mqtt.prefix": "a/"}, "got 'a/'"),
    ({"mqtt.reconnect_min_s": 5.0, "mqtt.reconnect_max_s": 1.0},
     "mqtt.reconnect_min_s must be at most mqtt.reconnect_max_s (1.0), got 5.0"),
    ({"mqtt.password": "pw"}, "mqtt.password needs mqtt.username"),
    # Every key's type is checked before the rules that relate keys.
    ({"mqtt.password": "pw", "mqtt.retain_final": "yes"},
     "mqtt.retain_final must be bool, got 'yes'"),
    ({"mqtt.password": 1.5}, 'mqtt.password must be text: quote it: password = "..."'),
    ({"mqtt.tlsv": True}, "unknown config key 'mqtt.tlsv'"),
])
def test_bad_mqtt_config_names_key_value_and_allowed(override: dict[str, object],
                                                      message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=override)
    assert message in str(err.value)


def test_mqtt_is_off_by_default() -> None:
    cfg = load_config().mqtt
    assert cfg.enabled is False
    assert (cfg.protocol, cfg.prefix, cfg.port) == ("auto", "evoxtral", 1883)
    assert (cfg.tls, cfg.ca_file, cfg.cert_file, cfg.key_file) == (False, "", "", "")
    assert MqttPublisher(cfg)._tls is None
