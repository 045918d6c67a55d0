"""A seeded random driver of ``/v1/realtime`` over a real server.

:func:`run_sequence` starts an :class:`Engine` (a scripted multilingual
backend: the model does not matter here) and a :class:`CaptionServer`, then
runs a few realtime clients at once. Each fuzzed client sends a random but
plausible script drawn from the seed: ``session.update`` and
``transcription_session.update`` with valid and invalid fields, appends of
random sizes (empty, odd byte counts, bad base64, over the size limit),
commits and clears (empty buffers included), unknown and unsupported event
types, malformed JSON, binary frames, duplicated event ids; it ends by
waiting for its items, by closing at once, by vanishing, or by vanishing
and coming back under the same stream (waiting while it is busy); some
append at a live pace. A well-behaved client runs alongside and must get
its whole transcript. Some sequences shut the server down (the engine
drains, then the server closes) while the clients are mid-script.

After every client message a marker follows: an event of an unknown type
whose ``error`` echoes the marker's ``event_id``. The server answers a
connection's messages in order, so what arrives between two markers is the
answer to the message between them (events that come from the engine, the
deltas, completions and server errors, may come anywhere). :func:`check`
holds each answer against docs/protocol.md, and each connection's items
against the documented life of an item.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from evoxtral_stream.config import Config, load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import CaptionEvent, EngineEvent, StreamEnded, StreamStarted
from evoxtral_stream.server.app import CaptionServer
from tests.fakes import LanguageScriptedBackend, words_so_far
from tests.helpers.wire_fuzz import SENTENCES, Clips

__all__ = ["Outcome", "check", "run_sequence"]

LIMIT = 65536                     # server.max_message_bytes in every sequence
RATE = 24_000                     # the API's input rate
POOL = ("a", "b")                 # stream names the fuzzed clients share
GOOD = "good"
MARK = "fuzz.mark"

Kind = Literal["append", "commit", "clear", "update", "bad", "huge", "fatal"]
Ending = Literal["wait", "close", "abort", "reconnect"]

ENGINE_TYPES = {"conversation.item.input_audio_transcription.delta",
                "conversation.item.input_audio_transcription.completed"}
VAD_TYPES = {"input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed"}
# Every server event and its fields (docs/protocol.md, "Server events").
FIELDS: dict[str, set[str]] = {
    "session.created": {"session"},
    "session.updated": {"session"},
    "transcription_session.updated": {"session"},
    "input_audio_buffer.speech_started": {"item_id", "audio_start_ms"},
    "input_audio_buffer.speech_stopped": {"item_id", "audio_end_ms"},
    "input_audio_buffer.committed": {"item_id", "previous_item_id"},
    "input_audio_buffer.cleared": set(),
    "conversation.item.input_audio_transcription.delta": {"item_id", "content_index", "delta"},
    "conversation.item.input_audio_transcription.completed": {
        "item_id", "content_index", "transcript", "usage"},
    "error": {"error"},
}
ERROR_KEYS = {"type", "code", "message", "param", "event_id"}


@dataclass
class Step:
    """One client message and what the server must answer."""

    data: str | bytes
    kind: Kind
    error: str | None = None       # the error code it must get
    param: str | None = None       # ... with this param
    echo: str | None = None        # ... echoing this event_id
    turn: bool | None = None       # update: server_vad after it (None: unchanged)
    beta: bool = False             # update: answered in the beta shape


@dataclass
class Plan:
    name: str
    stream: str | None             # None: unnamed (realtime-N)
    steps: list[Step]
    ending: Ending
    split: int = 0                 # reconnect: the steps of the first connection
    good: bool = False
    paced: bool = False            # appends 10 ms apart, as a live microphone's


@dataclass
class Conn:
    """What one connection of a plan sent and got."""

    steps: list[Step]
    messages: list[dict[str, Any]] = field(default_factory=list)
    marks: int = 0                 # markers sent
    close_code: int | None = None
    ending: Ending = "wait"
    refused: bool = False          # stream_busy: another connection held the stream
    unreachable: bool = False      # could not connect (the server had shut down)
    problems: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    seed: int
    cfg: dict[str, object]
    plans: list[tuple[Plan, list[Conn]]]
    engine_log: list[EngineEvent]
    errors: list[str]              # ERROR log records and the mirror's divergence warnings
    open_streams: list[str]        # streams still open after every client left
    shutdown: bool                 # the server shut down while the clients ran


# --- plans ----------------------------------------------------------------------


def _append(data: bytes, eid: str | None) -> str:
    msg: dict[str, Any] = {"type": "input_audio_buffer.append",
                           "audio": base64.b64encode(data).decode()}
    if eid is not None:
        msg["event_id"] = eid
    return json.dumps(msg)


def _msg(kind: str, eid: str | None, **fields: Any) -> str:
    msg: dict[str, Any] = {"type": kind, **fields}
    if eid is not None:
        msg["event_id"] = eid
    return json.dumps(msg)


_GA = "session.audio.input"


def _ga_update(rng: random.Random, eid: str | None) -> Step:
    """A ``session.update``: valid fields, and at most one bad one."""
    inp: dict[str, Any] = {}
    turn: bool | None = None
    if rng.random() < 0.6:
        vad = rng.random() < 0.5
        inp["turn_detection"] = ({"type": "server_vad", "threshold": 0.5,
                                  "silence_duration_ms": 800, "prefix_padding_ms": 300}
                                 if vad else None)
        turn = vad
    if rng.random() < 0.4:
        inp["format"] = rng.choice([{"type": "audio/pcm", "rate": RATE}, {"type": "audio/pcm"}])
    if rng.random() < 0.4:
        inp["transcription"] = {"model": "gpt-4o-transcribe", "prompt": "x",
                                "language": rng.choice(["en", "fr", "de", None, ""])}
    if rng.random() < 0.3:
        inp["noise_reduction"] = rng.choice([None, {"type": "near_field"}])
    session: dict[str, Any] = {"type": "transcription", "audio": {"input": inp}}
    if rng.random() < 0.3:
        session["include"] = ["item.input_audio_transcription.logprobs"]
    if rng.random() < 0.2:
        session["unknown_key"] = {"x": [1, 2]}
    step = Step("", "update", echo=eid, turn=turn)
    if rng.random() < 0.45:
        step.turn = None
        bad = rng.randrange(12)
        code, param = "invalid_value", ""
        if bad == 0:
            session["type"], param = "realtime", "session.type"
        elif bad == 1:
            session["type"], code, param = 5, "invalid_type", "session.type"
        elif bad == 2:
            session, code, param = "transcription", "invalid_type", "session"  # type: ignore[assignment]
        elif bad == 3:
            inp["format"], param = {"type": "audio/pcmu"}, f"{_GA}.format.type"
        elif bad == 4:
            inp["format"], param = {"type": "audio/pcm", "rate": 16000}, f"{_GA}.format.rate"
        elif bad == 5:
            inp["format"] = {"type": "audio/pcm", "rate": rng.choice(["24000", True])}
            code, param = "invalid_type", f"{_GA}.format.rate"
        elif bad == 6:
            inp["turn_detection"], param = {"type": "semantic_vad"}, f"{_GA}.turn_detection.type"
        elif bad == 7:
            inp["turn_detection"] = "server_vad"
            code, param = "invalid_type", f"{_GA}.turn_detection"
        elif bad == 8:
            inp["transcription"] = {"language": "ja"}
            param = f"{_GA}.transcription.language"
        elif bad == 9:
            inp["transcription"] = {"language": 5}
            code, param = "invalid_type", f"{_GA}.transcription.language"
        elif bad == 10:
            session["audio"] = {"input": rng.choice([3, [], "x"])}
            code, param = "invalid_type", _GA
        else:
            inp["format"], code, param = "pcm16", "invalid_type", f"{_GA}.format"
        step.error, step.param = code, param
    step.data = _msg("session.update", eid, session=session)
    return step


def _beta_update(rng: random.Random, eid: str | None) -> Step:
    session: dict[str, Any] = {}
    turn: bool | None = None
    if rng.random() < 0.5:
        session["input_audio_format"] = "pcm16"
    if rng.random() < 0.6:
        roll = rng.random()
        session["turn_detection"] = (None if roll < 0.4 else {"type": "server_vad"}
                                     if roll < 0.7 else {"silence_duration_ms": 700})
        turn = roll >= 0.4
    if rng.random() < 0.4:
        session["input_audio_transcription"] = {"model": "whisper-1",
                                                "language": rng.choice(["en", "fr", None])}
    if rng.random() < 0.3:
        session["input_audio_noise_reduction"] = {"type": "far_field"}
        session["include"] = []
    step = Step("", "update", echo=eid, turn=turn, beta=True)
    if rng.random() < 0.4:
        step.turn = None
        bad = rng.randrange(5)
        if bad == 0:
            session["input_audio_format"] = "g711_ulaw"
            step.error, step.param = "invalid_value", "session.input_audio_format"
        elif bad == 1:
            session["input_audio_format"] = 16
            step.error, step.param = "invalid_type", "session.input_audio_format"
        elif bad == 2:
            session["turn_detection"] = {"type": "semantic_vad"}
            step.error, step.param = "invalid_value", "session.turn_detection.type"
        elif bad == 3:
            session["input_audio_transcription"] = {"language": "ja"}
            step.error = "invalid_value"
            step.param = "session.input_audio_transcription.language"
        else:
            session["input_audio_transcription"] = "whisper-1"
            step.error, step.param = "invalid_type", "session.input_audio_transcription"
    step.data = _msg("transcription_session.update", eid, session=session)
    return step


def _bad(rng: random.Random, eid: str | None) -> Step:
    """A message the session answers with one error and survives."""
    choice = rng.randrange(12)
    if choice == 0:
        return Step(rng.choice(["{oops", "", '{"type": "input_audio_buffer.commit"', "nul"]),
                    "bad", "invalid_json")
    if choice == 1:
        return Step(rng.choice(["[]", "3", '"input_audio_buffer.commit"', "null"]), "bad",
                    "invalid_type")
    if choice == 2:
        return Step(rng.choice([b"", b"\x00\x01\x02", b'{"type": "input_audio_buffer.clear"}']),
                    "bad", "invalid_type")
    if choice == 3:
        kind = rng.choice(["response.create", "conversation.item.create", "session.close",
                           "input_audio_buffer.flush", "SESSION.UPDATE"])
        return Step(_msg(kind, eid), "bad", "invalid_value", "type", eid)
    if choice == 4:
        # null is no type at all, as an append's "audio": null is no audio;
        # any other non-string is one of the wrong type.
        wrong: object = rng.choice([None, 5, ["x"]])
        return Step(json.dumps({"event_id": eid, "type": wrong}), "bad",
                    "missing_required_parameter" if wrong is None else "invalid_type", "type",
                    eid)
    if choice == 5:
        return Step(_msg("input_audio_buffer.append", eid), "bad",
                    "missing_required_parameter", "audio", eid)
    if choice == 6:
        return Step(_msg("input_audio_buffer.append", eid, audio=rng.choice([5, ["AAAA"], {}])),
                    "bad", "invalid_type", "audio", eid)
    if choice == 7:
        return Step(_msg("input_audio_buffer.append", eid,
                         audio=rng.choice(["abc", "****", "AAA=A", "AA AA", "AAAA\n",
                                          "AAAA====", "AA==="])),
                    "bad", "invalid_value", "audio", eid)
    if choice == 8:
        # An event_id that is not a string is not echoed.
        return Step(json.dumps({"type": "nope", "event_id": rng.choice([5, None, ["x"]])}),
                    "bad", "invalid_value", "type")
    if choice == 9:
        return Step(json.dumps({"type": "session.update", "event_id": eid,
                                "session": rng.choice([None, 3])}),
                    "bad", "invalid_type", "session", eid)
    if choice == 10:
        return Step(json.dumps({"type": "input_audio_buffer.commit", "event_id": eid,
                                "extra": "x" * rng.randrange(LIMIT + 100, 2 * LIMIT - 100)}),
                    "huge", "message_too_large")
    return Step(_append(b"\x00" * rng.randrange(LIMIT, LIMIT + LIMIT // 3), eid), "huge",
                "message_too_large")


def _event_id(rng: random.Random, name: str, j: int, last: str | None) -> str | None:
    roll = rng.random()
    if roll < 0.15:
        return None
    if roll < 0.25 and last is not None:
        return last                    # a duplicated event_id
    return f"{name}-{j}"


def plan_fuzzed(rng: random.Random, name: str, audio: bytes) -> Plan:
    roll = rng.random()
    stream = rng.choice(POOL) if roll < 0.6 else None
    pos = rng.randrange(0, len(audio) // 3) // 2 * 2
    end = min(len(audio), pos + int(rng.uniform(0.5, 6) * RATE) * 2)
    steps: list[Step] = []
    last: str | None = None
    fatal_at = rng.randrange(0, 60) if rng.random() < 0.05 else -1
    while pos < end or len(steps) < 3:
        j = len(steps)
        eid = _event_id(rng, name, j, last)
        last = eid if eid is not None else last
        if j == fatal_at:
            # Over twice the limit: the WebSocket layer closes (1009).
            steps.append(Step(_append(b"\x00" * (LIMIT * 2), eid), "fatal"))
            break
        if rng.random() < 0.7 and pos < end:
            n = rng.choice([RATE // 10 * 2] * 6 + [0, 1, 3, 4801, RATE // 50 * 2 + 1,
                                                   RATE // 2 * 2])
            chunk = audio[pos:pos + n]
            pos += len(chunk)
            steps.append(Step(_append(chunk, eid), "append"))
            continue
        roll = rng.random()
        if roll < 0.2:
            steps.append(Step(_msg("input_audio_buffer.commit", eid), "commit", echo=eid))
        elif roll < 0.3:
            steps.append(Step(_msg("input_audio_buffer.clear", eid), "clear"))
        elif roll < 0.5:
            steps.append(_ga_update(rng, eid))
        elif roll < 0.6:
            steps.append(_beta_update(rng, eid))
        else:
            steps.append(_bad(rng, eid))
    endings: list[Ending] = ["wait", "close", "abort", "reconnect"]
    ending = rng.choices(endings, [50, 15, 15, 20])[0]
    split = rng.randrange(0, len(steps) + 1) if ending in ("abort", "reconnect") else 0
    return Plan(name, stream, steps, ending, split, paced=rng.random() < 0.3)


def plan_good(rng: random.Random, audio: bytes) -> Plan:
    """Server VAD, or manual commit of the whole speech: 100 ms appends."""
    manual = rng.random() < 0.4
    steps: list[Step] = []
    if manual:
        steps.append(Step(_msg("session.update", "g-0", session={
            "type": "transcription", "audio": {"input": {"turn_detection": None}}}),
            "update", echo="g-0", turn=False))
    step = RATE // 10 * 2
    steps += [Step(_append(audio[i:i + step], f"g-a{i}"), "append")
              for i in range(0, len(audio), step)]
    if manual:
        steps.append(Step(_msg("input_audio_buffer.commit", "g-c"), "commit", echo="g-c"))
    return Plan(GOOD, GOOD, steps, "wait", good=True)


# --- running ----------------------------------------------------------------------


def _mark(j: int) -> str:
    return json.dumps({"type": MARK, "event_id": f"mark-{j}"})


def _is_mark(m: dict[str, Any]) -> bool:
    return m.get("type") == "error" and isinstance(m.get("error"), dict) and \
        str(m["error"].get("event_id", "")).startswith("mark-") and \
        m["error"].get("code") == "invalid_value"


async def _read(ws: ClientConnection, conn: Conn) -> None:
    try:
        async for raw in ws:
            if not isinstance(raw, str):
                conn.problems.append(f"a binary message from the server: {raw!r:.100}")
                continue
            try:
                msg = json.loads(raw)
            except ValueError:
                conn.problems.append(f"not JSON: {raw!r:.200}")
                continue
            if not isinstance(msg, dict):
                conn.problems.append(f"not a JSON object: {raw!r:.200}")
                continue
            conn.messages.append(msg)
    except ConnectionClosed:
        pass  # an abnormal close: its code is what matters
    finally:
        conn.close_code = ws.close_code


def _marks(conn: Conn) -> int:
    return sum(_is_mark(m) for m in conn.messages)


def _open_items(conn: Conn) -> set[str]:
    """Items committed and not completed yet."""
    done = {m.get("item_id") for m in conn.messages if m.get("type") in ENGINE_TYPES
            and m["type"].endswith(".completed")}
    return {m["item_id"] for m in conn.messages
            if m.get("type") == "input_audio_buffer.committed"} - done


async def _session(port: int, plan: Plan, steps: list[Step], ending: Ending,
                   conns: list[Conn]) -> None:
    """One connection of ``plan`` (more while its stream is busy)."""
    query = "?intent=transcription" + (f"&stream={plan.stream}" if plan.stream else "")
    url = f"ws://127.0.0.1:{port}/v1/realtime{query}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        conn = Conn(steps, ending=ending)
        conns.append(conn)
        try:
            ws = await connect(url, max_size=None)
        except (OSError, InvalidStatus):  # refused at shutdown (503)
            conn.unreachable = True
            return
        reader = asyncio.ensure_future(_read(ws, conn))
        while not conn.messages and not reader.done():
            await asyncio.sleep(0.01)
        first = conn.messages[0] if conn.messages else {}
        if first.get("type") != "session.created":
            # Refused (another connection holds the stream, or the server is
            # shutting down): nothing to send; come back if the stream was busy.
            conn.refused = first.get("error", {}).get("code") == "stream_busy"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader, 10)
            ws.transport.abort()
            if conn.refused and loop.time() < deadline:
                await asyncio.sleep(0.05)
                continue
            return
        break
    try:
        for j, step in enumerate(steps):
            await ws.send(step.data)
            await ws.send(_mark(j))
            conn.marks += 1
            if plan.paced and step.kind == "append":
                await asyncio.sleep(0.01)
            elif j % 3 == 0:
                await asyncio.sleep(0)
    except ConnectionClosed as e:
        if not any(s.kind == "fatal" for s in steps) and e.rcvd is not None and \
                e.rcvd.code not in (1001, 1011):  # the shutdown's
            conn.problems.append(f"the server closed the connection while the client "
                                 f"still sent: {e}")
        ending = "close"
    try:
        if ending == "wait":
            async with asyncio.timeout(20):
                while not reader.done() and (_marks(conn) < conn.marks or _open_items(conn)):
                    await asyncio.sleep(0.02)
        if ending == "abort":
            ws.transport.abort()
        else:
            await ws.close()
        await asyncio.wait_for(reader, 10)
    except TimeoutError:
        conn.problems.append(f"timed out: {_marks(conn)} of {conn.marks} markers answered, "
                             f"items never completed: {sorted(_open_items(conn))}")
    finally:
        reader.cancel()
        ws.transport.abort()


async def run_plan(port: int, plan: Plan) -> list[Conn]:
    conns: list[Conn] = []
    if plan.ending == "reconnect":
        await _session(port, plan, plan.steps[:plan.split], "abort", conns)
        await _session(port, plan, plan.steps[plan.split:], "wait", conns)
    else:
        steps = plan.steps[:plan.split] if plan.ending == "abort" else plan.steps
        await _session(port, plan, steps, plan.ending, conns)
    return conns


class _Errors(logging.Handler):
    """ERROR records, and the warning that the mirrored segmenter diverged."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if record.levelno >= logging.ERROR or "realtime mirror" in text:
            self.records.append(f"{record.name}: {text}")


