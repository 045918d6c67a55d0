"""The microphone: PortAudio input devices (sounddevice) captured into 16 kHz
mono int16 blocks on the event loop.

``sounddevice`` is imported only inside the functions that use it, so file
transcription works on machines without PortAudio.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any, Protocol

from evoxtral_stream.audio.receivers import REPORT_EVERY_S, RouteReceiver
from evoxtral_stream.audio.resample import (
    SILENCE_PIECE,
    SILENCE_PIECES_PER_TURN,
    StreamResampler,
    silence_pieces,
)
from evoxtral_stream.audio.sources import AudioInputError
from evoxtral_stream.config import STALL_TIMEOUT_BLOCKS, AudioConfig
from evoxtral_stream.detached import off_the_loop
from evoxtral_stream.events import SAMPLE_RATE, Float32Array, Int16Array

__all__ = [
    "AudioCallback",
    "AudioStream",
    "ChannelRoute",
    "InputDevice",
    "MicrophoneCapture",
    "StreamFactory",
    "list_input_devices",
    "portaudio_threads_left",
    "resolve_input_device",
    "usable_input_device",
]

logger = logging.getLogger(__name__)

PORTAUDIO_MISSING = "PortAudio library not found: install it with `apt-get install libportaudio2`"

#: The largest piece of silence handed to ``on_audio`` in one call when the
#: gap left by dropped blocks (or an input overflow) is filled: a long gap is
#: delivered in many small pieces, never allocated at once.
SILENCE_CHUNK = SILENCE_PIECE
#: The longest input overflow measured from PortAudio's timestamps, in
#: seconds. Host buffers hold tens to hundreds of milliseconds, and a device
#: that calls back nothing for ``audio.stall_timeout_s`` (2 s by default) is
#: reopened as lost instead; a longer "gap" on a running stream means the
#: process itself was stopped (SIGSTOP, suspend) or the host's clock stepped,
#: which the timestamps cannot tell apart: it is counted as unmeasured, not
#: filled with a guess.
MAX_OVERFLOW_GAP_S = 10.0


# --- devices ----------------------------------------------------------------


@dataclass(frozen=True)
class InputDevice:
    """A PortAudio input device."""

    index: int
    name: str
    channels: int
    default_samplerate: float
    is_default: bool


def _import_sounddevice() -> ModuleType:
    try:
        return importlib.import_module("sounddevice")
    except OSError:
        # sounddevice raises OSError at import when libportaudio is absent.
        raise AudioInputError(PORTAUDIO_MISSING) from None
    except ImportError:
        raise AudioInputError(
            "the sounddevice package is not installed: `pip install sounddevice`"
        ) from None


def _default_input_index(sd: ModuleType) -> int:
    try:
        idx = sd.default.device[0]
    except Exception:  # a broken host API setup must not stop device listing
        return -1
    return int(idx) if idx is not None else -1


def list_input_devices() -> list[InputDevice]:
    """The input devices PortAudio knows (for ``evoxtral-stream devices``)."""
    sd = _import_sounddevice()
    try:
        raw = list(sd.query_devices())
    except Exception as e:
        raise AudioInputError(f"cannot list audio devices: {e}") from None
    default = _default_input_index(sd)
    devices = []
    for i, d in enumerate(raw):
        channels = int(d.get("max_input_channels", 0))
        if channels <= 0:
            continue
        index = int(d.get("index", i))
        devices.append(
            InputDevice(
                index=index,
                name=str(d.get("name", f"device {index}")),
                channels=channels,
                default_samplerate=float(d.get("default_samplerate", SAMPLE_RATE)),
                is_default=index == default,
            )
        )
    return devices


def resolve_input_device(spec: str | int | None) -> InputDevice:
    """Find the input device for ``audio.device``: ``None`` or a blank string is
    the system default, an int (or digits) an index, anything else a
    case-insensitive substring of the name (an exact name wins)."""
    devices = list_input_devices()
    if not devices:
        raise AudioInputError(
            "no audio input device found: connect a microphone or check the system's "
            "audio settings"
        )
    listing = "run `evoxtral-stream devices` to list them"
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        for d in devices:
            if d.is_default:
                return d
        return devices[0]
    if isinstance(spec, int) or spec.strip().isdecimal():
        index = int(spec)
        for d in devices:
            if d.index == index:
                return d
        raise AudioInputError(f"audio input device {index} does not exist; {listing}")
    wanted = spec.strip().lower()
    exact = [d for d in devices if d.name.lower() == wanted]
    partial = [d for d in devices if wanted in d.name.lower()]
    if exact or partial:
        return (exact or partial)[0]
    raise AudioInputError(f"no audio input device matches {spec!r}; {listing}")


def usable_input_device(spec: str | int | InputDevice | None,
                        channels: Sequence[int] = (),
                        channels_from: str = "audio.channels") -> InputDevice:
    """The device ``spec`` names (:func:`resolve_input_device`; an
    :class:`InputDevice` as it is), checked as :class:`MicrophoneCapture`
    will open it: input channels (among them every 1-based one in
    ``channels``, which the error says come from ``channels_from``) and a
    usable native rate. Raises :class:`AudioInputError`; ``serve`` calls it
    before loading the model."""
    device = spec if isinstance(spec, InputDevice) else resolve_input_device(spec)
    if device.channels < 1:
        raise AudioInputError(f"audio device {device.name!r} has no input channels")
    if channels and max(channels) > device.channels:
        raise AudioInputError(
            f"{channels_from} asks for channel {max(channels)}, but audio device "
            f"{device.name!r} has {device.channels} input channel(s)")
    if not 1000 <= device.default_samplerate <= 768_000:
        # Some drivers report 0 (or garbage) until configured; the
        # device is opened at its native rate, so there is nothing to open.
        raise AudioInputError(f"audio device {device.name!r} reports no usable sample "
                              f"rate ({device.default_samplerate:g} Hz)")
    return device


# --- microphone -------------------------------------------------------------

#: Receives each resampled block: mono int16 at 16 kHz. Runs on the event loop.
AudioCallback = Callable[[Int16Array], None]


@dataclass(frozen=True)
class ChannelRoute:
    """One output of a :class:`MicrophoneCapture`: the device's channels
    (1-based, as on a mixer) mixed into it, and its receiver. ``()`` takes
    the device's first two channels (its only one on a mono device)."""

    on_audio: AudioCallback
    channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if any(c < 1 for c in self.channels) or len(set(self.channels)) != len(self.channels):
            raise ValueError(f"channels must be distinct numbers from 1, got {self.channels}")


