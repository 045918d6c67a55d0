"""A seeded random fuzz of the configuration: a config that loads must run.

:func:`draw` picks values for the numeric and choice keys of ``[audio]``,
``[vad]``, ``[stream]``, ``[worker]`` and ``[server]``, read from the
validator's own declarations (each field's range, floor or choices), so the
draw follows the validator as it changes. Boundaries are favoured: the
minimum, the maximum, 0 where allowed, values just inside them, tiny and
huge ratios; the combinations that stress the segmenter (a short
``max_segment_s``, ``min_partial_ms`` past it, the longest pre-roll and
start windows) come more often than chance would bring them. One seed in
ten also draws one value just outside its range, and cross-key rules
(``split_search_s`` against ``max_segment_s``) break by chance.

:func:`load` holds ``load_config`` to its contract: it accepts, or refuses
with a one-line :class:`ConfigError` (never another exception), and what
it accepts :func:`to_toml` writes as a file that reads back to the same
config.

:func:`run` streams real speech (espeak-ng: a sentence, a pause, two
sentences run together, a pause, "Yes.") through a real :class:`Engine`
with that config, either as ``transcribe`` streams files (two streams at
once, in ``audio.file_chunk_ms`` chunks) or over a real
:class:`CaptionServer`: a ``/v1/ingest`` client that keeps to the server's
documented limits (messages within ``max_message_bytes``, audio within
``max_ingest_speed`` and ``ingest_burst_s``) and a ``/v1/captions``
subscriber. The model is scripted (tests/fakes.py; stepping for
``continuous`` batching): one word per half second of audio, in a few
milliseconds a call and now and then tens, as a model's calls take.

:func:`check` then asks what any config must give: no exception, no error
event or error log, no partial with partials off, every segment exactly
one final, finals in segment and time order, none longer than
``vad.max_segment_s`` nor past the audio, each saying what the model hears
in its audio (at least that with ``final_replaces_stable = false``, which
keeps the partials' stable words), ``stream.ended`` last and counting
them, speech captioned when the start rule can be met, the run over in
time. Over the server also: the client's summary and the subscriber's
finals match the engine's, and a subscriber that resumes the ended stream
from seq 0 gets what ``server.history`` kept, a gap for the rest, and
``stream.ended``. With ``server.subscriber_queue`` at most
:data:`TIGHT_QUEUE` a connection closed as too slow (1013) is the
documented policy, not a failure.

The microphone's keys (``block_ms``, ``max_pending_blocks``,
``stall_timeout_s``, ``reopen_interval_s``) are drawn and loaded but not
run: capture plays in real time (tests/audio/test_microphone.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import random
import time
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from evoxtral_stream.config import (
    STALL_TIMEOUT_BLOCKS,
    AudioConfig,
    Config,
    ConfigError,
    ServerConfig,
    StreamConfig,
    VadConfig,
    WorkerConfig,
    load_config,
    to_toml,
)
from evoxtral_stream.engine.backends.base import Backend, Done
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import (
    SAMPLE_RATE,
    CaptionEvent,
    EngineEvent,
    Int16Array,
    StreamEnded,
    StreamError,
    StreamStarted,
)
from evoxtral_stream.run import FileJob, LatencyLog, transcribe_samples
from evoxtral_stream.server.app import CaptionServer
from tests.fakes import ScriptedBackend, SteppingScriptedBackend, words_so_far
from tests.speech import speak

__all__ = ["Clip", "Draw", "Outcome", "check", "draw", "load", "run"]

# The sections drawn, and the keys of them left alone: text, arrays, and
# where and to whom the server listens.
SECTIONS: dict[str, type] = {"audio": AudioConfig, "vad": VadConfig, "stream": StreamConfig,
                             "worker": WorkerConfig, "server": ServerConfig}
SKIP = frozenset({"audio.device", "audio.channels", "audio.split_channels", "server.host",
                  "server.port", "server.allowed_origins", "server.tls_cert",
                  "server.tls_key", "server.allow_anonymous"})
# How long one run may take: most take under a second, a few by design
# (a worker.max_wait_ms of a second, partials every 10 ms) a few seconds.
RUN_LIMIT_S = 20.0
# A model call takes this long (seconds); a step of continuous batching a
# fifth of it. Now and then one takes HICCUP_S more (see _Hiccups): long
# enough for the engine's stall watch (every 0.05 s) to see, well below
# the least worker.stall_timeout_s (0.1).
CALL_S = (0.0, 0.001, 0.005)
HICCUP_S = 0.04
HICCUP_GAP_S = 0.25
# How long a client over the server may take to send the clip (about
# CLIP_S s of audio) within server.max_ingest_speed: a lower speed is drawn
# anew above what that needs.
SEND_S = 1.0
CLIP_S = 14.0
# How long the server may be busy while a client's messages wait (see _pace).
JITTER_S = 0.025
# The longest worker.max_wait_ms a run feeds as transcribe does (see _files).
FILE_WAIT_MS = 20
# server.subscriber_queue this short overflows on one burst of events (a
# final and stream.ended, a split's final and the next partial): closing
# a connection with 1013 then is the documented policy.
TIGHT_QUEUE = 4
# A segment may end up to a frame past max_segment_s (whole frames).
FRAME_SLACK_S = 0.03

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Clip:
    """The test speech, 16 kHz mono (module doc)."""

    audio: Int16Array

    @staticmethod
    def make() -> Clip:
        def gap(s: float) -> Int16Array:
            return np.zeros(int(s * SAMPLE_RATE), np.int16)

        parts = [gap(0.4), speak("Good evening and welcome to the live captioning demo."),
                 gap(1.0), speak("I was thinking maybe we could try that new restaurant"),
                 speak("Please remember to turn off your phone before the show."),
                 gap(0.7), speak("Yes."), gap(0.3)]
        return Clip(np.concatenate(parts))


@dataclass(frozen=True)
class Draw:
    seed: int
    overrides: dict[str, object]
    call_s: float
    """How long the scripted model takes a call."""
    server: bool
    """Run over the server (else as ``transcribe`` streams files)."""

    def __str__(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in sorted(self.overrides.items()))
        return (f"seed {self.seed}: {keys or 'defaults'}; model call {self.call_s * 1000:g} ms"
                f"{'; over the server' if self.server else ''}")


def _number(rng: random.Random, tp: object, meta: Mapping[str, Any], default: object,
            refuse: bool) -> object:
    """A value for a number key with the validator's ``meta`` (its range,
    and a floor above 0 for a limit that 0 turns off); ``refuse``: one just
    outside the range."""
    lo, hi = meta["range"]
    least = meta.get("least")
    r = rng.random()
    if tp is int:
        lo, hi = int(lo), int(hi)
        if refuse:
            return rng.choice([lo - 1, hi + 1])
        if r < 0.45:
            return rng.choice([v for v in (lo, lo + 1, hi - 1, hi, 0, 1) if lo <= v <= hi])
        if r < 0.6:
            return default
        if r < 0.8:
            return rng.randint(lo, hi)
        # Log-uniform: small values as likely as large ones.
        return min(hi, max(lo, round(math.exp(rng.uniform(0, math.log(hi + 1))) - 1)))
    lo, hi = float(lo), float(hi)
    if refuse:
        return rng.choice([lo - 0.01, hi * 1.01 + 0.01])
    if r < 0.45:
        near = [lo, hi, lo + 1e-3, hi - 1e-3, 0.0, 1e-3, 0.01, 0.05]
        if least is not None:
            near += [least, least + 1e-3]
        value = rng.choice([v for v in near if lo <= v <= hi])
    elif r < 0.6:
        value = typing.cast(float, default)
    elif r < 0.8:
        value = rng.uniform(lo, hi)
    else:
        value = min(hi, max(lo, math.exp(rng.uniform(math.log(1e-3), math.log(hi + 1e-3)))))
    if least is not None and 0 < value < least and rng.random() < 0.9:
        value = least  # below the floor is refused: now and then, not mostly
    return value


def draw(seed: int) -> Draw:
    """The overrides of seed ``seed`` (module doc): each key changed with a
    probability drawn per seed."""
    rng = random.Random(seed)
    defaults = load_config(env={})
    overrides: dict[str, object] = {}
    ranged: list[tuple[str, object, Mapping[str, Any]]] = []
    change = rng.uniform(0.2, 0.8)
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        current = getattr(defaults, section)
        for f in dataclasses.fields(cls):
            dotted = f"{section}.{f.name}"
            if dotted in SKIP:
                continue
            tp, meta = hints[f.name], f.metadata
            if "range" in meta:
                ranged.append((dotted, tp, meta))
            if rng.random() >= change:
                continue
            if "choices" in meta:
                overrides[dotted] = rng.choice(meta["choices"])
            elif tp is bool:
                overrides[dotted] = rng.random() < 0.5
            else:
                overrides[dotted] = _number(rng, tp, meta, getattr(current, f.name), False)
    if rng.random() < 0.2:
        overrides["vad.max_segment_s"] = rng.choice([2.0, 2.5, 3.0])
        overrides["vad.split_search_s"] = rng.choice([0.1, 0.5, 1.0, 1.9])
    if rng.random() < 0.15:
        overrides["stream.min_partial_ms"] = rng.choice([29_000, 30_000])
    if rng.random() < 0.15:
        overrides["vad.pre_roll_ms"] = 2000
        overrides["vad.start_window_ms"] = rng.choice([10, 2000])
    longest = overrides.get("vad.max_segment_s", defaults.vad.max_segment_s)
    search = overrides.get("vad.split_search_s", defaults.vad.split_search_s)
    assert isinstance(longest, float) and isinstance(search, float)
    if search >= longest and rng.random() < 0.8:
        # Refused (the search must be shorter than the segment): mostly not.
        overrides["vad.split_search_s"] = rng.choice([0.1, longest / 2, longest - 1e-3])
    if rng.random() < 0.1:
        key, tp_, meta_ = rng.choice(ranged)
        overrides[key] = _number(rng, tp_, meta_, None, True)
    block_ms = overrides.get("audio.block_ms", defaults.audio.block_ms)
    stall = overrides.get("audio.stall_timeout_s", defaults.audio.stall_timeout_s)
    if (isinstance(block_ms, int) and isinstance(stall, float | int)
            and 0.1 <= stall < STALL_TIMEOUT_BLOCKS * block_ms / 1000):
        # Within its own floor but under five blocks: refused, which would
        # leave the rest of the draw unrun (the microphone's keys are not).
        overrides["audio.stall_timeout_s"] = STALL_TIMEOUT_BLOCKS * block_ms / 1000
    server = rng.random() < 0.4
    speed = overrides.get("server.max_ingest_speed", defaults.server.max_ingest_speed)
    burst = overrides.get("server.ingest_burst_s", defaults.server.ingest_burst_s)
    assert isinstance(speed, float) and isinstance(burst, float)
    if server and speed and (CLIP_S - burst / 2) / (speed / 2) > SEND_S:
        # A client within such a speed would take long to send the clip (a
        # short burst still makes it take up to 3 s: see _pace).
        overrides["server.max_ingest_speed"] = rng.uniform(
            (CLIP_S - burst / 2) / (SEND_S / 2), 1000.0)
    return Draw(seed, overrides, rng.choice(CALL_S), server)


def load(d: Draw, tmp: Path) -> tuple[Config | None, list[str]]:
    """``load_config`` of the draw: the config, or None if refused as the
    contract allows; and what broke the contract (module doc)."""
    try:
        cfg = load_config(overrides=d.overrides, env={})
    except ConfigError as e:
        text = str(e)
        return None, [f"refused without one line: {text!r}"] if "\n" in text or not text else []
    except Exception as e:  # the contract: ConfigError or nothing
        return None, [f"load_config raised {type(e).__name__}: {e}"]
    path = tmp / f"config-{d.seed}.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    try:
        again = load_config(path, env={})
    except Exception as e:
        return cfg, [f"to_toml's file does not load: {type(e).__name__}: {e}"]
    if again == cfg:
        return cfg, []
    diff = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)
            if getattr(getattr(cfg, s), f.name) != getattr(getattr(again, s), f.name)]
    return cfg, [f"to_toml does not read back to the same config: {diff or 'other keys'}"]


@dataclass
class Outcome:
    events: list[EngineEvent] = field(default_factory=list)
    streams: dict[str, float] = field(default_factory=dict)
    """Each stream run, and its audio's length in seconds."""
    errors: list[str] = field(default_factory=list)
    """Exceptions, timeouts and error logs of the run."""
    ingest: list[dict[str, Any]] = field(default_factory=list)
    ingest_closed: int | None = None
    subscriber: list[dict[str, Any]] = field(default_factory=list)
    subscriber_closed: int | None = None
    resumed: list[dict[str, Any]] = field(default_factory=list)
    """What a subscriber resuming the ended stream from seq 0 got."""
    elapsed_s: float = 0.0


