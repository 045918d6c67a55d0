"""A stateful model of the model worker's scheduling, driven one backend call at a time.

Hypothesis drives the real :class:`ModelWorker` through its public API
(``submit``, ``stop``, ``stats``, ``ready``, ``down``, ``call_age``) with a
backend whose every call (a batch, an admission to the running batch, a
decode step) waits until the test answers it: done (which jobs of an
admission or a step finish is drawn), an ``Exception`` (the batch is retried
in halves) or a ``BaseException`` (the thread dies and is restarted, the
model reloaded by a factory that may fail). The test submits only while the
thread is inside such a call or idle, so what the thread does between two
calls is decided, and a reference model of the worker's module docstring
says which call comes next and what it holds. On a small inbox and batch, in
batch or continuous mode, after every step:

- ``submit`` never blocks, and returns False exactly when the inbox is full
  (``refused`` counts requests, not the retries of one with ``again``);
- every final accepted is answered exactly once (a hypothesis of its own
  request, or a ``DecodeFailure``); a partial at most once, and one goes
  unanswered only when it was dropped and counted (``superseded``, or
  ``cancelled`` mid-decode);
- the newest request of a segment supersedes an older partial not yet run; a
  final is never superseded, and supersedes a partial of its segment even of
  a higher revision (drawn at times, out of the session's order); a running
  partial that a newer request supersedes is cancelled before the next
  decode step;
- a batch holds the finals first, then the partials, each oldest first by
  ``ready_at``, at most ``max_batch``; an admission fills the free places in
  that order, one adapter per running batch;
- a batch that raises is retried in halves down to single requests (the
  first ``len // 2`` first), and a single one that fails is answered with a
  ``DecodeFailure``;
- a death queues the requests in flight again, and fails one in flight at an
  earlier death too; past ``restart_limit`` deaths (or failed reloads) in a
  row without a request decoded the worker is down: not ready, answering
  everything with a ``DecodeFailure``; the restart waits
  ``restart_backoff_s``, doubled for each restart in a row;
- on an injected clock: ``call_age`` is how long the call in progress has
  run, ``stalled`` past ``stall_timeout_s``, and ``ready`` is false then;
  ``busy_s`` is the time spent in decoding calls; the counters are the model's;
- ``stop`` finishes every request already queued, then ends the thread.

A batch call's requests come in the docstring's order (the schedule's, or
a failed continuous batch's: those running as admitted, then those the
failed admission held), and a failed batch's first half is its first
``len // 2``, tried before the rest. Where the docstring leaves a choice open
the model accepts either: the order of the requests of an admission or a
step, and of the answers; ``max_lag_s`` is held between the waits to decodes
that started and those of requests answered with an error while down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.backends.base import Backend, Done, Job
from evoxtral_stream.engine.worker import ModelWorker, WorkerResult
from evoxtral_stream.events import DecodeFailure, DecodeRequest, Hypothesis, RequestKind

PARTIAL, FINAL = RequestKind.PARTIAL, RequestKind.FINAL
KEYS = [(s, g) for s in ("a", "b") for g in (0, 1, 2)]
# Liveness: the longest any one wait may take before it counts as hung (the
# worker answers in milliseconds; a loaded 2-core machine is slow, not this slow).
_HUNG_S = 10.0
_BASE = load_config(env={}).worker

Key = tuple[str, int]


class Fatal(BaseException):
    """Not an Exception: the worker's retry does not catch it, the thread dies."""


def text_of(req: DecodeRequest) -> str:
    return f"{req.stream}/{req.segment}/r{req.revision}"


def req_of(job: Job) -> DecodeRequest:
    """The request behind ``job`` (the worker's key, returned untouched)."""
    assert isinstance(job.key, DecodeRequest)
    return job.key


def result_of(job: Job) -> Done:
    return Done(job, text_of(req_of(job)), 2)


@dataclass(frozen=True)
class Reply:
    """The test's answer to a backend call: raise ``error``, or return with
    the requests whose ``id`` is in ``done`` finished (admit and step)."""

    error: BaseException | None = None
    done: frozenset[int] = frozenset()


