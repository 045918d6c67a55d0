"""The asyncio adapter of ``/v1/realtime``: one connection, one engine stream.

:func:`serve_realtime` opens one engine stream per connection, pushes what
the core (:class:`~.core.RealtimeTranscription`) asks for, feeds the
stream's engine events back to the core and sends the core's events, each
connection behind its own bounded queue (``server.subscriber_queue``; a
client that falls that far behind is closed at once with 1013), which the
server's shutdown flush waits for as for a subscriber's (an outbox of the
:class:`~evoxtral_stream.server.broadcast.Broadcaster`). Audio the
client appends faster than ``server.max_ingest_speed`` allows (after
``server.ingest_burst_s``) ends the session with ``too_fast`` and 1008, as
on ``/v1/ingest``: the model's work and the audio it holds stay bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ...config import ServerConfig
from ...engine.engine import Engine, EngineStopping, Stream
from ...events import SAMPLE_RATE, EngineEvent, stream_id_problem
from .. import app
from ..auth import IngestRate
from ..broadcast import Broadcaster
from .core import RealtimeTranscription
from .protocol import (
    CutSegment,
    Output,
    PushAudio,
    RealtimeError,
    SetLanguage,
    encode_server_event,
)

__all__ = [
    "refuse_realtime",
    "serve_realtime",
]

log = logging.getLogger(__name__)

_CLOSE_POLICY = 1008
_CLOSE_INTERNAL = 1011
_CLOSE_TOO_SLOW = 1013




class _StreamGone(Exception):
    """The engine stream was closed under us (engine shutting down)."""


class _Connection:
    def __init__(self, ws: ServerConnection, engine: Engine, core: RealtimeTranscription,
                 stream: Stream, cfg: ServerConfig, broadcaster: Broadcaster) -> None:
        self._ws = ws
        self._engine = engine
        self._core = core
        self._stream = stream
        self._queue: asyncio.Queue[str] = asyncio.Queue(cfg.subscriber_queue)
        self._broadcaster = broadcaster
        self._speed = cfg.max_ingest_speed
        self._burst_s = cfg.ingest_burst_s
        self._overflow = asyncio.Event()
        self._failed = asyncio.Event()
        self._failure = ""
        self._refusal: RealtimeError | None = None
        self._diverged = False

    async def run(self) -> None:
        self._engine.add_listener(self._on_engine_event)
        tasks: set[asyncio.Future[Any]] = set()
        # The finals the engine's drain gives this session reach the client
        # before the server's shutdown closes it (within its flush).
        self._broadcaster.add_outbox(self._queue)
        try:
            self._deliver(self._core.start())
            tasks = {asyncio.ensure_future(self._send_loop()),
                     asyncio.ensure_future(self._read_loop()),
                     asyncio.ensure_future(self._overflow.wait()),
                     asyncio.ensure_future(self._failed.wait())}
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Nothing is sent from here on: no flush is to wait for it.
            self._broadcaster.remove_outbox(self._queue)
            with contextlib.suppress(ValueError):
                self._engine.remove_listener(self._on_engine_event)
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, Exception) and not isinstance(r, ConnectionClosed):
                    log.error("realtime connection %s failed: %r", self._stream.id, r)
            # Uncommitted audio of an open segment still becomes a final for
            # the stream's other subscribers, the resampler's tail included.
            for out in self._core.end():
                if isinstance(out, PushAudio) and not self._stream.closed:
                    self._stream.push(out.samples)
            await self._stream.close()
        if self._overflow.is_set():
            await self._close(_CLOSE_TOO_SLOW, "client too slow")
        elif self._refusal is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(encode_server_event(self._refusal))
            await self._close(_CLOSE_POLICY, self._refusal.code)
        elif self._failed.is_set():
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(encode_server_event(self._core.error(
                    "server_error", self._failure, error_type="server_error")))
            await self._close(_CLOSE_INTERNAL, "server error")

    async def _close(self, code: int, reason: str) -> None:
        # A client too slow or too fast is still sending: what comes is read
        # and dropped, so its answer to the close is not left unread.
        await app.close_dropping_input(self._ws, code, reason)

    async def _send_loop(self) -> None:
        while True:
            message = await self._queue.get()
            try:
                await self._ws.send(message)
            finally:
                self._queue.task_done()  # join() in _read_loop: "all sent"

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        rate = IngestRate(self._speed, self._burst_s, loop.time())
        async for message in self._ws:
            received = self._core.received_samples
            try:
                if self._stream.closed:
                    # Not for the core: its segmenter would take audio the
                    # stream cannot, and end a turn (a committed owed) that
                    # the stream ended where its audio stopped.
                    raise _StreamGone("closed")
                self._deliver(self._core.receive(message))
            except _StreamGone:
                # Closed under the session (the server's drain): the finals it
                # still owes come first (an open turn is committed and
                # completed, as the docs promise a client that keeps sending),
                # then the error.
                await self._stream.close()
                await self._queue.join()
                self._fail("the engine stream of this session was closed (server shutting "
                           "down?)")
                return
            audio_s = (self._core.received_samples - received) / SAMPLE_RATE
            if audio_s and not rate.take(audio_s, loop.time()):
                log.warning("realtime stream %s: audio faster than %gx real time; closing",
                            self._stream.id, self._speed)
                self._refusal = self._core.error("too_fast", rate.refusal, "audio")
                return

    def _fail(self, message: str) -> None:
        self._failure = message
        self._failed.set()

    def _on_engine_event(self, ev: EngineEvent) -> None:
        if ev.stream != self._stream.id:
            return
        try:
            self._deliver(self._core.on_engine_event(ev))
        except Exception:
            log.exception("realtime session %s failed on %r", self._stream.id, ev)
            self._fail("internal error while translating engine events; see the server log")

    def _deliver(self, outputs: list[Output]) -> None:
        pushed = False
        for out in outputs:
            if isinstance(out, PushAudio | CutSegment):
                try:
                    if isinstance(out, PushAudio):
                        self._stream.push(out.samples)
                    else:
                        self._stream.cut(keep_candidate=out.keep_candidate)
                except RuntimeError as e:
                    raise _StreamGone(str(e)) from e
                pushed = True
                continue
            if isinstance(out, SetLanguage):
                # The core allows only what the engine listed: this cannot fail.
                self._stream.set_language(out.language)
                continue
            if self._overflow.is_set():
                continue  # closing: its events are dropped, the stream's audio is not
            try:
                self._queue.put_nowait(encode_server_event(out))
            except asyncio.QueueFull:
                log.warning("realtime client %s too slow; closing", self._ws.remote_address)
                self._overflow.set()
                self._broadcaster.drop_outbox(self._queue)  # it will not drain
        if pushed and not self._diverged:
            opened = self._stream.session.stats().segments
            if opened != self._core.segments_opened:
                self._diverged = True
                log.warning("stream %s: engine opened %d segments, realtime mirror %d; "
                            "item boundaries may be off", self._stream.id, opened,
                            self._core.segments_opened)


async def serve_realtime(ws: ServerConnection, query: dict[str, list[str]], engine: Engine,
                         broadcaster: Broadcaster, cfg: ServerConfig) -> None:
    """Serve one ``/v1/realtime`` connection until the client leaves.

    The session's events come from its own engine listener (this path needs
    typed engine events), not from ``broadcaster``, which holds its send
    queue as an outbox for the server's shutdown flush. The stream is named by
    ``?stream=ID`` (the server fills in ``realtime-N`` for a client that
    names none) and is visible to ``/v1/captions``.
    """
    core = RealtimeTranscription(engine.config.vad, model=engine.backend.name,
                                 language=engine.config.model.language,
                                 languages=engine.languages,
                                 prefix=secrets.token_hex(4) + "_",
                                 max_message_bytes=cfg.max_message_bytes)
    intent = query.get("intent", [])
    if intent != ["transcription"]:
        await _refuse(ws, core.error(
            "unsupported_intent", "only transcription sessions are served here: connect "
            "with ?intent=transcription", "intent"))
        return
    stream_id = (query.get("stream") or [""])[0]
    problem = stream_id_problem(stream_id)
    if problem is not None:
        await _refuse(ws, core.error("invalid_value", problem, "stream"))
        return
    if stream_id in engine.streams:
        await _refuse(ws, core.error("stream_busy", f"stream {stream_id!r} is already open",
                                     "stream"))
        return
    try:
        stream = engine.open_stream(stream_id, source="realtime")
    except EngineStopping as e:
        await _refuse(ws, core.error("shutting_down", str(e), error_type="server_error"))
        return
    log.info("realtime transcription session %s on stream %s", core.session_id, stream_id)
    await _Connection(ws, engine, core, stream, cfg, broadcaster).run()


async def refuse_realtime(ws: ServerConnection, code: str, message: str) -> None:
    """Refuse a connection the server's limits turn away, in this path's error format.

    Sends one Realtime ``error`` event and closes with 1008; no session is made.
    """
    await _refuse(ws, RealtimeError(f"event_{secrets.token_hex(4)}_0", code, message))


async def _refuse(ws: ServerConnection, error: RealtimeError) -> None:
    with contextlib.suppress(ConnectionClosed):
        await ws.send(encode_server_event(error))
        await ws.close(_CLOSE_POLICY, error.code)
