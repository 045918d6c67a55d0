"""A seeded random driver of ``/v1/ingest`` and ``/v1/captions`` over a real server.

:func:`run_sequence` starts an :class:`Engine` (a scripted backend: the
model does not matter here) and a :class:`CaptionServer` with settings drawn
from the seed, then runs waves of ingest connections and caption subscribers
at once. Each sends a random but plausible script drawn from the seed: valid
and invalid configs, audio messages of random sizes (empty, odd, oversized,
text instead of binary), malformed JSON, unknown types, duplicates, ``lost``
messages, ``end``, abrupt disconnects, reconnects under the same stream id;
subscribers with ``?stream=`` filters, ``since=`` resumes and epochs, ones
that talk, stall or vanish. The scripts are deterministic; the interleaving
is whatever the event loop makes of them, so the checks allow every order
the protocol allows and nothing else.

After the waves a marker stream (``fuzz-end``, in every subscriber's
filter) is ingested: its ``stream.ended`` is the last event, so a subscriber
that has it has everything. Some sequences instead shut the server down
during the last wave, half of them as soon as a segment is open, so the
drain owes a final. Then the server and engine shut down, and
:func:`check` holds what was received against docs/protocol.md and the
engine's own record of its events (every segment captioned has its final,
and ``stream.ended`` counts what was sent). It returns the problems found (empty:
none), each naming the connection, so a failing seed can be read and rerun.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from evoxtral_stream.audio.resample import int16_to_float32, resample
from evoxtral_stream.config import Config, load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import (
    SAMPLE_RATE,
    EngineEvent,
    Int16Array,
    StreamStarted,
)
from evoxtral_stream.server.app import CLOSE_TIMEOUT_S, CaptionServer
from evoxtral_stream.server.protocol import encode_event
from tests.docs_schema import validate_message
from tests.fakes import ScriptedBackend
from tests.helpers.http import raw_ws_handshake
from tests.speech import speech_with_pauses

__all__ = ["MARKER", "Clips", "Outcome", "check", "run_sequence"]

MARKER = "fuzz-end"
POOL = ("a", "b", "c")
SENTENCES = ["Good evening and welcome to the live captioning demo.",
             "Thank you for listening, and have a wonderful night."]
LIMIT = 16384                     # server.max_message_bytes in every sequence
# server.idle_timeout_s. It runs on the event loop's clock, shared with the
# clients: a loop starved that long (a loaded 2-core CI machine) times out a
# client whose next messages wait unread in the socket. 2 s lost one run.
IDLE_S = 4.0
HANDSHAKE_S = 1.0                 # server.handshake_timeout_s
RATES = (8000, 16000, 22050, 44100, 48000)
# Wide captions (each word padded) so a subscriber that stops reading falls
# behind on bytes, as it would on a busy server, within a short run.
PAD = "x" * 2000


def _script(audio: npt.NDArray[np.float32]) -> str:
    """The scripted model: one wide word per half second of audio."""
    return " ".join(f"w{i}{PAD}" for i in range(len(audio) // 8000))


Terminal = Literal["end", "end_twice", "abort", "close", "idle", "fatal"]
Behaviour = Literal["read", "talk", "pause", "vanish", "stall"]
#: How an ingest connection that survives its messages ends, and how often.
ENDINGS: tuple[list[Terminal], list[int]] = (["end", "end_twice", "abort", "close", "idle"],
                                             [50, 8, 15, 12, 5])
BEHAVIOURS: tuple[list[Behaviour], list[int]] = (["read", "talk", "pause", "vanish", "stall"],
                                                 [45, 12, 15, 13, 15])


@dataclass
class Step:
    """One client message and what the server must do with it."""

    data: str | bytes
    text: bool | None = None       # send bytes as a text frame (invalid UTF-8)
    error: str | None = None       # the error event it must get
    frames: int = 0                # sample frames of accepted binary audio
    lost: int = 0                  # frames of accepted lost audio


@dataclass
class IngestPlan:
    """One ingest connection: its messages and how it must end."""

    name: str
    stream: str | None             # None: unnamed (ingest-N)
    first: Step | None             # a bad first message (refused), or None
    config: dict[str, Any]
    steps: list[Step]
    terminal: Terminal
    close: int | None              # the close code expected (None: any; we aborted)
    pause_reading_s: float         # the reader stops this long after ingest.ready
    silent: bool = False           # sends nothing at all: handshake_timeout


@dataclass
class SubPlan:
    """One subscriber; a ``since`` item ``STREAM:~N`` is resolved when it
    connects, to N before the stream's last seq then."""

    name: str
    streams: list[str] | None
    since: str | None
    epoch: str | None
    behaviour: Behaviour
    delay_s: float
    bad_query: bool
    talk_at: list[int] = field(default_factory=list)