@dataclass
class Call:
    """One backend call, waiting on the model thread for its :class:`Reply`."""

    kind: str                    # "batch" (transcribe_jobs), "admit" or "step"
    reqs: list[DecodeRequest]    # its requests (a step: the running batch)
    reply: queue.Queue[Reply] = field(default_factory=lambda: queue.Queue(1))


class GatedBackend:
    """A job backend whose every call waits for the test's :class:`Reply`.

    ``autopilot`` set, calls return at once with everything done (teardown).
    Texts are :func:`text_of` the request; each done job reports 2 tokens.
    """

    name = "gated"

    def __init__(self) -> None:
        self.calls: queue.Queue[Call] = queue.Queue()
        self.autopilot = threading.Event()
        self.violations: list[str] = []   # appended on the model thread

    def _wait(self, kind: str, reqs: list[DecodeRequest]) -> Reply:
        if self.autopilot.is_set():
            return Reply(done=frozenset(id(r) for r in reqs))
        call = Call(kind, reqs)
        self.calls.put(call)
        try:
            reply = call.reply.get(timeout=3 * _HUNG_S)
        except queue.Empty:  # the test lost it (it failed): let the thread go on
            return Reply(done=frozenset(id(r) for r in reqs))
        if reply.error is not None:
            raise reply.error
        return reply

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        self.violations.append("transcribe called on a job backend")
        return ["" for _ in batch]

    def transcribe_jobs(self, jobs: Sequence[Job]) -> list[Done]:
        self._wait("batch", [req_of(j) for j in jobs])
        return [result_of(j) for j in jobs]


class GatedSteppingBackend(GatedBackend):
    """:class:`GatedBackend` that steps (SteppingBackend): ``admit`` and
    ``step`` wait for the test, which says which jobs finish; ``cancel`` and
    ``abort`` do not wait. Breaches of the protocol's contract by the worker
    (an adapter mixed into the running batch, a job admitted twice, more than
    ``max_batch`` running) are noted in ``violations``."""

    adapter_names = ("default", "rl")
    default_adapter = "default"

    def __init__(self, max_batch: int) -> None:
        super().__init__()
        self.max_batch = max_batch
        self.rows: dict[int, Job] = {}     # id of the request -> its running job
        self.cancelled: list[DecodeRequest] = []

    @staticmethod
    def _adapter(job: Job) -> str:
        return job.adapter or "default"

    @property
    def active(self) -> int:
        return len(self.rows)

    def can_admit(self, job: Job) -> bool:
        return not self.rows or self._adapter(job) == self._adapter(next(iter(self.rows.values())))

    def admit(self, jobs: Sequence[Job]) -> list[Done]:
        if not all(self.can_admit(j) for j in jobs) or len({self._adapter(j) for j in jobs}) > 1:
            self.violations.append("adapters mixed in one running batch")
        if any(id(j.key) in self.rows for j in jobs):
            self.violations.append("a running job admitted again")
        reply = self._wait("admit", [req_of(j) for j in jobs])
        finished = []
        for j in jobs:
            if id(j.key) in reply.done:
                finished.append(result_of(j))
            else:
                self.rows[id(j.key)] = j
        if len(self.rows) > self.max_batch:
            self.violations.append(f"{len(self.rows)} running, max_batch {self.max_batch}")
        return finished

    def step(self) -> list[Done]:
        reply = self._wait("step", [req_of(j) for j in self.rows.values()])
        finished = [result_of(j) for k, j in self.rows.items() if k in reply.done]
        for d in finished:
            del self.rows[id(d.job.key)]
        return finished

    def cancel(self, job: Job) -> bool:
        if id(job.key) not in self.rows:
            return False
        del self.rows[id(job.key)]
        self.cancelled.append(req_of(job))
        return True

    def abort(self) -> list[Job]:
        jobs = list(self.rows.values())
        self.rows.clear()
        return jobs


