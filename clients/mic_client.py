"""Stream the local microphone (or an audio file, or a live pipe) to an
evoxtral-stream server.

    python clients/mic_client.py --url ws://127.0.0.1:8765 [--stream ID] [--device X]
    python clients/mic_client.py --file talk.wav          # a file at real-time pace
    arecord -t wav | python clients/mic_client.py --file -   # a live pipe, as it comes
    python clients/mic_client.py --file audio.fifo            # a named FIFO: live too

Pushes 16 kHz mono PCM16 to ``/v1/ingest`` (docs/protocol.md) and prints the
captions the server sends back on the same connection, as ``viewer.py``
does: finals as lines on stdout, the live partial redrawn in place
(unstable text dim) on a terminal, status lines on stderr. Ctrl-C (or the
end of the file or pipe) sends ``end``: the server flushes the open segment as a
final, sends its summary (printed on stderr) and closes. A second Ctrl-C
quits at once. A server with access tokens gets ``--token`` (default
``$EVOXTRAL_TOKEN``) as ``Authorization: Bearer``.

Reconnects: once the server has accepted the stream, a connection that is
lost (the network failed, the server restarted or went away, or refused a
reconnect because the stream was still held, the server full or shutting
down) is opened again with bounded exponential backoff under the same stream
id (the server's name for it; the one asked for when the server gave none a
URL can carry: a lone surrogate, from another server), and the audio goes on
where it stopped. The microphone keeps capturing
meanwhile: up to :data:`MAX_QUEUED_BLOCKS` blocks (10 s) wait for the new
connection, later ones are dropped and counted; a file resumes at the
position it had reached. On an open connection the client asks the server
to acknowledge the audio it has taken (``"progress": true``), and at most
:data:`MAX_IN_FLIGHT_S` (10 s) of microphone audio is on its way, queued
or sent and not yet acknowledged: past it, new blocks are dropped and
counted the same way, so a link slower than the microphone, or stalled,
delays the captions by no more than that, however much the operating
system's socket buffers take (megabytes: minutes of audio). From a server
that does not acknowledge, only the queue bounds it. Audio dropped so (or
because the connection is slower than the microphone) is declared to the
server as ``lost`` before the next audio sent, on whichever connection
sends it, so the server puts silence in its place and the later captions
keep their true times.
Captions the server made of the earlier connection's last audio go to its
subscribers, not to this client. ``--no-reconnect`` turns this off. A
refusal of the first connection (a bad token or stream id,
``stream_busy``) still ends the client at once.

``--file -`` reads standard input: a pipe carrying WAV is live, as the
microphone is (:class:`PipeFeed`): its audio goes as it comes, not paced,
within the same bounds, and its end sends ``end``. A pipe of another
format is read to its end (into a temporary file) and sent as a file, as
is a file redirected in (:func:`stdin_feed`). A named FIFO given as
``--file PATH`` (``mkfifo``) is read live the same way; a pipe named only
through ``/dev/fd`` (``<(ffmpeg ...)``) is read to its end, as a file
(:func:`path_feed`).

A file is decoded as it is sent, a block at a time (:class:`FileFeed`),
never held whole: its header and first audio are checked before
connecting, damage further in is said where it is met, and a file that
cannot be read to its end (cut short while sent) ends the audio there,
with an error line.

A file is not live and drops nothing: past :data:`MAX_IN_FLIGHT_S` of audio
sent and not acknowledged, it waits for the acknowledgements. Nor is it
ever further than that behind its real-time pace, counting as behind the
audio the server has not acknowledged (from a server that does not
acknowledge, the audio not sent): when a stall leaves it further behind,
the rest of the file goes that much later (:class:`FilePace`), so once the
link moves again about that much audio reaches the server at once, well
within the ``server.ingest_burst_s`` it takes at once (30 s by default),
not the whole stall's, which it would refuse as ``too_fast``.

Exit status: 0 after the server's summary; 1 when the server cannot be
reached, refuses the token or the stream, or closes it early (and will not
be reconnected to); 2 for a bad argument, file, pipe or audio device (or,
after the summary, a file or pipe that failed before its end); 130 after a
second Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from _auth import add_token_option, auth_headers, redact_tokens, refusal
from _loop import run_client
from _terminal import (
    closed_stderr_dropped,
    closed_stdout_dropped,
    closed_stdout_refused,
    lenient_output,
)
from _url import Role, add_url_option, endpoint, take_query, with_query
from viewer import LiveWriter, use_color
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from evoxtral_stream.audio import filereader
from evoxtral_stream.audio.filereader import FileMix, FilePass, open_audio_file, open_pipe_file
from evoxtral_stream.audio.microphone import (
    ChannelRoute,
    InputDevice,
    MicrophoneCapture,
    StreamFactory,
    list_input_devices,
    portaudio_threads_left,
)
from evoxtral_stream.audio.pipe import NotLiveAudio, PipeCapture, PipeEnd, is_live_pipe
from evoxtral_stream.audio.sources import AudioInputError, iter_chunks, rechunked
from evoxtral_stream.config import CONFIG_ENV, ConfigError, load_config
from evoxtral_stream.console import redraws
from evoxtral_stream.events import SAMPLE_RATE, Int16Array
from evoxtral_stream.server.protocol import MAX_LOST_S

__all__ = ["AudioFeed", "FileFeed", "FilePace", "LiveFeed", "MicFeed", "PipeFeed", "Progress",
           "SessionEnd", "build_parser", "main", "past_bound", "path_feed", "run",
           "should_reconnect", "stdin_feed"]

CHUNK_MS = 100
CHUNK_SAMPLES = SAMPLE_RATE * CHUNK_MS // 1000
#: Microphone blocks waiting for the socket before new ones are dropped (10 s at 20 ms).
MAX_QUEUED_BLOCKS = 500
#: Seconds of microphone audio on its way to a server that acknowledges it
#: (``ingest.progress``): queued, or sent on the connection and not yet
#: acknowledged. Past it new blocks are dropped as at a full queue (which
#: holds as much), so the socket's buffers, which take minutes of audio on a
#: stalled link, do not add to the captions' delay. A file waits instead, and
#: is never further behind its real-time pace either (:class:`FilePace`).
MAX_IN_FLIGHT_S = 10.0
#: The server acknowledges each half second of audio it takes (docs/protocol.md):
#: a bound on the audio not yet acknowledged must hold at least that much, or
#: a sender waiting for the next acknowledgement would wait for ever.
ACK_STEP_S = 0.5
#: Of a lost connection's audio sent and not acknowledged, the server may
#: have taken this much (it acknowledges a step once it has it all); the rest
#: never reached it, and the next connection sends it again (:func:`resend_from`).
ACK_STEP = -(-SAMPLE_RATE // 2)
#: What the client sends in its config message: what MicrophoneCapture and
#: a file's passes deliver, and the server's acknowledgements of the audio.
CONFIG = {"type": "config", "sample_rate": SAMPLE_RATE, "channels": 1, "format": "pcm16",
          "progress": True}

#: Close codes after which the stream is reconnected: the server went away
#: or restarted, the connection failed, or the server asked to try later.
RETRY_CLOSE_CODES = frozenset({1001, 1006, 1011, 1012, 1013, 1014})
#: Errors (before a close 1008) after which it is reconnected: the stream is
#: still held by the lost connection, the server is full or shutting down,
#: or no audio came for ``server.idle_timeout_s`` (the microphone was away).
RETRY_ERRORS = frozenset({"stream_busy", "too_many_streams", "shutting_down", "idle_timeout"})
#: Reconnect backoff: the first wait and the longest, in seconds.
BACKOFF_S = (0.5, 10.0)

Status = Callable[[str], None]


@dataclass(frozen=True)
class SessionEnd:
    """How one connection ended."""

    stream: str | None
    """The stream id the server confirmed (``ingest.ready``); None if refused."""
    close_code: int | None
    error: str | None
    """The code of the last ``error`` event, if any."""
    summary: bool
    """The server sent its summary and closed normally: the stream is done."""


class Progress:
    """What the server has acknowledged of one connection's audio: the frames
    of the last ``ingest.progress``, set by the session as they come
    (:meth:`acknowledge`)."""

    def __init__(self) -> None:
        self.frames = 0
        self._moved = asyncio.Event()

    def acknowledge(self, frames: int) -> None:
        self.frames = frames
        self._moved.set()

    async def reach(self, frames: int) -> None:
        """Return once at least ``frames`` are acknowledged."""
        while self.frames < frames:
            self._moved.clear()
            await self._moved.wait()


def past_bound(on_its_way: int, bound_s: float) -> int:
    """Samples of ``on_its_way`` past ``bound_s`` seconds of audio (0: within
    it; pure). With ``on_its_way`` a connection's audio not yet acknowledged
    (queued for it, sent on it, or about to be): how much more the server
    must acknowledge before it may all be on its way."""
    return max(0, on_its_way - round(bound_s * SAMPLE_RATE))


def resend_from(acknowledged: int) -> int:
    """Where a lost connection's audio is sent again from (pure): past the
    ``acknowledged`` frames, the server may have taken up to one
    acknowledgement step more before the loss, which it would otherwise get
    twice; what was sent past that never reached it (on a link that stalled
    before it broke, up to :data:`MAX_IN_FLIGHT_S` of audio)."""
    return acknowledged + ACK_STEP


def should_reconnect(end: SessionEnd) -> bool:
    """Whether a connection that ended so is worth opening again (pure)."""
    if end.summary:
        return False
    if end.close_code in (1008, 1009):  # refused: only a passing reason is retried
        return end.error in RETRY_ERRORS
    return end.close_code is None or end.close_code in RETRY_CLOSE_CODES


class AudioFeed(Protocol):
    """Audio to stream: ``start`` before connecting (it may raise
    AudioInputError), ``send`` until the audio ends or ``stop`` is set,
    ``close`` in any case."""

    def start(self, status: Status) -> None: ...
    async def send(self, ws: ClientConnection, stop: asyncio.Event,
                   progress: Progress | None = None) -> None:
        """Send audio until it ends or ``stop`` is set. Called again on a new
        connection after a lost one, it goes on where the last one stopped
        (see :meth:`rewind`). ``progress``: the server's acknowledgements on
        this connection (None: it sends none)."""
    def rewind(self, progress: Progress) -> None:
        """The connection whose acknowledgements are ``progress`` ended before
        its summary: the next :meth:`send` starts with its audio from
        :func:`resend_from` on, which did not reach the server."""
    def close(self) -> None: ...


class FilePace:
    """When a file's audio may be sent: real-time pace, never further behind
    it than ``max_behind_s`` (pure: the caller reads the clock).

    Each connection's audio is due at real-time pace from where it starts
    (:meth:`start`). When a stall (or a link slower than real time) leaves
    the audio further behind that schedule than ``max_behind_s``, the
    schedule moves later by the difference (added up in :attr:`delayed`):
    the rest of the file goes that much later, and what reaches the server
    at once afterwards is about ``max_behind_s`` of audio, not the whole
    stall's, which the server would refuse as too fast. Behind counts from
    the audio the server has acknowledged where it acknowledges, so the
    audio held up in the sockets counts too (and the half second the
    acknowledgements trail by: a bound near :data:`ACK_STEP_S` slows the
    pace); else from the audio sent. There, too, at most ``max_behind_s`` of
    audio is sent and not acknowledged (:meth:`acknowledged_before`).
    ``max_behind_s`` is at least :data:`ACK_STEP_S`.
    """

    def __init__(self, max_behind_s: float = MAX_IN_FLIGHT_S) -> None:
        if max_behind_s < ACK_STEP_S:
            raise ValueError(f"max_behind_s must be at least {ACK_STEP_S} s (the server "
                             f"acknowledges every {ACK_STEP_S} s of audio), got {max_behind_s}")
        self.max_behind_s = max_behind_s
        self.delayed = 0.0
        """Seconds the schedule has moved later, over every connection."""
        self._origin = 0.0
        """When the file's first sample is due on the current schedule."""

    def start(self, position: int, now: float) -> None:
        """A new connection: the file's audio from sample ``position`` is due from ``now``."""
        self._origin = now - position / SAMPLE_RATE

    def wait_s(self, position: int, now: float, unacknowledged: int = 0) -> float:
        """Seconds from ``now`` until the audio from sample ``position`` is due
        (0: it is). ``unacknowledged``: the samples before ``position`` sent
        and not acknowledged (0 from a server that does not acknowledge). A
        schedule more than ``max_behind_s`` ahead of the audio so taken moves
        later to be that much ahead."""
        behind = now - self._origin - (position - unacknowledged) / SAMPLE_RATE
        if behind > self.max_behind_s:
            self._origin += behind - self.max_behind_s
            self.delayed += behind - self.max_behind_s
        return max(0.0, self._origin + position / SAMPLE_RATE - now)

    def acknowledged_before(self, sent: int, samples: int) -> int:
        """The frames the server must have acknowledged of a connection's
        audio, ``sent`` samples so far, before ``samples`` more are sent on it."""
        return past_bound(sent + samples, self.max_behind_s)


