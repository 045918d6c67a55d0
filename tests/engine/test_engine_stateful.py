"""A stateful model of the engine: streams, listeners and drain, driven at random.

Hypothesis drives the engine's public API as the server and the CLI do
(open streams, reopen an id, push voiced and silent audio the real webrtcvad
segmenter cuts, cut, close, switch language, subscribe and unsubscribe
listeners, one of which may raise, wait for idle, drain, or a drain cut
short) behind the real model worker, on a tiny inbox and batch so that
finals back up, in batch or continuous mode, with decode failures or deaths
of the model thread, the journal on or off. After every step the events so
far are checked against the contracts of the engine, the worker and the
merger (their module docs):

- per stream id, ``seq`` goes up by one with every caption, across a reopen
  under the id; ``text == stable + unstable`` (a final's ``unstable``
  empty) and a partial's stable text only grows within its segment;
- every segment of a stream is closed exactly once: by its final caption
  (finals in segment order) or by an error that ``closes_segment``
  (``decode_failed``, or ``final_lost`` once a drain was cut short), and no
  caption of it follows; no final is lost to a full inbox;
- ``stream.started`` comes first and ``stream.ended`` last, with the
  stream's duration, segments and finals; nothing of the stream follows
  until it is opened again; the engine holds nothing of it once it ended;
- a listener sees exactly the events emitted while it was subscribed (up to
  and including the one it raised on: then it is removed);
- ``wait_idle``, ``close`` and ``drain`` return (the model never hangs
  here, so a drain with its default limit returns True); afterwards no
  stream opens and nothing is owed; with the journal, every final of every
  id is journaled once, in order, with the stream's end.

The model is a scripted stand-in (the test is about the plumbing); the
worker thread, sessions, segmenter, merger, journal and listeners are real.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as note
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.backends.base import Backend
from evoxtral_stream.engine.engine import Engine, EngineStopping, Stream, StreamSummary
from evoxtral_stream.engine.journal import Journal
from evoxtral_stream.events import (
    SAMPLE_RATE,
    CaptionEvent,
    EngineEvent,
    StreamEnded,
    StreamError,
    StreamStarted,
)
from tests.fakes import LanguageScriptedBackend, SteppingScriptedBackend, words_so_far
from tests.helpers.audio import buzz, noise

IDS = ("a", "b", "c")
# Liveness: how long any one wait of the machine may take before it counts
# as hung (the scripted model answers in milliseconds; a loaded CI machine
# is slow, not this slow).
_HUNG_S = 20.0


def _voiced(seconds: float) -> npt.NDArray[np.int16]:
    return (buzz(seconds) * 32767).astype(np.int16)


def _quiet(seconds: float) -> npt.NDArray[np.int16]:
    return (noise(seconds) * 32767).astype(np.int16)


# Made once: webrtcvad calls the buzz voiced and the noise floor unvoiced.
# 2.5 s of speech passes vad.max_segment_s = 2 (a forced split); 0.15 s is
# under vad.min_speech_ms (a click, no segment) unless cut with
# keep_candidate.
CHUNKS: dict[str, npt.NDArray[np.int16]] = {
    "speech-0.15": _voiced(0.15),
    "speech-0.4": _voiced(0.4),
    "speech-1.0": _voiced(1.0),
    "speech-2.5": _voiced(2.5),
    "silence-0.1": np.zeros(1_600, np.int16),
    "silence-0.6": np.zeros(9_600, np.int16),
    "silence-1.2": np.zeros(19_200, np.int16),
    "quiet-0.5": _quiet(0.5),
}
# Whole utterances (speech, then a pause that ends it): most pushes should
# make segments.
CHUNKS |= {f"say-{n}": np.concatenate((CHUNKS[f"speech-{n}"], CHUNKS["silence-0.6"]))
           for n in ("0.4", "1.0", "2.5")}


def _fails(audio: npt.NDArray[np.float32]) -> bool:
    """About one request in five fails (keyed on its length, so a retry in
    halves fails the same one again, as a real bad input would)."""
    return (len(audio) // 480) % 5 == 3


class DyingBackend(LanguageScriptedBackend):
    """A multilingual scripted backend whose calls numbered in ``kill_calls``
    (1-based) raise SystemExit: the model thread dies and the worker
    restarts it."""

    def __init__(self, script: Callable[[npt.NDArray[np.float32]], str], *,
                 delay_s: float, fail_when: Callable[[npt.NDArray[np.float32]], bool] | None,
                 kill_calls: Sequence[int]) -> None:
        super().__init__(script)
        self._delay = delay_s
        self._fail_when = fail_when
        self._kill_calls = set(kill_calls)
        self._calls = 0

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        self._calls += 1  # the model thread only
        if self._calls in self._kill_calls:
            raise SystemExit("scripted death")
        return super().transcribe(batch)


@dataclass
class Instance:
    """What the checker knows of one opening of a stream id."""

    handle: Stream
    pushed: int = 0
    final_segments: list[int] = field(default_factory=list)
    """Segments closed by their final caption, in the order they came."""
    failed_segments: set[int] = field(default_factory=set)
    """Segments closed by an error (``closes_segment``): no caption follows."""
    stable: dict[int, str] = field(default_factory=dict)
    """Each segment's stable text in its latest partial."""
    """Segments closed by an error (``closes_segment``): no caption follows."""
    ended: bool = False
    close_task: asyncio.Task[StreamSummary] | None = None


