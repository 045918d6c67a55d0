"""clients/mic_client.py against a real server: --file as a subprocess, the
microphone path in process with a fake PortAudio stream, Ctrl-C and errors."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mic_client
import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
from mic_client import FileFeed, MicFeed, SessionEnd, main, run, should_reconnect
from viewer import LiveWriter
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from evoxtral_stream.audio.microphone import InputDevice
from evoxtral_stream.audio.resample import int16_to_float32, resample
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.backends.base import Backend
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import SAMPLE_RATE, CaptionEvent, EngineEvent, Int16Array
from evoxtral_stream.server.app import CaptionServer
from tests.clients.conftest import (
    CLIENTS,
    accepted_token_cases,
    client_env,
    refused_token_cases,
)
from tests.fakes import ScriptedBackend
from tests.helpers.events import EndedStreams
from tests.helpers.http import Relay, StallingRelay, free_port
from tests.helpers.portaudio import LiveStream, hung_refresh_lines, playback, tone
from tests.speech import have_espeak, speech_with_pauses
from tests.text_norm import loose_wer

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")

SENTENCES = ["Good evening and welcome.", "Thank you for listening."]
SUMMARY = re.compile(r"^(\S+): ([\d.]+) s of audio, (\d+) segments, (\d+) finals, "
                     r"(\d+) partials, (\d+) errors$", re.M)


def words(audio: npt.NDArray[np.float32]) -> str:
    return " ".join(f"w{i}" for i in range(len(audio) // 8000))


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Engine, CaptionServer]]:
    cfg = load_config(overrides={"server.port": 0})
    async with Engine(cfg, ScriptedBackend(words)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        yield engine, server


def write_wav(path: Path, audio: Int16Array) -> Path:
    """``audio`` as a 44.1 kHz stereo WAV, so the client has to convert it."""
    f44 = resample(int16_to_float32(audio), SAMPLE_RATE, 44100)
    sf.write(path, np.stack([f44, f44], axis=1), 44100, subtype="PCM_16")
    return path


async def start_client(*args: str, env: dict[str, str] | None = None
                       ) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENTS / "mic_client.py"), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)


async def finish(proc: asyncio.subprocess.Process, within: float = 30) -> tuple[str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), within)
    return out.decode(), err.decode()


async def test_file_streams_at_real_time_and_prints_its_captions(
    whisper_backend: Backend, tmp_path: Path,
) -> None:
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.2)
    wav = write_wav(tmp_path / "talk.wav", audio)
    cfg = load_config(overrides={"server.port": 0})
    async with Engine(cfg, whisper_backend) as engine, \
            CaptionServer(engine, cfg.server) as server:
        t0 = time.monotonic()
        proc = await start_client("--url", f"ws://127.0.0.1:{server.port}", "--file", str(wav),
                                  "--stream", "demo")
        out, err = await finish(proc)
        elapsed = time.monotonic() - t0
        assert "demo" not in engine.streams
    assert proc.returncode == 0, err
    seconds = len(audio) / SAMPLE_RATE
    assert elapsed >= seconds - 0.3, "not paced to real time"
    lines = out.splitlines()
    assert len(lines) == 2, out
    for line, sentence in zip(lines, SENTENCES, strict=True):
        m = re.fullmatch(r"\[\d:\d\d\.\d → \d:\d\d\.\d\] (.*)", line)
        assert m is not None, line
        assert loose_wer(sentence, m.group(1)) <= 0.25, line
    assert "\x1b" not in out  # not a terminal
    summary = SUMMARY.search(err)
    assert summary is not None, err
    stream, duration, segments, finals, _, errors = summary.groups()
    assert (stream, segments, finals, errors) == ("demo", "2", "2", "0")
    assert abs(float(duration) - seconds) < 0.1


async def test_ctrl_c_sends_end_and_keeps_the_captions_so_far(
    scripted: tuple[Engine, CaptionServer], tmp_path: Path,
) -> None:
    _, server = scripted
    audio, spans = speech_with_pauses(SENTENCES * 3, pause_s=1.0)
    wav = write_wav(tmp_path / "long.wav", audio)
    proc = await start_client("--url", f"ws://127.0.0.1:{server.port}", "--file", str(wav))
    assert proc.stderr is not None
    while "streaming to" not in (line := (await proc.stderr.readline()).decode()):
        assert line, "the client exited before streaming"
    # Interrupt in the second sentence: the first is final, the second is cut short.
    await asyncio.sleep((spans[1][0] + spans[1][1]) / 2 / SAMPLE_RATE)
    proc.send_signal(signal.SIGINT)
    out, err = await finish(proc)
    assert proc.returncode == 0, err
    assert "finishing" in err
    summary = SUMMARY.search(err)
    assert summary is not None, err
    assert summary.group(1).startswith("ingest-")
    assert float(summary.group(2)) < len(audio) / SAMPLE_RATE / 2
    assert summary.group(4) == "2"  # the open segment was flushed as a final
    assert len(out.splitlines()) == 2


async def test_second_ctrl_c_quits_at_once(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "talk.wav", speech_with_pauses(SENTENCES, pause_s=1.0)[0])
    ends: list[str] = []

    async def never_finishes(ws: ServerConnection) -> None:
        """An ingest server that takes ``end`` and then never sends its summary."""
        await ws.recv()  # config
        await ws.send(json.dumps({"type": "ingest.ready", "stream": "s", "sample_rate": 16000,
                                  "channels": 1, "format": "pcm16"}))
        async for message in ws:
            if isinstance(message, str):
                ends.append(message)

    async with serve(never_finishes, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        proc = await start_client("--url", f"ws://127.0.0.1:{port}", "--file", str(wav))
        assert proc.stderr is not None
        while "streaming to" not in (line := (await proc.stderr.readline()).decode()):
            assert line, "the client exited before streaming"
        proc.send_signal(signal.SIGINT)
        while "finishing" not in (line := (await proc.stderr.readline()).decode()):
            assert line, "the client exited before finishing"
        while not ends:
            await asyncio.sleep(0.01)
        assert json.loads(ends[0]) == {"type": "end"}
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = await finish(proc, 10)
    assert proc.returncode == 130, err
    assert time.monotonic() - t0 < 2.0
    assert "Traceback" not in err


class FakeInput:
    """A PortAudio input stream that plays ``audio`` (then silence) to the
    callback from its own thread, ``speed`` times faster than real time."""

    def __init__(self, audio: npt.NDArray[np.float32], rate: int, blocksize: int,
                 callback: Callable[..., None], speed: float) -> None:
        self.audio, self.rate, self.blocksize = audio, rate, blocksize
        self.callback, self.speed = callback, speed
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._play, daemon=True)
        self.closed = False

    def _play(self) -> None:
        pos = 0
        silence = np.zeros((self.blocksize, self.audio.shape[1]), np.float32)
        while not self.halt.wait(self.blocksize / self.rate / self.speed):
            block = self.audio[pos:pos + self.blocksize]
            self.callback(block if len(block) == self.blocksize else silence,
                          self.blocksize, None, None)
            pos += self.blocksize

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.halt.set()
        self.thread.join(5)

    def close(self) -> None:
        self.closed = True


async def test_microphone_path_with_a_fake_portaudio_stream(
    scripted: tuple[Engine, CaptionServer],
) -> None:
    _, server = scripted
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.5)
    f48 = resample(int16_to_float32(audio), SAMPLE_RATE, 48000)
    stereo = np.ascontiguousarray(np.stack([f48, f48 * 0.5], axis=1), dtype=np.float32)
    streams: list[FakeInput] = []

    def factory(device: InputDevice, rate: int, channels: int, blocksize: int,
                callback: Callable[..., None]) -> FakeInput:
        assert (device.name, rate, channels) == ("fake mic", 48000, 2)
        streams.append(FakeInput(stereo, rate, blocksize, callback, speed=4))
        return streams[-1]

    out, err = io.StringIO(), io.StringIO()
    writer = LiveWriter(out, err, color=False, live=False, show_stream=False)
    feed = MicFeed(InputDevice(7, "fake mic", 2, 48000.0, True), stream_factory=factory)
    stop = asyncio.Event()
    task = asyncio.ensure_future(run(f"ws://127.0.0.1:{server.port}", "desk", feed, writer,
                                     stop=stop))
    deadline = time.monotonic() + 20
    while not out.getvalue():  # the final, once the fake mic falls silent
        assert not task.done(), err.getvalue()
        assert time.monotonic() < deadline, err.getvalue()
        await asyncio.sleep(0.05)
    stop.set()
    assert await asyncio.wait_for(task, 20) == 0, err.getvalue()
    assert re.fullmatch(r"\[0:00\.\d → 0:0\d\.\d\] w0 w1 w2( w\d+)*\n", out.getvalue())
    assert "listening on 'fake mic' (48000 Hz)" in err.getvalue()
    summary = SUMMARY.search(err.getvalue())
    assert summary is not None, err.getvalue()
    assert (summary.group(1), summary.group(4)) == ("desk", "1")
    # Every block the capture delivered reached the server (the summary shows 0.1 s).
    assert abs(float(summary.group(2)) - feed.capture.samples_delivered / SAMPLE_RATE) <= 0.05
    assert streams[0].halt.is_set()
    assert streams[0].closed


async def test_channels_pick_one_input_of_an_interface(
    scripted: tuple[Engine, CaptionServer],
) -> None:
    """A 4-channel interface whose speech is on channel 3 only: ``--channels
    3`` sends it (the default, the first two mixed, would send silence)."""
    _, server = scripted
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.5)
    f48 = resample(int16_to_float32(audio), SAMPLE_RATE, 48000)
    board = np.zeros((len(f48), 4), np.float32)
    board[:, 2] = f48
    opened: list[int] = []

    def factory(device: InputDevice, rate: int, channels: int, blocksize: int,
                callback: Callable[..., None]) -> FakeInput:
        opened.append(channels)
        return FakeInput(board[:, :channels].copy(), rate, blocksize, callback, speed=4)

    out, err = io.StringIO(), io.StringIO()
    writer = LiveWriter(out, err, color=False, live=False, show_stream=False)
    feed = MicFeed(InputDevice(7, "interface", 4, 48000.0, True), channels=(3,),
                   stream_factory=factory)
    stop = asyncio.Event()
    task = asyncio.ensure_future(run(f"ws://127.0.0.1:{server.port}", "guest", feed, writer,
                                     stop=stop))
    deadline = time.monotonic() + 20
    while not out.getvalue():
        assert not task.done(), err.getvalue()
        assert time.monotonic() < deadline, err.getvalue()
        await asyncio.sleep(0.05)
    stop.set()
    assert await asyncio.wait_for(task, 20) == 0, err.getvalue()
    assert opened == [3]
    assert re.fullmatch(r"\[0:00\.\d → 0:0\d\.\d\] w0 w1 w2( w\d+)*\n", out.getvalue())


async def test_channels_the_device_lacks_are_refused_naming_the_option() -> None:
    """``--channels 3`` on a 2-channel microphone: the error names
    ``--channels``, what was typed (it named ``audio.channels``, a setting
    of the server's config the client was never given)."""
    from evoxtral_stream.audio.sources import AudioInputError

    def factory(*_: Any) -> FakeInput:
        raise AssertionError("a device without channel 3 was opened")

    feed = MicFeed(InputDevice(7, "Desk Mic", 2, 48000.0, True), channels=(3,),
                   stream_factory=factory)
    with pytest.raises(AudioInputError) as refused:
        feed.start(lambda _: None)
    assert str(refused.value) == ("--channels asks for channel 3, but audio device "
                                  "'Desk Mic' has 2 input channel(s)")


@pytest.mark.parametrize("argv", [["--channels", "0"], ["--channels", "2,2"],
                                  ["--channels", "x"], ["--channels", "1", "--list-devices"]])
def test_bad_channels_are_a_usage_error(argv: list[str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "--channels" in capsys.readouterr().err


@pytest.mark.parametrize(("channels", "finals"), [("3", 1), ("1,2", 0)])
async def test_channels_pick_the_channels_of_a_file(
    scripted: tuple[Engine, CaptionServer], tmp_path: Path, channels: str, finals: int,
) -> None:
    """A 3-channel recording whose speech is on channel 3 only: ``--channels
    3`` sends it, ``--channels 1,2`` the silence of the other two."""
    _, server = scripted
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.5)
    board = np.zeros((len(audio), 3), np.int16)
    board[:, 2] = audio
    wav = tmp_path / "board.wav"
    sf.write(wav, board, SAMPLE_RATE, subtype="PCM_16")
    proc = await start_client("--url", f"ws://127.0.0.1:{server.port}", "--file", str(wav),
                              "--channels", channels, "--stream", "board")
    out, err = await finish(proc)
    assert proc.returncode == 0, err
    assert len(out.splitlines()) == finals, out
    summary = SUMMARY.search(err)
    assert summary is not None, err
    assert summary.group(4) == str(finals)
    assert abs(float(summary.group(2)) - len(audio) / SAMPLE_RATE) < 0.1


async def test_a_client_started_without_stdout_streams_its_file_unprinted(
    scripted: tuple[Engine, CaptionServer], tmp_path: Path,
) -> None:
    """Started with descriptor 1 closed (``>&-``), Python's stdout is None:
    mic_client.py ended before it connected (AttributeError, status 1).
    Its printed captions are a side output, as serve's are: they are
    dropped, the file is streamed whole and its summary is on stderr."""
    _, server = scripted
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    wav = write_wav(tmp_path / "talk.wav", audio)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENTS / "mic_client.py"), "--url",
        f"ws://127.0.0.1:{server.port}", "--file", str(wav), "--stream", "quiet",
        stderr=asyncio.subprocess.PIPE, preexec_fn=lambda: os.close(1))
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()
    summary = SUMMARY.search(err.decode())
    assert summary is not None, err.decode()
    assert (summary.group(1), summary.group(4)) == ("quiet", "1")


