"""How the MQTT publisher's connection to the broker is opened, handed over and ended.

One connection attempt (:func:`_open`, then :func:`_hand_over`) has one
deadline, ``cfg.timeout_s`` in all, for the name lookup, the TCP connect, the
TLS handshake and the CONNACK. The socket is made and, with ``cfg.tls``, its
handshake done on the event loop, not in aiomqtt's worker thread by paho (its
fixed 5 s each could not be cut short): a timeout or a cancellation closes it
at once, and :func:`_drop_attempt` closes an attempt given up before its
CONNACK. :func:`_break_connection` ends one without a DISCONNECT, so that the
broker publishes the will.

With ``cfg.tls`` the connection is TLS (:func:`tls_context`): the broker's
certificate is checked against ``ca_file`` or the system store, and its name
against ``cfg.host``. :func:`tls_context` reads the files each time it is
called; when to call it again (the files changed) is the publisher's
decision.

A failed attempt or a lost connection is told apart here for the publisher's
log and retry: a CONNACK refusing the protocol version or the credentials
(:func:`_refused`), a TLS error behind aiomqtt's (:func:`_tls_error`, with a
hint from :func:`_tls_hint`), a handshake that timed out
(:class:`_HandshakeTimeout`: no certificate problem), a loss
(:class:`_ConnectionLost`, :func:`_lost_error`, :func:`_observe_loss`).

Everything runs on the event loop. Its lines go to the publisher's logger,
``evoxtral_stream.server.mqtt``, and paho's to ``evoxtral_stream.server.mqtt.paho``
(docs/config.md names them), where a connection reset is a warning.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import socket
import ssl
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, MqttConfig
from ..detached import lookup
from .auth import incomplete_pem, key_pair_reason

if TYPE_CHECKING:
    import aiomqtt

__all__ = ["tls_context"]

# The publisher's logger, not this module's: one logger (and its .paho child)
# carries every MQTT line, as the docs say.
log = logging.getLogger("evoxtral_stream.server.mqtt")


class _ResetIsAWarning(logging.Filter):
    """paho logs a connection reset (a NAT or load balancer that forgot it,
    a broker killed) as an ERROR; the publisher warns of the loss itself and
    reconnects, so it is a warning, as that loss is. Other errors (a TLS
    alert after the handshake: the broker's reason) stay errors."""

    _RESETS = tuple(f"[Errno {n}]" for n in (errno.ECONNRESET, errno.ECONNABORTED,
                                             errno.EPIPE, errno.ETIMEDOUT))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and any(
                r in record.getMessage() for r in self._RESETS):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


#: Where paho's own lines go (docs/config.md names it).
_PAHO_LOG = logging.getLogger(f"{log.name}.paho")
_PAHO_LOG.addFilter(_ResetIsAWarning())
# Reason codes of a CONNACK refusing the protocol version: 3.1.1's 0x01 and
# MQTT 5's 0x84 (paho maps a 3.1.1-style 0x01 answer to a v5 connect to 0x84).
_VERSION_REFUSED = frozenset({1, 0x84})
# CONNACK refusals of the credentials or the client's rights: 3.1.1's 0x04 (bad
# user name or password) and 0x05 (not authorised), MQTT 5's 0x86 and 0x87.
_AUTH_REFUSED = frozenset({4, 5, 0x86, 0x87})


def tls_context(cfg: MqttConfig) -> ssl.SSLContext | None:
    """The client TLS context for ``cfg``, or None when ``cfg.tls`` is off.

    It trusts the CA certificates in ``ca_file`` only (the system store when
    empty), checks the broker's name against ``cfg.host`` (TLS 1.2 or later),
    and presents ``cert_file``/``key_file`` when set. An unusable file raises
    :class:`ConfigError` with a one-line message naming the key.
    """
    if not cfg.tls:
        return None
    for key, path in (("ca_file", cfg.ca_file), ("cert_file", cfg.cert_file),
                      ("key_file", cfg.key_file)):
        # ssl's own errors do not say which file is at fault.
        if not path:
            continue
        if not os.path.isfile(path):
            raise ConfigError(f"mqtt.{key} {path!r} is not a file")
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ConfigError(f"mqtt.{key} {path!r} cannot be read: {e.strerror or e}") from None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.ca_file or None)
    except ssl.SSLError as e:
        # A bundle cut off after its first CA (half written): OpenSSL says "PEM lib".
        cut = incomplete_pem((("mqtt.ca_file", cfg.ca_file, "certificate"),))
        if cut is not None and "cut off" in cut:
            raise ConfigError(f"mqtt.ca_file {cfg.ca_file!r} cannot be loaded ({cut})") from None
        raise ConfigError(f"mqtt.ca_file {cfg.ca_file!r} holds no PEM CA certificate "
                          f"({e.reason or e})") from None
    if cfg.cert_file:
        def encrypted() -> bytes:
            # Without a callback OpenSSL would prompt on the terminal, which
            # hangs a service.
            raise ConfigError(f"mqtt.key_file {cfg.key_file!r} is encrypted; "
                              "give an unencrypted key")
        try:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file, password=encrypted)
        except ssl.SSLError as e:
            # A file cut off first: its reason (BAD_END_LINE, PEM lib) says less.
            detail = incomplete_pem((
                ("mqtt.cert_file", cfg.cert_file, "certificate"),
                ("mqtt.key_file", cfg.key_file, "private key"))) or key_pair_reason(e.reason)
            raise ConfigError(f"mqtt.cert_file {cfg.cert_file!r} and mqtt.key_file "
                              f"{cfg.key_file!r} are not a PEM certificate and its private "
                              f"key ({detail or e})") from None
    return ctx