@dataclass(eq=False)  # listeners are removed by identity, not by what they heard
class Subscriber:
    events: list[EngineEvent] = field(default_factory=list)
    since: int = 0
    """The primary record's length when it subscribed."""
    until: int | None = None
    """... and when it unsubscribed (None: still subscribed)."""
    fail_after: int | None = None
    """Raise on the event after this many (the engine then removes it)."""

    def __call__(self, event: EngineEvent) -> None:
        self.events.append(event)
        if self.tripped:
            raise RuntimeError("a listener's bug")

    @property
    def tripped(self) -> bool:
        return self.fail_after is not None and len(self.events) > self.fail_after

    def expected(self, record: list[EngineEvent]) -> list[EngineEvent]:
        if self.tripped:
            assert self.fail_after is not None
            return record[self.since:self.since + self.fail_after + 1]
        return record[self.since:self.until]


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # One loop per example: the engine's loop, run only inside rules.
        self.runner = asyncio.Runner()
        self.journal_dir = tempfile.TemporaryDirectory(prefix="statefuzz-journal-")
        self.engine: Engine | None = None
        self.record: list[EngineEvent] = []
        self.checked = 0
        self.instances: dict[str, Instance] = {}     # the latest opening of each id
        self.last_seq: dict[str, int] = defaultdict(int)
        self.final_seqs: dict[str, list[int]] = defaultdict(list)
        self.subscribers: list[Subscriber] = []
        self.drained = False
        self.failing = False
        self.checks = 0
        self.gave_up = False

    # --- setup and teardown ---------------------------------------------------

    @initialize(
        batching=st.sampled_from(["batch", "continuous"]),
        max_queue=st.sampled_from([1, 2, 4]),
        max_batch=st.sampled_from([1, 2, 3]),
        partial_interval_ms=st.sampled_from([0, 200, 1000]),
        pause_partial=st.booleans(),
        faults=st.sampled_from(["none", "fail", "kill"]),
        restart_limit=st.sampled_from([1, 3]),
        prefix_reuse=st.sampled_from(["off", "partials", "all"]),
        draft=st.booleans(),
        delay_s=st.sampled_from([0.0, 0.005, 0.02]),
        journal=st.booleans(),
    )
    def start(self, batching: str, max_queue: int, max_batch: int,
              partial_interval_ms: int, pause_partial: bool, faults: str,
              restart_limit: int, prefix_reuse: str, draft: bool, delay_s: float,
              journal: bool) -> None:
        cfg = load_config(env={}, overrides={
            "worker.batching": batching, "worker.max_queue": max_queue,
            "worker.max_batch": max_batch, "worker.max_wait_ms": 1,
            "worker.drain_timeout_s": _HUNG_S,
            "worker.restart_backoff_s": 0.0, "worker.restart_limit": restart_limit,
            "stream.partial_interval_ms": partial_interval_ms,
            "stream.min_partial_ms": 200,
            "stream.pause_partial": pause_partial,
            "stream.prefix_reuse": prefix_reuse, "stream.draft": draft,
            "vad.max_segment_s": 2.0, "vad.split_search_s": 0.5,
            # Its own folder per example (xdist-safe), removed at teardown.
            "journal.enabled": journal, "journal.fsync": "never",
            "journal.dir": self.journal_dir.name,
        })
        self.config = cfg
        self.failing = faults != "none"
        fail_when = _fails if faults == "fail" else None
        backend: Backend
        if batching == "continuous":
            # One step per word; a failing step sends the running batch down
            # the batch path, where fail_when applies. A killed step kills
            # the model thread (twice in a row: a request dies twice).
            backend = SteppingScriptedBackend(
                words_so_far, step_delay_s=delay_s, fail_when=fail_when,
                fail_steps=(3, 11, 29) if faults == "fail" else (),
                kill_steps=(2, 3, 9) if faults == "kill" else ())
        else:
            backend = DyingBackend(words_so_far, delay_s=delay_s, fail_when=fail_when,
                                   kill_calls=(2, 3, 9) if faults == "kill" else ())
        self.engine = Engine(cfg, backend)
        self.runner.run(self.engine.start())
        self.engine.add_listener(self.record.append)

    def teardown(self) -> None:
        try:
            if self.engine is not None and self.engine.started:
                self.runner.run(asyncio.wait_for(self.engine.aclose(), _HUNG_S))
                self.drained = True
                self.check_events()
                self.check_settled()
                if self.config.journal.enabled:
                    self.check_journal()
        finally:
            self.runner.close()
            self.journal_dir.cleanup()

    # --- helpers ----------------------------------------------------------------

    @property
    def eng(self) -> Engine:
        assert self.engine is not None
        return self.engine

    def run(self, seconds: float) -> None:
        self.runner.run(asyncio.sleep(seconds))

    def live(self, stream_id: str) -> Instance | None:
        inst = self.instances.get(stream_id)
        return inst if inst is not None and not inst.ended else None

    # --- rules ------------------------------------------------------------------

    @rule(stream_id=st.sampled_from(IDS), paced=st.booleans())
    def open_stream(self, stream_id: str, paced: bool) -> None:
        if self.drained:
            try:
                self.eng.open_stream(stream_id, paced=paced)
            except EngineStopping:
                return
            raise AssertionError("a stream opened after the drain")
        if self.live(stream_id) is not None:
            try:
                self.eng.open_stream(stream_id, paced=paced)
            except ValueError:
                return
            raise AssertionError(f"{stream_id} opened twice")
        if stream_id in self.instances:
            note("reopened")
        self.instances[stream_id] = Instance(self.eng.open_stream(stream_id, paced=paced))

    def pick(self, data: st.DataObject, *, closed_too: bool = False) -> Instance:
        ids = sorted(sid for sid, inst in self.instances.items()
                     if closed_too or (not inst.ended and not inst.handle.closed))
        return self.instances[data.draw(st.sampled_from(ids))]

    def any_open(self) -> bool:
        return any(not i.ended and not i.handle.closed for i in self.instances.values())

    @precondition(any_open)
    @rule(data=st.data(), chunks=st.lists(st.sampled_from(sorted(CHUNKS)), min_size=1,
                                          max_size=6))
    def push(self, data: st.DataObject, chunks: list[str]) -> None:
        inst = self.pick(data)
        for chunk in chunks:
            inst.handle.push(CHUNKS[chunk])
            inst.pushed += len(CHUNKS[chunk])
        if self.eng._backlog:
            note("finals backlogged")

    @precondition(lambda self: bool(self.instances))
    @rule(data=st.data())
    def push_after_close(self, data: st.DataObject) -> None:
        inst = self.pick(data, closed_too=True)
        if not inst.handle.closed:
            return
        with pytest.raises(RuntimeError, match="closed"):
            inst.handle.push(CHUNKS["speech-0.4"])

    @precondition(any_open)
    @rule(data=st.data(), keep_candidate=st.booleans())
    def cut(self, data: st.DataObject, keep_candidate: bool) -> None:
        self.pick(data).handle.cut(keep_candidate=keep_candidate)

    @precondition(any_open)
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        """End of input, as an ingest connection closing: the close runs as a
        task of its own while the machine goes on."""
        inst = self.pick(data)

        async def spawn(stream: Stream) -> asyncio.Task[StreamSummary]:
            return asyncio.ensure_future(stream.close())

        inst.close_task = self.runner.run(spawn(inst.handle))

    @precondition(lambda self: any(i.close_task is not None for i in self.instances.values()))
    @rule(data=st.data())
    def await_close(self, data: st.DataObject) -> None:
        ids = sorted(sid for sid, i in self.instances.items() if i.close_task is not None)
        inst = self.instances[data.draw(st.sampled_from(ids))]
        assert inst.close_task is not None
        summary = self.runner.run(asyncio.wait_for(asyncio.shield(inst.close_task), _HUNG_S))
        self.check_events()
        assert inst.ended, "close returned before stream.ended"
        assert round(summary.duration_s * SAMPLE_RATE) == inst.pushed
        assert summary.finals == len(inst.final_segments)

    @precondition(any_open)
    @rule(data=st.data())
    def wait_idle(self, data: st.DataObject) -> None:
        self.runner.run(asyncio.wait_for(self.pick(data).handle.wait_idle(), _HUNG_S))

    @precondition(any_open)
    @rule(data=st.data(), language=st.sampled_from([None, "en", "de", "fr", "xx"]))
    def set_language(self, data: st.DataObject, language: str | None) -> None:
        """A client switching language mid-stream (continuous mode's scripted
        backend has none but ``model.language``)."""
        stream = self.pick(data).handle
        if language in (None, self.config.model.language, *self.eng.languages):
            stream.set_language(language)
        else:
            with pytest.raises(ValueError, match="unknown language"):
                stream.set_language(language)

    @rule(ms=st.sampled_from([0, 5, 30, 100]))
    def settle(self, ms: int) -> None:
        self.run(ms / 1000)

    @rule(fail_after=st.none() | st.integers(0, 5))
    def subscribe(self, fail_after: int | None) -> None:
        sub = Subscriber(since=len(self.record), fail_after=fail_after)
        self.subscribers.append(sub)
        self.eng.add_listener(sub)

    @rule(index=st.integers(0, 3))
    def unsubscribe(self, index: int) -> None:
        subscribed = [s for s in self.subscribers if s.until is None and not s.tripped]
        if not subscribed:
            return
        sub = subscribed[index % len(subscribed)]
        self.eng.remove_listener(sub)
        sub.until = len(self.record)

    # The drain ends an example's story (no stream opens after it): not
    # before the streams had some life.
    @precondition(lambda self: not self.drained and self.checks >= 10)
    @rule()
    def drain(self) -> None:
        assert self.runner.run(asyncio.wait_for(self.eng.drain(), _HUNG_S + 5)) is True
        self.drained = True
        self.check_events()
        self.check_settled()

    @precondition(lambda self: not self.drained and self.checks >= 10)
    @rule(limit_ms=st.sampled_from([1, 20]), give_up=st.booleans())
    def drain_hurried(self, limit_ms: int, give_up: bool) -> None:
        """A drain cut short (its limit, or a second Ctrl-C): every segment
        still owed is closed with what it showed, or reported lost."""
        if give_up:
            self.eng.give_up()
        drained = self.runner.run(asyncio.wait_for(self.eng.drain(limit_ms / 1000), _HUNG_S))
        note(f"hurried drain: {drained}")
        self.drained = True
        self.gave_up = not drained
        self.check_events()
        self.check_settled()

    # --- invariants -----------------------------------------------------------

    @invariant()
    def check_events(self) -> None:
        """The events since the last check, against the contracts."""
        if self.engine is None:
            return
        self.checks += 1
        new, self.checked = self.record[self.checked:], len(self.record)
        for event in new:
            self.check_event(event)
        for sub in self.subscribers:
            assert sub.events == sub.expected(self.record), "a listener missed events"
            # A listener that raised is removed (the module doc), none other.
            assert (sub in self.eng._listeners) == (sub.until is None and not sub.tripped)
        # Per-stream state goes with the stream.
        ended = {sid for sid, inst in self.instances.items() if inst.ended}
        assert not ended & set(self.eng.streams)
        assert not ended & set(self.eng._backlog_of)
        assert not [s for s, _, _ in self.eng._backlog if s.id in ended]
        if not self.gave_up:  # else the handles keep what was abandoned with them
            for sid in ended:
                handle = self.instances[sid].handle
                assert not handle.awaiting, handle.awaiting
                assert handle.session.finals_outstanding == 0

    def check_event(self, event: EngineEvent) -> None:
        if isinstance(event, StreamStarted):
            inst = self.instances.get(event.stream)
            assert inst is not None and not inst.ended, event
            assert not inst.final_segments and not inst.failed_segments
            return
        assert isinstance(event, CaptionEvent | StreamError | StreamEnded), event
        inst = self.instances.get(event.stream)
        assert inst is not None and not inst.ended, f"event after the end: {event}"
        if isinstance(event, CaptionEvent):
            # The merger numbers every event, one up; a stream id opened
            # again goes on from its last (the engine's module doc).
            assert event.seq == self.last_seq[event.stream] + 1, (event, self.last_seq)
            self.last_seq[event.stream] = event.seq
            assert event.text == event.stable + event.unstable, event
            assert 0 <= event.start <= event.end <= inst.pushed / SAMPLE_RATE, event
            assert event.latency is None or event.latency >= 0, event
            if not event.final:
                # A partial's stable text only grows within its segment.
                before = inst.stable.get(event.segment, "")
                assert event.stable.startswith(before), (before, event)
                inst.stable[event.segment] = event.stable
            assert event.segment < inst.handle.session.stats().segments, event
            assert event.segment not in inst.final_segments, f"after its final: {event}"
            assert event.segment not in inst.failed_segments, f"after its error: {event}"
            if event.continues:
                note("stitched after a forced split")
            if event.final:
                assert not event.unstable, event
                # Finals come in segment order, always (the merger's contract).
                assert not inst.final_segments or event.segment > inst.final_segments[-1], (
                    f"final of segment {event.segment} after {inst.final_segments}")
                inst.final_segments.append(event.segment)
                self.final_seqs[event.stream].append(event.seq)
        elif isinstance(event, StreamError):
            assert (event.code == "decode_failed" and self.failing) or (
                event.code == "final_lost" and self.gave_up and event.closes_segment), event
            note("decode_failed: " + event.message.split(":")[0][:30])
            if event.closes_segment:
                # It stands in for the segment's caption, and may come before
                # an earlier segment's final: order is the finals' promise.
                assert event.segment is not None
                assert event.segment not in inst.final_segments, event
                assert event.segment not in inst.failed_segments, event
                inst.failed_segments.add(event.segment)
        else:
            assert round(event.duration_s * SAMPLE_RATE) == inst.pushed, (event, inst.pushed)
            assert event.finals == len(inst.final_segments), (event, inst.final_segments)
            # Every segment asked for was closed, once.
            closed = sorted([*inst.final_segments, *inst.failed_segments])
            assert closed == list(range(event.segments)), (event, closed)
            assert inst.handle.closed
            inst.ended = True
            note(f"stream ended with {min(event.segments, 3)}+ segments")

    def check_journal(self) -> None:
        """Every final of every stream id journaled once, in order, and the
        end of each; its seqs reserved past every caption sent."""
        journal = Journal(self.config.journal)
        journal.restore()
        try:
            for sid in self.instances:
                replay = journal.replay(sid, 0)
                if not self.last_seq[sid]:  # nothing sent: no file (Journal.end)
                    assert replay is None
                    continue
                assert replay is not None
                assert [r.seq for r in replay.records] == self.final_seqs[sid]
                assert replay.ended is not None
                assert journal.last_seq(sid) >= self.last_seq[sid]
        finally:
            journal.close()

    def check_settled(self) -> None:
        """After a drain: every stream ended, nothing owed or held anywhere."""
        assert not self.eng.streams
        assert all(inst.ended for inst in self.instances.values())
        assert all(inst.close_task is None or inst.close_task.done()
                   for inst in self.instances.values())
        assert not self.eng._backlog and not self.eng._backlog_of
        if self.eng.started:  # stats need the worker, gone after aclose
            assert self.eng.stats().finals_backlog == 0


EngineMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_engine_stateful = EngineMachine.TestCase