async def test_the_device_list_without_stdout_is_refused() -> None:
    """``--list-devices`` is there to print: with descriptor 1 closed it is
    one error line and status 2, not a list dropped."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENTS / "mic_client.py"), "--list-devices",
        stderr=asyncio.subprocess.PIPE, preexec_fn=lambda: os.close(1))
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, err.decode().splitlines()) == (2, [
        "mic_client.py: error: standard output is closed: the input devices have nowhere "
        "to go (>/dev/null drops them)"])


async def test_channels_a_file_lacks_are_refused_naming_the_option(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "talk.wav", speech_with_pauses(SENTENCES[:1], 0.5)[0])
    proc = await start_client("--url", "ws://127.0.0.1:9", "--file", str(wav),
                              "--channels", "3")
    out, err = await finish(proc, 20)
    assert proc.returncode == 2, err
    assert err == f"error: --channels asks for channel 3, but audio file {wav} has 2 channel(s)\n"
    assert out == ""


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--url", "ws://127.0.0.1:9", "--file", "{wav}"], 1, "cannot stream to ws://127.0.0.1:9"),
    (["--file", "/nonexistent.wav"], 2, "audio file /nonexistent.wav does not exist"),
    (["--url", "ws://{server}", "--file", "{wav}", "--stream", "busy"], 1, "stream_busy"),
    (["--url", "ws://{server}", "--file", "{wav}", "--language", "fr"], 1,
     "bad_config: unknown language 'fr' (known: en only: the backend cannot switch languages)"),
    (["--url", "ftp://x"], 2, "not a ws://HOST:PORT URL"),
])
async def test_errors_are_one_line(
    scripted: tuple[Engine, CaptionServer], tmp_path: Path,
    args: list[str], code: int, message: str,
) -> None:
    engine, server = scripted
    wav = write_wav(tmp_path / "talk.wav", speech_with_pauses(SENTENCES[:1], 0.5)[0])
    busy = engine.open_stream("busy", source="test")
    proc = await start_client(*(a.format(wav=wav, server=f"127.0.0.1:{server.port}")
                                for a in args))
    out, err = await finish(proc, 20)
    await busy.close()
    assert proc.returncode == code, err
    assert message in err
    assert "Traceback" not in err
    assert out == ""


@pytest.mark.parametrize("route", [[], ["--file", "-"]], ids=["microphone", "pipe"])
@pytest.mark.parametrize(("text", "message"), [
    (None, "config file {path} does not exist"),
    ("[vad]\naggressiveness = 7\n", "vad.aggressiveness must be 0..3, got 7"),
], ids=["missing", "bad-value"])
async def test_an_engine_config_that_does_not_load_is_one_line_and_status_2(
    tmp_path: Path, route: list[str], text: str | None, message: str,
) -> None:
    """The microphone and a live pipe take their ``[audio]`` settings from
    the file ``$EVOXTRAL_CONFIG`` names, as the engine does: one that does
    not load is a bad argument, one line naming the variable (it was a
    traceback and status 1), before connecting."""
    path = tmp_path / "engine.toml"
    if text is not None:
        path.write_text(text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENTS / "mic_client.py"), "--url", "ws://127.0.0.1:9", *route,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**client_env(), "EVOXTRAL_CONFIG": str(path)})
    out, err = await asyncio.wait_for(proc.communicate(b""), 30)
    assert proc.returncode == 2, err
    assert err.decode() == \
        f"error: $EVOXTRAL_CONFIG={path}: {message.format(path=path)}\n"
    assert out == b""


# --- access tokens ---------------------------------------------------------------------


@pytest.mark.parametrize(("args", "env_token"), accepted_token_cases("ingest"))
async def test_file_streams_with_a_token(
    guarded: tuple[Engine, CaptionServer], tmp_path: Path, args: list[str],
    env_token: str | None,
) -> None:
    _, server = guarded
    wav = write_wav(tmp_path / "talk.wav", speech_with_pauses(SENTENCES[:1], 0.8)[0])
    proc = await start_client("--url", f"ws://127.0.0.1:{server.port}", "--file", str(wav),
                              "--stream", "desk", *args, env=client_env(env_token))
    out, err = await finish(proc)
    assert proc.returncode == 0, err
    assert re.fullmatch(r"\[0:00\.\d → 0:0\d\.\d\] w0 w1( w\d+)*\n", out), out
    summary = SUMMARY.search(err)
    assert summary is not None, err
    assert (summary.group(1), summary.group(4)) == ("desk", "1")


@pytest.mark.parametrize(("args", "env_token", "line"),
                         refused_token_cases("ingest"))
async def test_a_refused_token_is_one_line_and_status_1(
    guarded: tuple[Engine, CaptionServer], tmp_path: Path, args: list[str],
    env_token: str | None, line: str,
) -> None:
    engine, server = guarded
    wav = write_wav(tmp_path / "talk.wav", speech_with_pauses(SENTENCES[:1], 0.5)[0])
    proc = await start_client("--url", f"ws://127.0.0.1:{server.port}", "--file", str(wav),
                              "--stream", "desk", *args, env=client_env(env_token))
    out, err = await finish(proc, 20)
    assert proc.returncode == 1, err
    # The feed announces itself before connecting; then the refusal, alone.
    assert err.splitlines()[1:] == [line], err
    assert out == ""
    assert "desk" not in engine.streams


async def test_a_lost_microphone_is_reported_and_reopened() -> None:
    streams: list[LiveStream] = []

    def factory(device: InputDevice, rate: int, channels: int, blocksize: int,
                callback: Callable[..., None]) -> LiveStream:
        # The first stream falls silent after 0.3 s, as an unplugged one does.
        cut = rate * 3 // 10 if not streams else None
        streams.append(LiveStream(tone(rate=rate), rate, channels, blocksize, callback,
                                  unplug_at=cut))
        return streams[-1]

    feed = MicFeed(InputDevice(7, "fake mic", 1, 48000.0, True), stream_factory=factory)
    said: list[str] = []
    feed.start(said.append)
    deadline = time.monotonic() + 20   # audio.stall_timeout_s is 2 s by default
    while not any("is back" in s for s in said):
        assert time.monotonic() < deadline, said
        await asyncio.sleep(0.05)
    feed.close()
    lost = [s for s in said if "delivered no audio" in s]
    assert len(lost) == 1 and "'fake mic'" in lost[0] and len(streams) == 2


# --- reconnecting --------------------------------------------------------------------


@pytest.mark.parametrize(("end", "again"), [
    (SessionEnd("desk", 1000, None, True), False),        # done: the summary came
    (SessionEnd("desk", 1001, "shutting_down", False), True),  # server going away
    (SessionEnd("desk", 1006, None, False), True),        # the network failed
    (SessionEnd("desk", 1011, None, False), True),        # keepalive ping timed out
    (SessionEnd("desk", 1012, None, False), True),        # service restart
    (SessionEnd(None, 1008, "stream_busy", False), True),  # still held by the lost one
    (SessionEnd(None, 1008, "too_many_streams", False), True),
    (SessionEnd("desk", 1008, "idle_timeout", False), True),  # the mic was away
    (SessionEnd(None, 1008, "bad_config", False), False),  # would be refused again
    (SessionEnd("desk", 1008, "too_fast", False), False),
    (SessionEnd("desk", 1009, "too_large", False), False),
    (SessionEnd("desk", 1000, None, False), False),        # closed normally, no summary
    (SessionEnd("desk", 1007, None, False), False),        # invalid UTF-8: a client bug
])
def test_which_endings_are_reconnected(end: SessionEnd, again: bool) -> None:
    assert should_reconnect(end) is again


def feed_without_portaudio() -> MicFeed:
    """A MicFeed whose blocks the test hands in (``_on_audio``): its capture
    is never started."""
    def no_portaudio(*_: object) -> LiveStream:
        raise AssertionError("the capture is not started in this test")

    return MicFeed(InputDevice(7, "fake mic", 1, float(SAMPLE_RATE), True),
                   stream_factory=no_portaudio)


def capture_blocks(feed: MicFeed, *values: int) -> None:
    """One 20 ms block per value, each filled with that value, as captured."""
    for value in values:
        feed._on_audio(np.full(320, value, np.int16))


async def settle() -> None:
    """Let the tasks started so far run until they wait."""
    for _ in range(20):
        await asyncio.sleep(0)


class SentBlocks:
    """Stands in for the connection: what MicFeed.send sends, as the first sample of each block."""

    def __init__(self) -> None:
        self.first_samples: list[int] = []

    async def send(self, data: bytes) -> None:
        self.first_samples.append(int(np.frombuffer(data, "<i2")[0]))


async def test_a_connection_lost_while_the_feed_waits_for_audio_loses_no_block() -> None:
    """The session cancels MicFeed.send when its connection ends, usually while
    it waits for the next block (they come every 20 ms). Nothing it started
    may stay behind and take a block: the next connection gets them all."""
    feed = feed_without_portaudio()
    stop = asyncio.Event()
    lost = asyncio.ensure_future(feed.send(SentBlocks(), stop))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)   # waiting for a block
    lost.cancel()
    await asyncio.gather(lost, return_exceptions=True)
    for value in (1, 2, 3):     # captured while reconnecting
        feed._on_audio(np.full(320, value, np.int16))
    again = SentBlocks()
    stop.set()                  # send what is queued, then return
    await asyncio.wait_for(feed.send(again, stop), 5)  # type: ignore[arg-type]
    assert again.first_samples == [1, 2, 3]


@dataclass(frozen=True)
class RestartRun:
    feed: MicFeed
    err: io.StringIO
    ended: EndedStreams
    finals: list[CaptionEvent]
    """The finals the second server made."""


async def through_a_server_restart(
    factory: Callable[..., LiveStream], *, outage_s: float,
    done: Callable[[str, list[CaptionEvent]], bool],
) -> RestartRun:
    """Run the client (stream ``desk``) on ``factory``'s microphone against a
    server that goes away after the first final printed and comes back on
    the same port ``outage_s`` after the client's first reconnect attempt;
    stop the client once ``done(printed, finals of the second server)``,
    and check that it exits 0."""
    port = free_port()
    cfg = load_config(overrides={"server.port": port}, env={})
    ended = EndedStreams()
    finals: list[CaptionEvent] = []

    def on_final(event: EngineEvent) -> None:
        if isinstance(event, CaptionEvent) and event.final:
            finals.append(event)

    out, err = io.StringIO(), io.StringIO()
    writer = LiveWriter(out, err, color=False, live=False, show_stream=False)
    feed = MicFeed(InputDevice(7, "fake mic", 1, float(SAMPLE_RATE), True),
                   stream_factory=factory)
    stop = asyncio.Event()
    client: asyncio.Future[int] | None = None

    async def until(cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not cond():
            assert client is None or not client.done(), err.getvalue()
            assert time.monotonic() < deadline, f"no {what}: {err.getvalue()}"
            await asyncio.sleep(0.02)

    async with Engine(cfg, ScriptedBackend(words)) as engine, \
            CaptionServer(engine, cfg.server):
        engine.add_listener(ended)
        client = asyncio.ensure_future(run(f"ws://127.0.0.1:{port}", "desk", feed, writer,
                                           stop=stop, backoff_s=(0.1, 0.4)))
        await until(lambda: out.getvalue().count("\n") >= 1, "final before the restart")
    # Server down: the client retries while the microphone keeps capturing.
    await until(lambda: "reconnecting in" in err.getvalue(), "reconnect attempt")
    await asyncio.sleep(outage_s)
    async with Engine(cfg, ScriptedBackend(words)) as engine, \
            CaptionServer(engine, cfg.server):
        engine.add_listener(ended)
        engine.add_listener(on_final)
        await until(lambda: "reconnected as desk after" in err.getvalue(), "reconnection")
        await until(lambda: done(out.getvalue(), finals), "finals after the restart")
        stop.set()
        assert await asyncio.wait_for(client, 30) == 0, err.getvalue()
    return RestartRun(feed, err, ended, finals)


async def test_the_microphone_stream_survives_a_server_restart() -> None:
    """The server goes away mid-stream and comes back on the same port: the
    client reconnects as the same stream and the audio captured meanwhile is
    sent, so the two connections' audio adds up to all that was captured."""
    audio, _ = speech_with_pauses(SENTENCES * 2, pause_s=1.2)
    streams: list[LiveStream] = []

    def factory(device: InputDevice, rate: int, channels: int, blocksize: int,
                callback: Callable[..., None]) -> LiveStream:
        streams.append(LiveStream(playback(int16_to_float32(audio)), rate, channels,
                                  blocksize, callback))
        return streams[-1]

    r = await through_a_server_restart(factory, outage_s=1.0,
                                       done=lambda out, _: out.count("\n") >= 3)
    feed, err, ended = r.feed, r.err, r.ended
    assert [e.stream for e in ended] == ["desk", "desk"]
    sent_s = sum(e.duration_s for e in ended)
    assert sent_s == pytest.approx(feed.capture.samples_delivered / SAMPLE_RATE, abs=0.05)
    assert ended[1].duration_s > 1.0     # the outage's audio was kept and sent
    summary = SUMMARY.search(err.getvalue())
    assert summary is not None and summary.group(1) == "desk", err.getvalue()
    assert len(streams) == 1             # one capture all along