class FileFeed:
    """A file's audio (16 kHz mono int16) sent in 100 ms messages at
    real-time pace, as :class:`FilePace` allows: after a stall it waits (for
    the server's acknowledgements, or for the socket) and goes on later,
    never dropping audio. ``max_behind_s``: see :class:`FilePace`.

    ``audio``: the samples, or one output of a probed file
    (:class:`FileMix`, which the feed closes), decoded as it is sent, a
    block at a time (:meth:`AudioFile.blocks`): never held whole. The feed
    holds a block, and the audio sent on the connection and not yet
    acknowledged (:attr:`held`, within ``max_behind_s`` and a chunk: what
    :meth:`rewind` sends again). What the file reader warns of while it
    decodes (damage where the pass meets it) goes to the status. A file
    that cannot be read to its end (cut short while read, a disk error)
    ends its audio there, as its end does, saying why, and :attr:`failed`
    says it."""

    def __init__(self, audio: Int16Array | FileMix, max_behind_s: float = MAX_IN_FLIGHT_S
                 ) -> None:
        self.pace = FilePace(max_behind_s)
        self.sent = 0
        """Samples sent so far, over every connection (less those sent again)."""
        self.resent = 0
        """Samples sent again after a lost connection (:meth:`rewind`)."""
        self.failed: AudioInputError | None = None
        """Why the file could not be read to its end, once met; None while not."""
        self._base = 0   # self.sent when the current connection began
        self._status: Status = lambda _: None
        self._delay_reported = 0.0
        self._pass: FilePass | None = None  # a file's (its audio closed with it)
        self._chunks: Iterator[Int16Array]
        self.seconds: float | None
        """The audio's length: a file's as its header says (None: it does not)."""
        if isinstance(audio, FileMix):
            self._pass = audio.audio.blocks([audio.mix])
            self._chunks = (c[0] for c in rechunked(self._pass, 1, CHUNK_SAMPLES))
            self.seconds = None if audio.samples is None else audio.samples / SAMPLE_RATE
        else:
            self._chunks = iter_chunks(audio, CHUNK_SAMPLES)
            self.seconds = len(audio) / SAMPLE_RATE
        self._ended = False  # the chunks have run out
        self._failure_said = False
        # Taken from the file and not yet sent, from sample self.sent on: a
        # chunk whose send a lost connection cut, or what a rewind sends
        # again. Bounded as _kept is: a rewind moves _kept here.
        self._ahead: deque[Int16Array] = deque()
        # Sent on this connection and not known to be acknowledged, from
        # sample _kept_from up to self.sent: what a rewind may send again.
        # Kept only where the server acknowledges (a rewind needs it), and
        # let go of as it does; the pace holds it within max_behind_s (and
        # the chunk acknowledged part way), so it never overflows.
        self._kept: deque[Int16Array] = deque()
        self._kept_from = 0

    @property
    def held(self) -> int:
        """Samples held to send again, or taken from the file and not sent."""
        return sum(len(c) for c in self._kept) + sum(len(c) for c in self._ahead)

    def start(self, status: Status) -> None:
        self._status = status
        if self.seconds is None:
            status("streaming audio of a length its header does not say at real-time pace")
        else:
            status(f"streaming {self.seconds:.1f} s of audio at real-time pace")
        # The file is opened now (a pass opens it at its first block), before
        # connecting: one that is gone since its probe is an error here.
        if self._next_chunk() is None and self.failed is not None:
            self._failure_said = True  # run() says it, as any error before connecting
            raise self.failed

    def _next_chunk(self) -> Int16Array | None:
        """The chunk to send next (at the head of _ahead until it is sent);
        None once the audio has ended."""
        if not self._ahead:
            if self._ended:
                return None
            # Decoded on the event loop, not in a thread: the pass points
            # descriptor 2 elsewhere while it decodes a block, which would
            # catch the status lines written meanwhile.
            with _reader_says(self._status):
                chunk = next(self._chunks, None)
            if chunk is None:
                self._ended = True
                if self._pass is not None and self._pass.error is not None:
                    self.failed = AudioInputError(self._pass.error)
                return None
            self._ahead.append(chunk)
        return self._ahead[0]

    async def send(self, ws: ClientConnection, stop: asyncio.Event,
                   progress: Progress | None = None) -> None:
        self.pace.start(self.sent, time.monotonic())
        self._base = self._kept_from = self.sent
        self._kept.clear()
        sent_here = 0  # on this connection, as the server counts its acknowledgements
        try:
            while (chunk := self._next_chunk()) is not None:
                unacknowledged = 0
                if progress is not None:
                    # Waits where the microphone drops: a file loses nothing by waiting.
                    needed = self.pace.acknowledged_before(sent_here, len(chunk))
                    if progress.frames < needed and not await _unless_stopped(
                            progress.reach(needed), stop):
                        return
                    unacknowledged = sent_here - progress.frames
                wait = self.pace.wait_s(self.sent, time.monotonic(), unacknowledged)
                if stop.is_set() or (wait > 0 and not await _unless_stopped(
                        asyncio.sleep(wait), stop)):
                    return
                await ws.send(chunk.astype("<i2").tobytes())
                self._ahead.popleft()  # only once sent: a cut send goes on the next connection
                self.sent += len(chunk)
                sent_here += len(chunk)
                if progress is not None:
                    self._keep(chunk, self._base + progress.frames)
        finally:
            self._report_delay()
        if self.failed is not None and not self._failure_said:
            self._failure_said = True
            self._status(f"error: {self.failed}; the captions of the audio before are finished")

    def _keep(self, chunk: Int16Array, acknowledged: int) -> None:
        """Keep ``chunk``, just sent, to send again; let go of the chunks
        wholly before sample ``acknowledged``."""
        self._kept.append(chunk)
        while self._kept and self._kept_from + len(self._kept[0]) <= acknowledged:
            self._kept_from += len(self._kept.popleft())

    def rewind(self, progress: Progress) -> None:
        start = self._base + resend_from(progress.frames)
        # What was sent from start on goes again, before any chunk taken and
        # not sent. _kept reaches back to the last acknowledgement it saw,
        # before start.
        again: list[Int16Array] = []
        at = self._kept_from
        for chunk in self._kept:
            if at + len(chunk) > start:
                again.append(chunk[max(0, start - at):])
            at += len(chunk)
        self._kept.clear()
        samples = sum(len(c) for c in again)
        self._ahead.extendleft(reversed(again))
        self.sent -= samples
        self._kept_from = self.sent
        if samples:
            self.resent += samples
            self._status(f"{samples / SAMPLE_RATE:.1f} s of audio the server did not "
                         "acknowledge before the connection was lost goes again")

    def close(self) -> None:
        """Let go of the file (its pass, a pipe's copy)."""
        if self._pass is not None:
            self._pass.close()
            self._pass.audio.close()

    def _report_delay(self) -> None:
        if self.pace.delayed - self._delay_reported >= 0.1:
            self._status(f"the connection stalled or was too slow: the rest of the file goes "
                         f"{self.pace.delayed:.1f} s later than real-time pace")
            self._delay_reported = self.pace.delayed