def draw_config(rng: random.Random) -> dict[str, object]:
    return {
        "server.port": 0,
        "server.max_message_bytes": LIMIT,
        "stream.partial_interval_ms": rng.choice([1000, 300]),
    }


async def run_sequence(seed: int, clips: Clips) -> Outcome:
    """Run one seed's clients against a fresh server; see the module doc."""
    rng = random.Random(seed)
    overrides = draw_config(rng)
    cfg: Config = load_config(overrides=overrides)
    audio = clips.get(RATE, 1, "pcm16")
    engine_log: list[EngineEvent] = []
    errors = _Errors()
    root = logging.getLogger()
    root.addHandler(errors)
    plans = [plan_fuzzed(rng, f"fz{i}", audio) for i in range(rng.randrange(2, 5))]
    plans.append(plan_good(rng, audio))
    # Some sequences shut the server down (as serve does: the engine drains,
    # then the server closes) while the clients are mid-script.
    shutdown = rng.random() < 0.25
    pause = rng.uniform(0.05, 0.8)
    open_streams: list[str] = []
    try:
        async with Engine(cfg, LanguageScriptedBackend(words_so_far)) as engine:
            engine.add_listener(engine_log.append)
            async with CaptionServer(engine, cfg.server) as server:
                running = asyncio.gather(*(run_plan(server.port, p) for p in plans))
                if shutdown:
                    await asyncio.wait({running}, timeout=pause)
                    await asyncio.wait_for(engine.drain(), 20)
                    await asyncio.wait_for(server.aclose(), 20)
                results = await asyncio.wait_for(running, 60)
                # Streams of connections that left may still be taking their finals.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(20):
                        while engine.streams:
                            await asyncio.sleep(0.02)
                open_streams = sorted(engine.streams)
        gc.collect()  # so a task that failed unseen is reported now, in `errors`
    finally:
        root.removeHandler(errors)
    return Outcome(seed, overrides, list(zip(plans, results, strict=True)), engine_log,
                   errors.records, open_streams, shutdown)


