"""Client test fixtures: the clients importable as modules, a server that
requires access tokens, headless Chromium over CDP.

The browser is driven through the Chrome DevTools Protocol with the
``websockets`` client the project already depends on: no Playwright, no
browser download. :class:`Browser` is one Chromium process for the session;
:class:`Page` is one tab and the few CDP calls the tests need.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import CaptionEvent, StreamEnded
from evoxtral_stream.server.app import CaptionServer
from evoxtral_stream.server.auth import hash_token
from tests.fakes import ScriptedBackend
from tests.speech import have_espeak, speak

__all__ = [
    "BOTH_TOKEN", "CLIENTS", "FAKE_MIC_TEXT", "GUARD_TOKENS", "INGEST_TOKEN", "REBOUND_HOST",
    "SUBSCRIBE_TOKEN",
    "Browser", "Page", "accepted_token_cases", "browser", "chromium_binary", "client_env",
    "guarded", "publish_finals", "refused_token_cases", "scripted_server", "sends",
]

CLIENTS = Path(__file__).resolve().parents[2] / "clients"
# The clients are scripts, not a package: import them as top-level modules.
if str(CLIENTS) not in sys.path:
    sys.path.insert(0, str(CLIENTS))

#: What the fake microphone says (espeak-ng), when espeak-ng is installed.
FAKE_MIC_TEXT = "Good evening and welcome to the live captioning demo."

# --- a server that requires access tokens ------------------------------------------

#: The tokens :func:`guarded` accepts, by role. They use every character a
#: browser may send in a subprotocol name (letters, digits, - _ . ~).
SUBSCRIBE_TOKEN = "sub-Viewer_1.x~"
INGEST_TOKEN = "ingest-Mic_2"
BOTH_TOKEN = "both-Page_3.y"
GUARD_TOKENS = [
    {"name": "viewer", "hash": hash_token(SUBSCRIBE_TOKEN), "roles": ["subscribe"]},
    {"name": "mic", "hash": hash_token(INGEST_TOKEN), "roles": ["ingest"]},
    {"name": "page", "hash": hash_token(BOTH_TOKEN), "roles": ["subscribe", "ingest"]},
]


def _words(audio: npt.NDArray[np.float32]) -> str:
    return " ".join(f"w{i}" for i in range(len(audio) // 8000))


@pytest.fixture
async def guarded() -> AsyncIterator[tuple[Engine, CaptionServer]]:
    """A real engine and server on a free port that require a token of
    :data:`GUARD_TOKENS`; the model is scripted (``w0 w1 ...``, a word per 0.5 s)."""
    cfg = load_config(overrides={"server.port": 0, "auth.tokens": GUARD_TOKENS}, env={})
    async with Engine(cfg, ScriptedBackend(_words)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        yield engine, server


def client_env(token: str | None = None) -> dict[str, str]:
    """The environment for a client process: ours, with ``$EVOXTRAL_TOKEN`` set
    to ``token``, or unset whatever the environment running the tests says."""
    env = {k: v for k, v in os.environ.items() if k != "EVOXTRAL_TOKEN"}
    if token is not None:
        env["EVOXTRAL_TOKEN"] = token
    return env


def accepted_token_cases(role: str) -> list[tuple[list[str], str | None]]:
    """(arguments, ``$EVOXTRAL_TOKEN``) that a Python client needing ``role``
    ("subscribe" or "ingest") of :func:`guarded` must get in with: the token by
    option, by environment, and by option over a wrong one in the environment."""
    right = SUBSCRIBE_TOKEN if role == "subscribe" else INGEST_TOKEN
    return [(["--token", right], None), ([], right), (["--token", BOTH_TOKEN], "not-a-token")]


def refused_token_cases(role: str) -> list[tuple[list[str], str | None, str]]:
    """(arguments, ``$EVOXTRAL_TOKEN``, the line the client must print) that a
    Python client needing ``role`` of :func:`guarded` must be refused with: no
    token, an unknown one by option and by environment, and (by option, over a
    right one in the environment) a token without the role."""
    right, wrong, name = ((SUBSCRIBE_TOKEN, INGEST_TOKEN, "mic") if role == "subscribe"
                          else (INGEST_TOKEN, SUBSCRIBE_TOKEN, "viewer"))
    unknown = "the server refused the token (HTTP 401): unknown token"
    return [
        ([], None,
         "the server requires a token (HTTP 401): pass --token TOKEN or set EVOXTRAL_TOKEN"),
        (["--token", "not-a-token"], None, unknown),
        ([], "not-a-token", unknown),
        (["--token", wrong], right,
         f"the server refused the token (HTTP 403): token {name} lacks the {role} role"),
    ]


def publish_finals(server: CaptionServer, stream: str, texts: list[str], *,
                   ended: bool = True) -> None:
    """One final caption per text on ``stream`` (seq 1, 2, ...), then (``ended``)
    its end: retained, so a client that subscribes with ``since=0`` gets them all."""
    for i, text in enumerate(texts):
        server.broadcaster.publish(CaptionEvent(
            stream=stream, segment=i, seq=i + 1, final=True, text=text, plain_text=text,
            stable=text, unstable="", tags=(), start=float(i), end=i + 0.5, latency=0.1))
    if ended:
        server.broadcaster.publish(StreamEnded(stream, float(len(texts)), len(texts),
                                               len(texts)))

# --- a raw server that plays a script ---------------------------------------------


def sends(script: Sequence[str | bytes]) -> Callable[[ServerConnection], Awaitable[None]]:
    """A handler that sends each client ``script``, then waits for it to close."""
    async def handler(ws: ServerConnection) -> None:
        for message in script:
            await ws.send(message)
        await ws.wait_closed()
    return handler


@contextlib.asynccontextmanager
async def scripted_server(script: Sequence[str | bytes]) -> AsyncIterator[str]:
    """A raw WebSocket server on a free port playing ``script`` to each
    client (:func:`sends`), for the clients against another server; its URL."""
    async with serve(sends(script), "127.0.0.1", 0) as server:
        yield f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"


#: Resolves to 127.0.0.1 in :class:`Browser`: a loopback server's page
#: reached by this name has an origin the server refuses.
REBOUND_HOST = "rebound.test"

_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1100,720",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    # A name other than localhost that reaches a local server, as a rebound
    # DNS name or a reverse proxy passing its public Host would.
    f"--host-resolver-rules=MAP {REBOUND_HOST} 127.0.0.1",
]


def chromium_binary() -> str | None:
    """``$EVOXTRAL_TEST_CHROMIUM``, else chromium (or Chrome) on PATH, else None."""
    found = os.environ.get("EVOXTRAL_TEST_CHROMIUM") or next(
        (p for name in ("chromium", "chromium-browser", "google-chrome")
         if (p := shutil.which(name))), None)
    return found


class Browser:
    """A headless Chromium with a DevTools port; ``start``/``stop`` own the process."""

    def __init__(self, binary: str, workdir: Path, extra_args: list[str]) -> None:
        self.binary = binary
        self.workdir = workdir
        self.args = [*_FLAGS, *extra_args]
        self.log = workdir / "chromium.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        profile = self.workdir / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        active = profile / "DevToolsActivePort"
        active.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, *self.args, f"--user-data-dir={profile}",
                 "--remote-debugging-port=0", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while not (active.exists() and active.read_text().strip()):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"chromium did not open its DevTools port: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        self.port = int(active.read_text().split()[0])

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def _json(self, path: str, method: str = "GET") -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read().decode()
        return json.loads(body) if body.startswith(("{", "[")) else body

    async def new_tab(self) -> tuple[str, str]:
        """Open a blank tab; its target id and DevTools WebSocket URL."""
        info = await asyncio.to_thread(self._json, "/json/new?about:blank", "PUT")
        return str(info["id"]), str(info["webSocketDebuggerUrl"])

    async def close_tab(self, target: str) -> None:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._json, f"/json/close/{target}")


class Page:
    """One tab over CDP. ``errors`` collects uncaught exceptions and console errors."""

    def __init__(self, browser: Browser, target: str, ws: ClientConnection) -> None:
        self._browser = browser
        self._target = target
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.ensure_future(self._read())
        self.errors: list[str] = []
        self.console: list[str] = []

    @classmethod
    async def open(cls, browser: Browser, url: str) -> Page:
        """A new tab that has loaded ``url`` (errors are recorded from the start)."""
        target, ws_url = await browser.new_tab()
        ws = await connect(ws_url, max_size=64 * 2**20)
        page = cls(browser, target, ws)
        await page.send("Runtime.enable")
        await page.send("Page.enable")
        await page.send("Emulation.setDeviceMetricsOverride", width=1100, height=720,
                        deviceScaleFactor=1, mobile=False)
        await page.send("Page.navigate", url=url)
        await page.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")
        return page

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()
        await self._browser.close_tab(self._target)

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                msg = json.loads(raw)
                if "id" in msg:
                    fut = self._pending.pop(msg["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                elif msg.get("method") == "Runtime.exceptionThrown":
                    d = msg["params"]["exceptionDetails"]
                    self.errors.append(d.get("exception", {}).get("description") or d["text"])
                elif msg.get("method") == "Runtime.consoleAPICalled":
                    p = msg["params"]
                    text = " ".join(str(a.get("value", a.get("description", "")))
                                    for a in p["args"])
                    self.console.append(f"{p['type']}: {text}")
                    if p["type"] == "error":
                        self.errors.append(text)
        except ConnectionClosed:
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One CDP command; its ``result``, or RuntimeError with the CDP error."""
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply["result"]
        return result

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JS expression (promises are awaited)."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True, userGesture=True)
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            raise RuntimeError(f"{expression!r:.80} threw: "
                               f"{d.get('exception', {}).get('description') or d['text']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, within: float = 15.0) -> Any:
        """Poll ``expression`` until it is truthy; its value. AssertionError after
        ``within`` seconds."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out after {within} s waiting for {expression!r}; "
                                     f"page errors: {self.errors}; console: {self.console[-10:]}")
            await asyncio.sleep(0.05)

    async def click(self, selector: str) -> None:
        """A real mouse click (a user gesture) at the centre of ``selector``."""
        box = await self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                            clickCount=1)

    async def screenshot(self, path: Path) -> bytes:
        """A PNG of the viewport, also written to ``path``."""
        data = base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"])
        await asyncio.to_thread(path.write_bytes, data)
        return data


def _fake_mic_wav(path: Path) -> Path:
    """FAKE_MIC_TEXT between 1 s and 3 s of silence, 48 kHz mono WAV."""
    from evoxtral_stream.audio.resample import resample

    speech = resample(speak(FAKE_MIC_TEXT), 16000, 48000)
    audio = np.concatenate([np.zeros(48000, np.int16), speech, np.zeros(3 * 48000, np.int16)])
    sf.write(path, audio, 48000, subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """A headless Chromium for the session, with a fake microphone that speaks
    :data:`FAKE_MIC_TEXT` (a beep without espeak-ng). Skips without Chromium."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    workdir = tmp_path_factory.mktemp("chromium")
    extra = []
    if have_espeak():
        wav = _fake_mic_wav(workdir / "mic.wav")
        extra.append(f"--use-file-for-fake-audio-capture={wav}%noloop")
    b = Browser(binary, workdir, extra)
    b.start()
    try:
        yield b
    finally:
        b.stop()
