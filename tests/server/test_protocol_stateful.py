"""A Hypothesis state machine driving the real server over real WebSockets.

Publishers open ``/v1/ingest`` streams (a small pool of ids, reused after
they end, and unnamed ones) and push audio in several formats, ``lost``
messages, bad messages and fatal ones, then end (and reopen the id at once
from the summary on), close or vanish; subscribers of one, some or every
stream connect (resuming from a seq of any age, under the server's epoch
or another, while captions come too), talk, send bad queries and oversized
messages, and leave; the server shuts down, or restarts on its journal.
The model is docs/protocol.md: after every step the system is let settle
(each stream's decodes answered, each publisher's audio acknowledged by
``ingest.progress``) and each client's messages are compared with what the
model owes it, exactly:

- a subscriber gets its hello, the resume backlog the doc describes
  (retained captions after its seq, the journal's finals before them, a
  ``gap`` for what neither holds or for a seq of another numbering, the
  stream's ``stream.ended``), then every event of its streams in the
  engine's order, each once; one made while captions come gets that as of
  some moment of its handshake;
- a publisher gets ``ingest.ready``, then its own stream's events, its own
  refused messages' errors, and ``ingest.progress`` up to what it sent; at
  ``end``, ``stream.ended`` after the last final, ``ingest.summary`` and
  close 1000;
- a bad client gets the documented error and close code, and the others
  notice nothing (their checks go on);
- a subscriber that stops reading while its stream's captions come (a tiny
  ``server.subscriber_queue``, drawn at the start) is closed with 1013
  (``subscriber too slow``) once that queue overflows, after what it was
  sent before, in order, nothing skipped; the others get everything, and
  its resume from the last seq it got is the resume the doc describes;
- at a shutdown every client gets what it was owed (the drained finals,
  each stream's end), then 1001;
- the server's counts (and ``/metrics``) match the clients connected, and
  once every client has left it holds no stream and no subscriber.

Everything runs on one event loop that the machine owns (an
:class:`asyncio.Runner`); between steps the loop stands still, so the
clients' readers resume with the next step. The scripted model answers at
once, so a settled system has no event in flight: what a subscription made
then is owed is known exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import EngineEvent
from evoxtral_stream.server.app import CaptionServer
from evoxtral_stream.server.protocol import encode_event
from tests.docs_schema import validate_message
from tests.fakes import ScriptedBackend, words_so_far
from tests.helpers.audio import buzz, noise
from tests.helpers.http import http_get

T = TypeVar("T")
Msg = dict[str, Any]

POOL = ("a", "b")
HISTORY = 2            # server.history: small, so resumes reach past it
LIMIT = 16384          # server.max_message_bytes
MAX_STREAMS = 3        # server.max_streams
# server.subscriber_queue, drawn at the start: tiny, so a subscriber that
# stops reading is dropped after a few events, and not below what the engine
# may publish before a reader that keeps up is sent it (4 dropped one at times).
QUEUES = (8, 16)
# A ping (masked with a zero key): what a stalled subscriber fills the
# server's side of its connection with, 127 bytes of pong each.
PING = bytes([0x89, 0x80 | 125, 0, 0, 0, 0]) + b"p" * 125
SETTLE_S = 10.0        # generous: a loaded 2-core machine
FORMATS = [(16000, 1, "pcm16"), (48000, 2, "float32"), (22050, 1, "float32"),
           (8000, 3, "pcm16")]
# Errors a publisher's own message gets; any other error is about its stream.
OWN = {"bad_json", "bad_message", "odd_length", "too_large", "bad_audio", "not_configured",
       "bad_config", "bad_query", "stream_busy", "too_many_streams"}


@functools.cache
def audio(rate: int, channels: int, fmt: str, speech_s: float, silence_s: float) -> bytes:
    """``speech_s`` of a voiced buzz then ``silence_s`` of a quiet floor, as
    the ``config`` says: interleaved channels, little-endian."""
    parts = [buzz(speech_s, rate)] if speech_s else []
    mono = np.concatenate([*parts, noise(silence_s, rate=rate)])
    multi = np.stack([mono * (0.5 ** c) for c in range(channels)], axis=1)
    if fmt == "float32":
        return bytes(multi.astype("<f4").tobytes())
    return bytes(np.clip(np.rint(multi * 32767), -32768, 32767).astype("<i2").tobytes())


def frame_bytes(channels: int, fmt: str) -> int:
    return channels * (4 if fmt == "float32" else 2)


def chunk_frames(rate: int, fb: int) -> int:
    """The largest chunk that divides half a second and fits a message: every
    push of whole half seconds then ends on an ``ingest.progress``."""
    half = (rate + 1) // 2
    return max(n for n in range(1, LIMIT // fb + 1) if half % n == 0)


@dataclass
class Conn:
    """One client connection, reading from the start: what it has received,
    and what was wrong with it (a binary message, one the schema refuses)."""

    ws: ClientConnection
    msgs: list[Msg] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] = field(init=False)

    def __post_init__(self) -> None:
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.ws:
                if not isinstance(raw, str):
                    self.problems.append(f"a binary message: {raw!r:.80}")
                    continue
                try:
                    self.msgs.append(validate_message(raw))
                except Exception as e:  # noted; the comparison shows the rest
                    self.problems.append(f"{raw:.200}: {e!s:.300}")
                    self.msgs.append(json.loads(raw))

    async def closed(self) -> int | None:
        """Wait for the close; its code (1006: abnormal, None: not closed)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.reader), SETTLE_S)
        return self.ws.close_code


