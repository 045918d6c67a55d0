"""A browser client of OpenAI's Realtime API against ``/v1/realtime``.

OpenAI's browser clients (its docs' ``new WebSocket(url, ["realtime",
"openai-insecure-api-key." + KEY])``, the ``openai`` JS SDK's
``OpenAIRealtimeWebSocket``) offer subprotocols; a browser fails a
connection whose response selects none of them. Driven in real Chromium.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.server.app import CaptionServer
from tests.clients.conftest import INGEST_TOKEN, Browser, Page
from tests.fakes import ScriptedBackend

OPEN = """new Promise((resolve) => {
  const ws = new WebSocket(`ws://${location.host}%s`, %s);
  ws.onmessage = (e) => { resolve({protocol: ws.protocol, first: JSON.parse(e.data).type});
                          ws.close(); };
  ws.onclose = (e) => resolve({closed: e.code});
})"""


@pytest.fixture
async def server() -> AsyncIterator[CaptionServer]:
    cfg = load_config(overrides={"server.port": 0}, env={})
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as srv:
        yield srv


async def test_an_openai_browser_client_is_served(browser: Browser,
                                                  server: CaptionServer) -> None:
    page = await Page.open(browser, f"http://127.0.0.1:{server.port}/")
    try:
        got = await page.evaluate(OPEN % (
            "/v1/realtime?intent=transcription",
            '["realtime", "openai-insecure-api-key.sk-test", "openai-beta.realtime-v1"]'))
        assert got == {"protocol": "realtime", "first": "session.created"}
        # Only this path speaks OpenAI's protocol: elsewhere "realtime" is not selected.
        got = await page.evaluate(OPEN % ("/v1/captions", '["realtime"]'))
        assert got == {"closed": 1006}
    finally:
        await page.close()


async def test_with_tokens_on_it_passes_its_token_as_a_subprotocol_or_its_api_key(
        browser: Browser, guarded: tuple[Engine, CaptionServer]) -> None:
    _, server = guarded
    page = await Page.open(browser, f"http://127.0.0.1:{server.port}/")
    try:
        offered = '["realtime", "openai-insecure-api-key.sk-test"%s]'
        got = await page.evaluate(OPEN % ("/v1/realtime?intent=transcription", offered % ""))
        assert got == {"closed": 1006}  # refused (401): OpenAI's key is no token here
        got = await page.evaluate(OPEN % ("/v1/realtime?intent=transcription",
                                          offered % f', "evoxtral.token.{INGEST_TOKEN}"'))
        assert got == {"protocol": f"evoxtral.token.{INGEST_TOKEN}",
                       "first": "session.created"}
        # Or as the API key, as an OpenAI client passes it unchanged.
        as_key = f'["realtime", "openai-insecure-api-key.{INGEST_TOKEN}"]'
        got = await page.evaluate(OPEN % ("/v1/realtime?intent=transcription", as_key))
        assert got == {"protocol": "realtime", "first": "session.created"}
        # Only there: the caption path takes no OpenAI key.
        got = await page.evaluate(OPEN % ("/v1/captions",
                                          f'["openai-insecure-api-key.{INGEST_TOKEN}"]'))
        assert got == {"closed": 1006}
    finally:
        await page.close()
