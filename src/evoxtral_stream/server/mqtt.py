"""Publish engine events to an MQTT broker: one more subscriber, never waited for.

Topics, under ``cfg.prefix`` (``{stream}`` passed through :func:`topic_level`):

=============================  ===============================  ===  ===========================
topic                          events                           QoS  retained
=============================  ===============================  ===  ===========================
``{prefix}/{stream}/partial``  partial captions                 0    no
``{prefix}/{stream}/final``    final captions                   1    last non-empty (retain_final)
``{prefix}/{stream}/status``   ``stream.started``/``.ended``    1    yes: the stream's state
``{prefix}/{stream}/error``    ``error``                        1    no
``{prefix}/status``            ``online`` / ``offline``         1    yes; ``offline`` is the will
=============================  ===============================  ===  ===========================

A stream that ended ``cfg.forget_ended_s`` ago (and was not opened again)
has its retained status and last final removed from the broker: an empty
retained publish on each (MQTT 5 brokers also expire its ``stream.ended``
status by themselves then, which covers an engine stopped before; an
engine that stops cleanly removes on its way out what nothing else would:
the last finals, and with 3.1.1 the status too; one that crashed leaves
them). Without
that every stream id ever seen would stay retained, and each new subscriber
to ``{prefix}/+/status`` would get them all.

Payloads are the protocol v1 JSON of the event (:func:`.protocol.encode_event`),
the very text a WebSocket subscriber gets; the engine presence on
``{prefix}/status`` is plain text. Errors have their own topic because a
decode error does not end a stream, and a retained error would hide whether
the stream is live.

:class:`MqttPublisher` is an engine listener. Calling it only queues the
event (in a :class:`.mqtt_backlog.Backlog`, which holds the overflow
policy); a background task owns the aiomqtt client, publishes in order,
reconnects with bounded exponential backoff and keeps counters
(:class:`MqttStats`). Everything runs on the event loop.

How one connection is opened, handed to aiomqtt, ended and its failures
told apart is :mod:`.mqtt_connect`'s job. With ``cfg.tls`` the connection is
TLS (:func:`.mqtt_connect.tls_context`). A failed handshake is logged as an
error and retried with the same backoff as any other connection failure (one
that timed out as a warning: that is no certificate problem). A connection
attempt (TCP connect, TLS handshake, CONNACK) has ``cfg.timeout_s`` in all,
and giving an attempt up closes its socket at once.

The TLS files are read when the publisher is made, and again before any
(re)connect at which their ``os.stat`` fingerprints changed
(:class:`.certs.CertWatcher`): a renewed client certificate or a rotated CA
is used from the next connection on, without a restart. Renewed files that
do not load are logged as one error and the previous context is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

from ..config import ConfigError, MqttConfig
from ..events import CaptionEvent, EngineEvent, StreamEnded, StreamError, StreamStarted
from ..extras import extra_hint
from .certs import CertWatcher, fingerprint
from .mqtt_backlog import Backlog, PartialKey, QueuedEvent, RetainedClear
from .mqtt_connect import (
    _AUTH_REFUSED,
    _PAHO_LOG,
    _break_connection,
    _ConnectionLost,
    _drop_attempt,
    _hand_over,
    _HandshakeTimeout,
    _lost_error,
    _observe_loss,
    _open,
    _refused,
    _tls_error,
    _tls_hint,
    _version_refused,
    tls_context,
)
from .protocol import encode_event

if TYPE_CHECKING:
    import aiomqtt
    from paho.mqtt.client import CallbackOnConnect_v2, CallbackOnPublish_v2, ConnectFlags
    from paho.mqtt.client import Client as PahoClient
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "ENGINE_OFFLINE",
    "ENGINE_ONLINE",
    "MqttPublisher",
    "MqttStats",
    "reconnect_delay",
    "topic_level",
]

log = logging.getLogger(__name__)

ENGINE_ONLINE = b"online"
ENGINE_OFFLINE = b"offline"

# A final or lifecycle event whose publish broke with the connection is sent
# again after the reconnect, but not forever: a message the broker itself
# rejects (too large, say) would otherwise loop through reconnects.
_MAX_ATTEMPTS = 3
# Drop warnings at most this often; the counters carry the exact numbers.
_DROP_LOG_EVERY_S = 10.0
# A connection resets the reconnect backoff only once it has held this long
# (or reconnect_max_s, if longer): one the broker closes right after accepting
# it (another client with the same client_id, an ACL that kicks) must back off.
_STABLE_S = 10.0
# A connection closed sooner than this after it was accepted was closed by the
# broker on purpose, most often for a client_id taken over by another client.
_KICKED_S = 1.0


# What a stream id must not put in its topic level: the separator and the
# wildcards, and what MQTT 5 (1.5.4) says a topic should not hold: mosquitto
# answers a topic with a noncharacter as a malformed packet and drops the
# connection, which the next event of that stream would do again, stalling
# every stream. Surrogates cannot be encoded as UTF-8 at all.
_TOPIC_UNSAFE = re.compile(
    "[/+#\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
    + "]")


@dataclass(frozen=True)
class MqttStats:
    """A snapshot of the publisher's counters (messages, not MQTT packets:
    events, and the publisher's own: the removals of ended streams'
    retained messages, and live statuses restated after a reconnect).

    ``published``: accepted by the broker (QoS 1: acknowledged). ``superseded``:
    partials replaced while waiting by a newer partial or the final of their
    segment (no information lost). ``dropped_partials``/``dropped_finals``:
    removed by the overflow policy (``dropped_finals`` counts errors and
    lifecycle events too). ``failed``: given up after a failed publish, refused by the broker
    (an MQTT 5 acknowledgement with an error reason code), over the maximum
    packet size its CONNACK set (not sent), or still queued at close.
    ``queued``: waiting now.
    """

    connected: bool
    protocol: str | None
    queued: int
    published: int
    superseded: int
    dropped_partials: int
    dropped_finals: int
    failed: int
    connects: int
    connect_failures: int
    last_error: str | None

    @property
    def reconnects(self) -> int:
        """Successful connections after the first."""
        return max(0, self.connects - 1)

    @property
    def unpublished(self) -> int:
        """Events lost for good (dropped or failed); ``queued`` ones may still go out."""
        return self.dropped_partials + self.dropped_finals + self.failed


def topic_level(stream: str) -> str:
    """``stream`` as one topic level a broker accepts.

    ``/``, ``+``, ``#``, control characters (U+0000-U+001F, U+007F-U+009F),
    surrogates and Unicode noncharacters (U+FDD0-U+FDEF, U+xFFFE, U+xFFFF)
    become ``_``. Two ids may then share a topic ("a/b", "a_b"); the payload
    keeps the real id.
    """
    return _TOPIC_UNSAFE.sub("_", stream) or "_"


def reconnect_delay(cfg: MqttConfig, failures: int, rand: Callable[[], float]) -> float:
    """Seconds to wait after ``failures`` (>= 1) failed attempts in a row.

    ``reconnect_min_s`` doubled per further failure, capped at
    ``reconnect_max_s``, then up to 25% less (``rand()`` in [0, 1)) so engines
    restarted together do not hammer the broker in lockstep.
    """
    base = min(cfg.reconnect_max_s, cfg.reconnect_min_s * 2.0 ** min(failures - 1, 60))
    return base * (1.0 - 0.25 * rand())


class _DrainOver(_ConnectionLost):
    """Closing, and ``drain_s`` ran out while the broker kept a publish unacknowledged."""


class _Refused(Exception):
    """The broker acknowledged a publish with an error reason code (MQTT 5 only)."""


class MqttPublisher:
    """Engine listener that publishes every event to MQTT (see the module doc).

    Use as ``async with MqttPublisher(cfg) as pub: engine.add_listener(pub)``,
    or ``await start()`` / ``await aclose()``. The caller decides by
    ``cfg.enabled`` whether to make one. Events passed before ``start`` wait
    in the queue. The constructor reads the TLS files and raises
    :class:`ConfigError` for an unusable one; before each later connection
    attempt they are read again if they changed (see the module doc).

    ``__call__`` never blocks and never raises for an event: it puts the event
    in a queue of ``cfg.queue_size`` and returns. While a partial waits, a
    newer partial or the final of the same segment replaces it (a caption
    carries the whole segment's text, so nothing is lost; counted as
    ``superseded``). When an event overfills the queue, one is dropped, the
    first of: the oldest waiting partial (the new partial itself when no
    other waits); the oldest final or error (the new one itself when no other
    waits); the oldest lifecycle event whose status topic has a newer one
    waiting (it is no longer the stream's state); the oldest lifecycle event.
    So the retained status stays each stream's last state unless the queue
    holds nothing but lifecycle events, each its topic's last (a dropped
    ``stream.ended`` would leave a stream gone long ago retained as
    started). Every drop is counted.

    A ``stream.ended`` also schedules the removal of the stream's retained
    messages ``cfg.forget_ended_s`` later (a :class:`.mqtt_backlog.RetainedClear`
    per topic, queued like a lifecycle event when due); a ``stream.started``
    of the stream cancels it.

    The background task connects (MQTT 5, or 3.1.1 after the broker refuses
    version 5 when ``protocol = "auto"``; that choice then sticks), publishes
    ``online`` (retained; the will is ``offline``), the retained status of
    every stream last published as live (after a reconnect: the broker may
    have restarted without persistence and lost it), then the queue in
    order, one message at a time. On a failure it reconnects after
    :func:`reconnect_delay`; the queue keeps filling meanwhile. The delay
    keeps growing across connections that broke within ``_STABLE_S`` (or
    ``reconnect_max_s``) of being made. A final or
    lifecycle event whose publish broke goes back to the head and is sent
    again, up to three attempts (QoS 1 is at-least-once: duplicates are
    possible); a broken partial is counted as failed. A publish the broker
    refuses (MQTT 5 PUBACK with an error reason, e.g. an ACL's "not
    authorized") is counted as failed and logged, not retried: the connection
    is fine and the same message would be refused again. So is one larger
    than the maximum packet size of an MQTT 5 broker's CONNACK, unsent: the
    broker would drop the connection for it. ``aclose`` publishes
    what is queued for up to ``cfg.drain_s``, then ``offline``, then
    disconnects; whatever is left counts as failed. A connection attempt or
    an acknowledgement still awaited when ``drain_s`` runs out is given up
    then, not ``timeout_s`` later. A connection given up on
    (by an error, or an ``offline`` that did not go out) is closed without a
    DISCONNECT, so that the broker publishes the will.
    """

    def __init__(self, cfg: MqttConfig, *, rand: Callable[[], float] | None = None) -> None:
        self.cfg = cfg
        self.client_id = cfg.client_id or f"evoxtral-{secrets.token_hex(6)}"
        self._tls_files = tuple(f for f in (cfg.ca_file, cfg.cert_file, cfg.key_file) if f)
        # Stat'ed before the read: a renewal during the read shows at the next connect.
        self._tls_watch = CertWatcher(fingerprint(self._tls_files))
        self._tls = tls_context(cfg)
        self._rand = rand or random.Random().random
        self._backlog = Backlog(cfg.queue_size)
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._closing = asyncio.Event()
        self._closed = False
        self._drain_deadline = 0.0
        self._task: asyncio.Task[None] | None = None
        # True while the task waits for a connection (its CONNACK): at the
        # end of the drain it could publish nothing, so aclose cancels it.
        self._connecting = False
        self._fallback = False
        self._protocol: str | None = None
        self._published = 0
        self._failed = 0
        self._connects = 0
        self._connect_failures = 0
        self._last_error: str | None = None
        self._last_drop_log = -_DROP_LOG_EVERY_S
        self._drops_logged = 0
        # Set by the PUBACK of the publish in flight (one at a time) when the
        # broker refused it; see _client.
        self._refusal: ReasonCode | None = None
        # The largest packet the broker takes (MQTT 5 CONNACK), None if it
        # set no limit; it drops the connection of a client that sends more.
        self._max_packet: int | None = None
        self._refused = 0
        self._last_refused_log = -_DROP_LOG_EVERY_S
        # The topic levels of ended streams whose retained messages are still
        # to be removed, with when (monotonic), soonest first: one entry per
        # stream that ended within forget_ended_s. By level, not id: ids that
        # share one (a/b and a_b) share the retained messages too.
        self._forget: OrderedDict[str, float] = OrderedDict()
        # The leaves (topics) of a due level in _forget already queued for
        # removal, while the queue had no room for the rest.
        self._clears_queued: dict[str, set[str]] = {}
        # Per status topic, the stream.started last published there, while no
        # stream.ended or removal has been published after it: sent again
        # after every reconnect (see _restate). Bounded by the live streams.
        self._live_status: dict[str, StreamStarted] = {}

    # --- listener side ------------------------------------------------------

    def __call__(self, event: EngineEvent) -> None:
        """Queue ``event`` for publishing. Never blocks; O(1)."""
        if self._closed:
            self._failed += 1
            return
        item = self._item(event)
        if item is None:
            log.debug("no MQTT topic for %r; not published", event)
            return
        self._backlog.push(item)
        if isinstance(event, StreamStarted):
            self._forget.pop(topic_level(event.stream), None)
            self._clears_queued.pop(topic_level(event.stream), None)
        elif isinstance(event, StreamEnded) and self.cfg.forget_ended_s > 0:
            level = topic_level(event.stream)
            self._forget.pop(level, None)
            self._clears_queued.pop(level, None)
            self._forget[level] = time.monotonic() + self.cfg.forget_ended_s
        self._wake.set()
        dropped = self._backlog.dropped_partials + self._backlog.dropped_finals
        if dropped != self._drops_logged:
            now = time.monotonic()
            if now - self._last_drop_log >= _DROP_LOG_EVERY_S:
                self._last_drop_log = now
                self._drops_logged = dropped
                log.warning("MQTT queue full (%d): %d partial(s) and %d final/lifecycle "
                            "event(s) dropped so far", self.cfg.queue_size,
                            self._backlog.dropped_partials, self._backlog.dropped_finals)

    def _item(self, event: EngineEvent) -> QueuedEvent | None:
        key: PartialKey | None = None
        if isinstance(event, CaptionEvent):
            key = (event.stream, event.segment)
            if event.final:
                # An empty final (a sound the model found no speech in) goes
                # out live, but must not replace the last caption said as
                # what a subscriber joining later is shown.
                leaf, qos, retain = "final", 1, self.cfg.retain_final and bool(event.text)
            else:
                leaf, qos, retain = "partial", 0, False
        elif isinstance(event, StreamStarted | StreamEnded):
            leaf, qos, retain = "status", 1, True
        elif isinstance(event, StreamError):
            leaf, qos, retain = "error", 1, False
        else:
            return None
        topic = f"{self.cfg.prefix}/{topic_level(event.stream)}/{leaf}"
        return QueuedEvent(next(self._order), event, topic, qos, retain, key)

    # --- state ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stats(self) -> MqttStats:
        b = self._backlog
        return MqttStats(
            connected=self.connected, protocol=self._protocol, queued=len(b),
            published=self._published, superseded=b.superseded,
            dropped_partials=b.dropped_partials, dropped_finals=b.dropped_finals,
            failed=self._failed, connects=self._connects,
            connect_failures=self._connect_failures, last_error=self._last_error,
        )

    async def wait_connected(self) -> None:
        """Return once the publisher is connected (at once if it is)."""
        await self._connected.wait()

    # --- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> MqttPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the background task; returns at once, connected or not."""
        if self._task is not None or self._closed:
            raise RuntimeError("MQTT publisher already started")
        _require_aiomqtt()
        self._task = asyncio.create_task(self._run(), name="mqtt-publisher")

    async def aclose(self) -> None:
        """Drain for up to ``cfg.drain_s``, say ``offline``, disconnect. Idempotent.

        A broker that does not answer holds it up no longer than ``drain_s``;
        only a goodbye or a disconnect stuck past its own timeout can."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        self._drain_deadline = loop.time() + self.cfg.drain_s
        self._closing.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            # The task honours the deadline itself, but for a connection
            # being made: a broker that takes its CONNACK past the drain gets
            # nothing published, so the attempt is given up then.
            done, _ = await asyncio.wait({task}, timeout=self.cfg.drain_s)
            if not done and self._connecting:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                done = {task}
            # This bound only covers the goodbye or a disconnect stuck past
            # its own timeout.
            limit = 2 * self.cfg.timeout_s + 1.0
            if not done:
                done, _ = await asyncio.wait({task}, timeout=limit)
            if not done:
                log.warning("MQTT publisher did not stop in %.1f s; cancelling it", limit)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        left = self._backlog.clear()
        if left:
            self._failed += left
            log.warning("MQTT publisher closed with %d event(s) unpublished", left)

    # --- background task --------------------------------------------------------

    def _past_deadline(self) -> bool:
        return asyncio.get_running_loop().time() >= self._drain_deadline

    def _done_closing(self) -> bool:
        return self._closing.is_set() and (
            self._past_deadline()
            or (not self._backlog and not (self._forget and self._owed_at_close())))

    def _owed_at_close(self) -> tuple[str, ...]:
        """The topics (leaves) of each ended stream's retained messages that
        a stop must remove itself: nothing expires them on the broker. With
        MQTT 3.1.1 that is all of them; with MQTT 5 the ``stream.ended``
        status expires by itself, the last final does not."""
        v5 = not (self.cfg.protocol == "3.1.1" or self._fallback)
        leaves = ("status", "final") if self.cfg.retain_final else ("status",)
        return tuple(leaf for leaf in leaves if not (v5 and leaf == "status"))

    async def _run(self) -> None:
        import aiomqtt

        loop = asyncio.get_running_loop()
        failures = 0
        while not self._done_closing():
            version = "3.1.1" if self.cfg.protocol == "3.1.1" or self._fallback else "5"
            up_since: float | None = None
            client: aiomqtt.Client | None = None
            try:
                self._refresh_tls()
                client = self._client(version)
                self._connecting = True
                # One deadline for the whole attempt: TCP, TLS and CONNACK.
                deadline = loop.time() + self.cfg.timeout_s
                _hand_over(client, await _open(self.cfg, self._tls, deadline))
                client.timeout = max(0.0, deadline - loop.time())  # for the CONNACK
                async with client:
                    client.timeout = self.cfg.timeout_s
                    self._connecting = False
                    up_since = loop.time()
                    self._on_connected(version, failures)
                    try:
                        await self._pump(client, version)
                    except BaseException:
                        # Leaving `async with` sends a clean DISCONNECT, and
                        # the broker then discards the will: the retained
                        # presence would say online while nobody publishes.
                        _break_connection(client)
                        raise
                return
            except _DrainOver:
                # Left without a DISCONNECT (above): the broker sends the will.
                log.warning("MQTT broker %s:%d did not acknowledge within mqtt.drain_s (%.3g "
                            "s) at shutdown; leaving the connection", self.cfg.host,
                            self.cfg.port, self.cfg.drain_s)
                return
            except (aiomqtt.MqttError, _ConnectionLost, OSError) as e:
                was_connected = self.connected
                self._connected.clear()
                if (not was_connected and version == "5" and self.cfg.protocol == "auto"
                        and _version_refused(e)):
                    log.info("MQTT broker %s:%d refused MQTT 5; using 3.1.1",
                             self.cfg.host, self.cfg.port)
                    self._fallback = True
                    continue
                lasted = None if up_since is None else loop.time() - up_since
                failures = self._failures_after(failures, lasted)
                self._on_failure(e, was_connected, failures, lasted)
            except Exception as e:
                # Anything unforeseen must not end publishing for the process's
                # lifetime: log it in full and go round the reconnect loop.
                self._connected.clear()
                lasted = None if up_since is None else loop.time() - up_since
                failures = self._failures_after(failures, lasted)
                if failures == 1:
                    log.exception("MQTT publisher failed unexpectedly; retrying with backoff")
                self._on_failure(e, False, failures)
            finally:
                self._connected.clear()
                if self._connecting and client is not None:
                    # Given up before its CONNACK (aclose cancels it): aiomqtt
                    # leaves the socket open.
                    _drop_attempt(client)
                self._connecting = False
            await self._backoff(failures)

    def _refresh_tls(self) -> None:
        """Rebuild the TLS context if its files changed since it was built.

        Files that do not load (half renewed, a key that does not match) are
        logged once per distinct bad state and the previous context is used;
        they are tried again before the next connection attempt.
        """
        if self._tls is None or not self._tls_files:
            return
        seen = fingerprint(self._tls_files)
        if not self._tls_watch.due(seen):
            return
        try:
            ctx = tls_context(self.cfg)
        except (ConfigError, OSError) as e:
            # OSError: a file replaced between tls_context's checks and its read.
            if self._tls_watch.failed(seen, str(e)):
                log.error("MQTT TLS files changed but cannot be used (%s); connecting with "
                          "the previous ones until they are fixed", e)
            return
        self._tls = ctx
        self._tls_watch.loaded(seen)
        log.info("MQTT TLS files reloaded (%s); used from this connection on",
                 ", ".join(self._tls_files))

    def _client(self, version: str) -> aiomqtt.Client:
        import aiomqtt
        from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY

        v5 = version == "5"
        will = aiomqtt.Will(f"{self.cfg.prefix}/status", ENGINE_OFFLINE, qos=1, retain=True,
                            properties=_props(v5, "text/plain", will=True))
        client = aiomqtt.Client(
            self.cfg.host, self.cfg.port,
            username=self.cfg.username or None, password=self.cfg.password or None,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=will,
            # Nothing is subscribed and unacknowledged finals are re-queued by
            # us, so a broker-side session would only hold stale state.
            clean_session=None if v5 else True,
            # paho refuses any clean_start but its default under 3.1.1.
            clean_start=True if v5 else MQTT_CLEAN_START_FIRST_ONLY,
            keepalive=self.cfg.keepalive_s,
            timeout=self.cfg.timeout_s,
            tls_context=self._tls,
            logger=_PAHO_LOG,
        )
        # aiomqtt completes a publish on any acknowledgement and drops its
        # reason code, so an MQTT 5 PUBACK refusing the message (0x87 not
        # authorized by an ACL, 0x97 quota exceeded, ...) would read as
        # published. Note the refusal, then let aiomqtt complete the publish.
        paho: PahoClient = client._client
        acknowledged = cast("CallbackOnPublish_v2", paho.on_publish)

        def on_publish(c: PahoClient, userdata: Any, mid: int, reason: ReasonCode,
                       props: Properties) -> None:
            if reason.is_failure:
                self._refusal = reason
            acknowledged(c, userdata, mid, reason, props)

        paho.on_publish = on_publish
        connack = cast("CallbackOnConnect_v2", paho.on_connect)
        self._max_packet = None

        def on_connect(c: PahoClient, userdata: Any, flags: ConnectFlags, reason: ReasonCode,
                       props: Properties | None) -> None:
            self._max_packet = getattr(props, "MaximumPacketSize", None)
            connack(c, userdata, flags, reason, props)

        paho.on_connect = on_connect
        _observe_loss(client)
        return client

    def _on_connected(self, version: str, failures: int) -> None:
        self._connects += 1
        self._protocol = version
        self._last_error = None
        self._connected.set()
        how = f"MQTT {version}, TLS" if self._tls is not None else f"MQTT {version}"
        if self._connects == 1:
            log.info("MQTT connected to %s:%d (%s) as %s", self.cfg.host, self.cfg.port,
                     how, self.client_id)
        else:
            log.info("MQTT reconnected to %s:%d (%s) after %d failed attempt(s); "
                     "%d event(s) queued", self.cfg.host, self.cfg.port, how, failures,
                     len(self._backlog))

    def _failures_after(self, failures: int, lasted: float | None) -> int:
        """Failures in a row after one more; a connection that held counts as a success."""
        if lasted is not None and lasted >= max(_STABLE_S, self.cfg.reconnect_max_s):
            failures = 0
        return failures + 1

    def _on_failure(self, e: BaseException, was_connected: bool, failures: int,
                    lasted: float | None = None) -> None:
        previous, self._last_error = self._last_error, str(e) or type(e).__name__
        if was_connected:
            hint = ""
            if lasted is not None and lasted < _KICKED_S:
                hint = f"; the broker closed it {lasted:.2f} s after accepting it"
                if self.cfg.client_id:  # a random id cannot be taken over
                    hint += (f": is another client connected as client_id "
                             f"{self.client_id!r}?")
            log.warning("MQTT connection to %s:%d lost (%s)%s; reconnecting in up to %.3g s",
                        self.cfg.host, self.cfg.port, self._last_error, hint,
                        reconnect_delay(self.cfg, failures, lambda: 0.0))
            return
        self._connect_failures += 1
        # One message per outage, and one more when the reason changes (a
        # broker back up with the wrong certificate, say); the counters tell
        # how long it lasted.
        loud = failures == 1 or self._last_error != previous
        if isinstance(e, _HandshakeTimeout):
            # The port takes connections but does not answer: no certificate
            # is at fault, and the broker may only be busy.
            log.log(logging.WARNING if loud else logging.DEBUG,
                    "MQTT TLS handshake with %s:%d timed out: the port took the connection "
                    "but did not answer within mqtt.timeout_s (%.3g s); retrying with backoff",
                    self.cfg.host, self.cfg.port, self.cfg.timeout_s)
            return
        tls = _tls_error(e)
        if tls is not None:
            # Certificates and names do not fix themselves: this is an error.
            log.log(logging.ERROR if loud else logging.DEBUG,
                    "MQTT TLS handshake with %s:%d failed (%s)%s; retrying with backoff",
                    self.cfg.host, self.cfg.port, self._last_error, _tls_hint(self.cfg, tls))
            return
        if _refused(e, _AUTH_REFUSED):
            # Reachable, but it turns these credentials away: say so, not "unreachable".
            log.log(logging.WARNING if loud else logging.DEBUG,
                    "MQTT broker %s:%d refused the connection (%s): check mqtt.username "
                    "and mqtt.password, and what the broker allows that user; retrying "
                    "with backoff", self.cfg.host, self.cfg.port, self._last_error)
            return
        hint = ""
        if self._tls is None and self.cfg.port == 8883:
            hint = "; port 8883 is usually MQTT over TLS (mqtt.tls = true)"
        log.log(logging.WARNING if loud else logging.DEBUG,
                "MQTT broker %s:%d unreachable (%s)%s; retrying with backoff",
                self.cfg.host, self.cfg.port, self._last_error, hint)

    async def _backoff(self, failures: int) -> None:
        delay = reconnect_delay(self.cfg, max(failures, 1), self._rand)
        if self._closing.is_set():
            # Draining: try again only while the deadline allows.
            remaining = self._drain_deadline - asyncio.get_running_loop().time()
            await asyncio.sleep(max(0.0, min(delay, remaining)))
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), delay)

    async def _pump(self, client: aiomqtt.Client, version: str) -> None:
        """Publish the queue until closing; raise when the connection breaks."""
        # aiomqtt offers no public signal for a connection that broke while
        # idle; its private future is the one that paho's callbacks complete.
        lost: asyncio.Future[None] = client._disconnected
        _observe_loss(client)
        v5 = version == "5"
        json_props = _json_props(v5)
        try:
            await self._send(client, lost, f"{self.cfg.prefix}/status", ENGINE_ONLINE, 1,
                             True, _text_props(v5))
        except _Refused as e:
            # Not a connection problem: reconnecting would only be refused
            # again. Events may still be allowed, so publish them.
            log.warning("MQTT broker refused %r on %s/status (%s); the engine's presence "
                        "is not published", ENGINE_ONLINE.decode(), self.cfg.prefix, e)
        await self._restate(client, lost, json_props)
        ended_props = _json_props(v5, expiry_s=self.cfg.forget_ended_s)
        while True:
            # What an engine stopping now leaves retained without an expiry
            # (everything with 3.1.1, the last finals with 5) stays for
            # good, so it clears it on the way out.
            self._queue_due_clears(every=self._closing.is_set())
            if self._done_closing():
                break
            item = self._backlog.pop()
            if item is None:
                await self._idle(lost)
                continue
            try:
                if isinstance(item.event, RetainedClear):
                    payload, props = b"", None
                else:
                    payload = encode_event(item.event).encode()
                    props = ended_props if isinstance(item.event, StreamEnded) else json_props
                await self._send(client, lost, item.topic, payload, item.qos, item.retain,
                                 props)
            except _Refused as e:
                # The broker answered: the connection is fine, and sending the
                # same message again would be refused again.
                self._failed += 1
                self._log_refused(item.topic, e)
                continue
            except BaseException:
                # Cancellation included: the item must be counted, not vanish.
                self._give_back(item)
                raise
            self._published += 1
            if isinstance(item.event, StreamStarted):
                self._live_status[item.topic] = item.event
            elif item.retain and item.topic in self._live_status:
                # Its stream.ended, or an empty message clearing the topic.
                del self._live_status[item.topic]
        # A clean DISCONNECT suppresses the will, so say goodbye explicitly;
        # when that fails, leave without one so the broker sends the will.
        try:
            await self._send(client, lost, f"{self.cfg.prefix}/status", ENGINE_OFFLINE, 1,
                             True, _text_props(v5), goodbye=True)
        except _Refused as e:
            log.warning("MQTT broker refused %r on %s/status (%s)", ENGINE_OFFLINE.decode(),
                        self.cfg.prefix, e)
            _break_connection(client)
        except Exception:
            _break_connection(client)

    async def _restate(self, client: aiomqtt.Client, lost: asyncio.Future[None],
                       props: Properties | None) -> None:
        """Publish again the retained status of every stream published as
        live: a broker restarted without persistence has lost its retained
        messages, and a new subscriber of ``{prefix}/+/status`` would not
        learn of streams that went live before. A broker that kept them gets
        the same message again (its live subscribers get that
        ``stream.started`` once more). Runs before the queue, which holds
        only later events."""
        for topic, started in list(self._live_status.items()):
            try:
                await self._send(client, lost, topic, encode_event(started).encode(), 1, True,
                                 props)
            except _Refused as e:
                self._failed += 1
                self._log_refused(topic, e)
                continue
            self._published += 1

    def _queue_due_clears(self, *, every: bool = False) -> None:
        """Queue the removal of the retained messages of streams that ended
        ``forget_ended_s`` ago: their status, and their last final if
        retained (``every``, at a stop: of every ended stream, those
        nothing would remove later; see :meth:`_owed_at_close`).

        Only as the queue has room: a removal is housekeeping, and never
        pushes out an event that waits (after an outage every removal that
        fell due meanwhile is due at once, and the queue holds the finals
        kept through it). The rest stay due and are queued as it drains."""
        now = math.inf if every else time.monotonic()
        if every:
            leaves = self._owed_at_close()
        else:
            leaves = ("status", "final") if self.cfg.retain_final else ("status",)
        while self._forget:
            level, due = next(iter(self._forget.items()))
            if due > now:
                return
            queued = self._clears_queued.setdefault(level, set())
            for leaf in leaves:
                if leaf in queued:
                    continue
                # One at a time: a queue of one has room for only one of a
                # stream's removals, and the next would push it out.
                if len(self._backlog) >= self._backlog.size:
                    return
                queued.add(leaf)
                self._backlog.push(QueuedEvent(next(self._order), RetainedClear(level),
                                               f"{self.cfg.prefix}/{level}/{leaf}", 1, True,
                                               None))
            del self._forget[level]
            del self._clears_queued[level]

    async def _idle(self, lost: asyncio.Future[None]) -> None:
        self._wake.clear()
        if self._backlog or self._closing.is_set():
            return
        waiter = asyncio.ensure_future(self._wake.wait())
        either: set[asyncio.Future[Any]] = {waiter, lost}
        # Wake for the next removal of an ended stream's retained messages.
        timeout = (max(0.0, next(iter(self._forget.values())) - time.monotonic())
                   if self._forget else None)
        try:
            await asyncio.wait(either, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if lost.done():
            raise _lost_error(lost)

    async def _send(self, client: aiomqtt.Client, lost: asyncio.Future[None], topic: str,
                    payload: bytes, qos: int, retain: bool, props: Properties | None,
                    *, goodbye: bool = False) -> None:
        """Publish one message. Raises :class:`_DrainOver` when closing and
        the drain deadline comes first (but for the ``goodbye``, which is
        bounded by ``timeout_s`` only)."""
        # A QoS 1 publish whose connection broke would wait the full timeout
        # for its acknowledgement; racing it against the loss fails it at once.
        self._refusal = None
        size = _publish_size(topic, payload, qos, props, v5=self._protocol == "5")
        if self._max_packet is not None and size > self._max_packet:
            # Sent, it would only get the connection dropped (and the will
            # published), at every attempt.
            raise _Refused(f"{size} bytes, over the broker's maximum packet size "
                           f"{self._max_packet}")
        pub = asyncio.ensure_future(client.publish(topic, payload, qos=qos, retain=retain,
                                                   properties=props,
                                                   timeout=self.cfg.timeout_s))
        over = None if goodbye else asyncio.ensure_future(self._drain_over())
        try:
            await asyncio.wait({pub, lost} | ({over} if over else set()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            if over is not None:
                over.cancel()
            if not pub.done():
                pub.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pub
        if pub.done() and not pub.cancelled():
            pub.result()
            if self._refusal is not None:
                raise _Refused(str(self._refusal))
            return
        if not lost.done():
            raise _DrainOver
        raise _lost_error(lost)

    async def _drain_over(self) -> None:
        """Return when closing and the drain deadline has passed."""
        await self._closing.wait()
        await asyncio.sleep(max(0.0, self._drain_deadline - asyncio.get_running_loop().time()))

    def _log_refused(self, topic: str, e: _Refused) -> None:
        self._refused += 1
        now = time.monotonic()
        # A misconfigured ACL refuses every final: one line per interval, the
        # counters carry the rest.
        if now - self._last_refused_log >= _DROP_LOG_EVERY_S:
            self._last_refused_log = now
            log.warning("MQTT broker refused the publish to %s (%s); not retried, counted "
                        "as failed (%d refused so far; check the broker's ACL and limits)",
                        topic, e, self._refused)

    def _give_back(self, item: QueuedEvent) -> None:
        if item.partial or item.attempts + 1 >= _MAX_ATTEMPTS:
            self._failed += 1
            return
        self._backlog.put_back(replace(item, attempts=item.attempts + 1))


def _require_aiomqtt() -> None:
    try:
        import aiomqtt  # noqa: F401
    except ImportError:
        raise RuntimeError(
            f"MQTT needs aiomqtt: {extra_hint('mqtt')}, or set mqtt.enabled=false"
        ) from None


def _publish_size(topic: str, payload: bytes, qos: int, props: Properties | None, *,
                  v5: bool) -> int:
    """The size in bytes of the PUBLISH packet paho sends for these."""
    rest = 2 + len(topic.encode()) + (2 if qos else 0) + len(payload)
    if v5:
        rest += len(props.pack()) if props is not None else 1  # type: ignore[no-untyped-call]
    length_bytes = 1
    while rest >= 128 ** length_bytes:
        length_bytes += 1
    return 1 + length_bytes + rest


def _props(v5: bool, content_type: str, *, will: bool = False,
           expiry_s: float = 0.0) -> Properties | None:
    if not v5:
        return None
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(  # type: ignore[no-untyped-call]
        PacketTypes.WILLMESSAGE if will else PacketTypes.PUBLISH)
    props.PayloadFormatIndicator = 1  # UTF-8 text
    props.ContentType = content_type
    if expiry_s > 0:
        props.MessageExpiryInterval = math.ceil(expiry_s)
    return props


def _json_props(v5: bool, *, expiry_s: float = 0.0) -> Properties | None:
    return _props(v5, "application/json", expiry_s=expiry_s)


def _text_props(v5: bool) -> Properties | None:
    return _props(v5, "text/plain")
