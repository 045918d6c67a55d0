"""Access control: the pure policy, then every refusal over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.datastructures import HeadersLike
from websockets.exceptions import ConnectionClosed, InvalidHeaderValue, InvalidStatus
from websockets.typing import Origin, Subprotocol

from evoxtral_stream.cli import main
from evoxtral_stream.config import AuthTokenConfig, ConfigError, load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import CaptionEvent
from evoxtral_stream.server.app import CaptionServer
from evoxtral_stream.server.auth import (
    REDACTED,
    AccessPolicy,
    Credentials,
    Grant,
    RedactTokens,
    Refusal,
    TokenUsage,
    check_bind,
    find_credentials,
    hash_token,
    install_token_redaction,
    redact_tokens,
)
from tests.fakes import ScriptedBackend
from tests.helpers.http import http_get

SUB, ING, ADMIN, STUDIO = "sub-token", "ingest-token", "admin-token", "studio-token"
TOKENS: list[dict[str, Any]] = [
    {"name": "viewer", "hash": hash_token(SUB), "roles": ["subscribe"]},
    {"name": "mic", "hash": hash_token(ING), "roles": ["ingest"]},
    {"name": "root", "hash": hash_token(ADMIN), "roles": ["admin"]},
    {"name": "studio", "hash": hash_token(STUDIO), "roles": ["ingest", "subscribe"],
     "streams": ["studio-*"], "max_streams": 1, "max_subscribers": 1},
]


def token(**kw: Any) -> AuthTokenConfig:
    return AuthTokenConfig(**{"hash": hash_token("t"), "roles": ("subscribe",), **kw})


# --- pure logic ---------------------------------------------------------------


def test_hash_is_sha256_of_the_token() -> None:
    assert hash_token("secret") == ("sha256:2bb80d537b1da3e38bd30361aa855686bde0eacd7162"
                                    "fef6a25fe97bf527a25b")


def test_credentials_come_from_header_query_or_subprotocol() -> None:
    proto = "evoxtral.token.abc"
    assert find_credentials("Bearer xyz", [], []) == Credentials("xyz")
    assert find_credentials("bearer  xyz ", [], ["q"]) == Credentials("xyz")
    assert find_credentials(None, [], ["q"]) == Credentials("q")
    assert find_credentials(None, ["other", proto], []) == Credentials("abc", proto)
    assert find_credentials("Basic Zm9v", [], []) == Credentials(None)
    # The header wins, but the offered subprotocol is still reported (to select).
    assert find_credentials("Bearer xyz", [proto], []) == Credentials("xyz", proto)
    # OpenAI's browser carrier of an API key, on the path that speaks its
    # protocol only, and after every other carrier.
    key = "openai-insecure-api-key.k1"
    assert find_credentials(None, ["realtime", key], []) == Credentials(None)
    assert find_credentials(None, ["realtime", key], [], openai_key=True) == Credentials("k1")
    assert find_credentials(None, [key, proto], [], openai_key=True) == Credentials("abc", proto)
    assert find_credentials(None, [key], ["q"], openai_key=True) == Credentials("q")


def test_policy_decisions() -> None:
    viewer = token(name="v")
    studio = token(hash=hash_token("s"), roles=("ingest",), streams=("studio-*", "live"))
    admin = token(hash=hash_token("a"), roles=("admin",))
    policy = AccessPolicy([viewer, studio, admin], [])
    assert policy.authorize("subscribe", [], Credentials("t")) == Grant(viewer)
    assert isinstance(r := policy.authorize("subscribe", [], Credentials(None)), Refusal)
    assert r.status == 401 and "token is required" in r.message
    assert policy.authorize("subscribe", [], Credentials("nope")) == Refusal(401, "unknown token")
    assert isinstance(r := policy.authorize("ingest", ["x"], Credentials("t")), Refusal)
    assert r.status == 403 and "ingest role" in r.message
    assert policy.authorize("ingest", ["studio-1"], Credentials("s")) == Grant(studio)
    assert policy.authorize("ingest", ["live"], Credentials("s")) == Grant(studio)
    for streams in (["studio"], [], ["studio-1", "other"]):
        assert isinstance(r := policy.authorize("ingest", streams, Credentials("s")), Refusal)
        assert r.status == 403
    assert policy.authorize("ingest", [], Credentials("a")) == Grant(admin)
    assert policy.authorize("subscribe", ["any"], Credentials("a")) == Grant(admin)


def test_recheck_after_a_reload() -> None:
    viewer = token(name="v")
    studio = token(hash=hash_token("s"), roles=("ingest",), streams=("studio-*",))
    policy = AccessPolicy([viewer, studio], [])
    # Kept: the new entry (same hash) is granted, with its own limits.
    tighter = token(name="v", max_subscribers=1)
    assert AccessPolicy([tighter], []).recheck(viewer, "subscribe", []) == Grant(tighter)
    assert policy.recheck(studio, "ingest", ["studio-2"]) == Grant(studio)
    # Removed, or no longer with the role or the stream in use.
    assert AccessPolicy([studio], []).recheck(viewer, "subscribe", []) \
        == Refusal(401, "token v was revoked")
    demoted = token(hash=hash_token("s"), roles=("subscribe",), streams=("studio-*",))
    assert isinstance(r := AccessPolicy([demoted], []).recheck(studio, "ingest", ["studio-2"]),
                      Refusal)
    assert r.status == 403 and "ingest role" in r.message
    moved = token(hash=hash_token("s"), roles=("ingest",), streams=("news-*",))
    assert isinstance(r := AccessPolicy([moved], []).recheck(studio, "ingest", ["studio-2"]),
                      Refusal)
    assert "may not use stream studio-2" in r.message
    # Tokens added to an open server: its tokenless connections are refused;
    # all tokens removed: every connection may go on.
    assert policy.recheck(None, "subscribe", []) == Refusal(401, "a token is now required")
    assert AccessPolicy([], []).recheck(viewer, "subscribe", []) == Grant(None)


def test_open_policy_and_origins() -> None:
    open_ = AccessPolicy([], [])
    assert not open_.enabled
    # [] allowed any web page: any site open in the user's browser could read
    # a local server's captions or push audio. Only the server's own page now.
    assert isinstance(r := open_.authorize("ingest", [], Credentials(None), origin="https://x"),
                      Refusal)
    assert r.status == 403 and '"*" for any' in r.message
    assert open_.authorize("ingest", [], Credentials(None), origin="http://h:1",
                           host="h:1") == Grant(None)
    anyone = AccessPolicy([], ["*"])
    assert anyone.authorize("ingest", [], Credentials(None), origin="https://x") == Grant(None)
    listed = AccessPolicy([], ["https://ok.example/"])
    assert listed.authorize("subscribe", [], Credentials(None),
                            origin="https://ok.example") == Grant(None)
    assert isinstance(r := listed.authorize("subscribe", [], Credentials(None),
                                            origin="https://evil.example"), Refusal)
    assert r.status == 403
    # Non-browser clients send no Origin; the server's own page is allowed.
    assert listed.authorize("subscribe", [], Credentials(None)) == Grant(None)
    assert listed.authorize("subscribe", [], Credentials(None), origin="http://h:1",
                            host="h:1") == Grant(None)


def test_token_usage_counts_per_token() -> None:
    usage = TokenUsage()
    one = token(max_streams=1, max_subscribers=2)
    assert usage.acquire(one, "streams") and not usage.acquire(one, "streams")
    assert usage.acquire(one, "subscribers") and usage.acquire(one, "subscribers")
    assert not usage.acquire(one, "subscribers")
    usage.release(one, "streams")
    assert usage.acquire(one, "streams")
    unlimited = token(hash=hash_token("u"))
    assert all(usage.acquire(unlimited, "streams") for _ in range(100))
    assert usage.acquire(None, "streams")


def test_bind_check() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.1.2.3"):
        check_bind(host, [], False)
    for host in ("0.0.0.0", "::", "192.168.1.4", "example.org"):
        with pytest.raises(ConfigError, match="allow_anonymous"):
            check_bind(host, [], False)
        check_bind(host, [], True)
        check_bind(host, [token()], False)


@pytest.mark.parametrize(("entry", "match"), [
    ({"hash": "secret", "roles": ["admin"]}, "sha256"),
    ({"hash": hash_token("x"), "roles": ["root"]}, "roles"),
    ({"hash": hash_token("x"), "roles": []}, "roles"),
    ({"hash": hash_token("x"), "roles": ["admin"], "stream": ["a"]}, "unknown config key"),
    ({"hash": hash_token("x"), "roles": ["admin"], "max_streams": -1}, "max_streams"),
    ({"roles": ["admin"]}, "hash"),
])
def test_bad_token_entries_are_refused(entry: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(overrides={"auth.tokens": [entry]}, env={})


def test_token_entries_load_with_defaults() -> None:
    cfg = load_config(overrides={"auth.tokens": TOKENS}, env={})
    assert cfg.auth.tokens[0] == AuthTokenConfig(hash_token(SUB), ("subscribe",), "viewer")
    assert cfg.auth.tokens[3].streams == ("studio-*",)
    with pytest.raises(ConfigError, match="twice"):
        load_config(overrides={"auth.tokens": TOKENS[:1] * 2}, env={})


def test_two_entries_with_one_hash_are_named() -> None:
    """The error said only "the same token hash twice": with many entries the
    user had to find the pair. Now it names them, by place and name."""
    twin = {"hash": hash_token(SUB), "roles": ["admin"]}
    with pytest.raises(ConfigError) as e:
        load_config(overrides={"auth.tokens": [*TOKENS, twin]}, env={})
    assert str(e.value) == (
        f"auth.tokens lists the same token hash twice: entry 1 (viewer) and entry "
        f"{len(TOKENS) + 1} (unnamed); each entry needs a token of its own")


# --- tokens out of logs --------------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    # Authorization, as websockets logs it at DEBUG: any scheme, any case.
    ("> Authorization: Bearer s3cr3t-Tok_1.x~", "> Authorization: Bearer ***"),
    ("< authorization: basic Zm9vOmJhcg==", "< authorization: basic ***"),
    ("> AUTHORIZATION: s3cr3t", "> AUTHORIZATION: ***"),
    ("> Proxy-Authorization: Bearer s3cr3t", "> Proxy-Authorization: Bearer ***"),
    # A token with blanks (hash-token takes any line) on a header line.
    ("> Authorization: Bearer s3cr3t with blanks", "> Authorization: Bearer ***"),
    ("GET / HTTP/1.1\r\nAuthorization: Bearer s3cr3t\r\nHost: h\r\n",
     "GET / HTTP/1.1\r\nAuthorization: Bearer ***\r\nHost: h\r\n"),
    ("headers {'Authorization': 'Bearer s3cr3t', 'Host': 'h'}",
     "headers {'Authorization': 'Bearer ***', 'Host': 'h'}"),
    # The query carrier, in the request line the server logs and the client's.
    ("< GET /v1/captions?stream=a&token=s3cr3t&since=0 HTTP/1.1",
     "< GET /v1/captions?stream=a&token=***&since=0 HTTP/1.1"),
    ("> GET /v1/ingest?token=s3cr3t HTTP/1.1", "> GET /v1/ingest?token=*** HTTP/1.1"),
    ("cannot reach ws://h:1/v1/captions?TOKEN=s3cr3t#x",
     "cannot reach ws://h:1/v1/captions?TOKEN=***#x"),
    # The page's link carries it in the fragment (#token=, docs/protocol.md),
    # and a client's error may quote such a --url.
    ("not a ws://HOST:PORT URL: 'https://h:0/p/#token=s3cr3t'",
     "not a ws://HOST:PORT URL: 'https://h:0/p/#token=***'"),
    ("https://h/?stream=a#token=s3cr3t&x=1", "https://h/?stream=a#token=***&x=1"),
    # The server percent-decodes query keys, so an encoded key carries too.
    ("< GET /v1/captions?%74oken=s3cr3t HTTP/1.1", "< GET /v1/captions?%74oken=*** HTTP/1.1"),
    ("< GET /?a=1&%54%4F%6b%65%6E=s3cr3t&b=2 HTTP/1.1",
     "< GET /?a=1&%54%4F%6b%65%6E=***&b=2 HTTP/1.1"),
    # The subprotocol carrier, offered among others, and echoed by the server.
    ("< Sec-WebSocket-Protocol: other, evoxtral.token.s3cr3t, more",
     "< Sec-WebSocket-Protocol: other, evoxtral.token.***, more"),
    ("> sec-websocket-protocol: evoxtral.token.s3cr3t",
     "> sec-websocket-protocol: evoxtral.token.***"),
    # OpenAI's browser clients offer their API key so on /v1/realtime: a real
    # OpenAI key, no token here, and no less secret.
    ("< Sec-WebSocket-Protocol: realtime, openai-insecure-api-key.sk-s3cr3t, "
     "openai-beta.realtime-v1",
     "< Sec-WebSocket-Protocol: realtime, openai-insecure-api-key.***, "
     "openai-beta.realtime-v1"),
    # A quote that closes a quoted URL or name stays (errors quote what they
    # refused); one inside a token is part of it.
    ("got 'ws://h/?token=s3cr3t'", "got 'ws://h/?token=***'"),
    ('url "ws://h/?a=1&token=s3cr3t".', 'url "ws://h/?a=1&token=***".'),
    ("['ws://h/?token=s3cr3t', 'x']", "['ws://h/?token=***', 'x']"),
    ("got 'evoxtral.token.s3cr3t')", "got 'evoxtral.token.***')"),
    ("?token=it's-s3cr3t and more", "?token=*** and more"),
    # The password of a URL's userinfo (websockets sends it as Basic auth);
    # the user name stays, unless it stands alone (it may be a token).
    ("cannot connect to ws://ann:s3cr3t@h:1/v1/captions: refused",
     "cannot connect to ws://ann:***@h:1/v1/captions: refused"),
    ("not a ws://HOST:PORT URL: 'ftp://ann:s3cr3t@h'", "not a ws://HOST:PORT URL: 'ftp://ann:***@h'"),
    ("wss://ann:it's@s3cr3t@h/x?y=1", "wss://ann:***@h/x?y=1"),
    ("ws://s3cr3t@h isn't a valid URI", "ws://***@h isn't a valid URI"),
    # On a Sec-WebSocket-Protocol line, a carrier's value runs to the comma
    # that ends it in the list (the server splits the header there), blanks
    # included: a token with blanks offered this way (no browser can) fails
    # the handshake, and websockets' error quotes the header too.
    ("< Sec-WebSocket-Protocol: evoxtral.token.s3cr3t with blanks, more",
     "< Sec-WebSocket-Protocol: evoxtral.token.***, more"),
    ("< Sec-WebSocket-Protocol: evoxtral.token.a s3cr3t, openai-insecure-api-key.s3cr3t k",
     "< Sec-WebSocket-Protocol: evoxtral.token.***, openai-insecure-api-key.***"),
    ("InvalidHeaderFormat: invalid Sec-WebSocket-Protocol header: expected comma at 18 in "
     "evoxtral.token.a s3cr3t", "InvalidHeaderFormat: invalid Sec-WebSocket-Protocol header: "
     "expected comma at 18 in evoxtral.token.***"),
    # websockets' error for a header it cannot parse quotes the value, or the
    # line, without naming the header: any may be an Authorization one (a
    # token file with Windows line ends leaves a CR in curl's header).
    ("ValueError: invalid HTTP header value: Bearer s3cr3t\r",
     "ValueError: invalid HTTP header value: ***"),
    ("ValueError: invalid HTTP header value: Bearer s3\x01cr3t\nnext line",
     "ValueError: invalid HTTP header value: ***\nnext line"),
    ("ValueError: invalid HTTP header line: Authorization Bearer s3cr3t",
     "ValueError: invalid HTTP header line: ***"),
    # Nothing to redact: unchanged.
    ("ValueError: invalid HTTP header name: X Y", "ValueError: invalid HTTP header name: X Y"),
    ("< Host: 127.0.0.1:8765", "< Host: 127.0.0.1:8765"),
    ("mail ann@example.org at ws://h:1/a@b", "mail ann@example.org at ws://h:1/a@b"),
    ("< GET /v1/captions?stream=token HTTP/1.1", "< GET /v1/captions?stream=token HTTP/1.1"),
    ("< GET /v1/captions?tokens=x&xtoken=y HTTP/1.1",
     "< GET /v1/captions?tokens=x&xtoken=y HTTP/1.1"),
    ("see #tokens=x and issue#token", "see #tokens=x and issue#token"),
    ("authorization granted to stream a", "authorization granted to stream a"),
])
def test_redact_tokens(line: str, expected: str) -> None:
    assert redact_tokens(line) == expected
    assert "s3cr3t" not in redact_tokens(line)


def test_the_refusal_that_names_the_carriers_stays_readable_when_redacted() -> None:
    """The server logs it at INFO: the placeholders go, the rest of it stays."""
    refusal = AccessPolicy([token()], []).authorize("subscribe", [], Credentials(None))
    assert isinstance(refusal, Refusal)
    assert redact_tokens(refusal.message) == (
        "a token is required: send Authorization: Bearer ***, ?token=*** or the "
        "subprotocol evoxtral.token.***")


def _capture(name: str) -> tuple[logging.Logger, io.StringIO]:
    """A logger ``name`` with a handler of its own (redacting) writing to the buffer."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    install_token_redaction([handler])
    install_token_redaction([handler])
    assert sum(isinstance(f, RedactTokens) for f in handler.filters) == 1, "installed once"
    logger = logging.getLogger(name)
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.DEBUG)
    return logger, buf


