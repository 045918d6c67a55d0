"""Live pipes: a real OS pipe (or FIFO) written by a thread, read by
:class:`PipeCapture` into the loop as the microphone's blocks are."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import select
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from evoxtral_stream.audio.filereader import joined, open_pipe_file
from evoxtral_stream.audio.microphone import ChannelRoute
from evoxtral_stream.audio.pipe import (
    AHEAD_S,
    NotLiveAudio,
    PaceMeter,
    PipeCapture,
    PipeEnd,
    is_live_pipe,
)
from evoxtral_stream.audio.sources import AudioInputError, read_audio_channels
from evoxtral_stream.events import Int16Array


def _stereo_wav(path: Path, seconds: float = 3.0, rate: int = 48000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    data = np.stack([0.5 * np.sin(2 * np.pi * 220 * t), 0.3 * np.sin(2 * np.pi * 330 * t)], 1)
    sf.write(path, data, rate, subtype="PCM_16")
    return path.read_bytes()


def _live_header(wav: bytes) -> bytes:
    """``wav`` as a live writer sends it: data size 0 (unknown)."""
    data = bytearray(wav)
    at = data.index(b"data")
    data[at + 4:at + 8] = struct.pack("<I", 0)
    return bytes(data)


class _Writer(threading.Thread):
    """Writes ``data`` into a pipe in pieces; closes it at the end unless
    ``keep_open`` (a live writer that has not ended)."""

    def __init__(self, fd: int, data: bytes, piece: int = 1000, keep_open: bool = False
                 ) -> None:
        super().__init__(daemon=True)
        self.fd, self.data, self.piece, self.keep_open = fd, data, piece, keep_open
        self.written = 0

    def run(self) -> None:
        for at in range(0, len(self.data), self.piece):
            self.written += os.write(self.fd, self.data[at:at + self.piece])
        if not self.keep_open:
            os.close(self.fd)


class _Sink:
    def __init__(self) -> None:
        self.blocks: list[Int16Array] = []

    def __call__(self, block: Int16Array) -> None:
        self.blocks.append(block.copy())

    @property
    def samples(self) -> Int16Array:
        return np.concatenate(self.blocks) if self.blocks else np.zeros(0, np.int16)


def _capture(read_fd: int, mixes: list[tuple[int, ...]], max_pending: int = 100
             ) -> PipeCapture:
    return PipeCapture(Path("/dev/stdin"), block_ms=20, max_pending_blocks=max_pending,
                       mixes=mixes, fd=read_fd, name="the test pipe")


async def _until(cond: object, timeout: float = 60.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_pipe_gives_each_route_what_the_whole_file_gives(tmp_path: Path) -> None:
    """48 kHz stereo WAV written in pieces into a pipe: the mix of both
    channels and the second alone, resampled block by block, equal the
    samples of the same file read whole; the end comes once, after them."""
    wav = _stereo_wav(tmp_path / "s.wav")
    want = read_audio_channels(tmp_path / "s.wav", [(), (2,)])
    r, w = os.pipe()
    ends: list[PipeEnd] = []

    async def main() -> None:
        cap = _capture(r, [(), (2,)])
        writer = _Writer(w, _live_header(wav), piece=777)
        writer.start()
        fmt = await asyncio.to_thread(cap.read_header)
        assert (fmt.rate, fmt.channels) == (48000, 2)
        sinks = [_Sink(), _Sink()]
        cap.start(asyncio.get_running_loop(),
                  [ChannelRoute(sinks[0], ()), ChannelRoute(sinks[1], (2,))], ends.append)
        await _until(lambda: ends)
        assert ends == [PipeEnd(None)]
        for sink, expected in zip(sinks, want, strict=True):
            np.testing.assert_array_equal(sink.samples, expected)
        cap.stop()
        assert ends == [PipeEnd(None)]

    asyncio.run(main())
    os.close(r)


def test_a_full_hand_off_stops_the_reading_and_drops_nothing(tmp_path: Path) -> None:
    """With the loop not taking blocks, the thread stops reading once the
    hand-off holds max_pending_blocks: the writer waits (the pipe is full),
    nothing is dropped, and every sample arrives once the loop runs."""
    wav = _stereo_wav(tmp_path / "s.wav", seconds=20.0, rate=16000)
    want = read_audio_channels(tmp_path / "s.wav", [()])[0]
    r, w = os.pipe()
    cap = _capture(r, [()], max_pending=2)
    writer = _Writer(w, wav, piece=4096)
    writer.start()
    cap.read_header()
    loop = asyncio.new_event_loop()
    sink = _Sink()
    ends: list[PipeEnd] = []
    cap.start(loop, [ChannelRoute(sink, ())], ends.append)
    time.sleep(1.5)  # the loop is not running: nothing is taken
    assert writer.is_alive(), "the writer should wait on a full pipe"
    assert writer.written < len(wav)
    assert cap.waits >= 1
    assert not sink.blocks

    async def run() -> None:
        await _until(lambda: ends)

    loop.run_until_complete(run())
    loop.close()
    writer.join(5)
    assert ends == [PipeEnd(None)]
    np.testing.assert_array_equal(sink.samples, want)
    cap.stop()
    os.close(r)


def test_stop_ends_a_live_reading_promptly_with_what_was_read(tmp_path: Path) -> None:
    """A writer that never ends: stop() returns at once (well within a
    second), delivers the audio read so far with the resampler's tail, and
    on_end is never called."""
    wav = _stereo_wav(tmp_path / "s.wav", seconds=1.0)
    r, w = os.pipe()
    ends: list[PipeEnd] = []

    async def main() -> None:
        cap = _capture(r, [()])
        writer = _Writer(w, _live_header(wav), keep_open=True)
        writer.start()
        await asyncio.to_thread(cap.read_header)
        sink = _Sink()
        cap.start(asyncio.get_running_loop(), [ChannelRoute(sink, ())], ends.append)
        await _until(lambda: cap.frames_read == 48000)
        t0 = time.monotonic()
        cap.stop()
        assert time.monotonic() - t0 < 2.0
        # 1 s at 48 kHz is 16000 samples at 16 kHz, tail included.
        assert abs(len(sink.samples) - 16000) <= 1
        cap.stop()
        await asyncio.sleep(0.3)

    asyncio.run(main())
    assert ends == []
    os.close(w)
    os.close(r)


@pytest.mark.parametrize(("data", "mixes", "message"), [
    (b"ID3\x04\0\0\0\0\0\0", [()], "the test pipe: it is not a WAV stream"),
    (b"", [()], "the test pipe: it ended before sending anything"),
    (b"RIFF\0\0\0\0WAVEfmt ", [()], "the test pipe: it ended before its audio began"),
    (None, [(3,)], "audio.channels asks for channel 3, but the test pipe has 2 channel(s)"),
])
def test_read_header_refuses_with_one_line(tmp_path: Path, data: bytes | None,
                                           mixes: list[tuple[int, ...]], message: str) -> None:
    if data is None:
        data = _stereo_wav(tmp_path / "s.wav", seconds=0.1)
    r, w = os.pipe()
    writer = _Writer(w, data)
    writer.start()
    cap = _capture(r, mixes)
    with pytest.raises(AudioInputError) as e:
        cap.read_header()
    assert str(e.value).startswith(message), e.value
    assert "\n" not in str(e.value)
    writer.join(5)
    os.close(r)


def test_a_named_fifo_is_opened_and_read_live(tmp_path: Path) -> None:
    """A FIFO given by name is a live pipe: opening it waits for its writer."""
    fifo = tmp_path / "audio.fifo"
    os.mkfifo(fifo)
    assert is_live_pipe(fifo)
    assert not is_live_pipe(tmp_path)
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1600, np.int16), 16000, format="WAV", subtype="PCM_16")
    ends: list[PipeEnd] = []

    def write() -> None:
        with open(fifo, "wb") as f:
            f.write(buf.getvalue())

    async def main() -> None:
        cap = PipeCapture(fifo, block_ms=20, max_pending_blocks=10)
        assert cap.name == f"pipe {fifo}"
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        await asyncio.to_thread(cap.read_header)
        sink = _Sink()
        cap.start(asyncio.get_running_loop(), [ChannelRoute(sink, ())], ends.append)
        await _until(lambda: ends)
        assert len(sink.samples) == 1600
        cap.stop()

    asyncio.run(main())
    assert ends == [PipeEnd(None)]


def test_another_format_is_read_whole_from_where_the_look_stopped(tmp_path: Path) -> None:
    """FLAC in a pipe is not read live: NotLiveAudio carries the bytes read
    looking for a WAV header, and those with the rest of the pipe read whole
    are the file's audio."""
    flac = tmp_path / "s.flac"
    _stereo_wav(tmp_path / "s.wav", seconds=1.0)
    data, rate = sf.read(tmp_path / "s.wav", dtype="int16")
    sf.write(flac, data, rate, format="FLAC")
    r, w = os.pipe()
    writer = _Writer(w, flac.read_bytes(), piece=3)
    writer.start()
    cap = _capture(r, [(1,)])
    with pytest.raises(NotLiveAudio, match="the test pipe: it is not a WAV stream") as e:
        cap.read_header()
    assert e.value.head and flac.read_bytes().startswith(e.value.head)
    with open_pipe_file(Path("-"), e.value.head, r, [(1,)]) as audio, audio.blocks() as blocks:
        got = joined(blocks, 1)
    np.testing.assert_array_equal(got[0], read_audio_channels(flac, [(1,)])[0])
    os.close(r)


