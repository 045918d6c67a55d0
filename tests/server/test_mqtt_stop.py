"""What a stopping engine leaves retained on the broker, and configured text a broker refuses."""

from __future__ import annotations

import asyncio
import logging

import pytest

try:
    import aiomqtt  # noqa: F401
except ImportError:  # the mqtt extra is optional
    pytest.skip("aiomqtt not installed", allow_module_level=True)

from evoxtral_stream.events import StreamEnded, StreamStarted
from evoxtral_stream.server.mqtt import ENGINE_OFFLINE, MqttPublisher
from tests.server.conftest import MosquittoBroker
from tests.server.test_mqtt import (
    caption,
    connected,
    eventually,
    mqtt_config,
    payload,
    subscriber,
    topic,
)

pytestmark = pytest.mark.timeout(60)


async def test_v5_clean_stop_leaves_no_retained_final_past_forget_ended_s(
        mosquitto: MosquittoBroker) -> None:
    """docs/config.md: forget_ended_s "is how long a stream's retained status
    and last final stay on the broker after it ends". With MQTT 5 the
    stream.ended status expires by itself, but the last final carries no
    expiry and a cleanly stopping MQTT 5 engine does not remove it: it stays
    retained for good."""
    cfg = mqtt_config(mosquitto.port, "v5f", protocol="5", forget_ended_s=1.0)
    async with MqttPublisher(cfg) as pub:
        await connected(pub)
        pub(StreamStarted("gone", "test"))
        pub(caption("gone", 0, 1, True, "gone said"))
        pub(StreamEnded("gone", 3.0, 1, 1))
        await eventually(lambda: pub.stats().queued == 0, "queue drained")
    await asyncio.sleep(2.5)  # well past forget_ended_s after the end
    async with subscriber(mosquitto.port, "v5f/gone/#") as late:
        got = await late.settle(1.0)
    left = [(topic(m), payload(m)[:60]) for m in got if payload(m)]
    assert left == [], f"still retained well past forget_ended_s: {left}"


@pytest.mark.parametrize(("key", "value"), [
    ("prefix", "cap\ufdd0"), ("prefix", "cap\x01"), ("client_id", "engine\x01"),
], ids=["prefix-nonchar", "prefix-control", "client_id-control"])
async def test_a_prefix_or_client_id_the_broker_rejects_is_a_config_error(
        mosquitto: MosquittoBroker, key: str, value: str) -> None:
    """topic_level() knows mosquitto drops the connection for a topic holding
    a control character or a Unicode noncharacter, and replaces them in
    stream ids. mqtt.prefix is checked only for wildcards, NUL, empty levels
    and a leading $ or /, so such a prefix is accepted: the engine then never
    connects at all (the prefix is in the will topic of the CONNECT, which
    mosquitto rejects as malformed UTF-8; the engine logs "broker unreachable
    (Operation timed out)" round and round and every final is lost), instead
    of the promised one-line config error and exit status 2."""
    from evoxtral_stream.config import ConfigError

    try:
        over: dict[str, object] = {"prefix": "cfgp", "timeout_s": 1.0, key: value}
        prefix = over.pop("prefix")
        assert isinstance(prefix, str)
        cfg = mqtt_config(mosquitto.port, prefix, **over)
    except ConfigError:
        return  # what the docs promise
    async with subscriber(mosquitto.port, "#") as sub:
        async with MqttPublisher(cfg) as pub:
            pub(StreamStarted("s", "test"))
            pub(caption("s", 0, 1, True, "never arrives"))
            await eventually(lambda: pub.stats().connect_failures >= 2, "attempts",
                             within=10.0)
            st = pub.stats()
        got = await sub.settle(0.5)
    pytest.fail(f"mqtt.{key} {value!r} accepted; broker got {[topic(m) for m in got]}, "
                f"connects={st.connects}, published={st.published}, failed={st.failed}, "
                f"last_error={st.last_error!r}")


async def test_311_stop_while_reconnecting_still_removes_ended_streams_retained(
        mosquitto: MosquittoBroker) -> None:
    """docs/config.md: with MQTT 3.1.1 "an engine that stops within that time
    removes them as it stops (within drain_s, after the last stream.ended)".
    The drain only looks at the queue: when the connection dropped a moment
    before the stop (the queue empty, the broker reachable again at once),
    the publisher leaves without reconnecting, and the ended stream's status
    and last final stay retained on the broker for good."""
    from tests.helpers.http import Relay

    async with Relay(mosquitto.port) as relay:
        cfg = mqtt_config(relay.port, "c3", protocol="3.1.1", forget_ended_s=3600.0,
                          reconnect_min_s=3.0, reconnect_max_s=3.0, drain_s=2.0)
        pub = MqttPublisher(cfg)
        await pub.start()
        await connected(pub)
        pub(StreamStarted("gone", "test"))
        pub(caption("gone", 0, 1, True, "gone said"))
        pub(StreamEnded("gone", 3.0, 1, 1))
        await eventually(lambda: pub.stats().published == 3, "published")
        relay.drop()  # a network blip; the broker itself stays up
        await eventually(lambda: not pub.connected, "the loss noticed")
        await pub.aclose()
    async with subscriber(mosquitto.port, "c3/gone/#") as late:
        got = await late.settle(1.0)
    left = [(topic(m), payload(m)[:40]) for m in got if payload(m)]
    assert left == [], f"left retained for good after a clean stop: {left}"


# --- a broker that does not answer at shutdown --------------------------------------------


@pytest.mark.parametrize("when", ["connecting", "publishing"])
async def test_a_broker_that_does_not_answer_holds_the_stop_up_no_longer_than_drain_s(
        mosquitto: MosquittoBroker, when: str, caplog: pytest.LogCaptureFixture) -> None:
    """docs/config.md: at shutdown the publisher publishes what is queued
    "for up to drain_s seconds". A frozen broker (its port accepts TCP, but
    nothing answers) must not stretch that to timeout_s: not while the
    publisher waits for its CONNACK, nor for a final's acknowledgement."""
    cfg = mqtt_config(mosquitto.port, "hang", timeout_s=8.0, drain_s=0.5)
    pub = MqttPublisher(cfg)
    try:
        if when == "connecting":
            mosquitto.freeze()
            await pub.start()
        else:
            await pub.start()
            await connected(pub)
            mosquitto.freeze()
        pub(caption("s", 0, 1, True, "never acknowledged"))
        await asyncio.sleep(0.5)  # the CONNACK or PUBACK is being waited for
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await pub.aclose()
        took = loop.time() - t0
    finally:
        mosquitto.thaw()
    assert took < 0.5 + 1.0, f"aclose took {took:.2f} s with drain_s 0.5"
    st = pub.stats()
    assert (st.published, st.failed, st.queued) == (0, 1, 0), st
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    if when == "publishing":
        # Left without a DISCONNECT: once the broker runs again it sends the will.
        async with subscriber(mosquitto.port, "hang/status") as sub:
            got = await sub.until(lambda got: any(payload(m) == ENGINE_OFFLINE for m in got),
                                  "the will")
            assert payload(got[-1]) == ENGINE_OFFLINE
