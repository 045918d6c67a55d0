"""The bundled clients against any server: a seeded property test.

Users point the clients at other servers, proxies, older or newer versions.
A raw ``websockets`` server sends each client (the viewer, the TTS bridge in
espeak mode with real espeak-ng, the microphone client) a random but
plausible message sequence: protocol events with random field values
(huge, negative, NaN and infinite numbers, wrong types, fields missing or
unknown, lone surrogates and control characters in texts and stream ids,
long strings), unknown event types, other JSON, text that is no JSON,
binary frames, deeply nested JSON, hellos of other versions, gaps with odd
ranges, seqs that go back or repeat; then it closes with a random close
code, or drops the TCP connection.

Invariants: no client dies with an exception (a traceback in the real
program) or logs an ERROR with one; each stops only with a documented exit
status (the bridge with its one-line :class:`BridgeError`); what the viewer
and the microphone client write holds no control character but their own
escape sequences, and is UTF-8 a strict terminal takes; the bridge writes
only audio files in its output folder, and a state file its next run
reads; the microphone client sends each block at most once per
connection, in capture order, declares lost audio only after the
connection's first block and never more than it dropped, and its queue's
count is the audio it holds.

The seed and the number of examples are fixed, so CI runs the same cases
every time; ``CLIENT_FUZZ_EXAMPLES=N`` runs more by hand. A failure shows
what the server sent. Hypothesis does not shrink it unless
``CLIENT_FUZZ_SHRINK=1``: each example runs real sockets whose timing
varies, so shrinking takes minutes and may end as a "flaky" report.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any
from unittest import mock

import mic_client
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from mic_client import run
from tts_bridge import BridgeConfig, BridgeError, TtsBridge, read_state
from tts_synth import EspeakSynth
from viewer import LiveWriter, watch
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from evoxtral_stream.events import SAMPLE_RATE
from tests.clients.test_mic_client import feed_without_portaudio
from tests.speech import have_espeak

EXAMPLES = int(os.environ.get("CLIENT_FUZZ_EXAMPLES", "0")) or None
SEED = 20240611
SHRINK = os.environ.get("CLIENT_FUZZ_SHRINK", "0") == "1"


def _fuzz(default: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Fixed seed, ``default`` examples (``$CLIENT_FUZZ_EXAMPLES`` for a long
    run), no deadline: each example runs real sockets (and espeak-ng)."""
    def wrap(test: Callable[..., None]) -> Callable[..., None]:
        return seed(SEED)(settings(
            max_examples=EXAMPLES or default, deadline=None, database=None,
            phases=[p for p in Phase if p is not Phase.shrink or SHRINK],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )(test))
    return wrap


# --- what a server may send --------------------------------------------------------------

MISSING = object()

#: Pieces of text that have broken clients: terminal controls, lone
#: surrogates (JSON carries them), path parts, URL and list separators.
NASTY = ["\x1b", "\x1b[2J", "\x1b]0;t\x07", "\x07", "\x00", "\n", "\r", "\x08", "\t", "\x7f",
         "\x9b", "\x85", "\ud800", "\udcff", "\udfff", "/", "\\", "..", ".", "%", "%2E", "+",
         ":", ",", "?", "#", "&", "=", " ", "é", "漢", "\u202e", "\ufeff", "[", "]",
         "[laughs]", "[sad]", "[whispers]", "word", "YES"]
any_char = st.characters(exclude_categories=())  # surrogates too
texts = (st.lists(st.sampled_from(NASTY) | st.text(any_char, max_size=4), max_size=8)
         .map("".join))
_LONG = ["x" * 3000, "é" * 1000, "\x1b" * 500, "/.." * 400, "\ud800" * 300, "[sad] " * 300]
long_texts = st.integers(0, len(_LONG) - 1).map(lambda i: _LONG[i])
numbers = (st.integers(-(10**6), 10**6)
           | st.sampled_from([0, -1, 2**31, 2**63, -(2**63), 10**30, 10**400, -(10**400)])
           | st.floats(allow_nan=True, allow_infinity=True))
scalars = st.none() | st.booleans() | numbers | texts
weird = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(texts, inner, max_size=3), max_leaves=6)