class _StatusLines(logging.Handler):
    """The file reader's warnings as status lines (see :func:`_reader_says`)."""

    def __init__(self, status: Status) -> None:
        super().__init__(logging.WARNING)
        self._status = status

    def emit(self, record: logging.LogRecord) -> None:
        # A failure is FilePass.error too, which the feed says with what it
        # means for the stream.
        if record.levelno < logging.ERROR:
            self._status(record.getMessage())


@contextlib.contextmanager
def _reader_says(status: Status) -> Iterator[None]:
    """What the file reader logs during the ``with`` block (a pass meeting
    damage) goes to ``status``: mid-stream, a line written past the writer
    would land inside the partial it draws. Its presence also keeps
    logging's last-resort handler from writing it so."""
    handler = _StatusLines(status)
    reader = logging.getLogger(filereader.__name__)
    reader.addHandler(handler)
    try:
        yield
    finally:
        reader.removeHandler(handler)


async def _unless_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Await ``work`` unless ``stop`` is set first (which cancels it); whether
    it was not."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        stopping.cancel()
    return not stop.is_set()


class LiveFeed:
    """Live audio (16 kHz mono int16 blocks on the event loop, from
    :class:`MicFeed`'s microphone or :class:`PipeFeed`'s pipe), sent as it
    comes.

    Blocks arrive on the event loop and wait in a queue of
    :data:`MAX_QUEUED_BLOCKS` for the socket (or for the next connection
    after a lost one); when it is full, new blocks are dropped and counted.
    A block whose send failed is sent first on the next connection. On a
    connection whose server acknowledges the audio (``progress``), a block
    that would take the audio on its way (queued, or sent on it and not
    acknowledged) past :data:`MAX_IN_FLIGHT_S` is dropped and counted too.

    Dropped samples keep their place: each queued block carries the samples
    dropped just before it, and :meth:`send` declares them (a ``lost``
    message) right before the block, once. Blocks sent on a connection whose
    server acknowledges the audio are kept until acknowledged: after a lost
    connection, those past :func:`resend_from` go first on the next one
    (:meth:`rewind`), ahead of what was captured meanwhile; all of it
    together is at most :data:`MAX_IN_FLIGHT_S` of audio. Samples dropped
    after the last block are declared before ``end``. Samples dropped before a connection's
    first block are not: they lie between its stream and the one before
    (each connection's stream has a timeline of its own, from its first
    audio). A connection takes at most
    :data:`~evoxtral_stream.server.protocol.MAX_LOST_S` of lost audio at
    once and then no more than real time (the server refuses more, as too
    fast): past that, lost samples are not declared but counted in
    :attr:`undeclared` and reported.

    :meth:`send` returns once ``stop`` is set, or the audio has ended
    (:meth:`_audio_ended`: a pipe's end), with what was queued sent.
    Subclasses start their capture in :meth:`start` and stop it in
    :meth:`_stop_capture`.
    """

    def __init__(self) -> None:
        # Each block with the samples dropped just before it.
        self.queue: asyncio.Queue[tuple[int, Int16Array]] = asyncio.Queue(MAX_QUEUED_BLOCKS)
        self._unsent: tuple[int, Int16Array] | None = None
        # Blocks to send before the queue's: those of a lost connection that
        # did not reach the server (rewind), oldest first.
        self._resend: deque[tuple[int, Int16Array]] = deque()
        # Blocks sent on this connection and not acknowledged, each with the
        # samples sent on it up to its end and the lost samples declared
        # right before it.
        self._in_flight: deque[tuple[int, Int16Array, int]] = deque()
        self._waiting = 0
        """Samples of the queued blocks, the unsent one and those to resend."""
        self.resent = 0
        """Samples sent again after a lost connection (:meth:`rewind`)."""
        # The current connection's acknowledgements (None: none, or no
        # connection) and the samples sent on it.
        self._progress: Progress | None = None
        self._sent_here = 0
        self._lost = 0
        """Samples dropped since the last block queued."""
        self.dropped = 0
        self.declared = 0
        """Samples declared lost to the server, over every connection."""
        self.undeclared = 0
        """Samples dropped past what a connection takes as lost (see the class doc)."""
        # What the current connection still takes as lost (samples), and when
        # that was worked out: it refills at real time up to MAX_LOST_S, as
        # the server's allowance does (at max_ingest_speed, at least that).
        self._allowance = 0.0
        self._allowance_at = 0.0
        self._undeclared_reported = 0
        self._sent_audio = False
        """The current connection has sent audio: its stream's timeline has begun."""
        self._ended: asyncio.Event | None = None
        """Set (on the loop) once the audio has ended; None: it never ends."""
        self._status: Status = lambda _: None

    def start(self, status: Status) -> None:
        raise NotImplementedError

    def _stop_capture(self) -> None:
        """Stop capturing; what the capture holds is delivered first."""
        raise NotImplementedError

    def _audio_ended(self) -> None:
        """The audio has ended (on the loop): :meth:`send` sends what is
        queued and returns."""
        if self._ended is None:
            self._ended = asyncio.Event()
        self._ended.set()

    def _on_audio(self, block: Int16Array) -> None:
        progress = self._progress
        # On its way: waiting, or sent on this connection and not acknowledged.
        unacknowledged = self._sent_here - progress.frames if progress is not None else 0
        too_much = past_bound(self._waiting + unacknowledged + len(block), MAX_IN_FLIGHT_S) > 0
        if too_much or self.queue.full():
            self.dropped += 1
            self._lost += len(block)
        else:
            self.queue.put_nowait((self._lost, block))
            self._lost = 0
            self._waiting += len(block)

    async def send(self, ws: ClientConnection, stop: asyncio.Event,
                   progress: Progress | None = None) -> None:
        self._report_drops()
        self._allowance, self._allowance_at = MAX_LOST_S * SAMPLE_RATE, time.monotonic()
        self._sent_audio = False
        self._progress, self._sent_here = progress, 0  # the server counts from 0 too
        self._in_flight.clear()
        if self._resend:
            self._status(f"sending again {sum(len(b) for _, b in self._resend) / SAMPLE_RATE:.1f}"
                         " s of audio that did not reach the server before the connection "
                         "was lost")
        # Stopped, or the audio ended: what is queued then is sent below.
        stopping = {asyncio.ensure_future(stop.wait())}
        if self._ended is not None:
            stopping.add(asyncio.ensure_future(self._ended.wait()))
        try:
            while True:
                if self._unsent is None and self._resend:
                    self._unsent = self._resend.popleft()
                if self._unsent is None:
                    block = asyncio.ensure_future(self.queue.get())
                    try:
                        await asyncio.wait({block, *stopping},
                                           return_when=asyncio.FIRST_COMPLETED)
                    except asyncio.CancelledError:
                        # The connection ended: a block already taken goes to
                        # the next one, and no get() is left to take another.
                        if block.done() and not block.cancelled():
                            self._unsent = block.result()
                        else:
                            block.cancel()
                        raise
                    if not block.done():
                        block.cancel()
                        break
                    self._unsent = block.result()
                await self._send_unsent(ws)
        except BaseException:
            self._progress = None  # the connection is lost, and its audio on the way
            raise
        finally:
            for waiter in stopping:
                waiter.cancel()
        self.close()  # the capture delivers what it holds: send that too
        while self._unsent is not None or self._resend or not self.queue.empty():
            if self._unsent is None:
                self._unsent = (self._resend.popleft() if self._resend
                                else self.queue.get_nowait())
            await self._send_unsent(ws)
        if self._lost and self._sent_audio:  # dropped after the last block
            await self._declare(ws, self._lost)
        self._lost = 0
        self._report_drops()

    async def _send_unsent(self, ws: ClientConnection) -> None:
        assert self._unsent is not None
        lost, block = self._unsent
        declared = 0
        if lost:
            if self._sent_audio:
                declared = await self._declare(ws, lost)
            # Declared (or before this stream began): if the block's send fails,
            # it starts the next connection's stream, with nothing before it.
            self._unsent = (0, block)
        await ws.send(block.astype("<i2").tobytes())
        self._unsent = None  # only once sent: a failed send keeps it for the next connection
        self._sent_audio = True
        self._waiting -= len(block)
        self._sent_here += len(block)
        if self._progress is not None:
            self._in_flight.append((self._sent_here, block, declared))
            while self._in_flight and self._in_flight[0][0] <= self._progress.frames:
                self._in_flight.popleft()

    def rewind(self, progress: Progress) -> None:
        start = resend_from(progress.frames)
        again: list[tuple[int, Int16Array]] = []
        for end, block, declared in self._in_flight:
            if end > start:
                # The lost audio declared before each block but the first goes
                # again before it: the server took none of the audio around
                # it, so neither that declaration (the first's it may have).
                again.append((declared if again else 0,
                              block[max(0, start - (end - len(block))):]))
        self._in_flight.clear()
        samples = sum(len(b) for _, b in again)
        self._waiting += samples
        self.resent += samples
        # Sent before the block whose send failed and before any left to resend.
        if self._unsent is not None:
            again.append(self._unsent)
            self._unsent = None
        self._resend.extendleft(reversed(again))

    async def _declare(self, ws: ClientConnection, samples: int) -> int:
        """Tell the server ``samples`` were lost here, as far as it takes them;
        the samples declared."""
        now = time.monotonic()
        self._allowance = min(MAX_LOST_S * SAMPLE_RATE,
                              self._allowance + (now - self._allowance_at) * SAMPLE_RATE)
        self._allowance_at = now
        n = min(samples, int(self._allowance))
        if n:
            await ws.send(json.dumps({"type": "lost", "samples": n}))
            self._allowance -= n
            self.declared += n
        self.undeclared += samples - n
        return n

    def close(self) -> None:
        self._stop_capture()
        self._report_drops()

    def _report_drops(self) -> None:
        if self.dropped:
            self._status(f"dropped {self.dropped} audio blocks: the connection was too slow "
                         "or away (their time is sent as lost audio)")
            self.dropped = 0
        if self.undeclared > self._undeclared_reported:
            self._status(f"{(self.undeclared - self._undeclared_reported) / SAMPLE_RATE:.1f} s "
                         f"of lost audio were more than the server takes at once "
                         f"({MAX_LOST_S} s): the captions after them come that much early")
            self._undeclared_reported = self.undeclared