def test_stop_while_the_hand_off_is_full_delivers_every_frame_read(tmp_path: Path) -> None:
    """The loop stalled (the hand-off full, the thread waiting to hand one
    more piece on) when stop() comes: that piece was read from the pipe, so
    stop() delivers it with the rest; every frame read reaches the route."""
    wav = _stereo_wav(tmp_path / "s.wav", seconds=5.0, rate=16000)
    want = read_audio_channels(tmp_path / "s.wav", [()])[0]
    r, w = os.pipe()
    cap = _capture(r, [()], max_pending=2)
    writer = _Writer(w, _live_header(wav), piece=4096, keep_open=True)
    writer.start()
    cap.read_header()
    loop = asyncio.new_event_loop()
    sink = _Sink()
    ends: list[PipeEnd] = []
    cap.start(loop, [ChannelRoute(sink, ())], ends.append)
    deadline = time.monotonic() + 30
    while not cap.waits:  # the loop is not running: the hand-off fills
        assert time.monotonic() < deadline, "the hand-off never filled"
        time.sleep(0.02)
    read = cap.frames_read
    assert read > 2 * 16000 * 20 // 1000  # more than the two pieces held
    cap.stop()  # on this thread, the loop's, which is stalled no more
    assert cap.frames_read == read
    assert len(sink.samples) == read
    np.testing.assert_array_equal(sink.samples, want[:read])
    assert ends == []
    loop.close()
    while writer.is_alive():  # let the writer finish before its pipe closes
        if select.select([r], [], [], 0.1)[0]:
            os.read(r, 1 << 16)
    os.close(w)
    os.close(r)


