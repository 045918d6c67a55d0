"""What a live WAV pipe costs the process that reads it (``serve --source -``).

A writer process sends WAV into a real OS pipe, as fast as the pipe takes it
or at real-time pace as a live writer does, in pieces of a given size
(``arecord`` sends a period, 1024 frames, at a time), and
:class:`~evoxtral_stream.audio.pipe.PipeCapture` reads, decodes, mixes and
resamples it to 16 kHz mono on its thread, handing each piece to the event
loop. The table gives the process CPU time per second of audio (so the
share of one core a live pipe of that format takes), beside the reference:
the same audio as a file read whole by libsndfile
(:func:`~evoxtral_stream.audio.sources.read_audio_file`), the path of
``serve --source FILE``. Both deliver the same samples (checked).

Usage: ``python bench/pipe_read.py [--seconds 600] [--live-seconds 30] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from evoxtral_stream.audio.microphone import ChannelRoute
from evoxtral_stream.audio.pipe import PipeCapture, PipeEnd
from evoxtral_stream.audio.sources import read_audio_file
from evoxtral_stream.events import Int16Array

__all__ = ["FORMATS", "Row", "main", "measure"]

#: (name, rate, channels, soundfile subtype) of the streams measured.
FORMATS = (("16 kHz mono 16-bit (arecord -r 16000)", 16000, 1, "PCM_16"),
           ("48 kHz stereo 16-bit (arecord -f dat)", 48000, 2, "PCM_16"),
           ("48 kHz stereo float (ffmpeg -c:a pcm_f32le)", 48000, 2, "FLOAT"))
#: Piece sizes in frames a writer sends at a time: arecord's period, and
#: one of 1 ms at 16 kHz (a worst case: the reader wakes for every one).
PIECES = (1024, 16)


@dataclass(frozen=True)
class Row:
    stream: str
    path: str
    audio_s: float
    wall_s: float
    cpu_s: float

    @property
    def core_percent(self) -> float:
        """CPU seconds per second of audio, as a percentage of one core."""
        return 100.0 * self.cpu_s / self.audio_s


def _wav(seconds: float, rate: int, channels: int, subtype: str) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    data = np.stack([tone * (0.5 + 0.5 * c) for c in range(channels)], 1)
    buf = io.BytesIO()
    sf.write(buf, data, rate, subtype=subtype, format="WAV")
    wav = bytearray(buf.getvalue())
    at = wav.index(b"data")
    wav[at + 4:at + 8] = struct.pack("<I", 0)  # as a live writer sends it
    return bytes(wav)


#: The writer, a process of its own so that the CPU measured is the reader's:
#: argv is the WAV file, the bytes a write and the bytes a second (0: as fast
#: as the pipe takes them).
_WRITER = r"""
import os, sys, time
data = open(sys.argv[1], "rb").read()
piece, rate = int(sys.argv[2]), int(sys.argv[3])
out = sys.stdout.fileno()
t0 = time.monotonic()
for at in range(0, len(data), piece):
    os.write(out, data[at:at + piece])
    if rate:
        ahead = t0 + (at + piece) / rate - time.monotonic()
        if ahead > 0.002:
            time.sleep(ahead)
"""


def _through_pipe(wav: Path, piece_bytes: int, bytes_per_s: int
                  ) -> tuple[Int16Array, float, float]:
    """The samples a PipeCapture delivers of the WAV file ``wav`` written into
    a pipe by another process, and the wall and CPU seconds of this one."""
    blocks: list[Int16Array] = []
    ends: list[PipeEnd] = []
    ended = asyncio.Event()

    def on_end(end: PipeEnd) -> None:
        ends.append(end)
        ended.set()

    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(wav), str(piece_bytes),
                               str(bytes_per_s)], stdout=subprocess.PIPE)
    assert writer.stdout is not None
    fd = writer.stdout.fileno()

    async def run() -> None:
        cap = PipeCapture(Path("-"), block_ms=20, max_pending_blocks=100, fd=fd, name="bench")
        await asyncio.to_thread(cap.read_header)
        cap.start(asyncio.get_running_loop(), [ChannelRoute(blocks.append, ())], on_end)
        await ended.wait()
        cap.stop()

    t0, c0 = time.perf_counter(), time.process_time()
    asyncio.run(run())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    writer.wait()
    writer.stdout.close()
    if ends != [PipeEnd(None)]:
        raise RuntimeError(f"the pipe ended badly: {ends}")
    return np.concatenate(blocks), wall, cpu


def measure(seconds: float, live_seconds: float) -> list[Row]:
    """Each format: the file read whole, the pipe as fast as it goes in
    pieces of ``PIECES[0]`` frames, and ``live_seconds`` of it written at
    real-time pace in pieces of each of ``PIECES`` (a live writer: the
    reader wakes for each piece)."""
    rows: list[Row] = []
    for name, rate, channels, subtype in FORMATS:
        frame_bytes = channels * (2 if subtype == "PCM_16" else 4)
        with tempfile.TemporaryDirectory() as tmp:
            for audio_s in (seconds, live_seconds):
                live = _wav(audio_s, rate, channels, subtype)
                path = Path(tmp) / f"{audio_s}.wav"
                path.write_bytes(_whole(live))
                (Path(tmp) / f"{audio_s}.live.wav").write_bytes(live)
            path = Path(tmp) / f"{seconds}.wav"
            t0, c0 = time.perf_counter(), time.process_time()
            want = read_audio_file(path)
            rows.append(Row(name, "file, read whole (reference)", seconds,
                            time.perf_counter() - t0, time.process_time() - c0))
            runs = [(seconds, PIECES[0], 0)] + [(live_seconds, n, rate * frame_bytes)
                                                 for n in PIECES]
            for audio_s, frames, pace in runs:
                expected = want if audio_s == seconds else read_audio_file(
                    Path(tmp) / f"{audio_s}.wav")
                got, wall, cpu = _through_pipe(Path(tmp) / f"{audio_s}.live.wav",
                                               frames * frame_bytes, pace)
                if not np.array_equal(got, expected):
                    raise RuntimeError(f"{name}: the pipe gave other samples than the file")
                how = "at real-time pace" if pace else "as fast as it goes"
                rows.append(Row(name, f"pipe, {frames} frames a write, {how}", audio_s, wall,
                                cpu))
    return rows


def _whole(wav: bytes) -> bytes:
    """``wav`` with its data size written, as a file has it."""
    data = bytearray(wav)
    at = data.index(b"data")
    data[at + 4:at + 8] = struct.pack("<I", len(data) - at - 8)
    data[4:8] = struct.pack("<I", len(data) - 8)
    return bytes(data)


def table(rows: Sequence[Row]) -> str:
    lines = ["| stream | read as | audio s | wall s | CPU s | one core at real time |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r.stream} | {r.path} | {r.audio_s:.0f} | {r.wall_s:.2f} | {r.cpu_s:.2f} | "
              f"{r.core_percent:.2f} % |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600.0,
                   help="audio per stream read whole and through the pipe as fast as it goes")
    p.add_argument("--live-seconds", type=float, default=30.0,
                   help="audio per stream written at real-time pace (takes that long)")
    p.add_argument("--json", type=Path, help="write the rows here too")
    args = p.parse_args(argv)
    rows = measure(args.seconds, args.live_seconds)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(
            {"rows": [{**asdict(r), "core_percent": r.core_percent} for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