def test_the_filter_redacts_records_of_child_loggers_with_args() -> None:
    parent, buf = _capture("test_redact")
    child = logging.getLogger("test_redact.websockets.client")  # propagates to the handler
    child.debug("> %s: %s", "Authorization", "Bearer s3cr3t")
    child.debug("> GET %s HTTP/1.1", "/v1/captions?token=s3cr3t")
    child.debug("< %s: %s", "Sec-WebSocket-Protocol", "evoxtral.token.s3cr3t")
    parent.info("plain %d", 1)
    try:
        raise OSError("cannot open ws://h/v1/captions?token=s3cr3t")
    except OSError:
        parent.exception("failed")
    text = buf.getvalue()
    assert "s3cr3t" not in text, text
    assert "> Authorization: Bearer ***\n" in text
    assert "> GET /v1/captions?token=*** HTTP/1.1\n" in text
    assert "< Sec-WebSocket-Protocol: evoxtral.token.***\n" in text
    assert "test_redact plain 1\n" in text
    assert "Traceback" in text and f"?token={REDACTED}" in text


def test_a_record_whose_args_do_not_fit_is_kept_but_redacted() -> None:
    """The handler would print such arguments as they are (handleError)."""
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d %s",
                               ("?token=s3cr3t",), None)
    assert RedactTokens().filter(record) is True
    # A query value runs to the next parameter, a blank or a closing quote.
    assert record.getMessage() == "%d %s (arguments that do not fit: ('?token=***',))"