async def test_no_reconnect_ends_at_the_first_lost_connection(tmp_path: Path) -> None:
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.0)
    cfg = load_config(overrides={"server.port": 0}, env={})
    out, err = io.StringIO(), io.StringIO()
    writer = LiveWriter(out, err, color=False, live=False, show_stream=False)
    async with Engine(cfg, ScriptedBackend(words)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        client = asyncio.ensure_future(run(f"ws://127.0.0.1:{server.port}", "desk",
                                           FileFeed(audio), writer, reconnect=False))
        deadline = time.monotonic() + 30
        while not engine.streams:
            assert time.monotonic() < deadline and not client.done(), err.getvalue()
            await asyncio.sleep(0.02)
    assert await asyncio.wait_for(client, 30) == 1
    assert "the server closed the stream early (close code 1001)" in err.getvalue()
    assert "reconnecting" not in err.getvalue()


async def test_a_cut_connection_is_reconnected_while_the_server_still_holds_the_stream(
) -> None:
    """The network cuts the link mid-sentence and the server stays up: it
    flushes the lost connection's stream (a slow model: that takes a while),
    refusing the reconnect with stream_busy meanwhile, which the client
    retries; no audio the capture delivered is lost."""
    audio, spans = speech_with_pauses(SENTENCES * 2, pause_s=1.2)
    ended = EndedStreams()
    cfg = load_config(overrides={"server.port": 0}, env={})

    def factory(device: InputDevice, rate: int, channels: int, blocksize: int,
                callback: Callable[..., None]) -> LiveStream:
        return LiveStream(playback(int16_to_float32(audio)), rate, channels, blocksize,
                          callback)

    out, err = io.StringIO(), io.StringIO()
    writer = LiveWriter(out, err, color=False, live=False, show_stream=False)
    feed = MicFeed(InputDevice(7, "fake mic", 1, float(SAMPLE_RATE), True),
                   stream_factory=factory)
    stop = asyncio.Event()
    async with Engine(cfg, ScriptedBackend(words, delay_s=0.5)) as engine, \
            CaptionServer(engine, cfg.server) as server, Relay(server.port) as proxy:
        engine.add_listener(ended)
        client = asyncio.ensure_future(run(f"ws://127.0.0.1:{proxy.port}", "desk", feed,
                                           writer, stop=stop, backoff_s=(0.05, 0.2)))
        deadline = time.monotonic() + 30
        # Mid-way through the second sentence (the capture plays in real time).
        middle = (spans[1][0] + spans[1][1]) // 2
        while feed.capture.samples_delivered < middle:
            assert time.monotonic() < deadline and not client.done(), err.getvalue()
            await asyncio.sleep(0.02)
        proxy.drop()
        while "reconnected as desk" not in err.getvalue():
            assert time.monotonic() < deadline and not client.done(), err.getvalue()
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)
        stop.set()
        assert await asyncio.wait_for(client, 30) == 0, err.getvalue()
    assert "connection lost (close code 1006)" in err.getvalue()
    assert "stream_busy" in err.getvalue()
    assert [e.stream for e in ended] == ["desk", "desk"]
    sent_s = sum(e.duration_s for e in ended)
    assert sent_s == pytest.approx(feed.capture.samples_delivered / SAMPLE_RATE, abs=0.05)