class _ConnectionLost(Exception):
    pass


class _HandshakeTimeout(TimeoutError):
    """The broker's port took the connection but did not finish the TLS handshake in time."""


async def _open(cfg: MqttConfig, tls: ssl.SSLContext | None, deadline: float) -> socket.socket:
    """A socket connected to the broker, its TLS handshake done with ``tls``
    (the context, None without ``cfg.tls``), by ``deadline`` (loop time);
    else an :class:`OSError` naming the step that failed or ran out of time.

    Made here, on the event loop, and not by paho in aiomqtt's worker
    thread: paho gives the TCP connect and the handshake a fixed 5 s each,
    whatever ``timeout_s`` says, and a thread cannot be interrupted, so
    one went on past a stop that gave the attempt up. Here a timeout or a
    cancellation closes the socket at once. Only a name lookup runs in a
    thread (:func:`_lookup`; an IP address needs none): that attempt is
    given up at the deadline all the same.
    """
    loop = asyncio.get_running_loop()
    host, port = cfg.host, cfg.port
    limit = f"{cfg.timeout_s:g} s"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        cm = asyncio.timeout_at(deadline)
        try:
            async with cm:
                infos = await asyncio.wrap_future(_lookup(host, port))
        except TimeoutError:
            if not cm.expired():
                raise
            raise TimeoutError(f"looking up {host} timed out after {limit}") from None
    error: OSError = OSError(f"{host} has no address")
    for family, kind, proto, _, address in infos:
        # One address after the other, within the one deadline (what
        # socket.create_connection does, with a timeout each).
        sock = socket.socket(family, kind, proto)
        cm = asyncio.timeout_at(deadline)
        try:
            sock.setblocking(False)
            async with cm:
                await loop.sock_connect(sock, address)
        except OSError as e:
            sock.close()
            if isinstance(e, TimeoutError) and cm.expired():
                raise TimeoutError(f"TCP connect timed out after {limit}") from None
            error = e
            continue
        except BaseException:
            sock.close()
            raise
        if tls is None:
            return sock
        return await _tls_handshake(tls, sock, host, deadline, limit)
    raise error


def _lookup(host: str, port: int) -> concurrent.futures.Future[list[Any]]:
    """``socket.getaddrinfo`` of ``host`` (a name) and ``port`` in a daemon
    thread of its own, not in asyncio's default executor, which would hold
    the process's exit while a resolver hangs (:func:`~evoxtral_stream.detached.lookup`:
    one thread per broker name, however many attempts give up waiting)."""
    return lookup(host, port, type=socket.SOCK_STREAM, thread_name="mqtt-lookup")


def _version_refused(e: BaseException) -> bool:
    return _refused(e, _VERSION_REFUSED)


def _refused(e: BaseException, codes: frozenset[int]) -> bool:
    """Whether ``e`` is a CONNACK refusal with one of ``codes``."""
    from aiomqtt.exceptions import MqttConnectError

    if not isinstance(e, MqttConnectError):
        return False
    rc = getattr(e.rc, "value", e.rc)
    return rc in codes


