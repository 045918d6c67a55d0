"""A live pipe (standard input, a socket there included, or a FIFO) carrying
WAV, captured on a thread of its own into 16 kHz mono int16 blocks on the
event loop, as the microphone is: ``arecord -t wav | evoxtral-stream serve
--source -``.

A pipe is read as its bytes come, not copied whole first (as ``transcribe``
does, and ``serve`` does with a file): a live writer never ends. Nor is it
paced: a writer of a file (``cat talk.wav |``) sends far faster than the
audio plays, which :class:`PaceMeter` finds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import select
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from evoxtral_stream.audio.microphone import ChannelRoute
from evoxtral_stream.audio.receivers import RouteReceiver
from evoxtral_stream.audio.resample import MixResampler
from evoxtral_stream.audio.sources import AudioInputError
from evoxtral_stream.audio.wavstream import WavFormat, WavStreamDecoder, WavStreamError
from evoxtral_stream.events import Float32Array, Int16Array

__all__ = ["AHEAD_S", "CLOCK_DRIFT", "NotLiveAudio", "PaceMeter", "PipeCapture", "PipeEnd",
           "is_live_pipe"]

log = logging.getLogger(__name__)

#: Bytes read at a time while the header is awaited: the header is tens of
#: bytes, and what follows it in the same read (audio) is kept.
_HEADER_READ = 4096
#: How long the reading thread waits for bytes before it looks whether it
#: was asked to stop: a pipe's read cannot be interrupted otherwise.
_POLL_S = 0.1
#: How far a pipe's audio may run ahead of the clock, past what waited in
#: the pipe when reading began, before it counts as not paced. A live writer
#: (``arecord``, ``ffmpeg`` from a network stream) sends at the pace its
#: audio plays, give or take its buffering (a second or two); one copying a
#: file (``cat``) sends hundreds of times faster and passes this in a moment.
AHEAD_S = 5.0
#: How much faster than the host's clock a live writer's own clock may run
#: (a fraction of the time passed), added to :data:`AHEAD_S`: a sound card's
#: crystal is off by up to ~100 ppm, which adds up to seconds a day, so a
#: pipe open for days would otherwise be taken for a file. Ten times that
#: still finds a writer even 1 % fast within minutes.
CLOCK_DRIFT = 0.001
#: What a pipe holds when ``FIONREAD`` cannot say (Linux's default).
_PIPE_BYTES = 64 * 1024


def is_live_pipe(path: Path) -> bool:
    """``path`` (``/dev/stdin`` included) is a pipe or a socket: a live
    stream, read as it comes, not a file."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


class NotLiveAudio(AudioInputError):
    """The pipe carries audio that is not read live (no WAV, or WAV in an
    encoding only a whole file is read in): ``head`` holds the bytes read
    from it so far, for a reader of the whole stream to start with."""

    def __init__(self, message: str, head: bytes) -> None:
        super().__init__(message)
        self.head = head


class PaceMeter:
    """Whether a pipe's audio comes at the pace it plays. Reading began at
    ``start`` (seconds, any clock) with ``held_s`` of audio already waiting
    (the writer started before the reader: ``serve`` reads the header, then
    loads the model); :meth:`add` counts what is read. The pipe is *ahead*
    once the audio read exceeds the time since ``start`` by more than
    ``held_s`` plus ``allowance_s`` plus :data:`CLOCK_DRIFT` of that time
    (a live writer's clock is not the host's). It stays so: a writer found
    ahead (a file, a replay, a network stream's backlog) is not trusted to
    be live again, and its audio stays ahead of the clock anyway."""

    def __init__(self, rate: int, start: float, held_s: float,
                 allowance_s: float = AHEAD_S) -> None:
        if rate < 1:
            raise ValueError(f"rate must be at least 1, got {rate}")
        self.rate = rate
        self._start = start
        self._limit_s = held_s + allowance_s
        self._frames = 0
        self.ahead_s: float | None = None
        """How far ahead of the clock the audio was when found ahead; None
        while it has not been."""

    def add(self, frames: int, now: float) -> bool:
        """Count ``frames`` read at ``now``: True the one time this finds
        the pipe ahead."""
        self._frames += frames
        if self.ahead_s is not None:
            return False
        elapsed = now - self._start
        ahead = self._frames / self.rate - elapsed
        if ahead <= self._limit_s + CLOCK_DRIFT * max(0.0, elapsed):
            return False
        self.ahead_s = ahead
        return True