class MicFeed(LiveFeed):
    """The microphone through :class:`MicrophoneCapture`, sent as
    :class:`LiveFeed` says; it never ends of itself. ``stream_factory``
    replaces PortAudio (tests)."""

    def __init__(self, device: str | int | InputDevice | None = None, *,
                 channels: tuple[int, ...] = (),
                 stream_factory: StreamFactory | None = None) -> None:
        """``channels``: the device's channels to send, mixed (1-based; ():
        the first two)."""
        super().__init__()
        cfg = load_config().audio
        self.capture = MicrophoneCapture(
            [ChannelRoute(self._on_audio, channels)],
            device=cfg.device if device is None else device,
            block_ms=cfg.block_ms, max_pending_blocks=cfg.max_pending_blocks,
            stream_factory=stream_factory, stall_timeout_s=cfg.stall_timeout_s,
            reopen_interval_s=cfg.reopen_interval_s,
            on_stall=lambda message: self._status(message),
            on_resume=lambda message: self._status(message), channels_from="--channels")

    def start(self, status: Status) -> None:
        self._status = status
        self.capture.start()
        name = self.capture.device.name if self.capture.device else "?"
        status(f"listening on {name!r} ({self.capture.samplerate} Hz); Ctrl-C to finish")

    def _stop_capture(self) -> None:
        self.capture.stop()


