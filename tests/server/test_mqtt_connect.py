"""MQTT connection attempts against brokers that do not answer: each attempt
(TCP connect, TLS handshake, CONNACK) is bounded by ``mqtt.timeout_s`` as a
whole, and a stop during one leaves nothing running behind it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterator

import pytest

try:
    import aiomqtt  # noqa: F401
except ImportError:  # the mqtt extra is optional
    pytest.skip("aiomqtt not installed", allow_module_level=True)

from evoxtral_stream.server.mqtt import MqttPublisher
from tests.server.test_mqtt import caption, eventually, mqtt_config

pytestmark = pytest.mark.timeout(60)

#: What a fake broker does with a connection: ``syn-dropped``, a host that
#: drops SYNs (a listener whose backlog is full); ``tls-unanswered``, a port
#: that accepts TCP but never answers the TLS handshake; ``connack-unanswered``,
#: one that accepts TCP but never sends the CONNACK.
SILENCES = ["syn-dropped", "tls-unanswered", "connack-unanswered"]


@contextlib.contextmanager
def silent_broker(silence: str) -> Iterator[int]:
    """A local port that behaves as ``silence`` says; yields it."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        if silence == "syn-dropped":
            # Linux queues backlog + 1 connections and drops further SYNs.
            srv.listen(0)
            filler = socket.create_connection(srv.getsockname(), timeout=5)
        else:
            srv.listen(64)  # connections complete in the kernel; nothing reads them
            filler = None
        try:
            yield srv.getsockname()[1]
        finally:
            if filler is not None:
                filler.close()


def tls_for(silence: str) -> dict[str, object]:
    # The system CA store: nothing here gets as far as a certificate.
    return {"tls": True} if silence == "tls-unanswered" else {}


def mqtt_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "evoxtral_stream.server.mqtt" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("silence", SILENCES)
async def test_each_attempt_gives_up_after_timeout_s(
        silence: str, caplog: pytest.LogCaptureFixture) -> None:
    """docs/config.md: timeout_s bounds the attempt. paho capped the TCP
    connect and the TLS handshake at its own fixed 5 s instead, so a host
    dropping SYNs or a port that never answers TLS took 5 s an attempt
    whatever timeout_s said, and a handshake that timed out was logged as
    an unreachable broker."""
    with silent_broker(silence) as port:
        cfg = mqtt_config(port, "cb", timeout_s=0.5, reconnect_min_s=0.05,
                          reconnect_max_s=0.1, drain_s=0.2, **tls_for(silence))
        pub = MqttPublisher(cfg)
        await pub.start()
        try:
            t0 = time.monotonic()
            # Three attempts of 0.5 s and their backoff take about 1.7 s.
            await eventually(lambda: pub.stats().connect_failures >= 3, "three attempts",
                             within=4.0)
            took = time.monotonic() - t0
        finally:
            await pub.aclose()
    assert took < 4.0
    said = mqtt_messages(caplog)
    assert len(said) == 1, said  # one line per outage
    if silence == "tls-unanswered":
        assert f"TLS handshake with 127.0.0.1:{port} timed out" in said[0], said
        assert "unreachable" not in said[0]
    else:
        assert f"MQTT broker 127.0.0.1:{port} unreachable" in said[0], said
        assert "timed out" in said[0]


@pytest.mark.parametrize("silence", SILENCES)
async def test_a_stop_during_an_attempt_leaves_no_thread_behind(silence: str) -> None:
    """aclose gives up an attempt at drain_s. When paho made the connection
    in a worker thread, the thread went on with its TCP connect or TLS
    handshake for up to 5 s after aclose returned, and the process could
    not exit until it ended (asyncio.run waits for the default executor):
    a stop past what docs/systemd.md's formula allows."""
    loop = asyncio.get_running_loop()
    with silent_broker(silence) as port:
        cfg = mqtt_config(port, "cs", timeout_s=30.0, drain_s=0.3, **tls_for(silence))
        pub = MqttPublisher(cfg)
        await pub.start()
        pub(caption("s", 0, 1, True, "never sent"))
        await asyncio.sleep(0.5)  # the attempt is under way
        t0 = loop.time()
        await pub.aclose()
        assert loop.time() - t0 < 0.3 + 1.0
        t0 = loop.time()
        await asyncio.wait_for(loop.shutdown_default_executor(), 2.0)
        assert loop.time() - t0 < 1.0, "a worker thread outlived aclose"
    st = pub.stats()
    assert (st.connects, st.failed, st.queued) == (0, 1, 0), st
