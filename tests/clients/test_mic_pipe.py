"""clients/mic_client.py ``--file -``: standard input read live when it is a
pipe carrying WAV (``arecord -t wav | mic_client.py --file -``), and a named
FIFO given by its path likewise, against a real server; the pipe is real (a
subprocess's stdin, an OS pipe written by a thread, or a FIFO), its writer
keeping it open."""

from __future__ import annotations

import asyncio
import io
import os
import re
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import mic_client
import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
from mic_client import PipeFeed, run, stdin_feed
from viewer import LiveWriter

from evoxtral_stream.audio.resample import int16_to_float32, resample
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import SAMPLE_RATE, Int16Array
from evoxtral_stream.server.app import CaptionServer
from tests.clients.conftest import CLIENTS
from tests.fakes import ScriptedBackend
from tests.helpers.events import EndedStreams
from tests.helpers.http import free_port
from tests.speech import have_espeak, speak, speech_with_pauses

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")

SENTENCES = ["Good evening and welcome.", "Thank you for listening."]
SUMMARY = re.compile(r"^(\S+): ([\d.]+) s of audio, (\d+) segments, (\d+) finals, "
                     r"(\d+) partials, (\d+) errors$", re.M)
FINAL = re.compile(r"\[\d:\d\d\.\d → \d:\d\d\.\d\] w0( w\d+)*")


