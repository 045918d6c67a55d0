"""The model worker: the one thread that owns the model.

Requests come in through a bounded ``queue.Queue``; results leave through the
``deliver`` callback, called on the worker thread (the engine wraps it in
``loop.call_soon_threadsafe``). The worker knows nothing of asyncio.

Scheduling, per batch:
- the newest request of a segment supersedes an older *partial* of the same
  segment that has not run yet (the old one is dropped and counted);
  a final is never superseded, and supersedes a partial of its segment
  even of a higher revision (out of order: the session never makes one);
- finals run before partials, each group oldest first (by ``ready_at``);
- at most ``max_batch`` requests per backend call; once there is work the
  worker waits up to ``max_wait_ms`` for the batch to fill.

Overflow policy of the inbox (``max_queue``): :meth:`ModelWorker.submit`
never blocks; it returns False when the inbox is full. Callers drop a refused
partial (the next cadence tick asks again) and retry a refused final until it
fits, so finals are never lost.

Continuous batching (``batching = "continuous"`` and a backend that is a
:class:`~.backends.base.SteppingBackend`): instead of one call per batch the
worker admits requests into the backend's running batch and advances it one
decode step at a time. Between steps it takes new requests from the inbox
(without waiting while anything runs) and admits as many as free places
allow (``max_batch`` running at once; finals first, then partials, each
oldest first; one adapter per running batch). A request that supersedes a
*running* partial cancels it: the stale decode stops at the next step. If
``admit`` or ``step`` raises, the running batch is aborted and its requests
go through the batch path below, so the same failure rules apply: one batch
(at most ``max_batch`` were running), those that were running in the order
they were admitted, then those the failed ``admit`` held. Other backends
always run the batch path.

Order of results: those of one backend call go to ``deliver`` once it has
returned: a batch's in the order of its requests (finals first, oldest first;
after a failed continuous batch, the order just above), an ``admit``'s or a
``step``'s in the order the backend lists them as done.

Failures: if the backend raises on a batch (an ``Exception``, CUDA out of
memory included), the batch is retried in halves down to single requests:
the first ``len // 2`` requests (so the smaller half of an odd batch) are
tried, and answered, before the rest, and a half that fails is split the same
way, so the batch's requests are still answered in its order. A request that
fails alone yields a :class:`DecodeFailure` and the worker carries on with
the next batch.

Death and restart: anything else escaping the loop (a ``BaseException`` from
the backend, a bug, a failing ``deliver``) kills the thread. Its last act is
to queue again the requests it had taken but not answered (a request that was
in flight at an earlier death too is answered with a :class:`DecodeFailure`
instead, so a request that kills the model cannot kill it forever) and to
start a replacement thread, which waits ``restart_backoff_s`` (doubling for
each restart in a row), reloads the model with ``factory`` when one was given
(else keeps the backend) and carries on. After ``restart_limit`` restarts in
a row without a batch decoded, or when reloading fails that often, the worker
is *down*: it stays alive only to answer every request with a
:class:`DecodeFailure`, so no final waits forever; :attr:`ModelWorker.ready`
is then false. So it is when no replacement thread can start (the process
at its thread limit): the dying thread stays on to answer them. Restarting
from the dying thread keeps the design's "one model thread": no watchdog
thread is needed.

Stalls: a thread stuck inside the backend (a hung GPU, a deadlock) neither
dies nor answers, and Python cannot interrupt it. The worker notes when each
backend call starts; :meth:`ModelWorker.call_age` says how long the current
one has run, and past ``stall_timeout_s`` :attr:`ModelWorker.stalled` is true
and :attr:`ModelWorker.ready` false. Loading the model again after a death
and the warm-up before serving are timed too, against a limit
``_SLOW_PHASE_FACTOR`` times longer (they legitimately take minutes, but a
reload hung on a faulted GPU must not look healthy forever). Acting on it
(error events, health checks) is the engine's job, on its event loop.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

from ..config import WorkerConfig
from ..events import DecodeFailure, DecodeRequest, Hypothesis, RequestKind
from .backends.base import (
    AdapterBackend,
    Backend,
    BackendError,
    Done,
    Job,
    JobBackend,
    SteppingBackend,
    WarmsUp,
    one_line,
)

__all__ = ["ModelWorker", "WorkerResult", "WorkerStats"]

log = logging.getLogger(__name__)

WorkerResult = Hypothesis | DecodeFailure

_T = TypeVar("_T")

_STOP = object()

# A request older than this when its batch starts means the model is behind.
_LAG_WARN_S = 1.0
_LAG_LOG_EVERY_S = 5.0
# A reload or warm-up counts as stalled after this many stall_timeout_s.
_SLOW_PHASE_FACTOR = 10
# How long a stop waits for the ended model thread's native end.
_NATIVE_END_S = 2.0
_TASKS = "/proc/self/task"


def _native_end(thread: threading.Thread, timeout: float) -> bool:
    """Wait up to ``timeout`` s until the OS thread behind the ended ``thread``
    is gone; False if it is still there (or cannot be told: not Linux).

    ``join`` returns at the thread's Python end, and its C++ thread-locals go
    after: torch's TLS stash (CUDA-graph state) takes the GIL to let go of its
    objects. A process that exits in that gap aborts ("terminate called
    without an active exception", status 134): the destructor wakes inside
    the interpreter's finalization, which ends the thread through a
    ``noexcept`` frame. Sleeping here lets it have the GIL first.
    """
    native = thread.native_id
    if native is None or not os.path.isdir(_TASKS):
        return False
    path = f"{_TASKS}/{native}"
    deadline = time.monotonic() + timeout
    while os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


@dataclass(frozen=True)
class WorkerStats:
    """Counters since start; ``busy_s`` is time spent inside the backend."""

    submitted: int
    """Requests the inbox took."""
    refused: int
    """Requests the full inbox refused, each counted once (:meth:`ModelWorker.submit`)."""
    superseded: int
    """Requests dropped unanswered for another of their segment: a waiting
    partial for a newer request, or a newcomer that meets its segment's
    final or a newer request."""
    batches: int
    """Backend calls that returned: batches decoded (the batch path, a failed
    continuous batch's retry included) and admissions to the continuous batch."""
    decoded: int
    """Requests answered with a text, each once: counted as its answer is
    given to ``deliver`` (one that raised there included: it is not
    answered again)."""
    failed: int
    """Requests answered with a :class:`DecodeFailure`."""
    busy_s: float
    pending: int
    """Requests waiting: in the inbox and in the schedule, not those in a
    backend call or the running batch (a stop queued counts as one until
    the thread takes it)."""
    restarts: int = 0
    """Deaths of the model thread: each starts a successor, or leaves the
    dying thread on as the down worker when none can start."""
    ready: bool = True
    cancelled: int = 0
    """Running partials stopped mid-decode because a newer request superseded them."""
    running: int = 0
    """Requests in the continuous batch right now."""
    steps: int = 0
    """Continuous-batching decode steps that returned (one that raised is
    not counted)."""
    tokens: int = 0
    """Tokens generated, as far as the backend reports them (prefixes not counted)."""
    draft_tokens: int = 0
    """Draft tokens the backend checked (``stream.draft``)."""
    draft_kept: int = 0
    """Of those, the ones it kept: decode steps saved."""
    max_lag_s: float = 0.0
    """Longest wait of a paced request (``DecodeRequest.paced``) between
    ready and the start of its decode."""
    call_s: float = 0.0
    """How long the backend call in progress has run (0: none runs)."""
    stalled: bool = False
    """The call in progress has run past ``stall_timeout_s``."""


class ModelWorker:
    """Runs ``backend.transcribe`` on batches of requests, on its own thread.

    ``factory``, when given, builds a fresh backend after the thread died (the
    model is reloaded); without it the same backend object is used again.
    ``sleep`` is injectable so tests need not wait for the restart backoff.
    """

    def __init__(
        self,
        backend: Backend,
        cfg: WorkerConfig,
        deliver: Callable[[WorkerResult], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        factory: Callable[[], Backend] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._backend = backend
        self._factory = factory
        self._sleep = sleep
        self._cfg = cfg
        self._deliver = deliver
        self._clock = clock
        self._lag_logged_at = float("-inf")
        # The most a paced request waited since the last lag report, and
        # whether that report was a warning (a "caught up" line is due).
        self._lag_peak_s = 0.0
        self._lag_warned = False
        self._inbox: queue.Queue[DecodeRequest | object] = queue.Queue(cfg.max_queue)
        self._pending: dict[tuple[str, int], DecodeRequest] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the counters only
        self._submitted = 0
        self._refused = 0
        self._superseded = 0
        self._batches = 0
        self._decoded = 0
        self._failed = 0
        self._busy_s = 0.0
        self._restarts = 0
        self._cancelled = 0
        self._max_lag_s = 0.0
        self._steps = 0
        self._tokens = 0
        self._draft_tokens = 0
        self._draft_kept = 0
        # Continuous batching: the requests running in the backend, by segment.
        self._running: dict[tuple[str, int], tuple[Job, DecodeRequest]] = {}
        # Worker-thread state that must survive a restart.
        self._stopping = False          # the stop marker was taken from the inbox
        self._stop_queued = False        # the stop marker was put in it (caller's thread)
        self._in_flight: list[DecodeRequest] = []  # taken, not yet answered
        # In flight at a death, until answered or superseded, or the worker
        # goes down (eq=False: by identity).
        self._died_on: set[DecodeRequest] = set()
        self._loading = False            # a restart is under way (dying or reloading)
        self._deaths_in_a_row = 0
        self._down: str | None = None   # why the worker gave up, if it did
        self._warming = False            # the backend prepares before serving
        # Start of the backend call in progress (None: none). Written by the
        # model thread only; a float store is atomic, so readers need no lock.
        self._call_since: float | None = None
        self._slow_phase = False         # the call timed is a reload or warm-up
        self._traced: set[type[BaseException]] = set()  # see _trace
        self._finished = threading.Event()
        self._spawning = threading.Lock()  # see _spawn

    # --- any thread ---------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("worker already started")
        # Not ready from this moment when a warm-up comes (the thread clears
        # it), so no probe in between sees a worker that has not begun it.
        self._warming = self._warms_up()
        self._spawn(reload=False)

    def _spawn(self, *, reload: bool) -> None:
        thread = threading.Thread(target=self._main, args=(reload,),
                                  name="model-worker", daemon=True)
        # Published once started: until then the dying thread (alive) is the
        # one ``alive`` asks, so a restart counts as alive throughout. Under
        # the lock, so a successor that dies at once cannot publish its own
        # successor before this one is published.
        with self._spawning:
            thread.start()
            self._thread = thread

    def submit(self, request: DecodeRequest, *, again: bool = False) -> bool:
        """Queue ``request`` without blocking; False if the inbox is full.

        ``again``: the request was refused before and is offered once more,
        so a refusal now is not counted again (``refused`` counts requests).
        """
        try:
            self._inbox.put_nowait(request)
        except queue.Full:
            if not again:
                with self._lock:
                    self._refused += 1
            return False
        with self._lock:
            self._submitted += 1
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Finish every request already queued, then end the thread; with a
        ``timeout``, return after about that long (each wait) even if not.

        On return every model thread has been joined, or the stop logged an
        error saying it leaves one behind: that one stays :attr:`alive` (a
        successor it starts after a death included) and a later stop waits
        for it again."""
        if self._thread is None:
            return
        if not self._stop_queued:
            try:
                # Blocking: the stop must not be lost to a full inbox (within
                # the timeout: a stuck thread never makes room).
                self._inbox.put(_STOP, timeout=timeout)
            except queue.Full:
                log.error("the model thread did not take the stop within %g s; leaving it",
                          timeout)
                return
            # Once: the thread reads its inbox no more after the first, so a
            # second would wait for room for good when a later stop finds
            # the inbox full.
            self._stop_queued = True
        # The thread may be replaced after a death: wait for the loop's end.
        self._finished.wait(timeout)
        thread: threading.Thread | None = self._thread
        while thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                # Still published: alive says a thread runs, and a successor
                # it starts is published there, for a later stop to join.
                log.error("the model thread did not end within %g s of the stop; leaving it",
                          timeout)
                return
            _native_end(thread, _NATIVE_END_S if timeout is None
                        else min(timeout, _NATIVE_END_S))
            # A successor is published once started (see _spawn): one that
            # took the stop and ended first is published as this one ends.
            successor = self._thread
            thread = None if successor is thread else successor
        self._thread = None

    @property
    def alive(self) -> bool:
        """A model thread runs (a restart in progress counts as alive, and so
        does a thread a :meth:`stop` left behind)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def ready(self) -> bool:
        """Alive, with a model, warmed up and not stalled: false while down
        (after too many restarts), restarting (from a death until the model
        is reloaded), warming up or stalled."""
        return (self.alive and self._down is None and not self._loading
                and not self._warming and not self.stalled)

    @property
    def down(self) -> str | None:
        """Why the worker gave up for good (past ``restart_limit``), or None."""
        return self._down

    def call_age(self) -> float:
        """Seconds the backend call in progress has run; 0 when none runs."""
        since = self._call_since
        return 0.0 if since is None else max(0.0, self._clock() - since)

    @property
    def stalled(self) -> bool:
        """A backend call has run ``stall_timeout_s`` or longer, or a reload or
        warm-up ``_SLOW_PHASE_FACTOR`` times that (0: never)."""
        limit = self._cfg.stall_timeout_s * (_SLOW_PHASE_FACTOR if self._slow_phase else 1)
        return limit > 0 and self.call_age() >= limit

    def _trace(self, e: Exception) -> Exception | None:
        """``e`` for its log line's traceback the first time its type fails
        here, unless it is a :class:`BackendError` (those explain themselves):
        a bug deep in a library may say nothing else (an H200 run lost
        every slot-mode final to an ``AssertionError`` with no message)."""
        if isinstance(e, BackendError) or type(e) in self._traced:
            return None
        self._traced.add(type(e))
        return e

    def _timed(self, what: Callable[[], _T], *, slow: bool = False, busy: bool = False) -> _T:
        """Run one backend call, timed for the stall check; ``slow`` for a
        reload or warm-up (``_SLOW_PHASE_FACTOR`` times the limit). ``busy``
        adds its time to ``busy_s`` (decoding work, not upkeep) as the call
        stops counting as running, under the lock :meth:`stats` reads both
        under: a call is counted in one of ``busy_s`` and ``call_s``, never
        in both or in neither."""
        self._slow_phase = slow
        since = self._call_since = self._clock()
        try:
            return what()
        finally:
            with self._lock:
                if busy:
                    self._busy_s += self._clock() - since
                self._call_since = None
            self._slow_phase = False

    def stats(self) -> WorkerStats:
        with self._lock:
            call_s = self.call_age()
            return WorkerStats(
                submitted=self._submitted, refused=self._refused,
                superseded=self._superseded, batches=self._batches,
                decoded=self._decoded, failed=self._failed, busy_s=self._busy_s,
                pending=self._inbox.qsize() + len(self._pending),
                restarts=self._restarts, ready=self.ready,
                cancelled=self._cancelled, running=len(self._running),
                steps=self._steps, tokens=self._tokens, max_lag_s=self._max_lag_s,
                call_s=call_s, stalled=self.stalled, draft_tokens=self._draft_tokens,
                draft_kept=self._draft_kept,
            )

    @property
    def mode(self) -> str:
        """"continuous" when the worker steps the backend, else "batch"."""
        stepping = (self._cfg.batching == "continuous"
                    and isinstance(self._backend, SteppingBackend))
        return "continuous" if stepping else "batch"

    # --- worker thread ------------------------------------------------------

    def _absorb(self, item: DecodeRequest | object) -> bool:
        """Move one inbox item into the pending set; False on the stop marker."""
        if item is _STOP:
            self._stopping = True
            return False
        assert isinstance(item, DecodeRequest)
        key = (item.stream, item.segment)
        running = self._running.get(key)
        if running is not None and self._loses_to(running[1], item):
            self._died_on.discard(item)  # dropped unanswered: nothing to hold it for
            return True
        old = self._pending.get(key)
        if old is not None:
            if self._loses_to(old, item):
                self._died_on.discard(item)
                return True
            self._died_on.discard(old)
            with self._lock:
                self._superseded += 1
        self._pending[key] = item
        if running is not None:
            # After the item is pending: if cancelling kills the thread, the
            # successor still has it (pending survives a restart).
            self._cancel_running(key)
        return True

    def _loses_to(self, old: DecodeRequest, item: DecodeRequest) -> bool:
        """True (and counted) when ``item`` must not replace ``old`` of its segment:
        a final is never replaced, and a stale request never wins; but a final
        replaces a partial whatever their revisions, so it is never dropped."""
        if old.kind is not RequestKind.FINAL and (item.kind is RequestKind.FINAL
                                                  or item.revision >= old.revision):
            return False
        if item.kind is RequestKind.FINAL:
            log.warning("second final for %s segment %d ignored", item.stream, item.segment)
        with self._lock:
            self._superseded += 1
        return True

    def _next_batch(self) -> list[DecodeRequest]:
        finals = [r for r in self._pending.values() if r.kind is RequestKind.FINAL]
        partials = [r for r in self._pending.values() if r.kind is RequestKind.PARTIAL]
        finals.sort(key=lambda r: r.ready_at)
        partials.sort(key=lambda r: r.ready_at)
        batch = (finals + partials)[: self._cfg.max_batch]
        for r in batch:
            del self._pending[(r.stream, r.segment)]
        self._report_lag(batch)
        return batch

    def _report_lag(self, batch: list[DecodeRequest]) -> None:
        """Log, at most every few seconds, how far behind the model thread is:
        how long the oldest *paced* request of ``batch`` waited, and the most
        any waited since the last report when that was more (a spike between
        two reports); once the lag is back under the threshold after a
        warning, one info line says so, with that peak. Requests of audio fed
        faster than it plays (a file transcribed as fast as the model allows)
        wait by design, in a queue that says nothing about keeping up with a
        live source: they are not counted."""
        paced = [r.ready_at for r in batch if r.paced]
        if not paced:
            return
        now = self._clock()
        lag = now - min(paced)
        with self._lock:
            self._max_lag_s = max(self._max_lag_s, lag)
        self._lag_peak_s = max(self._lag_peak_s, lag)
        if now - self._lag_logged_at < _LAG_LOG_EVERY_S:
            return
        peak = (f"; up to {self._lag_peak_s:.1f} s since the last report"
                if self._lag_peak_s >= lag + 0.05 else "")
        if lag >= _LAG_WARN_S:
            thinned = any(r.kind is RequestKind.PARTIAL
                          for r in (*batch, *self._pending.values()))
            log.warning("model worker is %.1f s behind: the oldest request in this batch "
                        "waited that long (%d more pending)%s%s",
                        lag, len(self._pending) + self._inbox.qsize(), peak,
                        "; partials are thinned first" if thinned else "")
            self._lag_warned = True
        elif self._lag_warned:
            log.info("model worker caught up: %.1f s behind now%s", lag, peak)
            self._lag_warned = False
        else:
            return
        self._lag_logged_at = now
        self._lag_peak_s = 0.0

    def _fill(self) -> bool:
        """Wait for work, then gather more for up to max_wait; False to stop."""
        running = True
        if not self._pending:
            running = self._absorb(self._inbox.get())
        deadline = self._clock() + self._cfg.max_wait_ms / 1000
        while running:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                remaining = deadline - self._clock()
                if len(self._pending) >= self._cfg.max_batch or remaining <= 0:
                    break
                try:
                    item = self._inbox.get(timeout=remaining)
                except queue.Empty:
                    break
            running = self._absorb(item)
        return running

    def _cancel_running(self, key: tuple[str, int]) -> None:
        job, req = self._running.pop(key)
        # Only the continuous path fills _running, so the backend steps.
        backend = cast(SteppingBackend, self._backend)
        try:
            self._timed(lambda: backend.cancel(job), busy=True)
        except Exception as e:  # out of memory copying the cache, say: as a failing step
            failed: Exception | None = e
        else:
            failed = None
        self._answered(req)
        with self._lock:
            self._cancelled += 1
        if failed is not None:
            self._continuous_failed(backend, failed, [])

    def _main(self, reload: bool) -> None:
        try:
            if reload:
                self._reload()
                if isinstance(self._backend, SteppingBackend):
                    # The same backend object may come back (no factory):
                    # rows of the dead thread's batch must not linger in it.
                    # Timed, and not ready until done: a backend call too.
                    self._timed(self._backend.abort)
                self._loading = False
            self._run()
        except BaseException as e:  # the thread's last line of defence: restart
            self._died(e)
            return
        self._finished.set()

    def _reload(self) -> None:
        """Wait the backoff, then rebuild the backend; past the limit, go down."""
        while self._down is None:
            delay = self._cfg.restart_backoff_s * 2 ** max(0, self._deaths_in_a_row - 1)
            if delay:
                self._sleep(delay)
            if self._factory is None:
                return
            try:
                self._backend = self._timed(self._factory, slow=True)
                log.info("model reloaded (backend: %s)", self._backend.name)
                return
            except Exception as e:
                self._deaths_in_a_row += 1
                log.error("reloading the model failed: %s: %s", type(e).__name__, e)
                if self._deaths_in_a_row > self._cfg.restart_limit:
                    self._go_down(f"the model could not be reloaded: {type(e).__name__}: {e}")

    def _died(self, e: BaseException) -> None:
        """On the dying thread: requeue or fail what it held, start a successor
        (or, when none can start, go down and carry on as the down worker)."""
        log.critical("model worker died: %s: %s", type(e).__name__, e, exc_info=e)
        # Not ready from the death on: this thread answers what died twice
        # (deliveries a probe may race) before the successor reloads.
        self._loading = True
        held, self._in_flight = self._in_flight, []
        self._running = {}  # the backend's running batch died with the thread
        for req in held:
            if req in self._died_on:
                # In flight at an earlier death too: it may be what kills the
                # model, so answer it with an error instead of trying again.
                self._died_on.discard(req)
                with self._lock:
                    self._failed += 1
                self._safe_deliver(self._failure(req, f"model worker died twice on it "
                                                      f"({type(e).__name__}: {e})"))
            else:
                self._died_on.add(req)
                self._absorb(req)
        self._deaths_in_a_row += 1
        if self._deaths_in_a_row > self._cfg.restart_limit:
            self._go_down(f"the model worker died {self._deaths_in_a_row} times in a row "
                          f"(last: {type(e).__name__}: {e})")
        with self._lock:
            self._restarts += 1
        self._loading = self._down is None
        try:
            self._spawn(reload=self._loading)
            return
        except RuntimeError as err:
            why = f"no model thread could start after a death: {err}"
        # No thread can start (the process at its thread limit): this one
        # stays on as a down worker's successor would, so no final waits
        # forever and the health check says why. Through _main, as the
        # successor would: a death of its own restarts (or stays on) again,
        # and its end sets _finished for stop.
        self._go_down(why)
        self._loading = False
        self._main(reload=False)

    def _go_down(self, why: str) -> None:
        log.critical("%s; answering every request with an error from now on", why)
        self._down = why
        # Down for good, nothing is decoded again, so no request can die
        # twice: what earlier deaths held (audio and all) is let go, not
        # kept for good once answered (the down path answers, not _answered).
        self._died_on.clear()

    def _safe_deliver(self, result: WorkerResult) -> None:
        try:
            self._deliver(result)
        except Exception:
            log.exception("delivering a worker result failed")

    @staticmethod
    def _failure(req: DecodeRequest, message: str) -> DecodeFailure:
        return DecodeFailure(req.stream, req.segment, req.revision, req.kind, message)

    def _warms_up(self) -> bool:
        """The backend warms up before serving (stepping backends only)."""
        return self.mode == "continuous" and isinstance(self._backend, WarmsUp)

    def _warm_up(self, backend: WarmsUp) -> None:
        """Let the backend prepare (compile) before the first request; requests
        queue meanwhile. A failure only costs the preparation: it is logged and
        serving starts as it would have without it."""
        t0 = time.monotonic()
        self._warming = True
        try:
            what = self._timed(lambda: backend.warm_up(self._cfg.max_batch), slow=True)
        except Exception as e:  # any failure here must not stop serving
            log.warning("backend warm-up failed (%s); serving without it", one_line(e),
                        exc_info=self._trace(e))
            return
        finally:
            self._warming = False
        log.info("backend warmed up in %.1f s: %s", time.monotonic() - t0, what)

    def _run(self) -> None:
        log.info("model worker started (backend: %s, %s batching)", self._backend.name,
                 self.mode)
        # The backend changes only on a reload, before this loop: decide once,
        # not per decode step (isinstance on a Protocol checks every member).
        stepping = self.mode == "continuous"
        if self._warms_up() and self._down is None:  # down, the model is not used
            self._warm_up(cast(WarmsUp, self._backend))
        while not self._stopping or self._pending or self._running:
            if self._down is None and stepping:
                self._continuous_round(cast(SteppingBackend, self._backend))
                continue
            if not self._stopping:
                self._fill()
            batch = self._next_batch()
            if not batch:
                continue
            if self._down is not None:
                for req in batch:
                    with self._lock:
                        self._failed += 1
                    self._safe_deliver(self._failure(req, f"model unavailable: {self._down}"))
                continue
            self._in_flight = list(batch)
            self._decode(batch)
        log.info("model worker stopped")

    # --- continuous batching ----------------------------------------------

    def _continuous_round(self, backend: SteppingBackend) -> None:
        """Take new work, admit what fits, run one decode step."""
        if not self._stopping:
            if self._running:
                self._drain_inbox()
            else:
                self._fill()
        admitting = self._admissible(backend)
        if admitting:
            self._report_lag(admitting)
            self._admit(backend, admitting)
        if self._running:
            self._step(backend)

    def _drain_inbox(self) -> None:
        """Absorb what is in the inbox without waiting: a batch is running."""
        while not self._stopping:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._absorb(item)

    def _admissible(self, backend: SteppingBackend) -> list[DecodeRequest]:
        """Pending requests to admit now, taken out of the pending set."""
        free = self._cfg.max_batch - len(self._running)
        if free <= 0 or not self._pending:
            return []
        order = sorted(self._pending.values(),
                       key=lambda r: (r.kind is not RequestKind.FINAL, r.ready_at))
        chosen: list[DecodeRequest] = []
        for req in order:
            if len(chosen) >= free:
                break
            if self._running:
                try:
                    ok = backend.can_admit(_job(req))
                except Exception:  # an unknown adapter: admitted alone later, failing there
                    ok = False
            else:
                # One adapter per running batch: the first request picks it.
                ok = not chosen or req.adapter == chosen[0].adapter
            if not ok:
                # Head-of-line: admit nothing behind a request that must wait
                # for another adapter, so the batch drains and switches to it.
                break
            chosen.append(req)
        for req in chosen:
            del self._pending[(req.stream, req.segment)]
        return chosen

    def _admit(self, backend: SteppingBackend, batch: list[DecodeRequest]) -> None:
        jobs = [_job(r) for r in batch]
        self._in_flight.extend(batch)
        try:
            done = self._timed(lambda: backend.admit(jobs), busy=True)
        except Exception as e:
            self._continuous_failed(backend, e, batch)
            return
        with self._lock:
            self._batches += 1
        for job, req in zip(jobs, batch, strict=True):
            self._running[(req.stream, req.segment)] = (job, req)
        self._finish(done)

    def _step(self, backend: SteppingBackend) -> None:
        try:
            done = self._timed(backend.step, busy=True)
        except Exception as e:
            self._continuous_failed(backend, e, [])
            return
        with self._lock:
            self._steps += 1
        self._finish(done)

    def _finish(self, done: list[Done]) -> None:
        if not done:
            return
        now = self._clock()
        with self._lock:
            self._tokens += sum(d.tokens for d in done)
            self._draft_tokens += sum(d.drafted for d in done)
            self._draft_kept += sum(d.kept for d in done)
        self._deaths_in_a_row = 0
        for d in done:
            req = d.job.key
            assert isinstance(req, DecodeRequest)
            key = (req.stream, req.segment)
            if key in self._running and self._running[key][0] is d.job:
                del self._running[key]
            self._answered(req)
            self._count_decoded()
            self._deliver(_hypothesis(req, d.text, now, d.token_ids))

    def _continuous_failed(self, backend: SteppingBackend, e: Exception,
                           admitting: list[DecodeRequest]) -> None:
        """Abort the running batch; its requests take the batch path's failure
        rules: those running in the order admitted, then ``admitting``."""
        if "out of memory" in str(e).lower():
            _release_cuda_cache()
        self._timed(backend.abort)  # raising kills the thread: the restart path takes over
        # A failed admit added nothing to _running, so the two lists are disjoint.
        held = [req for _, req in self._running.values()] + admitting
        self._running = {}
        log.warning("continuous batch failed (%s: %s); decoding its %d request(s) again "
                    "as plain batches", type(e).__name__, e, len(held), exc_info=self._trace(e))
        for i in range(0, len(held), self._cfg.max_batch):
            self._decode(held[i:i + self._cfg.max_batch])

    # --- batch path --------------------------------------------------------

    def _transcribe(self, batch: list[DecodeRequest]) -> list[tuple[str, tuple[int, ...]]]:
        """Text and token ids (() where the backend has none) per request."""
        if isinstance(self._backend, JobBackend):
            done = self._backend.transcribe_jobs([_job(r) for r in batch])
            with self._lock:
                self._tokens += sum(d.tokens for d in done)
            return [(d.text, d.token_ids) for d in done]
        audio = [r.audio for r in batch]
        if all(r.adapter is None for r in batch):
            return [(t, ()) for t in self._backend.transcribe(audio)]
        if not isinstance(self._backend, AdapterBackend):
            raise RuntimeError(f"backend {self._backend.name} cannot switch adapters")
        return [(t, ()) for t in self._backend.transcribe(audio, [r.adapter for r in batch])]

    def _decode(self, batch: list[DecodeRequest]) -> None:
        """One backend call for ``batch``, answered in its order; on an
        ``Exception``, ``batch[:len // 2]`` then ``batch[len // 2:]`` the
        same way, down to single requests, one that fails alone answered
        with a :class:`DecodeFailure`."""
        try:
            texts = self._timed(lambda: self._transcribe(batch), busy=True)
            if len(texts) != len(batch):
                raise RuntimeError(f"backend returned {len(texts)} texts for {len(batch)} inputs")
        except Exception as e:
            if "out of memory" in str(e).lower():
                _release_cuda_cache()
            if len(batch) > 1:
                log.warning("backend failed on a batch of %d (%s: %s); retrying in halves",
                            len(batch), type(e).__name__, e)
                half = len(batch) // 2
                self._decode(batch[:half])
                self._decode(batch[half:])
                return
            req = batch[0]
            # The type too: some failures have no message at all.
            log.error("backend failed on %s segment %d: %s: %s", req.stream, req.segment,
                      type(e).__name__, e, exc_info=self._trace(e))
            with self._lock:
                self._failed += 1
            self._answered(req)
            self._deliver(self._failure(req, f"{type(e).__name__}: {e}"))
            return
        done = self._clock()
        with self._lock:
            self._batches += 1
        self._deaths_in_a_row = 0
        for req, (text, ids) in zip(batch, texts, strict=True):
            self._answered(req)
            self._count_decoded()
            self._deliver(_hypothesis(req, text, done, ids))

    def _count_decoded(self) -> None:
        # One at a time, as each answer is given: a deliver that raises
        # kills the thread, and the rest of the batch, queued again, count
        # when the successor answers them (not twice).
        with self._lock:
            self._decoded += 1

    def _answered(self, req: DecodeRequest) -> None:
        # Out of the in-flight set before delivery: a death after this point
        # must not answer the request a second time.
        if req in self._in_flight:
            self._in_flight.remove(req)
        self._died_on.discard(req)


def _job(req: DecodeRequest) -> Job:
    return Job(key=req, audio=req.audio, adapter=req.adapter, prefix=req.prefix,
               language=req.language, draft=req.draft)


def _hypothesis(req: DecodeRequest, text: str, done_at: float,
                token_ids: tuple[int, ...] = ()) -> Hypothesis:
    return Hypothesis(
        stream=req.stream, segment=req.segment, revision=req.revision, kind=req.kind,
        text=text, start_sample=req.start_sample, end_sample=req.end_sample,
        ready_at=req.ready_at, done_at=done_at, forced_end=req.forced_end,
        token_ids=token_ids,
    )


def _release_cuda_cache() -> None:
    """After CUDA out of memory, hand cached blocks back before the retry in halves."""
    torch = sys.modules.get("torch")  # never import torch just for this
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
