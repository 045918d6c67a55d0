"""Stream the local microphone (or an audio file) to an evoxtral-stream server.

    python clients/mic_client.py --url ws://127.0.0.1:8765 [--stream ID] [--device X]
    python clients/mic_client.py --file talk.wav          # a file at real-time pace

Pushes 16 kHz mono PCM16 to ``/v1/ingest`` (docs/protocol.md) and prints the
captions the server sends back on the same connection, as ``viewer.py``
does: finals as lines on stdout, the live partial redrawn in place
(unstable text dim) on a terminal, status lines on stderr. Ctrl-C (or the
end of the file) sends ``end``: the server flushes the open segment as a
final, sends its summary (printed on stderr) and closes. A second Ctrl-C
quits at once. A server with access tokens gets ``--token`` (default
``$EVOXTRAL_TOKEN``) as ``Authorization: Bearer``.

Exit status: 0 after the server's summary; 1 when the server cannot be
reached, refuses the token or the stream, or closes it early; 2 for a bad
argument, file or audio device; 130 after a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from _auth import add_token_option, auth_headers, refusal
from viewer import LiveWriter, endpoint, use_color
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from evoxtral_stream.audio.microphone import (
    InputDevice,
    MicrophoneCapture,
    StreamFactory,
    list_input_devices,
)
from evoxtral_stream.audio.sources import AudioInputError, iter_chunks, read_audio_file
from evoxtral_stream.config import load_config
from evoxtral_stream.events import SAMPLE_RATE, Int16Array

__all__ = ["AudioFeed", "FileFeed", "MicFeed", "build_parser", "main", "run"]

CHUNK_MS = 100
#: Microphone blocks waiting for the socket before new ones are dropped (10 s at 20 ms).
MAX_QUEUED_BLOCKS = 500
#: What the client sends in its config message: what MicrophoneCapture and
#: read_audio_file deliver.
CONFIG = {"type": "config", "sample_rate": SAMPLE_RATE, "channels": 1, "format": "pcm16"}

Status = Callable[[str], None]


class AudioFeed(Protocol):
    """Audio to stream: ``start`` before connecting (it may raise
    AudioInputError), ``send`` until the audio ends or ``stop`` is set,
    ``close`` in any case."""

    def start(self, status: Status) -> None: ...
    async def send(self, ws: ClientConnection, stop: asyncio.Event) -> None: ...
    def close(self) -> None: ...


class FileFeed:
    """A decoded file (16 kHz mono int16) sent in 100 ms messages at real-time pace."""

    def __init__(self, samples: Int16Array) -> None:
        self.samples = samples

    def start(self, status: Status) -> None:
        status(f"streaming {len(self.samples) / SAMPLE_RATE:.1f} s of audio at real-time pace")

    async def send(self, ws: ClientConnection, stop: asyncio.Event) -> None:
        t0 = time.monotonic()
        sent = 0
        for chunk in iter_chunks(self.samples, SAMPLE_RATE * CHUNK_MS // 1000):
            if stop.is_set():
                return
            await ws.send(chunk.astype("<i2").tobytes())
            sent += len(chunk)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(),
                                       max(0.0, t0 + sent / SAMPLE_RATE - time.monotonic()))

    def close(self) -> None:
        pass


class MicFeed:
    """The microphone through :class:`MicrophoneCapture` (16 kHz mono int16).

    Blocks arrive on the event loop and wait in a queue of
    :data:`MAX_QUEUED_BLOCKS` for the socket; when it is full, new blocks
    are dropped and counted. ``stream_factory`` replaces PortAudio (tests).
    """

    def __init__(self, device: str | int | InputDevice | None = None, *,
                 stream_factory: StreamFactory | None = None) -> None:
        cfg = load_config().audio
        self.queue: asyncio.Queue[Int16Array] = asyncio.Queue(MAX_QUEUED_BLOCKS)
        self.dropped = 0
        self.capture = MicrophoneCapture(
            self._on_audio, device=cfg.device if device is None else device,
            block_ms=cfg.block_ms, max_pending_blocks=cfg.max_pending_blocks,
            stream_factory=stream_factory, stall_timeout_s=cfg.stall_timeout_s,
            reopen_interval_s=cfg.reopen_interval_s,
            on_stall=lambda message: self._status(message),
            on_resume=lambda message: self._status(message))
        self._status: Status = lambda _: None

    def _on_audio(self, block: Int16Array) -> None:
        try:
            self.queue.put_nowait(block)
        except asyncio.QueueFull:
            self.dropped += 1

    def start(self, status: Status) -> None:
        self._status = status
        self.capture.start()
        name = self.capture.device.name if self.capture.device else "?"
        status(f"listening on {name!r} ({self.capture.samplerate} Hz); Ctrl-C to finish")

    async def send(self, ws: ClientConnection, stop: asyncio.Event) -> None:
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                block = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({block, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not block.done():
                    block.cancel()
                    break
                await ws.send(block.result().astype("<i2").tobytes())
        finally:
            stopping.cancel()
            self.close()
        while not self.queue.empty():  # what the capture delivered while stopping
            await ws.send(self.queue.get_nowait().astype("<i2").tobytes())

    def close(self) -> None:
        self.capture.stop()
        if self.dropped:
            self._status(f"dropped {self.dropped} audio blocks: the connection was too slow")
            self.dropped = 0


async def _session(ws: ClientConnection, feed: AudioFeed, stop: asyncio.Event,
                   writer: LiveWriter, language: str | None) -> int:
    config = CONFIG if language is None else {**CONFIG, "language": language}
    with contextlib.suppress(ConnectionClosed):  # refused at once: read why below
        await ws.send(json.dumps(config))
    ready = json.loads(await asyncio.wait_for(ws.recv(), 15))
    writer.show(ready)
    if ready.get("type") != "ingest.ready":
        return 1

    async def feed_then_end() -> None:
        await feed.send(ws, stop)
        await ws.send(json.dumps({"type": "end"}))

    summary: dict[str, Any] | None = None

    async def receive() -> None:
        nonlocal summary
        async for raw in ws:
            try:
                event = json.loads(raw)
            except ValueError:
                writer.status(f"! not JSON: {raw!r:.80}")
                continue
            if isinstance(event, dict):
                summary = event if event.get("type") == "ingest.summary" else summary
                writer.show(event)

    feeder = asyncio.ensure_future(feed_then_end())
    receiver = asyncio.ensure_future(receive())
    try:
        pending: set[asyncio.Future[None]] = {feeder, receiver}
        while not receiver.done():
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if feeder.done() and not feeder.cancelled():
                exc = feeder.exception()
                if exc is not None and not isinstance(exc, ConnectionClosed):
                    raise exc
        receiver.result()
    finally:
        for task in (feeder, receiver):
            task.cancel()
        await asyncio.gather(feeder, receiver, return_exceptions=True)
    writer.clear()
    if summary is None or ws.close_code != 1000:
        writer.status(f"the server closed the stream early (close code {ws.close_code})")
        return 1
    return 0


async def run(url: str, stream: str | None, feed: AudioFeed, writer: LiveWriter, *,
              stop: asyncio.Event | None = None, token: str | None = None,
              language: str | None = None) -> int:
    """Stream ``feed`` to the server at ``url`` as ``stream`` (None: the server
    names it) and show what comes back; the exit status (see the module doc).
    ``token`` is sent as ``Authorization: Bearer`` (None: no token).

    Setting ``stop`` (or Ctrl-C, once) ends the audio: the server then sends
    the last finals and its summary. Raises AudioInputError when the feed
    cannot start.
    """
    target = endpoint(url, "/v1/ingest") + (f"?stream={quote(stream, safe='')}"
                                             if stream else "")
    loop = asyncio.get_running_loop()
    stop = stop if stop is not None else asyncio.Event()
    task = asyncio.current_task()

    def interrupt() -> None:
        if stop.is_set() and task is not None:
            task.cancel()  # second Ctrl-C: quit now
        else:
            writer.status("finishing: waiting for the last captions (Ctrl-C again to quit)")
            stop.set()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        feed.start(writer.status)
        async with connect(target, open_timeout=10, max_size=2**24,
                           additional_headers=auth_headers(token)) as ws:
            return await _session(ws, feed, stop, writer, language)
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as e:
        writer.status(refusal(e, token)
                      or f"cannot stream to {target}: {e} (is the server running?)")
        return 1
    except ConnectionClosed as e:
        writer.status(f"the server closed the stream (close code "
                      f"{e.rcvd.code if e.rcvd else None})")
        return 1
    except asyncio.CancelledError:
        writer.clear()
        return 130
    finally:
        feed.close()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mic_client.py",
        description="Stream the microphone (or a file) to an evoxtral-stream server "
                    "and show the captions.")
    p.add_argument("--url", default="ws://127.0.0.1:8765",
                   help="server address (default: %(default)s)")
    p.add_argument("--stream", metavar="ID",
                   help="stream id (default: the server names it ingest-N)")
    p.add_argument("--language", metavar="CODE",
                   help="the language spoken, e.g. fr (default: the server's model.language)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--device", metavar="X",
                     help="input device: index or part of its name (default: audio.device "
                          "in config.toml, else the system default)")
    src.add_argument("--file", type=Path, metavar="PATH",
                     help="stream this audio file at real-time pace instead of the microphone")
    src.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    p.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                   help="ANSI colours (default: on a terminal unless NO_COLOR is set)")
    add_token_option(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the client; the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        endpoint(args.url, "/")
    except ValueError as e:
        parser.error(str(e))
    writer = LiveWriter(sys.stdout, sys.stderr, color=use_color(args.color, sys.stdout),
                        live=sys.stdout.isatty(), show_stream=False)
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
        feed: AudioFeed = (FileFeed(read_audio_file(args.file)) if args.file
                           else MicFeed(args.device))
        return asyncio.run(run(args.url, args.stream, feed, writer, token=args.token,
                               language=args.language))
    except AudioInputError as e:
        writer.status(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