class Clock:
    """A clock the test moves (the worker reads it from its thread)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ids(reqs: Iterable[DecodeRequest]) -> set[int]:
    return {id(r) for r in reqs}


def schedule_order(reqs: Iterable[DecodeRequest]) -> list[DecodeRequest]:
    """Finals first, then partials, each oldest first by ``ready_at`` (all distinct)."""
    return sorted(reqs, key=lambda r: (r.kind is not FINAL, r.ready_at))


class WorkerModel:
    """What the worker's module docstring says it does, one backend call at a
    time: which call comes next and what it holds (``expect``), and what it
    answers (``answers``, in no particular order)."""

    def __init__(self, *, continuous: bool, max_batch: int, restart_limit: int,
                 backoff_s: float, reloads: bool) -> None:
        self.continuous = continuous
        self.max_batch = max_batch
        self.restart_limit = restart_limit
        self.backoff_s = backoff_s
        self.reloads = reloads
        self.clock = 100.0
        self.inbox: list[DecodeRequest | None] = []   # None: the stop marker
        self.pending: dict[Key, DecodeRequest] = {}
        self.running: dict[Key, DecodeRequest] = {}
        self.admitting: list[DecodeRequest] = []
        # Batch path: batches still to try, "exact" or "split" (retried in halves).
        self.work: list[tuple[str, list[DecodeRequest]]] = []
        self.in_flight: list[DecodeRequest] = []
        self.died_on: set[int] = set()
        self.deaths = 0
        self.restarts = 0
        self.down = False
        self.stopping = False
        self.ended = False
        self.expect: str | None = None               # the next call's kind; None: idle
        self.expect_reqs: list[DecodeRequest] = []   # admit and step: exactly these
        self.current: Call | None = None
        self.entered_at = 0.0
        self.answers: list[tuple[DecodeRequest, str]] = []
        self.superseded = 0
        self.cancelled: list[DecodeRequest] = []
        self.busy_s = 0.0
        self.steps_ok = 0
        self.batches_ok = 0        # batch calls and admissions that returned
        self.lag_decoded = 0.0     # longest wait of a paced request to the start of its decode
        self.lag_any = 0.0         # ... or to a batch answered with errors (down)
        self.sleeps: list[float] = []
        self.reloaded = 0          # models the factory gave

    # --- scheduling ------------------------------------------------------------

    def loses_to(self, old: DecodeRequest, item: DecodeRequest) -> bool:
        """A final is never superseded, and a final supersedes a partial
        whatever their revisions; else the newest (highest revision) wins."""
        return old.kind is FINAL or (item.kind is not FINAL and item.revision < old.revision)

    def absorb(self, item: DecodeRequest) -> None:
        key = (item.stream, item.segment)
        run = self.running.get(key)
        if run is not None and self.loses_to(run, item):
            self.superseded += 1
            self.died_on.discard(id(item))
            return
        old = self.pending.get(key)
        if old is not None:
            self.superseded += 1
            if self.loses_to(old, item):
                self.died_on.discard(id(item))
                return
            self.died_on.discard(id(old))
        self.pending[key] = item
        if run is not None:  # a running partial superseded: cancelled now
            del self.running[key]
            self.in_flight.remove(run)
            self.died_on.discard(id(run))
            self.cancelled.append(run)

    def answer(self, req: DecodeRequest, how: str) -> None:
        if req in self.in_flight:
            self.in_flight.remove(req)
        self.died_on.discard(id(req))
        if how == "hyp":
            self.deaths = 0   # a request decoded: the restarts in a row start again
        self.answers.append((req, how))

    def lag(self, batch: Iterable[DecodeRequest], *, decoded: bool) -> None:
        paced = [r.ready_at for r in batch if r.paced]
        if paced:
            lag = self.clock - min(paced)
            self.lag_any = max(self.lag_any, lag)
            if decoded:
                self.lag_decoded = max(self.lag_decoded, lag)

    def round(self) -> None:
        """From the top of the worker's loop to its next backend call, idle or end."""
        self.expect = None
        if not self.stopping:
            while self.inbox:
                item = self.inbox.pop(0)
                if item is None:
                    self.stopping = True
                    break
                self.absorb(item)
        if self.down:
            self.lag(self.pending.values(), decoded=False)
            for req in self.pending.values():
                self.answer(req, "fail")
            self.pending.clear()
        elif self.continuous:
            free = self.max_batch - len(self.running)
            adapter = next(iter(self.running.values())).adapter if self.running else None
            chosen: list[DecodeRequest] = []
            for req in schedule_order(self.pending.values()):
                if len(chosen) >= free:
                    break
                if self.running or chosen:
                    want = adapter if self.running else chosen[0].adapter
                    if req.adapter != want:
                        break  # the batch drains before another adapter starts
                chosen.append(req)
            if chosen:
                for req in chosen:
                    del self.pending[(req.stream, req.segment)]
                self.lag(chosen, decoded=True)
                self.in_flight.extend(chosen)
                self.admitting = chosen
                self.expect, self.expect_reqs = "admit", chosen
                return
            if self.running:
                self.expect, self.expect_reqs = "step", list(self.running.values())
                return
            assert not self.pending, "the model admits something whenever it is idle"
        elif self.pending:
            batch = schedule_order(self.pending.values())[: self.max_batch]
            for req in batch:
                del self.pending[(req.stream, req.segment)]
            self.lag(batch, decoded=True)
            self.in_flight = list(batch)
            self.work = [("exact", batch)]
            self.expect = "batch"
            return
        self.ended = self.stopping

    def after_batch_path(self) -> None:
        if self.work:
            self.expect = "batch"
        else:
            self.round()

    def enter(self, call: Call) -> None:
        """The thread entered ``call``: it must be the one the model expects."""
        assert self.expect is not None, f"a {call.kind} call while idle: {call.reqs}"
        assert call.kind == self.expect, (call.kind, self.expect)
        got = ids(call.reqs)
        assert len(got) == len(call.reqs) <= self.max_batch, call.reqs
        if call.kind == "batch":
            # In order: a batch's requests as scheduled, a split's first half
            # the first len // 2 of the failed batch, then the rest.
            order = [id(r) for r in call.reqs]
            for i, (how, reqs) in enumerate(self.work):
                want = [id(r) for r in reqs]
                if how == "exact" and order == want:
                    del self.work[i]
                    break
                if how == "split" and order == want[: len(want) // 2]:
                    self.work[i] = ("exact", reqs[len(want) // 2:])
                    break
            else:
                raise AssertionError(f"batch {[text_of(r) for r in call.reqs]} is none of "
                                     f"{[(h, [text_of(r) for r in b]) for h, b in self.work]}")
        else:
            assert got == ids(self.expect_reqs), (
                call.kind, [text_of(r) for r in call.reqs],
                [text_of(r) for r in self.expect_reqs])
        self.expect = None
        self.current = call
        self.entered_at = self.clock

    def release(self, outcome: str, done: set[int], reload_failures: int) -> None:
        """The current call returns (``ok``, ``done`` finished) or raises
        (``fail``: an Exception; ``die``: a BaseException)."""
        call = self.current
        assert call is not None
        self.current = None
        self.busy_s += self.clock - self.entered_at
        if outcome == "ok" and call.kind in ("batch", "admit"):
            self.batches_ok += 1
        if outcome == "die":
            self.death(reload_failures)
            self.round()
            return
        if call.kind == "batch":
            if outcome == "ok":
                for req in call.reqs:
                    self.answer(req, "hyp")
            elif len(call.reqs) > 1:
                self.work.insert(0, ("split", call.reqs))
            else:
                self.answer(call.reqs[0], "fail")
            self.after_batch_path()
            return
        if outcome == "fail":  # the running batch goes down the batch path
            held = list(self.running.values()) + (self.admitting if call.kind == "admit" else [])
            self.running = {}
            self.admitting = []
            self.work = [("exact", held[i:i + self.max_batch])
                         for i in range(0, len(held), self.max_batch)]
            self.after_batch_path()
            return
        if call.kind == "admit":
            for req in self.admitting:
                if id(req) not in done:
                    self.running[(req.stream, req.segment)] = req
            finished = [r for r in self.admitting if id(r) in done]
            self.admitting = []
        else:
            self.steps_ok += 1
            finished = [r for r in self.running.values() if id(r) in done]
            for req in finished:
                del self.running[(req.stream, req.segment)]
        for req in finished:
            self.answer(req, "hyp")
        if call.kind == "admit" and self.running:
            self.expect, self.expect_reqs = "step", list(self.running.values())
        else:
            self.round()

    def death(self, reload_failures: int) -> None:
        held, self.in_flight = self.in_flight, []
        self.running = {}
        self.admitting = []
        self.work = []
        for req in held:
            if id(req) in self.died_on:   # in flight at an earlier death too
                self.answer(req, "fail")
            else:
                self.died_on.add(id(req))
                self.absorb(req)
        self.deaths += 1
        self.restarts += 1
        self.down = self.deaths > self.restart_limit
        while not self.down:  # the successor's reload
            delay = self.backoff_s * 2 ** max(0, self.deaths - 1)
            if delay:
                self.sleeps.append(delay)
            if not self.reloads:
                break
            if not reload_failures:
                self.reloaded += 1
                break
            reload_failures -= 1
            self.deaths += 1
            self.down = self.deaths > self.restart_limit


@dataclass
class SegState:
    revision: int = 0
    final: bool = False
    refused_final: DecodeRequest | None = None   # refused, to offer again


class WorkerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.worker: ModelWorker | None = None
        self.results: list[WorkerResult] = []
        self.results_lock = threading.Lock()
        self.segs: dict[Key, SegState] = {k: SegState() for k in KEYS}
        self.by_triple: dict[tuple[str, int, int], DecodeRequest] = {}
        self.accepted: list[DecodeRequest] = []
        self.refused = 0
        self.stopped = False
        self.stop_thread: threading.Thread | None = None
        self.made = 0
        self.steps = 0
        self.taken: list[Call] = []

    # --- setup and teardown ------------------------------------------------------

    @initialize(
        # (worker.batching, a stepping backend): continuous only with both.
        variant=st.sampled_from([("continuous", True), ("batch", False), ("continuous", True),
                                 ("batch", True), ("continuous", False)]),
        max_queue=st.sampled_from([1, 2, 3]),
        max_batch=st.sampled_from([1, 2, 3]),
        max_wait_ms=st.sampled_from([0, 0, 2]),
        restart_limit=st.sampled_from([0, 1, 2]),
        backoff_s=st.sampled_from([0.0, 0.25]),
        stall_timeout_s=st.sampled_from([0.0, 1.0]),
        reloads=st.booleans(),
        adapters=st.booleans(),
    )
    def start(self, variant: tuple[str, bool], max_queue: int, max_batch: int,
              max_wait_ms: int, restart_limit: int, backoff_s: float, stall_timeout_s: float,
              reloads: bool, adapters: bool) -> None:
        batching, stepping = variant
        cfg = dataclasses.replace(
            _BASE, batching=batching, max_queue=max_queue, max_batch=max_batch,
            max_wait_ms=max_wait_ms, restart_limit=restart_limit,
            restart_backoff_s=backoff_s, stall_timeout_s=stall_timeout_s)
        self.max_queue = max_queue
        self.stall_timeout_s = stall_timeout_s
        self.adapters = adapters
        self.backend = GatedSteppingBackend(max_batch) if stepping else GatedBackend()
        self.fail_reloads = 0
        self.reloaded = 0
        self.sleeps: list[float] = []
        self.clock = Clock()
        continuous = batching == "continuous" and stepping
        self.model = WorkerModel(continuous=continuous, max_batch=max_batch,
                                 restart_limit=restart_limit, backoff_s=backoff_s,
                                 reloads=reloads)
        factory = self.reload if reloads else None
        self.worker = ModelWorker(self.backend, cfg, self.deliver, clock=self.clock,
                                  factory=factory, sleep=self.sleeps.append)
        assert self.worker.mode == ("continuous" if continuous else "batch")
        note(f"mode={self.worker.mode}")
        self.worker.start()
        self.wait_for(lambda: self.w.ready, "the worker ready after start")

    def teardown(self) -> None:
        """Stop the worker whatever state a failed step left: every call
        answered at once from here on, so no model thread outlives the example."""
        w = self.worker
        if w is None:
            return
        try:
            # After a failed step the stop's checks would fail again on the
            # same fault (reported as another, distinct failure): then only
            # clean up.
            if not self.stopped and sys.exc_info()[0] is None:
                self.stop_worker(lambda call: ("ok", ids(call.reqs), 0))
        finally:
            thread = self.clean_up(w)
        assert not thread.is_alive() and not w.alive, "the model thread outlived the example"

    def clean_up(self, w: ModelWorker) -> threading.Thread:
        """Stop ``w`` with every call answered at once; the stop's thread."""
        self.backend.autopilot.set()
        thread = self.stop_thread
        if thread is None:
            thread = threading.Thread(target=w.stop, args=(_HUNG_S,), daemon=True)
            thread.start()
        everything = Reply(done=frozenset(id(r) for r in self.by_triple.values()))
        for call in self.taken:
            if call.reply.empty():
                call.reply.put(everything)
        deadline = time.monotonic() + 3 * _HUNG_S
        while thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                self.backend.calls.get(timeout=0.01).reply.put(everything)
        thread.join(1)
        return thread

    # --- plumbing ------------------------------------------------------------------

    @property
    def w(self) -> ModelWorker:
        assert self.worker is not None
        return self.worker

    def deliver(self, result: WorkerResult) -> None:
        with self.results_lock:
            self.results.append(result)

    def reload(self) -> Backend:
        """The worker's factory (on its thread): fails ``fail_reloads`` times."""
        if self.fail_reloads:
            self.fail_reloads -= 1
            raise OSError("weights missing")
        self.reloaded += 1
        return self.backend

    def wait_for(self, what: Callable[[], bool], why: str) -> None:
        deadline = time.monotonic() + _HUNG_S
        while not what():
            assert time.monotonic() < deadline, f"timed out waiting for {why}"
            time.sleep(0.001)

    def settle(self) -> None:
        """Wait for what the model says comes next: its call, or idle with
        every answer given (after a death: the successor reloaded, or down)."""
        m = self.model
        if m.expect is not None:
            try:
                call = self.backend.calls.get(timeout=_HUNG_S)
            except queue.Empty:
                raise AssertionError(f"no {m.expect} call came") from None
            self.taken.append(call)  # answered at teardown if a check fails first
            m.enter(call)
        else:
            self.wait_for(lambda: len(self.results) >= len(m.answers)
                          or not self.backend.calls.empty(), "the answers owed")
            assert self.backend.calls.empty(), \
                f"a call while idle: {list(self.backend.calls.queue)}"
            if m.ended:
                return
            if m.down:
                self.wait_for(lambda: self.w.down is not None, "the worker down")
            else:
                self.wait_for(lambda: self.w.ready, "the worker ready")
        self.check_answers()

    def draw_request(self, data: st.DataObject) -> DecodeRequest | None:
        key = data.draw(st.sampled_from(KEYS), label="segment")
        seg = self.segs[key]
        if seg.refused_final is not None:
            return None  # the engine offers its refused final again first
        kind = PARTIAL if seg.final else data.draw(st.sampled_from(RequestKind), label="kind")
        seg.revision += 1
        revision = seg.revision
        if kind is FINAL and revision > 1 and data.draw(st.booleans(), label="behind"):
            # Out of the session's order: a final below the partials before
            # it (0 is no partial's), which must replace them all the same.
            revision = 0
        seg.final = seg.final or kind is FINAL
        self.made += 1
        # Distinct ready_at, not in submission order, at or before now.
        ready_at = self.clock.now - data.draw(st.integers(0, 3), label="age") * 0.1 \
            - self.made * 1e-6
        adapter = data.draw(st.sampled_from([None, "rl"]), label="adapter") \
            if self.adapters else None
        req = DecodeRequest(
            stream=key[0], segment=key[1], revision=revision, kind=kind,
            audio=np.zeros(16, np.float32), start_sample=self.made, end_sample=self.made + 16,
            ready_at=ready_at, adapter=adapter,
            paced=data.draw(st.booleans(), label="paced"))
        self.by_triple[(req.stream, req.segment, req.revision)] = req
        return req

    def offer(self, req: DecodeRequest, *, again: bool) -> None:
        m = self.model
        idle = m.current is None
        full = len(m.inbox) >= self.max_queue
        t0 = time.monotonic()
        ok = self.w.submit(req, again=again)
        assert time.monotonic() - t0 < _HUNG_S / 2, "submit blocked"
        assert ok == (not full), (ok, len(m.inbox), self.max_queue)
        seg = self.segs[(req.stream, req.segment)]
        if not ok:
            self.refused += not again
            if req.kind is FINAL:
                seg.refused_final = req
            note("refused")
            return
        seg.refused_final = None
        self.accepted.append(req)
        m.inbox.append(req)
        if idle:  # the idle thread takes it at once
            m.round()
            self.settle()

    # --- rules -----------------------------------------------------------------------

    @precondition(lambda self: not self.stopped)
    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(1, 3), label="requests")):
            req = self.draw_request(data)
            if req is not None:
                self.offer(req, again=False)

    @precondition(lambda self: not self.stopped and any(
        s.refused_final is not None for s in self.segs.values()))
    @rule(data=st.data())
    def offer_refused_final_again(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from([s.refused_final for s in self.segs.values()
                                         if s.refused_final is not None]))
        assert req is not None
        self.offer(req, again=True)

    @precondition(lambda self: not self.stopped and self.model.current is not None)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(1, 3), label="calls")):
            if self.model.current is None:
                break
            self.answer_call(lambda call: self.draw_reply(data, call))

    def draw_reply(self, data: st.DataObject, call: Call) -> tuple[str, set[int], int]:
        """An outcome for ``call``: done (and which requests finish), an
        Exception or a BaseException (and how many reloads fail after it)."""
        outcome = data.draw(st.sampled_from(["ok", "ok", "ok", "ok", "fail", "die"]),
                            label="outcome")
        done: set[int] = set()
        if outcome == "ok" and call.kind in ("admit", "step"):
            flags = data.draw(st.lists(st.booleans(), min_size=len(call.reqs),
                                       max_size=len(call.reqs)), label="done")
            done = {id(r) for r, f in zip(call.reqs, flags, strict=True) if f}
        failures = data.draw(st.integers(0, 2), label="reload failures") \
            if outcome == "die" and self.model.reloads else 0
        return outcome, done, failures

    def answer_call(self, reply: Callable[[Call], tuple[str, set[int], int]]) -> None:
        """Answer the call the thread is in as ``reply`` says; on to what comes next."""
        m = self.model
        call = m.current
        assert call is not None
        outcome, done, failures = reply(call)
        note(f"{call.kind} {outcome}")
        m.release(outcome, done, failures)
        self.fail_reloads = failures
        error: BaseException | None = {"ok": None, "fail": RuntimeError("scripted failure"),
                                       "die": Fatal("scripted death")}[outcome]
        call.reply.put(Reply(error, frozenset(done)))
        self.settle()

    @rule(dt=st.sampled_from([0.4, 1.5]))
    def tick_clock(self, dt: float) -> None:
        if self.stopped:
            assert self.backend.calls.empty(), "a backend call after the stop"
            return
        # Only while the thread waits (in a call or for work): it reads the clock.
        self.clock.now += dt
        self.model.clock = self.clock.now

    @precondition(lambda self: not self.stopped and self.steps >= 20)
    @rule(data=st.data())
    def stop(self, data: st.DataObject) -> None:
        self.stop_worker(lambda call: self.draw_reply(data, call))

    def stop_worker(self, reply: Callable[[Call], tuple[str, set[int], int]]) -> None:
        """Stop finishes every request already queued, then ends the thread
        (the calls it makes meanwhile answered as ``reply`` says)."""
        m = self.model
        self.stop_thread = threading.Thread(target=self.w.stop, args=(_HUNG_S,), daemon=True)
        self.stop_thread.start()
        m.inbox.append(None)
        if m.current is None:
            m.round()
            self.settle()
        while m.current is not None:
            self.answer_call(reply)
        assert m.ended
        self.stop_thread.join(2 * _HUNG_S)
        assert not self.stop_thread.is_alive(), "stop did not return"
        assert not self.w.alive
        self.stopped = True
        self.check_answers()
        answered = Counter(self.triple(r) for r in self.results)
        for req in self.accepted:
            if req.kind is FINAL:
                assert answered[self.triple(req)] == 1, f"final {text_of(req)} not answered"
        dropped = m.superseded + len(m.cancelled)
        assert len(self.accepted) == len(self.results) + dropped

    # --- checks ------------------------------------------------------------------------

    @staticmethod
    def triple(r: WorkerResult | DecodeRequest) -> tuple[str, int, int]:
        return (r.stream, r.segment, r.revision)

    def check_answers(self) -> None:
        with self.results_lock:
            results = list(self.results)
        got = Counter((self.triple(r), "hyp" if isinstance(r, Hypothesis) else "fail")
                      for r in results)
        want = Counter((self.triple(req), how) for req, how in self.model.answers)
        assert got == want, (f"answered but not owed: {got - want}; "
                             f"owed but not answered: {want - got}")
        for r in results:
            req = self.by_triple[self.triple(r)]
            assert r.kind is req.kind
            if isinstance(r, Hypothesis):
                assert (r.text, r.start_sample, r.end_sample, r.ready_at) == (
                    text_of(req), req.start_sample, req.end_sample, req.ready_at)
            else:
                assert isinstance(r, DecodeFailure) and r.message

    @invariant()
    def counters_and_health(self) -> None:
        self.steps += 1  # the stop waits for 20 of them: a run has something to stop
        if self.worker is None or self.stopped:
            return
        m = self.model
        w = self.w
        assert not self.backend.violations, self.backend.violations
        self.check_answers()
        if m.current is None:
            assert self.backend.calls.empty(), "a backend call the model did not expect"
            # A successor's abort after a reload (not waited for) may still be timed.
            self.wait_for(lambda: w.call_age() == 0, "no call in progress")
        st_ = w.stats()
        hyps = sum(how == "hyp" for _, how in m.answers)
        fails = len(m.answers) - hyps
        assert (st_.submitted, st_.refused) == (len(self.accepted), self.refused)
        assert (st_.decoded, st_.failed, st_.tokens) == (hyps, fails, 2 * hyps)
        assert st_.superseded == m.superseded
        assert st_.cancelled == len(m.cancelled)
        if isinstance(self.backend, GatedSteppingBackend):
            assert [text_of(r) for r in self.backend.cancelled] == [
                text_of(r) for r in m.cancelled]
        assert st_.restarts == m.restarts
        assert st_.pending == len(m.inbox) + len(m.pending)
        assert st_.running == len(m.running)
        assert (st_.batches, st_.steps) == (m.batches_ok, m.steps_ok)
        assert self.sleeps == m.sleeps
        assert self.reloaded == m.reloaded
        assert st_.busy_s == pytest.approx(m.busy_s)
        assert m.lag_decoded - 1e-9 <= st_.max_lag_s <= m.lag_any + 1e-9
        # Health, on the injected clock.
        age = self.clock.now - m.entered_at if m.current is not None else 0.0
        assert w.call_age() == pytest.approx(age)
        assert st_.call_s == pytest.approx(age)
        stalled = self.stall_timeout_s > 0 and age >= self.stall_timeout_s
        assert w.stalled == stalled == st_.stalled
        assert (w.down is not None) == m.down
        assert w.alive
        assert w.ready == (not m.down and not stalled) == st_.ready


WorkerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_worker_stateful = WorkerMachine.TestCase