# --- checks -----------------------------------------------------------------------


def _shape(m: dict[str, Any]) -> str | None:
    """What is wrong with ``m``'s shape (None: nothing)."""
    kind = m.get("type")
    if kind not in FIELDS:
        return f"unknown type {kind!r}"
    if set(m) != {"type", "event_id", *FIELDS[kind]}:
        return f"fields {sorted(m)}"
    if not isinstance(m["event_id"], str) or not m["event_id"].startswith("event_"):
        return "bad event_id"
    if kind == "error":
        err = m["error"]
        if not isinstance(err, dict) or set(err) != ERROR_KEYS or \
                err["type"] not in ("invalid_request_error", "server_error") or \
                not isinstance(err["message"], str) or not err["message"]:
            return "bad error object"
    if "item_id" in FIELDS[kind] and not (isinstance(m["item_id"], str)
                                          and m["item_id"].startswith("item_")):
        return "bad item_id"
    if kind.endswith((".delta", ".completed")) and m["content_index"] != 0:
        return "content_index is not 0"
    if kind.endswith(".completed") and (
            not isinstance(m["transcript"], str) or m["usage"].get("type") != "duration"
            or not m["usage"].get("seconds", -1) >= 0):
        return "bad completed"
    return None


def _turn(m: dict[str, Any]) -> bool:
    session = m["session"]
    td = session["turn_detection"] if m["type"] == "transcription_session.updated" \
        else session["audio"]["input"]["turn_detection"]
    return td is not None