@dataclass
class Pub:
    """An open ingest connection."""

    conn: Conn
    stream: str
    start: int                     # the engine log's length when it opened
    rate: int
    channels: int
    fmt: str
    frames: int = 0                # frames of audio sent and taken
    lost: int = 0                  # frames declared lost
    errors: list[str] = field(default_factory=list)  # its own refused messages'


@dataclass
class Sub:
    """A connected subscriber."""

    conn: Conn
    streams: frozenset[str] | None
    start: int
    hello_streams: list[str]
    backlog: list[Msg]
    talked: int = 0


#: Every rule's precondition: the shutdown rule ends the run.
live = precondition(lambda self: not self.stopped)


def stream_events(msgs: list[Msg], stream: str) -> list[Msg]:
    """A stream's own events among an ingest connection's messages."""
    return [m for m in msgs if m.get("stream") == stream and (
        m["type"] in ("stream.started", "caption", "stream.ended")
        or (m["type"] == "error" and m["code"] not in OWN))]


class ProtocolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.failed = False
        self.stopped = False               # the shutdown rule ran: no more steps
        self.log: list[Msg] = []           # every engine event, as sent
        self.pubs: dict[str, Pub] = {}
        self.subs: list[Sub] = []
        self.dir = tempfile.mkdtemp(prefix="protocol-stateful-")
        self.run_start = 0                 # where this run of the server began in the log
        self.epoch: str | None = None
        self.dropped = 0                   # slow subscribers dropped by this server
        self.started = False

    @initialize(queue=st.sampled_from(QUEUES))
    def start(self, queue: int) -> None:
        self.queue = queue
        self.cfg = load_config(overrides={
            "server.port": 0, "server.history": HISTORY, "server.max_message_bytes": LIMIT,
            "server.max_streams": MAX_STREAMS, "server.idle_timeout_s": 0,
            "server.max_ingest_speed": 0, "server.subscriber_queue": queue,
            "journal.enabled": True, "journal.dir": self.dir, "journal.fsync": "never"})
        self.run(self._start())
        self.started = True

    # --- plumbing -----------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return self.runner.run(coro)
        except BaseException:
            self.failed = True
            raise

    async def _start(self) -> None:
        self.engine = Engine(self.cfg, ScriptedBackend(words_so_far))
        self.server = CaptionServer(self.engine, self.cfg.server)
        await self.engine.start()
        self.engine.add_listener(self._record)
        await self.server.start()
        # The journal keeps the numbering, and its epoch, across restarts.
        assert self.epoch in (None, self.engine.epoch)
        self.epoch = self.engine.epoch

    def _record(self, event: EngineEvent) -> None:
        self.log.append(json.loads(encode_event(event)))

    def url(self, path: str, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.server.port}{path}" + (f"?{query}" if query else "")

    async def connect(self, path: str, query: str = "") -> Conn:
        return Conn(await connect(self.url(path, query), max_size=None,
                                  open_timeout=SETTLE_S))

    def last_seq(self, stream: str) -> int:
        return max((m["seq"] for m in self.log if m["type"] == "caption"
                    and m["stream"] == stream), default=0)

    def quiet(self) -> bool:
        """No decode in flight, every publisher's audio taken, every client
        sent at least what it is owed."""
        for s in self.engine.streams.values():
            if s.session.partial_in_flight or s.session.finals_outstanding:
                return False
        if self.engine.stats().finals_backlog:
            return False
        for pub in self.pubs.values():
            progress = [m["frames"] for m in pub.conn.msgs if m["type"] == "ingest.progress"]
            if (progress[-1:] or [0])[-1] < pub.frames or \
                    len(stream_events(pub.conn.msgs, pub.stream)) < len(self.owed_pub(pub)) or \
                    sum(m["type"] == "error" and m["code"] in OWN
                        for m in pub.conn.msgs) < len(pub.errors):
                return False
        return all(len(sub.conn.msgs) - sub.talked >= 1 + len(sub.backlog) + len(
            self.owed_live(sub)) for sub in self.subs)

    async def settle(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_S):
                while not self.quiet():
                    await asyncio.sleep(0.005)
        # One more turn for anything owed to no one (an extra message).
        await asyncio.sleep(0.01)
        self.check()

    def owed_pub(self, pub: Pub) -> list[Msg]:
        return [m for m in self.log[pub.start:] if m["stream"] == pub.stream]

    def owed_live(self, sub: Sub) -> list[Msg]:
        return [m for m in self.log[sub.start:]
                if sub.streams is None or m["stream"] in sub.streams]

    def check(self) -> None:
        for conn in [s.conn for s in self.subs] + [p.conn for p in self.pubs.values()]:
            assert not conn.problems, conn.problems
        for sub in self.subs:
            assert not sub.conn.reader.done(), \
                f"subscriber {sub.streams} closed: {sub.conn.ws.close_code}"
            hello, *rest = sub.conn.msgs
            assert hello["type"] == "hello" and hello["epoch"] == self.engine.epoch
            assert hello["streams"] == sub.hello_streams
            talk = [m for m in rest if m["type"] == "error" and m["code"] == "unexpected_message"]
            assert len(talk) == sub.talked, (sub.talked, talk)
            got = [m for m in rest if m not in talk]
            owed = sub.backlog + self.owed_live(sub)
            assert got == owed, (f"subscriber of {sub.streams or 'all'}:\n"
                                 f"got  {[_short(m) for m in got]}\n"
                                 f"owed {[_short(m) for m in owed]}")
        for pub in self.pubs.values():
            self.check_pub(pub, closed=False)
        engine_streams = set(self.engine.streams)
        assert engine_streams == set(self.pubs), (engine_streams, set(self.pubs))
        # Each ingest connection is a subscriber of its own stream.
        assert self.server.broadcaster.subscribers == len(self.subs) + len(self.pubs)

    def check_pub(self, pub: Pub, *, closed: bool) -> None:
        msgs = pub.conn.msgs
        ready = msgs[0]
        assert ready["type"] == "ingest.ready" and ready["stream"] == pub.stream
        assert (ready["sample_rate"], ready["channels"], ready["format"], ready["progress"],
                ready["epoch"]) == (pub.rate, pub.channels, pub.fmt, True, self.engine.epoch)
        events = stream_events(msgs, pub.stream)
        owed = self.owed_pub(pub)
        if closed:
            # Cut off at its close: what it got is where the run stood then.
            assert events == owed[:len(events)], (events, owed)
        else:
            assert events == owed, (f"publisher {pub.stream}:\ngot  {[_short(m) for m in events]}"
                                    f"\nowed {[_short(m) for m in owed]}")
        own = [m["code"] for m in msgs if m["type"] == "error" and m["code"] in OWN]
        assert own == pub.errors
        progress = [m["frames"] for m in msgs if m["type"] == "ingest.progress"]
        assert progress == sorted(set(progress)) and all(p <= pub.frames for p in progress)
        if not closed:
            assert (progress[-1:] or [0])[-1] == pub.frames

    async def until_released(self, stream: str) -> None:
        """Until the server has finished with ``stream``: its finals out, its
        id free (a connection that vanished holds it until then)."""
        async with asyncio.timeout(SETTLE_S):
            while stream in self.engine.streams or \
                    self.server._slots.reserved(stream):
                await asyncio.sleep(0.005)

    # --- publishers -----------------------------------------------------------

    @live
    @rule(name=st.sampled_from([*POOL, None]), fmt=st.sampled_from(FORMATS))
    def open_publisher(self, name: str | None, fmt: tuple[int, int, str]) -> None:
        self.run(self._open_publisher(name, fmt))

    async def _open_publisher(self, name: str | None, fmt: tuple[int, int, str]) -> None:
        rate, channels, sample_format = fmt
        start = len(self.log)
        conn = await self.connect("/v1/ingest", f"stream={name}" if name else "")
        with contextlib.suppress(ConnectionClosed):  # refused before its config
            await conn.ws.send(json.dumps({"type": "config", "sample_rate": rate,
                                           "channels": channels, "format": sample_format,
                                           "progress": True}))
        async with asyncio.timeout(SETTLE_S):
            while not conn.msgs and not conn.reader.done():
                await asyncio.sleep(0.005)
        refusal = "stream_busy" if name in self.pubs else \
            "too_many_streams" if len(self.pubs) >= MAX_STREAMS else None
        if refusal is not None:
            code = await conn.closed()
            assert [m.get("code") for m in conn.msgs] == [refusal], conn.msgs
            assert name is None or conn.msgs[0].get("stream") == name
            assert code == 1008
        else:
            ready = conn.msgs[0]
            assert ready["type"] == "ingest.ready", conn.msgs
            stream = ready["stream"]
            if name is None:
                assert stream.startswith("ingest-") and not self.last_seq(stream)
                assert stream not in self.pubs and stream not in POOL
            self.pubs[stream] = Pub(conn, stream, start, rate, channels, sample_format)
        await self.settle()

    def pick(self, i: int) -> Pub:
        return self.pubs[sorted(self.pubs)[i % len(self.pubs)]]

    @precondition(lambda self: self.pubs)
    @live
    @rule(i=st.integers(0, 7), speech_s=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
          silence_s=st.sampled_from([0.0, 0.5, 1.0, 1.5]), times=st.integers(1, 3))
    def push(self, i: int, speech_s: float, silence_s: float, times: int) -> None:
        """Whole half seconds of audio, ``times`` over: a segment each when
        the speech is followed by enough silence (vad.end_silence_ms), else
        it stays open."""
        self.run(self._push(self.pick(i), speech_s, silence_s, times))

    async def _push(self, pub: Pub, speech_s: float, silence_s: float, times: int = 1) -> None:
        await self._send_audio(pub, speech_s, silence_s, times)
        await self.settle()

    @staticmethod
    async def _send_audio(pub: Pub, speech_s: float, silence_s: float, times: int = 1) -> None:
        data = audio(pub.rate, pub.channels, pub.fmt, speech_s, silence_s) * times
        fb = frame_bytes(pub.channels, pub.fmt)
        step = chunk_frames(pub.rate, fb) * fb
        for at in range(0, len(data), step):
            await pub.conn.ws.send(data[at:at + step])
            pub.frames += len(data[at:at + step]) // fb

    @precondition(lambda self: self.pubs)
    @live
    @rule(i=st.integers(0, 7), half_seconds=st.integers(0, 4))
    def lost(self, i: int, half_seconds: int) -> None:
        """Audio declared lost (silence in the timeline), then half a second
        of quiet audio, whose acknowledgement says the lost was taken."""
        pub = self.pick(i)
        samples = half_seconds * ((pub.rate + 1) // 2)

        async def go() -> None:
            await pub.conn.ws.send(json.dumps({"type": "lost", "samples": samples}))
            pub.lost += samples
            await pub.conn.ws.send(b"")  # no audio: ignored
            await self._push(pub, 0.0, 0.5)
        self.run(go())

    @precondition(lambda self: self.pubs)
    @live
    @rule(i=st.integers(0, 7), bad=st.sampled_from([
        ("{oops", "bad_json"), ("[1, 2]", "bad_message"), ('{"type": "cut"}', "bad_message"),
        ('{"type": "end", "type": "x"}', "bad_message"),
        ('{"type": "lost", "samples": -1}', "bad_message"),
        ('{"type": "lost", "samples": "160"}', "bad_message"),
        ('{"type": "config", "sample_rate": 16000}', "bad_message")]))
    def refused_message(self, i: int, bad: tuple[str, str]) -> None:
        """A message refused with an error; the stream goes on."""
        pub = self.pick(i)
        pub.errors.append(bad[1])

        async def go() -> None:
            await pub.conn.ws.send(bad[0])
            await self.settle()
        self.run(go())

    @precondition(lambda self: self.pubs)
    @live
    @rule(i=st.integers(0, 7), kind=st.sampled_from(
        ["odd_length", "too_large", "past_twice", "bad_utf8", "bad_audio"]))
    def fatal_message(self, i: int, kind: str) -> None:
        """A message that ends the connection: its error (where the doc
        names one) and close code; its audio so far still becomes finals."""
        self.run(self._fatal(self.pick(i), kind))

    async def _fatal(self, pub: Pub, kind: str) -> None:
        fb = frame_bytes(pub.channels, pub.fmt)
        error: str | None = kind
        if kind == "bad_audio" and pub.fmt != "float32":
            kind = error = "odd_length"
        text = False
        if kind == "odd_length":
            data = b"\x00" * (fb * 3 + 1)
            close = 1008
        elif kind == "too_large":
            data, close = b"\x00" * ((LIMIT // fb + 1) * fb), 1009
        elif kind == "past_twice":
            data, close, error = b"\x00" * (2 * LIMIT + fb), 1009, None
        elif kind == "bad_utf8":
            data, close, error, text = b"\xff\xfe", 1007, None, True
        else:
            nan = np.zeros(pub.channels * 4, "<f4")
            nan[1] = np.nan
            data, close = nan.tobytes(), 1008
        with contextlib.suppress(ConnectionClosed):
            await pub.conn.ws.send(data, text=text)
        if error is not None:
            pub.errors.append(error)
        code = await pub.conn.closed()
        assert code == close, (kind, code, pub.conn.msgs[-3:])
        await self.gone(pub)

    async def gone(self, pub: Pub) -> None:
        """A publisher closed without ``end``: its stream still ends, after
        its finals, for everyone else."""
        del self.pubs[pub.stream]
        await self.until_released(pub.stream)
        self.check_pub(pub, closed=True)
        owed = self.owed_pub(pub)
        assert owed[-1]["type"] == "stream.ended"
        assert [m["type"] for m in owed].count("stream.ended") == 1
        await self.settle()

    @precondition(lambda self: self.pubs)
    @live
    @rule(i=st.integers(0, 7), how=st.sampled_from(["end", "close", "abort"]))
    def leave_publisher(self, i: int, how: str) -> None:
        self.run(self._leave_publisher(self.pick(i), how))

    async def _leave_publisher(self, pub: Pub, how: str) -> None:
        ws = pub.conn.ws
        if how == "abort":
            ws.transport.abort()
        elif how == "close":
            await ws.close()
        else:
            await ws.send(json.dumps({"type": "end"}))
        code = await pub.conn.closed()
        if how != "end":
            await self.gone(pub)
            return
        del self.pubs[pub.stream]
        assert code == 1000, (code, pub.conn.msgs[-3:])
        msgs = pub.conn.msgs
        assert [m["type"] for m in msgs[-2:]] == ["stream.ended", "ingest.summary"], msgs[-3:]
        await self.until_released(pub.stream)
        owed = self.owed_pub(pub)
        assert stream_events(msgs, pub.stream) == owed
        summary = msgs[-1]
        finals = sum(m["type"] == "caption" and m["final"] for m in owed)
        assert (summary["stream"], summary["finals"], summary["errors"]) == (
            pub.stream, finals, 0)
        assert summary["duration"] == approx((pub.frames + pub.lost) / pub.rate)
        assert summary["lost"] == approx(pub.lost / pub.rate)
        progress = [m["frames"] for m in msgs if m["type"] == "ingest.progress"]
        assert (progress[-1:] or [0])[-1] == pub.frames
        # The last final comes before stream.ended, and nothing after it.
        assert owed[-1]["type"] == "stream.ended" and owed[-1]["finals"] == finals
        await self.settle()

    @precondition(lambda self: any(p in self.pubs for p in POOL))
    @live
    @rule(i=st.integers(0, 7), fmt=st.sampled_from(FORMATS))
    def end_and_reopen(self, i: int, fmt: tuple[int, int, str]) -> None:
        """docs/protocol.md, ingest step 5: the id is free from the summary
        on, so a new connection may open it before the old one has closed."""
        pub = self.pubs[sorted(p for p in POOL if p in self.pubs)[i % len(
            [p for p in POOL if p in self.pubs])]]

        async def go() -> None:
            await pub.conn.ws.send(json.dumps({"type": "end"}))
            async with asyncio.timeout(SETTLE_S):
                while not pub.conn.msgs or pub.conn.msgs[-1]["type"] != "ingest.summary":
                    await asyncio.sleep(0.001)
            del self.pubs[pub.stream]
            await self._open_publisher(pub.stream, fmt)
            assert pub.stream in self.pubs, "the id is not free after the summary"
            assert await pub.conn.closed() == 1000
            owed = [m for m in self.log[pub.start:self.pubs[pub.stream].start]
                    if m["stream"] == pub.stream]
            assert stream_events(pub.conn.msgs, pub.stream) == owed
        self.run(go())

    @live
    @rule(bad=st.sampled_from([
        ("stream=bad,id", None, "bad_query"), ("stream=a", b"\x00\x01", "not_configured"),
        ("stream=a", "{oops", "bad_json"), ("stream=a", "[1]", "bad_message"),
        ("stream=a", '{"type": "end"}', "not_configured"),
        ("stream=a", '{"type": "config", "sample_rate": 7999}', "bad_config"),
        ("stream=a", '{"type": "config", "sample_rate": 16000, "progress": 1}', "bad_config")]))
    def refused_publisher(self, bad: tuple[str, str | bytes | None, str]) -> None:
        """A connection refused before its stream opens: error, then 1008."""
        query, first, code = bad

        async def go() -> None:
            conn = await self.connect("/v1/ingest", query)
            if first is not None:
                with contextlib.suppress(ConnectionClosed):
                    await conn.ws.send(first)
            close = await conn.closed()
            # The stream id is held by an open publisher: that comes first.
            expected = "stream_busy" if "a" in self.pubs and query == "stream=a" else \
                "too_many_streams" if len(self.pubs) >= MAX_STREAMS and code != "bad_query" \
                else code
            assert [m.get("code") for m in conn.msgs] == [expected], conn.msgs
            assert close == 1008
            # The handler gives the id back once the close handshake is over.
            if "a" not in self.pubs:
                await self.until_released("a")
            await self.settle()
        self.run(go())

    # --- subscribers ------------------------------------------------------------

    @live
    @rule(streams=st.sampled_from([None, ("a",), ("b",), ("a", "b")]),
          repeat=st.booleans(),
          resume=st.lists(st.tuples(st.sampled_from(POOL), st.integers(-2, 30)), max_size=2,
                          unique_by=lambda r: r[0]),
          form=st.sampled_from(["item", "bare"]),
          epoch=st.sampled_from([None, "own", "0123abcd"]))
    def subscribe(self, streams: tuple[str, ...] | None, repeat: bool,
                  resume: list[tuple[str, int]], form: str, epoch: str | None) -> None:
        """``resume``: streams and how far back from their last seq to resume
        (below 0: ahead of it, a seq of another numbering), as ``S:SEQ``
        items or a bare ``SEQ`` (the first's, for every ``?stream=``);
        ``repeat``: ``?stream=`` once per stream instead of a list."""
        self.run(self._subscribe(streams, repeat, resume, form, epoch))

    async def _subscribe(self, streams: tuple[str, ...] | None, repeat: bool,
                         resume: list[tuple[str, int]], form: str, epoch: str | None) -> None:
        query, since, bad = self.captions_query(streams, repeat, resume, form, epoch)
        start = len(self.log)
        conn = await self.connect("/v1/captions", query)
        if bad:
            code = await conn.closed()
            assert [m.get("code") for m in conn.msgs] == ["bad_query"], conn.msgs
            assert code == 1008
            await self.settle()
            return
        renumbered = epoch is not None and epoch != "own"
        backlog = [m for name, seq in since.items() for m in self.replay(name, seq, renumbered)]
        chosen = None if streams is None else frozenset(streams)
        hello_streams = sorted(s for s in self.pubs if chosen is None or s in chosen)
        self.subs.append(Sub(conn, chosen, start, hello_streams, backlog))
        await self.settle()

    def captions_query(self, streams: tuple[str, ...] | None, repeat: bool,
                       resume: list[tuple[str, int]], form: str, epoch: str | None
                       ) -> tuple[str, dict[str, int], bool]:
        """The query of a subscription, its resume points, and whether the
        server must refuse it (bad_query)."""
        query = [f"stream={s}" for s in streams] if streams and repeat else \
            [f"stream={','.join(streams)}"] if streams else []
        seqs = {name: max(0, self.last_seq(name) - back) for name, back in resume}
        since: dict[str, int] = {}
        bad = False
        if seqs and form == "bare":
            seq = next(iter(seqs.values()))
            query.append(f"since={seq}")
            # A bare SEQ needs ?stream=, and stands for each of them.
            bad = not streams
            since = dict.fromkeys(streams or (), seq)
        elif seqs:
            query.append("since=" + ",".join(f"{n}:{q}" for n, q in seqs.items()))
            # A resume replays only the streams subscribed to.
            bad = streams is not None and not set(seqs) <= set(streams)
            since = seqs
        if epoch is not None:
            query.append(f"epoch={self.engine.epoch if epoch == 'own' else epoch}")
        return "&".join(query), since, bad

    @live
    @precondition(lambda self: self.pubs)
    @rule(i=st.integers(0, 7), streams=st.sampled_from([None, ("a",), ("b",), ("a", "b")]),
          resume=st.lists(st.tuples(st.sampled_from(POOL), st.integers(0, 30)), max_size=2,
                          unique_by=lambda r: r[0]),
          epoch=st.sampled_from([None, "own", "0123abcd"]),
          speech_s=st.sampled_from([1.0, 2.0, 3.0]))
    def subscribe_while_pushing(self, i: int, streams: tuple[str, ...] | None,
                                resume: list[tuple[str, int]], epoch: str | None,
                                speech_s: float) -> None:
        """A subscription (a resume too) made while a stream's captions come:
        what it gets is the replay as of some moment of its handshake, the
        live events after it (those during a journal read held in its
        resume window, partials coalesced), each once and in order."""
        self.run(self._subscribe_while_pushing(self.pick(i), streams, resume, epoch, speech_s))

    async def _subscribe_while_pushing(self, pub: Pub, streams: tuple[str, ...] | None,
                                       resume: list[tuple[str, int]], epoch: str | None,
                                       speech_s: float) -> None:
        if streams is not None:
            resume = [r for r in resume if r[0] in streams]
        query, since, bad = self.captions_query(streams, False, resume, "item", epoch)
        assert not bad
        given = {name: self.engine.last_seq(name) for name in since}
        first = len(self.log)
        pushing = asyncio.ensure_future(self._send_audio(pub, speech_s, 1.0))
        await asyncio.sleep(0.002 * speech_s)
        conn = await self.connect("/v1/captions", query)
        async with asyncio.timeout(SETTLE_S):
            while not conn.msgs:
                await asyncio.sleep(0.001)
        last = len(self.log)
        await pushing
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_S):
                while not self.quiet():
                    await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        renumbered = epoch is not None and epoch != "own"
        chosen = None if streams is None else frozenset(streams)
        got = conn.msgs[1:]
        # The moment of the replay (k) and the end of the resume window (j).
        fits = []
        for k in range(first, last + 1):
            backlog = [m for name, seq in since.items()
                       for m in self.replay(name, seq, renumbered, k, given[name])]
            for j in range(k, last + 1):
                held = coalesce([m for m in self.log[k:j] if chosen is None
                                 or m["stream"] in chosen])
                sub = Sub(conn, chosen, j, [], backlog + held)
                if got == sub.backlog + self.owed_live(sub):
                    fits.append(sub)
        assert fits, (f"no moment of the handshake explains what the subscriber got:\n"
                      f"got {[_short(m) for m in got]}\nlog "
                      f"{[_short(m) for m in self.log[first:]]} (handshake to {last - first})")
        sub = fits[0]
        sub.hello_streams = conn.msgs[0]["streams"]
        assert sub.hello_streams == sorted(s for s in self.pubs if chosen is None or s in chosen)
        self.subs.append(sub)
        await self.settle()

    def gap(self, stream: str, first: int, last: int | None) -> Msg:
        return {"type": "gap", "stream": stream, "from": first, "to": last}

    def replay(self, stream: str, since: int, renumbered: bool, upto: int | None = None,
               given_before: int = 0) -> list[Msg]:
        """docs/protocol.md, Resume: what a resume of ``stream`` after
        ``since`` gets before the live events, from the captions this run
        of the server retains and the journal's finals of every run; as of
        the log's first ``upto`` events when given (``given_before``: the
        stream's last seq given before the step that made them)."""
        if renumbered:
            head = [self.gap(stream, since + 1, None)] if since > 0 else []
            return head + self.replay(stream, 0, False, upto, given_before)
        log = self.log if upto is None else self.log[:upto]
        mine = [m for m in log if m["stream"] == stream]
        this_run = [m for m in log[self.run_start:] if m["stream"] == stream]
        kept = [m for m in this_run if m["type"] == "caption"][-HISTORY:]
        # The last seq given under the id, reserved ahead by the journal
        # included: a skip after a restart is no gap.
        given = self.engine.last_seq(stream) if upto is None else max(
            [given_before] + [m["seq"] for m in this_run if m["type"] == "caption"])
        if since > max(given, kept[-1]["seq"] if kept else 0):
            # Past every seq given: of another numbering.
            return [self.gap(stream, since + 1, None),
                    *self.replay(stream, 0, False, upto, given_before)]
        # Its end: of this run, else the journal's (which holds nothing of a
        # stream that never had a caption: no file, no end record).
        journaled = any(m["type"] == "caption" for m in mine)
        lifecycle = [m for m in (this_run if any(
            m["type"] == "stream.started" for m in this_run) or not journaled else mine)
            if m["type"] in ("stream.started", "stream.ended")]
        ended = lifecycle[-1:] if lifecycle and lifecycle[-1]["type"] == "stream.ended" else []
        first_kept = kept[0]["seq"] if kept else None
        if first_kept is not None and since + 1 >= first_kept:
            return [m for m in kept if m["seq"] > since] + ended
        # Reaching before what is retained: the journal's finals, the newest
        # HISTORY of them; a gap for the older ones.
        before = first_kept if first_kept is not None else given + 1
        finals = [m for m in mine if m["type"] == "caption" and m["final"]]
        older = [m for m in finals if since < m["seq"] < before][-HISTORY:]
        if not finals and not kept:
            # Nothing of it journaled nor retained (it had no caption).
            head = [self.gap(stream, since + 1, given)] if since < given else []
            return head + ended
        covered = older[0]["seq"] if len([m for m in finals if since < m["seq"] < before]) \
            > HISTORY else 1
        if first_kept is not None:
            covered = min(covered, first_kept)
        head = [self.gap(stream, since + 1, covered - 1)] if since + 1 < covered else []
        return head + older + [m for m in kept if m["seq"] > since] + ended

    def pick_sub(self, i: int) -> Sub:
        return self.subs[i % len(self.subs)]

    @precondition(lambda self: self.subs)
    @live
    @rule(i=st.integers(0, 7), kind=st.sampled_from(["text", "binary", "past_limit"]))
    def subscriber_talks(self, i: int, kind: str) -> None:
        """A subscriber that sends something gets unexpected_message and stays
        (past server.max_message_bytes too, up to the WebSocket layer's cut)."""
        sub = self.pick_sub(i)
        sub.talked += 1
        message: str | bytes = b"\x00\x01" if kind == "binary" else \
            "hello?" if kind == "text" else "x" * (LIMIT + 10)

        async def go() -> None:
            await sub.conn.ws.send(message)
            await self.settle()
        self.run(go())

    @precondition(lambda self: self.subs)
    @live
    @rule(i=st.integers(0, 7))
    def subscriber_oversized(self, i: int) -> None:
        """A message past twice server.max_message_bytes: the WebSocket layer
        closes the connection with 1009, no event; the others go on."""
        sub = self.subs.pop(i % len(self.subs))

        async def go() -> None:
            with contextlib.suppress(ConnectionClosed):
                await sub.conn.ws.send(b"\x00" * (2 * LIMIT + 1))
            assert await sub.conn.closed() == 1009
            assert all(m["type"] != "error" or m["code"] == "unexpected_message"
                       for m in sub.conn.msgs)
            await self.until_unsubscribed()
            await self.settle()
        self.run(go())

    @precondition(lambda self: self.subs)
    @live
    @rule(i=st.integers(0, 7), abrupt=st.booleans())
    def subscriber_leaves(self, i: int, abrupt: bool) -> None:
        sub = self.subs.pop(i % len(self.subs))

        async def go() -> None:
            if abrupt:
                sub.conn.ws.transport.abort()
            else:
                await sub.conn.ws.close()
            await sub.conn.closed()
            await self.until_unsubscribed()
            await self.settle()
        self.run(go())

    @precondition(lambda self: self.pubs)
    @live
    @rule(i=st.integers(0, 7), speech_s=st.sampled_from([0.5, 1.0]))
    def subscriber_stalls(self, i: int, speech_s: float) -> None:
        """docs/protocol.md, Subscribing: a subscriber of a stream that stops
        reading while its captions come is closed with 1013 (``subscriber
        too slow``) once it falls ``server.subscriber_queue`` messages
        behind, after what was already sent to it (in order, from its first,
        nothing skipped; it reads again at once, so it gets the close frame);
        the others get everything (checked as ever), and its resume with
        ``since=`` the last seq it got is what Resume says (and stays on)."""
        self.run(self._subscriber_stalls(self.pick(i), speech_s))

    async def _subscriber_stalls(self, pub: Pub, speech_s: float) -> None:
        stream = pub.stream
        # A small window in small segments: the server's kernel buffers for
        # this connection stay near 100 kB, not the megabytes of loopback.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.server.port))
        start = len(self.log)
        conn = Conn(await connect(self.url("/v1/captions", f"stream={stream}"), sock=sock,
                                  max_size=None, open_timeout=SETTLE_S))
        async with asyncio.timeout(SETTLE_S):
            while not conn.msgs:
                await asyncio.sleep(0.001)
        served = next(ws for ws in self.server._live
                      if ws.remote_address == conn.ws.local_address)
        # It stops reading its socket, and pings: the pongs fill the server's
        # buffers for it (its kernel's and its transport's 32 kB), so that
        # the next event's send waits and the events after it fill the queue
        # (captions alone would take hundreds).
        conn.ws.transport.pause_reading()
        async with asyncio.timeout(SETTLE_S):
            while not served.paused:
                conn.ws.transport.write(PING * 100)
                # Until the server has answered them: a few more than
                # needed, not thousands for the client to read later.
                for _ in range(20):
                    await asyncio.sleep(0.002)
                    if served.paused:
                        break
        stalled = len(self.log)
        dropped = self.server.broadcaster.dropped_subscribers
        # A segment at a time until it is dropped: a few more events than
        # the queue holds; a step makes 1 or 2.
        for _ in range(2 * self.queue + 4):
            if self.server.broadcaster.dropped_subscribers != dropped:
                break
            await self._send_audio(pub, speech_s, 0.5)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SETTLE_S):
                    while not self.quiet() and \
                            self.server.broadcaster.dropped_subscribers == dropped:
                        await asyncio.sleep(0.002)
        conn.ws.transport.resume_reading()
        made = len([m for m in self.log[stalled:] if m["stream"] == stream])
        assert self.server.broadcaster.dropped_subscribers == dropped + 1, \
            f"a subscriber {made} events behind (server.subscriber_queue {self.queue}) stays"
        self.dropped += 1
        assert await conn.closed() == 1013
        assert conn.ws.close_reason == "subscriber too slow"
        assert not conn.problems, conn.problems
        hello, *got = conn.msgs
        assert hello["type"] == "hello" and hello["streams"] == [stream]
        await self.settle()
        owed = [m for m in self.log[start:] if m["stream"] == stream]
        assert got == owed[:len(got)] and len(got) < len(owed), (
            f"stalled subscriber of {stream}:\ngot  {[_short(m) for m in got]}\n"
            f"owed {[_short(m) for m in owed]}")
        last = max((m["seq"] for m in got if m["type"] == "caption"), default=0)
        await self._subscribe((stream,), False, [(stream, self.last_seq(stream) - last)],
                              "item", "own")

    @live
    @rule(query=st.sampled_from(["since=x", "since=a:", "since=a:-1", "stream=a%01b",
                                 "since=a:1&epoch=bad%20epoch", "epoch=e1&epoch=e2",
                                 "stream=" + "x" * 129]))
    def bad_query(self, query: str) -> None:
        async def go() -> None:
            conn = await self.connect("/v1/captions", query)
            assert await conn.closed() == 1008
            assert [m.get("code") for m in conn.msgs] == ["bad_query"], conn.msgs
            await self.settle()
        self.run(go())

    async def until_unsubscribed(self) -> None:
        """Until the server has let go of the subscribers that left."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_S):
                while self.server.broadcaster.subscribers != len(self.subs) + len(self.pubs):
                    await asyncio.sleep(0.005)

    @rule()
    def scrape_metrics(self) -> None:
        """/metrics counts the clients connected now. The one rule left once
        the server has shut down: it does nothing then."""
        if self.stopped:
            return

        async def go() -> None:
            metrics = await self.metrics()
            assert metrics.get("evoxtral_subscribers") == len(self.subs) + len(self.pubs)
            assert metrics.get("evoxtral_streams_open") == len(self.pubs)
            assert metrics.get("evoxtral_subscribers_dropped_total") == self.dropped
        self.run(go())

    async def metrics(self) -> dict[str, float]:
        status, body = await http_get(f"http://127.0.0.1:{self.server.port}/metrics")
        assert status == 200, body
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.splitlines()
                if line and not line.startswith("#")}

    @live
    @rule()
    def shutdown(self) -> None:
        """As ``serve`` stops: the engine drains (open segments become finals,
        each stream ends), then the server closes every connection with 1001,
        after what it was sent. Ends the run."""
        self.run(self._shutdown())

    @live
    @rule()
    def restart(self) -> None:
        """The shutdown, then a new engine and server on the same journal:
        the numbering and the epoch go on; nothing is retained but the
        journal's finals."""
        async def go() -> None:
            await self._shutdown()
            await self.engine.aclose()
            self.stopped = False
            self.run_start = len(self.log)
            self.dropped = 0
            await self._start()
            await self.settle()
        self.run(go())

    async def _shutdown(self) -> None:
        assert await self.engine.drain()
        await self.server.aclose()
        for conn in [p.conn for p in self.pubs.values()] + [s.conn for s in self.subs]:
            assert await conn.closed() == 1001, conn.msgs[-3:]
        self.stopped = True
        for sub in self.subs:
            talk = [m for m in sub.conn.msgs[1:]
                    if m["type"] == "error" and m["code"] == "unexpected_message"]
            got = [m for m in sub.conn.msgs[1:] if m not in talk]
            assert got == sub.backlog + self.owed_live(sub), [_short(m) for m in got]
        for pub in self.pubs.values():
            owed = self.owed_pub(pub)
            assert owed[-1]["type"] == "stream.ended"
            assert stream_events(pub.conn.msgs, pub.stream) == owed
        self.pubs.clear()
        self.subs.clear()

    # --- the end ----------------------------------------------------------------

    def teardown(self) -> None:
        if not self.started:  # the start failed: nothing to stop
            self.runner.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        try:
            problems = self.run(self._leave_all())
            if not self.failed:
                assert not problems, problems
        finally:
            try:
                self.runner.run(self._stop())
            finally:
                self.runner.close()
                shutil.rmtree(self.dir, ignore_errors=True)

    async def _leave_all(self) -> list[str]:
        """Every client leaves; the server must hold nothing of them."""
        for pub in list(self.pubs.values()):
            pub.conn.ws.transport.abort()
        for sub in self.subs:
            sub.conn.ws.transport.abort()
        for conn in [p.conn for p in self.pubs.values()] + [s.conn for s in self.subs]:
            await conn.closed()
        self.pubs.clear()
        self.subs.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_S):
                while self.engine.streams or self.server.broadcaster.subscribers or \
                        self.server._live:
                    await asyncio.sleep(0.005)
        problems = []
        if self.engine.streams or self.server.broadcaster.subscribers or \
                self.server._live:
            problems.append(f"left: streams {sorted(self.engine.streams)}, subscribers "
                            f"{self.server.broadcaster.subscribers}, connections "
                            f"{len(self.server._live)}")
        if self.stopped:
            return problems
        metrics = await self.metrics()
        if metrics.get("evoxtral_subscribers") != 0 or \
                metrics.get("evoxtral_streams_open") != 0:
            problems.append(f"/metrics: subscribers "
                            f"{metrics.get('evoxtral_subscribers')} streams "
                            f"{metrics.get('evoxtral_streams_open')}")
        return problems

    async def _stop(self) -> None:
        for conn in [p.conn for p in self.pubs.values()] + [s.conn for s in self.subs]:
            conn.ws.transport.abort()
        await asyncio.wait_for(self.server.aclose(), SETTLE_S)
        await asyncio.wait_for(self.engine.aclose(), SETTLE_S)


