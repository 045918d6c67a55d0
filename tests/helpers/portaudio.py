"""A stand-in PortAudio input stream: no sound card is needed.

Its thread calls the capture's callback in real time, one block at a time,
as PortAudio does, until it is closed or "unplugged" (then it just stops
calling back, as a pulled USB microphone does, with no error). Held, it
delivers silence instead of its source: a room before anyone speaks, while a
test gets ready for what the source says.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from evoxtral_stream.events import Float32Array

#: ``source(first_frame, frames, channels)`` -> float32 ``(frames, channels)``.
Source = Callable[[int, int, int], Float32Array]


def tone(freq: float = 440.0, rate: int = 48000, amp: float = 0.3) -> Source:
    def source(first: int, frames: int, channels: int) -> Float32Array:
        t = (first + np.arange(frames)) / rate
        wave = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        return np.repeat(wave[:, None], channels, axis=1)
    return source


def playback(audio: Float32Array) -> Source:
    """Mono ``audio`` (float32 in [-1, 1]), then silence."""
    def source(first: int, frames: int, channels: int) -> Float32Array:
        block = np.zeros((frames, channels), np.float32)
        part = audio[first:first + frames]
        block[:len(part)] = part[:, None]
        return block
    return source


class LiveStream:
    """Implements the ``AudioStream`` protocol of ``audio.microphone``.

    ``hold``: until it is set, blocks of silence are delivered and the source
    waits (its frame 0 comes after them); ``held`` counts those frames, by
    which the source's times are later in the stream. ``unplug_at`` and
    ``frames`` count the source's frames only."""

    def __init__(self, source: Source, rate: int, channels: int, blocksize: int,
                 callback: Callable[..., None], *, fail_start: bool = False,
                 unplug_at: int | None = None, hold: threading.Event | None = None) -> None:
        self.source, self.rate, self.channels = source, rate, channels
        self.blocksize = blocksize
        self.unplug_at = unplug_at
        self.hold = hold
        self.held = 0
        self._callback = callback
        self._fail_start = fail_start
        self.calls: list[str] = []
        self.frames = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.calls.append("start")
        if self._fail_start:
            raise RuntimeError("device busy")
        self._thread.start()

    def stop(self) -> None:
        self.calls.append("stop")
        self._halt.set()

    def close(self) -> None:
        self.calls.append("close")
        self._halt.set()

    def unplug(self) -> None:
        """The device vanishes: no more callbacks, no error."""
        self._halt.set()

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._halt.is_set():
            if self.hold is not None and not self.hold.is_set():
                silence = np.zeros((self.blocksize, self.channels), np.float32)
                self._callback(silence, self.blocksize, None, None)
                self.held += self.blocksize
            else:
                if self.unplug_at is not None and self.frames >= self.unplug_at:
                    return
                block = self.source(self.frames, self.blocksize, self.channels)
                self._callback(block, self.blocksize, None, None)
                self.frames += self.blocksize
            self._halt.wait(max(0.0, t0 + (self.held + self.frames) / self.rate
                                - time.monotonic()))


def hung_refresh_lines(unplug_at: str) -> str:
    """Python lines for a test program's process: a microphone ('Desk Mic',
    mono) lost ``unplug_at`` frames in (an expression of ``rate``), whose
    PortAudio then hangs in the refresh before each reopen (a driver that
    never returns) and, as sounddevice does, is terminated again at the
    exit on the main thread, which hangs the same way. The file named by
    ``$HUNG_MARKER`` appears once the refresh is stuck."""
    return f"""
import atexit, os, threading, types
from evoxtral_stream.audio import microphone
from evoxtral_stream.events import SAMPLE_RATE
from tests.helpers.portaudio import LiveStream, tone

def terminate():
    open(os.environ["HUNG_MARKER"], "w").close()
    threading.Event().wait()

atexit.register(lambda: terminate())
sd = types.ModuleType("sounddevice")
sd.query_devices = lambda: [{{"index": 0, "name": "Desk Mic", "max_input_channels": 1,
                             "default_samplerate": float(SAMPLE_RATE)}}]
sd.default = types.SimpleNamespace(device=[0, -1])
sd._terminate, sd._initialize = terminate, lambda: None
sys.modules["sounddevice"] = sd
microphone._sounddevice_stream = lambda device, rate, channels, blocksize, callback: (
    LiveStream(tone(rate=rate), rate, channels, blocksize, callback, unplug_at={unplug_at}))
"""