@dataclass
class _Items:
    """The items of one connection, as its messages tell them."""

    started: set[str] = field(default_factory=set)
    committed: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    dropped: set[str] = field(default_factory=set)
    open: str | None = None        # started, not committed
    deltas: dict[str, str] = field(default_factory=dict)
    start_ms: dict[str, int] = field(default_factory=dict)


def _answer(step: Step, answer: list[dict[str, Any]], vad: bool, complete: bool
            ) -> Iterator[str]:
    """``answer`` (the messages a step got, the engine's left out) against the docs;
    ``complete``: its marker came, so it is all of it."""
    kinds = [m["type"] for m in answer]
    errs = [m["error"] for m in answer if m["type"] == "error"]
    if step.kind in ("bad", "huge") or (step.kind == "update" and step.error):
        want = (step.error, step.param if step.kind != "huge" else None, step.echo)
        got = [(e["code"], e["param"], e["event_id"]) for e in errs]
        if (complete or answer) and (got != [want] or len(answer) != 1):
            yield f"expected only error {want}, got {kinds} {got}"
        return
    if step.kind == "fatal":
        return
    last = answer[-1] if answer else None
    body = answer[:-1] if answer else []
    if step.kind == "append":
        if not vad and answer:
            yield f"audio appended in manual mode got {kinds}"
        body, last = answer, None
    elif step.kind == "commit":
        ok = last is not None and (
            last["type"] == "input_audio_buffer.committed"
            or (last["type"] == "error"
                and (last["error"]["code"], last["error"]["event_id"])
                == ("input_audio_buffer_commit_empty", step.echo)))
        if complete and not ok:
            yield f"a commit got {kinds} {errs}: neither committed nor commit_empty last"
        if not vad and len(answer) > 1:
            yield f"a manual commit got {kinds}"
    elif step.kind == "clear":
        if complete and (last is None or last["type"] != "input_audio_buffer.cleared"):
            yield f"a clear got {kinds}"
        if not vad and len(answer) > 1:
            yield f"a manual clear got {kinds}"
    elif step.kind == "update":
        want_type = "transcription_session.updated" if step.beta else "session.updated"
        if complete and (last is None or last["type"] != want_type):
            yield f"an update got {kinds}, not {want_type} last"
    if any(m["type"] not in VAD_TYPES for m in body):
        yield f"{step.kind} got {kinds}"


