"""Plain HTTP GETs against a test server, from async tests, and free ports."""

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