# --- over sockets ---------------------------------------------------------------


@asynccontextmanager
async def running(**overrides: object) -> AsyncIterator[tuple[Engine, CaptionServer]]:
    cfg = load_config(overrides={"server.port": 0, "auth.tokens": TOKENS, **overrides},
                      env={})
    async with Engine(cfg, ScriptedBackend(lambda a: "hi")) as engine, \
            CaptionServer(engine, cfg.server) as server:
        yield engine, server


async def refused(url: str, headers: HeadersLike | None = None,
                  origin: str | None = None) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, additional_headers=headers,
                           origin=Origin(origin) if origin else None):
            pass
    response = info.value.response
    return response.status_code, response.body.decode() if response.body else ""


async def hello(ws: ClientConnection) -> dict[str, Any]:
    msg: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert msg["type"] == "hello"
    return msg


async def test_refusals_at_the_handshake() -> None:
    async with running() as (_, server):
        base = f"ws://127.0.0.1:{server.port}"
        status, body = await refused(f"{base}/v1/captions")
        assert status == 401 and "token is required" in body and body.count("\n") == 1
        assert (await refused(f"{base}/v1/captions?token=wrong"))[0] == 401
        assert (await refused(f"{base}/v1/captions",
                              {"Authorization": "Bearer wrong"}))[0] == 401
        # Wrong role: a subscriber token may not ingest, nor an ingest token subscribe.
        status, body = await refused(f"{base}/v1/ingest?stream=a&token={SUB}")
        assert status == 403 and "ingest role" in body
        assert (await refused(f"{base}/v1/captions?token={ING}"))[0] == 403
        assert (await refused(f"{base}/v1/realtime?intent=transcription&token={SUB}"))[0] == 403
        # Stream patterns: studio-* only, and it must name the stream.
        status, body = await refused(f"{base}/v1/ingest?stream=news&token={STUDIO}")
        assert status == 403 and "news" in body
        assert (await refused(f"{base}/v1/ingest?token={STUDIO}"))[0] == 403
        assert (await refused(f"{base}/v1/captions?stream=studio-1,news"
                              f"&token={STUDIO}"))[0] == 403


