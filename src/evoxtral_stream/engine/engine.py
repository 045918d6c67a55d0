"""The engine: streams, the model worker and the mergers, on one event loop.

Everything here runs on the asyncio loop except the model worker's thread.
Audio enters through :meth:`Stream.push` (from a microphone drain, a file
reader or a network handler), decode results come back through
``loop.call_soon_threadsafe``, and every :class:`EngineEvent` is handed to the
registered listeners synchronously, in order. Listeners must not block; the
broadcaster gives each network subscriber its own bounded queue.

Durable finals: with ``journal.enabled`` the engine appends every final
caption to the :class:`~.journal.Journal` *before* calling any listener (the
journal is not a listener, so no listener order can break this), and a
stream's ``stream.ended`` likewise (:meth:`~.journal.Journal.end`), so a
resume after a restart ends a stream that had ended. Before any
caption (partial or final) whose ``seq`` is past the stream's reserved mark
is sent, the journal records a reservation a block of seqs beyond it
(:meth:`~.journal.Journal.reserve`), since partials are not journaled and
the last seq sent is usually a partial's. On start the engine reads each
journaled stream's last ``seq`` (its highest final or reservation); a stream
id opened again continues from there (the merger numbers from 1 and the
engine adds the offset), so ``seq`` stays strictly increasing per stream
across restarts, a crash included (after a restart it may skip up to
:data:`~.journal.SEQ_RESERVE_BLOCK`). Within one
run the engine also remembers the last ``seq`` of the :data:`SEQ_REMEMBERED`
streams that ended most recently, journal or not: a stream id used again (a
client reconnecting under its id) goes on numbering, so subscribers that
drop what they have seen drop nothing new. Without the journal a restart
starts every stream at 1 again, under a new :attr:`Engine.epoch` (the
numbering's id, which subscribers echo when they resume), so a seq of the
earlier run is never taken for one of this run.

Fault recovery: the worker restarts itself when its thread dies (see
:mod:`.worker`); ``backend_factory`` lets it reload the model then. A model
thread stuck in a backend call past ``worker.stall_timeout_s`` cannot be
restarted from inside; the engine checks for it on a timer, and on the
transition sends every open stream a ``model_stalled`` :class:`StreamError`
and reports itself unhealthy (:attr:`Engine.healthy`) until the call returns.

Shutdown is bounded: :meth:`Engine.drain` (called by :meth:`Engine.aclose`)
ends every stream and waits for the finals still owed for at most
``worker.drain_timeout_s``, or until :meth:`Engine.give_up`. Past that,
every segment still owed a final is closed with the last partial it showed
(journaled and broadcast like any final), a segment that showed nothing is
reported lost (a ``final_lost`` :class:`StreamError`, and the log), and the
model thread is left behind rather than waited for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Config, ConfigError
from ..events import (
    SAMPLE_RATE,
    CaptionEvent,
    DecodeFailure,
    DecodeRequest,
    EngineEvent,
    Hypothesis,
    Int16Array,
    RequestKind,
    StreamEnded,
    StreamError,
    StreamStarted,
    stream_id_problem,
)
from ..server.protocol import new_epoch
from ..text.chars import shown
from ..text.merger import Merger
from .backends.base import AdapterBackend, Backend, Multilingual
from .journal import Journal
from .session import StreamSession
from .worker import ModelWorker, WorkerResult, WorkerStats

__all__ = ["SEQ_REMEMBERED", "Engine", "EngineStats", "EngineStopping", "Listener", "Stream",
           "StreamSummary"]

log = logging.getLogger(__name__)

SEQ_REMEMBERED = 16_384
"""How many ended streams' last seqs the engine keeps (about 180 bytes each)."""

Listener = Callable[[EngineEvent], None]

# How often a final the worker refused (inbox full) is offered again.
_FINAL_RETRY_S = 0.01
# At most one "inbox full" warning this often: under overload every final
# may wait, and a line for each would flood the log.
_BACKLOG_LOG_EVERY_S = 5.0
_PRUNE_EVERY_MAX_S = 3600.0
# After a drain that gave up (or with a stalled model), how long the model
# thread gets to take the stop before it is left behind.
_STOP_GRACE_S = 1.0
# How often a drain or a stop checks for giving up.
_DRAIN_POLL_S = 0.05
# How often the engine looks for a stalled model thread (at most; more often
# for a short stall_timeout_s).
_WATCH_EVERY_MAX_S = 1.0
# No timer of the engine's runs more often than this, however small a limit.
_TIMER_MIN_S = 0.05
# Latest partials kept per stream (drafts, pause partials): one per open
# segment is all that is used; a forced split can leave two open.
_PARTIALS_KEPT = 4


class EngineStopping(RuntimeError):
    """:meth:`Engine.open_stream` once the engine has begun to shut down."""