def test_a_socket_named_by_its_path_is_one_line_saying_how_to_read_it(tmp_path: Path) -> None:
    """A socket is read as standard input (``socat``, inetd, systemd): one
    named by its path cannot be opened as a file, and the line says so
    instead of "No such device or address"."""
    path = tmp_path / "audio.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(1)
        assert is_live_pipe(path)
        cap = PipeCapture(path, block_ms=20, max_pending_blocks=10)
        with pytest.raises(AudioInputError) as e:
            cap.read_header()
    message = str(e.value)
    assert message.startswith(f"pipe {path} is a socket, read only as standard input"), message
    assert f"socat UNIX-CONNECT:{path} -" in message
    assert "\n" not in message


def test_a_route_whose_receiver_raises_costs_the_others_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The first of two routes raises on every block (a stream closed under
    the capture): the blocks the loop took in that turn, the end among
    them, used to be lost, so the second route missed audio and on_end
    never came. Now the second gets every sample, on_end comes once, and
    the failure is logged once with its traceback."""
    wav = _stereo_wav(tmp_path / "s.wav", seconds=2.0)
    want = read_audio_channels(tmp_path / "s.wav", [(2,)])[0]
    r, w = os.pipe()
    ends: list[PipeEnd] = []
    offered: list[int] = []

    def refusing(block: Int16Array) -> None:
        offered.append(len(block))
        raise RuntimeError("stream closed")

    async def main() -> None:
        cap = _capture(r, [(1,), (2,)])
        writer = _Writer(w, _live_header(wav), piece=777)
        writer.start()
        await asyncio.to_thread(cap.read_header)
        sink = _Sink()
        cap.start(asyncio.get_running_loop(),
                  [ChannelRoute(refusing, (1,)), ChannelRoute(sink, (2,))], ends.append)
        await _until(lambda: ends, timeout=20.0)
        assert ends == [PipeEnd(None)]
        np.testing.assert_array_equal(sink.samples, want)
        assert sum(offered) == len(want)  # offered every block all the same
        assert cap.receiver_failures == len(offered)
        cap.stop()

    with caplog.at_level(logging.INFO, logger="evoxtral_stream.audio"):
        asyncio.run(main())
    os.close(r)
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1, [rec.getMessage() for rec in errors]
    assert "audio route 1 of 2 (channel 1)" in errors[0].getMessage()
    assert errors[0].exc_info and "stream closed" in str(errors[0].exc_info[1])


def test_the_pace_meter_finds_a_writer_ahead_of_the_clock_once() -> None:
    """A live writer: what waited in the pipe (2 s) comes at once, then the
    audio at the pace it plays, a burst 4 s early included: never ahead.
    Audio more than the allowance past that (a file copied: ``cat``) is,
    once, and stays so when the writer slows down again."""
    meter = PaceMeter(16000, start=100.0, held_s=2.0, allowance_s=5.0)
    assert not meter.add(32000, 100.0)
    for second in range(1, 61):
        assert not meter.add(16000, 100.0 + second)
    assert not meter.add(4 * 16000, 160.0)  # 6 s ahead: within 2 s + 5 s
    assert meter.ahead_s is None
    assert not meter.add(16000, 160.0)  # 7 s: not past it
    assert meter.add(16000, 160.0)  # 8 s ahead at 160 s: past it
    assert meter.ahead_s == pytest.approx(8.0)
    assert not meter.add(16000, 161.0)  # found once
    assert not meter.add(0, 300.0)  # far behind the clock now: still ahead
    assert meter.ahead_s == pytest.approx(8.0)


def test_a_live_writer_whose_clock_runs_fast_is_never_found_ahead() -> None:
    """A sound card's clock is off by up to ~100 ppm: ``arecord`` running
    125 ppm fast for two days sends 21.6 s more audio than the host's clock
    counts, which passed the allowance after about 11 h (its streams then
    counted as unpaced, so the model's lag went unreported, with a line
    saying to pace a writer that was live). A writer 5 % fast is still
    found, within minutes, and one copying a file at once."""
    meter = PaceMeter(16000, start=0.0, held_s=0.0, allowance_s=5.0)
    for second in range(1, 2 * 86_400 + 1):
        assert not meter.add(16_002, float(second)), second
    assert meter.ahead_s is None
    fast = PaceMeter(16000, start=0.0, held_s=0.0, allowance_s=5.0)
    found = next(s for s in range(1, 3600) if fast.add(16_800, float(s)))
    assert found <= 600, found
    copied = PaceMeter(16000, start=0.0, held_s=0.0, allowance_s=5.0)
    assert copied.add(16000 * 600, 0.5)


def test_a_pipe_written_faster_than_it_plays_is_found_ahead_before_its_audio() -> None:
    """20 s of audio written at once (``cat talk.wav |``): on_ahead runs
    once on the loop, after what the pipe held as reading began (2 s) and
    the allowance past it, and before the audio after; every sample still
    arrives. A writer at real-time pace is never found ahead (below)."""
    audio = (np.sin(np.arange(20 * 16000) / 5) * 8000).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype="PCM_16")
    r, w = os.pipe()
    sink = _Sink()
    aheads: list[tuple[float, int]] = []
    ends: list[PipeEnd] = []

    async def main() -> None:
        cap = _capture(r, [()])
        writer = _Writer(w, buf.getvalue(), piece=1 << 16)
        writer.start()
        await asyncio.to_thread(cap.read_header)
        loop = asyncio.get_running_loop()
        cap.start(loop, [ChannelRoute(sink, ())], ends.append,
                  lambda s: aheads.append((s, len(sink.samples))))
        await _until(lambda: ends)
        cap.stop()
        assert cap.pace is not None and cap.pace.ahead_s == aheads[0][0]

    asyncio.run(main())
    os.close(r)
    assert ends == [PipeEnd(None)]
    np.testing.assert_array_equal(sink.samples, audio)
    assert len(aheads) == 1, aheads
    seconds, before = aheads[0]
    assert AHEAD_S < seconds < 10.0
    assert AHEAD_S * 16000 < before < 10 * 16000, before


def test_a_pipe_written_at_real_time_is_not_found_ahead() -> None:
    """1.5 s in 0.1 s pieces at real time, 0.5 s of it in the pipe before
    reading begins: on_ahead never runs."""
    audio = np.zeros(int(1.5 * 16000), np.int16)
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype="PCM_16")
    data = buf.getvalue()
    r, w = os.pipe()
    aheads: list[float] = []
    ends: list[PipeEnd] = []

    def write() -> None:
        t0 = time.monotonic()
        for i, at in enumerate(range(0, len(data), 3200)):
            os.write(w, data[at:at + 3200])
            time.sleep(max(0.0, t0 + (i + 1) * 0.1 - time.monotonic()))
        os.close(w)

    async def main() -> None:
        cap = _capture(r, [()])
        threading.Thread(target=write, daemon=True).start()
        await asyncio.to_thread(cap.read_header)
        await asyncio.sleep(0.5)
        cap.start(asyncio.get_running_loop(), [ChannelRoute(_Sink(), ())], ends.append,
                  aheads.append)
        await _until(lambda: ends)
        cap.stop()
        assert cap.pace is not None and cap.pace.ahead_s is None

    asyncio.run(main())
    os.close(r)
    assert ends == [PipeEnd(None)]
    assert aheads == []