@dataclass
class Received:
    """What one connection got: (loop time, message) pairs and how it closed."""

    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    close_code: int | None = None
    t_hello: float | None = None
    t_stop: float | None = None    # stopped reading (vanished) at
    sent: int = 0                  # messages a subscriber sent (each owes an error)
    connected: bool = False        # its opening handshake is over (or failed)
    problems: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    seed: int
    cfg: dict[str, object]
    ingests: list[tuple[IngestPlan, Received]]
    subs: list[tuple[SubPlan, Received]]
    engine_log: list[tuple[float, EngineEvent, dict[str, Any]]]
    epoch: str
    shutdown_s: float
    errors: list[str]              # ERROR log records (with exc_info: tracebacks)
    interrupted: set[str]          # ingest plans cut by the server's shutdown
    dropped: int                   # connections the server closed as too slow
    owed_at_drain: int = 0         # segments open (a partial, no final) as the drain began


# --- audio --------------------------------------------------------------------


class Clips:
    """The test speech in every format a plan may configure, made once."""

    def __init__(self) -> None:
        audio, _ = speech_with_pauses(SENTENCES, pause_s=0.9, lead_s=0.3)
        self.audio: Int16Array = audio
        self._cache: dict[tuple[int, int, str], bytes] = {}

    def get(self, rate: int, channels: int, fmt: str) -> bytes:
        key = (rate, channels, fmt)
        if key not in self._cache:
            mono = resample(int16_to_float32(self.audio), SAMPLE_RATE, rate)
            multi = np.stack([mono * (0.5 ** c) for c in range(channels)], axis=1)
            if fmt == "float32":
                self._cache[key] = multi.astype("<f4").tobytes()
            else:
                self._cache[key] = np.clip(multi * 32768, -32768, 32767).astype(
                    "<i2").tobytes()
        return self._cache[key]


# --- plans --------------------------------------------------------------------


def _bad_first(rng: random.Random) -> Step:
    return rng.choice([
        Step(b"\x00\x01", error="not_configured"),
        Step("{oops", error="bad_json"),
        Step("[1, 2]", error="bad_message"),
        Step(json.dumps({"type": "cut"}), error="bad_message"),
        Step(json.dumps({"type": "end"}), error="not_configured"),
        Step(json.dumps({"type": "lost", "samples": 160}), error="not_configured"),
        Step(json.dumps({"type": "config", "sample_rate": rng.choice([0, 7999, 192001])}),
             error="bad_config"),
        Step(json.dumps({"type": "config", "sample_rate": 16000, "channels": 9}),
             error="bad_config"),
        Step(json.dumps({"type": "config", "sample_rate": 16000, "format": "mp3"}),
             error="bad_config"),
        Step(json.dumps({"type": "config", "sample_rate": 16000, "progress": "yes"}),
             error="bad_config"),
        Step(json.dumps({"type": "config", "sample_rate": 16000, "language": "xx"}),
             error="bad_config"),
        Step(json.dumps({"type": "config", "sample_rate": 16000, "adapter": "rl"}),
             error="bad_config"),
    ])


def _frame_bytes(cfg: dict[str, Any]) -> int:
    return int(cfg.get("channels", 1)) * (4 if cfg.get("format") == "float32" else 2)


