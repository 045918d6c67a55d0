"""Network helpers for tests: plain HTTP GETs, free ports, a TCP relay that
can cut its connections."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request


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


class DropProxy:
    """A TCP relay to ``port`` whose connections :meth:`drop` cuts, as a network would."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> DropProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.drop()
        assert self._server is not None
        self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer),
                             return_exceptions=True)

    def drop(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.writers = []
