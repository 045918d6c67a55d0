"""The MQTT publisher against a broker that misbehaves in part: publishes refused
by its ACL, finals never acknowledged, topics it rejects as malformed, away
long enough for the queue to overflow."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import pwd
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

try:
    import aiomqtt  # noqa: F401
except ImportError:  # the mqtt extra is optional
    pytest.skip("aiomqtt not installed (pip install -e '.[mqtt]')",
                allow_module_level=True)

from evoxtral_stream.events import StreamEnded, StreamStarted, stream_id_problem
from evoxtral_stream.server.mqtt import ENGINE_OFFLINE, ENGINE_ONLINE, MqttPublisher
from tests.helpers.http import Relay, pipe
from tests.server.conftest import MosquittoBroker, mosquitto_binary
from tests.server.test_mqtt import (
    Subscriber,
    body,
    caption,
    connected,
    eventually,
    mqtt_config,
    payload,
    read_packet,
    subscriber,
    topic,
)

pytestmark = pytest.mark.timeout(60)


# --- publishes the broker refuses ---------------------------------------------------------


@contextlib.contextmanager
def acl_broker(tmp_path: Path, *rules: str) -> Iterator[MosquittoBroker]:
    """A mosquitto that lets anonymous clients read ``acl/#`` and write only ``rules``."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    broker = MosquittoBroker(binary, tmp_path)
    acl = tmp_path / "acl"
    acl.write_text("topic read acl/#\n" + "".join(f"topic write {r}\n" for r in rules))
    # As root, mosquitto would switch to its own user, who cannot read tmp_path.
    user = pwd.getpwuid(os.getuid()).pw_name
    broker.conf.write_text(broker.conf.read_text() + f"user {user}\nacl_file {acl}\n")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def warnings_about(caplog: pytest.LogCaptureFixture, *words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and all(w in r.getMessage() for w in words)]


async def test_a_final_the_broker_refuses_is_counted_failed_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="evoxtral_stream")
    # A common least-privilege slip: the ACL forgets the finals.
    with acl_broker(tmp_path, "acl/status", "acl/+/partial") as broker:
        cfg = mqtt_config(broker.port, "acl", protocol="5")
        async with subscriber(broker.port, "acl/#") as sub:
            async with MqttPublisher(cfg) as pub:
                await connected(pub)
                pub(caption("s", 0, 1, True, "refused"))
                pub(caption("s", 1, 2, False, "allowed"))
                # The PUBACK (reason 0x87, not authorized) ends the final's
                # exchange; the partial after it shows the connection stayed.
                await eventually(lambda: pub.stats().published + pub.stats().failed >= 2,
                                 "both handled")
                st = pub.stats()
            got = await sub.settle()
    assert not [m for m in got if topic(m) == "acl/s/final"], "the broker dropped it"
    assert [body(m)["text"] for m in got if topic(m) == "acl/s/partial"] == ["allowed"]
    assert (st.published, st.failed, st.unpublished) == (1, 1, 1), st
    # Not a connection problem: no retry, no reconnect.
    assert (st.connects, st.connect_failures) == (1, 0), st
    assert warnings_about(caplog, "acl/s/final", "Not authorized"), caplog.text


async def test_a_refused_online_is_logged_and_publishing_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="evoxtral_stream")
    with acl_broker(tmp_path, "acl/+/final") as broker:
        cfg = mqtt_config(broker.port, "acl", protocol="5")
        async with subscriber(broker.port, "acl/#") as sub, MqttPublisher(cfg) as pub:
            await connected(pub)
            pub(caption("s", 0, 1, True, "allowed"))
            await sub.until(lambda got: any(topic(m) == "acl/s/final" for m in got),
                            "the final after the refused presence")
            # Counted published at its PUBACK, which the broker may send after
            # the subscriber's copy. The presence was refused, and logged,
            # before the final was sent.
            await eventually(lambda: pub.stats().published + pub.stats().failed >= 1,
                             "the final handled")
            st = pub.stats()
    # A refused presence must not send the publisher round the reconnect loop.
    assert (st.connects, st.connect_failures, st.published) == (1, 0, 1), st
    assert warnings_about(caplog, "acl/status", "Not authorized"), caplog.text


# --- publishes never acknowledged -----------------------------------------------------------