async def test_each_carrier_gets_in() -> None:
    async with running() as (_, server):
        url = f"ws://127.0.0.1:{server.port}/v1/captions"
        async with connect(url, additional_headers={"Authorization": f"Bearer {SUB}"}) as ws:
            await hello(ws)
        async with connect(f"{url}?token={SUB}") as ws:
            await hello(ws)
        # Query keys are percent-decoded: a carrier the log redaction covers.
        async with connect(f"{url}?%74oken={SUB}") as ws:
            await hello(ws)
        assert redact_tokens(f"{url}?%74oken={SUB}") == f"{url}?%74oken={REDACTED}"
        proto = Subprotocol(f"evoxtral.token.{SUB}")
        async with connect(url, subprotocols=[Subprotocol("other"), proto]) as ws:
            # A browser fails the connection unless its protocol is selected.
            assert ws.subprotocol == proto
            await hello(ws)
        async with connect(f"{url}?stream=studio-1&token={STUDIO}") as ws:
            await hello(ws)
        async with connect(f"{url}?token={ADMIN}") as ws:
            await hello(ws)


async def handshake_status(port: int, header: bytes) -> int:
    """The status a handshake of ``/v1/captions`` gets with ``header`` (one
    header line, as raw bytes: what curl sends from a UTF-8 terminal)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n" + header + b"\r\n\r\n")
        status = await asyncio.wait_for(reader.readline(), 10)
        return int(status.split()[1])
    finally:
        writer.close()


async def test_a_token_that_is_not_ascii_gets_in_only_by_the_query_or_a_latin1_header(
) -> None:
    """Why hash-token refuses a token that is not printable ASCII: the server
    reads header values as Latin-1 (websockets) and hashes the token's
    UTF-8. So "sécret" matches when a client sends Latin-1 (the websockets
    client does) or percent-encodes it in ?token=, never as the UTF-8 bytes
    curl sends, nor as a subprotocol (read as Latin-1 as well; a browser
    refuses to offer such a name); a character Latin-1 lacks cannot be sent
    in a header at all."""
    accent = {"name": "accent", "hash": hash_token("sécret"), "roles": ["subscribe"]}
    async with running(**{"auth.tokens": [*TOKENS, accent]}) as (_, server):
        url = f"ws://127.0.0.1:{server.port}/v1/captions"
        async with connect(url, additional_headers={"Authorization": "Bearer sécret"}) as ws:
            await hello(ws)
        async with connect(f"{url}?token=s%C3%A9cret") as ws:
            await hello(ws)
        assert await handshake_status(server.port,
                                      "Authorization: Bearer sécret".encode()) == 401
        assert await handshake_status(
            server.port, "Sec-WebSocket-Protocol: evoxtral.token.sécret".encode()) == 401
        with pytest.raises(InvalidHeaderValue):
            async with connect(url, additional_headers={"Authorization": "Bearer s€cret"}):
                pass


@contextlib.contextmanager
def websockets_debug_log() -> Iterator[io.StringIO]:
    """What websockets logs at DEBUG (as ``--debug`` has it), through a
    redacting handler, as the command line installs it."""
    logger = logging.getLogger("websockets")
    saved = logger.handlers, logger.propagate, logger.level
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    install_token_redaction([handler])
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.DEBUG)
    try:
        yield buf
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])


async def test_a_token_in_a_header_the_server_cannot_parse_stays_out_of_the_debug_log(
) -> None:
    """A token file with Windows line ends (curl -H "Authorization: Bearer
    $(cat token.txt)") leaves a CR in the header's value: websockets drops
    the request and logs, at DEBUG, a traceback ending in "invalid HTTP
    header value: Bearer TOKEN", a message without the header's name, which
    the redaction did not recognise: the whole token in the log."""
    async with running() as (_, server):
        with websockets_debug_log() as log:
            for header in (f"Authorization: Bearer {ADMIN}\r".encode(),
                           f"Authorization Bearer {ADMIN}".encode()):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"GET /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             + header + b"\r\n\r\n")
                # No answer: the server closes the connection, then logs why.
                assert await asyncio.wait_for(reader.read(), 10) == b""
                writer.close()
            for _ in range(100):
                if log.getvalue().count("invalid HTTP header") == 2:
                    break
                await asyncio.sleep(0.05)
        text = log.getvalue()
        assert "invalid HTTP header value: ***" in text, text
        assert "invalid HTTP header line: ***" in text, text
        assert ADMIN not in text, text


async def test_a_subprotocol_token_with_blanks_stays_out_of_the_debug_log() -> None:
    """A token with blanks (hash-token takes them) offered as a subprotocol,
    from a client that is not a browser: the server reads the offer up to its
    comma, as the token, while the redaction stopped at the first blank, in
    the header's DEBUG line and in websockets' error when it then refused
    the header (no subprotocol name holds a blank): the token's tail in the log."""
    spaced = "s3cr3t with blanks"
    tokens = [*TOKENS, {"name": "spaced", "hash": hash_token(spaced), "roles": ["subscribe"]}]
    async with running(**{"auth.tokens": tokens}) as (_, server):
        with websockets_debug_log() as log:
            header = f"Sec-WebSocket-Protocol: evoxtral.token.{spaced}, other".encode()
            assert await handshake_status(server.port, header) == 400
            for _ in range(100):
                if "InvalidHeaderFormat" in log.getvalue():
                    break
                await asyncio.sleep(0.05)
        text = log.getvalue()
        assert "< Sec-WebSocket-Protocol: evoxtral.token.***, other" in text, text
        assert "in evoxtral.token.***, other" in text, text
        assert "blanks" not in text, text


async def test_page_healthz_and_readyz_stay_open() -> None:
    async with running() as (_, server):
        def get(path: str) -> int:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}",
                                        timeout=5) as r:
                return int(r.status)
        assert await asyncio.to_thread(get, "/healthz") == 200
        assert await asyncio.to_thread(get, "/readyz") == 200
        assert await asyncio.to_thread(get, "/") == 200