def approx(x: float) -> Any:
    # The resampler's rounding at rates that are no multiple of 16 kHz.
    return pytest.approx(x, abs=0.01)


def coalesce(events: list[Msg]) -> list[Msg]:
    """A resume window's events (broadcast.ResumeWindow): a later partial of
    a segment, or its final, replaces the earlier partial; a stream's
    start or end keeps its earlier partials from being replaced."""
    held: dict[int, Msg] = {}
    partial: dict[tuple[str, int], int] = {}
    for n, m in enumerate(events):
        if m["type"] == "caption":
            earlier = partial.pop((m["stream"], m["segment"]), None)
            if earlier is not None:
                del held[earlier]
            if not m["final"]:
                partial[(m["stream"], m["segment"])] = n
        elif m["type"] in ("stream.started", "stream.ended"):
            partial = {k: v for k, v in partial.items() if k[0] != m["stream"]}
        held[n] = m
    return list(held.values())


def _short(m: Msg) -> str:
    if m["type"] == "caption":
        return f"{m['stream']}:{m['seq']}{'F' if m['final'] else 'p'}"
    if m["type"] == "gap":
        return f"gap {m['stream']} {m['from']}-{m['to']}"
    return f"{m['type']} {m.get('stream')}"


ProtocolMachine.TestCase.settings = settings(
    # STATEFUL_EXAMPLES raises the count for a long hunt by hand.
    max_examples=int(os.environ.get("STATEFUL_EXAMPLES", "25")), stateful_step_count=22,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestProtocol = ProtocolMachine.TestCase


def test_a_subscriber_that_stalls_is_dropped_and_resumes() -> None:
    """The stalled subscriber on every run (the machine draws it seldom): a
    stream's subscriber stalls while its captions come, beside one of every
    stream; its resumed subscription goes on through a push and a restart."""
    state = ProtocolMachine()
    try:
        state.start(QUEUES[0])
        state.subscribe(None, False, [], "item", None)
        state.open_publisher("a", FORMATS[0])
        state.subscriber_stalls(0, 0.5)
        state.push(0, 1.0, 1.0, 1)
        state.scrape_metrics()
        state.restart()
        state.scrape_metrics()
    finally:
        state.teardown()