def check_conn(plan: Plan, conn: Conn, o: Outcome, n: int) -> Iterator[str]:
    where = f"{plan.name}#{n} (stream={plan.stream}, {conn.ending})"
    yield from (f"{where}: {p}" for p in conn.problems)
    msgs = conn.messages
    for m in msgs:
        problem = _shape(m)
        if problem is not None:
            yield f"{where}: {problem}: {json.dumps(m)[:300]}"
            return
    if conn.unreachable:
        if not o.shutdown:
            yield f"{where}: could not connect"
        return
    codes = [(m["type"], m.get("error", {}).get("code")) for m in msgs]
    if o.shutdown and codes == [("error", "shutting_down")] and conn.close_code == 1008:
        return
    if o.shutdown and not msgs and conn.close_code in (1001, 1006, None):
        return  # the server closed before the session began
    if conn.refused:
        if codes != [("error", "stream_busy")] or conn.close_code != 1008:
            yield f"{where}: a busy stream's refusal is {codes}, close {conn.close_code}"
        return
    if not msgs or msgs[0]["type"] != "session.created":
        yield f"{where}: no session.created first: {msgs[:1]}"
        return
    fatal = any(s.kind == "fatal" for s in conn.steps)
    # The session's close: 1000 from our close, none when we aborted; 1009
    # after a frame over twice the limit. Never a close for input that the
    # docs answer with an error event.
    ok_close: set[int | None] = {1000} if conn.ending in ("wait", "close") else {1000, 1006,
                                                                                  None}
    if fatal:
        ok_close |= {1009, 1006, None}
    # At shutdown: 1001, or 1011 after a server_error for audio sent meanwhile.
    closed_by_shutdown = o.shutdown and conn.close_code in (1001, 1011)
    if o.shutdown:
        ok_close |= {1001, 1011}
    if conn.close_code not in ok_close:
        yield f"{where}: closed with {conn.close_code}"
    vad = True
    items = _Items()
    answer: list[dict[str, Any]] = []
    k = 0
    prev_committed: str | None = None
    prev: dict[str, Any] | None = None
    for m in msgs[1:]:
        kind = m["type"]
        if prev is not None and prev["type"] == "input_audio_buffer.speech_stopped" and (
                kind != "input_audio_buffer.committed" or m["item_id"] != prev["item_id"]):
            yield f"{where}: speech_stopped of {prev['item_id']} not followed by its committed"
        prev = m
        if kind in ENGINE_TYPES:
            item = m["item_id"]
            if item in items.completed or item in items.dropped or (
                    item not in items.started and item not in items.committed):
                yield f"{where}: {kind} of item {item}, which is not open"
            sent = items.deltas.get(item, "")
            if kind.endswith(".delta"):
                if not m["delta"]:
                    yield f"{where}: an empty delta for {item}"
                items.deltas[item] = sent + m["delta"]
            else:
                if item not in items.committed:
                    yield f"{where}: completed before committed: {item}"
                items.completed.append(item)
                # docs: where the final begins with the deltas' text, they add up to it.
                if m["transcript"].startswith(sent) and m["transcript"] != sent:
                    yield f"{where}: deltas {sent!r} of {item} stop short of its " \
                          f"transcript {m['transcript']!r}"
            continue
        if kind == "error" and m["error"]["type"] == "server_error":
            if not (o.shutdown and m["error"]["code"] == "server_error"
                    and m is msgs[-1] and conn.close_code == 1011):
                yield f"{where}: server error {m['error']}"
            continue
        if _is_mark(m):
            if m["error"]["event_id"] != f"mark-{k}" or k >= len(conn.steps):
                yield f"{where}: marker {m['error']['event_id']} out of order (at {k})"
                return
            for p in _answer(conn.steps[k], answer, vad, True):
                yield f"{where}: step {k} ({conn.steps[k].data!r:.120}): {p}"
            answer = []
            k += 1
            continue
        step = conn.steps[k] if k < len(conn.steps) else None
        if o.shutdown and kind == "input_audio_buffer.committed" and (
                step is None or step.kind in ("bad", "huge", "fatal") or step.error
                or any(a["type"] in ("error", "input_audio_buffer.cleared", "session.updated",
                                     "transcription_session.updated") for a in answer)):
            pass  # the shutdown's commit of an open turn (an engine event), not the step's
        else:
            answer.append(m)
        if kind == "input_audio_buffer.speech_started":
            if m["item_id"] in items.started or items.open is not None:
                yield f"{where}: speech_started {m['item_id']} again, or while " \
                      f"{items.open} is open"
            if m["audio_start_ms"] < max(items.start_ms.values(), default=0):
                yield f"{where}: {m['item_id']} starts at {m['audio_start_ms']} ms, before " \
                      f"an earlier item"
            items.started.add(m["item_id"])
            items.start_ms[m["item_id"]] = m["audio_start_ms"]
            items.open = m["item_id"]
        elif kind == "input_audio_buffer.speech_stopped":
            if m["item_id"] != items.open:
                yield f"{where}: speech_stopped of {m['item_id']}, open is {items.open}"
            elif m["audio_end_ms"] < items.start_ms[m["item_id"]]:
                yield f"{where}: {m['item_id']} ends before it starts: {m}"
        elif kind == "input_audio_buffer.committed":
            item = m["item_id"]
            if item in items.committed:
                yield f"{where}: {item} committed twice"
            if m["previous_item_id"] != prev_committed:
                yield f"{where}: {item} committed after {m['previous_item_id']}, " \
                      f"the previous is {prev_committed}"
            manual_commit = k < len(conn.steps) and conn.steps[k].kind == "commit" and not vad
            if item != items.open and not manual_commit:
                yield f"{where}: {item} committed, but the open item is {items.open}"
            if item == items.open:
                items.open = None
            items.committed.append(item)
            prev_committed = item
        elif kind == "input_audio_buffer.cleared" and items.open is not None:
            items.dropped.add(items.open)
            items.open = None
        elif kind in ("session.updated", "transcription_session.updated"):
            step = conn.steps[k] if k < len(conn.steps) else None
            now = _turn(m)
            if step is not None and step.kind == "update" and now != (
                    vad if step.turn is None else step.turn):
                yield f"{where}: step {k} left turn detection {now} " \
                      f"(was {vad}, asked {step.turn})"
            vad = now
    if k < len(conn.steps) and answer:
        for p in _answer(conn.steps[k], answer, vad, False):
            yield f"{where}: step {k} (unanswered in full): {p}"
    if len(items.completed) != len(set(items.completed)):
        yield f"{where}: an item completed twice: {items.completed}"
    # Completions of different items may come in any order (as on OpenAI: an
    # empty manual item completes at once, ahead of an earlier one's final).
    if closed_by_shutdown:
        # docs: a turn open at shutdown is committed, and every committed
        # item completes, before the server closes the connection.
        if items.open is not None:
            yield f"{where}: turn {items.open} open at shutdown never committed"
        if sorted(items.completed) != sorted(items.committed):
            yield f"{where}: at shutdown committed {items.committed}, " \
                  f"completed {items.completed}"
    elif conn.ending == "wait" and not fatal:
        if k != len(conn.steps):
            yield f"{where}: {k} of {len(conn.steps)} markers answered"
        if sorted(items.completed) != sorted(items.committed):
            yield f"{where}: committed {items.committed}, completed {items.completed}"
    if plan.good and not o.shutdown:
        yield from check_good(plan, conn, o, where)