class SentItems:
    """Stands in for the connection: each block sent as its first sample, each
    ``lost`` message as ``("lost", samples)``; fails (as a lost connection
    does) on sending the item ``fail_at``."""

    def __init__(self, fail_at: int | str | None = None) -> None:
        self.items: list[int | tuple[str, int]] = []
        self.fail_at = fail_at

    async def send(self, data: str | bytes) -> None:
        if isinstance(data, str):
            message = json.loads(data)
            item: int | tuple[str, int] = (message["type"], message["samples"])
        else:
            item = int(np.frombuffer(data, "<i2")[0])
        if item == self.fail_at or (isinstance(item, tuple) and item[0] == self.fail_at):
            raise ConnectionClosed(None, None)
        self.items.append(item)


async def test_dropped_blocks_are_declared_lost_in_their_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The samples dropped at a full queue are declared right before the next
    block sent, once; a connection declares none before its first block (its
    stream starts there), and those dropped after the last block before the end."""
    monkeypatch.setattr(mic_client, "MAX_QUEUED_BLOCKS", 2)

    feed = feed_without_portaudio()

    def capture(*values: int) -> None:
        capture_blocks(feed, *values)

    stop = asyncio.Event()
    capture(1, 2, 3, 4)                 # 3 and 4 find the queue full
    a = SentItems(fail_at=6)
    sending = asyncio.ensure_future(feed.send(a, stop))  # type: ignore[arg-type]
    await settle()
    capture(5)
    await settle()
    capture(6, 7, 8, 9)                 # 8 and 9 dropped; sending 6 fails
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(sending, 5)
    assert a.items == [1, 2, ("lost", 640), 5]
    capture(10)                         # after 8 and 9
    b = SentItems(fail_at="lost")
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(feed.send(b, stop), 5)  # type: ignore[arg-type]
    assert b.items == [6, 7]
    capture(11, 12, 13, 14)             # 13 and 14 dropped, after the last block
    c = SentItems()
    stop.set()
    await asyncio.wait_for(feed.send(c, stop), 5)  # type: ignore[arg-type]
    # 10 starts this connection's stream: 8 and 9 lie before it, in no stream.
    assert c.items == [10, 11, 12, ("lost", 640)]
    assert (feed.declared, feed.undeclared) == (1280, 0)


async def test_audio_dropped_while_the_server_restarts_is_declared_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a queue of 0.2 s, most of what the microphone captures while the
    server is away is dropped; the client declares it lost on the new
    connection, so the two streams' timelines still add up to all that was
    captured and the captions after the loss come at their true time."""
    monkeypatch.setattr(mic_client, "MAX_QUEUED_BLOCKS", 10)
    audio, spans = speech_with_pauses(SENTENCES * 2, pause_s=1.2)

    def factory(device: InputDevice, rate: int, channels: int, blocksize: int,
                callback: Callable[..., None]) -> LiveStream:
        return LiveStream(playback(int16_to_float32(audio)), rate, channels, blocksize,
                          callback)

    r = await through_a_server_restart(factory, outage_s=1.5,
                                       done=lambda _, finals: len(finals) >= 2)
    feed, err, ended, finals = r.feed, r.err, r.ended, r.finals
    assert [e.stream for e in ended] == ["desk", "desk"]
    sent_s = sum(e.duration_s for e in ended)
    assert sent_s == pytest.approx(feed.capture.samples_delivered / SAMPLE_RATE, abs=0.05)
    assert "(their time is sent as lost audio)" in err.getvalue()
    assert feed.declared > SAMPLE_RATE, "more than 1 s was dropped and declared"
    assert feed.undeclared == 0
    # The second stream starts where the first one's audio ended: each of its
    # segments ends where its sentence ends in the capture (a segment may
    # start later than its sentence, whose start was dropped).
    first = round(ended[0].duration_s * SAMPLE_RATE)
    ends = [(b - first) / SAMPLE_RATE for _, b in spans if b > first]
    for final in finals:
        assert min(abs(final.end - e) for e in ends) < 0.3, (final, ends, feed.declared)