@dataclass(frozen=True)
class StreamSummary:
    stream: str
    duration_s: float
    segments: int
    finals: int
    partials: int
    errors: int


@dataclass(frozen=True)
class EngineStats:
    """``audio_s``: seconds of audio received by all streams since start;
    ``journal_*``: finals journaled, writes that failed (finals, seq
    reservations or stream ends, and per file the interval fsyncs of
    ``fsync = "interval"``: disk errors), and streams pruned after
    retention."""

    worker: WorkerStats
    streams: int
    finals_backlog: int
    partials_refused: int
    audio_s: float = 0.0
    journal_appends: int = 0
    journal_failures: int = 0
    journal_pruned: int = 0
    """Streams whose journal files were deleted after ``journal.retention_s``."""
    journal_open_files: int = 0
    """Journal files held open: at most one per live stream."""
    stalls: int = 0
    """Times the model thread was seen stuck past ``worker.stall_timeout_s``."""


class Stream:
    """Handle of one live stream. Use it on the engine's event loop only."""

    def __init__(self, engine: Engine, stream_id: str, source: str,
                 adapter: str | None = None, language: str | None = None,
                 paced: bool = True) -> None:
        self.id = stream_id
        self.source = source
        self.paced = paced
        """Audio comes at the pace it plays (see :meth:`Engine.open_stream`).
        May change while the stream is open (on the loop, as every use of
        the stream): the requests made after it carry the new value."""
        self._engine = engine
        self.session = StreamSession(stream_id, engine.config.vad, engine.config.stream,
                                     adapter, language)
        # Finals come back out of segment order (continuous batching ends
        # short segments first; a final may wait for its pause partial) and
        # every one is answered or abandoned (worker, drain): the merger
        # holds them all, abandoning none itself.
        self.merger = Merger(
            stream_id, final_replaces_stable=engine.config.stream.final_replaces_stable,
            max_pending=None)
        # The merger numbers from 1; a stream id journaled before continues
        # after its last seq (see the module doc).
        self.seq_base = engine.last_seq(stream_id)
        self.last_seq = self.seq_base
        """The seq of the stream's latest caption event (its base before any)."""
        self._idle = asyncio.Event()
        self._idle.set()
        self._done = asyncio.Event()
        self._finished = False
        self.finals = 0
        self.partials = 0
        self.errors = 0
        self.reserve_failing = False
        """The journal refused this stream's last seq reservation (reported once)."""
        self.latest: dict[int, Hypothesis] = {}
        """Each open segment's latest partial (``stream.draft``,
        ``stream.pause_partial``)."""
        self.awaiting: dict[int, DecodeRequest] = {}
        """Finals waiting for the partial whose text they take (``reuse``)."""

    @property
    def adapter(self) -> str | None:
        """The adapter of this stream's requests (None: the backend's default)."""
        return self.session.adapter

    @property
    def language(self) -> str | None:
        """The language of this stream's requests (None: ``model.language``)."""
        return self.session.language

    def set_language(self, language: str | None) -> None:
        """Decode this stream's next requests in ``language`` (a request
        already made keeps its own; the open segment's final is decoded in
        the new language, not taken from a partial made at a pause before
        the change). Raises ValueError as :meth:`Engine.check_language`
        does, changing nothing then."""
        self.session.language = self._engine.check_language(language)

    @property
    def closed(self) -> bool:
        """Input has ended (:meth:`close`, or the engine's shutdown): :meth:`push`
        would raise."""
        return self._finished

    def push(self, samples: Int16Array) -> None:
        """Feed 16 kHz mono int16 audio. Never blocks; raises RuntimeError once
        :attr:`closed` (a network handler checks it: audio may still arrive
        while the engine shuts down), and ValueError for samples that are not
        1-D int16 (counted nowhere; the stream goes on)."""
        self._check_open()
        requests = self.session.push(samples, self._engine.now())
        self._engine._samples_in += len(samples)
        self._submit_all(requests)

    def cut(self, *, keep_candidate: bool = False) -> None:
        """End the open segment now, as if its speech had ended: its final is
        requested and the next audio starts a new segment. Nothing is added
        to the stream's timeline. ``keep_candidate`` for a client's commit
        (the audio is an utterance): speech too short yet for a segment
        (``vad.min_speech_ms``) becomes one, not a discarded click. Raises
        RuntimeError once :attr:`closed`, as :meth:`push` does."""
        self._check_open()
        self._submit_all(self.session.cut(self._engine.now(), keep_candidate=keep_candidate))

    def report_error(self, code: str, message: str) -> None:
        """Send this stream's listeners an error event about its source (the
        microphone was lost, say); the stream stays open."""
        self.errors += 1
        self._engine._emit(StreamError(self.id, code, message))

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(f"stream {self.id} is closed")

    def _submit_all(self, requests: list[DecodeRequest]) -> None:
        for req in requests:
            self._engine._submit(self, req)
        self._update_idle()

    async def wait_idle(self) -> None:
        """Return once no partial of this stream is in flight and fewer than
        ``worker.max_batch`` (at least 2) of its finals are outstanding.

        A file reader that wants every partial, as fast as the model allows,
        awaits this between chunks; live sources never wait. The bound on
        finals holds a reader back when nothing else does (no partials): it
        would otherwise hand over every final of a long file at once, each
        with its audio, to wait in the engine's backlog (a 3-hour file: about
        700 MB), while it still feeds the model full batches.
        """
        await self._idle.wait()

    async def close(self) -> StreamSummary:
        """End of input: flush the open segment and wait for every final."""
        if not self._finished:
            self._finished = True
            for req in self.session.finish(self._engine.now()):
                self._engine._submit(self, req)
            self._check_done()
        await self._done.wait()
        return self.summary()

    def summary(self) -> StreamSummary:
        st = self.session.stats()
        return StreamSummary(
            stream=self.id, duration_s=st.samples_in / SAMPLE_RATE,
            segments=st.finals_requested, finals=self.finals,
            partials=self.partials, errors=self.errors,
        )

    @property
    def drafts(self) -> dict[int, tuple[int, ...]]:
        """Token ids of each open segment's latest partial, where the backend
        reported them: its next request's draft (``stream.draft``)."""
        return {seg: h.token_ids for seg, h in self.latest.items() if h.token_ids}

    def note_draft(self, result: WorkerResult) -> None:
        """Keep a partial as its segment's latest (its token ids are the next
        draft); a final (or a failed one) closes the segment's entry. Bounded:
        the entries of the few most recent segments only (a stale partial of
        an ended segment cannot pile up)."""
        if result.kind is RequestKind.FINAL:
            self.latest.pop(result.segment, None)
            return
        if not isinstance(result, Hypothesis):
            return
        self.latest[result.segment] = result
        while len(self.latest) > _PARTIALS_KEPT:
            del self.latest[min(self.latest)]

    def _update_idle(self) -> None:
        ahead = max(2, self._engine.config.worker.max_batch)
        if self.session.partial_in_flight or self.session.finals_outstanding >= ahead:
            self._idle.clear()
        else:
            self._idle.set()

    def _check_done(self) -> None:
        if (self._finished and not self._done.is_set()
                and self.session.finals_outstanding == 0
                and not self._engine._has_backlog(self.id)):
            # Every final has come back; a segment the merger still holds open
            # (its final failed) is closed with what was shown, so nothing
            # stays unsaid.
            self._engine._emit_captions(self, self.merger.close())
            self._done.set()
            self._engine._stream_done(self)


