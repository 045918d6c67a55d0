"""A seeded random caption server for the browser page, and what the page must show.

:func:`draw_script` draws, from a seed, a protocol-valid timeline of engine
events for several streams (odd but valid ids: unicode, RTL, emoji, ``:``,
``%``, markup), as the engine makes them: partials whose stable text only
grows while their tail is revised or shrinks, finals with tags and unicode
text (empty ones too), decode failures of partials and finals, stalls,
streams that end and are opened again (a new run: segments from 0, seqs
going on), interleaved across streams; and among them connection drops
(a close code, or the TCP connection cut) and server restarts without a
journal (a new epoch: numbering from 1, open streams cut), each followed by
events that happen while the page is away.

:class:`FuzzServer` plays it as ``/v1/captions`` does: the real
:class:`Broadcaster` (a small history, so resumes also get gaps) keeps what
a resume replays and answers each reconnect's ``since=``/``epoch=``; each
reconnect's replay may itself be cut after a random number of messages.
The driver waits for the page to be back before it goes on, so what the
page receives does not depend on timing.

:class:`Expected` reads every message the page was sent, in order, and
says per docs/protocol.md and clients/README.md what the page must show:
per stream, each final once, in order, with the notes (gaps, errors, one
per end) where they came; the latest partial of each open segment of the
stream's current run, marked when a decode of it failed since; the
picker's ended marks; and the ``since=`` and ``epoch=`` each reconnect must
carry.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection

from evoxtral_stream.events import (
    CaptionEvent,
    EngineEvent,
    StreamEnded,
    StreamError,
    StreamStarted,
    TagMark,
)
from evoxtral_stream.server.broadcast import Broadcaster, Subscription
from evoxtral_stream.server.protocol import encode_event, encode_hello, parse_epoch, parse_since
from evoxtral_stream.text.tags import holds_digit, lookup_tag, normalize_tag_name

__all__ = [
    "STREAM_IDS", "Drop", "Expected", "FuzzServer", "Publish", "Restart", "Step",
    "draw_script",
]

#: Valid stream ids (docs/protocol.md: 1 to 128 characters, no control
#: characters, no comma, no white space at either end) that a URL, a
#: ``since=`` list or HTML could trip over.
STREAM_IDS = [
    "talk", "studio-7", "a:b", "ünï côdé", "עברית מיקרופון", "🎙️ mic", "100% x&y=z+1",
    "<img src=x onerror=window.__pwned=1>", "q?#frag", "..",
]

_WORDS = [
    "hello", "world", "héllo", "naïve", "مرحبا", "שלום", "עולם", "😀", "🎉👍🏽", "日本語",
    "&amp;", "<b>bold</b>", "<img src=x onerror=window.__pwned=1>", "a&b", "1<2", "\"q\"",
    "it's", "ok.", "so...", "x\u200by", "e\u0301",
]
#: Tags as the engine writes them (canonical names): known ones of every
#: kind, unknown ones (markup too), and brackets that are no tag.
_TAGS = ["[nervous]", "[laughs]", "[whispers]", "[pause]", "[beeps]", "[clears throat]",
         "[sighs]", "[]", "[<script>]"]


@dataclass(frozen=True)
class Publish:
    """An engine event; ``run`` numbers the stream's run (its stream.started)."""

    event: EngineEvent
    run: int


@dataclass(frozen=True)
class Drop:
    """The connection is closed (``code``; 0: the TCP connection is cut) once
    every message published so far has been sent."""

    code: int


@dataclass(frozen=True)
class Restart:
    """The server restarts without its journal: a new epoch, its streams cut."""


Step = Publish | Drop | Restart


@dataclass
class _Stream:
    run: int = 0
    open: bool = False
    segment: int = 0             # the open (or next) segment
    partials: int = 0            # partials of the open segment so far
    stable: list[str] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)   # the last partial's words and tags
    segments: int = 0
    finals: int = 0