class PipeFeed(LiveFeed):
    """A live pipe carrying WAV (``--file -``: standard input) through
    :class:`PipeCapture`, its header already read (:func:`stdin_feed`), sent
    as :class:`LiveFeed` says: each piece as it is read, not paced (a live
    writer paces itself). The pipe's end ends the audio: :meth:`send`
    returns, and ``end`` follows. A pipe that cannot be read any more ends
    it too, and :attr:`failed` says why."""

    def __init__(self, capture: PipeCapture) -> None:
        if capture.format is None:
            raise ValueError("the pipe's header must be read first (read_header)")
        super().__init__()
        self.capture = capture
        self.failed: AudioInputError | None = None
        """Why reading the pipe failed, once it has; None while it has not."""

    def start(self, status: Status) -> None:
        self._status = status
        self._ended = asyncio.Event()
        self.capture.start(asyncio.get_running_loop(),
                           [ChannelRoute(self._on_audio, m) for m in self.capture.mixes],
                           self._on_end)
        fmt = self.capture.format
        assert fmt is not None
        status(f"{self.capture.name}: WAV, {fmt.rate} Hz, {fmt.channels} channel(s), "
               f"{fmt.encoding.value}, sent as it comes; its end or Ctrl-C finishes")

    def _on_end(self, end: PipeEnd) -> None:
        name, fmt = self.capture.name, self.capture.format
        if end.error is not None:
            self.failed = end.error
            self._status(f"error: {end.error}; the captions of the audio before are finished")
        else:
            seconds = self.capture.frames_read / fmt.rate if fmt is not None else 0.0
            cut = (f" (its last {end.unfinished_bytes} byte(s), a frame cut short, are "
                   "dropped)") if end.unfinished_bytes else ""
            self._status(f"{name} ended after {seconds:.1f} s of audio{cut}")
        self._audio_ended()

    def _stop_capture(self) -> None:
        self.capture.stop()


