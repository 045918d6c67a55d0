"""The MQTT publisher against a broker that misbehaves in part: publishes refused
by its ACL, finals never acknowledged, topics it rejects as malformed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import aiomqtt  # noqa: F401
except ImportError:  # the mqtt extra is optional
    pytest.skip("aiomqtt not installed (pip install 'evoxtral-stream[mqtt]')",
                allow_module_level=True)

from evoxtral_stream.server.mqtt import MqttPublisher
from tests.server.conftest import MosquittoBroker, mosquitto_binary
from tests.server.test_mqtt import (
    body,
    caption,
    connected,
    eventually,
    mqtt_config,
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
            await asyncio.sleep(0.3)
            st = pub.stats()
    # A refused presence must not send the publisher round the reconnect loop.
    assert (st.connects, st.connect_failures, st.published) == (1, 0, 1), st
    assert warnings_about(caplog, "acl/status", "Not authorized"), caplog.text