class SwallowingProxy(Relay):
    """A TCP front for the broker that forwards every MQTT packet except a
    client's PUBLISH whose topic ``swallow`` picks: a broker that never
    acknowledges those (stalled, overloaded, over its inflight quota), while
    the connection and everything else on it stay healthy. ``swallow`` may be
    changed at any time; ``swallowed`` counts the packets it dropped."""

    def __init__(self, upstream: int, swallow: Callable[[str], bool]) -> None:
        super().__init__(upstream)
        self.swallow = swallow
        self.swallowed = 0

    async def forward(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # Whole packets, so that one PUBLISH can be left out. Closing the
        # upstream side when the client's side ends passes an abrupt close on
        # as one: the broker then publishes the will.
        try:
            while True:
                fixed, body = await read_packet(r)
                if fixed[0] >> 4 == 3:  # PUBLISH
                    n = int.from_bytes(body[:2], "big")
                    if self.swallow(body[2:2 + n].decode()):
                        self.swallowed += 1
                        continue
                w.write(fixed + body)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()


async def retained_status(port: int, prefix: str) -> bytes:
    """The engine presence a subscriber arriving now is told first: the
    retained one, or where none is retained yet (the publisher counts as
    connected before its "online" is acknowledged), the next one published.
    Waited for, not read after a quiet spell, which a loaded machine can
    stretch past the message."""
    async with subscriber(port, f"{prefix}/status") as late:
        got = await late.until(bool, "the engine presence")
    return payload(got[0])


async def until_offline(watch: Subscriber, pub: MqttPublisher) -> None:
    """Wait until ``watch``, subscribed to the presence while ``pub`` (now
    closed) was connected, has been told "offline" once for each of its
    connections. Each says "online" once and ends with one "offline" (its
    goodbye, or the will the broker publishes when it sees the connection
    gone, which can be a while after the publisher closed it), so the
    presence the broker retains last is then "offline". One "offline" is
    not enough: a connection's will can reach the broker after the next
    connection's "online"."""
    connections = pub.stats().connects
    await watch.until(
        lambda got: sum(payload(m) == ENGINE_OFFLINE for m in got) >= connections,
        f"the engine presence to say offline for each of {connections} connection(s)")


async def test_presence_says_offline_after_a_publish_timeout_and_close(
    mosquitto: MosquittoBroker,
) -> None:
    async with SwallowingProxy(mosquitto.port, lambda t: t.endswith("/final")) as proxy:
        cfg = mqtt_config(proxy.port, "pz", protocol="5", timeout_s=0.5, drain_s=1.0,
                          reconnect_min_s=5.0, reconnect_max_s=5.0)
        pub = MqttPublisher(cfg)
        await pub.start()
        await connected(pub)
        assert await retained_status(mosquitto.port, "pz") == ENGINE_ONLINE
        async with subscriber(mosquitto.port, "pz/status") as watch:
            pub(caption("s", 0, 1, True, "never acknowledged"))
            # No PUBACK within timeout_s: the connection is reopened
            # (docs/config.md), after a backoff that outlasts the close below
            # (which connects again at once to drain the queue: two
            # connections in all).
            await eventually(lambda: proxy.swallowed >= 1 and not pub.connected,
                             "the publish timed out and the connection was dropped")
            await pub.aclose()
            # The engine is gone: its presence must not say online. A clean
            # DISCONNECT after the timeout would have discarded the will.
            await until_offline(watch, pub)
        assert await retained_status(mosquitto.port, "pz") == ENGINE_OFFLINE


async def test_presence_says_offline_when_the_goodbye_is_not_acknowledged(
    mosquitto: MosquittoBroker,
) -> None:
    async with SwallowingProxy(mosquitto.port, lambda t: False) as proxy:
        cfg = mqtt_config(proxy.port, "pg", protocol="5", timeout_s=0.5, drain_s=1.0)
        pub = MqttPublisher(cfg)
        await pub.start()
        await connected(pub)
        assert await retained_status(mosquitto.port, "pg") == ENGINE_ONLINE
        async with subscriber(mosquitto.port, "pg/status") as watch:
            # The broker stalls just as the engine says goodbye.
            proxy.swallow = lambda t: t == "pg/status"
            await pub.aclose()
            assert proxy.swallowed == 1, "offline was sent and never acknowledged"
            # Only the will can say so: the goodbye never reached the broker.
            await until_offline(watch, pub)
        assert await retained_status(mosquitto.port, "pg") == ENGINE_OFFLINE


# --- a queue that overflowed while the broker was away ----------------------------------


async def test_after_an_overflow_each_stream_s_retained_status_is_its_last_state(
    mosquitto: MosquittoBroker,
) -> None:
    # Streams x, y, z and w are live, and the broker says so (retained).
    async with MqttPublisher(mqtt_config(mosquitto.port, "ov")) as before:
        await connected(before)
        for s in "xyzw":
            before(StreamStarted(s, "test"))
        await eventually(lambda: before.stats().published >= 4, "the four starts")
    # The engine restarts while the broker is unreachable: the queue fills
    # with the ends of x, y, z, their last finals, and a stream v that
    # starts and ends; w is still live. (A publisher not yet started stands
    # for the unreachable broker: nothing leaves its queue.)
    pub = MqttPublisher(mqtt_config(mosquitto.port, "ov", queue_size=4))
    for seq, s in enumerate("xyz"):
        pub(caption(s, 0, seq, True, "one"))
        pub(caption(s, 1, seq, True, "two"))
        pub(StreamEnded(s, 2.0, 2, 2))
    pub(StreamStarted("v", "test"))
    pub(caption("v", 0, 0, True, "brief"))
    pub(StreamEnded("v", 1.0, 1, 1))
    st = pub.stats()
    assert (st.queued, st.dropped_finals) == (4, 8), st
    async with pub:
        await eventually(lambda: pub.stats().published >= 4, "the queue")
    async with subscriber(mosquitto.port, "ov/+/status") as late:
        got = await late.settle(0.5)
    # Dropping the oldest of the queue would have dropped x's end: the
    # broker would say x is live for good.
    status = {topic(m): body(m)["type"] for m in got if m.retain}
    assert status == {"ov/x/status": "stream.ended", "ov/y/status": "stream.ended",
                      "ov/z/status": "stream.ended", "ov/v/status": "stream.ended",
                      "ov/w/status": "stream.started"}, status


# --- topics the broker rejects ------------------------------------------------------------


async def test_a_stream_id_with_a_unicode_noncharacter_does_not_break_the_connection(
    mosquitto: MosquittoBroker,
) -> None:
    odd = "talk\ufdd0"  # a Unicode noncharacter: a valid stream id...
    assert stream_id_problem(odd) is None
    cfg = mqtt_config(mosquitto.port, "nc", protocol="5")
    async with subscriber(mosquitto.port, "nc/#") as sub:
        async with MqttPublisher(cfg) as pub:
            await connected(pub)
            pub(StreamStarted(odd, "test"))
            pub(caption(odd, 0, 1, False, "part"))
            pub(caption("other", 0, 1, True, "an innocent stream's final"))
            pub(caption(odd, 1, 2, True, "final"))
            await eventually(lambda: pub.stats().queued == 0
                             and pub.stats().published + pub.stats().failed >= 4,
                             "all four handled", within=20)
            st = pub.stats()
        got = await sub.settle()
    # ...but mosquitto drops the connection (malformed packet) for a topic
    # holding one: every event of that stream would break the connection
    # (the will fires, every stream's queue stalls) and be lost.
    assert (st.connects, st.failed, st.published) == (1, 0, 4), st
    assert [body(m)["text"] for m in got if topic(m) == "nc/other/final"] == [
        "an innocent stream's final"]
    assert [body(m)["stream"] for m in got if topic(m) == "nc/talk_/final"] == [odd]
    # One connection: online once, offline at close (no will, no flapping).
    assert [payload(m) for m in got if topic(m) == "nc/status"] == [ENGINE_ONLINE,
                                                                     ENGINE_OFFLINE]


# --- connections the broker closes at once ------------------------------------------------


async def test_two_engines_with_one_client_id_back_off_and_say_why(
    mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture,
) -> None:
    """Each connection takes the other's session over. Were a connection that
    was accepted a success, both would reconnect every ``reconnect_min_s``
    forever (a warning and a reconnect per cycle per engine)."""
    caplog.set_level(logging.WARNING, logger="evoxtral_stream")
    cfg = mqtt_config(mosquitto.port, "twin", client_id="studio-engine",
                      reconnect_min_s=0.05, reconnect_max_s=0.4)
    async with MqttPublisher(cfg) as one, MqttPublisher(cfg) as two:
        await asyncio.sleep(3.0)
        connects = one.stats().connects + two.stats().connects
    # At the minimum delay that is about 60 connections; backing off to
    # 0.3-0.4 s, about 15.
    assert connects < 30, connects
    hints = warnings_about(caplog, "after accepting it", "client_id 'studio-engine'")
    assert hints, [r.getMessage() for r in caplog.records]


# --- credentials the broker refuses ------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_refused_credentials_are_logged_as_such_not_as_unreachable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, protocol: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="evoxtral_stream")
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    broker = MosquittoBroker(binary, tmp_path)
    # No user is known: every connection is refused (CONNACK 0x05 / 0x87).
    broker.conf.write_text(broker.conf.read_text().replace(
        "allow_anonymous true", "allow_anonymous false"))
    assert "allow_anonymous false" in broker.conf.read_text()
    broker.start()
    try:
        cfg = mqtt_config(broker.port, "auth", protocol=protocol, username="u",
                          password="wrong")
        async with MqttPublisher(cfg) as pub:
            await eventually(lambda: pub.stats().connect_failures >= 1, "a refused connect")
    finally:
        broker.stop()
    refused = warnings_about(caplog, "refused the connection", "mqtt.username")
    assert refused, caplog.text
    assert not warnings_about(caplog, "unreachable"), caplog.text


# --- a connection that ends right after the broker answered --------------------------------


class ClosingRelay(Relay):
    """A TCP front for the broker that passes the first CONNACK on to the
    client and closes the connection right behind it, as a broker that
    restarts or kicks the client just then does."""

    def __init__(self, upstream: int) -> None:
        super().__init__(upstream)
        self.closed = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += [writer, up_w]

        async def down() -> None:
            try:
                while True:
                    fixed, body = await read_packet(up_r)
                    writer.write(fixed + body)
                    if fixed[0] >> 4 == 2 and not self.closed:
                        self.closed += 1
                        writer.close()
                        up_w.close()
                        return
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        for coro in (pipe(reader, up_w), down()):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_connection_closed_right_after_its_connack_logs_no_error(
    mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture, protocol: str,
) -> None:
    """Found by tests/server/test_mqtt_chaos.py. When the connection ended
    right after its CONNACK, the publisher reconnected and published
    everything, as it should; but aiomqtt puts the loss, an exception, in a
    future it then replaces unseen, and asyncio logged it at garbage
    collection as an ERROR ("Future exception was never retrieved ...
    MqttCodeError('Unexpected disconnection')"), in the service's log."""
    caplog.set_level(logging.WARNING)
    async with ClosingRelay(mosquitto.port) as relay, \
            subscriber(mosquitto.port, "ca/#") as sub:
        pub = MqttPublisher(mqtt_config(relay.port, "ca", protocol=protocol))
        # Queued before the connection: online, then these back to back.
        for seq in range(1, 4):
            pub(caption("s", seq, seq, True, f"final {seq}"))
        async with pub:
            await sub.until(lambda got: {body(m)["seq"] for m in got
                                         if topic(m) == "ca/s/final"} == {1, 2, 3},
                            "the three finals")
            st = pub.stats()
    assert relay.closed == 1
    assert st.connects == 2, st
    del pub
    gc.collect()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


async def test_a_connection_reset_is_a_warning_not_an_error(
    mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture,
) -> None:
    """A reset connection (a NAT or load balancer forgetting it, a relay
    cut) is a blip the publisher mends by reconnecting: paho logged it as an
    ERROR ("failed to receive on socket: [Errno 104] Connection reset by
    peer") beside the publisher's own warning, paging whoever alerts on
    errors. It is a warning now, still naming the reset."""
    caplog.set_level(logging.INFO)
    async with Relay(mosquitto.port) as relay, \
            subscriber(mosquitto.port, "rs/#") as sub, \
            MqttPublisher(mqtt_config(relay.port, "rs")) as pub:
        await connected(pub)
        relay.reset()
        for seq in range(1, 3):
            pub(caption("s", seq, seq, True, f"final {seq}"))
        await sub.until(lambda got: {body(m)["seq"] for m in got
                                     if topic(m) == "rs/s/final"} == {1, 2},
                        "the finals after the reset")
        st = pub.stats()
    assert st.reconnects >= 1, st
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    assert any("Connection reset" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records), [r.getMessage() for r in caplog.records]


# --- a message larger than the broker takes -------------------------------------------------


async def test_a_final_over_the_brokers_maximum_packet_size_is_failed_not_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """An MQTT 5 broker says in its CONNACK how large a packet it takes
    (mosquitto: max_packet_size) and drops the connection of a client that
    sends a larger one. Such a final used to be sent anyway: three dropped
    connections (each publishing the will, "offline"), the finals behind it
    held up by the reconnects, then counted failed. Now it is not sent: it
    counts as failed and is logged, and the connection stays up."""
    caplog.set_level(logging.WARNING, logger="evoxtral_stream")
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    broker = MosquittoBroker(binary, tmp_path)
    broker.conf.write_text(broker.conf.read_text() + "max_packet_size 2000\n")
    broker.start()
    try:
        cfg = mqtt_config(broker.port, "big", protocol="5")
        async with subscriber(broker.port, "big/#") as sub:
            async with MqttPublisher(cfg) as pub:
                await connected(pub)
                pub(caption("s", 0, 1, True, "before"))
                pub(caption("s", 1, 2, True, "x" * 3000))
                pub(caption("s", 2, 3, True, "after"))
                await sub.until(lambda got: any(b"after" in payload(m) for m in got),
                                "the final after the oversized one")
                # Counted published at its PUBACK, which the broker may send
                # after the subscriber's copy.
                await eventually(lambda: pub.stats().published + pub.stats().failed >= 3,
                                 "all three handled")
                st = pub.stats()
            got = await sub.settle()
    finally:
        broker.stop()
    assert [body(m)["text"] for m in got if topic(m) == "big/s/final"] == ["before", "after"]
    assert ENGINE_OFFLINE not in [payload(m) for m in got if topic(m) == "big/status"][:-1]
    assert (st.connects, st.published, st.failed) == (1, 2, 1), st
    assert warnings_about(caplog, "big/s/final", "maximum packet size 2000"), caplog.text