async def test_a_plain_get_of_a_websocket_path_gets_the_handshake_check() -> None:
    """The browser page relies on it: a failed WebSocket handshake shows the page
    only close code 1006, so it asks again over plain HTTP to learn why."""
    async with running() as (_, server):
        url = f"http://127.0.0.1:{server.port}/v1/captions"
        assert (await http_get(url))[0] == 401
        assert (await http_get(url, {"Authorization": "Bearer nope"}))[0] == 401
        status, body = await http_get(url.replace("captions", "ingest?stream=x"),
                                      {"Authorization": f"Bearer {SUB}"})
        assert status == 403 and "ingest" in body
        # Granted: the server's only complaint is the missing upgrade.
        assert (await http_get(url, {"Authorization": f"Bearer {SUB}"}))[0] == 426
        # The page's GET is same-origin, so without an Origin: it names its
        # origin, and is refused as its socket was.
        status, body = await http_get(url, {"Authorization": f"Bearer {SUB}",
                                            "Evoxtral-Origin": "http://rebound.test:1"})
        assert status == 403 and "allowed_origins" in body
        own = {"Authorization": f"Bearer {SUB}",
               "Evoxtral-Origin": f"http://127.0.0.1:{server.port}"}
        assert (await http_get(url, own))[0] == 426