def _tls_error(e: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``e``, if any.

    aiomqtt re-raises a failed connect as ``MqttError(str(exc)) from None``:
    the original survives only as the implicit context.
    """
    seen: BaseException | None = e
    for _ in range(4):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _tls_hint(cfg: MqttConfig, err: ssl.SSLError) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        if "key usage" in str(err) or "Authority Key Identifier" in str(err):
            # Python 3.13 verifies strictly; CAs made by hand for a broker
            # (openssl req -x509 with Debian's defaults) often lack these.
            return ("; Python 3.13+ checks certificates strictly: a private CA needs "
                    "keyUsage keyCertSign (and a certificate it signs an authority key "
                    "identifier); reissue it with them")
        trusted = f"mqtt.ca_file {cfg.ca_file!r}" if cfg.ca_file else "the system CA store"
        return (f"; the broker's certificate must be signed by a CA in {trusted} "
                f"and name {cfg.host}")
    if cfg.port == 1883:
        return "; port 1883 is usually plain MQTT, TLS is usually on 8883"
    return ""


def _break_connection(client: aiomqtt.Client) -> None:
    """End the connection without a DISCONNECT, so the broker publishes the will.

    Shutting the socket down is an abnormal close under both MQTT versions
    (MQTT 5's DISCONNECT with reason 0x04 would be one for version 5 only).
    paho then finds the socket closed, and aiomqtt's ``__aexit__`` finishes
    without sending anything.
    """
    sock = client._client.socket()
    if not isinstance(sock, socket.socket):  # None: already closed (TLS sockets are ones)
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


async def _tls_handshake(ctx: ssl.SSLContext, sock: socket.socket, host: str,
                         deadline: float, limit: str) -> ssl.SSLSocket:
    """``sock`` (connected, non-blocking) wrapped in TLS for ``host``, its
    handshake done on the event loop by ``deadline``; closed on failure."""
    loop = asyncio.get_running_loop()
    try:
        tls = ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    cm = asyncio.timeout_at(deadline)
    try:
        async with cm:
            while True:
                try:
                    tls.do_handshake()
                    return tls
                except ssl.SSLWantReadError:
                    await _ready(loop, tls.fileno(), write=False)
                except ssl.SSLWantWriteError:
                    await _ready(loop, tls.fileno(), write=True)
    except BaseException as e:
        tls.close()
        if isinstance(e, TimeoutError) and cm.expired():
            raise _HandshakeTimeout(f"TLS handshake timed out after {limit}") from None
        raise


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    """Return once ``fd`` can be read (written, with ``write``)."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _hand_over(client: aiomqtt.Client, sock: socket.socket) -> None:
    """Start ``client``'s MQTT connection on ``sock`` (see :func:`_open`).

    paho sends the CONNECT on it here, on the event loop: with the socket
    made, its ``connect`` does not block. The one aiomqtt's ``__aenter__``
    then calls in its worker thread does nothing, so no thread ever holds
    the socket. ``sock`` is closed if paho does not take it (once it has,
    :func:`_drop_attempt` closes it).
    """
    from paho.mqtt.enums import MQTTErrorCode

    paho = client._client
    try:
        paho._create_socket = lambda: sock  # type: ignore[method-assign]
        # The arguments aiomqtt's __aenter__ would pass.
        paho.connect(client._hostname, client._port, client._keepalive, client._bind_address,
                     client._bind_port, client._clean_start, client._properties)
    except BaseException:
        if paho._sock is not sock:
            sock.close()
        raise
    if paho._sock is not sock:
        # A paho that no longer calls the hook made a socket of its own
        # (blocking, with its own timeouts): this one goes unused.
        sock.close()
        log.debug("paho-mqtt made its own socket instead of the one made on the loop; "
                  "its connect timeouts apply")

    def connected(*_: object, **__: object) -> MQTTErrorCode:
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    paho.connect = connected  # type: ignore[method-assign]


def _drop_attempt(client: aiomqtt.Client) -> None:
    """Close the socket of a connection attempt given up before its CONNACK.

    Quietly: paho's own close unregisters it from the loop and calls no
    disconnect callback, which would read aiomqtt's connect future that the
    cancellation cancelled (asyncio would log that as an error).
    """
    client._client._sock_close()


def _observe_loss(client: aiomqtt.Client) -> None:
    """Mark the loss of ``client``'s connection as seen whenever it comes.

    aiomqtt keeps it as an exception in a future that nothing may look at:
    one that ends right after its CONNACK gets a new future, unseen, and
    after a failed publish its ``__aexit__`` leaves it. asyncio would log it
    when collected, as an ERROR, for a loss the publisher already handled.
    The future is replaced once connected: call this before and after.
    """
    client._disconnected.add_done_callback(
        lambda f: None if f.cancelled() else f.exception())


def _lost_error(lost: asyncio.Future[None]) -> _ConnectionLost:
    exc = None if lost.cancelled() else lost.exception()
    return _ConnectionLost(f"connection lost: {exc}" if exc else "connection closed")