class Engine:
    """Owns the model worker and all live streams.

    Use as ``async with Engine(cfg, backend) as engine:``; leaving the block
    closes every stream (their open segments become finals) and stops the
    worker after it has decoded everything queued.
    """

    def __init__(
        self, config: Config, backend: Backend, *, clock: Callable[[], float] = time.monotonic,
        backend_factory: Callable[[], Backend] | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.now = clock
        self._backend_factory = backend_factory
        self._journal: Journal | None = None
        self._epoch = new_epoch()
        self._journal_failures = 0
        self._sync_handle: asyncio.TimerHandle | None = None
        self._prune_handle: asyncio.TimerHandle | None = None
        self._watch_handle: asyncio.TimerHandle | None = None
        self._stalled = False
        self._stalls = 0
        # The last seq of streams that ended, most recent last (module doc).
        self._ended_seq: OrderedDict[str, int] = OrderedDict()
        # Set by give_up (a second Ctrl-C) or by a drain that was cut short:
        # from then on nothing at shutdown waits for the model.
        self._giving_up = False
        self._draining = False
        # The one drain (see drain): every caller waits for it.
        self._drain_task: asyncio.Future[bool] | None = None
        self._samples_in = 0
        self._listeners: list[Listener] = []
        self._streams: dict[str, Stream] = {}
        # (stream, final, whether the inbox refused it once already): a final
        # that went straight behind its stream's was never offered, and its
        # first refusal still counts in the worker's ``refused``.
        self._backlog: deque[tuple[Stream, DecodeRequest, bool]] = deque()
        # How many of the backlog's finals each stream has (none: absent),
        # kept in step with it: asked per final, where a scan of a backlog
        # of many streams' finals would cost quadratic time under overload.
        self._backlog_of: Counter[str] = Counter()
        self._retry_handle: asyncio.TimerHandle | None = None
        self._backlog_logged_at = float("-inf")
        self._partials_refused = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: ModelWorker | None = None

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Restore the journal (if on) and start the model worker. Raises
        :class:`ConfigError` when the journal's folder cannot be made or read."""
        loop = asyncio.get_running_loop()
        self._loop = loop

        def deliver(result: WorkerResult) -> None:
            if loop.is_closed():
                return  # a model thread left behind at shutdown answered late
            loop.call_soon_threadsafe(self._on_result, result)

        if self.config.journal.enabled:
            journal = Journal(self.config.journal, clock=self.now)
            try:
                restored = await asyncio.to_thread(journal.restore)
            except OSError as e:
                # A folder that cannot be made or read (a typo'd path, a file
                # in the way): for people, one line, as a bad config value.
                where = self.config.journal.dir
                raise ConfigError(f"journal.dir {where}: cannot open the journal: "
                                  f"{e.strerror or e}" + (f" ({e.filename})" if e.filename
                                  and str(e.filename) != str(where) else "")) from None
            self._journal = journal
            self._epoch = journal.epoch
            log.info("journal %s: %d stream(s) restored", self.config.journal.dir,
                     len(restored))
            self._schedule_prune()
        self._worker = ModelWorker(self.backend, self.config.worker, deliver, clock=self.now,
                                   factory=self._backend_factory)
        self._worker.start()
        self._schedule_watch()
        log.info("engine started with backend %s", self.backend.name)

    async def close_streams(self) -> list[StreamSummary]:
        """End every open stream: open segments become finals, all delivered."""
        return list(await asyncio.gather(*(s.close() for s in list(self._streams.values()))))

    async def drain(self, limit_s: float | None = None) -> bool:
        """End every open stream and wait for the finals they are owed, for at
        most ``limit_s`` seconds (default ``worker.drain_timeout_s``; 0: no
        limit), until :meth:`give_up`, or until the model is seen stalled.
        True when every final came; False when the wait was cut short and the
        rest were closed as the module doc says. No stream opens afterwards
        (:class:`EngineStopping`).

        There is one drain: a call while one is under way (a SIGTERM during
        an exit's), or after it, waits for that one (its limit holds, not
        ``limit_s``) and returns its result. A caller cancelled does not
        cancel it: the next caller waits for the same drain."""
        self._draining = True
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain(limit_s))
        return await asyncio.shield(self._drain_task)

    async def _drain(self, limit_s: float | None) -> bool:
        if not self._streams:
            return True
        limit = self.config.worker.drain_timeout_s if limit_s is None else limit_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit if limit else None
        closing = asyncio.ensure_future(self.close_streams())
        why = ""
        while not why:
            done, _ = await asyncio.wait({closing}, timeout=_DRAIN_POLL_S)
            if done:
                closing.result()
                return True
            if self._giving_up:
                why = "asked to stop at once"
            elif self._worker is not None and self._worker.stalled:
                # A stuck model will not answer within any limit, and a
                # supervisor's grace period is short: give up now.
                why = "the model thread is stalled"
            elif deadline is not None and loop.time() >= deadline:
                why = f"worker.drain_timeout_s = {limit:g} s passed"
        owed = sum(st.session.finals_outstanding for st in self._streams.values())
        log.error("shutdown: %s with %d final(s) of %d stream(s) not decoded; closing "
                  "them with their last partials", why, owed, len(self._streams))
        self._giving_up = True
        for stream in list(self._streams.values()):
            self._abandon_stream(stream)
        await closing
        return False

    def give_up(self) -> None:
        """Cut a :meth:`drain` in progress (or the next one) short: the second
        Ctrl-C. Safe to call from a signal handler on the loop."""
        self._giving_up = True

    async def aclose(self) -> None:
        await self.drain()
        # The drain left no backlog (delivered, or dropped with its stream):
        # a retry still scheduled must not run once the worker is gone.
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        if self._worker is not None:
            worker, self._worker = self._worker, None
            await self._stop_worker(worker)
        for handle in (self._sync_handle, self._prune_handle, self._watch_handle):
            if handle is not None:
                handle.cancel()
        self._sync_handle = self._prune_handle = self._watch_handle = None
        if self._journal is not None:
            try:
                self._journal.close()
            except OSError as e:
                # A disk still full at the exit: every file is closed all the
                # same, and the finals it refused were reported as they came.
                log.error("journal: cannot close its files: %s", e.strerror or e)

    @property
    def epoch(self) -> str:
        """The id of this engine's seq numbering: the journal's (kept across
        restarts, as the numbering is) when there is one, else new with every
        engine, whose streams number from 1 again. Final once started."""
        return self._epoch

    @property
    def journal(self) -> Journal | None:
        """The journal of finals (None unless ``journal.enabled``); a
        :class:`~evoxtral_stream.server.broadcast.Broadcaster` may replay from it."""
        return self._journal

    @property
    def started(self) -> bool:
        """Between :meth:`start` and :meth:`aclose`."""
        return self._worker is not None

    @property
    def ready(self) -> bool:
        """Started, the model loaded and its worker thread serving."""
        return self._worker is not None and self._worker.ready

    @property
    def healthy(self) -> bool:
        """False while the model thread is stuck in a backend call past
        ``worker.stall_timeout_s``, and for good once the worker gave up past
        ``worker.restart_limit``: a process a supervisor should restart."""
        return self.unhealthy_reason is None

    @property
    def unhealthy_reason(self) -> str | None:
        """``"model stalled"``, ``"model down"`` or None (healthy)."""
        w = self._worker
        if w is None:
            return None
        if w.down is not None:
            return "model down"
        return "model stalled" if w.stalled else None

    # --- streams and listeners ---------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Adapters a stream may ask for (empty: the backend cannot switch)."""
        if isinstance(self.backend, AdapterBackend):
            return tuple(self.backend.adapter_names)
        return ()

    def check_adapter(self, adapter: str | None) -> str | None:
        """The adapter a stream asking for ``adapter`` gets: None (meaning the
        backend's default) for None or the default's own name, so that the
        worker, which keeps one adapter per running batch, sees one name for
        it; else the name. Raises ValueError for one the backend lacks."""
        if adapter is None:
            return None
        if adapter not in self.adapter_names:
            known = ", ".join(self.adapter_names) or "none: the backend cannot switch adapters"
            raise ValueError(f"unknown adapter {shown(adapter)} (known: {known})")
        default = self.backend.default_adapter if isinstance(self.backend, AdapterBackend) \
            else None
        return None if adapter == default else adapter

    @property
    def languages(self) -> tuple[str, ...]:
        """Languages a stream may ask for besides ``model.language`` (empty:
        the backend decodes ``model.language`` only)."""
        if isinstance(self.backend, Multilingual):
            return tuple(self.backend.languages)
        return ()

    def check_language(self, language: str | None) -> str | None:
        """The language a stream asking for ``language`` gets: None (meaning
        ``model.language``) for None or that same code, else the code.
        Raises ValueError for one the backend does not decode."""
        if language is None or language == self.config.model.language:
            return None
        if language not in self.languages:
            known = ", ".join(self.languages) or (
                f"{self.config.model.language} only: the backend cannot switch languages")
            raise ValueError(f"unknown language {shown(language)} (known: {known})")
        return language

    def open_stream(self, stream_id: str, source: str = "api",
                    adapter: str | None = None, language: str | None = None,
                    paced: bool = True) -> Stream:
        """Open a stream; ``adapter`` picks one of :attr:`adapter_names` (see
        :meth:`check_adapter`), ``language`` one of :attr:`languages` (see
        :meth:`check_language`).
        ``paced=False``: its audio comes faster than it plays (a file read as
        fast as the model allows), so its requests wait in the worker's
        queue by design and are not counted as the model lagging
        (``DecodeRequest.paced``)."""
        if self._worker is None:
            raise RuntimeError("engine is not started")
        if self._draining:
            raise EngineStopping("the engine is shutting down: no new streams")
        problem = stream_id_problem(stream_id)
        if problem is not None:
            raise ValueError(problem)
        if stream_id in self._streams:
            raise ValueError(f"stream {stream_id!r} is already open")
        stream = Stream(self, stream_id, source, self.check_adapter(adapter),
                        self.check_language(language), paced)
        self._streams[stream_id] = stream
        self._emit(StreamStarted(stream_id, source))
        return stream

    @property
    def streams(self) -> dict[str, Stream]:
        return dict(self._streams)

    def last_seq(self, stream_id: str) -> int:
        """The last seq given under ``stream_id``: by its open stream, else as
        remembered of this run (:data:`SEQ_REMEMBERED` ended streams) or
        journaled; 0 if none. A stream opened under the id numbers after it."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream.last_seq
        return max(self._journal.last_seq(stream_id) if self._journal else 0,
                   self._ended_seq.get(stream_id, 0))

    def stats(self) -> EngineStats:
        assert self._worker is not None
        return EngineStats(
            worker=self._worker.stats(), streams=len(self._streams),
            finals_backlog=len(self._backlog), partials_refused=self._partials_refused,
            audio_s=self._samples_in / SAMPLE_RATE,
            journal_appends=self._journal.appended if self._journal else 0,
            journal_failures=self._journal_failures
            + (self._journal.sync_failures if self._journal else 0),
            journal_pruned=self._journal.pruned if self._journal else 0,
            journal_open_files=self._journal.open_files if self._journal else 0,
            stalls=self._stalls,
        )

    # --- internals ----------------------------------------------------------

    def _emit(self, event: EngineEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("caption listener failed; removing it")
                self._listeners.remove(listener)

    def _submit(self, stream: Stream, req: DecodeRequest) -> None:
        assert self._worker is not None
        if req.reuse is not None:
            latest = stream.latest.get(req.segment)
            if latest is not None and latest.revision == req.reuse:
                # Soon, not now: captions never come from inside push() (a
                # caller finishes what that push produced first, as it does
                # for decoded finals, which come from the worker thread).
                assert self._loop is not None
                self._loop.call_soon(self._final_from, stream, req, latest)
                return
            if stream.session.in_flight(req.segment, req.reuse):
                stream.awaiting[req.segment] = req
                return
            # That partial failed or was dropped: decode the final after all.
            req = dataclasses.replace(req, reuse=None)
        req = self._with_draft(stream, self._with_prefix(stream, req))
        if not stream.paced:
            req = dataclasses.replace(req, paced=False)
        # While finals wait in the backlog, a slot the model frees is theirs,
        # oldest first: a final goes behind them (offered now, it could take
        # the slot before they do: out of its stream's order, or ahead of
        # finals that waited longer), and a partial is refused like one the
        # full inbox refuses (its next cadence tick asks again).
        behind = bool(self._backlog)
        if not behind and self._worker.submit(req):
            return
        if req.kind is RequestKind.PARTIAL:
            self._partials_refused += 1
            stream.session.requeue_failed_submit(req)
            return
        # Finals are never dropped: keep them in order and offer them again.
        # The backlog holds the finals the full inbox refused and those that
        # came while they waited, at most one per segment that ended
        # meanwhile; it drains as fast as the worker decodes, and its length
        # is in EngineStats and /metrics.
        self._backlog.append((stream, req, not behind))
        self._backlog_of[stream.id] += 1
        now = self.now()
        if now - self._backlog_logged_at >= _BACKLOG_LOG_EVERY_S:
            self._backlog_logged_at = now
            log.warning("model worker inbox full; %d final(s) waiting (each is offered "
                        "again until it fits)", len(self._backlog))
        self._schedule_retry()

    def _final_from(self, stream: Stream, req: DecodeRequest, partial: Hypothesis) -> None:
        """Answer final ``req`` with ``partial``, which decoded the same audio."""
        final = dataclasses.replace(
            partial, kind=RequestKind.FINAL, revision=req.revision, ready_at=req.ready_at,
            done_at=max(partial.done_at, self.now()), forced_end=req.forced_end)
        self._on_result(final)

    def _partial_for_final(self, stream: Stream, result: WorkerResult) -> None:
        """A final waits for this partial: answer it, or decode it after all."""
        req = stream.awaiting.get(result.segment)
        if req is None or result.kind is not RequestKind.PARTIAL or result.revision != req.reuse:
            return
        del stream.awaiting[result.segment]
        if isinstance(result, Hypothesis):
            self._final_from(stream, req, result)
        else:
            self._submit(stream, dataclasses.replace(req, reuse=None))

    def _with_prefix(self, stream: Stream, req: DecodeRequest) -> DecodeRequest:
        """``req`` with the segment's committed text as its prefix, per
        ``stream.prefix_reuse`` ("partials": partials only; "all": finals too).
        A partial made at a pause is decoded as a final is: it may become one."""
        mode = self.config.stream.prefix_reuse
        if mode == "off" or (mode == "partials" and (req.kind is RequestKind.FINAL
                                                     or req.at_pause)):
            return req
        prefix = stream.merger.reusable_prefix(req.segment, req.end_sample)
        return dataclasses.replace(req, prefix=prefix) if prefix else req

    def _with_draft(self, stream: Stream, req: DecodeRequest) -> DecodeRequest:
        """``req`` with the token ids of its segment's last hypothesis as a
        draft, per ``stream.draft`` (never beside a prefix)."""
        if not self.config.stream.draft or req.prefix:
            return req
        draft = stream.drafts.get(req.segment)
        return dataclasses.replace(req, draft=draft) if draft else req

    def _schedule_retry(self) -> None:
        if self._retry_handle is None and self._backlog and self._loop is not None:
            self._retry_handle = self._loop.call_later(_FINAL_RETRY_S, self._retry_backlog)

    def _retry_backlog(self) -> None:
        self._retry_handle = None
        assert self._worker is not None
        while self._backlog:
            stream, req, refused = self._backlog[0]
            if not self._worker.submit(req, again=refused):
                self._backlog[0] = (stream, req, True)
                break
            self._backlog.popleft()
            self._backlog_of[stream.id] -= 1
            if not self._backlog_of[stream.id]:
                del self._backlog_of[stream.id]
            stream._check_done()
        self._schedule_retry()

    def _has_backlog(self, stream_id: str) -> bool:
        return stream_id in self._backlog_of

    def _on_result(self, result: WorkerResult) -> None:
        stream = self._streams.get(result.stream)
        if stream is None:
            log.debug("result for closed stream %s dropped", result.stream)
            return
        # When this final was asked for, read before on_result forgets it.
        asked_at = (stream.session.final_ready_at(result.segment)
                    if result.kind is RequestKind.FINAL else None)
        stream.session.on_result(result)
        stream.note_draft(result)
        if isinstance(result, DecodeFailure):
            stream.errors += 1
            closing: list[CaptionEvent] = []
            if result.kind is RequestKind.FINAL:
                # Its final will never come: close the segment with what was
                # shown so later segments of the stream are not held back.
                closing = self._waited(stream.merger.abandon(result.segment),
                                       result.segment, asked_at)
            # The error first: it stands in for the segment's caption (a
            # client marks the segment's line there), and the closing final
            # with what was shown, if any, follows: now, or, held behind an
            # earlier segment still open (the merger keeps it), later.
            self._emit(StreamError(
                result.stream, "decode_failed", result.message, result.segment,
                closes_segment=result.kind is RequestKind.FINAL
                and result.segment not in stream.merger.open_segments and not any(
                    c.final and c.segment == result.segment for c in closing)))
            self._emit_captions(stream, closing)
        else:
            self._emit_captions(stream, stream.merger.feed(result))
        self._partial_for_final(stream, result)
        stream._update_idle()
        stream._check_done()

    def _waited(self, closing: list[CaptionEvent], segment: int,
                ready_at: float | None) -> list[CaptionEvent]:
        """``closing`` with ``segment``'s final, closed without its own decode
        (failed, or abandoned at a shutdown), carrying how long that final was
        waited for: from its request (``ready_at``) until now. Not the latency
        of the partial whose text it took (milliseconds, so /metrics' final
        latency would read fastest exactly when finals were not decoded)."""
        if ready_at is None:
            return closing
        waited = max(0.0, self.now() - ready_at)
        return [dataclasses.replace(c, latency=waited) if c.final and c.segment == segment
                else c for c in closing]

    def _emit_captions(self, stream: Stream, events: list[CaptionEvent]) -> None:
        for event in events:
            if stream.seq_base:
                event = dataclasses.replace(event, seq=event.seq + stream.seq_base)
            stream.last_seq = event.seq
            self._reserve_seq(stream, event.seq)
            if event.final:
                stream.finals += 1
                self._journal_final(event)
            else:
                stream.partials += 1
            self._emit(event)

    def _reserve_seq(self, stream: Stream, seq: int) -> None:
        """Before a caption leaves: a restart must number the stream past its
        seq (module doc)."""
        if self._journal is None:
            return
        try:
            wrote = self._journal.reserve(stream.id, seq)
        except OSError as e:
            # The caption still goes out live; after a restart its seq may be
            # given again. Reported once until a reservation succeeds.
            self._journal_failures += 1
            if not stream.reserve_failing:
                stream.reserve_failing = True
                log.error("journal: cannot reserve seqs of %s: %s", stream.id, e)
                self._emit(StreamError(stream.id, "journal_failed",
                                       f"seq reservation not journaled: {e}; after a "
                                       "restart this stream's seq may repeat"))
            return
        stream.reserve_failing = False
        if wrote:
            self._schedule_sync()

    def _journal_final(self, event: CaptionEvent) -> None:
        """Write the final before any listener sees it (module doc)."""
        if self._journal is None:
            return
        try:
            self._journal.append(event)
        except OSError as e:
            # The caption still goes out live; only its durability is lost.
            self._journal_failures += 1
            log.error("journal: cannot write a final of %s: %s", event.stream, e)
            self._emit(StreamError(event.stream, "journal_failed",
                                   f"final not journaled: {e}", event.segment))
            return
        self._schedule_sync()

    def _schedule_sync(self) -> None:
        # fsync = "interval": the last finals before a quiet spell must reach
        # the disk too, so a timer comes back when the next fsync is due.
        if self._journal is None or self._sync_handle is not None or self._loop is None:
            return
        wait = self._journal.sync_due()
        if wait is not None:
            self._sync_handle = self._loop.call_later(wait, self._sync_now)

    def _sync_now(self) -> None:
        # The fsyncs run on the journal's own thread, which logs and counts
        # a failure: nothing here waits for the disk or raises.
        self._sync_handle = None
        self._schedule_sync()

    def _schedule_prune(self) -> None:
        retention = self.config.journal.retention_s
        if retention > 0 and self._loop is not None:
            # Often enough that nothing outlives its retention by more than
            # half of it (or an hour), rarely enough to cost nothing.
            every = max(_TIMER_MIN_S, min(_PRUNE_EVERY_MAX_S, retention / 2))
            self._prune_handle = self._loop.call_later(every, self._prune_now)

    def _prune_now(self) -> None:
        if self._journal is None:
            return
        try:
            self._journal.prune(live=self._streams.keys())
        except OSError as e:
            log.error("journal: pruning failed: %s", e)
        self._schedule_prune()

    def _schedule_watch(self) -> None:
        limit = self.config.worker.stall_timeout_s
        if limit > 0 and self._loop is not None:
            every = max(_TIMER_MIN_S, min(_WATCH_EVERY_MAX_S, limit / 4))
            self._watch_handle = self._loop.call_later(every, self._watch)

    def _watch(self) -> None:
        """Act on the transitions of the worker's stall flag (module doc)."""
        worker = self._worker
        if worker is None:
            return
        stalled = worker.stalled
        if stalled and not self._stalled:
            self._stalls += 1
            age = worker.call_age()
            log.critical("the model thread has been stuck in one backend call for %.1f s "
                         "(worker.stall_timeout_s = %g); /healthz reports it; captions "
                         "wait until the call returns", age,
                         self.config.worker.stall_timeout_s)
            for stream_id in list(self._streams):
                self._emit(StreamError(stream_id, "model_stalled",
                                       f"the model has not answered for {age:.1f} s; "
                                       "captions are delayed"))
        elif self._stalled and not stalled:
            log.warning("the model thread answered again after a stall")
        self._stalled = stalled
        self._schedule_watch()

    async def _stop_worker(self, worker: ModelWorker) -> None:
        """Stop the worker once it has decoded what is queued; but leave it
        behind after a short grace once giving up or stalled. A model thread
        stuck for good is a daemon thread, as is the one waiting for it here
        (not the loop's executor, which ``asyncio.run`` would wait for), so
        neither keeps the process alive."""
        loop = asyncio.get_running_loop()
        stopper = threading.Thread(target=worker.stop, name="model-worker-stop", daemon=True)
        stopper.start()
        leave_at: float | None = None
        while stopper.is_alive():
            if leave_at is None and (self._giving_up or worker.stalled):
                leave_at = loop.time() + _STOP_GRACE_S
            if leave_at is not None and loop.time() >= leave_at:
                log.error("shutdown: the model thread did not stop within %g s; leaving it "
                          "behind", _STOP_GRACE_S)
                return
            await asyncio.sleep(_DRAIN_POLL_S)

    def _abandon_stream(self, stream: Stream) -> None:
        """Close ``stream`` now, without the finals still owed (see drain)."""
        stream._finished = True
        if self._backlog_of.pop(stream.id, 0):
            self._backlog = deque(item for item in self._backlog if item[0] is not stream)
        owed = set(stream.session.outstanding_segments)
        closed: set[int] = set()
        # In order, so that no abandoned segment waits for an earlier one.
        for segment in sorted(owed):
            events = self._waited(stream.merger.abandon(segment), segment,
                                  stream.session.final_ready_at(segment))
            closed.update(e.segment for e in events if e.final)
            self._emit_captions(stream, events)
        events = stream.merger.close()
        for segment in owed - closed:  # held behind a segment that closes here
            events = self._waited(events, segment, stream.session.final_ready_at(segment))
        closed.update(e.segment for e in events if e.final)
        self._emit_captions(stream, events)
        lost = sorted(owed - closed)
        if lost:
            log.error("shutdown: %d final(s) of %s lost (segments %s): nothing had been "
                      "shown for them", len(lost), stream.id, lost)
        # One event per segment, as for decode_failed: a client keyed by
        # segment learns which lines will never get their final.
        for segment in lost:
            stream.errors += 1
            self._emit(StreamError(stream.id, "final_lost",
                                   f"shut down before the model decoded the final of "
                                   f"segment {segment}, which showed nothing",
                                   segment=segment, closes_segment=True))
        stream._idle.set()  # nothing is owed now: a reader waiting in wait_idle goes on
        stream._done.set()
        self._stream_done(stream)

    def _stream_done(self, stream: Stream) -> None:
        self._streams.pop(stream.id, None)
        if stream.last_seq:
            self._ended_seq[stream.id] = stream.last_seq
            self._ended_seq.move_to_end(stream.id)
            while len(self._ended_seq) > SEQ_REMEMBERED:
                self._ended_seq.popitem(last=False)
        st = stream.summary()
        ended = StreamEnded(stream.id, st.duration_s, st.segments, st.finals)
        if self._journal is not None:
            # Journaled before any listener sees it (module doc), so a resume
            # after a restart ends with it.
            try:
                self._journal.end(ended)
            except OSError as e:
                self._journal_failures += 1
                log.error("journal: cannot record the end of %s (or close its file): %s",
                          stream.id, e)
        self._emit(ended)