def words(audio: npt.NDArray[np.float32]) -> str:
    return " ".join(f"w{i}" for i in range(len(audio) // 8000))


@pytest.fixture
async def scripted() -> AsyncIterator[CaptionServer]:
    cfg = load_config(overrides={"server.port": 0}, env={})
    async with Engine(cfg, ScriptedBackend(words)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        yield server


def live_wav(frames: npt.NDArray[np.float32], rate: int) -> bytes:
    """``frames`` (frames, channels) as a live writer sends WAV: 16-bit, the
    data size 0 (unknown: ``arecord``, ``ffmpeg -f wav -``)."""
    buf = io.BytesIO()
    sf.write(buf, frames, rate, format="WAV", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    at = data.index(b"data")
    data[at + 4:at + 8] = struct.pack("<I", 0)
    return bytes(data)


def at_48k(audio: Int16Array) -> npt.NDArray[np.float32]:
    return resample(int16_to_float32(audio), SAMPLE_RATE, 48000)


class Client:
    """mic_client.py as a process whose standard input is a pipe the test writes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [asyncio.ensure_future(self._read(proc.stdout, self.out)),
                         asyncio.ensure_future(self._read(proc.stderr, self.err))]

    @classmethod
    async def start(cls, *args: str) -> Client:
        return cls(await asyncio.create_subprocess_exec(
            sys.executable, str(CLIENTS / "mic_client.py"), *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE))

    @staticmethod
    async def _read(stream: asyncio.StreamReader, lines: list[str]) -> None:
        while line := await stream.readline():
            lines.append(line.decode().rstrip("\n"))

    async def write(self, data: bytes, speed: float | None = None, rate: int = 48000,
                    frame_bytes: int = 4) -> None:
        """Write ``data``; with ``speed``, in 0.1 s pieces of audio at that
        many times real time (a writer pacing itself)."""
        stdin = self.proc.stdin
        assert stdin is not None
        if speed is None:
            stdin.write(data)
            await stdin.drain()
            return
        piece = rate // 10 * frame_bytes
        t0 = time.monotonic()
        for i, at in enumerate(range(0, len(data), piece)):
            stdin.write(data[at:at + piece])
            await stdin.drain()
            await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.1 / speed - time.monotonic()))

    async def until(self, cond: Callable[[], bool], what: str, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while not cond():
            assert self.proc.returncode is None, f"exited before {what}: {self.err}"
            assert time.monotonic() < deadline, f"no {what} within {within} s: {self.err}"
            await asyncio.sleep(0.02)

    async def finish(self, within: float = 30) -> tuple[str, str]:
        """Close the pipe (its end) and wait for the client to exit."""
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        await asyncio.wait_for(self.proc.wait(), within)
        await asyncio.gather(*self._readers)
        return "\n".join(self.out), "\n".join(self.err)


async def test_a_live_wav_pipe_is_captioned_as_it_comes_and_ends_with_it(
    scripted: CaptionServer,
) -> None:
    """A 48 kHz stereo WAV pipe, a tone on channel 1 and speech on channel 2,
    ``--channels 2``: its pieces go as they come, not at real-time pace, so
    the first sentence's final arrives while the writer still holds the pipe
    open, well before the audio's own time; closing the pipe sends ``end``,
    which flushes the second sentence (nothing after it ends it)."""
    lead = np.zeros(10 * SAMPLE_RATE, np.int16)  # paced, the first final would come 10 s later
    first, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.5)
    audio = np.concatenate([lead, first, speak(SENTENCES[1])])
    voice = at_48k(audio)
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(len(voice)) / 48000)
    wav = live_wav(np.stack([tone, voice], axis=1).astype(np.float32), 48000)
    client = await Client.start("--url", f"ws://127.0.0.1:{scripted.port}", "--file", "-",
                                "--stream", "desk", "--channels", "2")
    await client.write(wav[:4096])
    await client.until(lambda: any("streaming to desk" in e for e in client.err), "connection")
    t0 = time.monotonic()
    # Three times real time: well within what the server takes (4x past a 30 s burst).
    await client.write(wav[4096:], speed=3.0)
    await client.until(lambda: len(client.out) >= 1, "final while the pipe is open")
    elapsed = time.monotonic() - t0
    assert elapsed < 9.0, f"paced to real time? the first final took {elapsed:.1f} s"
    assert client.proc.returncode is None
    out, err = await client.finish()
    assert client.proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and all(FINAL.fullmatch(line) for line in lines), out
    summary = SUMMARY.search(err)
    assert summary is not None, err
    assert (summary.group(1), summary.group(4), summary.group(6)) == ("desk", "2", "0")
    assert abs(float(summary.group(2)) - len(audio) / SAMPLE_RATE) < 0.1
    assert "standard input: WAV, 48000 Hz, 2 channel(s)" in err
    assert "standard input ended" in err
    assert "Traceback" not in err


async def test_a_pipe_carrying_another_format_is_read_whole_and_sent_like_a_file(
    scripted: CaptionServer,
) -> None:
    """FLAC (``ffmpeg -f flac -``) is no WAV read live: the pipe is read to its
    end, then sent at real-time pace as a file is."""
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.2)
    buf = io.BytesIO()
    sf.write(buf, audio, SAMPLE_RATE, format="FLAC")
    client = await Client.start("--url", f"ws://127.0.0.1:{scripted.port}", "--file", "-")
    await client.write(buf.getvalue())
    t0 = time.monotonic()
    out, err = await client.finish()
    elapsed = time.monotonic() - t0
    assert client.proc.returncode == 0, err
    assert "carries no WAV that is read live" in err
    assert elapsed >= len(audio) / SAMPLE_RATE - 0.3, "not paced like a file"
    assert len(out.splitlines()) == 1, out
    summary = SUMMARY.search(err)
    assert summary is not None and summary.group(4) == "1", err


async def test_a_file_redirected_to_standard_input_is_sent_as_that_file(
    scripted: CaptionServer, tmp_path: Path,
) -> None:
    """``--file - < talk.wav``: no pipe, a file: sent as one, at real-time pace."""
    wav = tmp_path / "quiet.wav"
    sf.write(wav, np.zeros(SAMPLE_RATE, np.int16), SAMPLE_RATE, subtype="PCM_16")
    t0 = time.monotonic()
    with wav.open("rb") as stdin:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(CLIENTS / "mic_client.py"), "--url",
            f"ws://127.0.0.1:{scripted.port}", "--file", "-", "--stream", "quiet",
            stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err_bytes = await asyncio.wait_for(proc.communicate(), 30)
    err = err_bytes.decode()
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 >= 0.7, "not paced like a file"
    assert "streaming 1.0 s of audio at real-time pace" in err
    assert "quiet: 1.0 s of audio" in err


STEREO = live_wav(np.zeros((4800, 2), np.float32), 48000)
BAD_RATE = STEREO[:24] + struct.pack("<I", 100) + STEREO[28:]


@pytest.mark.parametrize(("stdin", "args", "message"), [
    (b"", [], "error: standard input: it ended before sending anything"),
    (STEREO, ["--channels", "3"],
     "error: --channels asks for channel 3, but standard input has 2 channel(s)"),
    (BAD_RATE, [], "error: standard input: its WAV header says 100 Hz, outside the"),
    (b"hello, no audio here at all", [], "error: cannot decode audio file /dev/stdin"),
], ids=["empty", "channels", "bad-header", "not-audio"])
async def test_a_pipe_that_cannot_be_read_is_one_line_and_status_2(
    stdin: bytes, args: list[str], message: str,
) -> None:
    """Checked before connecting: the URL leads nowhere. Not audio at all is
    found once the pipe is read whole, after the line that says it is."""
    client = await Client.start("--url", "ws://127.0.0.1:9", "--file", "-", *args)
    await client.write(stdin)
    out, err = await client.finish()
    assert client.proc.returncode == 2, err
    lines = err.splitlines()
    assert lines[-1].startswith(message), err
    assert len(lines) == (2 if "decode" in message else 1), err
    assert out == ""


async def test_a_terminal_on_standard_input_is_refused() -> None:
    import pty

    controller, terminal = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(CLIENTS / "mic_client.py"), "--url", "ws://127.0.0.1:9",
            "--file", "-", stdin=terminal, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        os.close(controller)
        os.close(terminal)
    assert proc.returncode == 2, err
    assert out == b""
    assert err.decode().startswith("error: --file - reads standard input, which is a terminal")


class PipeWriter(threading.Thread):
    """Writes ``data`` into the pipe ``fd`` at real-time pace (16 kHz mono
    16-bit WAV: 3200 bytes per 0.1 s), then closes it: the stream's end."""

    def __init__(self, fd: int, data: bytes) -> None:
        super().__init__(daemon=True)
        self.fd, self.data = fd, data

    def run(self) -> None:
        t0 = time.monotonic()
        for i, at in enumerate(range(0, len(self.data), 3200)):
            os.write(self.fd, self.data[at:at + 3200])
            time.sleep(max(0.0, t0 + (i + 1) * 0.1 - time.monotonic()))
        os.close(self.fd)


async def test_a_live_pipe_survives_a_server_restart_and_its_end_ends_the_stream() -> None:
    """The server goes away mid-stream and comes back on the same port: the
    client reconnects as the same stream and sends the audio the pipe gave
    meanwhile (held: within 10 s), so the two connections' audio adds up to
    all the pipe carried; the pipe's end then ends the stream, with no stop."""
    audio, _ = speech_with_pauses(SENTENCES * 2, pause_s=1.2)
    wav = live_wav(int16_to_float32(audio)[:, None], SAMPLE_RATE)
    audio_at = wav.index(b"data") + 8
    read_fd, write_fd = os.pipe()
    os.write(write_fd, wav[:audio_at])  # the header: read before connecting
    feed = stdin_feed((), lambda _: None, fd=read_fd)
    assert isinstance(feed, PipeFeed)
    port = free_port()
    cfg = load_config(overrides={"server.port": port}, env={})
    ended = EndedStreams()
    out, err = io.StringIO(), io.StringIO()
    writer = LiveWriter(out, err, color=False, live=False, show_stream=False)
    client: asyncio.Future[int] | None = None

    async def until(cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not cond():
            assert client is None or not client.done(), err.getvalue()
            assert time.monotonic() < deadline, f"no {what}: {err.getvalue()}"
            await asyncio.sleep(0.02)

    pipe_writer = PipeWriter(write_fd, wav[audio_at:])
    try:
        async with Engine(cfg, ScriptedBackend(words)) as engine, \
                CaptionServer(engine, cfg.server):
            engine.add_listener(ended)
            pipe_writer.start()
            client = asyncio.ensure_future(run(f"ws://127.0.0.1:{port}", "desk", feed, writer,
                                               backoff_s=(0.1, 0.4)))
            await until(lambda: out.getvalue().count("\n") >= 1, "final before the restart")
        await until(lambda: "reconnecting in" in err.getvalue(), "reconnect attempt")
        await asyncio.sleep(1.0)
        async with Engine(cfg, ScriptedBackend(words)) as engine, \
                CaptionServer(engine, cfg.server):
            engine.add_listener(ended)
            await until(lambda: "reconnected as desk after" in err.getvalue(), "reconnection")
            assert await asyncio.wait_for(client, 30) == 0, err.getvalue()
    finally:
        pipe_writer.join(30)
        os.close(read_fd)
    assert [e.stream for e in ended] == ["desk", "desk"]
    sent_s = sum(e.duration_s for e in ended)
    assert sent_s == pytest.approx(len(audio) / SAMPLE_RATE, abs=0.05), err.getvalue()
    assert ended[1].duration_s > 1.0     # the outage's audio was kept and sent
    assert "standard input ended" in err.getvalue()
    assert feed.failed is None


async def test_audio_the_pipe_gives_past_10_s_while_away_is_dropped_and_declared() -> None:
    """No connection while the pipe gives 15 s of audio, then ends: 10 s of
    it wait for the connection (the microphone's bound), the rest is dropped,
    counted, and declared lost before ``end``."""
    data = live_wav(np.full((15 * SAMPLE_RATE, 1), 0.1, np.float32), SAMPLE_RATE)
    audio_at = data.index(b"data") + 8
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data[:audio_at])
    data = data[audio_at:]
    feed = stdin_feed((), lambda _: None, fd=read_fd)
    assert isinstance(feed, PipeFeed)
    statuses: list[str] = []
    feed.start(statuses.append)

    def write_and_end() -> None:
        os.write(write_fd, data)
        os.close(write_fd)

    done = threading.Thread(target=write_and_end, daemon=True)
    done.start()
    deadline = time.monotonic() + 30
    while not any("ended" in s for s in statuses):
        assert time.monotonic() < deadline, statuses
        await asyncio.sleep(0.02)
    done.join(10)
    sent: list[bytes | str] = []

    class Connection:
        async def send(self, message: bytes | str) -> None:
            sent.append(message)

    await asyncio.wait_for(feed.send(Connection(), asyncio.Event()), 10)  # type: ignore[arg-type]
    audio = sum(len(m) // 2 for m in sent if isinstance(m, bytes))
    assert audio == pytest.approx(10 * SAMPLE_RATE, abs=SAMPLE_RATE * 0.05)
    assert isinstance(sent[-1], str) and '"lost"' in sent[-1]
    assert audio + feed.declared == 15 * SAMPLE_RATE
    assert any("dropped" in s for s in statuses), statuses


async def test_a_pipe_that_fails_mid_stream_ends_the_stream_and_is_reported(
    scripted: CaptionServer, tmp_path: Path,
) -> None:
    """Reading fails after the header (here: the descriptor turns into a
    folder's): the audio before is sent, the stream ends, the error is said,
    and the feed says it failed (mic_client.py then exits with status 2)."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, live_wav(np.zeros((1600, 1), np.float32), SAMPLE_RATE))
    feed = stdin_feed((), lambda _: None, fd=read_fd)
    assert isinstance(feed, PipeFeed)
    folder = os.open(tmp_path, os.O_RDONLY)
    os.dup2(folder, read_fd)  # the next read fails: EISDIR
    os.close(folder)
    out, err = io.StringIO(), io.StringIO()
    writer = LiveWriter(out, err, color=False, live=False, show_stream=False)
    try:
        code = await asyncio.wait_for(run(f"ws://127.0.0.1:{scripted.port}", "desk", feed,
                                          writer), 30)
    finally:
        os.close(write_fd)
        os.close(read_fd)
    assert code == 0, err.getvalue()
    assert feed.failed is not None
    assert "error: cannot read standard input: Is a directory" in err.getvalue()
    assert "desk: 0.1 s of audio" in err.getvalue()


def test_the_pipe_feed_is_public() -> None:
    assert {"PipeFeed", "path_feed", "stdin_feed"} <= set(mic_client.__all__)


async def test_a_fifo_named_by_its_path_is_read_live(
    scripted: CaptionServer, tmp_path: Path,
) -> None:
    """``--file audio.fifo`` (``mkfifo``, ``arecord -t wav > audio.fifo``)
    is a live pipe, as ``serve --source audio.fifo`` reads it: the first
    sentence's final arrives while the writer still holds the FIFO open. It
    used to be copied whole first, waiting for the writer's end. Closing it
    ends the stream, as the end of standard input's pipe does."""
    fifo = tmp_path / "audio.fifo"
    os.mkfifo(fifo)
    first, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.5)
    second = speak(SENTENCES[1])
    wav = live_wav(int16_to_float32(np.concatenate([first, second]))[:, None], SAMPLE_RATE)
    split = len(wav) - 2 * len(second)
    client = await Client.start("--url", f"ws://127.0.0.1:{scripted.port}", "--file",
                                str(fifo), "--stream", "desk")
    # Opening a FIFO for writing waits for its reader: the client.
    writer = await asyncio.wait_for(asyncio.to_thread(open, fifo, "wb", buffering=0), 30)
    try:
        await asyncio.to_thread(writer.write, wav[:split])
        await client.until(lambda: len(client.out) >= 1, "final while the FIFO is open")
        assert client.proc.returncode is None
        await asyncio.to_thread(writer.write, wav[split:])
    finally:
        writer.close()
    out, err = await client.finish()
    assert client.proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and all(FINAL.fullmatch(line) for line in lines), out
    assert f"pipe {fifo}: WAV, 16000 Hz, 1 channel(s)" in err
    assert f"pipe {fifo} ended" in err
    summary = SUMMARY.search(err)
    assert summary is not None and summary.group(1) == "desk", err


async def test_a_fifo_carrying_another_format_is_read_whole_and_sent_like_a_file(
    scripted: CaptionServer, tmp_path: Path,
) -> None:
    """FLAC into a FIFO is no WAV read live: as on standard input, it is
    read to its end, then sent at real-time pace as a file is."""
    fifo = tmp_path / "audio.fifo"
    os.mkfifo(fifo)
    buf = io.BytesIO()
    sf.write(buf, np.zeros(SAMPLE_RATE, np.int16), SAMPLE_RATE, format="FLAC")
    client = await Client.start("--url", f"ws://127.0.0.1:{scripted.port}", "--file",
                                str(fifo), "--stream", "quiet")
    with await asyncio.wait_for(asyncio.to_thread(open, fifo, "wb"), 30) as writer:
        await asyncio.to_thread(writer.write, buf.getvalue())
    _, err = await client.finish()
    assert client.proc.returncode == 0, err
    assert f"pipe {fifo} carries no WAV that is read live" in err
    assert "streaming 1.0 s of audio at real-time pace" in err
    assert "quiet: 1.0 s of audio" in err


async def test_a_pipe_without_a_name_given_by_its_path_is_still_read_whole(
    scripted: CaptionServer,
) -> None:
    """``--file <(ffmpeg -i talk.mp4 -f wav -)``: a pipe named only through
    ``/dev/fd`` is the documented way to play a converted file, so it is
    read to its end and sent at real-time pace as a file, not live (a
    converter is far faster than real time: the server would refuse it)."""
    r, w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(CLIENTS / "mic_client.py"), "--url",
            f"ws://127.0.0.1:{scripted.port}", "--file", f"/dev/fd/{r}", "--stream", "quiet",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, pass_fds=(r,))
    finally:
        os.close(r)
    t0 = time.monotonic()
    await asyncio.to_thread(os.write, w, live_wav(np.zeros((SAMPLE_RATE, 1), np.float32),
                                                  SAMPLE_RATE))
    os.close(w)
    _, err_bytes = await asyncio.wait_for(proc.communicate(), 30)
    err = err_bytes.decode()
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 >= 0.7, "not paced like a file"
    assert "streaming 1.0 s of audio at real-time pace" in err
    assert "quiet: 1.0 s of audio" in err


async def test_a_socket_named_by_its_path_is_one_line_saying_how_to_read_it(
    tmp_path: Path,
) -> None:
    """A socket is read as standard input (``socat``), as ``serve`` reads
    one: its path is one line that says how, and status 2."""
    import socket

    path = tmp_path / "audio.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(1)
        client = await Client.start("--url", "ws://127.0.0.1:9", "--file", str(path))
        out, err = await client.finish()
    assert client.proc.returncode == 2, err
    assert err.splitlines() == [
        f"error: {path} is a socket, read only as standard input: "
        f"`socat UNIX-CONNECT:{path} - | mic_client.py --file -`"], err
    assert out == ""