async def test_origin_allow_list() -> None:
    async with running(**{"server.allowed_origins": ["https://ok.example"],
                          "auth.tokens": []}) as (_, server):
        base = f"ws://127.0.0.1:{server.port}"
        status, body = await refused(f"{base}/v1/captions", origin="https://evil.example")
        assert status == 403 and "allowed_origins" in body
        async with connect(f"{base}/v1/captions", origin=Origin("https://ok.example")) as ws:
            await hello(ws)
        # The server's own page, and clients that send no Origin.
        async with connect(f"{base}/v1/captions",
                           origin=Origin(f"http://127.0.0.1:{server.port}")) as ws:
            await hello(ws)
        async with connect(f"{base}/v1/captions") as ws:
            await hello(ws)


def test_the_own_page_rule_of_a_loopback_server_needs_a_loopback_host() -> None:
    """DNS rebinding: a site whose name now resolves to 127.0.0.1 sends its
    own name as both Origin and Host, so "the server's own page" matched it."""
    local = AccessPolicy([], [], loopback=True)
    for host in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765"):
        scheme_host = f"http://{host}"
        assert local.authorize("subscribe", [], Credentials(None), origin=scheme_host,
                               host=host) == Grant(None), host
    rebound = local.authorize("subscribe", [], Credentials(None),
                              origin="http://evil.example:8765", host="evil.example:8765")
    assert isinstance(rebound, Refusal) and rebound.status == 403
    assert isinstance(local.authorize("subscribe", [], Credentials(None),
                                      origin="http://x:1", host="x:bad"), Refusal)
    # A server on the network is reached by its own name.
    lan = AccessPolicy([], [], loopback=False)
    assert lan.authorize("subscribe", [], Credentials(None), origin="http://box.lan:8765",
                         host="box.lan:8765") == Grant(None)