#: Standard input as a path (libsndfile reads a file redirected in through it).
STDIN_PATH = Path("/dev/stdin")


def stdin_feed(channels: tuple[int, ...], status: Status, fd: int = 0) -> AudioFeed:
    """``--file -``: standard input (``fd``) as a feed, waiting for its first
    bytes. A pipe (or socket) carrying WAV is read live (:class:`PipeFeed`);
    one carrying another format is read to its end and sent as a file
    (:class:`FileFeed`, saying so on ``status``), as is a file redirected in.
    ``channels``: those to send, mixed (1-based; (): all of them). Raises
    :class:`AudioInputError`: a terminal, a pipe that is no audio, or
    lacks those channels."""
    try:
        if os.isatty(fd):
            raise AudioInputError("--file - reads standard input, which is a terminal: pipe "
                                  "audio into it (arecord -t wav | mic_client.py --file -)")
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise AudioInputError(f"cannot read standard input: {e.strerror or e}") from None
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        path = STDIN_PATH if fd == 0 else Path(f"/dev/fd/{fd}")
        return FileFeed(FileMix(open_audio_file(path, [channels], "--channels"), 0))
    cfg = load_config().audio
    return _pipe_feed(PipeCapture(STDIN_PATH, block_ms=cfg.block_ms,
                                  max_pending_blocks=cfg.max_pending_blocks, mixes=[channels],
                                  channels_from="--channels", name="standard input", fd=fd),
                      status)


def path_feed(path: Path, channels: tuple[int, ...], status: Status) -> AudioFeed:
    """``--file PATH``: a FIFO with a name in the file system (``mkfifo``)
    carrying WAV is read live, as :func:`stdin_feed` reads a pipe and as
    ``serve --source PATH`` reads one: opening it waits for its writer.
    Anything else is sent as a file (:class:`FileFeed`, decoded as it is
    sent): a pipe named only through ``/dev/fd`` (``--file <(ffmpeg -i
    talk.mp4 -f wav -)``) too, read to its end first, the way to play what
    a converter writes far faster than real time. Raises
    :class:`AudioInputError`: a socket's path (read as standard input), a
    pipe or file that is no audio, or lacks those channels."""
    real = _named_live_pipe(path)
    if real is not None:
        if stat.S_ISSOCK(real):
            # open() cannot connect to it (ENXIO), as serve says too.
            raise AudioInputError(f"{path} is a socket, read only as standard input: "
                                  f"`socat UNIX-CONNECT:{path} - | mic_client.py --file -`")
        cfg = load_config().audio
        return _pipe_feed(PipeCapture(path, block_ms=cfg.block_ms,
                                      max_pending_blocks=cfg.max_pending_blocks,
                                      mixes=[channels], channels_from="--channels"), status)
    return FileFeed(FileMix(open_audio_file(path, [channels], "--channels"), 0))


def _named_live_pipe(path: Path) -> int | None:
    """The mode of ``path`` when it is a FIFO or a socket under its own name
    in the file system (serve's :func:`is_live_pipe`), else None: so for a
    pipe without one that ``/dev/fd`` names (``<(...)``: on Linux its link
    leads to no file, ``pipe:[N]``)."""
    try:
        real = path.resolve(strict=True)
        if real.parent == Path("/dev/fd") or not is_live_pipe(real):
            return None
        return real.stat().st_mode
    except (OSError, RuntimeError):  # no such file, a loop of links
        return None