def _waiting_bytes(fd: int) -> int:
    """The bytes waiting to be read on ``fd``, a pipe or a socket."""
    buf = bytearray(4)
    try:
        # Here, not at the top: neither module exists on Windows.
        import fcntl
        import termios

        fcntl.ioctl(fd, termios.FIONREAD, buf)
    except (ImportError, OSError):
        return _PIPE_BYTES
    return int.from_bytes(buf, sys.byteorder)


@dataclass(frozen=True)
class _Ahead:
    """The hand-off's note that the audio after it came ahead of the clock."""

    seconds: float


@dataclass(frozen=True)
class PipeEnd:
    """How a pipe's capture ended: at the end of the stream (``error`` None)
    or at a failure that stopped the reading (the audio before it was
    delivered). ``unfinished_bytes``: a last frame the writer left cut."""

    error: AudioInputError | None
    unfinished_bytes: int = 0


class PipeCapture:
    """Read a WAV stream from a pipe and hand each route the mix of its
    channels as 16 kHz mono int16 blocks, on the loop.

    :meth:`read_header` (blocking, before the model loads) waits for the WAV
    header and checks it: not WAV, an encoding or rate not read, fewer
    channels than the routes need: each an :class:`AudioInputError` naming
    the pipe. :meth:`start` then reads on a thread (the one that decodes,
    mixes and resamples) in pieces of at most ``block_ms`` of audio, each
    handed on as it is read: a live writer's audio is never held back to
    fill a block.

    The hand-off to the loop holds at most ``max_pending_blocks`` pieces.
    When it is full the thread stops reading until the loop takes one:
    nothing is dropped here, and the pipe's writer waits (a pipe buffers
    64 KiB, then blocks its writer: ``arecord`` reports an overrun and drops
    its own audio then). :attr:`waits` counts how often the hand-off was
    full. A route's receiver that raises costs the other routes nothing,
    nor the end (see :class:`~evoxtral_stream.audio.receivers.RouteReceiver`).

    ``on_end(PipeEnd)`` runs once on the loop after the last block: the
    stream ended, or reading it failed (:class:`PipeEnd` says which). Not
    after :meth:`stop`, which delivers what was read and the resamplers'
    tails itself. ``on_ahead(seconds)``, when given, runs at most once on
    the loop, before the blocks that found the pipe ahead of the clock by
    that much (:class:`PaceMeter`: a writer faster than real time, such as
    ``cat talk.wav |``): the audio from there on is not paced. :meth:`start`
    and :meth:`stop` are called on the loop's thread."""

    def __init__(self, path: Path, *, block_ms: int, max_pending_blocks: int,
                 mixes: Sequence[Sequence[int]] = ((),),
                 channels_from: str = "audio.channels", name: str | None = None,
                 fd: int | None = None) -> None:
        if max_pending_blocks < 1:
            raise ValueError(f"max_pending_blocks must be at least 1, got {max_pending_blocks}")
        if block_ms < 1:
            raise ValueError(f"block_ms must be at least 1, got {block_ms}")
        self.path = path
        self.name = name or ("standard input" if fd == 0 else f"pipe {path}")
        self.block_ms = block_ms
        self.mixes = [tuple(m) for m in mixes]
        self._channels_from = channels_from
        self._fd = fd
        self._owns_fd = fd is None
        self._decoder = WavStreamDecoder()
        self._first: Float32Array | None = None  # audio read with the header
        self._handoff: queue.Queue[list[Int16Array] | PipeEnd | _Ahead] = queue.Queue(
            max_pending_blocks)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._routes: list[RouteReceiver] = []
        self._receivers: list[RouteReceiver] = []
        self._on_end: Callable[[PipeEnd], None] | None = None
        self._on_ahead: Callable[[float], None] | None = None
        self._convert: MixResampler | None = None
        # A piece read but not handed on when stop() came (the hand-off was
        # full): stop() delivers it after those the hand-off holds.
        self._unhanded: list[Int16Array] | None = None
        self.waits = 0
        self.frames_read = 0
        """Frames of the stream (its own rate) read so far."""
        self.pace: PaceMeter | None = None
        """The reading's pace, once :meth:`start` began it (its thread
        writes it: read :attr:`PaceMeter.ahead_s` for what was found)."""

    @property
    def receiver_failures(self) -> int:
        """Blocks a route's receiver raised on, all routes together (see
        :class:`~evoxtral_stream.audio.receivers.RouteReceiver`)."""
        return sum(r.failures for r in self._receivers)

    @property
    def format(self) -> WavFormat | None:
        """The stream's format, once :meth:`read_header` has read it."""
        return self._decoder.format

    @property
    def fd(self) -> int | None:
        """The pipe's descriptor once :meth:`read_header` opened it; None
        once the capture has closed it."""
        return self._fd

    def read_header(self) -> WavFormat:
        """Open the pipe (a FIFO: waits for its writer) and read until its
        audio begins. Blocks; Ctrl-C interrupts it. Raises
        :class:`AudioInputError` naming the pipe; :class:`NotLiveAudio`
        (the pipe left open) for audio of another format."""
        head = bytearray()
        if self._fd is None and _is_socket(self.path):
            # open() cannot connect to it (ENXIO): a socket comes as a descriptor.
            raise AudioInputError(
                f"{self.name} is a socket, read only as standard input: "
                f"`socat UNIX-CONNECT:{self.path} - | evoxtral-stream serve --source -`")
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            while self._decoder.format is None:
                data = os.read(self._fd, _HEADER_READ)
                if not data:
                    self._decoder.finish()  # raises: the stream ended in its header
                head += data
                self._first = self._decoder.feed(data)
        except WavStreamError as e:
            if e.other_format:
                raise NotLiveAudio(f"{self.name}: {e}", bytes(head)) from None
            self._close_fd()
            raise AudioInputError(f"{self.name}: {e}") from None
        except OSError as e:
            self._close_fd()
            raise AudioInputError(f"cannot read {self.name}: {e.strerror or e}") from None
        fmt = self._decoder.format
        wanted = max((c for mix in self.mixes for c in mix), default=0)
        if wanted > fmt.channels:
            self._close_fd()
            raise AudioInputError(f"{self._channels_from} asks for channel {wanted}, but "
                                  f"{self.name} has {fmt.channels} channel(s)")
        return fmt

    def start(self, loop: asyncio.AbstractEventLoop, routes: Sequence[ChannelRoute],
              on_end: Callable[[PipeEnd], None],
              on_ahead: Callable[[float], None] | None = None) -> None:
        """Start reading: ``routes`` are :meth:`read_header`'s ``mixes`` with
        their receivers, in the same order."""
        fmt = self._decoder.format
        if fmt is None or self._fd is None:
            raise RuntimeError("read_header() must succeed before start()")
        if self._thread is not None:
            raise RuntimeError("a pipe is captured once")
        if [tuple(r.channels) for r in routes] != self.mixes:
            raise ValueError("the routes must take the mixes given to the capture, in order")
        self._receivers = RouteReceiver.for_routes(routes)
        self._loop, self._routes, self._on_end = loop, list(self._receivers), on_end
        self._on_ahead = on_ahead
        self._convert = MixResampler(fmt.rate, fmt.channels, self.mixes)
        self._thread = threading.Thread(target=self._run, name="evoxtral-pipe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reading, and deliver on this thread (the loop's) what was
        read and the resamplers' tails. Returns within about
        :data:`_POLL_S`; idempotent."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        for item in self._drain():
            if isinstance(item, list):
                self._deliver(item)
            elif isinstance(item, _Ahead):
                self._ahead(item)
        unhanded, self._unhanded = self._unhanded, None
        if unhanded is not None:
            self._deliver(unhanded)
        if self._convert is not None and self._routes:
            self._deliver(self._convert.flush())
            self._routes = []  # delivered once
        self._close_fd()
        for receiver in self._receivers:
            receiver.report_rest()

    # --- the reading thread ---------------------------------------------------

    def _run(self) -> None:
        fd, fmt = self._fd, self._decoder.format
        assert fd is not None
        assert fmt is not None
        limit = max(fmt.frame_bytes, fmt.frame_bytes * (fmt.rate * self.block_ms // 1000))
        end = PipeEnd(None)
        try:
            first, self._first = self._first, None
            # What the writer sent before reading began (serve loads the
            # model after the header) came early, not fast.
            held = (len(first) if first is not None else 0) + _waiting_bytes(fd) // fmt.frame_bytes
            self.pace = PaceMeter(fmt.rate, time.monotonic(), held / fmt.rate)
            if first is not None and len(first) and not self._hand_audio(first):
                return
            while not self._stopping.is_set():
                ready, _, _ = select.select([fd], [], [], _POLL_S)
                if not ready:
                    continue
                data = os.read(fd, limit)
                if not data:
                    break
                frames = self._decoder.feed(data)
                if len(frames) and not self._hand_audio(frames):
                    return
                if self._decoder.ended:
                    break
            else:
                return  # stopped: stop() delivers the rest
            assert self._convert is not None
            tails = self._convert.flush()
            end = PipeEnd(None, self._decoder.finish())
            if not self._hand(tails):
                return
        except OSError as e:
            end = PipeEnd(AudioInputError(f"cannot read {self.name}: {e.strerror or e}"))
        except Exception as e:  # a bug here must still end the stream, not hang it
            log.exception("reading %s failed", self.name)
            end = PipeEnd(AudioInputError(f"reading {self.name} failed: {e}"))
        self._hand(end)

    def _hand_audio(self, frames: Float32Array) -> bool:
        """:meth:`_hand` ``frames`` mixed, after the note that they came
        ahead of the clock if they did."""
        pace = self.pace
        assert pace is not None
        if pace.add(len(frames), time.monotonic()):
            assert pace.ahead_s is not None
            if not self._hand(_Ahead(pace.ahead_s)):
                self._unhanded = self._mixed(frames)  # read: stop() delivers it
                return False
        return self._hand(self._mixed(frames))

    def _mixed(self, frames: Float32Array) -> list[Int16Array]:
        assert self._convert is not None
        self.frames_read += len(frames)
        return self._convert.process(frames)

    def _hand(self, item: list[Int16Array] | PipeEnd | _Ahead) -> bool:
        """Queue ``item`` for the loop, waiting while the hand-off is full:
        False when asked to stop meanwhile (audio is then kept for stop()
        to deliver: it was read from the pipe)."""
        waited = False
        while True:
            try:
                self._handoff.put(item, timeout=_POLL_S)
                break
            except queue.Full:
                if not waited:
                    self.waits += 1
                    waited = True
                if self._stopping.is_set():
                    if isinstance(item, list):
                        self._unhanded = item
                    return False
        loop = self._loop
        assert loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed: stop() never came
            loop.call_soon_threadsafe(self._take)
        return True

    # --- the loop ---------------------------------------------------------------

    def _drain(self) -> list[list[Int16Array] | PipeEnd | _Ahead]:
        items: list[list[Int16Array] | PipeEnd | _Ahead] = []
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self._handoff.get_nowait())
        return items

    def _take(self) -> None:
        for item in self._drain():
            if isinstance(item, PipeEnd):
                self._routes, on_end = [], self._on_end
                self._close_fd()
                for receiver in self._receivers:
                    receiver.report_rest()
                if on_end is not None and not self._stopping.is_set():
                    on_end(item)
                return
            if isinstance(item, _Ahead):
                self._ahead(item)
            else:
                self._deliver(item)

    def _ahead(self, note: _Ahead) -> None:
        on_ahead, self._on_ahead = self._on_ahead, None  # once
        if on_ahead is not None:
            on_ahead(note.seconds)

    def _deliver(self, blocks: list[Int16Array]) -> None:
        for receive, block in zip(self._routes, blocks, strict=False):
            if len(block):
                receive(block)  # never raises: one route's failure is not the others'

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and self._owns_fd:
            with contextlib.suppress(OSError):
                os.close(fd)
