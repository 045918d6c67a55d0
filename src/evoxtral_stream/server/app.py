"""The WebSocket server: subscribers, audio ingest and ``/healthz`` on one port.

Routes (see docs/protocol.md):
- ``GET /healthz``: plain HTTP 200 ``ok`` while the server runs, 503
  ``model stalled`` while the model thread is stuck (``worker.stall_timeout_s``)
  and ``model down`` once the worker gave up (``worker.restart_limit``).
- ``/v1/captions[?stream=ID[,ID...]][&since=SEQ | &since=ID:SEQ,...][&epoch=E]``:
  a hello, the captions retained after ``since`` (or a ``gap``; all retained
  ones after a gap when ``epoch``, the hello's epoch the seqs came under, is
  not the server's), then every caption and lifecycle event of the chosen
  streams (all when none is named).
- ``/v1/ingest?stream=ID``: a ``config`` message, then binary audio (and
  ``lost`` messages, filled with silence); the stream's own events come back
  on the same connection, and ``ingest.progress`` acknowledgements of the
  audio when the config asks for them; ``end`` (or a disconnect) flushes the
  open segment as a final.

A subscriber (an ingest connection too, on its own events) that falls
``server.subscriber_queue`` messages behind is closed with code 1013 so it
never slows the others. Every protocol error is
sent as an ``error`` event before any close.

Access control and limits (docs/protocol.md, "Access control"): the
handshake hook refuses a WebSocket request with HTTP 401/403 when tokens are
configured and it lacks a fitting one, or when its Origin is not allowed;
the page and ``/healthz`` stay open. The decisions and the accounting live
in ``auth.py``; this module only applies them.

TLS (``server.tls_cert``/``tls_key``): the files are checked every
``tls_poll_s`` seconds and a renewed certificate is loaded and served to
new handshakes (``certs.py``) while open connections go on; renewed files
that do not load leave the old certificate in service.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import weakref
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from ..audio.resample import SILENCE_PIECES_PER_TURN, StreamResampler, silence_pieces
from ..config import AuthConfig, AuthTokenConfig, ConfigError, ServerConfig, redact_host
from ..engine.engine import Engine, EngineStopping, Stream
from ..events import SAMPLE_RATE, Int16Array, stream_id_problem
from ..text.chars import shown
from .auth import (
    SUBPROTOCOL_PREFIX,
    AccessPolicy,
    Grant,
    IngestRate,
    Refusal,
    Role,
    StreamSlots,
    TokenUsage,
    check_bind,
    find_credentials,
    is_loopback,
)
from .broadcast import Broadcaster, Subscription
from .certs import ServerCertificate
from .metrics import Metrics
from .protocol import (
    MAX_LOST_S,
    EndOfStream,
    IngestFormat,
    IngestProgress,
    LostAudio,
    ProtocolError,
    decode_audio_frame,
    encode_error,
    encode_event,
    encode_hello,
    encode_message,
    parse_epoch,
    parse_ingest_message,
    parse_since,
)

__all__ = ["CLOSE_POLICY", "CLOSE_TOO_BIG", "CLOSE_TOO_SLOW", "TLS_POLL_S", "CaptionServer",
           "check_listen", "close_dropping_input"]

log = logging.getLogger(__name__)

CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TOO_SLOW = 1013
#: How often (seconds) the TLS files are checked for a renewed certificate.
#: Renewals come weeks before expiry, so a short delay costs nothing.
TLS_POLL_S = 30.0
#: At close, how long a connection still in its opening handshake may take to
#: finish it (and get websockets' 503) before it is aborted. Without it the
#: close waits for websockets' open_timeout (10 s) on every such connection: a
#: load balancer's TCP check, a browser's preconnect, a half-sent request,
#: enough to push a shutdown past a container's stop grace.
OPENING_GRACE_S = 1.0
#: How long a close handshake may take before the connection is dropped.
#: websockets bounds only the wait for the peer's close frame: one whose
#: sends are blocked by a peer that stopped reading (its buffers full) waited
#: for the keepalive's ping timeout (20 s), past a container's stop grace, so
#: the server's close also aborts whatever is still open a second after it.
CLOSE_TIMEOUT_S = 2.0
#: After a read's deadline passed, how long one more read may wait for what
#: is already there. The deadline may pass while the server handles a message
#: (a busy process, a send waiting on the client): the client's audio then
#: waits in the socket, and a read given no time left does not look at it
#: (its timeout fires before the loop reads the socket; Python 3.11's
#: ``wait_for(…, 0)`` did not even look at what was already read). Such a
#: client was not idle.
LATE_READ_S = 0.05
#: How long past an ingest's idle deadline the messages still coming in one
#: after another (each within :data:`LATE_READ_S`) are read, looking for audio
#: behind them. A backlog that waited while the server was busy is read in
#: far less; a client that keeps sending messages without audio (empty binary
#: frames, ``lost``) as fast as that is idle, not kept open by them.
OVERDUE_READ_S = 1.0
_CAPTIONS = "/v1/captions"
_INGEST = "/v1/ingest"
_REALTIME = "/v1/realtime"
_CAPABILITIES = ["captions", "resume", "ingest", "realtime"]
# How an ingest connection's audio loop ended.
_Outcome = Literal["end", "closed", "idle"]
# How long an ingest connection that ended may take to read its last
# events before the summary; past that it is closed as too slow (1013).
_FINALS_SENT_S = 10.0

# Errors after which an ingest connection cannot go on: the byte stream is
# misaligned or the peer is not speaking the protocol.
_FATAL_INGEST = {"odd_length", "not_configured", "too_large", "bad_audio", "too_fast"}
_ROLES: dict[str, Role] = {_CAPTIONS: "subscribe", _INGEST: "ingest", _REALTIME: "ingest",
                           "/metrics": "admin"}


@dataclass
class _Access:
    """What a live connection was granted, to check again when [auth] is reloaded."""

    path: str
    role: Role
    streams: tuple[str, ...]
    token: AuthTokenConfig | None


_WEB = resources.files("evoxtral_stream").joinpath("server/web")
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
}


def _plain(status: HTTPStatus, body: str) -> Response:
    return _respond(status, body.encode(), "text/plain; charset=utf-8")


def _refusal(refusal: Refusal) -> Response:
    response = _plain(HTTPStatus(refusal.status), refusal.message + "\n")
    if refusal.status == HTTPStatus.UNAUTHORIZED:
        response.headers["WWW-Authenticate"] = 'Bearer realm="evoxtral-stream"'
    return response


def _parse_query(raw: str) -> dict[str, list[str]]:
    """The parameters of a query string; raises :class:`UnicodeDecodeError`
    when percent-encoded bytes are not UTF-8 (decoded leniently, ``%ff`` and
    ``%fe`` would both be U+FFFD: one stream under two ids)."""
    return parse_qs(raw, errors="strict")


def _requested_streams(path: str, query: dict[str, list[str]]) -> list[str]:
    """The stream ids a request names: every listed one to subscribe, the first to ingest."""
    if path == _CAPTIONS:
        # Trimmed as since= is (no stream id begins or ends with white space).
        return [n for v in query.get("stream", []) for n in (x.strip() for x in v.split(","))
                if n]
    return (query.get("stream") or [])[:1]


def _respond(status: HTTPStatus, data: bytes, content_type: str) -> Response:
    # websockets closes the connection after any response but a 101: said so,
    # or an HTTP/1.1 client sends its next request down a closed connection.
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(data))),
                       ("Cache-Control", "no-cache"), ("Connection", "close")])
    return Response(status.value, status.phrase, headers, data)


def _static(path: str) -> Response | None:
    """The browser page: ``/`` and ``/static/NAME`` from the packaged web folder.

    Only names listed in that folder are served, so no path can escape it.
    """
    name = "index.html" if path == "/" else path.removeprefix("/static/")
    if path != "/" and not path.startswith("/static/"):
        return None
    files = {f.name: f for f in _WEB.iterdir() if f.is_file()} if _WEB.is_dir() else {}
    entry = files.get(name)
    if entry is None:
        return _plain(HTTPStatus.NOT_FOUND, f"no such file: {path}\n")
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    return _respond(HTTPStatus.OK, entry.read_bytes(),
                    _CONTENT_TYPES.get(suffix, "application/octet-stream"))


async def _recv_within(ws: ServerConnection, seconds: float | None) -> str | bytes:
    """``ws.recv()`` within ``seconds`` (None: no limit); TimeoutError when
    nothing came, not when a message came and this process was too busy to
    take it in time (:data:`LATE_READ_S`)."""
    # asyncio.timeout, not wait_for: wait_for runs recv() as a task of its
    # own, one task per audio message, a few % of the server's CPU at 100 streams.
    try:
        async with asyncio.timeout(seconds):
            return await ws.recv()
    except TimeoutError:
        # recv() is cancellation-safe: the message a timeout beat is still there.
        async with asyncio.timeout(LATE_READ_S):
            return await ws.recv()


async def close_dropping_input(ws: ServerConnection, code: int, reason: str) -> None:
    """Close ``ws`` with ``code`` and ``reason``, reading and dropping what
    the peer still sends meanwhile; whatever is still open
    :data:`CLOSE_TIMEOUT_S` and a second later is aborted. The caller's own
    reads of ``ws`` have ended."""
    # The peer's answer to the close comes behind what it sent since the
    # caller stopped reading (a client too slow for its events, or too fast,
    # is still sending), and websockets stops reading the socket once
    # max_queue messages wait unread: the answer went unread, and every such
    # close waited out its timeout.
    dropping = asyncio.ensure_future(_drop_input(ws))
    try:
        # The handshake's bound and a second more (CLOSE_TIMEOUT_S says why).
        await asyncio.wait_for(ws.close(code, reason), CLOSE_TIMEOUT_S + 1)
    except (TimeoutError, ConnectionClosed):
        pass
    finally:
        dropping.cancel()
        with contextlib.suppress(Exception):
            ws.transport.abort()
        await asyncio.gather(dropping, return_exceptions=True)


async def _drop_input(ws: ServerConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


def check_listen(host: str, port: int) -> None:
    """Raise :class:`ConfigError` when ``host``:``port`` cannot be listened on
    now (a port in use, an address not on this machine), as
    :meth:`CaptionServer.start` would: binds and closes a socket per address,
    as the server binds them (``SO_REUSEADDR``; IPv6 sockets IPv6 only). For
    the command line, before the model loads; port 0 always binds."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as e:
        raise _listen_error(host, port, e) from None