class _ErrorLogs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"logged {record.levelname} {record.name}: {record.getMessage()}")


@contextlib.contextmanager
def _error_logs() -> Iterator[_ErrorLogs]:
    handler = _ErrorLogs()
    logger = logging.getLogger("evoxtral_stream")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


class _Hiccups:
    """Makes a model call :data:`HICCUP_S` slower now and then, as a real
    model's call is: the third, then one at most every :data:`HICCUP_GAP_S`."""

    def __init__(self) -> None:
        self.calls = 0
        self.last = -math.inf

    def __call__(self) -> None:
        self.calls += 1
        now = time.monotonic()
        if self.calls >= 3 and now - self.last >= HICCUP_GAP_S:
            self.last = now
            time.sleep(HICCUP_S)


class _Calls(ScriptedBackend):
    hiccup: _Hiccups

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        self.hiccup()
        return super().transcribe(batch)


class _Steps(SteppingScriptedBackend):
    hiccup: _Hiccups

    def step(self) -> list[Done]:
        self.hiccup()
        return super().step()


def _backend(cfg: Config, call_s: float) -> Backend:
    backend: _Steps | _Calls
    if cfg.worker.batching == "continuous":
        backend = _Steps(words_so_far, step_delay_s=call_s / 5)
    else:
        backend = _Calls(words_so_far, delay_s=call_s)
    backend.hiccup = _Hiccups()
    return backend