async def test_a_default_server_refuses_other_sites_pages() -> None:
    async with running(**{"auth.tokens": []}) as (_, server):
        base = f"ws://127.0.0.1:{server.port}"
        status, body = await refused(f"{base}/v1/captions", origin="https://evil.example")
        assert status == 403 and "allowed_origins" in body
        # The page it serves, reached by the name localhost.
        async with connect(f"ws://localhost:{server.port}/v1/captions",
                           origin=Origin(f"http://localhost:{server.port}")) as ws:
            await hello(ws)


async def test_per_token_limits() -> None:
    async with running() as (_, server):
        base = f"ws://127.0.0.1:{server.port}"
        async with connect(f"{base}/v1/captions?stream=studio-1&token={STUDIO}") as first:
            await hello(first)
            async with connect(f"{base}/v1/captions?stream=studio-2&token={STUDIO}") as second:
                err = json.loads(await asyncio.wait_for(second.recv(), 10))
                assert err["type"] == "error" and err["code"] == "too_many_subscribers"
        async with connect(f"{base}/v1/ingest?stream=studio-1&token={STUDIO}") as one:
            await one.send(json.dumps({"type": "config", "sample_rate": 16000}))
            assert json.loads(await one.recv())["type"] == "ingest.ready"
            async with connect(f"{base}/v1/ingest?stream=studio-2&token={STUDIO}") as two:
                err = json.loads(await asyncio.wait_for(two.recv(), 10))
                assert err["code"] == "too_many_streams" and "max_streams" in err["message"]
                await asyncio.wait_for(two.wait_closed(), 10)
                assert two.close_code == 1008
        # Released once the first one has gone.
        async with connect(f"{base}/v1/captions?stream=studio-1&token={STUDIO}") as again:
            await hello(again)