def _pipe_feed(capture: PipeCapture, status: Status) -> AudioFeed:
    """``capture``'s pipe as a feed once its header is read: live
    (:class:`PipeFeed`), or of another format read to its end and sent as a
    file (:class:`FileFeed`, saying so on ``status``)."""
    try:
        capture.read_header()
    except NotLiveAudio as e:
        # FLAC, OGG, ...: libsndfile reads them only whole (it seeks).
        status(f"{capture.name} carries no WAV that is read live: it is read to its end, "
               "then sent at real-time pace as a file (for live captions, pipe PCM WAV: "
               "`ffmpeg ... -f wav -`)")
        assert capture.fd is not None
        try:
            return FileFeed(FileMix(open_pipe_file(capture.path, e.head, capture.fd,
                                                   [capture.mixes[0]], "--channels"), 0))
        finally:
            capture.stop()  # closes a FIFO it opened; standard input stays open
    return PipeFeed(capture)


async def _session(ws: ClientConnection, feed: AudioFeed, stop: asyncio.Event,
                   writer: LiveWriter, language: str | None,
                   on_ready: Callable[[str], None]) -> SessionEnd:
    """One connection: config, audio and captions until the server closes it."""
    config = CONFIG if language is None else {**CONFIG, "language": language}
    stream: str | None = None
    error: str | None = None
    summary: dict[str, Any] | None = None
    progress: Progress | None = None

    def show(event: dict[str, Any]) -> None:
        nonlocal error, summary
        if event.get("type") == "error":
            error = str(event.get("code"))
        elif event.get("type") == "ingest.summary":
            summary = event
        writer.show(event)

    async def feed_then_end() -> None:
        await feed.send(ws, stop, progress)
        await ws.send(json.dumps({"type": "end"}))

    async def receive() -> None:
        async for raw in ws:
            try:
                event = json.loads(raw)
            except (ValueError, RecursionError):  # nested too deep for Python
                writer.status(f"! not JSON: {raw!r:.80}")
                continue
            if isinstance(event, dict):
                if event.get("type") == "ingest.progress" and progress is not None \
                        and isinstance(frames := event.get("frames"), int):
                    progress.acknowledge(frames)
                show(event)

    with contextlib.suppress(ConnectionClosed):  # the close code tells what happened
        with contextlib.suppress(ConnectionClosed):  # refused at once: read why below
            await ws.send(json.dumps(config))
        raw_ready = await asyncio.wait_for(ws.recv(), 15)
        try:
            ready = json.loads(raw_ready)
        except (ValueError, RecursionError):  # nested too deep for Python
            ready = None
        if not isinstance(ready, dict):
            # Not this protocol (a proxy's page, another server): say so, and
            # let the close code tell whether to retry, as for a refusal.
            writer.status(f"! the server answered the config with {raw_ready!r:.80}, "
                          "not a protocol message")
            error = "not_protocol"
            await asyncio.wait_for(ws.close(1002, "not a protocol message"), 10)
        elif ready.get("type") != "ingest.ready":
            show(ready)
            # Refused: the close that follows the error tells whether to retry.
            await asyncio.wait_for(ws.wait_closed(), 10)
        else:
            show(ready)
            stream = ready["stream"] if isinstance(ready.get("stream"), str) else ""
            # An older server leaves "progress" out and sends no acknowledgements.
            progress = Progress() if ready.get("progress") is True else None
            on_ready(stream)
            feeder = asyncio.ensure_future(feed_then_end())
            receiver = asyncio.ensure_future(receive())
            try:
                pending: set[asyncio.Future[None]] = {feeder, receiver}
                while not receiver.done():
                    _, pending = await asyncio.wait(pending,
                                                    return_when=asyncio.FIRST_COMPLETED)
                    if feeder.done() and not feeder.cancelled():
                        exc = feeder.exception()
                        if exc is not None and not isinstance(exc, ConnectionClosed):
                            raise exc
                receiver.result()
            finally:
                for task in (feeder, receiver):
                    task.cancel()
                await asyncio.gather(feeder, receiver, return_exceptions=True)
    done = summary is not None and ws.close_code == 1000
    if progress is not None and not done:
        feed.rewind(progress)
    writer.clear()
    return SessionEnd(stream, ws.close_code, error, done)


def _nameable(stream: str) -> bool:
    """Whether a URL can carry ``stream`` (percent-encoded UTF-8: no lone surrogate)."""
    try:
        stream.encode()
    except UnicodeEncodeError:
        return False
    return True


def _ingest_url(url: str, stream: str | None) -> str:
    # The other parameters of url's query (token among them) are kept.
    return with_query(endpoint(url, "/v1/ingest"), [("stream", stream)] if stream else [],
                      query_of=url)