async def _files(cfg: Config, engine: Engine, clip: Clip, out: Outcome) -> None:
    """Two streams at once, as ``transcribe`` streams files; but with a
    ``worker.max_wait_ms`` past :data:`FILE_WAIT_MS` as live sources ahead
    of time push theirs (the file reader waits for every partial, and the
    worker up to max_wait_ms before each: seconds a seed, by design)."""
    audio = {"a": clip.audio, "b": clip.audio[: len(clip.audio) // 2]}
    jobs = [FileJob(name, samples) for name, samples in audio.items()]
    out.streams.update((name, len(samples) / SAMPLE_RATE) for name, samples in audio.items())
    if cfg.worker.max_wait_ms <= FILE_WAIT_MS:
        await transcribe_samples(cfg, engine, jobs, realtime=False)
        return
    chunk = max(1, cfg.audio.file_chunk_ms * SAMPLE_RATE // 1000)

    async def live(job: FileJob) -> None:
        stream = engine.open_stream(job.stream, source="file")
        samples = audio[job.stream]
        for i in range(0, len(samples), chunk):
            stream.push(samples[i:i + chunk])
            await asyncio.sleep(0)
        await stream.close()

    await asyncio.gather(*(live(j) for j in jobs))


async def _read(ws: ClientConnection, into: list[dict[str, Any]]) -> int | None:
    """Every message until the server closes; its close code."""
    with contextlib.suppress(ConnectionClosed):
        async for raw in ws:
            into.append(json.loads(raw))
    return ws.close_code


def _pace(s: ServerConfig) -> float:
    """The speed a client keeps to within ``max_ingest_speed`` (0: none),
    after half the burst at once. The bucket holds the burst and fills at
    that speed, counting audio as the server reads it, so messages held
    back for a moment arrive together: half the speed, and no more than
    half the burst in :data:`JITTER_S`."""
    if not s.max_ingest_speed:
        return 0.0
    return min(s.max_ingest_speed / 2, s.ingest_burst_s / 2 / JITTER_S)


async def _ingest(cfg: Config, server: CaptionServer, clip: Clip, out: Outcome) -> None:
    """One ``/v1/ingest`` session within the server's limits, reading its
    events as it sends, with a ``/v1/captions`` subscriber of its stream."""
    s = cfg.server
    out.streams["net"] = len(clip.audio) / SAMPLE_RATE
    base = f"ws://127.0.0.1:{server.port}"
    # Messages within max_message_bytes (less a frame header), and each an
    # eighth of the burst at most: the server counts audio as it reads it,
    # and messages that a busy moment held back arrive together.
    chunk = min(s.max_message_bytes - 64, 32_000, int(s.ingest_burst_s / 8 * SAMPLE_RATE) * 2)
    chunk -= chunk % 2
    pace = _pace(s)
    data = clip.audio.tobytes()
    async with connect(f"{base}/v1/captions?stream=net", max_size=None) as sub, \
            connect(f"{base}/v1/ingest?stream=net", max_size=None) as ws:
        subscribed = asyncio.ensure_future(_read(sub, out.subscriber))
        await ws.send(json.dumps({"type": "config", "sample_rate": SAMPLE_RATE}))
        out.ingest.append(json.loads(await ws.recv()))
        # The server's bucket starts as it sends ingest.ready: before this.
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        reading = asyncio.ensure_future(_read(ws, out.ingest))
        sent_s = 0.0
        with contextlib.suppress(ConnectionClosed):
            for i in range(0, len(data), chunk):
                part = data[i:i + chunk]
                sent_s += len(part) / 2 / SAMPLE_RATE
                ahead = sent_s - s.ingest_burst_s / 2
                if pace and ahead > 0:
                    await asyncio.sleep(max(0.0, t0 + ahead / pace - loop.time()))
                await ws.send(part)
                await asyncio.sleep(0)
            await ws.send(json.dumps({"type": "end"}))
        out.ingest_closed = await reading
        # The subscriber's stream.ended may follow the ingest's close.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while not any(m.get("type") == "stream.ended" for m in out.subscriber) \
                        and not subscribed.done():
                    await asyncio.sleep(0.01)
        await sub.close()
        out.subscriber_closed = await subscribed
    # A subscriber back after the end resumes from the start: what
    # server.history kept, a gap for the rest, then stream.ended.
    async with connect(f"{base}/v1/captions?stream=net&since=net:0", max_size=None) as again:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                async for raw in again:
                    out.resumed.append(json.loads(raw))
                    if out.resumed[-1].get("type") == "stream.ended":
                        break


async def run(d: Draw, cfg: Config, clip: Clip) -> Outcome:
    """Stream the clip through an engine (and a server) configured so."""
    out = Outcome()
    record = LatencyLog()
    t0 = time.monotonic()
    with _error_logs() as errors:
        try:
            async with asyncio.timeout(RUN_LIMIT_S):
                async with Engine(cfg, _backend(cfg, d.call_s)) as engine:
                    engine.add_listener(record)
                    if d.server:
                        srv = dataclasses.replace(cfg.server, port=0)
                        async with CaptionServer(engine, srv) as server:
                            await _ingest(cfg, server, clip, out)
                    else:
                        await _files(cfg, engine, clip, out)
        except TimeoutError:
            out.errors.append(f"the run did not end within {RUN_LIMIT_S:g} s")
        except Exception as e:  # what the fuzz is after
            log.exception("config fuzz: the run failed")
            out.errors.append(f"the run raised {type(e).__name__}: {e}")
    out.errors += errors.lines
    out.events = record.events
    out.elapsed_s = time.monotonic() - t0
    return out


def check(d: Draw, cfg: Config, out: Outcome) -> list[str]:
    """What every config that loads must give (module doc)."""
    problems = list(out.errors)
    for stream, duration in out.streams.items():
        mine = [e for e in out.events if getattr(e, "stream", None) == stream]
        problems += [f"{stream}: {p}" for p in _check_stream(cfg, mine, duration)]
    if d.server and not out.errors:
        problems += _check_wire(cfg, out)
    return problems


def _speech_expected(cfg: Config) -> bool:
    """Whether the clip's speech must open a segment: its sentences hold
    more than a second of voiced frames, and the start rule asks for less
    than a third of a second of them."""
    v = cfg.vad
    return v.min_speech_ms <= 1000 and v.start_ratio * v.start_window_ms <= 300


def _check_stream(cfg: Config, events: list[EngineEvent], duration: float) -> list[str]:
    problems: list[str] = []
    if not events or not isinstance(events[0], StreamStarted):
        problems.append("stream.started is not its first event")
    ended = events[-1] if events and isinstance(events[-1], StreamEnded) else None
    if ended is None:
        problems.append(f"stream.ended is not its last event: {events[-1:]}")
    problems += [f"error event {e.code}: {e.message}" for e in events
                 if isinstance(e, StreamError)]
    caps = [e for e in events if isinstance(e, CaptionEvent)]
    seqs = [c.seq for c in caps]
    if seqs != sorted(set(seqs)):
        problems.append(f"seqs do not strictly increase: {seqs[:20]}")
    finals = [c for c in caps if c.final]
    if cfg.stream.partial_interval_ms == 0 and len(finals) < len(caps):
        problems.append("partials with stream.partial_interval_ms = 0")
    segments = [c.segment for c in finals]
    if segments != list(range(len(finals))):
        problems.append(f"the finals' segments are not 0, 1, 2, ...: {segments}")
    for seg in sorted({c.segment for c in caps} - set(segments)):
        problems.append(f"segment {seg} has partials and no final")
    last_seq = {f.segment: f.seq for f in finals}
    late = sorted({c.segment for c in caps if c.seq > last_seq.get(c.segment, c.seq)})
    if late:
        problems.append(f"segments {late} have captions after their final")
    if not finals and _speech_expected(cfg):
        problems.append("no final for the clip's speech")
    for a, b in itertools.pairwise(finals):
        if b.start < a.end - 1e-6:
            problems.append(f"final {b.segment} starts at {b.start:.3f}, before final "
                            f"{a.segment} ends ({a.end:.3f})")
    for f in finals:
        if not 0 <= f.start < f.end <= duration + 1e-6:
            problems.append(f"final {f.segment} spans {f.start:.3f}..{f.end:.3f} s of "
                            f"{duration:.3f} s of audio")
        if f.end - f.start > cfg.vad.max_segment_s + FRAME_SLACK_S:
            problems.append(f"final {f.segment} is {f.end - f.start:.3f} s long, past "
                            f"vad.max_segment_s = {cfg.vad.max_segment_s:g}")
        # The scripted model says one word per half second of its audio.
        heard = words_so_far(np.zeros(round((f.end - f.start) * SAMPLE_RATE), np.float32))
        if cfg.stream.final_replaces_stable and f.text != heard:
            problems.append(f"final {f.segment} says {f.text!r}, not what its "
                            f"{f.end - f.start:.3f} s of audio decode to ({heard!r})")
        elif not f.text.startswith(heard):
            # It keeps the stable words of partials, which may have heard more.
            problems.append(f"final {f.segment} says {f.text!r}, less than its "
                            f"{f.end - f.start:.3f} s of audio decode to ({heard!r})")
    if ended is not None and (ended.finals, ended.segments) != (len(finals), len(finals)):
        problems.append(f"stream.ended counts {ended.finals} finals of {ended.segments} "
                        f"segments; {len(finals)} finals were sent")
    return problems


def _check_wire(cfg: Config, out: Outcome) -> list[str]:
    problems: list[str] = []
    tight = cfg.server.subscriber_queue <= TIGHT_QUEUE
    finals = sum(1 for e in out.events if isinstance(e, CaptionEvent) and e.final)
    errors = [m for m in out.ingest if m.get("type") == "error"]
    if errors:
        problems.append(f"the ingest client got errors: {errors[:3]}")
    if not (tight and out.ingest_closed == 1013):
        summary = [m for m in out.ingest if m.get("type") == "ingest.summary"]
        if out.ingest_closed != 1000 or len(summary) != 1:
            problems.append(f"the ingest client was closed with {out.ingest_closed} "
                            f"after {[m.get('type') for m in out.ingest][-3:]}")
        elif summary[0]["finals"] != finals:
            problems.append(f"ingest.summary counts {summary[0]['finals']} finals of {finals}")
    if not (tight and out.subscriber_closed == 1013):
        got = [m for m in out.subscriber if m.get("type") == "caption" and m["final"]]
        if len(got) != finals:
            problems.append(f"the subscriber got {len(got)} finals of {finals}")
        if not out.subscriber or out.subscriber[-1].get("type") != "stream.ended":
            problems.append(f"the subscriber's last message is not stream.ended "
                            f"(closed with {out.subscriber_closed})")
    return problems + _check_resume(cfg, out)


def _check_resume(cfg: Config, out: Outcome) -> list[str]:
    seqs = [e.seq for e in out.events if isinstance(e, CaptionEvent)]
    kept = seqs[len(seqs) - min(len(seqs), cfg.server.history):]
    missing = seqs[:len(seqs) - len(kept)]
    types = [m.get("type") for m in out.resumed]
    want = ["hello"] + ["gap"] * bool(missing) + ["caption"] * len(kept) + ["stream.ended"]
    if types != want:
        return [f"the resume from seq 0 got {types[:8]}..., not {want[:8]}... "
                f"(server.history = {cfg.server.history}, {len(seqs)} captions)"]
    problems = []
    if [m["seq"] for m in out.resumed if m["type"] == "caption"] != kept:
        problems.append("the resume replayed other captions than the newest kept")
    gaps = [(m["from"], m["to"]) for m in out.resumed if m["type"] == "gap"]
    if missing and gaps != [(1, missing[-1])]:
        problems.append(f"the resume's gap is {gaps}, not from 1 to {missing[-1]}")
    return problems