async def test_lost_audio_past_what_a_connection_takes_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server takes MAX_LOST_S of lost audio at once (then real time):
    the client declares no more, and says how much it could not."""
    monkeypatch.setattr(mic_client, "MAX_QUEUED_BLOCKS", 2)
    monkeypatch.setattr(mic_client, "MAX_LOST_S", 0.1)

    feed = feed_without_portaudio()
    said: list[str] = []
    feed._status = said.append
    capture_blocks(feed, *range(1, 103))  # 3..102 dropped: 2 s
    sent = SentItems()
    stop = asyncio.Event()
    sending = asyncio.ensure_future(feed.send(sent, stop))  # type: ignore[arg-type]
    await settle()
    capture_blocks(feed, 103)
    stop.set()
    await asyncio.wait_for(sending, 5)
    assert sent.items[:2] == [1, 2] and sent.items[3:] == [103]
    kind, declared = sent.items[2]      # type: ignore[misc]
    assert kind == "lost" and 1600 <= declared < 32000
    assert (feed.declared, feed.undeclared) == (declared, 32000 - declared)
    assert any(f"{(32000 - declared) / SAMPLE_RATE:.1f} s of lost audio were more than the "
               "server takes at once (0.1 s)" in s for s in said), said


# --- audio on its way ------------------------------------------------------------------


class RecordingWriter(LiveWriter):
    """A LiveWriter (no colour, not live) that keeps every message shown to it."""

    def __init__(self) -> None:
        self.said = io.StringIO()
        """The status lines."""
        super().__init__(io.StringIO(), self.said, color=False, live=False, show_stream=False)
        self.events: list[dict[str, Any]] = []

    def show(self, event: Mapping[str, Any]) -> None:
        self.events.append(dict(event))
        super().show(event)

    def last(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e.get("type") == kind), None)


async def test_a_stalled_link_bounds_the_audio_on_its_way_by_the_servers_acknowledgements(
) -> None:
    """The client reaches a real server through a relay whose uplink stalls:
    what it sends waits in the sockets, which take minutes of audio here
    (megabytes), so the queue alone would not start dropping for that long.
    The server's ingest.progress acknowledgements stop with the link, so once
    10 s of the microphone's audio is on its way (queued, or sent and not
    acknowledged) the client drops new blocks. When the link moves again the server takes what was
    held up, the client declares what it dropped as lost, and the server's
    timeline is all that was captured."""
    audio, _ = speech_with_pauses(SENTENCES * 4, pause_s=1.0)
    f48 = resample(int16_to_float32(audio), SAMPLE_RATE, 48000)
    # No server keepalive: its pongs would wait on the stalled link too.
    cfg = load_config(overrides={"server.port": 0, "server.ping_interval_s": 0}, env={})

    def factory(device: InputDevice, rate: int, channels: int, blocksize: int,
                callback: Callable[..., None]) -> LiveStream:
        return LiveStream(playback(f48), rate, channels, blocksize, callback)

    writer = RecordingWriter()
    feed = MicFeed(InputDevice(7, "fake mic", 1, 48000.0, True), stream_factory=factory)
    stop = asyncio.Event()
    async with Engine(cfg, ScriptedBackend(words)) as engine, \
            CaptionServer(engine, cfg.server) as server, StallingRelay(server.port) as relay:

        def on_its_way() -> int:
            """Samples captured, not dropped and not yet taken by the server."""
            taken = round(engine.stats().audio_s * SAMPLE_RATE)
            return feed.capture.samples_delivered - feed._lost - taken

        async def until(cond: Callable[[], bool], what: str, within: float = 30) -> None:
            deadline = time.monotonic() + within
            while not cond():
                assert not client.done(), writer.said.getvalue()
                assert time.monotonic() < deadline, f"no {what}: {writer.said.getvalue()}"
                await asyncio.sleep(0.02)

        client = asyncio.ensure_future(run(f"ws://127.0.0.1:{relay.port}", "desk", feed,
                                           writer, stop=stop))
        await until(lambda: engine.stats().audio_s >= 1.0, "audio at the server")
        relay.flowing.clear()
        stalled_at = feed.capture.samples_delivered
        # 1 s of blocks dropped; or (no bound on what the sockets hold) 14 s more captured.
        await until(lambda: feed._lost >= SAMPLE_RATE
                    or feed.capture.samples_delivered - stalled_at > 14 * SAMPLE_RATE,
                    "dropped blocks", 40)
        forwarded, way = relay.forwarded, on_its_way()
        await asyncio.sleep(0.5)
        later = on_its_way()
        assert relay.forwarded == forwarded  # the link is stalled
        relay.flowing.set()
        await until(lambda: feed._lost == 0, "block kept after the stall")
        await asyncio.sleep(1.0)
        stop.set()
        assert await asyncio.wait_for(client, 30) == 0, writer.said.getvalue()

    # Up to the bound, past what the server had taken; its acknowledgements
    # trail that by less than 0.5 s, and the bound counts from them.
    # (A block from a 48 kHz microphone holds about 490 samples: soxr's output comes unevenly.)
    assert 9.45 * SAMPLE_RATE < way <= 10 * SAMPLE_RATE, way / SAMPLE_RATE
    assert later == way  # every block captured meanwhile was dropped
    assert "audio blocks: the connection was too slow or away (their time is sent as " \
        "lost audio)" in writer.said.getvalue()
    summary = writer.last("ingest.summary")
    assert summary is not None, writer.said.getvalue()
    assert feed.declared >= SAMPLE_RATE and feed.undeclared == 0
    assert summary["lost"] == pytest.approx(feed.declared / SAMPLE_RATE, abs=0.01)
    assert summary["duration"] == pytest.approx(
        feed.capture.samples_delivered / SAMPLE_RATE, abs=0.05)


@pytest.mark.parametrize("answer", [True, False, None])
async def test_the_bound_holds_only_where_the_server_acknowledges(answer: bool | None) -> None:
    """The client asks for acknowledgements. A server that says it sends them
    (and then sends none) gets 10 s of audio; the rest is dropped and
    declared lost. One that says it does not (false), or says nothing (one
    older than the option), gets all of it, as before the option: only the
    queue bounds the audio there."""
    configs: list[dict[str, Any]] = []
    received, lost = [0], [0]

    async def handler(ws: ServerConnection) -> None:
        configs.append(json.loads(await ws.recv()))
        ready: dict[str, Any] = {"type": "ingest.ready", "stream": "desk",
                                 "sample_rate": SAMPLE_RATE, "channels": 1, "format": "pcm16",
                                 "language": "en"}
        if answer is not None:
            ready["progress"] = answer
        await ws.send(json.dumps(ready))
        async for message in ws:
            if isinstance(message, bytes):
                received[0] += len(message) // 2
                continue
            if (msg := json.loads(message))["type"] == "lost":
                lost[0] += msg["samples"]
            elif msg["type"] == "end":
                await ws.send(json.dumps({
                    "type": "ingest.summary", "stream": "desk",
                    "duration": (received[0] + lost[0]) / SAMPLE_RATE, "segments": 0,
                    "finals": 0, "partials": 0, "errors": 0, "lost": lost[0] / SAMPLE_RATE}))
                await ws.close()
                return

    def factory(device: InputDevice, rate: int, channels: int, blocksize: int,
                callback: Callable[..., None]) -> FakeInput:
        return FakeInput(np.zeros((rate, channels), np.float32), rate, blocksize, callback,
                         speed=4)

    writer = RecordingWriter()
    feed = MicFeed(InputDevice(7, "fake mic", 1, 48000.0, True), stream_factory=factory)
    stop = asyncio.Event()
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        client = asyncio.ensure_future(run(f"ws://127.0.0.1:{port}", "desk", feed, writer,
                                           stop=stop))
        deadline = time.monotonic() + 30
        while feed.capture.samples_delivered < 12 * SAMPLE_RATE:  # 3 s at 4x
            assert time.monotonic() < deadline and not client.done(), writer.said.getvalue()
            await asyncio.sleep(0.05)
        stop.set()
        assert await asyncio.wait_for(client, 30) == 0, writer.said.getvalue()

    assert [c.get("progress") for c in configs] == [True]
    captured = feed.capture.samples_delivered
    assert received[0] + lost[0] == captured
    assert (feed.declared, feed.undeclared) == (lost[0], 0)
    if answer:
        assert 9.95 * SAMPLE_RATE < received[0] <= 10 * SAMPLE_RATE  # within a block
    else:
        assert received[0] == captured


async def test_each_connection_bounds_its_own_audio_on_its_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bound counts the audio queued, or sent on the current connection
    and not acknowledged on it: each connection counts from 0, as its server
    does, and none bounds what waits for the next connection."""
    monkeypatch.setattr(mic_client, "MAX_IN_FLIGHT_S", 0.1)  # 5 blocks of 320

    feed = feed_without_portaudio()

    def capture(*values: int) -> None:
        capture_blocks(feed, *values)

    stop = asyncio.Event()
    a, acks = SentItems(), mic_client.Progress()
    sending = asyncio.ensure_future(feed.send(a, stop, acks))  # type: ignore[arg-type]
    await settle()
    capture(1, 2, 3, 4, 5, 6)           # 6 would be a sixth block on its way
    await settle()
    acks.frames = 640                   # the server has taken 1 and 2
    capture(7, 8, 9)                    # room for two
    await settle()
    sending.cancel()                    # the connection is lost
    await asyncio.gather(sending, return_exceptions=True)
    assert a.items == [1, 2, 3, 4, 5, ("lost", 320), 7, 8]
    capture(10, 11)                     # captured while reconnecting: queued
    b = SentItems()
    sending = asyncio.ensure_future(
        feed.send(b, stop, mic_client.Progress()))  # type: ignore[arg-type]
    await settle()
    capture(12, 13, 14, 15)             # 10 and 11 went first: room for three
    await settle()
    stop.set()
    await asyncio.wait_for(sending, 5)
    # 9 lies before this connection's stream; 15 after its last block.
    assert b.items == [10, 11, 12, 13, 14, ("lost", 320)]
    assert (feed.declared, feed.undeclared) == (640, 0)