def _listen_error(host: str, port: int, e: OSError) -> ConfigError:
    # A second server on the same port is the usual cause: a message for
    # people, not a traceback.
    reason = os.strerror(e.errno) if isinstance(e.errno, int) and e.errno > 0 \
        else e.strerror or str(e)
    return ConfigError(f"cannot listen on {redact_host(host)}:{port}: {reason.lower()}; "
                       "change server.port (--port) or server.host")

class CaptionServer:
    """Serves the engine's events and accepts audio over WebSocket."""

    def __init__(self, engine: Engine, cfg: ServerConfig, auth: AuthConfig | None = None, *,
                 tls_poll_s: float = TLS_POLL_S) -> None:
        """``auth`` defaults to the engine's own ``[auth]`` section. ``tls_poll_s``:
        seconds between checks of the TLS files for a renewal (0: never)."""
        self._engine = engine
        self._cfg = cfg
        self._tls_poll_s = tls_poll_s
        self._certificate: ServerCertificate | None = None
        self._tls_watch: asyncio.Task[None] | None = None
        self._tokens = (auth if auth is not None else engine.config.auth).tokens
        self._policy = AccessPolicy(self._tokens, cfg.allowed_origins,
                                    loopback=is_loopback(cfg.host))
        self._slots = StreamSlots(cfg.max_streams)
        self._usage = TokenUsage()
        # What the handshake hook granted, for the handler of the same
        # connection; weak, so a handshake that fails later leaks nothing.
        self._grants: weakref.WeakKeyDictionary[ServerConnection, Grant] = \
            weakref.WeakKeyDictionary()
        self._live: dict[ServerConnection, _Access] = {}
        self.broadcaster = Broadcaster(cfg.subscriber_queue, encode_event,
                                       history=cfg.history,
                                       history_streams=cfg.history_streams,
                                       last_seq=engine.last_seq,
                                       resume_window=cfg.resume_window)
        self.metrics = Metrics(engine, self.broadcaster)
        self._server: Server | None = None
        # Per prefix ("ingest", "realtime"): the next N of an unnamed stream.
        self._unnamed_ids: dict[str, itertools.count[int]] = {}
        # Every connection from its TCP accept on, so the close can abort the
        # ones stuck in their opening handshake (see OPENING_GRACE_S).
        self._accepted: weakref.WeakSet[ServerConnection] = weakref.WeakSet()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        sock = next(iter(self._server.sockets))
        return int(sock.getsockname()[1])

    async def start(self) -> None:
        """Listen; raises :class:`ConfigError` for an unsafe bind, unusable TLS
        files, or an address it cannot listen on (a port in use, say)."""
        check_bind(self._cfg.host, self._tokens, self._cfg.allow_anonymous)
        self._certificate = ServerCertificate.open(self._cfg.tls_cert, self._cfg.tls_key)
        ssl_ctx = self._certificate.context if self._certificate is not None else None
        # Resume reaches back into the journal of finals when one is kept.
        self.broadcaster.source = self._engine.journal
        self._engine.add_listener(self.broadcaster.publish)
        self._engine.add_listener(self.metrics.on_event)
        accepted = self._accepted

        class Tracked(ServerConnection):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                accepted.add(self)

        try:
            self._server = await serve(
                self._handle, self._cfg.host, self._cfg.port,
                create_connection=Tracked,
                process_request=self._process_request,
                select_subprotocol=self._select_subprotocol,
                ssl=ssl_ctx,
                # Twice the limit, so a frame a little too large gets an error
                # event from us; beyond that websockets closes with 1009 itself.
                max_size=2 * self._cfg.max_message_bytes,
                ping_interval=self._cfg.ping_interval_s or None,
                ping_timeout=self._cfg.ping_timeout_s or None,
                close_timeout=CLOSE_TIMEOUT_S,
            )
        except BaseException as e:
            self._engine.remove_listener(self.broadcaster.publish)
            self._engine.remove_listener(self.metrics.on_event)
            if isinstance(e, OSError):
                raise _listen_error(self._cfg.host, self._cfg.port, e) from e
            raise
        if self._certificate is not None and self._tls_poll_s > 0:
            self._tls_watch = asyncio.create_task(self._watch_certificate(self._certificate),
                                                  name="tls-reload")
        ws, http = ("wss", "https") if ssl_ctx else ("ws", "http")
        log.info("serving on %s://%s:%d (%s, %s, %s) and %s://%s:%d/%s", ws, self._cfg.host,
                 self.port, _CAPTIONS, _INGEST, _REALTIME, http, self._cfg.host, self.port,
                 " (tokens required)" if self._policy.enabled else "")

    async def aclose(self) -> None:
        watch, self._tls_watch = self._tls_watch, None
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        if self._server is not None:
            # What the engine's drain published is still queued for slow
            # subscribers and realtime sessions (their outboxes); closing now
            # would drop it (and stream.ended, a session's last completed).
            # Bounded (server.shutdown_flush_s): a stalled one must not hold
            # the shutdown past a container's stop grace.
            flush_s = self._cfg.shutdown_flush_s
            behind = await self.broadcaster.flush(flush_s)
            if behind:
                log.warning("closing: %d subscriber(s) or realtime session(s) had not read "
                            "their last events after %g s (server.shutdown_flush_s); "
                            "closed without them", behind, flush_s)
            self._server.close()
            aborters = [asyncio.create_task(self._abort_opening(OPENING_GRACE_S)),
                        asyncio.create_task(self._abort_unclosed(CLOSE_TIMEOUT_S + 1))]
            try:
                await self._server.wait_closed()
            finally:
                for aborter in aborters:
                    aborter.cancel()
            self._engine.remove_listener(self.broadcaster.publish)
            self._engine.remove_listener(self.metrics.on_event)
            self._server = None

    async def _abort_opening(self, grace_s: float) -> None:
        """After ``grace_s``, abort the connections still in their opening handshake."""
        await asyncio.sleep(grace_s)
        opening = [c for c in self._accepted if c.protocol.state is State.CONNECTING]
        if opening:
            log.info("closing: %d connection(s) that did not finish their handshake "
                     "aborted", len(opening))
        for conn in opening:
            conn.transport.abort()

    async def _abort_unclosed(self, grace_s: float) -> None:
        """After ``grace_s``, abort the connections whose close has not ended."""
        await asyncio.sleep(grace_s)
        stuck = [c for c in self._accepted if c.protocol.state is not State.CLOSED]
        if stuck:
            log.warning("closing: %d connection(s) that did not read their close "
                        "aborted", len(stuck))
        for conn in stuck:
            conn.transport.abort()

    async def reload_auth(self, auth: AuthConfig) -> int:
        """Use ``auth``'s tokens from now on, for new connections and live ones.

        A live connection whose token the new tokens no longer accept (removed,
        or without the role or stream it uses; with tokens added to an open
        server, any) gets error ``token_revoked`` and close 1008: an ingest
        stream is flushed as on any close, so its finals are kept. A token
        kept (same hash) keeps its connections; its new limits apply to new
        ones. Returns how many connections were closed. Raises
        :class:`ConfigError` (changing nothing) when the tokens would leave a
        non-loopback bind open (see :func:`check_bind`).
        """
        check_bind(self._cfg.host, auth.tokens, self._cfg.allow_anonymous)
        self._tokens = auth.tokens
        self._policy = policy = AccessPolicy(auth.tokens, self._cfg.allowed_origins,
                                             loopback=is_loopback(self._cfg.host))
        refusals: list[Coroutine[Any, Any, None]] = []
        for ws, access in list(self._live.items()):
            decision = policy.recheck(access.token, access.role, access.streams)
            if isinstance(decision, Grant):
                access.token = decision.token
                continue
            message = f"no longer accepted: {decision.message}"
            log.info("closing %s from %s at the [auth] reload: %s", access.path,
                     ws.remote_address, message)
            if access.path == _REALTIME:
                from .realtime import refuse_realtime
                refusals.append(refuse_realtime(ws, "token_revoked", message))
            else:
                refusals.append(self._refuse(ws, "token_revoked", message,
                                             stream=access.streams[0] if access.path == _INGEST
                                             and access.streams else None))
        await asyncio.gather(*refusals)
        return len(refusals)

    async def _watch_certificate(self, certificate: ServerCertificate) -> None:
        """Poll the TLS files until cancelled (see :meth:`ServerCertificate.poll`)."""
        while True:
            await asyncio.sleep(self._tls_poll_s)
            try:
                # On the loop's thread, on purpose: handshakes run on this
                # thread, so the certificate never changes in the middle of one.
                certificate.poll()
            except Exception:
                # A bug here must not end reloading for the server's lifetime.
                log.exception("checking the server TLS files for a renewal failed")

    async def __aenter__(self) -> CaptionServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        websocket = path in _ROLES and path != "/metrics"
        if not websocket and request.method not in ("GET", "HEAD"):
            # (websockets itself answers a WebSocket path's other methods.)
            refused = _plain(HTTPStatus.METHOD_NOT_ALLOWED,
                             f"{request.method} is not allowed here: use GET\n")
            refused.headers["Allow"] = "GET, HEAD"
            return refused
        response = self._route(conn, request, path)
        if response is not None and request.method == "HEAD":
            # What a GET gets, its Content-Length too, without the body.
            response.body = b""
        return response

    def _route(self, conn: ServerConnection, request: Request, path: str) -> Response | None:
        if path == "/healthz":
            why = self.metrics.unhealthy_reason()
            if why is None:
                return _plain(HTTPStatus.OK, "ok\n")
            return _plain(HTTPStatus.SERVICE_UNAVAILABLE, f"{why}\n")
        if path == "/readyz":
            if self.metrics.ready():
                return _plain(HTTPStatus.OK, "ready\n")
            return _plain(HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n")
        if path not in _ROLES:
            page = _static(path)
            return page if page is not None else _plain(HTTPStatus.NOT_FOUND,
                                                        f"no such path: {path}\n")
        try:
            query = _parse_query(urlsplit(request.path).query)
        except UnicodeDecodeError:
            return _plain(HTTPStatus.BAD_REQUEST, "the query is not UTF-8 once "
                          "percent-decoded: encode each character's UTF-8 bytes\n")
        if path == "/metrics":
            # With tokens configured, metrics are for admins only.
            if self._policy.enabled:
                denied = self._authorize(conn, request, path, query)
                if denied is not None:
                    return denied
            return _respond(HTTPStatus.OK, self.metrics.render(), CONTENT_TYPE_LATEST)
        return self._authorize(conn, request, path, query)

    def _authorize(self, conn: ServerConnection, request: Request, path: str,
                   query: dict[str, list[str]]) -> Response | None:
        offered = [p.strip() for v in request.headers.get_all("Sec-WebSocket-Protocol")
                   for p in v.split(",")]
        single: dict[str, str | None] = {}
        for name in ("Authorization", "Origin", "Host", "Evoxtral-Origin"):
            values = request.headers.get_all(name)
            if len(values) > 1:
                # Which one counts is anyone's guess: the client's mistake.
                return _plain(HTTPStatus.BAD_REQUEST, f"more than one {name} header\n")
            single[name] = values[0] if values else None
        credentials = find_credentials(single["Authorization"], offered,
                                       query.get("token", []), openai_key=path == _REALTIME)
        decision = self._policy.authorize(
            # /metrics reports on every stream, whatever ?stream= names.
            _ROLES[path], None if path == "/metrics" else _requested_streams(path, query),
            credentials,
            # The page's plain GET asking why its socket failed carries no
            # Origin (same-origin); it names its origin instead. A client can
            # only be refused by naming one, never let in.
            origin=single["Origin"] or single["Evoxtral-Origin"], host=single["Host"])
        if isinstance(decision, Refusal):
            log.info("refused %s from %s: %d %s", path, conn.remote_address,
                     decision.status, decision.message)
            return _refusal(decision)
        self._grants[conn] = decision
        return None

    def _select_subprotocol(self, conn: ServerConnection,
                            offered: Sequence[Subprotocol]) -> Subprotocol | None:
        # A browser that offered its token as a subprotocol fails the
        # connection unless the response selects one of those it offered.
        token = next((p for p in offered if p.startswith(SUBPROTOCOL_PREFIX)), None)
        if token is not None:
            return token
        # OpenAI's browser clients offer "realtime" (and their API key as
        # "openai-insecure-api-key.KEY"), and OpenAI selects it: so does
        # the path that speaks its protocol.
        path = urlsplit(conn.request.path).path if conn.request else ""
        if path == _REALTIME and "realtime" in offered:
            return Subprotocol("realtime")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        url = urlsplit(ws.request.path if ws.request else "")
        # UTF-8: the handshake hook refused any other query (_route).
        query = _parse_query(url.query)
        grant = self._grants.pop(ws, Grant(None))
        self._live[ws] = _Access(url.path, _ROLES.get(url.path, "subscribe"),
                                 tuple(_requested_streams(url.path, query)), grant.token)
        try:
            if url.path == _INGEST:
                await self._ingest(ws, query, grant)
            elif url.path == _REALTIME:
                await self._realtime(ws, query, grant)
            else:
                await self._subscribe(ws, query, grant)
        except ConnectionClosed:
            pass
        finally:
            del self._live[ws]

    async def _realtime(self, ws: ServerConnection, query: dict[str, list[str]],
                        grant: Grant) -> None:
        from .realtime import refuse_realtime, serve_realtime

        # serve_realtime opens its stream without awaiting anything before it,
        # so a check (no reservation) is enough against the server's cap.
        if self._slots.check(self._engine.streams) is not None:
            await refuse_realtime(ws, "too_many_streams", self._too_many_streams(None))
            return
        named = _requested_streams(_REALTIME, query)
        if named and self._slots.reserved(named[0]):
            await refuse_realtime(ws, "stream_busy", f"stream {named[0]!r} is already open")
            return
        if not self._usage.acquire(grant.token, "streams"):
            await refuse_realtime(ws, "too_many_streams", self._too_many_streams(grant))
            return
        if not query.get("stream"):
            query = {**query, "stream": [self._unnamed_stream_id("realtime")]}
            self._uses_stream(ws, query["stream"][0])
        try:
            await serve_realtime(ws, query, self._engine, self.broadcaster, self._cfg)
        finally:
            self._usage.release(grant.token, "streams")

    def _uses_stream(self, ws: ServerConnection, stream_id: str) -> None:
        """``ws`` streams as ``stream_id``, a name the server may have picked:
        what an [auth] reload checks the connection's token against."""
        access = self._live.get(ws)
        if access is not None:
            access.streams = (stream_id,)

    def _too_many_streams(self, grant: Grant | None) -> str:
        if grant is not None and grant.token is not None:
            return (f"token {grant.token.name or '(unnamed)'} already has "
                    f"{grant.token.max_streams} streams open (its max_streams)")
        return f"the server already has {self._cfg.max_streams} streams open (server.max_streams)"

    async def _refuse(self, ws: ServerConnection, code: str, message: str,
                      close_code: int = CLOSE_POLICY, stream: str | None = None) -> None:
        with contextlib.suppress(ConnectionClosed):
            await ws.send(encode_error(code, message, stream))
            await ws.close(close_code, code)

    # --- /v1/captions --------------------------------------------------------

    async def _subscribe(self, ws: ServerConnection, query: dict[str, list[str]],
                         grant: Grant) -> None:
        names = _requested_streams(_CAPTIONS, query)
        try:
            since = parse_since(query.get("since", []), names)
            epoch = parse_epoch(query.get("epoch", []))
            # No stream is ever opened under such an id (the engine refuses
            # it): the subscriber would wait for it in silence.
            for where, ids in (("?stream=", names), ("since", since)):
                for name in ids:
                    if (problem := stream_id_problem(name)) is not None:
                        raise ProtocolError(
                            "bad_query", f"{where} names an id no stream can have: {problem}")
        except ProtocolError as e:
            await self._refuse(ws, e.code, str(e))
            return
        if not self._usage.acquire(grant.token, "subscribers"):
            assert grant.token is not None
            await self._refuse(ws, "too_many_subscribers",
                               f"token {grant.token.name or '(unnamed)'} already has "
                               f"{grant.token.max_subscribers} subscribers (its max_subscribers)")
            return
        engine = self._engine
        default = engine.config.model.language
        # Only the streams asked for: a token limited to some streams does not
        # learn the names of the others. As of the subscription (made without
        # a pause in between), whose events then tell what changes.
        open_now = sorted(s for s in engine.streams if not names or s in names)
        hello = encode_hello(engine.backend.name, open_now, _CAPABILITIES,
                             [default, *(code for code in engine.languages if code != default)],
                             engine.adapter_names, epoch=engine.epoch)
        try:
            # A resume reads the journal here, off the loop.
            sub = await self.broadcaster.resume(
                names or None, since, renumbered=epoch is not None and epoch != engine.epoch)
        except BaseException:
            # The place is given back below only for a subscription that started.
            self._usage.release(grant.token, "subscribers")
            raise
        try:
            await ws.send(hello)
            await self._relay(ws, sub, self._ignore_incoming(ws))
        finally:
            self.broadcaster.unsubscribe(sub)
            self._usage.release(grant.token, "subscribers")

    async def _ignore_incoming(self, ws: ServerConnection) -> None:
        # Subscribers have nothing to say; reading keeps pings and the close
        # handshake flowing and tells us when the peer goes away.
        async for message in ws:
            await ws.send(encode_error("unexpected_message",
                                       f"{_CAPTIONS} takes no messages, got {shown(message)}"))

    async def _pump(self, ws: ServerConnection, sub: Subscription) -> None:
        for message in sub.backlog:
            await ws.send(message)
        sub.backlog = []
        if sub.cut:
            # Its resume window overflowed: the live events after it were
            # not kept, so it resumes from what it got.
            sub.overflowed.set()
            return
        while True:
            message = await sub.queue.get()
            await ws.send(message)
            sub.queue.task_done()

    async def _relay(self, ws: ServerConnection, sub: Subscription,
                     reader: Coroutine[Any, Any, None]) -> None:
        """Send the subscription until the peer leaves, the reader ends, or overflow."""
        tasks: set[asyncio.Future[Any]] = {
            asyncio.ensure_future(self._pump(ws, sub)),
            asyncio.ensure_future(sub.overflowed.wait()),
            asyncio.ensure_future(reader),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if sub.overflowed.is_set():
            await self._close_slow(ws, sub.close_reason)
            return
        for t in done:
            exc = None if t.cancelled() else t.exception()
            if exc is not None and not isinstance(exc, ConnectionClosed):
                log.error("subscriber relay failed: %r", exc)

    async def _close_slow(self, ws: ServerConnection,
                          reason: str = "subscriber too slow") -> None:
        log.warning("closing slow subscriber %s (%s)", ws.remote_address, reason)
        await close_dropping_input(ws, CLOSE_TOO_SLOW, reason)

    # --- /v1/ingest ----------------------------------------------------------

    def _unnamed_stream_id(self, prefix: str) -> str:
        """``PREFIX-N`` for a client that names no stream: the next N whose id
        is not open, not being opened and never numbered (in this run or in
        the journal), so the client's captions never continue another
        stream's (a client that named its stream ``ingest-1``, or the
        unnamed streams of a run before a restart)."""
        engine = self._engine
        ids = self._unnamed_ids.setdefault(prefix, itertools.count(1))
        while True:
            name = f"{prefix}-{next(ids)}"
            if not (name in engine.streams or self._slots.reserved(name)
                    or engine.last_seq(name)):
                return name

    async def _ingest(self, ws: ServerConnection, query: dict[str, list[str]],
                      grant: Grant) -> None:
        stream_id = (query.get("stream") or [self._unnamed_stream_id("ingest")])[0]
        self._uses_stream(ws, stream_id)
        problem = stream_id_problem(stream_id)
        if problem is not None:
            await self._refuse(ws, "bad_query", problem)
            return
        # The slot is taken before the config message is awaited, so neither a
        # second connection for the same id nor one past the cap slips in.
        code = self._slots.reserve(stream_id, self._engine.streams)
        if code == "stream_busy":
            await self._refuse(ws, "stream_busy", f"stream {stream_id!r} is already open",
                               stream=stream_id)
            return
        if code is not None:
            await self._refuse(ws, code, self._too_many_streams(None), stream=stream_id)
            return
        if not self._usage.acquire(grant.token, "streams"):
            self._slots.release(stream_id)
            await self._refuse(ws, "too_many_streams", self._too_many_streams(grant),
                               stream=stream_id)
            return
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._usage.release(grant.token, "streams")
                self._slots.release(stream_id)

        try:
            await self._open_ingest(ws, stream_id, release)
        finally:
            release()

    async def _open_ingest(self, ws: ServerConnection, stream_id: str,
                           release: Callable[[], None]) -> None:
        try:
            first = await asyncio.wait_for(ws.recv(), self._cfg.handshake_timeout_s)
        except TimeoutError:
            await self._refuse(ws, "handshake_timeout",
                               f"no config message within {self._cfg.handshake_timeout_s} s")
            return
        if isinstance(first, bytes):
            await self._refuse(ws, "not_configured",
                               "send a config message before any binary audio")
            return
        try:
            fmt = parse_ingest_message(first)
        except ProtocolError as e:
            await self._refuse(ws, e.code, str(e))
            return
        if isinstance(fmt, EndOfStream | LostAudio):
            kind = "end" if isinstance(fmt, EndOfStream) else "lost"
            await self._refuse(ws, "not_configured", f"{kind} before any config message")
            return
        # Subscribe first, so this connection also gets its own stream.started.
        sub = self.broadcaster.subscribe([stream_id])
        try:
            stream = self._engine.open_stream(stream_id, source="ingest", adapter=fmt.adapter,
                                              language=fmt.language)
        except EngineStopping as e:
            self.broadcaster.unsubscribe(sub)
            await self._refuse(ws, "shutting_down", str(e), close_code=1001,
                               stream=stream_id)
            return
        except ValueError as e:
            self.broadcaster.unsubscribe(sub)
            await self._refuse(ws, "bad_config", str(e), stream=stream_id)
            return
        await self._run_ingest(ws, stream, sub, fmt, release)

    async def _run_ingest(self, ws: ServerConnection, stream: Stream, sub: Subscription,
                          fmt: IngestFormat, release: Callable[[], None]) -> None:
        """Caption the connection's audio as ``stream``; ``release`` frees the
        stream's slot once the stream is closed."""
        stream_id = stream.id
        resampler = StreamResampler(fmt.sample_rate, SAMPLE_RATE, fmt.channels)
        outcome: _Outcome = "closed"
        with contextlib.suppress(ConnectionClosed):
            # ingest.ready goes out before the pump starts, so it comes first.
            await ws.send(encode_message(
                "ingest.ready", stream=stream_id, sample_rate=fmt.sample_rate,
                channels=fmt.channels, format=fmt.sample_format.value,
                language=stream.language or self._engine.config.model.language,
                progress=fmt.progress, epoch=self._engine.epoch))
        pump = asyncio.ensure_future(self._pump(ws, sub))
        overflow = asyncio.ensure_future(sub.overflowed.wait())

        def push(samples: Int16Array) -> None:
            # The engine's shutdown closes the stream while the peer may still
            # be sending: audio after that has nowhere to go.
            if not stream.closed:
                stream.push(samples)

        reading = asyncio.ensure_future(self._read_audio(ws, stream_id, fmt, resampler, push))
        try:
            # A connection too slow for its own events is closed as any slow
            # subscriber is, at once; its audio so far still becomes finals.
            await asyncio.wait({reading, overflow}, return_when=asyncio.FIRST_COMPLETED)
            if reading.done():
                outcome = reading.result()
        except ConnectionClosed:
            pass
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            # Whatever happened, the audio received so far becomes finals.
            tail = resampler.flush()
            if len(tail):
                push(tail)
            summary = await stream.close()
        too_slow = False
        try:
            if sub.overflowed.is_set():
                return  # its queue will not drain: closed below
            # Wait for the pump to deliver the flushed finals, but not once it
            # has died (the peer is gone, so the queue would never drain).
            joined = asyncio.ensure_future(sub.queue.join())
            await asyncio.wait({joined, pump}, timeout=_FINALS_SENT_S,
                               return_when=asyncio.FIRST_COMPLETED)
            drained = joined.done()
            joined.cancel()
            if not drained:
                # Alive but not reading its own finals: closed as too slow
                # (1013), not as a normal end (1000) without them and the summary.
                too_slow = not pump.done()
                if too_slow:
                    self.broadcaster.drop_subscriber(sub)
                return
            # The id is free from here, not before: a stream opened under it
            # while this connection still took its events would have reached
            # this subscription. Before the summary: a client may reconnect
            # with the id as soon as it has that, before this close handshake ends.
            self.broadcaster.unsubscribe(sub)
            release()
            if outcome == "end" and not sub.overflowed.is_set():
                await ws.send(encode_message(
                    "ingest.summary", stream=stream_id, duration=round(summary.duration_s, 3),
                    segments=summary.segments, finals=summary.finals,
                    partials=summary.partials, errors=summary.errors,
                    lost=round(resampler.silence / SAMPLE_RATE, 3)))
                await ws.close(1000, "end of stream")
            elif outcome == "idle" and not sub.overflowed.is_set():
                # After the flush, so the client got the finals of what it sent.
                await self._refuse(ws, "idle_timeout",
                                   f"no audio for {self._cfg.idle_timeout_s} s "
                                   "(server.idle_timeout_s)", stream=stream_id)
        except (ConnectionClosed, TimeoutError):
            pass
        finally:
            pump.cancel()
            overflow.cancel()
            await asyncio.gather(pump, overflow, return_exceptions=True)
            self.broadcaster.unsubscribe(sub)
            release()  # unsubscribed: nothing of a later stream can reach it
            if sub.overflowed.is_set() or too_slow:
                await self._close_slow(ws)

    async def _read_audio(self, ws: ServerConnection, stream_id: str, fmt: IngestFormat,
                          resampler: StreamResampler,
                          push: Callable[[Int16Array], None]) -> _Outcome:
        """Feed binary messages (and silence for ``lost`` ones) to the stream
        until ``end`` (``"end"``), a close or fatal error (``"closed"``), or
        ``server.idle_timeout_s`` without audio (``"idle"``). With
        ``fmt.progress``, acknowledge the audio handed to the stream
        (``ingest.progress``)."""
        limit = self._cfg.max_message_bytes
        loop = asyncio.get_running_loop()
        idle = self._cfg.idle_timeout_s
        speed = self._cfg.max_ingest_speed
        rate = IngestRate(speed, self._cfg.ingest_burst_s, loop.time())
        # Silence costs the model nothing, but lost audio must not feed the
        # segmenter without bound: a bucket of its own, so one outage of up to
        # MAX_LOST_S (a client reconnected after a server restart) fits at once.
        lost_rate = IngestRate(speed, MAX_LOST_S, loop.time())
        bytes_per_s = fmt.sample_rate * fmt.frame_bytes
        progress = IngestProgress(fmt.sample_rate) if fmt.progress else None
        last_audio = loop.time()
        overdue: float | None = None  # when this loop first found the deadline passed
        while True:
            wait = max(0.0, last_audio + idle - loop.time()) if idle else None
            if wait == 0:
                overdue = loop.time() if overdue is None else overdue
                if loop.time() - overdue > OVERDUE_READ_S:
                    return "idle"
            try:
                # recv() is cancellation-safe: a timeout loses no message.
                message = await _recv_within(ws, wait)
            except TimeoutError:
                return "idle"
            except ConnectionClosedOK:
                return "closed"
            try:
                if isinstance(message, bytes):
                    if not message:
                        continue  # no audio: not activity for the idle timeout
                    if len(message) > limit:
                        raise ProtocolError("too_large",
                                            f"binary message of {len(message)} bytes exceeds "
                                            f"server.max_message_bytes ({limit})")
                    last_audio, overdue = loop.time(), None
                    if not rate.take(len(message) / bytes_per_s, last_audio):
                        raise ProtocolError("too_fast", rate.refusal)
                    frames = decode_audio_frame(message, fmt)
                    samples = resampler.process(frames)
                    if len(samples):
                        push(samples)
                    # Counted once handed on, and sent before the next read:
                    # when this loop falls behind, so do the acknowledgements,
                    # and a client bounding its audio in flight on them waits.
                    if progress is not None and (report := progress.add(len(frames))):
                        await ws.send(report)
                    continue
                parsed = parse_ingest_message(message, fmt.sample_rate)
                if isinstance(parsed, EndOfStream):
                    if progress is not None and (report := progress.flush()):
                        await ws.send(report)
                    return "end"
                if isinstance(parsed, LostAudio):
                    if not lost_rate.take(parsed.samples / fmt.sample_rate, loop.time()):
                        raise ProtocolError(
                            "too_fast", f"lost audio is declared faster than {speed:g}x real "
                            f"time once the first {MAX_LOST_S} s are used up "
                            "(server.max_ingest_speed)")
                    await self._fill_lost(resampler, parsed.samples, push)
                    continue
                raise ProtocolError("bad_message", "config may be sent only once")
            except ProtocolError as e:
                await ws.send(encode_error(e.code, str(e), stream_id))
                if e.code in _FATAL_INGEST:
                    close = CLOSE_TOO_BIG if e.code == "too_large" else CLOSE_POLICY
                    # A client too fast, or sending too much, is still
                    # sending: its answer to the close must not wait behind that.
                    await close_dropping_input(ws, close, e.code)
                    return "closed"

    @staticmethod
    async def _fill_lost(resampler: StreamResampler, frames: int,
                         push: Callable[[Int16Array], None]) -> None:
        """Put silence for ``frames`` lost input frames in the stream's timeline.

        Through the resampler's count, so the silence is exactly what keeps the
        later audio at its time at any input rate; in 100 ms pieces, never one
        large array, yielding to the loop every second of it.
        """
        tail, silence = resampler.gap(frames)
        if len(tail):
            push(tail)
        for i, piece in enumerate(silence_pieces(silence), 1):
            push(piece)
            if i % SILENCE_PIECES_PER_TURN == 0:
                await asyncio.sleep(0)