stream_ids = (st.sampled_from(["talk", "mic", "a", "", ".", "..", ".hidden", "../../escape",
                               "/abs/path", "a/b", "a\\b", "CON", "x" * 300, "é" * 150,
                               "\ud800", "a\udcffb", "a\x1b[2Jb", "a\nb", "%2E%2E", "a+2",
                               "a,b", "a:1", " sp "]) | texts)
seqs = st.integers(-3, 8) | st.sampled_from([10**18, 10**30, -(10**30)])


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each as often as its weight says (``one_of``
    takes a strategy given twice, and the branches of one given in it, as one)."""
    table = [s for w, s in choices for _ in range(w)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def field(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: most often ``plausible``, else anything, or left out."""
    return weighted((6, plausible), (2, weird), (1, st.just(MISSING)))


def event(kind: str | st.SearchStrategy[Any], **fields: st.SearchStrategy[Any]
          ) -> st.SearchStrategy[dict[str, Any]]:
    """An event of ``kind`` with ``fields`` (each maybe wrong or left out),
    and maybe a few fields no version of the protocol has."""
    kinds = st.just(kind) if isinstance(kind, str) else kind
    return st.builds(
        lambda k, values, extra: {**extra, "type": k,
                                  **{n: v for n, v in values.items() if v is not MISSING}},
        kinds, st.fixed_dictionaries({n: field(s) for n, s in fields.items()}),
        st.dictionaries(st.sampled_from(["x", "v2_field", "stream", "seq", "\ud800"]), weird,
                        max_size=2))


epochs = st.sampled_from(["e1", "e2", "3f9c0a51d2e87b46"]) | texts
tags = st.lists(st.fixed_dictionaries({"tag": field(texts), "kind": field(
    st.sampled_from(["emotion", "non-verbal", "delivery", "pause", "unknown"]) | texts),
    "index": field(numbers), "t": field(numbers)}).map(
        lambda tag: {k: v for k, v in tag.items() if v is not MISSING}) | weird, max_size=3)