async def test_a_file_waits_out_a_stalled_link_instead_of_bursting_its_backlog() -> None:
    """--file's feed reaches a real server through a relay whose uplink stalls
    for 6 s, twice the burst the server lets a client send at once (3 s, then
    2x real time). The feed keeps at most its bound (1 s) of audio sent and
    not acknowledged, waiting for the acknowledgements, and when the link
    moves again it is never more than that bound behind its real-time
    schedule: the rest of the file goes later instead of the whole stall's
    backlog at once (which the server would refuse as too_fast). Nothing is
    dropped: the server's timeline is the whole file."""
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.0)
    seconds = len(audio) / SAMPLE_RATE
    # No server keepalive: its pongs would wait on the stalled link too.
    cfg = load_config(overrides={"server.port": 0, "server.ping_interval_s": 0,
                                 "server.ingest_burst_s": 3.0,
                                 "server.max_ingest_speed": 2.0}, env={})
    writer = RecordingWriter()
    feed = FileFeed(audio, max_behind_s=1.0)
    async with Engine(cfg, ScriptedBackend(words)) as engine, \
            CaptionServer(engine, cfg.server) as server, StallingRelay(server.port) as relay:
        t0 = time.monotonic()
        client = asyncio.ensure_future(run(f"ws://127.0.0.1:{relay.port}", "desk", feed,
                                           writer))
        deadline = time.monotonic() + 30
        while engine.stats().audio_s < 1.0:
            assert time.monotonic() < deadline and not client.done(), writer.said.getvalue()
            await asyncio.sleep(0.02)
        relay.flowing.clear()
        await asyncio.sleep(6.0)
        forwarded = relay.forwarded
        # Sent and not yet taken by the server, at the end of the stall.
        way = feed.sent - round(engine.stats().audio_s * SAMPLE_RATE)
        relay.flowing.set()
        status = await asyncio.wait_for(client, 30)
        elapsed = time.monotonic() - t0
    assert status == 0, writer.said.getvalue()
    assert relay.forwarded > forwarded  # the link was stalled, then moved
    assert 0 < way <= SAMPLE_RATE, way / SAMPLE_RATE
    summary = writer.last("ingest.summary")
    assert summary is not None, writer.said.getvalue()
    assert summary["duration"] == pytest.approx(seconds, abs=0.01)
    assert summary["lost"] == 0
    # The stall's 6 s, less the second in flight at most and the second
    # behind, moved the rest of the file later.
    assert 3.5 < feed.pace.delayed < 6.0, feed.pace.delayed
    assert elapsed >= seconds + feed.pace.delayed - 0.3
    assert "later than real-time pace" in writer.said.getvalue()


