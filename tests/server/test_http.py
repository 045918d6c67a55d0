"""The plain-HTTP side of the server over real sockets: what an HTTP client
(not a WebSocket one) gets from the page, /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio
import http.client
import socket
from collections.abc import AsyncIterator

import pytest

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.server.app import CaptionServer
from evoxtral_stream.server.auth import hash_token
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


def raw_request(port: int, head: str) -> bytes:
    """The server's whole answer to ``head`` (a request without a body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head.encode())
        answer = b""
        while data := s.recv(65536):
            answer += data
        return answer


@pytest.mark.parametrize("header", ["Origin", "Authorization", "Host", "Evoxtral-Origin"])
async def test_a_repeated_header_is_a_bad_request(header: str) -> None:
    """A request carrying two Origin, Authorization or Host headers used to
    crash the handshake hook (websockets' MultipleValuesError): a 500 and an
    ERROR traceback in the log for what is the client's mistake."""
    cfg = load_config(overrides={
        "server.port": 0, "server.allowed_origins": ["https://ok.example"],
        "auth.tokens": [{"name": "root", "hash": hash_token("adm"), "roles": ["admin"]}]},
        env={})
    values = {"Origin": "https://ok.example", "Authorization": "Bearer adm",
              "Host": "127.0.0.1", "Evoxtral-Origin": "https://ok.example"}
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        headers = {**values}
        del headers[header]
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        for path in ("/v1/captions", "/metrics"):
            answer = await asyncio.to_thread(
                raw_request, server.port,
                f"GET {path} HTTP/1.1\r\n{lines}{header}: {values[header]}\r\n"
                f"{header}: {values[header]}\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400 "), answer
            assert f"more than one {header} header".encode() in answer


async def test_head_has_no_body_and_other_methods_are_not_allowed(
        server: CaptionServer) -> None:
    """The HTTP paths answered every method as a GET: a HEAD got the body too
    (which a client reads as the start of its next response), and a POST,
    PUT or DELETE of /metrics, /healthz or the page got a 200."""
    port = server.port
    for path in ("/", "/static/app.js", "/healthz", "/readyz", "/metrics", "/nope"):
        got = await asyncio.to_thread(raw_request, port,
                                      f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n")
        head, _, body = got.partition(b"\r\n\r\n")
        answer = await asyncio.to_thread(raw_request, port,
                                         f"HEAD {path} HTTP/1.1\r\nHost: h\r\n\r\n")
        assert answer.startswith(head.split(b"\r\n")[0] + b"\r\n"), (path, answer)
        assert answer.endswith(b"\r\n\r\n"), (path, answer[-200:])
        assert f"Content-Length: {len(body)}\r\n".encode() in answer, path
        for method in ("POST", "PUT", "DELETE"):
            answer = await asyncio.to_thread(
                raw_request, port,
                f"{method} {path} HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 405 "), (method, path, answer)
            assert b"\r\nAllow: GET, HEAD\r\n" in answer


async def test_metrics_need_a_token_for_every_stream() -> None:
    """/metrics reports on every stream. An admin token limited to some
    streams used to get 403 "name them with ?stream=ID", and then the whole
    metrics for any ?stream= its patterns matched, as if that limited them.
    Now such a token is refused whatever it names, saying why; an admin
    token for every stream reads them, ?stream= or not."""
    cfg = load_config(overrides={
        "server.port": 0,
        "auth.tokens": [{"name": "root", "hash": hash_token("adm"), "roles": ["admin"]},
                        {"name": "studio", "hash": hash_token("std"), "roles": ["admin"],
                         "streams": ["studio-*"]}]}, env={})

    def get(path: str, token: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine, \
            CaptionServer(engine, cfg.server) as served:
        for path in ("/metrics", "/metrics?stream=studio-1"):
            status, body = await asyncio.to_thread(get, path, "std")
            assert status == 403, (path, body)
            assert body == (b"token studio is limited to streams studio-*: /metrics "
                            b"reports on every stream\n"), body
            status, body = await asyncio.to_thread(get, path, "adm")
            assert status == 200 and b"evoxtral_" in body, (path, body)
