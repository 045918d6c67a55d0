"""Network helpers for tests: plain HTTP GETs, free ports, a TCP relay that
can cut its connections or filter what clients send (or stall it), a
reverse proxy's path prefix, a WebSocket client that never reads, or reads
slowly."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any, Self

import numpy as np


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: for a server that must come back on
    the same port after a restart (port 0 would give it another)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """``(status, body)`` of a GET, error statuses included; runs off the loop."""
    def fetch() -> tuple[int, str]:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=5) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode()
    return await asyncio.to_thread(fetch)


def raw_ws_handshake(port: int, path: str = "/v1/captions") -> socket.socket:
    """A WebSocket client (a blocking socket with a small receive buffer)
    that completes the handshake and then never reads."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    return s


def read_slowly(sock: socket.socket, delay_s: float) -> tuple[list[dict[str, Any]], int | None]:
    """A client reading ``sock`` 4 KiB every ``delay_s`` until the server's
    close frame, which it answers; its text messages and the close code."""
    messages, frame = read_slowly_to_close(sock, delay_s)
    return messages, None if frame is None else frame[0]


def read_slowly_to_close(sock: socket.socket, delay_s: float
                         ) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
    """:func:`read_slowly`, giving the close frame's code and reason."""
    data, i = b"", 0
    messages: list[dict[str, Any]] = []
    sock.settimeout(10)
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return messages, None
        data += chunk
        while i + 2 <= len(data):
            opcode, n, at = data[i] & 0x0F, data[i + 1] & 0x7F, i + 2
            if n >= 126:
                width = 2 if n == 126 else 8
                if at + width > len(data):
                    break
                n, at = int.from_bytes(data[at:at + width], "big"), at + width
            if at + n > len(data):
                break
            payload, i = data[at:at + n], at + n
            if opcode == 0x8:
                sock.sendall(bytes([0x88, 0x80, 0, 0, 0, 0]))  # an empty close, masked
                sock.close()
                return messages, (int.from_bytes(payload[:2], "big"),
                                  payload[2:].decode(errors="replace"))
            messages.append(json.loads(payload))
        time.sleep(delay_s)


async def answer_close(sock: socket.socket, server_holds: Callable[[], bool],
                       within_s: float) -> int | None:
    """Read ``sock`` to the server's close frame and answer it
    (:func:`read_slowly`, no delay), then wait up to ``within_s`` (else
    TimeoutError) until ``server_holds()`` is false, the server done with the
    connection; the close code."""
    _, code = await asyncio.to_thread(read_slowly, sock, 0)
    async with asyncio.timeout(within_s):
        while server_holds():
            await asyncio.sleep(0.01)
    return code


async def close_while_reading(aclose: Callable[[], Awaitable[None]], sock: socket.socket,
                              read_delay_s: float | None
                              ) -> tuple[list[dict[str, Any]], int | None, float]:
    """Run ``aclose`` (a server's shutdown) while the client on ``sock``
    reads slowly (:func:`read_slowly`, every ``read_delay_s``) or, with
    None, not at all until it is over (then what is left is drained): the
    messages read, the close code (None unread) and the seconds the close
    took."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    closing = asyncio.ensure_future(aclose())
    got: list[dict[str, Any]] = []
    code = None
    if read_delay_s is not None:
        got, code = await asyncio.to_thread(read_slowly, sock, read_delay_s)
    await asyncio.wait_for(closing, 30)
    took = loop.time() - t0
    if read_delay_s is None:
        # Stalled: the server gave up on it and closed the connection.
        await asyncio.to_thread(drain, sock)
    return got, code, took


def send_until_closed(sock: socket.socket, frame: bytes, still_open: Callable[[], bool],
                      deadline: float) -> None:
    """Send ``frame`` over and over on ``sock`` while ``still_open()`` and
    before ``deadline`` (monotonic), never blocked in a send: once the
    server stops reading (it is closing), a blocked send would outlast its
    3 s wait for the close handshake, and the reset that ends it could
    discard the close frame before :func:`drain` reads it."""
    sock.setblocking(False)
    left = memoryview(b"")
    with contextlib.suppress(OSError):  # the server may close mid-send
        while still_open() and time.monotonic() < deadline:
            if not left:
                left = memoryview(frame)
            try:
                left = left[sock.send(left):]
            except BlockingIOError:
                time.sleep(0.01)
    sock.setblocking(True)


def client_text_frame(text: str) -> bytes:
    """``text`` as one masked WebSocket text frame, as a client sends it."""
    return _client_frame(0x81, text.encode())


def client_binary_frame(data: bytes) -> bytes:
    """``data`` as one masked WebSocket binary frame, as a client sends it."""
    return _client_frame(0x82, data)


def _client_frame(first: int, data: bytes) -> bytes:
    if len(data) < 126:
        head = bytes([first, 0x80 | len(data)])
    elif len(data) < 1 << 16:
        head = bytes([first, 0x80 | 126]) + len(data).to_bytes(2, "big")
    else:
        head = bytes([first, 0x80 | 127]) + len(data).to_bytes(8, "big")
    mask = os.urandom(4)
    masked = (np.frombuffer(data, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8),
                                                        len(data))).tobytes()
    return head + mask + masked


def close_code_of(data: bytes) -> int | None:
    """The code of the close frame in ``data``, a server's unmasked frames."""
    frame = close_frame_of(data)
    return None if frame is None else frame[0]