async def test_audio_a_broken_link_held_up_is_sent_again_on_the_next_connection() -> None:
    """The uplink stalls for 3 s and then breaks (a keepalive gives up, the
    network fails): the audio sent meanwhile waited in the sockets and never
    reached the server. The client sends it again first on the next
    connection, ahead of what it captured while reconnecting, so the two
    streams hold all that was captured but for at most the half second the
    server may have taken unacknowledged. It used to be lost without a
    word, up to 10 s of it."""
    audio, _ = speech_with_pauses(SENTENCES * 3, pause_s=1.0)
    # No server keepalive: it would close the stalled connection itself.
    cfg = load_config(overrides={"server.port": 0, "server.ping_interval_s": 0}, env={})

    def factory(device: InputDevice, rate: int, channels: int, blocksize: int,
                callback: Callable[..., None]) -> LiveStream:
        return LiveStream(playback(int16_to_float32(audio)), rate, channels, blocksize,
                          callback)

    writer = RecordingWriter()
    feed = MicFeed(InputDevice(7, "fake mic", 1, float(SAMPLE_RATE), True),
                   stream_factory=factory)
    ended = EndedStreams()
    stop = asyncio.Event()
    async with Engine(cfg, ScriptedBackend(words)) as engine, \
            CaptionServer(engine, cfg.server) as server, StallingRelay(server.port) as relay:
        engine.add_listener(ended)

        async def until(cond: Callable[[], bool], what: str) -> None:
            deadline = time.monotonic() + 30
            while not cond():
                assert not client.done(), writer.said.getvalue()
                assert time.monotonic() < deadline, f"no {what}: {writer.said.getvalue()}"
                await asyncio.sleep(0.02)

        client = asyncio.ensure_future(run(f"ws://127.0.0.1:{relay.port}", "desk", feed,
                                           writer, stop=stop, backoff_s=(0.05, 0.2)))
        await until(lambda: engine.stats().audio_s >= 1.0, "audio at the server")
        relay.flowing.clear()
        await asyncio.sleep(3.0)
        relay.drop()
        relay.flowing.set()
        await until(lambda: "reconnected as desk" in writer.said.getvalue(), "reconnection")
        await asyncio.sleep(1.5)
        stop.set()
        assert await asyncio.wait_for(client, 30) == 0, writer.said.getvalue()
    assert [e.stream for e in ended] == ["desk", "desk"]
    captured = feed.capture.samples_delivered / SAMPLE_RATE
    taken = sum(e.duration_s for e in ended)
    assert captured - 0.55 <= taken <= captured + 0.05, (captured, taken)
    # About 3 s were held up (less the half second the server may take
    # unacknowledged, and less on a busy machine whose playback thread
    # captured less in those 3 s of wall time); none used to be resent.
    assert feed.resent >= 1.5 * SAMPLE_RATE, feed.resent / SAMPLE_RATE
    assert feed.dropped == 0 and feed.declared == 0
    assert "that did not reach the server before the connection was lost" \
        in writer.said.getvalue()