class _Draw:
    """The timeline's generator: engine-like per-stream state over epochs."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.streams: dict[str, _Stream] = {}
        self.seq: dict[str, int] = {}
        self.ends = 0

    def words(self, lo: int, hi: int) -> list[str]:
        out = []
        for _ in range(self.rng.randint(lo, hi)):
            out.append(self.rng.choice(_TAGS if self.rng.random() < 0.2 else _WORDS))
        return out

    def next_seq(self, name: str) -> int:
        # docs/protocol.md: grows by at least 1 with every caption.
        self.seq[name] = self.seq.get(name, 0) + (1 if self.rng.random() < 0.85
                                                  else self.rng.randint(2, 4))
        return self.seq[name]

    def caption(self, name: str, final: bool, stable: list[str], tail: list[str]) -> Publish:
        s = self.streams[name]
        tokens = stable + tail
        text = " ".join(tokens)
        stable_text = " ".join(stable)
        unstable = text[len(stable_text):]
        tags: list[TagMark] = []
        plain: list[str] = []
        for tok in tokens:
            spec = lookup_tag(tok[1:-1]) if tok.startswith("[") and tok.endswith("]") else None
            if tok.startswith("[") and tok.endswith("]") and tok[1:-1].strip():
                tags.append(TagMark(spec.name if spec else normalize_tag_name(tok[1:-1]),
                                    spec.kind.value if spec else "unknown", len(plain),
                                    float(s.segment), spec is not None))
            else:
                plain.append(tok)
        start = float(s.segment * 2)
        ev = CaptionEvent(name, s.segment, self.next_seq(name), final, text, " ".join(plain),
                          text if final else stable_text, "" if final else unstable,
                          tuple(tags), start, start + 1.5, 0.1)
        return Publish(ev, s.run)

    def start(self, name: str) -> list[Step]:
        s = self.streams.setdefault(name, _Stream())
        s.run += 1
        s.open, s.segment, s.partials, s.stable, s.shown = True, 0, 0, [], []
        s.segments = s.finals = 0
        return [Publish(StreamStarted(name, self.rng.choice(["ingest", "mic", "realtime"])),
                        s.run)]

    def close_segment(self, name: str) -> list[Step]:
        """The open segment's end as the engine makes it: a final (maybe
        empty), or a failed final decode (its error, then the partial shown
        as its final, or nothing when none was shown), or a final lost."""
        s = self.streams[name]
        out: list[Step] = []
        r = self.rng.random()
        if r < 0.12:
            out.append(Publish(StreamError(name, "decode_failed", "RuntimeError: <b>boom</b>",
                                           s.segment, closes_segment=not s.partials), s.run))
            if s.partials:
                out.append(self.caption(name, True, list(s.shown), []))
        elif r < 0.17 and not s.partials:
            out.append(Publish(StreamError(name, "final_lost", "the model did not finish",
                                           s.segment, closes_segment=True), s.run))
        elif r < 0.22:
            out.append(self.caption(name, True, [], []))          # an empty final
        else:
            keep = s.stable if self.rng.random() < 0.7 else []   # a final may revise
            out.append(self.caption(name, True, list(keep), self.words(0 if keep else 1, 4)))
        s.segment += 1
        s.segments += 1
        s.finals += any(isinstance(p, Publish) and isinstance(p.event, CaptionEvent)
                        for p in out)
        s.partials, s.stable, s.shown = 0, [], []
        return out

    def partial(self, name: str) -> list[Step]:
        s = self.streams[name]
        grow = self.words(0, 2)
        # Stable words are never taken back; the tail grows, is revised or shrinks.
        stable = s.stable + grow if self.rng.random() < 0.5 else list(s.stable)
        tail = self.words(0 if stable else 1, 3)
        s.stable, s.partials, s.shown = stable, s.partials + 1, stable + tail
        return [self.caption(name, False, stable, tail)]

    def end(self, name: str) -> list[Step]:
        s = self.streams[name]
        out = self.close_segment(name) if s.partials or self.rng.random() < 0.3 else []
        self.ends += 1
        s.open = False
        # A duration of its own: two ends of one id are told apart.
        out.append(Publish(StreamEnded(name, 10.0 + self.ends + s.segment / 1000, s.segments,
                                       s.finals), s.run))
        return out

    def event(self) -> list[Step]:
        """One random engine step."""
        rng = self.rng
        live = [n for n, s in self.streams.items() if s.open]
        idle = [n for n in STREAM_IDS if n not in live]
        r = rng.random()
        if not live or (r < 0.1 and len(live) < 4 and idle):
            return self.start(rng.choice(idle))
        name = rng.choice(live)
        s = self.streams[name]
        if r < 0.5:
            out = self.partial(name)
            if rng.random() < 0.08:
                # A partial decode failed: its error, then the next partial.
                out = [Publish(StreamError(name, "decode_failed", "partial failed", s.segment),
                               s.run), *self.partial(name)]
            return out
        if r < 0.8:
            return self.close_segment(name)
        if r < 0.85:
            return [Publish(StreamError(name, "model_stalled", "stuck > 5 s"), s.run)]
        return self.end(name)

    def restart(self) -> None:
        # Without the journal: every stream is cut, the numbering starts again.
        self.streams.clear()
        self.seq.clear()


def draw_script(seed: int, steps: int = 70) -> tuple[int, list[Step]]:
    """The server's history size and a timeline of ``steps`` engine steps
    with drops and restarts among them."""
    rng = random.Random(seed)
    draw = _Draw(rng)
    history = rng.choice([3, 6, 12, 200])
    out: list[Step] = []
    for _ in range(steps):
        r = rng.random()
        if r < 0.07:
            out.append(Drop(rng.choice([1001, 1011, 1012, 1013, 0])))
        elif r < 0.10:
            out.append(Restart())
            draw.restart()
        else:
            out += draw.event()
    # Last, a partial decode of an open segment fails: the page ends with
    # that segment's partial marked (no caption of it follows).
    for name, s in draw.streams.items():
        if s.open and s.partials:
            out.append(Publish(StreamError(name, "decode_failed", "partial failed", s.segment),
                               s.run))
            break
    return history, out


# --- the server ----------------------------------------------------------------------

#: In a subscription's queue, with a close code after it: close once this is reached.
_CLOSE = "\x00close:"


@dataclass
class Connect:
    """One subscription as the server saw it: the since= and epoch= sent, and
    what the page was owed then (Expected's resume point)."""

    since: dict[str, int]
    epoch: str | None
    owed_since: dict[str, int]
    owed_epoch: str | None


class FuzzServer:
    """``/v1/captions`` for the page, playing a drawn timeline (module doc)."""

    def __init__(self, seed: int, history: int) -> None:
        self.rng = random.Random(seed ^ 0x5EED)
        self.history = history
        self.epochs = 0
        self.expected = Expected()
        self.connects: list[Connect] = []
        self.sent: list[tuple[int, str]] = []   # (connection number, message) in order
        self.ready = asyncio.Event()
        # Each caption's run, by (epoch, stream, seq): a replay spans runs.
        self.runs: dict[tuple[str, str, int], int] = {}
        self._current: Subscription | None = None   # the page's, once its replay is sent
        self._new_server()

    def _new_server(self) -> None:
        self.epochs += 1
        self.epoch = f"e{self.epochs}-{self.rng.randrange(16**6):06x}"
        self.open: set[str] = set()
        self.last_seq: dict[str, int] = {}
        self.broadcaster = Broadcaster(100_000, encode_event, history=self.history,
                                       last_seq=lambda s: self.last_seq.get(s, 0))

    async def handler(self, ws: ServerConnection) -> None:
        """A ``/v1/captions`` connection: hello, the replay (maybe cut short), live events."""
        assert ws.request is not None
        query = parse_qs(urlsplit(ws.request.path).query, errors="strict")
        since = parse_since(query.get("since", []), [])
        epoch = parse_epoch(query.get("epoch", []))
        self.connects.append(Connect(since, epoch, *self.expected.resume_point()))
        sub = self.broadcaster.subscribe(None, since, renumbered=epoch not in (None, self.epoch))
        backlog = [encode_hello("fuzz", sorted(self.open), ["captions", "resume"], ["en"],
                                epoch=self.epoch), *sub.backlog]
        cut = len(backlog)
        if len(backlog) > 2 and self.rng.random() < 0.3:
            cut = self.rng.randrange(1, len(backlog))   # the link drops mid-replay
        try:
            for message in backlog[:cut]:
                await self._send(ws, message)
            if cut < len(backlog):
                self.broadcaster.unsubscribe(sub)
                await ws.close(1011, "cut")
                return
            self._current = sub
            self.ready.set()
            closed = asyncio.ensure_future(ws.wait_closed())
            while True:
                get = asyncio.ensure_future(sub.queue.get())
                await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():      # the page left
                    get.cancel()
                    return
                message = get.result()
                if message.startswith(_CLOSE):
                    sub.queue.task_done()
                    break
                await self._send(ws, message)
                sub.queue.task_done()
            code = int(message.removeprefix(_CLOSE))
            if code:
                await ws.close(code, "fuzz")
            else:
                # Everything sent has left: cut the TCP connection (1006 in the page).
                while ws.transport.get_write_buffer_size():
                    await asyncio.sleep(0.01)
                ws.transport.abort()
        finally:
            self.broadcaster.unsubscribe(sub)

    async def _send(self, ws: ServerConnection, message: str) -> None:
        await ws.send(message)
        self.sent.append((len(self.connects), message))
        self.expected.deliver(json.loads(message), self.runs)

    def _publish(self, step: Publish) -> None:
        ev = step.event
        if isinstance(ev, StreamStarted):
            self.open.add(ev.stream)
        elif isinstance(ev, StreamEnded):
            self.open.discard(ev.stream)
        elif isinstance(ev, CaptionEvent):
            self.last_seq[ev.stream] = ev.seq
            self.runs[(self.epoch, ev.stream, ev.seq)] = step.run
        self.broadcaster.publish(ev)

    def _close(self, code: int) -> None:
        """Close the page's connection with ``code`` (0: cut it) once what it
        was sent so far has gone; later events reach it only by its resume."""
        sub, self._current = self._current, None
        if sub is None:
            return      # the page is away already
        self.ready.clear()
        self.broadcaster.unsubscribe(sub)
        sub.queue.put_nowait(f"{_CLOSE}{code}")

    async def play(self, script: list[Step], away: int = 4) -> None:
        """Play ``script`` to the connected page. After a drop or a restart,
        up to ``away`` more steps happen before the page is waited for."""
        await asyncio.wait_for(self.ready.wait(), 15)
        pending_wait = -1
        for i, step in enumerate(script):
            if isinstance(step, Publish):
                self._publish(step)
            else:
                self._close(step.code if isinstance(step, Drop) else 1012)
                if isinstance(step, Restart):
                    self._new_server()
                pending_wait = i + self.rng.randint(0, away)
            if i == pending_wait:
                await asyncio.wait_for(self.ready.wait(), 15)
        await asyncio.wait_for(self.ready.wait(), 15)
        assert self._current is not None
        await asyncio.wait_for(self._current.queue.join(), 15)   # all sent

    def end_state(self) -> dict[str, bool]:
        """Each stream the page may list: whether it must be marked ended."""
        return {name: name not in self.open for name in self.expected.known}


# --- what the page must show -------------------------------------------------------------


@dataclass
class Expected:
    """What the page must show, from the messages it was sent, in order."""

    epoch: str | None = None
    held: dict[str, int] = field(default_factory=dict)       # resume point per stream
    finals_seen: set[tuple[str, str, int]] = field(default_factory=set)
    ends_seen: set[tuple[str, str]] = field(default_factory=set)
    lines: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)
    partials: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    #: (stream, segment) of the partials shown with an error mark
    failed: set[tuple[str, int]] = field(default_factory=set)
    run_of: dict[str, tuple[str, int]] = field(default_factory=dict)
    known: set[str] = field(default_factory=set)
    chips: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def resume_point(self) -> tuple[dict[str, int], str | None]:
        """The since= and epoch= a reconnect must send now (nothing, no epoch)."""
        since = dict(self.held)
        return since, self.epoch if since else None

    def deliver(self, msg: dict[str, Any], runs: dict[tuple[str, str, int], int]) -> None:
        """Take one message sent to the page; ``runs`` gives each caption's
        run by (epoch, stream, seq)."""
        kind = msg["type"]
        name = msg.get("stream")
        if kind == "hello":
            if self.epoch is not None and msg["epoch"] != self.epoch:
                # A new numbering: every seq held means nothing now, and the
                # open segments of the old server never end.
                self.held = dict.fromkeys(self.held, 0)
                self.partials.clear()
            elif self.epoch is not None:
                for gone in set(self.partials) - set(msg["streams"]):
                    self.partials.pop(gone)   # ended (or cut) while away
            self.epoch = msg["epoch"]
            self.known.update(msg["streams"])
            return
        assert isinstance(name, str)
        if kind == "caption":
            self.known.add(name)
            seq = msg["seq"]
            if seq <= self.held.get(name, 0):
                return       # replayed: already had
            self.held.pop(name, None)
            self.held[name] = seq
            self._run(name, (self.epoch or "", runs[(self.epoch or "", name, seq)]))
            self.failed.discard((name, msg["segment"]))
            if msg["final"]:
                self.partials.get(name, {}).pop(msg["segment"], None)
                key = (self.epoch or "", name, seq)
                if msg["text"] and key not in self.finals_seen:
                    self.finals_seen.add(key)
                    self.lines.setdefault(name, []).append(("final", msg["text"]))
                    self.chips[msg["text"]] = _chips(msg)
            else:
                self.partials.setdefault(name, {})[msg["segment"]] = msg
        elif kind == "stream.started":
            self.known.add(name)
            self.partials.pop(name, None)
        elif kind == "stream.ended":
            self.known.add(name)
            self.partials.pop(name, None)
            end = (self.epoch or "", json.dumps(msg, sort_keys=True))
            if end not in self.ends_seen:
                self.ends_seen.add(end)
                self.lines.setdefault(name, []).append(("note", [name, "ended"]))
        elif kind == "gap":
            want = [str(msg["from"])] + ([] if msg["to"] is None else [str(msg["to"])])
            self.lines.setdefault(name, []).append(("note", want))
            if msg["to"] is None:
                self.held[name] = 0
                self.partials.pop(name, None)
        elif kind == "error":
            # A failed decode: the segment's partial stays, marked, until
            # its next caption (docs/protocol.md: one follows).
            if msg.get("segment") in self.partials.get(name, {}):
                self.failed.add((name, msg["segment"]))
            self.lines.setdefault(name, []).append(("note", [msg["code"], msg["message"]]))

    def _run(self, name: str, run: tuple[str, int]) -> None:
        if self.run_of.get(name) != run:
            self.run_of[name] = run
            self.partials.pop(name, None)   # the old run's open segments never end

    def partial_lines(self) -> list[tuple[str, int, str, str, bool]]:
        """(stream, segment, text, unstable tail shown dim, error mark) of
        each partial line."""
        return sorted((name, seg, m["text"], m["unstable"] if m["stable"] + m["unstable"]
                       == m["text"] else m["text"], (name, seg) in self.failed)
                      for name, segs in self.partials.items() for seg, m in segs.items())


def _chips(msg: dict[str, Any]) -> list[tuple[str, str]]:
    """(chip text, kind) of each tag chip of a caption's text: its tags, in
    order, each coloured by its ``kind`` (docs/protocol.md, clients/README.md)."""
    inner = [m.group(1).strip() for m in re.finditer(r"\[([^\[\]]*)\]", msg["text"])]
    return [(f"[{name}]", str(t["kind"])) for name, t in zip(
        [n for n in inner if n and not holds_digit(n)], msg["tags"], strict=True)]