async def test_a_subscription_that_fails_to_start_gives_its_place_back() -> None:
    """The token's subscriber place was taken before the subscription (a
    resume reads the journal there) and given back only after it: a failure
    in between kept it, and a token of max_subscribers 1 was refused for good."""
    async with running() as (_, server):
        base = f"ws://127.0.0.1:{server.port}"
        real = server.broadcaster.subscribe
        calls = 0

        def fail_once(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ValueError("a journal line that does not parse")
            return real(*args, **kwargs)

        server.broadcaster.subscribe = fail_once  # type: ignore[method-assign]
        with contextlib.suppress(ConnectionClosed, InvalidStatus):
            async with connect(f"{base}/v1/captions?stream=studio-1&token={STUDIO}") as ws:
                await asyncio.wait_for(ws.recv(), 10)
        async with connect(f"{base}/v1/captions?stream=studio-1&token={STUDIO}") as again:
            assert (await hello(again))["type"] == "hello"


async def test_non_loopback_bind_without_tokens_refuses_to_start(
        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(overrides={"server.port": 0, "server.host": "0.0.0.0"}, env={})
    async with Engine(cfg, ScriptedBackend(lambda a: "")) as engine:
        with pytest.raises(ConfigError, match="allow_anonymous"):
            await CaptionServer(engine, cfg.server).start()
    with pytest.raises(SystemExit) as info:
        await asyncio.to_thread(main, ["serve", "--source", "none", "--host", "0.0.0.0",
                                       "--port", "0"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "allow_anonymous" in err


async def test_reloading_the_tokens_closes_only_the_connections_they_no_longer_accept() -> None:
    async with running() as (_, server):
        base = f"ws://127.0.0.1:{server.port}"
        kept_sub = await connect(f"{base}/v1/captions?token={ADMIN}")
        revoked_sub = await connect(f"{base}/v1/captions?token={SUB}")
        moved_sub = await connect(f"{base}/v1/captions?stream=studio-1&token={STUDIO}")
        ingest = await connect(f"{base}/v1/ingest?stream=studio-2&token={STUDIO}")
        # Named, so the test can say which stream the token reload spares.
        realtime = await connect(
            f"{base}/v1/realtime?intent=transcription&stream=desk&token={ING}")
        assert json.loads(await realtime.recv())["type"] == "session.created"
        for ws in (kept_sub, revoked_sub, moved_sub):
            await hello(ws)
        await ingest.send(json.dumps({"type": "config", "sample_rate": 16000}))
        assert json.loads(await ingest.recv())["type"] == "ingest.ready"
        # The viewer and mic tokens are gone; the studio token may now only ingest.
        new_tokens = [t for t in TOKENS if t["name"] not in ("viewer", "mic")]
        new_tokens = [{**t, "roles": ["ingest"]} if t["name"] == "studio" else t
                      for t in new_tokens]
        auth = load_config(overrides={"auth.tokens": new_tokens}, env={}).auth
        assert await server.reload_auth(auth) == 3
        while (event := json.loads(await asyncio.wait_for(realtime.recv(), 10)))["type"] \
                != "error":
            pass
        assert event["error"]["code"] == "token_revoked"
        assert "token mic was revoked" in event["error"]["message"]
        await asyncio.wait_for(realtime.wait_closed(), 10)
        assert realtime.close_code == 1008
        for ws, why in ((revoked_sub, "token viewer was revoked"),
                        (moved_sub, "token studio lacks the subscribe role")):
            while (err := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] != "error":
                assert err["type"] == "stream.started"  # of the ingest stream, sent before
            assert err["code"] == "token_revoked" and why in err["message"]
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert ws.close_code == 1008
        # The others go on: the ingest stream still takes audio, the admin
        # subscriber still gets its captions.
        await ingest.send(b"\x00\x00" * 1600)
        await ingest.send(json.dumps({"type": "end"}))
        while (msg := json.loads(await asyncio.wait_for(ingest.recv(), 10)))["type"] \
                != "ingest.summary":
            pass
        assert msg["stream"] == "studio-2" and msg["duration"] == 0.1
        ended: list[str] = []
        while not {"desk", "studio-2"} <= set(ended):
            msg = json.loads(await asyncio.wait_for(kept_sub.recv(), 10))
            if msg["type"] == "stream.ended":
                ended.append(msg["stream"])
        assert sorted(ended) == ["desk", "studio-2"]  # the revoked session's too
        # New connections follow the new tokens.
        assert (await refused(f"{base}/v1/captions?token={SUB}"))[0] == 401
        assert (await refused(f"{base}/v1/captions?stream=studio-1&token={STUDIO}"))[0] == 403
        for ws in (kept_sub, ingest):
            await ws.close()


async def test_a_reload_that_would_open_a_public_bind_changes_nothing() -> None:
    async with running(**{"server.host": "0.0.0.0"}) as (_, server):
        base = f"ws://127.0.0.1:{server.port}"
        async with connect(f"{base}/v1/captions?token={SUB}") as ws:
            await hello(ws)
            with pytest.raises(ConfigError, match="allow_anonymous"):
                await server.reload_auth(load_config(env={}).auth)
            assert (await refused(f"{base}/v1/captions"))[0] == 401
            await ws.ping()  # still open


async def test_a_resume_cannot_reach_past_the_streams_subscribed_to() -> None:
    async with running() as (_, server):
        text = "the board's minutes"
        server.broadcaster.publish(CaptionEvent(
            stream="private", segment=0, seq=1, final=True, text=text, plain_text=text,
            stable=text, unstable="", tags=(), start=0.0, end=1.0, latency=0.1))
        base = f"ws://127.0.0.1:{server.port}/v1/captions"
        # A studio-* token names studio-1, then asks to resume another stream.
        async with connect(f"{base}?stream=studio-1&since=private:0&token={STUDIO}") as ws:
            error = json.loads(await asyncio.wait_for(ws.recv(), 10))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        assert (error["type"], error["code"]) == ("error", "bad_query")
        assert ws.close_code == 1008
        # An all-streams token resumes any stream it names.
        async with connect(f"{base}?since=private:0&token={SUB}") as ws:
            await hello(ws)
            replayed = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert (replayed["stream"], replayed["text"]) == ("private", "the board's minutes")


async def test_a_reload_keeps_an_unnamed_ingest_stream_its_new_patterns_cover() -> None:
    """A connection that named no stream was checked at a reload as naming
    none: a token narrowed to patterns that cover the server's ingest-N was
    revoked all the same ("name them with ?stream=ID")."""
    async with running() as (_, server):
        base = f"ws://127.0.0.1:{server.port}"
        async with connect(f"{base}/v1/ingest?token={ING}") as ingest:
            await ingest.send(json.dumps({"type": "config", "sample_rate": 16000}))
            ready = json.loads(await asyncio.wait_for(ingest.recv(), 10))
            assert ready["type"] == "ingest.ready" and ready["stream"] == "ingest-1"
            # The mic token keeps its role and now covers ingest-* only.
            tokens = [{**t, "streams": ["ingest-*"]} if t["name"] == "mic" else t
                      for t in TOKENS]
            auth = load_config(overrides={"auth.tokens": tokens}, env={}).auth
            closed = await server.reload_auth(auth)
            assert closed == 0, "the ingest-1 connection was revoked"
