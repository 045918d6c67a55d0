"""MQTT connection attempts against brokers that do not answer: each attempt
(TCP connect, TLS handshake, CONNACK) is bounded by ``mqtt.timeout_s`` as a
whole, and a stop during one leaves nothing running behind it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import socket
import time
import warnings
from collections.abc import Iterator

import pytest

try:
    import aiomqtt  # noqa: F401
except ImportError:  # the mqtt extra is optional
    pytest.skip("aiomqtt not installed", allow_module_level=True)

from evoxtral_stream.server.mqtt import MqttPublisher
from tests.helpers.threads import threads_refused
from tests.server.conftest import MosquittoBroker
from tests.server.test_mqtt import caption, connected, eventually, mqtt_config

pytestmark = pytest.mark.timeout(60)

#: What a fake broker does with a connection: ``syn-dropped``, a host that
#: drops SYNs (a listener whose backlog is full); ``tls-unanswered``, a port
#: that accepts TCP but never answers the TLS handshake; ``connack-unanswered``,
#: one that accepts TCP but never sends the CONNACK.
SILENCES = ["syn-dropped", "tls-unanswered", "connack-unanswered"]


class SilentBroker:
    """A local port that behaves as ``silence`` says (see :data:`SILENCES`)."""

    def __init__(self, silence: str) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.port: int = self.srv.getsockname()[1]
        self.filler: socket.socket | None = None
        self.taken: list[socket.socket] = []
        if silence == "syn-dropped":
            # Linux queues backlog + 1 connections and drops further SYNs.
            self.srv.listen(0)
            self.filler = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        else:
            self.srv.listen(64)  # connections complete in the kernel; nothing reads them

    def make_room(self) -> None:
        """Accept the queued connection: the next SYN (a retransmitted one) gets through."""
        self.taken.append(self.srv.accept()[0])

    def close(self) -> None:
        for s in [self.srv, *self.taken, *([self.filler] if self.filler else [])]:
            s.close()


@contextlib.contextmanager
def silent_broker(silence: str) -> Iterator[int]:
    """A local port that behaves as ``silence`` says; yields it."""
    broker = SilentBroker(silence)
    try:
        yield broker.port
    finally:
        broker.close()


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


# --- no socket left open ------------------------------------------------------------------


def sockets_to(port: int, besides: socket.socket | None = None) -> int:
    """How many of this process's open sockets, ``besides`` that one, are TCP
    connections to 127.0.0.1:``port`` (connected or connecting), read from
    /proc."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # an fd closed meanwhile
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                mine.add(link[len("socket:["):-1])
    if besides is not None:
        mine.discard(str(os.fstat(besides.fileno()).st_ino))
    # Inodes, not rows: the table is read a page at a time while every
    # process of the machine changes it, so a row can come twice.
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for row in f.read().splitlines()[1:]:
                cols = row.split()
                # remote address (hex ip:port) and inode
                if int(cols[2].rsplit(":", 1)[1], 16) == port and cols[9] in mine:
                    found.add(cols[9])
    return len(found)


needs_proc = pytest.mark.skipif(not os.path.isfile("/proc/net/tcp"), reason="needs Linux /proc")


