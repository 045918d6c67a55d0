"""``serve``'s exit status with a file or pipe source whose audio could not
all be read: 1, as ``transcribe``'s for a file it could not read to the end,
with the one error line; the streams that clients send play no part."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from evoxtral_stream.events import SAMPLE_RATE
from tests.speech import have_espeak, speak

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")

_ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _speech(seconds: float) -> np.ndarray:
    """Sentences and pauses, ``seconds`` long at 16 kHz."""
    one = np.concatenate([speak("Good morning everyone."), np.zeros(SAMPLE_RATE // 2, np.int16)])
    reps = int(seconds * SAMPLE_RATE) // len(one) + 1
    return np.tile(one, reps)[:int(seconds * SAMPLE_RATE)]


def _serve(*args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "evoxtral_stream", "serve", "--port", "0", "--no-print",
         "--exit-at-end", *args],
        stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_ENV)


def _until_serving(proc: subprocess.Popen[str]) -> list[str]:
    """stderr's lines up to serve's "serving captions on" line."""
    assert proc.stderr is not None
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        if "serving captions on " in line:
            return lines
    proc.kill()
    raise AssertionError(f"serve did not start: {''.join(lines)}")


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _assert_one_error_line(err: list[str], needle: str) -> None:
    errors = [line for line in err if "ERROR" in line or "error:" in line]
    assert len(errors) == 1 and needle in errors[0], "".join(err)
    assert "Traceback" not in "".join(err)


def test_a_file_cut_short_while_played_exits_1(tmp_path: Path) -> None:
    """The file is whole when serve probes it and cut to 3 s once it plays:
    its stream ends with the one error line, and ``--exit-at-end`` exits 1
    (it exited 0, as for a file played to its end)."""
    path = tmp_path / "talk.wav"
    sf.write(path, _speech(20), SAMPLE_RATE, subtype="PCM_16")
    proc = _serve("--source", str(path))
    try:
        err = _until_serving(proc)
        # 3 s: less than the pass's first block, and past the first 64 KiB
        # (a cut inside them before the pass opens the file, which is on its
        # thread, is taken for another file: read as found).
        os.truncate(path, 44 + 2 * 3 * SAMPLE_RATE)
        assert proc.stderr is not None
        err += proc.stderr.readlines()
        assert proc.wait(120) == 1, "".join(err)
    finally:
        _end(proc)
    _assert_one_error_line(err, "cut short while read")


def test_a_pipe_whose_read_fails_exits_1() -> None:
    """Standard input is a socket that its writer resets after a header and
    some speech (RST, ``SO_LINGER`` 0): the read fails with "Connection
    reset by peer", one error line, and ``--exit-at-end`` exits 1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        writer = socket.create_connection(listener.getsockname())
        reader, _ = listener.accept()
    header = (b"RIFF" + struct.pack("<I", 0) + b"WAVE" + b"fmt "
              + struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16)
              + b"data" + struct.pack("<I", 0))
    with reader:
        proc = _serve("--source", "-", stdin=reader.fileno())
    try:
        writer.sendall(header + _speech(3).astype("<i2").tobytes())
        err = _until_serving(proc)
        writer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        assert proc.stderr is not None
        rest: list[str] = []
        drain = threading.Thread(target=lambda: rest.extend(proc.stderr or ()), daemon=True)
        drain.start()
        assert proc.wait(120) == 1, "".join(err + rest)
        drain.join(30)
        err += rest
    finally:
        writer.close()
        _end(proc)
    _assert_one_error_line(err, "Connection reset by peer")