def check_good(plan: Plan, conn: Conn, o: Outcome, where: str) -> Iterator[str]:
    finals = [e.text for e in o.engine_log
              if isinstance(e, CaptionEvent) and e.stream == GOOD and e.final]
    done = [m["transcript"] for m in conn.messages if m["type"].endswith(".completed")]
    manual = plan.steps[0].kind == "update"
    want = [" ".join(finals)] if manual else finals
    if len(finals) != len(SENTENCES) or done != want:
        yield f"{where}: transcripts {done}, the stream's finals {finals}"


def check_engine(o: Outcome) -> Iterator[str]:
    started = [e.stream for e in o.engine_log if isinstance(e, StreamStarted)]
    ended = [e.stream for e in o.engine_log if isinstance(e, StreamEnded)]
    if sorted(started) != sorted(ended):
        yield f"engine: streams started {sorted(started)}, ended {sorted(ended)}"
    if o.open_streams:
        yield f"engine: streams still open after every client left: {o.open_streams}"


def check(o: Outcome) -> list[str]:
    """Every problem found in ``o`` (empty: none)."""
    problems = [f"logged: {r}" for r in o.errors]
    problems += check_engine(o)
    ids: list[str] = []
    for plan, conns in o.plans:
        for n, conn in enumerate(conns):
            problems += check_conn(plan, conn, o, n)
            ids += [m["event_id"] for m in conn.messages if isinstance(m.get("event_id"), str)]
    if len(ids) != len(set(ids)):
        problems.append("server event_ids are not unique across the sessions")
    return problems