@contextlib.contextmanager
def no_cycle_collector() -> Iterator[None]:
    """A socket that only the garbage collector would close stays open."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@needs_proc
@pytest.mark.parametrize("silence", SILENCES)
async def test_attempts_that_time_out_and_the_stop_leave_no_socket_open(silence: str) -> None:
    """Each attempt given up at timeout_s closes its socket then, not at
    some later garbage collection (paho left a TLS socket whose handshake
    timed out to be collected), and a stop leaves none behind."""
    broker = SilentBroker(silence)
    try:
        with no_cycle_collector():
            cfg = mqtt_config(broker.port, "cl", timeout_s=0.3, reconnect_min_s=0.05,
                              reconnect_max_s=0.1, drain_s=0.2, **tls_for(silence))
            pub = MqttPublisher(cfg)
            await pub.start()
            most = 0
            try:
                deadline = time.monotonic() + 5.0
                while pub.stats().connect_failures < 5:
                    assert time.monotonic() < deadline, pub.stats()
                    most = max(most, sockets_to(broker.port, broker.filler))
                    await asyncio.sleep(0.02)
            finally:
                await pub.aclose()
            # Only the attempt under way may hold one.
            assert most <= 1, f"{most} sockets open to the broker at once"
            await eventually(lambda: sockets_to(broker.port, broker.filler) == 0,
                             "the last attempt's socket closed", within=1.0)
    finally:
        broker.close()


@needs_proc
@pytest.mark.parametrize("silence", ["syn-dropped", "tls-unanswered"])
async def test_a_connect_given_up_at_the_stop_is_not_completed_after_it(silence: str) -> None:
    """A stop gives up an attempt at drain_s. When paho made the connection
    in a worker thread, the thread went on: a host that let the connection
    through after the stop got a socket that nobody closed, its reader
    still registered with the event loop."""
    broker = SilentBroker(silence)
    try:
        with no_cycle_collector():
            cfg = mqtt_config(broker.port, "cc", timeout_s=30.0, drain_s=0.2,
                              **tls_for(silence))
            pub = MqttPublisher(cfg)
            await pub.start()
            await asyncio.sleep(0.5)  # the TCP connect (or the handshake) is under way
            await pub.aclose()
            if silence == "syn-dropped":
                # The host answers now: a SYN sent after this would get through
                # (Linux sends the first again 1 s after it).
                broker.make_room()
            await asyncio.sleep(2.0)
            assert sockets_to(broker.port, broker.filler) == 0, \
                "a socket to the broker outlived the stop"
    finally:
        broker.close()


@needs_proc
@pytest.mark.parametrize("when", ["connected", "connecting", "publishing"])
async def test_a_stop_leaves_no_socket_to_a_real_broker(
        mosquitto: MosquittoBroker, when: str) -> None:
    """After aclose no socket to the broker is left open, whether the
    publisher was connected, still waiting for a frozen broker's CONNACK, or
    waiting for its acknowledgement of a final."""
    base = sockets_to(mosquitto.port)
    with no_cycle_collector():
        pub = MqttPublisher(mqtt_config(mosquitto.port, "cr", timeout_s=8.0, drain_s=0.3))
        try:
            if when == "connecting":
                mosquitto.freeze()
            await pub.start()
            if when != "connecting":
                await connected(pub)
            if when == "publishing":
                mosquitto.freeze()
            pub(caption("s", 0, 1, True))
            await asyncio.sleep(0.3)
            await pub.aclose()
            await eventually(lambda: sockets_to(mosquitto.port) == base, "sockets closed",
                             within=1.0)
        finally:
            mosquitto.thaw()


@needs_proc
async def test_a_paho_without_the_socket_hook_still_connects_and_leaks_nothing(
        mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket made on the loop is handed to paho through a private hook
    (``Client._create_socket``). A paho that does not call it (a later
    version renames it) must not cost the connection, nor leave that socket
    open: paho then connects by itself, with its own timeouts."""
    from paho.mqtt import client as paho_client

    own = paho_client.Client._create_socket
    # Setting the hook on the instance changes nothing: paho makes its own.
    monkeypatch.setattr(paho_client.Client, "_create_socket", property(
        lambda self: functools.partial(own, self), lambda self, value: None))
    base = sockets_to(mosquitto.port)
    with no_cycle_collector(), warnings.catch_warnings(record=True) as caught:
        # An unclosed socket is closed when it is dropped, with this warning.
        warnings.simplefilter("always", ResourceWarning)
        pub = MqttPublisher(mqtt_config(mosquitto.port, "nh", timeout_s=5.0, drain_s=1.0))
        await pub.start()
        try:
            await connected(pub)
            # One connection, paho's own: the loop's socket was closed.
            assert sockets_to(mosquitto.port) <= base + 1
            assert not [w for w in caught if issubclass(w.category, ResourceWarning)], \
                [str(w.message) for w in caught]
            pub(caption("s", 0, 1, True))
            await eventually(lambda: pub.stats().published >= 1, "the final published")
        finally:
            await pub.aclose()
        await eventually(lambda: sockets_to(mosquitto.port) == base, "sockets closed",
                         within=2.0)


@contextlib.contextmanager
def hanging_lookup(monkeypatch: pytest.MonkeyPatch, host: str) -> Iterator[list[bool]]:
    """The system resolver, but a lookup of ``host`` never returns (an NSS
    module or a DNS server that hangs) until the block ends; yields, for
    each lookup that hung, whether its thread was a daemon thread."""
    import threading

    real = socket.getaddrinfo
    release = threading.Event()
    hung: list[bool] = []

    def getaddrinfo(name: object, *args: object, **kwargs: object) -> object:
        numeric = int(kwargs.get("flags", 0)) & socket.AI_NUMERICHOST  # type: ignore[call-overload]
        if name == host and not numeric:
            hung.append(threading.current_thread().daemon)
            release.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(name, *args, **kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        yield hung
    finally:
        release.set()


async def test_a_lookup_that_never_returns_holds_neither_the_stop_nor_the_exit(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A broker name whose lookup hangs: each attempt is given up at
    timeout_s and the stop at drain_s, but the lookup ran in asyncio's
    default executor, which asyncio.run waits for at its end (Python 3.11:
    with no limit) and the interpreter's exit joins: serve could not exit
    until the resolver returned, never if it hangs. The lookup now runs in
    a daemon thread of its own, which neither waits for, and the next
    attempts wait for it instead of starting one more each."""
    loop = asyncio.get_running_loop()
    with hanging_lookup(monkeypatch, "broker.hangs.invalid") as hung:
        cfg = mqtt_config(1883, "dns", host="broker.hangs.invalid", timeout_s=0.3,
                          reconnect_min_s=0.05, reconnect_max_s=0.1, drain_s=0.3)
        pub = MqttPublisher(cfg)
        await pub.start()
        await eventually(lambda: pub.stats().connect_failures >= 2, "two attempts", within=4.0)
        t0 = loop.time()
        await pub.aclose()
        assert loop.time() - t0 < 0.3 + 1.0
        await asyncio.wait_for(loop.shutdown_default_executor(), 2.0)
        # One lookup, in a daemon thread: the attempts after the first wait
        # for it rather than each leave a thread of its own behind.
        assert hung == [True], f"lookups (whether in a daemon thread): {hung}"
    said = mqtt_messages(caplog)
    assert any("looking up broker.hangs.invalid timed out after 0.3 s" in s for s in said), said


async def test_a_lookup_whose_thread_cannot_start_is_tried_again_next_time() -> None:
    """A lookup thread that cannot start (the process at its thread limit)
    left its future in the table of lookups under way, never to finish:
    every later attempt for that broker name waited on it to its deadline,
    and the publisher never connected again, even once threads could be had.
    Now the error is the attempt's, and the next attempt looks up anew."""
    from evoxtral_stream.server import mqtt_connect

    with threads_refused("mqtt-lookup"), pytest.raises(RuntimeError):
        await asyncio.wait_for(asyncio.wrap_future(mqtt_connect._lookup("localhost", 1883)), 5)
    infos = await asyncio.wait_for(asyncio.wrap_future(mqtt_connect._lookup("localhost", 1883)),
                                   5)
    assert infos
