"""The model worker: the one thread that owns the model.

Requests come in through a bounded ``queue.Queue``; results leave through the
``deliver`` callback, called on the worker thread (the engine wraps it in
``loop.call_soon_threadsafe``). The worker knows nothing of asyncio.

Scheduling, per batch:
- the newest request of a segment supersedes an older *partial* of the same
  segment that has not run yet (the old one is dropped and counted);
  a final is never superseded;
- finals run before partials, each group oldest first (by ``ready_at``);
- at most ``max_batch`` requests per backend call; once there is work the
  worker waits up to ``max_wait_ms`` for the batch to fill.

Overflow policy of the inbox (``max_queue``): :meth:`ModelWorker.submit`
never blocks; it returns False when the inbox is full. Callers drop a refused
partial (the next cadence tick asks again) and retry a refused final until it
fits, so finals are never lost.

Failures: if the backend raises on a batch, the batch is retried in halves
down to single requests; a request that fails alone yields a
:class:`DecodeFailure` and the worker carries on with the next batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config import WorkerConfig
from ..events import DecodeFailure, DecodeRequest, Hypothesis, RequestKind
from .backends.base import AdapterBackend, Backend

__all__ = ["ModelWorker", "WorkerResult", "WorkerStats"]

log = logging.getLogger(__name__)

WorkerResult = Hypothesis | DecodeFailure

_STOP = object()


@dataclass(frozen=True)
class WorkerStats:
    """Counters since start; ``busy_s`` is time spent inside the backend."""

    submitted: int
    refused: int
    superseded: int
    batches: int
    decoded: int
    failed: int
    busy_s: float
    pending: int


class ModelWorker:
    """Runs ``backend.transcribe`` on batches of requests, on its own thread."""

    def __init__(
        self,
        backend: Backend,
        cfg: WorkerConfig,
        deliver: Callable[[WorkerResult], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self._cfg = cfg
        self._deliver = deliver
        self._clock = clock
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

    # --- any thread ---------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("worker already started")
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self._thread.start()

    def submit(self, request: DecodeRequest) -> bool:
        """Queue ``request`` without blocking; False if the inbox is full."""
        try:
            self._inbox.put_nowait(request)
        except queue.Full:
            with self._lock:
                self._refused += 1
            return False
        with self._lock:
            self._submitted += 1
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Finish every request already queued, then end the thread."""
        if self._thread is None:
            return
        self._inbox.put(_STOP)  # blocking: the stop must not be lost to a full inbox
        self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> WorkerStats:
        with self._lock:
            return WorkerStats(
                submitted=self._submitted, refused=self._refused,
                superseded=self._superseded, batches=self._batches,
                decoded=self._decoded, failed=self._failed, busy_s=self._busy_s,
                pending=self._inbox.qsize() + len(self._pending),
            )

    # --- worker thread ------------------------------------------------------

    def _absorb(self, item: DecodeRequest | object) -> bool:
        """Move one inbox item into the pending set; False on the stop marker."""
        if item is _STOP:
            return False
        assert isinstance(item, DecodeRequest)
        key = (item.stream, item.segment)
        old = self._pending.get(key)
        if old is not None:
            if old.kind is RequestKind.FINAL or item.revision < old.revision:
                # A final is never replaced, and a stale request never wins.
                if item.kind is RequestKind.FINAL:
                    log.warning("second final for %s segment %d ignored", *key)
                with self._lock:
                    self._superseded += 1
                return True
            with self._lock:
                self._superseded += 1
        self._pending[key] = item
        return True

    def _next_batch(self) -> list[DecodeRequest]:
        finals = [r for r in self._pending.values() if r.kind is RequestKind.FINAL]
        partials = [r for r in self._pending.values() if r.kind is RequestKind.PARTIAL]
        finals.sort(key=lambda r: r.ready_at)
        partials.sort(key=lambda r: r.ready_at)
        batch = (finals + partials)[: self._cfg.max_batch]
        for r in batch:
            del self._pending[(r.stream, r.segment)]
        return batch

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

    def _run(self) -> None:
        log.info("model worker started (backend: %s)", self._backend.name)
        running = True
        while running or self._pending:
            if running:
                running = self._fill()
            batch = self._next_batch()
            if batch:
                self._decode(batch)
        log.info("model worker stopped")

    def _transcribe(self, batch: list[DecodeRequest]) -> list[str]:
        audio = [r.audio for r in batch]
        if all(r.adapter is None for r in batch):
            return self._backend.transcribe(audio)
        if not isinstance(self._backend, AdapterBackend):
            raise RuntimeError(f"backend {self._backend.name} cannot switch adapters")
        return self._backend.transcribe(audio, [r.adapter for r in batch])

    def _decode(self, batch: list[DecodeRequest]) -> None:
        start = self._clock()
        try:
            texts = self._transcribe(batch)
            if len(texts) != len(batch):
                raise RuntimeError(f"backend returned {len(texts)} texts for {len(batch)} inputs")
        except Exception as e:
            with self._lock:
                self._busy_s += self._clock() - start
            if len(batch) > 1:
                log.warning("backend failed on a batch of %d (%s); retrying in halves",
                            len(batch), e)
                half = len(batch) // 2
                self._decode(batch[:half])
                self._decode(batch[half:])
                return
            req = batch[0]
            log.error("backend failed on %s segment %d: %s", req.stream, req.segment, e)
            with self._lock:
                self._failed += 1
            self._deliver(DecodeFailure(req.stream, req.segment, req.revision, req.kind,
                                        f"{type(e).__name__}: {e}"))
            return
        done = self._clock()
        with self._lock:
            self._busy_s += done - start
            self._batches += 1
            self._decoded += len(batch)
        for req, text in zip(batch, texts, strict=True):
            self._deliver(Hypothesis(
                stream=req.stream, segment=req.segment, revision=req.revision,
                kind=req.kind, text=text, start_sample=req.start_sample,
                end_sample=req.end_sample, ready_at=req.ready_at, done_at=done,
                forced_end=req.forced_end,
            ))