def hello(streams: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return event("hello", v=st.just(1) | st.sampled_from([0, 2, "1", 1.0, True, None]),
                 server=texts, version=texts, backend=texts, epoch=epochs,
                 capabilities=st.lists(texts, max_size=3), streams=streams)


def first_frames(streams: st.SearchStrategy[Any]) -> st.SearchStrategy[str | bytes]:
    """What a subscriber gets first: most often a v1 hello (its other fields
    random), else anything."""
    v1 = hello(streams).map(lambda h: _dumps({**h, "v": 1}))
    return weighted((4, v1), (1, frames(stream_ids)))


def caption_events(stream: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    text = texts | long_texts
    return event("caption", stream=stream, segment=st.integers(-2, 6) | numbers, seq=seqs,
                 final=st.booleans(), text=text, plain_text=text, stable=text,
                 unstable=text, tags=tags, start=numbers, end=numbers, latency=numbers)


def events(stream: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return weighted((6, caption_events(stream)), (1, st.one_of(
        event("stream.started", stream=stream, source=texts),
        event("stream.ended", stream=stream, duration=numbers, segments=numbers,
              finals=numbers),
        event("gap", stream=stream, **{"from": seqs, "to": seqs | st.none()}),
        event("error", code=texts | st.sampled_from(["decode_failed", "stream_busy",
                                                     "bad_query"]),
              message=texts | long_texts, stream=stream, segment=numbers),
        hello(st.lists(stream, max_size=3)),
        event("ingest.ready", stream=stream, sample_rate=numbers, channels=numbers,
              format=texts, language=texts, progress=st.booleans(), epoch=epochs),
        event("ingest.progress", frames=st.integers(-1000, 40000) | numbers),
        event("ingest.summary", stream=stream, duration=numbers, segments=numbers,
              finals=numbers, partials=numbers, errors=numbers, lost=numbers),
        event(texts, stream=stream, seq=seqs))))


def _dumps(value: object) -> str:
    # ensure_ascii: a lone surrogate goes as its JSON escape, which a text
    # frame (UTF-8) can carry; NaN and Infinity as Python's JSON writes them.
    return json.dumps(value)


def frames(stream: st.SearchStrategy[Any]) -> st.SearchStrategy[str | bytes]:
    """One WebSocket message a server might send."""
    ev = events(stream).map(_dumps)
    return weighted(
        (12, ev),
        (1, weird.map(_dumps)),                                         # JSON, not an object
        (1, st.text(st.characters(codec="utf-8"), max_size=40)),  # not JSON
        (1, st.binary(max_size=40) | ev.map(str.encode)),               # binary frames
        (1, st.builds(lambda n, pair: pair[0] * n + "1" + pair[1] * n,  # deep nesting
                      st.integers(50, 100_000),
                      st.sampled_from([("[", "]"), ('{"a":', "}")]))),
    )


CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
               3000, 4000, 4999]
endings = weighted((2, st.just("abort")), (1, st.just("none")), (3, st.sampled_from(CLOSE_CODES)))


async def play(ws: ServerConnection, script: list[str | bytes], ending: object) -> None:
    """Send ``script``, then end as ``ending`` says: drop TCP, close without a
    code, or close with that code."""
    with contextlib.suppress(ConnectionClosed):
        for message in script:
            await ws.send(message)
        if ending == "abort":
            ws.transport.abort()
        elif ending == "none":  # a close frame without a code: 1005 at the client
            async with ws.send_context():
                ws.protocol.send_close()
        else:
            assert isinstance(ending, int)
            await ws.close(ending, "fuzz")


# --- what a client must not do -----------------------------------------------------------

# The clients' own escape sequences: SGR colours, clearing the live rows, and
# the CR LF between them.
_OWN_ESCAPES = re.compile(r"\x1b\[[0-9;]*m|\r(\x1b\[[0-9]+A)?\x1b\[J|\r\n")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def strict_terminal() -> tuple[io.TextIOWrapper, io.BytesIO]:
    """A text stream that, as a UTF-8 terminal's, refuses what UTF-8 cannot encode."""
    raw = io.BytesIO()
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True), raw


def assert_clean(raw: io.BytesIO, what: str) -> None:
    """``raw`` is UTF-8 with no control character but the clients' own escapes."""
    text = raw.getvalue().decode("utf-8")
    found = _CONTROL.search(_OWN_ESCAPES.sub("", text))
    assert found is None, f"{what} holds {found.group()!r}: {text[-400:]!r}"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def no_tracebacks_logged() -> Iterator[Records]:
    """Every log record meanwhile; fails on an ERROR (or worse) with a traceback
    (asyncio's "Task exception was never retrieved" among them)."""
    handler = Records()
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    bad = [r for r in handler.records if r.levelno >= logging.ERROR and r.exc_info]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


async def serving(handler: Callable[[ServerConnection], Awaitable[None]],
                  client: Callable[[str], Awaitable[None]]) -> None:
    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        await client(f"ws://127.0.0.1:{port}")


def _run(coro: Coroutine[Any, Any, None], script: list[str | bytes], ending: object) -> None:
    """Run one example on a fresh loop; on failure, show what the server sent."""
    try:
        asyncio.run(asyncio.wait_for(coro, 60))
    except BaseException as e:
        shown = [m[:300] for m in script]
        raise AssertionError(f"server sent {shown!r}, then {ending!r}") from e


# --- viewer.py ---------------------------------------------------------------------------


@_fuzz(60)
@given(first_frames(st.lists(stream_ids, max_size=3)),
       st.lists(frames(stream_ids), max_size=12), endings, st.booleans(), st.booleans(),
       st.lists(st.sampled_from(["talk", "a"]), max_size=1))
def test_the_viewer_survives_any_server(first: str | bytes, rest: list[str | bytes],
                                        ending: object, color: bool, live: bool,
                                        streams: list[str]) -> None:
    """The viewer shows what it can, ignores the rest, and ends only as its
    docs say (0 at the end of its streams, 1 refused or another version), or
    reconnects: the URL it then asks for is one a server can take."""
    script = [first, *rest]

    async def example() -> None:
        out, out_raw = strict_terminal()
        err, err_raw = strict_terminal()
        writer = LiveWriter(out, err, color=color, live=live, show_stream=len(streams) != 1)
        paths: list[str] = []
        again = asyncio.Event()

        async def handler(ws: ServerConnection) -> None:
            assert ws.request is not None
            paths.append(ws.request.path)
            if len(paths) == 1:
                await play(ws, script, ending)
            else:
                again.set()
                await ws.wait_closed()

        async def client(url: str) -> None:
            task = asyncio.ensure_future(watch(url, streams, {}, writer, exit_on_end=True,
                                               max_retry_s=0.001))
            waiting = asyncio.ensure_future(again.wait())
            await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if task.done():
                assert task.result() in (0, 1)
            else:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            writer.clear()

        with no_tracebacks_logged():
            await serving(handler, client)
        assert_clean(out_raw, "stdout")
        assert_clean(err_raw, "stderr")
        for path in paths:
            path.encode("ascii")

    _run(example(), script, ending)


# --- tts_bridge.py -------------------------------------------------------------------------

NEEDS_ESPEAK = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
# A file the bridge may write: a percent-encoded stream id (or %2E for its
# leading dots), a session mark, the segment, the extension.
_AUDIO_FILE = re.compile(r"(?:%2E)*[A-Za-z0-9_~%-][A-Za-z0-9._~%-]*(?:\+\d+)?-(?:-?\d+)\.wav"
                         r"|(?:\+\d+)?-(?:-?\d+)\.wav")

#: Finals the bridge takes (stream, segment, seq and text of the right
#: types), odd in every other way; odd ids and segments, seqs that repeat.
finals = st.builds(
    lambda stream, segment, seq, text, extra: _dumps(
        {**extra, "type": "caption", "stream": stream, "segment": segment, "seq": seq,
         "final": True, "text": text}),
    weighted((3, st.sampled_from(["talk", "a"])), (2, stream_ids)),
    weighted((6, st.integers(-2, 4)), (1, st.sampled_from([10**18, 10**300]))),
    st.integers(-1, 6), texts,
    st.fixed_dictionaries({}, optional={"start": numbers, "end": numbers, "tags": tags}))


def _bytes(message: str | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.encode()


@NEEDS_ESPEAK
@_fuzz(40)
@given(first_frames(st.lists(stream_ids, max_size=3)),
       st.lists(weighted((1, frames(stream_ids)), (1, finals)), max_size=8),
       endings, st.booleans(), st.booleans(), st.booleans())
def test_the_tts_bridge_survives_any_server(tmp_path_factory: pytest.TempPathFactory,
                                            first: str | bytes, rest: list[str | bytes],
                                            ending: object, reconnect: bool, state: bool,
                                            exit_on_end: bool) -> None:
    """The bridge speaks the finals it can, into files of its output folder
    only, and stops only as its docs say: at the end it was told to wait for,
    or with one line (:class:`BridgeError`, exit status 1)."""
    # Finals with long texts are left out here: espeak-ng would take seconds.
    script = [m if len(m) < 2000 or b'"final": true' not in _bytes(m) else _dumps({})
              for m in [first, *rest]]
    tmp = tmp_path_factory.mktemp("bridge")
    box = tmp / "box"
    box.mkdir()
    out = box / "out"
    state_file = tmp / "state.json" if state else None

    async def example() -> None:
        async def handler(ws: ServerConnection) -> None:
            if not handled:
                handled.append(1)
                await play(ws, script, ending)
            else:  # a reconnect: refused, which ends the bridge
                await ws.close(1008, "enough")

        handled: list[int] = []

        async def client(url: str) -> None:
            bridge = TtsBridge(BridgeConfig(out=out, url=url, reconnect=reconnect,
                                            reconnect_min_s=0.001, reconnect_max_s=0.002,
                                            exit_on_end=exit_on_end, state=state_file),
                               EspeakSynth())
            with contextlib.suppress(BridgeError):  # one line, exit status 1
                await bridge.run()

        with no_tracebacks_logged():
            await serving(handler, client)

    _run(example(), script, ending)
    assert [p.name for p in box.iterdir()] in ([], ["out"])
    if out.exists():
        for f in out.iterdir():
            assert f.is_file() and _AUDIO_FILE.fullmatch(f.name), f.name
    assert {p.name for p in tmp.iterdir()} <= {"box", "state.json"}
    if state_file is not None:
        read_state(state_file)  # what the next run reads: not "damaged"


# --- mic_client.py -------------------------------------------------------------------------

BLOCK = 320  # 20 ms, as the capture delivers


def ingest_ready(progress: bool, stream: object = "desk") -> str:
    return _dumps({"type": "ingest.ready", "stream": stream, "sample_rate": SAMPLE_RATE,
                   "channels": 1, "format": "pcm16", "language": "en", "progress": progress})


#: What answers the config: most often an ingest.ready (of an odd stream id
#: at times, or a field of another type), else anything.
first_answers = weighted(
    (3, st.builds(ingest_ready, st.booleans(), weighted(
        (3, st.just("desk")), (1, stream_ids), (1, st.sampled_from(["\ud800", "a\udcffb"])),
        (1, weird)))),
    (1, frames(stream_ids)))


@_fuzz(40)
@given(first_answers,
       st.lists(frames(stream_ids | st.just("desk")), max_size=12), endings,
       st.booleans(), st.integers(5, 60), st.booleans())
def test_the_mic_client_survives_any_server(first: str | bytes, rest: list[str | bytes],
                                            ending: object, reconnect: bool, blocks: int,
                                            acknowledge: bool) -> None:
    """The client streams on (reconnecting where its docs say) and ends with
    0 or 1; its blocks go in capture order, each at most once a connection;
    lost audio is declared after a connection's first block, never more than
    was dropped; its count of the audio it holds is right."""
    script = [first, *rest]

    async def example() -> None:
        out, out_raw = strict_terminal()
        err, err_raw = strict_terminal()
        writer = LiveWriter(out, err, color=False, live=True, show_stream=False)
        feed = feed_without_portaudio()
        feed.start = lambda status: setattr(feed, "_status", status)  # type: ignore[method-assign]
        received: list[list[int | tuple[str, object]]] = []
        stop = asyncio.Event()
        played = asyncio.Event()
        dropped = 0

        async def handler(ws: ServerConnection) -> None:
            got: list[int | tuple[str, object]] = []
            received.append(got)
            first_connection = len(received) == 1

            async def read() -> None:
                with contextlib.suppress(ConnectionClosed):
                    async for message in ws:
                        if isinstance(message, bytes):
                            assert message and len(message) % 2 == 0
                            got.append(int(np.frombuffer(message, "<i2")[0]))
                            continue
                        msg = json.loads(message)
                        got.append((msg["type"], msg.get("samples")))
                        if msg["type"] == "end" and not first_connection:
                            await ws.send(_dumps({"type": "ingest.summary", "stream": "desk",
                                                  "duration": 1.0}))
                            await ws.close(1000)

            reader = asyncio.ensure_future(read())
            try:
                if first_connection:
                    await play(ws, script, ending)
                    played.set()
                else:  # a reconnect: a server that behaves
                    with contextlib.suppress(ConnectionClosed):
                        await ws.send(ingest_ready(acknowledge))
                    await ws.wait_closed()
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

        async def capture() -> None:
            nonlocal dropped
            for value in range(1, blocks + 1):
                if value == blocks // 2:  # the rest after the script: a reconnect's turn
                    await played.wait()
                queued = feed.queue.qsize()
                feed._on_audio(np.full(BLOCK, value, np.int16))
                if feed.queue.qsize() == queued:
                    dropped += BLOCK
                await asyncio.sleep(0.001)
            stop.set()

        async def client(url: str) -> None:
            capturing = asyncio.ensure_future(capture())
            try:
                code = await run(url, "desk", feed, writer, stop=stop, reconnect=reconnect,
                                 backoff_s=(0.001, 0.002))
            finally:
                capturing.cancel()
            assert code in (0, 1)

        with no_tracebacks_logged(), mock.patch.object(mic_client, "MAX_QUEUED_BLOCKS", 8), \
                mock.patch.object(mic_client, "MAX_IN_FLIGHT_S", 0.1):
            await serving(handler, client)
        assert_clean(out_raw, "stdout")
        assert_clean(err_raw, "stderr")
        lost_received = 0
        for got in received:
            ids = [item for item in got if isinstance(item, int)]
            assert ids == sorted(set(ids)), f"blocks out of order or twice: {got}"
            for i, item in enumerate(got):
                if isinstance(item, tuple) and item[0] == "lost":
                    assert any(isinstance(x, int) for x in got[:i]), \
                        f"lost before the connection's first block: {got}"
                    assert isinstance(item[1], int) and item[1] > 0, got
                    lost_received += item[1]
        assert lost_received <= feed.declared <= dropped, (lost_received, feed.declared,
                                                            dropped)
        assert feed.declared + feed.undeclared <= dropped
        queued = []  # the run is over: what it left in the queue
        while not feed.queue.empty():
            queued.append(feed.queue.get_nowait())
        held = (sum(len(b) for _, b in queued)
                + (len(feed._unsent[1]) if feed._unsent is not None else 0)
                + sum(len(b) for _, b in feed._resend))
        assert feed._waiting == held

    _run(example(), script, ending)
