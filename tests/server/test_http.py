"""The plain-HTTP side of the server over real sockets: what an HTTP client
(not a WebSocket one) gets from the page, /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import AsyncIterator

import pytest

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.server.app import CaptionServer
from tests.fakes import ScriptedBackend, words_so_far


@pytest.fixture
async def server() -> AsyncIterator[CaptionServer]:
    cfg = load_config(overrides={"server.port": 0}, env={})
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as served:
        yield served


async def test_a_keep_alive_client_can_make_a_second_request(server: CaptionServer) -> None:
    """The server closes the connection after every HTTP response; it used to
    say nothing of it (no ``Connection: close``), so an HTTP/1.1 client that
    kept the connection for its next request (``http.client``) failed that
    request with ``RemoteDisconnected``."""
    def two_requests() -> list[tuple[int, bytes, str | None]]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            results = []
            for path in ("/healthz", "/readyz", "/static/style.css", "/nope"):
                conn.request("GET", path)
                response = conn.getresponse()
                results.append((response.status, response.read(),
                                response.getheader("Connection")))
            return results
        finally:
            conn.close()

    results = await asyncio.to_thread(two_requests)
    assert [status for status, _, _ in results] == [200, 200, 200, 404]
    assert results[0][1] == b"ok\n" and results[1][1] == b"ready\n"
    assert {connection for _, _, connection in results} == {"close"}