async def run(url: str, stream: str | None, feed: AudioFeed, writer: LiveWriter, *,
              stop: asyncio.Event | None = None, token: str | None = None,
              language: str | None = None, reconnect: bool = True,
              backoff_s: tuple[float, float] = BACKOFF_S) -> int:
    """Stream ``feed`` to the server at ``url`` as ``stream`` (None: the server
    names it) and show what comes back; the exit status (see the module doc).
    ``token`` is sent as ``Authorization: Bearer`` (None: no token).

    Setting ``stop`` (or Ctrl-C, once) ends the audio: the server then sends
    the last finals and its summary. With ``reconnect``, a lost connection is
    opened again (``backoff_s``: the first and the longest wait) once the
    server has accepted the stream. Raises AudioInputError when the feed
    cannot start.
    """
    loop = asyncio.get_running_loop()
    stop = stop if stop is not None else asyncio.Event()
    task = asyncio.current_task()

    def interrupt() -> None:
        if stop.is_set() and task is not None:
            task.cancel()  # second Ctrl-C: quit now
        else:
            writer.status("finishing: waiting for the last captions (Ctrl-C again to quit)")
            stop.set()

    confirmed: str | None = None  # the stream id, once the server has accepted it
    rejoin = stream  # the id a reconnect asks for
    lost_at: float | None = None
    wait = backoff_s[0]

    def on_ready(stream_id: str) -> None:
        nonlocal confirmed, rejoin, lost_at, wait
        if lost_at is not None:
            writer.status(f"reconnected as {stream_id} after "
                          f"{time.monotonic() - lost_at:.1f} s")
        confirmed, lost_at, wait = stream_id, None, backoff_s[0]
        # The server's name for the stream, unless no URL can carry it (one
        # holding a lone surrogate, from JSON, or none): then the id asked for.
        if stream_id and _nameable(stream_id):
            rejoin = stream_id

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        feed.start(writer.status)
        while True:
            target = _ingest_url(url, rejoin)
            try:
                async with connect(target, open_timeout=10, max_size=2**24,
                                   additional_headers=auth_headers(token)) as ws:
                    end = await _session(ws, feed, stop, writer, language, on_ready)
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as e:
                refused = refusal(e, token)
                if confirmed is None or not reconnect or refused or isinstance(e, InvalidURI):
                    writer.status(refused or redact_tokens(
                        f"cannot stream to {target}: {e} (is the server running?)"))
                    return 1
                why = redact_tokens(f"cannot reconnect: {e}")
            else:
                if end.summary:
                    return 0
                if confirmed is None or not reconnect or not should_reconnect(end):
                    if end.stream is not None or end.error is None:  # else the error said why
                        writer.status(f"the server closed the stream early (close code "
                                      f"{end.close_code})")
                    return 1
                why = f"connection lost (close code {end.close_code})"
            if stop.is_set():
                writer.status(f"{why}; stopped while disconnected: the audio since then "
                              "was not sent")
                return 1
            if lost_at is None:
                lost_at = time.monotonic()
            writer.status(f"{why}; reconnecting in {wait:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            wait = min(wait * 2, backoff_s[1])
    except asyncio.CancelledError:
        writer.clear()
        return 130
    finally:
        feed.close()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)


def channel_list(text: str) -> tuple[int, ...]:
    """``--channels``: "3" or "1,2": distinct channel numbers from 1."""
    try:
        channels = tuple(int(part) for part in text.split(","))
    except ValueError:
        channels = ()
    if not channels or min(channels) < 1 or len(set(channels)) != len(channels):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of distinct channel numbers from 1, such as 3 or 1,2")
    return channels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mic_client.py",
        description="Stream the microphone (or a file, or a live pipe) to an evoxtral-stream "
                    "server and show the captions.")
    add_url_option(p, "ws://127.0.0.1:8765", Role.INGEST)
    p.add_argument("--stream", metavar="ID",
                   help="stream id (default: the server names it ingest-N)")
    p.add_argument("--language", metavar="CODE",
                   help="the language spoken, e.g. fr (default: the server's model.language)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--device", metavar="X",
                     help="input device: index or part of its name (default: audio.device "
                          "in config.toml, else the system default)")
    src.add_argument("--file", metavar="PATH",
                     help="stream this audio file at real-time pace instead of the microphone; "
                          "- reads standard input: a pipe carrying WAV is sent live, as it "
                          "comes (arecord -t wav | mic_client.py --file -), as is a named "
                          "FIFO's (mkfifo)")
    src.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    p.add_argument("--channels", type=channel_list, default=(), metavar="N[,N...]",
                   help="the channels to send, mixed, numbered from 1 (default: a device's "
                        "first two, a file's all); e.g. 3 for one microphone of an audio "
                        "interface")
    p.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                   help="ANSI colours (default: on a terminal unless NO_COLOR is set)")
    p.add_argument("--no-reconnect", dest="reconnect", action="store_false",
                   help="end when the connection is lost instead of reconnecting")
    add_token_option(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the client; the process exit status."""
    closed_stderr_dropped()
    parser = build_parser()
    lenient_output()
    args = parser.parse_args(argv)
    try:
        endpoint(args.url, "/")
        # ?stream= (the page's ?mic=) and ?token= (or #token=) of --url count as the options.
        given = take_query(args.url, streams=[args.stream] if args.stream else [],
                           since=None, epoch=None, token=args.token, role=Role.INGEST)
        if len(given.streams) > 1:
            raise ValueError("--url names more than one stream: a client streams one")
    except ValueError as e:
        parser.error(str(e))
    if args.channels and args.list_devices:
        parser.error("--channels picks the channels to send: not with --list-devices")
    if args.list_devices:
        closed_stdout_refused(parser, "the input devices have nowhere to go")
    closed_stdout_dropped()
    writer = LiveWriter(sys.stdout, sys.stderr, color=use_color(args.color, sys.stdout),
                        live=redraws(sys.stdout), show_stream=False)
    try:
        if args.list_devices:
            devices = list_input_devices()
            if not devices:
                raise AudioInputError("no audio input device found")
            for d in devices:
                mark = "*" if d.is_default else " "
                print(f"{mark} {d.index:3d}  {d.name}  ({d.channels} ch, "
                      f"{d.default_samplerate:.0f} Hz)")
            return 0
        # A file's channels: those --channels names, mixed, else all of them.
        feed: AudioFeed
        if args.file == "-":
            feed = stdin_feed(args.channels, writer.status)
        elif args.file is not None:
            feed = path_feed(Path(args.file), args.channels, writer.status)
        else:
            feed = MicFeed(args.device, channels=args.channels)
        code = run_client(run(given.url, next(iter(given.streams), None), feed, writer,
                              token=given.token,
                              language=args.language, reconnect=args.reconnect))
        # A pipe or file that failed was finished as at its end; the error was said.
        failed = isinstance(feed, PipeFeed | FileFeed) and feed.failed is not None
        return 2 if code == 0 and failed else code
    except AudioInputError as e:
        writer.status(f"error: {e}")
        return 2
    except ConfigError as e:
        # The microphone and a live pipe read [audio] of the engine's config,
        # which a user of this client may not know it does: name the variable.
        writer.status(f"error: ${CONFIG_ENV}={os.environ.get(CONFIG_ENV, '')}: {e}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    status = main()
    if portaudio_threads_left():
        # A lost microphone's close or refresh stuck in PortAudio: the
        # interpreter's exit (sounddevice terminating PortAudio) would wait
        # for it forever. Everything is done; only the output is flushed.
        for out in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                out.flush()
        os._exit(status)
    sys.exit(status)