def close_frame_of(data: bytes) -> tuple[int, str] | None:
    """The code and reason of the close frame in ``data``, a server's
    unmasked frames."""
    i = 0
    while i + 2 <= len(data):
        opcode, n, i = data[i] & 0x0F, data[i + 1] & 0x7F, i + 2
        if n >= 126:
            width = 2 if n == 126 else 8
            n, i = int.from_bytes(data[i:i + width], "big"), i + width
        if opcode == 0x8:
            return (int.from_bytes(data[i:i + 2], "big"),
                    data[i + 2:i + n].decode(errors="replace"))
        i += n
    return None


def drain(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything ``sock`` receives until the peer closes it; closes it."""
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return got


class Relay:
    """A TCP relay to 127.0.0.1:``target``, which may change between connections.

    :meth:`drop` cuts every connection as a network would. What a client
    sends goes through :meth:`forward`, which a subclass may override to
    filter it; the other direction is passed on as it comes. TLS passes
    through end to end.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.drop()
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        await self._relay(reader, writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     first: bytes = b"") -> None:
        """Connect to the target, send it ``first`` (what this relay already
        read of the client's bytes), then pass both directions on."""
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        up_w.write(first)
        self._writers += [writer, up_w]
        for coro in (self.forward(reader, up_w), pipe(up_r, writer)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def forward(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        """Pass what the client sends on to the target (closing ``w`` at its end)."""
        await pipe(r, w)

    def drop(self) -> None:
        """Cut every connection now."""
        for w in self._writers:
            w.transport.abort()
        self._writers = []

    def reset(self) -> None:
        """Cut every connection now with a reset (RST), as a NAT or load
        balancer that forgot them. :meth:`drop` closes them: a FIN, or a
        reset only where unread bytes happen to be left, which varies with
        the Python version (after the MQTT reset test's drop, paho read a
        reset on 3.11 and an end of stream on 3.13)."""
        for w in self._writers:
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.drop()


class PrefixRelay(Relay):
    """A reverse proxy that serves 127.0.0.1:``target`` under a path prefix:
    a request for ``prefix`` + ``/PATH`` is passed on as ``/PATH`` (nginx's
    ``location /prefix/ { proxy_pass http://target/; }``, WebSocket upgrades
    included), any other is answered 404. ``targets`` lists the request
    targets (path and query) clients sent it, as sent."""

    def __init__(self, target: int, prefix: str) -> None:
        super().__init__(target)
        self.prefix = prefix.rstrip("/")
        self.targets: list[str] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        try:
            line = (await reader.readline()).decode("latin-1")
            method, target, version = line.split(" ", 2)
        except (ConnectionError, ValueError):
            writer.close()
            return
        self.targets.append(target)
        if not target.startswith(f"{self.prefix}/"):
            body = f"no such path: {target}\n".encode("latin-1")
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                         % (len(body), body))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            return
        await self._relay(reader, writer, f"{method} {target[len(self.prefix):]} {version}"
                          .encode("latin-1"))


class StallingRelay(Relay):
    """A TCP relay whose uplink can stall: while ``flowing`` is clear, what
    clients send is not read, so it waits in the sockets and in the client
    (a browser's network process too), as on a link that has stopped moving;
    what the server sends goes on. ``forwarded`` counts the bytes passed on
    to the server."""

    def __init__(self, target: int) -> None:
        super().__init__(target)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.forwarded = 0

    async def forward(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self.flowing.wait()
                if not (data := await r.read(65536)):
                    break
                self.forwarded += len(data)
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()


async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Copy ``r`` to ``w`` until ``r`` ends or the connection breaks; then close ``w``."""
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except ConnectionError:
        pass
    finally:
        w.close()