def _misc(rng: random.Random, cfg: dict[str, Any], last: Step | None) -> Step:
    """A text message (or a binary one that is not audio) that the stream survives."""
    rate = int(cfg["sample_rate"])
    fb = _frame_bytes(cfg)
    choice = rng.randrange(10)
    if choice == 0:
        return Step(rng.choice(["{oops", "", "nul\x00l", '{"type": "end"']),
                    error="bad_json")
    if choice == 1:
        return Step(rng.choice(["[]", "3", '"end"', "null", "1e99999"]), error="bad_message")
    if choice == 2:
        return Step(json.dumps({"type": rng.choice(["cut", "commit", "config2", "END"])}),
                    error="bad_message")
    if choice == 3:
        return Step(json.dumps({**cfg, "type": "config"}), error="bad_message")
    if choice == 4:
        n = rng.choice([0, 1, rate // 10, rate])
        return Step(json.dumps({"type": "lost", "samples": n}), lost=n)
    if choice == 5:
        bad: object = rng.choice([-1, rate * 600 + 1, "160", 1.5, None, True])
        return Step(json.dumps({"type": "lost", "samples": bad}), error="bad_message")
    if choice == 6 and last is not None:
        return Step(last.data, last.text, last.error, last.frames, last.lost)  # duplicate
    if choice == 7:
        # Audio bytes sent as a text frame: not JSON.
        return Step("\x01\x02" + "A" * rng.randrange(0, 64), error="bad_json")
    if choice == 8:
        # The config as binary: audio to the server, if it has whole frames.
        data = json.dumps({**cfg, "type": "config"}).encode()
        data = data[: len(data) // fb * fb]
        if cfg.get("format") == "float32" and not np.isfinite(
                np.frombuffer(data, "<f4")).all():
            data = b""
        return Step(data, frames=len(data) // fb)
    return Step(b"", frames=0)  # an empty binary message


def _fatal(rng: random.Random, cfg: dict[str, Any]) -> tuple[Step, int]:
    fb = _frame_bytes(cfg)
    choice = rng.randrange(4 if cfg.get("format") == "float32" else 3)
    if choice == 0:
        return Step(b"\x00" * (fb * rng.randrange(0, 50) + rng.randrange(1, fb)),
                    error="odd_length"), 1008
    if choice == 1:
        n = rng.randrange(LIMIT // fb + 1, 2 * LIMIT // fb + 1) * fb
        return Step(b"\x00" * n, error="too_large"), 1009
    if choice == 2:
        return Step(b"\x00" * (2 * LIMIT + fb * rng.randrange(1, 100))), 1009  # websockets'
    nan = np.zeros(rng.randrange(1, 100) * int(cfg.get("channels", 1)), "<f4")
    nan[rng.randrange(len(nan))] = rng.choice([np.nan, np.inf, -np.inf])
    return Step(nan.tobytes(), error="bad_audio"), 1008


def plan_ingest(rng: random.Random, name: str, clips: Clips) -> IngestPlan:
    roll = rng.random()
    stream: str | None = rng.choice(POOL) if roll < 0.8 else None if roll < 0.95 else "bad,id"
    cfg: dict[str, Any] = {"type": "config", "sample_rate": rng.choice(RATES)}
    if rng.random() < 0.6:
        cfg["channels"] = rng.choice([1, 1, 2, 3])
    if rng.random() < 0.6:
        cfg["format"] = rng.choice(["pcm16", "float32"])
    if rng.random() < 0.4:
        cfg["progress"] = rng.random() < 0.7
    if rng.random() < 0.2:
        cfg["language"] = "en"
    pause = rng.choice([0.0] * 6 + [0.3, 1.0])
    if stream == "bad,id":
        return IngestPlan(name, stream, None, cfg, [], "fatal", 1008, pause)
    if rng.random() < 0.03:
        return IngestPlan(name, stream, None, cfg, [], "fatal", 1008, pause, silent=True)
    if rng.random() < 0.12:
        return IngestPlan(name, stream, _bad_first(rng), cfg, [], "fatal", 1008, pause)
    data = clips.get(cfg["sample_rate"], cfg.get("channels", 1), cfg.get("format", "pcm16"))
    fb = _frame_bytes(cfg)
    pos = rng.randrange(0, len(data) // 4) // fb * fb
    end = min(len(data), pos + int(rng.uniform(0, 8) * cfg["sample_rate"]) * fb)
    steps: list[Step] = []
    last: Step | None = None
    fatal_at = rng.randrange(0, 40) if rng.random() < 0.2 else -1
    close: int | None = 1000
    terminal: Terminal = rng.choices(*ENDINGS)[0]
    while pos < end or len(steps) < 2:
        if len(steps) == fatal_at:
            step, close = _fatal(rng, cfg)
            steps.append(step)
            terminal = "fatal"
            break
        if rng.random() < 0.8 and pos < end:
            n = LIMIT // fb if rng.random() < 0.7 else rng.choice([1, 3, 160, 441, 1000])
            chunk = data[pos: pos + n * fb]
            pos += len(chunk)
            step = Step(chunk, frames=len(chunk) // fb)
        else:
            step = _misc(rng, cfg, last)
        steps.append(step)
        last = step
        if len(steps) > 400:
            break
    if terminal == "idle":
        close = 1008
    elif terminal == "abort":
        close = None
    return IngestPlan(name, stream, None, cfg, steps, terminal, close, pause)


def plan_sub(rng: random.Random, name: str, epoch: str) -> SubPlan:
    streams = None if rng.random() < 0.4 else [*rng.sample(POOL, rng.randrange(1, 3)), MARKER]
    since: str | None = None
    bad = False
    roll = rng.random()
    choices = streams[:-1] if streams else list(POOL)
    if roll < 0.35:
        # "~N": N back from the stream's last seq when the client connects,
        # as a client that was away a while resumes; else a seq of any age.
        since = ",".join(f"{s}:" + (f"~{rng.randrange(0, 12)}" if rng.random() < 0.6
                                    else str(rng.randrange(0, 30)))
                         for s in rng.sample(choices, rng.randrange(1, len(choices) + 1)))
    elif roll < 0.45 and streams:
        since = str(rng.randrange(0, 30))
    elif roll < 0.5:
        since, bad = rng.choice(["x", "a:", ":3", "a:-1", "a:1.5"]), True
    elif roll < 0.53 and streams:
        since, bad = "zzz:3", True     # a stream not among ?stream=
    elif roll < 0.55 and not streams:
        since, bad = "4", True          # a bare SEQ without ?stream=
    ep_roll = rng.random()
    ep = None if ep_roll < 0.6 else epoch if ep_roll < 0.8 else "0123abcd" if ep_roll < 0.97 \
        else "bad epoch!"
    bad = bad or ep == "bad epoch!"
    behaviour = rng.choices(*BEHAVIOURS)[0]
    talk_at = sorted(rng.sample(range(1, 40), rng.randrange(1, 3))) if behaviour == "talk" else []
    return SubPlan(name, streams, since, ep, behaviour, rng.uniform(0, 0.6), bad, talk_at)


# --- running ------------------------------------------------------------------


def _url(port: int, path: str, query: list[tuple[str, str]]) -> str:
    from urllib.parse import urlencode
    q = urlencode(query, safe=",:")
    return f"ws://127.0.0.1:{port}{path}" + (f"?{q}" if q else "")


async def _read(ws: ClientConnection, got: Received, loop: asyncio.AbstractEventLoop,
                until: Callable[[dict[str, Any]], bool] | None = None) -> None:
    """Record every message until the connection closes (or ``until`` one)."""
    try:
        while True:
            raw = await ws.recv()
            try:
                msg = validate_message(raw if isinstance(raw, str) else raw.decode())
            except Exception as e:  # a schema violation is a finding, not a crash
                got.problems.append(f"invalid message {raw!r:.200}: {e!s:.300}")
                msg = json.loads(raw)
            got.messages.append((loop.time(), msg))
            if msg["type"] == "hello" and got.t_hello is None:
                got.t_hello = loop.time()
            if until is not None and until(msg):
                return
    except ConnectionClosed:
        pass
    finally:
        got.close_code = ws.close_code


async def run_ingest(port: int, plan: IngestPlan) -> Received:
    loop = asyncio.get_running_loop()
    got = Received()
    query = [("stream", plan.stream)] if plan.stream is not None else []
    try:
        ws = await connect(_url(port, "/v1/ingest", query), max_size=None)
    except (OSError, InvalidStatus) as e:
        got.problems.append(f"cannot connect: {e!r:.200}")
        return got
    reader: asyncio.Task[None] | None = None
    try:
        if plan.silent:
            await _read(ws, got, loop)
            return got
        first = plan.first.data if plan.first is not None else json.dumps(plan.config)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(first)
        if plan.first is not None or plan.stream == "bad,id":
            await _read(ws, got, loop)
            return got
        # ingest.ready (or a refusal) before the audio.
        await _read(ws, got, loop, until=lambda m: True)
        if not got.messages or got.messages[0][1]["type"] != "ingest.ready":
            await _read(ws, got, loop)
            return got

        async def read_rest() -> None:
            if plan.pause_reading_s:
                await asyncio.sleep(plan.pause_reading_s)
            await _read(ws, got, loop)

        reader = asyncio.ensure_future(read_rest())
        try:
            for i, step in enumerate(plan.steps):
                await ws.send(step.data, text=step.text)
                if i % 4 == 0:
                    await asyncio.sleep(0)
            if plan.terminal in ("end", "end_twice"):
                await ws.send(json.dumps({"type": "end"}))
                if plan.terminal == "end_twice":
                    await ws.send(json.dumps({"type": "end"}))
            elif plan.terminal == "abort":
                ws.transport.abort()
            elif plan.terminal == "close":
                await ws.close()
        except ConnectionClosed as e:
            if plan.terminal != "fatal":
                got.problems.append(f"the server closed the connection while the client "
                                    f"still sent: {e}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), 30)
        return got
    finally:
        if reader is not None and not reader.done():
            reader.cancel()
            got.problems.append("did not close within 30 s of its last message")
        ws.transport.abort()


async def run_sub(port: int, plan: SubPlan, got: Received, stop: asyncio.Event,
                  last_seq: Callable[[str], int]) -> None:
    """Run one subscriber, recording into ``got``, until ``stop`` (or its plan ends it).
    ``last_seq``: the server's last seq of a stream, for a ``since`` of ``~N``."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(plan.delay_s)
    if plan.since is not None and "~" in plan.since:
        plan.since = ",".join(
            f"{s}:{max(0, last_seq(s) - int(n[1:]))}" if n.startswith("~") else f"{s}:{n}"
            for s, _, n in (item.partition(":") for item in plan.since.split(",")))
    query: list[tuple[str, str]] = []
    if plan.streams is not None:
        query.append(("stream", ",".join(plan.streams)))
    if plan.since is not None:
        query.append(("since", plan.since))
    if plan.epoch is not None:
        query.append(("epoch", plan.epoch))
    url = _url(port, "/v1/captions", query)
    if plan.behaviour == "stall":
        # Completes the handshake and never reads (nor closes) until the end.
        path = url.split(str(port), 1)[1]
        try:
            sock: socket.socket = await asyncio.to_thread(raw_ws_handshake, port, path)
        finally:
            got.connected = True
        try:
            await stop.wait()
        finally:
            sock.close()
        return
    try:
        ws = await connect(url, max_size=None, max_queue=4)
    finally:
        got.connected = True
    async with ws:
        reader = asyncio.ensure_future(_read(ws, got, loop))
        try:
            if plan.behaviour == "pause":
                await asyncio.sleep(0)
                reader.cancel()   # stops reading: websockets stops taking from the socket
                await asyncio.gather(reader, return_exceptions=True)
                await asyncio.sleep(random.Random(plan.name).uniform(0.5, 3))
                reader = asyncio.ensure_future(_read(ws, got, loop))
            elif plan.behaviour == "vanish":
                await asyncio.sleep(random.Random(plan.name).uniform(0.1, 2))
                got.t_stop = loop.time()
                ws.transport.abort()
                return
            elif plan.behaviour == "talk":
                for n in plan.talk_at:
                    while len(got.messages) < n and not reader.done() and not _has_marker(got):
                        await asyncio.sleep(0.01)
                    if reader.done() or _has_marker(got):
                        break
                    with contextlib.suppress(ConnectionClosed):
                        await ws.send(_chatter(n))
                        got.sent += 1
                    # Its answer comes before the marker's end: wait for it.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(10):
                            while _talked(got) < got.sent and not reader.done():
                                await asyncio.sleep(0.01)
            waiter = asyncio.ensure_future(stop.wait())
            await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        finally:
            if not reader.done():
                got.t_stop = loop.time()
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)


def _chatter(n: int) -> str:
    """What a talking subscriber says (the server owes each an error)."""
    return ["hi", "{oops", json.dumps({"type": "end"}), "x" * 300][n % 4]


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        self.records.append(f"{record.name}: {text}")


def draw_config(rng: random.Random) -> dict[str, object]:
    return {
        "server.port": 0,
        "server.history": rng.choice([1000, 1000, 5, 0]),
        "server.history_streams": rng.choice([64, 64, 2]),
        "server.subscriber_queue": rng.choice([2, 16, 256]),
        "server.max_message_bytes": LIMIT,
        "server.handshake_timeout_s": HANDSHAKE_S,
        "server.idle_timeout_s": IDLE_S,
    }


async def run_sequence(seed: int, clips: Clips) -> Outcome:
    """Run one seed's sequence against a fresh server; see the module doc."""
    rng = random.Random(seed)
    overrides = draw_config(rng)
    cfg: Config = load_config(overrides=overrides)
    # Some sequences shut the server down (as serve does: the engine drains,
    # then the server closes) while the last wave's clients are mid-stream.
    abrupt = rng.random() < 0.3
    loop = asyncio.get_running_loop()
    engine_log: list[tuple[float, EngineEvent, dict[str, Any]]] = []

    def record(event: EngineEvent) -> None:
        engine_log.append((loop.time(), event, json.loads(encode_event(event))))

    errors = _Errors()
    root = logging.getLogger()
    root.addHandler(errors)
    ingests: list[tuple[IngestPlan, Received]] = []
    subs: list[tuple[SubPlan, Received]] = []
    stop = asyncio.Event()
    sub_tasks: list[asyncio.Task[None]] = []
    last_wave: list[tuple[IngestPlan, asyncio.Future[list[Received]]]] = []
    shutdown_s = 0.0
    owed_at_drain = 0
    try:
        engine = Engine(cfg, ScriptedBackend(_script))
        await engine.start()
        server = CaptionServer(engine, cfg.server)
        try:
            engine.add_listener(record)
            await server.start()
            port, epoch = server.port, engine.epoch
            n = 0
            waves = rng.randrange(1, 4)
            for wave in range(waves):
                for _ in range(rng.randrange(1, 4)):
                    n += 1
                    plan = plan_sub(rng, f"sub{n}", epoch)
                    subs.append((plan, Received()))
                    sub_tasks.append(asyncio.ensure_future(run_sub(
                        port, plan, subs[-1][1], stop, engine.last_seq)))
                plans = [plan_ingest(rng, f"ing{n}-{i}", clips)
                         for i in range(rng.randrange(1, 5))]
                last = abrupt and wave == waves - 1
                if last:
                    # Every subscriber there before the shutdown's wave
                    # talks, so each sees (or is refused) what it does.
                    async with asyncio.timeout(30):
                        await _connected(subs)
                running = asyncio.gather(*(run_ingest(port, p) for p in plans))
                if last:
                    last_wave = [(p, running) for p in plans]
                    pause = rng.uniform(0.05, 1.0)
                    # Mid-speech: the drain begins in the loop turn that sees
                    # a segment open, so it owes a final whatever the
                    # machine's speed (after a pause alone, the last wave's
                    # audio, sent faster than it plays, has often ended).
                    if rng.random() < 0.5:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(10):
                                while not _open_segments(engine_log):
                                    await asyncio.sleep(0)
                    else:
                        await asyncio.sleep(pause)
                    break
                ingests += zip(plans, await running, strict=True)
            else:
                await _marker(engine, port, clips, subs, ingests)
        finally:
            t0 = loop.time()
            if abrupt:
                owed_at_drain = len(_open_segments(engine_log))
                await asyncio.wait_for(engine.drain(), 20)
                await asyncio.wait_for(server.aclose(), 20)
                if last_wave:
                    results = await asyncio.wait_for(last_wave[0][1], 30)
                    ingests += zip([p for p, _ in last_wave], results, strict=True)
            stop.set()
            done = await asyncio.gather(*sub_tasks, return_exceptions=True)
            for (_, got), r in zip(subs, done, strict=True):
                if isinstance(r, BaseException):
                    got.problems.append(f"client failed: {r!r}")
            if not abrupt:
                t0 = loop.time()
                await asyncio.wait_for(server.aclose(), 20)
            await asyncio.wait_for(engine.aclose(), 20)
            shutdown_s = loop.time() - t0
            gc.collect()  # so a task that failed unseen is reported now, in `errors`
    finally:
        root.removeHandler(errors)
    return Outcome(seed, overrides, ingests, subs, engine_log, epoch, shutdown_s,
                   errors.records, interrupted={p.name for p, _ in last_wave},
                   dropped=server.broadcaster.dropped_subscribers,
                   owed_at_drain=owed_at_drain)


def _open_segments(engine_log: list[tuple[float, EngineEvent, dict[str, Any]]]
                   ) -> set[tuple[str, int]]:
    """The segments the engine has sent a partial of and no final yet."""
    open_: set[tuple[str, int]] = set()
    for _, _, m in engine_log:
        if m["type"] == "caption":
            key = (m["stream"], m["segment"])
            (open_.discard if m["final"] else open_.add)(key)
    return open_


async def _connected(subs: list[tuple[SubPlan, Received]]) -> None:
    """Until every subscriber has connected and, if it reads, had its hello
    (or was refused)."""
    while not all(got.connected and (not _reading(plan) or got.t_hello is not None
                                     or got.close_code is not None) for plan, got in subs):
        await asyncio.sleep(0.02)


async def _marker(engine: Engine, port: int, clips: Clips, subs: list[tuple[SubPlan, Received]],
                  ingests: list[tuple[IngestPlan, Received]]) -> None:
    """Ingest the marker stream once every other stream has ended and every
    reading subscriber is there, and wait until they have its end."""
    async with asyncio.timeout(30):
        # Streams of connections that went away may still be taking their
        # finals: the marker comes after all of them.
        while engine.streams:
            await asyncio.sleep(0.02)
        await _connected(subs)
    speech = clips.get(16000, 1, "pcm16")[:2 * 48000]
    marker = IngestPlan("marker", MARKER, None, {"type": "config", "sample_rate": 16000},
                        [Step(speech[i:i + LIMIT], frames=len(speech[i:i + LIMIT]) // 2)
                         for i in range(0, len(speech), LIMIT)], "end", 1000, 0.0)
    ingests.append((marker, await run_ingest(port, marker)))
    await _until_marker_seen(subs)


def _talked(got: Received) -> int:
    return sum(m["type"] == "error" and m["code"] == "unexpected_message" for _, m in got.messages)


def _reading(plan: SubPlan) -> bool:
    """The subscriber reads to the end (unless the server drops it)."""
    return plan.behaviour in ("read", "talk", "pause") and not plan.bad_query


def _has_marker(got: Received) -> bool:
    return any(m["type"] == "stream.ended" and m["stream"] == MARKER for _, m in got.messages)


async def _until_marker_seen(subs: list[tuple[SubPlan, Received]]) -> None:
    """Wait (bounded) until every subscriber still reading has the marker's end."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            while not all(_has_marker(got) for plan, got in subs
                          if _reading(plan) and got.close_code is None):
                await asyncio.sleep(0.02)


# --- checks -------------------------------------------------------------------


def _runs(engine_log: list[tuple[float, EngineEvent, dict[str, Any]]]
          ) -> dict[str, list[list[dict[str, Any]]]]:
    """Each stream's events, split into runs (stream.started to stream.ended)."""
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for _, event, msg in engine_log:
        if isinstance(event, StreamStarted):
            runs.setdefault(event.stream, []).append([])
        runs.setdefault(event.stream, [[]])[-1].append(msg)
    return runs


def check_engine(o: Outcome) -> Iterator[str]:
    """The engine's own record: runs bracketed, seqs increasing, finals last."""
    last_seq: dict[str, int] = {}
    for stream, runs in _runs(o.engine_log).items():
        for run in runs:
            if run[0]["type"] != "stream.started" or run[-1]["type"] != "stream.ended" or \
                    sum(m["type"] in ("stream.started", "stream.ended") for m in run) != 2:
                yield f"engine: run of {stream} not bracketed by started/ended: " \
                      f"{[m['type'] for m in run]}"
            finals: set[int] = set()
            captioned: set[int] = set()
            for m in run:
                if m["type"] != "caption":
                    continue
                if m["seq"] <= last_seq.get(stream, 0):
                    yield f"engine: {stream} seq {m['seq']} after {last_seq[stream]}"
                last_seq[stream] = m["seq"]
                if m["segment"] in finals:
                    yield f"engine: {stream} segment {m['segment']} has a caption after its final"
                captioned.add(m["segment"])
                if m["final"]:
                    finals.add(m["segment"])
            # No final is ever lost (a scripted model never fails): every
            # segment shown has one, a drain at shutdown included, and the
            # end's counts are what was sent.
            if captioned - finals:
                yield f"engine: {stream} segments {sorted(captioned - finals)} have partials " \
                      "but no final"
            end = run[-1]
            if end["type"] == "stream.ended" and (end["finals"] != len(finals)
                                                  or end["segments"] != len(finals)):
                yield f"engine: {stream} ended with {end['segments']} segments and " \
                      f"{end['finals']} finals, but {len(finals)} finals were sent"


def _codes(msgs: list[dict[str, Any]]) -> list[str]:
    return [m["code"] for m in msgs if m["type"] == "error"]


def check_ingest(plan: IngestPlan, got: Received, o: Outcome) -> Iterator[str]:
    cut = plan.name in o.interrupted
    where = f"{plan.name} (stream={plan.stream!r}, {plan.terminal}" \
            f"{', cut by the shutdown' if cut else ''})"
    yield from (f"{where}: {p}" for p in got.problems
                if not (cut and p.startswith(("the server closed", "cannot connect"))))
    msgs = [m for _, m in got.messages]
    refusal = None
    first_code = msgs[0].get("code") if msgs and msgs[0]["type"] == "error" else None
    if first_code == "stream_busy" and plan.stream is not None:
        refusal = "stream_busy"  # another connection of the plan holds the id
    elif first_code == "shutting_down" and cut:
        refusal = "shutting_down"
    elif plan.silent:
        refusal = "handshake_timeout"
    elif plan.stream == "bad,id":
        refusal = "bad_query"
    elif plan.first is not None:
        refusal = plan.first.error
    if refusal is not None and cut and not msgs and got.close_code in (1001, None):
        return  # the server shut down first: no refusal is owed, only the close
    if refusal is not None:
        close = 1001 if refusal == "shutting_down" else 1008
        if _codes(msgs) != [refusal] or len(msgs) != 1 or \
                got.close_code not in (close, 1001 if cut else close):
            yield f"{where}: expected error {refusal} and close {close}, got " \
                  f"{[m['type'] for m in msgs]} {_codes(msgs)} close {got.close_code}"
        return
    if not msgs or msgs[0]["type"] != "ingest.ready":
        if not (cut and not msgs and got.close_code in (1001, None)):
            yield f"{where}: no ingest.ready: {msgs[:2]} close {got.close_code}"
        return
    ready = msgs[0]
    stream = ready["stream"]
    if (plan.stream or "ingest-") not in stream or ready["epoch"] != o.epoch or \
            ready["sample_rate"] != plan.config["sample_rate"] or \
            ready["progress"] != plan.config.get("progress", False):
        yield f"{where}: ingest.ready does not match the config: {ready}"
    own = [m for m in msgs if m["type"] == "error"]
    expected = [s.error for s in plan.steps if s.error]
    if plan.terminal == "idle":
        expected.append("idle_timeout")
    # A frame past twice the limit closes the connection in the WebSocket
    # layer, and messages it had not handed on yet go unanswered.
    cut_off = plan.terminal == "fatal" and plan.steps[-1].error is None
    complete = plan.terminal in ("end", "end_twice", "idle", "fatal") and \
        got.close_code != 1013 and not cut_off and not cut
    if got.close_code == 1013 and not plan.pause_reading_s and not _tight(o):
        yield f"{where}: closed as too slow though it kept reading"
    if (complete and _codes(own) != expected) or _codes(own) != expected[:len(own)]:
        yield f"{where}: error codes {_codes(own)}, expected {expected}"
    closes = {plan.close, 1013, *((1000, 1001) if cut else ())}
    if plan.close is not None and got.close_code not in closes:
        yield f"{where}: close code {got.close_code}, expected {plan.close}"
    progress = [m["frames"] for m in msgs if m["type"] == "ingest.progress"]
    if progress and not plan.config.get("progress"):
        yield f"{where}: ingest.progress it did not ask for"
    if progress != sorted(set(progress)):
        yield f"{where}: ingest.progress frames not increasing: {progress}"
    types = [m["type"] for m in msgs]
    if "ingest.summary" in types[:-1]:
        yield f"{where}: messages after ingest.summary: {types}"
    if "stream.ended" in types and any(t in ("caption", "stream.started")
                                       for t in types[types.index("stream.ended"):]):
        yield f"{where}: stream events after its stream.ended: {types}"
    frames = sum(s.frames for s in plan.steps)
    rate = int(plan.config["sample_rate"])
    if plan.terminal in ("end", "end_twice") and got.close_code == 1000 and not cut:
        summary = msgs[-1]
        if summary["type"] != "ingest.summary" or msgs[-2]["type"] != "stream.ended":
            yield f"{where}: does not end with stream.ended, ingest.summary: {types[-3:]}"
            return
        lost = sum(s.lost for s in plan.steps)
        if plan.config.get("progress") and (progress[-1:] or [0])[-1] != frames:
            yield f"{where}: last ingest.progress {progress[-1:]} != {frames} frames sent"
        if abs(summary["duration"] - (frames + lost) / rate) > 0.01 or \
                abs(summary["lost"] - lost / rate) > 0.002:
            yield f"{where}: summary {summary} for {frames} frames and {lost} lost at {rate}"
    if plan.terminal in ("end", "end_twice", "idle") and got.close_code in (1000, 1008) \
            and not cut:
        # Its own stream's events: exactly one run of the engine's.
        events = [m for m in msgs if m["type"] in ("stream.started", "caption", "stream.ended")
                  or (m["type"] == "error" and m["code"] not in expected)]
        if events not in _runs(o.engine_log).get(stream, []):
            yield f"{where}: its stream events are no run of the engine's: " \
                  f"{[(m['type'], m.get('seq')) for m in events]}"
        if plan.name == "marker" and not any(m.get("final") for m in events):
            yield f"{where}: the marker stream got no final"


def check_sub(plan: SubPlan, got: Received, o: Outcome) -> Iterator[str]:
    where = f"{plan.name} ({plan.behaviour}, stream={plan.streams}, since={plan.since}, " \
            f"epoch={plan.epoch})"
    yield from (f"{where}: {p}" for p in got.problems)
    if plan.behaviour == "stall":
        return
    msgs = [m for _, m in got.messages]
    if plan.bad_query:
        if _codes(msgs) != ["bad_query"] or len(msgs) != 1 or got.close_code != 1008:
            yield f"{where}: expected bad_query and 1008, got {msgs} {got.close_code}"
        return
    if plan.behaviour == "vanish" and not msgs:
        return
    if not msgs or msgs[0]["type"] != "hello" or msgs[0]["epoch"] != o.epoch:
        yield f"{where}: no hello first: {msgs[:1]}"
        return
    abrupt = bool(o.interrupted)
    slow = plan.behaviour == "pause" or _tight(o)
    if plan.behaviour != "vanish" and got.close_code not in (
            None, 1013 if slow else None, 1001 if abrupt else None):
        yield f"{where}: closed by the server ({got.close_code}) while reading"
    wants = set(plan.streams) if plan.streams is not None else None
    seqs: dict[str, list[int]] = {}
    captions: dict[tuple[str, int], dict[str, Any]] = {}
    for _, _, m in o.engine_log:
        if m["type"] == "caption":
            seqs.setdefault(m["stream"], []).append(m["seq"])
            captions[m["stream"], m["seq"]] = m
    # Where each stream's numbering stands for this client (None: unknown).
    since: dict[str, int | None] = {}
    for item in (plan.since or "").split(","):
        if ":" in item:
            since[item.split(":")[0]] = int(item.split(":")[1])
        elif item and wants is not None:
            since.update(dict.fromkeys(wants, int(item)))
    at: dict[str, int | None] = dict(since)
    last: dict[str, int] = {}
    talked = 0
    for m in msgs[1:]:
        kind = m["type"]
        if kind == "error":
            if m["code"] == "unexpected_message" and m.get("stream") is None:
                talked += 1
            else:
                yield f"{where}: unexpected error {m}"
            continue
        s = m["stream"]
        if wants is not None and s not in wants:
            yield f"{where}: got {kind} of {s}, which it did not ask for"
        p = at.get(s)
        if kind == "gap":
            if p is not None and m["from"] != p + 1:
                yield f"{where}: gap {m} does not start after {p}"
            if m["to"] is not None and m["to"] < m["from"]:
                yield f"{where}: empty gap {m}"
            at[s] = m["to"]
        elif kind == "caption":
            seq = m["seq"]
            if seq <= last.get(s, 0):
                yield f"{where}: {s} seq {seq} after {last[s]}"
            if p is not None and any(p < x < seq for x in seqs.get(s, [])):
                yield f"{where}: {s} seqs between {p} and {seq} skipped silently"
            if captions.get((s, seq)) != m:
                yield f"{where}: caption {s}:{seq} is not the engine's"
            at[s] = last[s] = seq
        elif kind == "stream.started":
            at.setdefault(s, None)
    if talked != got.sent and not abrupt and got.close_code is None:
        yield f"{where}: {talked} unexpected_message errors for {got.sent} messages sent"
    if abrupt:
        return
    if _reading(plan) and got.close_code is None:
        if not _has_marker(got):
            yield f"{where}: never got the marker's stream.ended"
            return
        assert got.t_hello is not None
        live = [m for t, _, m in o.engine_log
                if t > got.t_hello and (wants is None or m["stream"] in wants)]
        mine = [m for m in msgs if not (m["type"] == "error" and m.get("stream") is None)]
        if mine[len(mine) - len(live):] != live:
            missing = [(m["type"], m["stream"], m.get("seq")) for m in live if m not in mine]
            yield f"{where}: the events after its hello are not all there, in order; " \
                  f"missing {missing[:10]}"


def _tight(o: Outcome) -> bool:
    """Queues so short that a burst of events (a final, then stream.ended)
    overflows them: any connection may be closed as too slow (1013)."""
    queue = o.cfg["server.subscriber_queue"]
    assert isinstance(queue, int)
    return queue <= 4


def _shutdown_bound(o: Outcome) -> float:
    """The longest stop the server's limits allow: the drain's
    (``worker.drain_timeout_s``; one cut short also logs an error, caught
    apart), then a stalled subscriber's flush (``server.shutdown_flush_s``),
    close handshake and the second before it is aborted (docs/systemd.md,
    tests/server/test_app.py)."""
    cfg = load_config(overrides=o.cfg)
    return cfg.worker.drain_timeout_s + cfg.server.shutdown_flush_s + CLOSE_TIMEOUT_S + 1


def check(o: Outcome) -> list[str]:
    """Every problem found in ``o`` (empty: none)."""
    problems = [f"logged: {r}" for r in o.errors]
    if o.shutdown_s > (bound := _shutdown_bound(o)):
        problems.append(f"shutdown took {o.shutdown_s:.1f} s, past its {bound:g} s")
    problems += check_engine(o)
    for ip, got in o.ingests:
        problems += check_ingest(ip, got, o)
    for sp, got in o.subs:
        problems += check_sub(sp, got, o)
    return problems
