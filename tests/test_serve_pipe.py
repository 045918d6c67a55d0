"""``serve --source -``: WAV on standard input from a live writer
(``arecord -t wav |``), captioned as it comes, through the real command."""

from __future__ import annotations

import os
import queue
import struct
import subprocess
import sys
import threading
import time
from typing import IO

import numpy as np
import pytest

from evoxtral_stream.events import SAMPLE_RATE
from tests.speech import have_espeak, speak

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")

_ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

# The real command line, with a model loader that ends it, saying so.
_NO_MODEL = r"""
import sys
from evoxtral_stream import cli as cli_module
from tests.helpers.model_loader import replace_model_loader
def load(cfg):
    sys.exit("the model loader was called")
replace_model_loader(load)
sys.exit(cli_module.main(sys.argv[1:]))
"""


def _live_wav_header(rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit mono WAV header as a live writer sends it: sizes unknown (0)."""
    return (b"RIFF" + struct.pack("<I", 0) + b"WAVE" + b"fmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", 0))


def _speech_then_silence(text: str) -> bytes:
    silence = np.zeros(int(1.5 * SAMPLE_RATE), np.int16)
    audio = np.concatenate([silence[:SAMPLE_RATE // 2], speak(text), silence])
    return bytes(audio.astype("<i2").tobytes())


def _lines(stream: IO[bytes], into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line.decode())


def test_a_live_pipe_is_captioned_before_it_ends() -> None:
    """The writer sends a sentence and a pause and keeps the pipe open: its
    final is printed while the pipe is still open (a copy of the pipe, as
    transcribe makes, would wait for its end for ever). A second sentence,
    then the end of the pipe: its final too, and --exit-at-end exits 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "evoxtral_stream", "serve", "--source", "-", "--port", "0",
         "--exit-at-end"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_ENV)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
    err: list[bytes] = []
    stderr = proc.stderr
    threading.Thread(target=lambda: err.append(stderr.read()), daemon=True).start()
    try:
        proc.stdin.write(_live_wav_header() + _speech_then_silence("Good morning everyone."))
        proc.stdin.flush()
        deadline = time.monotonic() + 180
        first = ""
        while "morning" not in first.lower():
            assert time.monotonic() < deadline, "no caption while the pipe was open"
            try:
                first = out.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, err
        assert proc.poll() is None, "serve ended while its pipe was open"
        proc.stdin.write(_speech_then_silence("Welcome to the meeting."))
        proc.stdin.close()
        assert proc.wait(timeout=180) == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)
    rest = []
    while not out.empty():
        rest.append(out.get())
    assert "meeting" in "".join(rest).lower(), rest


@pytest.mark.parametrize(("data", "message"), [
    # Not WAV: read whole (FLAC and OGG are, tests/test_cli.py), and not audio.
    (b"not audio at all, " * 10, "cannot decode audio file /dev/stdin: Format not recognised"),
    (b"RIFF\0\0\0\0WAVEfmt " + bytes(3), "standard input: it ended before its audio began"),
    (b"", "standard input: it ended before sending anything"),
])
def test_a_pipe_that_is_no_audio_is_one_error_line_before_the_model_loads(
        data: bytes, message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _NO_MODEL, "serve", "--source", "-", "--port", "0"],
        input=data, capture_output=True, env=_ENV, timeout=120)
    stderr = proc.stderr.decode()
    assert proc.returncode == 2, stderr
    assert "model loader" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("evoxtral-stream: error:")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"evoxtral-stream: error: {message}"), stderr
    assert "Traceback" not in stderr