@dataclass
class _Output:
    """A route once the device is open: its columns of the device's blocks
    (None: all of them) and its own resampler, so filters never mix outputs."""

    on_audio: RouteReceiver
    columns: list[int] | None
    resampler: StreamResampler


class AudioStream(Protocol):
    """The part of ``sounddevice.InputStream`` this module uses."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


#: ``factory(device, samplerate, channels, blocksize, callback) -> AudioStream``;
#: the default opens a ``sounddevice.InputStream`` (float32).
StreamFactory = Callable[[InputDevice, int, int, int, Callable[..., None]], AudioStream]


def _sounddevice_stream(
    device: InputDevice,
    samplerate: int,
    channels: int,
    blocksize: int,
    callback: Callable[..., None],
) -> AudioStream:
    sd = _import_sounddevice()
    try:
        stream: AudioStream = sd.InputStream(
            device=device.index,
            samplerate=samplerate,
            channels=channels,
            dtype="float32",
            blocksize=blocksize,
            callback=callback,
        )
    except Exception as e:
        raise AudioInputError(f"cannot open audio input device {device.name!r}: {e}") from None
    return stream


def refresh_input_devices() -> None:
    """Make PortAudio list the devices present now (it lists them once, at
    initialisation, so a microphone plugged in later is otherwise unseen).
    Closes every PortAudio stream of the process; call it with none open."""
    sd = _import_sounddevice()
    terminate, initialize = getattr(sd, "_terminate", None), getattr(sd, "_initialize", None)
    if terminate is None or initialize is None:
        return
    try:
        terminate()
        initialize()
    except Exception as e:
        raise AudioInputError(f"cannot re-initialise PortAudio: {e}") from None


def _notify(callback: Callable[[str], None] | None, message: str) -> None:
    if callback is None:
        return
    try:
        callback(message)
    except Exception:
        logger.exception("an audio input status callback failed")


# The threads of off_the_loop's calls into PortAudio (see portaudio_threads_left).
_PORTAUDIO_THREADS = frozenset({"audio-close", "audio-refresh"})


def portaudio_threads_left() -> bool:
    """Whether a lost device's close or refresh is still running in its
    thread (PortAudio stuck in it, see
    :func:`~evoxtral_stream.detached.off_the_loop`). The interpreter's exit
    would then wait for it too: sounddevice terminates PortAudio on the main
    thread at exit. A program ending while this holds should end with
    ``os._exit`` once its output is flushed."""
    return any(t.is_alive() and t.name in _PORTAUDIO_THREADS for t in threading.enumerate())


def _close_quietly(stream: AudioStream) -> None:
    # Pa_CloseStream aborts an active stream; a vanished device (or one that
    # would not start) may make it fail, and there is nothing left to do
    # with the stream then.
    try:
        stream.close()
    except Exception as e:
        logger.debug("closing the audio input stream failed: %s", e)


class MicrophoneCapture:
    """Capture a PortAudio input device and hand 16 kHz mono int16 blocks to
    ``on_audio`` on the asyncio event loop.

    ``on_audio`` is one receiver of the device's first two channels mixed
    (its only one on a mono device), or a sequence of :class:`ChannelRoute`:
    each gets the mix of its channels, so a multichannel interface can feed
    one stream per microphone. Every output gets the same number of samples
    at the same times (drops and gaps included); the counters below count
    one output's. A receiver that raises costs the other routes nothing
    (see :class:`RouteReceiver`; :attr:`receiver_failures` counts). The
    device is opened at its native rate
    (``default_samplerate``) with as many channels as the routes need
    (PortAudio opens the first N); a device with fewer is an
    :class:`AudioInputError`. Downmixing and soxr resampling
    happen on the loop, not in the PortAudio callback. The callback only copies
    the block into a bounded handoff: when ``max_pending_blocks`` are already
    waiting, the new block is dropped and counted in :attr:`dropped_blocks`
    (the callback never blocks). Drops and PortAudio input overflows are
    logged from the loop side, at most every :data:`REPORT_EVERY_S`.

    Dropped audio keeps its place in time: the loop delivers as much silence
    (zeros, at 16 kHz, in pieces of at most :data:`SILENCE_CHUNK`, at most
    :data:`SILENCE_PIECES_PER_TURN` per turn of the loop) where the dropped
    blocks were, so the samples delivered always count the time captured and
    every later caption time stays true. The resampler is flushed
    at the gap and starts afresh after it, so its filter never joins the audio
    on either side; the silence's length is computed from the frames captured
    since the device was opened, so rounding does not add up over many gaps.
    The dropped sound itself is lost: a long drop run is silence to the VAD
    and may end the open segment there. Blocks dropped after the last one
    queued are filled in when the capture stops or the device is lost.
    :attr:`silence_samples` counts the silence delivered.

    PortAudio's own input overflows (frames lost before the callback ran) are
    counted in :attr:`status_overflows` and measured from the callback's
    ``time_info.inputBufferAdcTime`` (the ADC time of the block's first
    frame): the frames between where the previous block ended and where this
    one begins are filled with silence as dropped ones are, and added up in
    :attr:`overflow_lost_s`. Host APIs that give no usable times (0, or times
    that do not increase, as ALSA may), a gap the times do not show, or one
    over :data:`MAX_OVERFLOW_GAP_S` cannot be measured: such an overflow is
    only counted (:attr:`overflows_unmeasured`), and the captions after it
    come early by what it lost.

    ``device`` is an ``audio.device`` spec (see :func:`resolve_input_device`)
    or an already resolved :class:`InputDevice`; ``channels_from`` names the
    option the routes' channels came from, for the error when the device
    lacks one. The stream is created in
    :meth:`start` only, by ``stream_factory`` (default: sounddevice), so the
    class works without a sound card when both are injected.
    :meth:`start` and :meth:`stop` must be called on the loop's thread.

    Lost input: a working input device calls back every block, silence
    included, so no callback for ``stall_timeout_s`` (0: never checked; else
    at least :data:`~evoxtral_stream.config.STALL_TIMEOUT_BLOCKS` blocks) means
    the device is gone (unplugged, or its driver stopped). The capture then
    delivers what it holds, calls ``on_stall(message)``, closes the stream
    (off the loop, as the refresh below: a vanished device can make either
    slow, or hang for good, which a :meth:`stop` and the process's exit do
    not wait for) and tries every
    ``reopen_interval_s`` to open the device again: ``refresh_devices``
    (default: :func:`refresh_input_devices` with the sounddevice factory,
    nothing with an injected one), then the ``device`` spec resolved afresh,
    so a microphone plugged back in under a new index is found by name or as
    the default. Once it is open, ``on_resume(message)`` is called. Both
    callbacks run on the loop. :attr:`stalls` and :attr:`reopens` count.
    Nothing is delivered between ``on_stall`` and the reopen: a block that a
    callback still running when the device was given up queues after what
    was delivered is discarded (the device's time while lost is not in the
    stream either).
    """

    def __init__(
        self,
        on_audio: AudioCallback | Sequence[ChannelRoute],
        *,
        device: str | int | InputDevice | None,
        block_ms: int,
        max_pending_blocks: int,
        stream_factory: StreamFactory | None = None,
        stall_timeout_s: float = 0.0,
        reopen_interval_s: float = 2.0,
        on_stall: Callable[[str], None] | None = None,
        on_resume: Callable[[str], None] | None = None,
        refresh_devices: Callable[[], None] | None = None,
        channels_from: str = "audio.channels",
    ) -> None:
        if stall_timeout_s < 0 or reopen_interval_s <= 0:
            raise ValueError("stall_timeout_s must be >= 0 and reopen_interval_s > 0, got "
                             f"{stall_timeout_s} and {reopen_interval_s}")
        if max_pending_blocks < 1:
            raise ValueError(f"max_pending_blocks must be at least 1, got {max_pending_blocks}")
        if block_ms < 1:
            raise ValueError(f"block_ms must be at least 1, got {block_ms}")
        least = STALL_TIMEOUT_BLOCKS * block_ms / 1000
        if 0 < stall_timeout_s < least:
            # Between two blocks of a working device the check would fire.
            raise ValueError(f"stall_timeout_s must be 0 (off) or at least "
                             f"{STALL_TIMEOUT_BLOCKS} blocks ({least:g} s), got {stall_timeout_s}")
        routes = tuple(on_audio) if isinstance(on_audio, Sequence) else (ChannelRoute(on_audio),)
        if not routes:
            raise ValueError("a capture needs at least one route")
        self._routes = routes
        # Kept across reopenings: each counts and throttles its route's failures.
        self._receivers = RouteReceiver.for_routes(routes)
        self._channels_from = channels_from
        self._device_spec = device
        self.block_ms = block_ms
        self.max_pending_blocks = max_pending_blocks
        self._stream_factory: StreamFactory = stream_factory or _sounddevice_stream
        self._refresh_devices: Callable[[], None] = refresh_devices or (
            refresh_input_devices if stream_factory is None else lambda: None)
        self.stall_timeout_s = stall_timeout_s
        self.reopen_interval_s = reopen_interval_s
        self._on_stall = on_stall
        self._on_resume = on_resume
        self._started = False
        self._watchdog: asyncio.Task[None] | None = None
        self.stalls = 0
        self.reopens = 0
        # Each queued block with the opening it was captured in and the
        # frames dropped just before it.
        self._pending: deque[tuple[int, int, Float32Array]] = deque()
        # Counts the device's openings, moved on once one's audio is all
        # delivered (stop, lost device): a callback still running then
        # queues its block under an opening gone by, and it is discarded.
        self._opening = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: AudioStream | None = None
        self._outputs: list[_Output] = []
        self._wake_scheduled = False
        self._accepting = False
        self.device: InputDevice | None = None
        self.samplerate = 0
        self.channels = 0
        # Written by the callback thread, read by the loop: plain ints, each
        # written by one side only, so no lock is needed.
        self.dropped_blocks = 0
        self.status_overflows = 0
        self.overflows_unmeasured = 0
        self.overflow_lost_s = 0.0
        """Seconds lost in input overflows, measured and filled with silence."""
        self.blocks_seen = 0
        # The ADC time the next block's first frame should have if no frame
        # is lost (callback thread only); None when the last gave no usable time.
        self._next_adc: float | None = None
        # Native-rate frames dropped since the last queued block: the callback
        # hands them to the loop with the next block it queues; the loop
        # takes the rest only once no callback can come (stop, lost device).
        self._gap_frames = 0
        # 16 kHz samples of silence still to deliver for the last gap, before
        # any later block (loop thread only).
        self._silence_owed = 0
        self.samples_delivered = 0
        self.silence_samples = 0
        self._reported_drops = 0
        self._reported_overflows = 0
        self._reported_overflow_s = 0.0
        self._reported_unmeasured = 0
        # When each warning was last logged (time.monotonic()).
        self._drops_reported_at = self._overflows_reported_at = -math.inf

    @classmethod
    def from_config(
        cls,
        cfg: AudioConfig,
        on_audio: AudioCallback | Sequence[ChannelRoute],
        *,
        stream_factory: StreamFactory | None = None,
        on_stall: Callable[[str], None] | None = None,
        on_resume: Callable[[str], None] | None = None,
    ) -> MicrophoneCapture:
        return cls(
            on_audio,
            device=cfg.device,
            block_ms=cfg.block_ms,
            max_pending_blocks=cfg.max_pending_blocks,
            stream_factory=stream_factory,
            stall_timeout_s=cfg.stall_timeout_s,
            reopen_interval_s=cfg.reopen_interval_s,
            on_stall=on_stall,
            on_resume=on_resume,
        )

    @property
    def receiver_failures(self) -> int:
        """Blocks a route's receiver raised on, all routes together (see
        :class:`RouteReceiver`)."""
        return sum(r.failures for r in self._receivers)

    @property
    def running(self) -> bool:
        """Started and not stopped (also while a lost device is being reopened)."""
        return self._started

    @property
    def lost(self) -> bool:
        """The device stopped delivering and has not been reopened yet."""
        return self._started and self._stream is None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Open and start the input stream (default loop: the running one)."""
        if self._started:
            raise RuntimeError("microphone capture is already running")
        self._loop = loop or asyncio.get_running_loop()
        self._open(self._resolve())
        self._started = True
        if self.stall_timeout_s > 0:
            self._watchdog = self._loop.create_task(self._watch())
        logger.info(
            "capturing %r at %d Hz, %d channel(s), %d ms blocks",
            self.device.name if self.device else "?", self.samplerate, self.channels,
            self.block_ms,
        )

    def stop(self) -> None:
        """Stop the stream, deliver what is pending (and the resampler's tail).
        A stream that fails to stop or close (a vanished device) is logged,
        never raised: the audio captured so far is delivered all the same."""
        if not self._started:
            return
        self._started = False
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.stop()
            except Exception as e:
                # A device that just vanished can make PortAudio's stop fail;
                # closing aborts the stream, and what it captured still goes out.
                logger.warning("stopping the audio input failed: %s", e)
            _close_quietly(stream)
        self._accepting = False
        self._deliver_rest()
        self._opening += 1

    def _resolve(self) -> InputDevice:
        wanted = [c for r in self._routes for c in r.channels]
        return usable_input_device(self._device_spec, wanted, self._channels_from)

    def _open(self, device: InputDevice) -> None:
        """Open and start ``device``'s stream at its native rate (loop thread)."""
        self.device = device
        self.samplerate = round(device.default_samplerate)
        mix = min(2, device.channels)
        self.channels = max(max(r.channels, default=mix) for r in self._routes)
        self._outputs = []
        for route, receiver in zip(self._routes, self._receivers, strict=True):
            columns = [c - 1 for c in route.channels] or list(range(mix))
            self._outputs.append(_Output(
                receiver, None if columns == list(range(self.channels)) else columns,
                StreamResampler(self.samplerate, SAMPLE_RATE, len(columns))))
        blocksize = max(1, self.samplerate * self.block_ms // 1000)
        self._pending.clear()
        self._gap_frames = 0
        self._next_adc = None
        self._wake_scheduled = False
        stream = self._stream_factory(
            device, self.samplerate, self.channels, blocksize, self._callback
        )
        self._accepting = True
        try:
            stream.start()
        except Exception as e:
            self._accepting = False
            _close_quietly(stream)  # its error would hide the start's
            raise AudioInputError(f"cannot start audio input device {device.name!r}: {e}") from None
        self._stream = stream

    # --- lost input ---------------------------------------------------------------

    async def _watch(self) -> None:
        """Reopen the device whenever it delivers nothing for ``stall_timeout_s``.

        Progress is the callback's count, not the loop's drains, so a loop
        that was itself held up does not pass for a lost device."""
        loop = asyncio.get_running_loop()
        timeout = self.stall_timeout_s
        tick = max(0.02, timeout / 4)
        seen, since = self.blocks_seen, loop.time()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            if self.blocks_seen != seen:
                seen, since = self.blocks_seen, now
            elif now - since >= timeout:
                await self._recover(now - since)
                seen, since = self.blocks_seen, loop.time()

    async def _recover(self, silent_s: float) -> None:
        loop = asyncio.get_running_loop()
        lost_at = loop.time()
        stream, self._stream = self._stream, None
        self._accepting = False
        self.stalls += 1
        name = self.device.name if self.device else "?"
        message = (f"audio input {name!r} delivered no audio for {silent_s:.1f} s "
                   f"(audio.stall_timeout_s); reopening it every {self.reopen_interval_s:g} s")
        logger.warning("%s", message)
        # The watchdog must outlive whatever the callbacks do.
        try:
            self._deliver_rest()
        except Exception:
            logger.exception("delivering the lost input's last audio failed")
        self._opening += 1
        _notify(self._on_stall, message)
        # PortAudio on a vanished device can hang for good in its close or
        # refresh: each on a daemon thread, which holds no exit.
        if stream is not None:
            try:
                await off_the_loop(functools.partial(_close_quietly, stream), "audio-close")
            except RuntimeError as e:  # no thread to close it on: left open, not waited for
                logger.warning("cannot close the lost audio input: %s", e)
        failures = 0
        while True:
            try:
                device = await off_the_loop(self._refresh_and_resolve, "audio-refresh")
                self._open(device)
                break
            except Exception as e:
                failures += 1
                log = logger.warning if failures == 1 else logger.debug
                log("audio input not back yet (attempt %d): %s", failures, e)
            await asyncio.sleep(self.reopen_interval_s)
        self.reopens += 1
        message = (f"audio input {device.name!r} is back after "
                   f"{loop.time() - lost_at:.1f} s ({self.samplerate} Hz, "
                   f"{failures + 1} attempt(s))")
        logger.info("%s", message)
        _notify(self._on_resume, message)

    def _refresh_and_resolve(self) -> InputDevice:
        """Off the loop: device enumeration may take a while."""
        self._refresh_devices()
        return self._resolve()

    def __enter__(self) -> MicrophoneCapture:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- PortAudio thread -----------------------------------------------------

    def _callback(self, indata: Float32Array, frames: int, time_info: Any, status: Any) -> None:
        """PortAudio callback: copy, count, wake the loop. Never blocks."""
        overflow = bool(status) and bool(getattr(status, "input_overflow", False))
        # The opening before the flag: if the loop stops accepting after this
        # read of it, its move to the next opening comes after this read too.
        opening = self._opening
        accepting = self._accepting
        lost = self._overflow_frames(time_info, len(indata), overflow) if accepting else 0
        if overflow:  # after its measurement: _report reads this count first
            self.status_overflows += 1
        if not accepting:
            return
        self.blocks_seen += 1
        # Frames an overflow lost come before this block, dropped or queued.
        self._gap_frames += lost
        # deque.append/len are atomic under the GIL; the loop only pops.
        if len(self._pending) >= self.max_pending_blocks:
            self.dropped_blocks += 1
            self._gap_frames += len(indata)
            return
        # Only this thread writes _gap_frames while the stream runs: the gap
        # reaches the loop inside the queue, in order, with no lock.
        gap, self._gap_frames = self._gap_frames, 0
        self._pending.append((opening, gap, indata.copy()))
        # One wake-up per batch: _drain clears the flag before draining, so a
        # block appended after that schedules a new drain instead of being lost.
        if not self._wake_scheduled:
            self._wake_scheduled = True
            loop = self._loop
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # loop closed while stopping
                    loop.call_soon_threadsafe(self._drain)

    def _overflow_frames(self, time_info: Any, frames: int, overflow: bool) -> int:
        """Callback thread: the native-rate frames an input overflow lost just
        before this block of ``frames``, from the blocks' ADC times (0 when
        there was no overflow or it cannot be measured)."""
        adc = _adc_time(time_info)
        expected = self._next_adc
        self._next_adc = None if adc is None else adc + frames / self.samplerate
        if not overflow:
            return 0
        lost = 0 if adc is None or expected is None else round(
            (adc - expected) * self.samplerate)
        # Not positive: times that stand still or run back (no usable clock),
        # or the loss does not show in them; see MAX_OVERFLOW_GAP_S for the bound.
        if not 0 < lost <= MAX_OVERFLOW_GAP_S * self.samplerate:
            self.overflows_unmeasured += 1
            return 0
        self.overflow_lost_s += lost / self.samplerate
        return lost

    # --- event loop -------------------------------------------------------------

    def _drain(self, turn: int | None = SILENCE_PIECES_PER_TURN) -> None:
        """Deliver the queued blocks, each after the silence owed before it.
        Past ``turn`` pieces of silence (None: no limit) the rest waits for
        the loop's next turn."""
        self._wake_scheduled = False
        while True:
            turn = self._pay_silence(turn)
            if self._silence_owed:
                self._wake_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._drain)
                break
            if not self._pending:
                break
            opening, gap, block = self._pending.popleft()
            if opening != self._opening:
                # Queued by a callback still running when that opening's
                # audio was all delivered (the device given up): too late.
                logger.debug("discarded an audio block captured as the device was given up")
                continue
            if gap:
                self._fill_gap(gap)
                # The block comes after its silence, which may take more turns;
                # appendleft is atomic, and the callback only appends.
                self._pending.appendleft((opening, 0, block))
                continue
            for out in self._outputs:
                part = block if out.columns is None else block[:, out.columns]
                self._emit(out, out.resampler.process(part))
        self._report()

    def _deliver_rest(self) -> None:
        """No callback can come any more: deliver the queued blocks, the
        silence for blocks dropped after them and the resampler's tail."""
        self._drain(None)
        gap, self._gap_frames = self._gap_frames, 0
        if gap:
            self._fill_gap(gap)  # flushes the resamplers first
            self._pay_silence(None)
        else:
            for out in self._outputs:
                self._emit(out, out.resampler.flush())
        self._report(held_back=True)

    def _fill_gap(self, frames: int) -> None:
        """Owe silence for ``frames`` lost native-rate frames (see _pay_silence)."""
        owed = set()
        for out in self._outputs:
            # The audio before the gap ends here (its filter tail goes first);
            # the resampler counts the silence from its totals since the
            # device was opened, so the timeline never drifts by a sample per gap.
            tail, missing = out.resampler.gap(frames)
            self._emit(out, tail)
            owed.add(missing)
        # Same rate, same frames in: every output owes the same silence.
        assert len(owed) <= 1, f"outputs owe different silences: {owed}"
        self._silence_owed += owed.pop() if owed else 0

    def _pay_silence(self, pieces: int | None) -> int | None:
        """Deliver the silence owed, at most ``pieces`` pieces of it (None: all);
        returns how many pieces may still go."""
        owed = self._silence_owed
        if pieces is not None:
            owed = min(owed, pieces * SILENCE_CHUNK)
            pieces -= -(-owed // SILENCE_CHUNK)
        for piece in silence_pieces(owed, SILENCE_CHUNK):
            self._silence_owed -= len(piece)
            self.silence_samples += len(piece)
            for out in self._outputs:
                self._emit(out, piece)
        return pieces

    def _emit(self, out: _Output, samples: Int16Array) -> None:
        if len(samples):
            if out is self._outputs[0]:
                self.samples_delivered += len(samples)
            out.on_audio(samples)

    def _report(self, held_back: bool = False) -> None:
        """Log the drops and overflows since the last report, at most every
        :data:`REPORT_EVERY_S` (``held_back``: now, the capture's last, with
        the receivers' failures not logged yet)."""
        drops, overflows = self.dropped_blocks, self.status_overflows
        now = time.monotonic()

        def due(last: float) -> bool:
            return held_back or now - last >= REPORT_EVERY_S

        if drops > self._reported_drops and due(self._drops_reported_at):
            self._drops_reported_at = now
            logger.warning(
                "dropped %d audio block(s) (%d in total): the event loop is not keeping "
                "up; their time is filled with silence",
                drops - self._reported_drops, drops,
            )
            self._reported_drops = drops
        if overflows > self._reported_overflows and due(self._overflows_reported_at):
            self._overflows_reported_at = now
            lost_s = self.overflow_lost_s
            filled = lost_s - self._reported_overflow_s
            unmeasured = self.overflows_unmeasured - self._reported_unmeasured
            what = []
            if filled > 0:
                what.append(f"{filled:.3f} s of it measured from PortAudio's timestamps and "
                            "filled with silence")
            if unmeasured:
                what.append(f"{unmeasured} overflow(s) not measurable (no usable timestamps): "
                            "the captions after them come early by what they lost")
            logger.warning(
                "audio input overflowed %d time(s) (%d in total): audio was lost before it "
                "reached the callback%s",
                overflows - self._reported_overflows, overflows,
                "".join(f"; {w}" for w in what),
            )
            self._reported_overflows = overflows
            self._reported_overflow_s = lost_s
            self._reported_unmeasured += unmeasured
        if held_back:
            for receiver in self._receivers:
                receiver.report_rest()


def _adc_time(time_info: Any) -> float | None:
    """The ADC time of a callback's first frame, or None if unusable.

    sounddevice passes ``time_info`` as PortAudio's ``PaStreamCallbackTimeInfo *``
    (a cffi pointer, valid only during the callback: read it at once). Host
    APIs without timestamps give 0 (ALSA without timestamps: at or below 0)."""
    adc = getattr(time_info, "inputBufferAdcTime", None)
    if not isinstance(adc, float | int) or not math.isfinite(adc) or adc <= 0:
        return None
    return float(adc)
