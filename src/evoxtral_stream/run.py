"""The jobs behind the CLI: stream files or a microphone through the engine.

These are the asyncio edges that tie sources, the engine, the server and the
outputs together; the cores they call are pure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .audio.filereader import FileMix, FilePass
from .audio.receivers import RouteReceiver
from .audio.sources import iter_chunks, rechunked
from .config import Config
from .engine.engine import Engine, Stream, StreamSummary
from .events import SAMPLE_RATE, CaptionEvent, EngineEvent, Int16Array
from .text.tags import join_texts

__all__ = ["FileJob", "LatencyLog", "feed_samples", "final_text", "play_together",
           "total_samples", "transcribe_samples"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileJob:
    """One input to stream: its stream id and its 16 kHz mono audio, held
    or one mix of a file decoded as it is fed (:class:`FileMix`)."""

    stream: str
    samples: Int16Array | FileMix
    file: str | None = None
    """The recording the stream is one channel of: fed in real time, the
    jobs of one ``file`` share a clock (:func:`play_together`); None: a
    recording of its own."""


#: The audio of a stream: held, or a file's mix decoded as it is fed.
Samples = Int16Array | FileMix


def total_samples(sources: Sequence[Samples]) -> int | None:
    """The samples ``sources`` hold, a file's as its header says (None
    where one says no length)."""
    total = 0
    for source in sources:
        n = source.samples if isinstance(source, FileMix) else len(source)
        if n is None:
            return None
        total += n
    return total


def _in_step(sources: Sequence[Samples], chunk_samples: int, stack: contextlib.ExitStack
             ) -> tuple[Iterator[list[Int16Array]], list[tuple[FilePass, list[int]]]]:
    """Per step, a chunk of each of ``sources`` (an empty one once it has
    ended), until they all have; and the passes over files that make them,
    each with the indexes of its sources (``stack`` closes the passes).
    The mixes of one file come from one pass, so they stay in step and the
    file is decoded once; a pass holds a block, never the file."""
    empty = np.zeros(0, np.int16)
    parts: list[tuple[list[int], Iterator[list[Int16Array]]]] = []
    files: dict[int, list[tuple[int, FileMix]]] = {}
    for i, source in enumerate(sources):
        if isinstance(source, FileMix):
            files.setdefault(id(source.audio), []).append((i, source))
        else:
            parts.append(([i], ([c] for c in iter_chunks(source, chunk_samples))))
    passes: list[tuple[FilePass, list[int]]] = []
    for mixes in files.values():
        indexes = [i for i, _ in mixes]
        blocks = stack.enter_context(mixes[0][1].audio.blocks([m.mix for _, m in mixes]))
        passes.append((blocks, indexes))
        parts.append((indexes, rechunked(blocks, len(indexes), chunk_samples)))

    def steps() -> Iterator[list[Int16Array]]:
        while True:
            step = [empty] * len(sources)
            more = False
            for indexes, chunks in parts:
                got = next(chunks, None)
                if got is not None:
                    more = True
                    for i, chunk in zip(indexes, got, strict=True):
                        step[i] = chunk
            if not more:
                return
            yield step
    return steps(), passes


#: The threads that take the steps of files (:class:`_Steps`): a few, so
#: that a file stalled on a slow or damaged read holds up no other. Its
#: queue is bounded by the feeds: each has at most one step there, and
#: waits for it before it asks for the next (nothing is dropped).
_DECODERS = concurrent.futures.ThreadPoolExecutor(max_workers=4,
                                                  thread_name_prefix="evoxtral-decode")


class _Steps:
    """The steps of :func:`_in_step`, awaited. Where they decode files
    whose decoders print nothing (:attr:`AudioFile.prints`), each step is
    taken on a worker thread (:data:`_DECODERS`): a block's decode takes
    milliseconds, and a damaged file's read again up to its damage takes
    seconds, which on the event loop would hold up every other stream and
    connection it serves. An MP3's steps are taken on the loop: its
    decoder's prints are caught on descriptor 2, which the loop's own
    writes share. One step at a time, so that a pass is never read by two
    threads at once; :meth:`settle` waits out a step still on its thread
    (the feed stopped meanwhile) before the passes may be closed."""

    def __init__(self, steps: Iterator[list[Int16Array]],
                 passes: Sequence[tuple[FilePass, list[int]]]) -> None:
        self._steps = steps
        self._threaded = bool(passes) and not any(p.audio.prints for p, _ in passes)
        self._taking: concurrent.futures.Future[list[Int16Array] | None] | None = None

    def __aiter__(self) -> _Steps:
        return self

    async def __anext__(self) -> list[Int16Array]:
        if self._threaded:
            self._taking = _DECODERS.submit(next, self._steps, None)
            step = await asyncio.wrap_future(self._taking)
        else:
            step = next(self._steps, None)
        if step is None:
            raise StopAsyncIteration
        return step

    async def settle(self) -> None:
        """Return once no step is on its thread; a cancel meanwhile is
        raised after."""
        taking, cancelled = self._taking, False
        while taking is not None and not taking.done():
            try:
                # wait() cancels nothing; a step not started yet is
                # cancelled by the wrapped future's own cancel, never run.
                await asyncio.wait([asyncio.wrap_future(taking)])
            except asyncio.CancelledError:
                cancelled = True
        if taking is not None and not taking.cancelled():
            taking.exception()  # raised to the feeder already, or not wanted now
        if cancelled:
            raise asyncio.CancelledError


def _report_read_errors(streams: Sequence[Stream],
                        passes: Sequence[tuple[FilePass, list[int]]]) -> None:
    """Tell the streams of a file whose pass ended on an error (logged
    already) why their audio ended early."""
    for blocks, indexes in passes:
        if blocks.error is not None:
            for i in indexes:
                streams[i].report_error("audio_input_lost", blocks.error)


async def feed_samples(
    stream: Stream,
    samples: Samples,
    chunk_samples: int,
    *,
    realtime: bool,
    progress: Callable[[int], None] | None = None,
) -> StreamSummary:
    """Push ``samples`` into ``stream`` chunk by chunk, then close it.

    ``realtime`` paces the chunks to the wall clock, as a live source would.
    Otherwise the feeder goes as fast as the model allows while still getting
    every partial: it waits for the stream's partial in flight, and while a
    batch's worth of its finals are outstanding (:meth:`Stream.wait_idle`).

    A file's mix is decoded as it is fed, on a worker thread
    (:class:`_Steps`); a file that fails to read part way ends the stream
    there (one error line logged, an ``audio_input_lost`` error to its
    listeners), with its finals.
    """
    t0 = time.monotonic()
    pushed = 0
    with contextlib.ExitStack() as stack:
        steps, passes = _in_step([samples], chunk_samples, stack)
        taken = _Steps(steps, passes)
        try:
            async for (chunk,) in taken:
                stream.push(chunk)
                pushed += len(chunk)
                if progress is not None:
                    progress(len(chunk))
                if realtime:
                    delay = t0 + pushed / SAMPLE_RATE - time.monotonic()
                    await asyncio.sleep(max(0.0, delay))
                else:
                    await stream.wait_idle()
                    await asyncio.sleep(0)
        finally:
            await taken.settle()
        _report_read_errors([stream], passes)
    return await stream.close()


async def play_together(feeds: Sequence[tuple[Stream, Samples]],
                        chunk_samples: int,
                        progress: Callable[[int], None] | None = None) -> list[StreamSummary]:
    """Push each stream its samples at real-time pace, all on one clock: at
    each step every stream gets the same stretch of time (the channels of one
    recording stay in step), then close them all and wait for every final.
    ``progress`` is told the samples of each chunk pushed (or offered).

    A stream whose push raises (a bug, a stream closed under the feeder)
    costs the others nothing, as a capture's routes do
    (:class:`~evoxtral_stream.audio.receivers.RouteReceiver`): the failure
    is logged with its traceback (throttled) and counted, that stream misses
    the chunks it refuses and is still offered the next, and every other
    stream gets all of its audio and its finals.

    A file's mixes come from one pass over it, decoded as they are fed
    (:class:`FileMix`), on a worker thread (:class:`_Steps`); a file that
    fails to read part way ends its streams there (one error line logged,
    an ``audio_input_lost`` error to their listeners), with their finals,
    and the others go on."""
    if chunk_samples < 1:
        raise ValueError(f"chunk_samples must be at least 1, got {chunk_samples}")
    receivers = [RouteReceiver(stream.push, f"audio route {i} of {len(feeds)} "
                                            f"(stream {stream.id})")
                 for i, (stream, _) in enumerate(feeds, 1)]
    t0 = time.monotonic()
    at = 0
    with contextlib.ExitStack() as stack:
        try:
            steps, passes = _in_step([samples for _, samples in feeds], chunk_samples, stack)
            taken = _Steps(steps, passes)
            try:
                async for step in taken:
                    for receiver, chunk in zip(receivers, step, strict=True):
                        if len(chunk):
                            receiver(chunk)
                            if progress is not None:
                                progress(len(chunk))
                    at += max(len(chunk) for chunk in step)  # every stream's time goes on
                    delay = t0 + at / SAMPLE_RATE - time.monotonic()
                    await asyncio.sleep(max(0.0, delay))
            finally:
                await taken.settle()
        finally:  # the end of the file, or a stop: the failures not logged yet
            for receiver in receivers:
                receiver.report_rest()
        _report_read_errors([stream for stream, _ in feeds], passes)
    return list(await asyncio.gather(*(stream.close() for stream, _ in feeds)))


class LatencyLog:
    """Engine listener that keeps every caption, for summaries and tests."""

    def __init__(self) -> None:
        self.events: list[EngineEvent] = []

    def __call__(self, event: EngineEvent) -> None:
        self.events.append(event)

    def captions(self, stream: str | None = None) -> list[CaptionEvent]:
        return [e for e in self.events if isinstance(e, CaptionEvent)
                and (stream is None or e.stream == stream)]

    def final_latencies(self) -> list[float]:
        return [e.latency for e in self.captions() if e.final and e.latency is not None]


async def transcribe_samples(
    cfg: Config,
    engine: Engine,
    jobs: Sequence[FileJob],
    *,
    realtime: bool,
    progress: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> list[StreamSummary]:
    """Stream every job concurrently through ``engine``; return their summaries
    in the order of ``jobs``.

    ``realtime`` paces the audio to the wall clock: the jobs of one
    :attr:`FileJob.file` (a recording's channels) on one clock
    (:func:`play_together`), every recording on its own, so that each ends
    with its audio. Once ``stop`` is set (Ctrl-C), no more audio is fed:
    every stream ends as :meth:`Engine.drain` ends them (open segments become
    finals, the wait for them bounded), and the summaries cover the audio fed
    until then.
    """
    chunk = max(1, cfg.audio.file_chunk_ms * SAMPLE_RATE // 1000)
    # Not paced: a queue of finals is how a file goes as fast as it can.
    streams = [engine.open_stream(job.stream, source="file", paced=realtime) for job in jobs]
    feeding: asyncio.Future[list[Any]]
    if realtime:
        recordings: dict[str | int, list[tuple[Stream, Samples]]] = {}
        for i, (s, job) in enumerate(zip(streams, jobs, strict=True)):
            recordings.setdefault(i if job.file is None else job.file, []).append((s, job.samples))
        feeding = asyncio.gather(*(play_together(feeds, chunk, progress)
                                   for feeds in recordings.values()))
    else:
        feeding = asyncio.gather(*(
            feed_samples(s, job.samples, chunk, realtime=False, progress=progress)
            for s, job in zip(streams, jobs, strict=True)
        ))
    if stop is None:
        await feeding
        return [s.summary() for s in streams]  # each closed: its summary is final
    stopped = asyncio.ensure_future(stop.wait())
    either: set[asyncio.Future[Any]] = {feeding, stopped}
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if feeding.done():
        stopped.cancel()
        feeding.result()  # its exception, if any
        return [s.summary() for s in streams]
    feeding.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await feeding
    await engine.drain()
    return [s.summary() for s in streams]


def final_text(captions: Sequence[CaptionEvent]) -> str:
    """The finals of one stream joined in segment order (non-empty ones),
    a space between two but inside Chinese or Japanese (:func:`.text.tags.seam`)."""
    finals = sorted((c for c in captions if c.final), key=lambda c: c.segment)
    return join_texts(c.text for c in finals)
