"""Network helpers for tests: plain HTTP GETs, free ports, a TCP relay that
can cut its connections or filter what clients send."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from typing import Self


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
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
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