async def test_a_file_sends_again_what_a_broken_link_held_up() -> None:
    """--file on the same link (stalled 2 s, then broken): the next connection
    goes on from what the server acknowledged (and the half second it may
    have taken), not from what was sent, so no part of the file is lost."""
    audio, _ = speech_with_pauses(SENTENCES * 2, pause_s=1.0)
    cfg = load_config(overrides={"server.port": 0, "server.ping_interval_s": 0}, env={})
    writer = RecordingWriter()
    feed = FileFeed(audio)
    ended = EndedStreams()
    async with Engine(cfg, ScriptedBackend(words)) as engine, \
            CaptionServer(engine, cfg.server) as server, StallingRelay(server.port) as relay:
        engine.add_listener(ended)
        client = asyncio.ensure_future(run(f"ws://127.0.0.1:{relay.port}", "desk", feed,
                                           writer, backoff_s=(0.05, 0.2)))
        deadline = time.monotonic() + 30
        while engine.stats().audio_s < 1.0:
            assert time.monotonic() < deadline and not client.done(), writer.said.getvalue()
            await asyncio.sleep(0.02)
        relay.flowing.clear()
        await asyncio.sleep(2.0)
        relay.drop()
        relay.flowing.set()
        assert await asyncio.wait_for(client, 60) == 0, writer.said.getvalue()
    seconds = len(audio) / SAMPLE_RATE
    taken = sum(e.duration_s for e in ended)
    assert len(ended) == 2
    assert seconds - 0.55 <= taken <= seconds + 0.01, (seconds, taken)
    assert feed.resent >= 1.4 * SAMPLE_RATE, feed.resent / SAMPLE_RATE
    assert "goes again" in writer.said.getvalue()


async def test_a_file_cut_short_while_sent_ends_its_stream_with_one_error_line(
    scripted: tuple[Engine, CaptionServer], tmp_path: Path,
) -> None:
    """--file decodes the file as it sends it: a file cut to a third while
    it is sent (rotated, overwritten) ends its audio where its bytes end,
    with one error line; the server still finishes the captions of the
    audio before (its summary), and the exit status is 2, as for a pipe
    that fails. The file used to be read whole before connecting, so the
    cut went unseen, and a file of hours was held in memory whole."""
    audio, _ = speech_with_pauses(SENTENCES * 2, pause_s=1.0)
    wav = write_wav(tmp_path / "talk.wav", audio)
    proc = await start_client("--url", f"ws://127.0.0.1:{scripted[1].port}", "--file", str(wav),
                              "--stream", "cut")
    assert proc.stderr is not None
    err_before = ""
    while "streaming to" not in (line := (await proc.stderr.readline()).decode()):
        assert line, "the client exited before streaming"
        err_before += line
    size = wav.stat().st_size
    with wav.open("r+b") as f:
        f.truncate(size // 3)
    _, err = await finish(proc)
    err = err_before + err
    assert proc.returncode == 2, err
    cut = [line for line in err.splitlines() if "cut short" in line]
    assert cut == [f"error: cannot read audio file {wav} past {cut[0].split(' past ')[1]}"], err
    assert cut[0].endswith(f"it was cut short while read ({size} bytes when opened, "
                           f"{size // 3} now); its audio ends there; the captions of the audio "
                           "before are finished"), err
    summary = SUMMARY.search(err)
    assert summary is not None, err
    assert summary.group(1) == "cut"
    # The audio ends where the pass met the cut: at the third, or past it
    # by what was decoded before the cut landed (blocks of 1.5 s here, read
    # as sent: a loaded machine that cuts late), never at the file's end.
    seconds = len(audio) / SAMPLE_RATE
    past = float(cut[0].split(" past ")[1].split(" s: ")[0])
    assert seconds / 3 - 0.2 < past < seconds - 1, (seconds, err)
    assert past - 0.2 < float(summary.group(2)) < past + 0.2, (past, err)
    assert "Traceback" not in err


async def test_audio_sent_again_after_a_lost_connection_keeps_its_lost_declarations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Blocks dropped between two blocks are declared before the second; the
    server took none of the audio past half a second after its last
    acknowledgement, so neither did it take such a declaration there. Sent
    again on the next connection, those blocks used to go without it, and
    everything after the drop came early on the new timeline."""
    monkeypatch.setattr(mic_client, "MAX_QUEUED_BLOCKS", 40)
    feed = feed_without_portaudio()
    capture_blocks(feed, *range(1, 43))  # 41 and 42 find the queue full
    stop = asyncio.Event()
    a, acks = SentItems(), mic_client.Progress()
    sending = asyncio.ensure_future(feed.send(a, stop, acks))  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        while len(a.items) < 40:
            await asyncio.sleep(0)
    capture_blocks(feed, 43)
    async with asyncio.timeout(5):
        while len(a.items) < 42:
            await asyncio.sleep(0)
    sending.cancel()                     # lost, nothing acknowledged
    await asyncio.gather(sending, return_exceptions=True)
    assert a.items == [*range(1, 41), ("lost", 640), 43]
    feed.rewind(acks)                    # the server took at most the first 0.5 s
    b = SentItems()
    stop.set()
    await asyncio.wait_for(feed.send(b, stop, mic_client.Progress()), 5)  # type: ignore[arg-type]
    assert b.items == [*range(26, 41), ("lost", 640), 43]


# The client from a microphone that is lost at once, whose PortAudio then
# hangs (hung_refresh_lines).
_HUNG_REFRESH = r"""
import os, runpy, sys
sys.path.insert(0, os.environ["CLIENTS"])
""" + hung_refresh_lines("rate // 2") + r"""
sys.argv = [os.path.join(os.environ["CLIENTS"], "mic_client.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


async def test_the_client_exits_while_a_lost_microphone_s_refresh_hangs(
        scripted: tuple[Engine, CaptionServer], tmp_path: Path) -> None:
    """The device refresh before a reopen hangs for good, then Ctrl-C: the
    stream ended and the client left its loop, but sounddevice's exit
    handler terminated PortAudio again on the main thread, inside which the
    refresh was stuck, and the process never exited. Now it exits with its
    status, leaving the stuck thread, as serve does."""
    root = CLIENTS.parent
    marker = tmp_path / "refresh-hangs"
    config = tmp_path / "c.toml"
    config.write_text("[audio]\nstall_timeout_s = 0.5\nreopen_interval_s = 0.2\n")
    _, server = scripted
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HUNG_REFRESH, "--url", f"ws://127.0.0.1:{server.port}",
        "--stream", "desk", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=root, env={**client_env(), "CLIENTS": str(CLIENTS), "HUNG_MARKER": str(marker),
                       "EVOXTRAL_CONFIG": str(config),
                       "PYTHONPATH": f"{root / 'src'}:{root}"})
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.returncode is None and time.monotonic() < deadline
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = await finish(proc)
        except TimeoutError:
            raise AssertionError("the client did not exit while the refresh hangs") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    assert "delivered no audio" in err
