"""``serve --source -``: WAV on standard input from a live writer
(``arecord -t wav |``), captioned as it comes, through the real command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import queue
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import numpy as np
import pytest

from evoxtral_stream.audio.pipe import PipeCapture
from evoxtral_stream.cli.serve import _serve
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.worker import ModelWorker
from evoxtral_stream.events import SAMPLE_RATE, DecodeRequest, RequestKind
from tests.fakes import ScriptedBackend, words_so_far
from tests.speech import have_espeak, speak, speech_with_pauses

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
    reader = threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True)
    reader.start()
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
    # The reader may still be taking the last lines out of the pipe after the
    # process has exited; it ends at the pipe's end, so join it (a fixed pause
    # can end before it has, on a loaded machine).
    reader.join(timeout=30)
    assert not reader.is_alive(), "standard output did not end with the process"
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


# --- pacing: a pipe written faster than real time is not the model lagging ----

_WORKER_LOG = "evoxtral_stream.engine.worker"


class _PipeWriter(threading.Thread):
    """Writes ``data`` into the pipe ``fd`` (16 kHz mono 16-bit WAV), all at
    once (``cat talk.wav |``) or, ``paced``, in 0.1 s pieces at real time
    (``arecord``); then closes it: the stream's end."""

    def __init__(self, fd: int, data: bytes, *, paced: bool) -> None:
        super().__init__(daemon=True)
        self.fd, self.data, self.paced = fd, data, paced

    def run(self) -> None:
        if not self.paced:
            view = memoryview(self.data)
            while view:
                view = view[os.write(self.fd, view):]
        else:
            t0 = time.monotonic()
            for i, at in enumerate(range(0, len(self.data), 3200)):
                os.write(self.fd, self.data[at:at + 3200])
                time.sleep(max(0.0, t0 + (i + 1) * 0.1 - time.monotonic()))
        os.close(self.fd)


def _serve_pipe(data: bytes, *, paced: bool, delay_s: float,
                monkeypatch: pytest.MonkeyPatch) -> list[DecodeRequest]:
    """``serve --source - --exit-at-end`` in this process (a scripted model
    ``delay_s`` slow per call, finals only, one a batch), its standard input
    ``data`` written by a thread: every request the engine handed the model
    thread, in order."""
    submitted: list[DecodeRequest] = []
    submit = ModelWorker.submit

    def spy(self: ModelWorker, request: DecodeRequest, *, again: bool = False) -> bool:
        if not again:
            submitted.append(request)
        return submit(self, request, again=again)

    monkeypatch.setattr(ModelWorker, "submit", spy)
    cfg = load_config(env={}, overrides={"server.port": 0, "stream.partial_interval_ms": 0,
                                         "worker.max_batch": 1})
    r, w = os.pipe()
    writer = _PipeWriter(w, _live_wav_header() + data, paced=paced)
    writer.start()
    pipe = PipeCapture(Path("/dev/stdin"), block_ms=cfg.audio.block_ms,
                       max_pending_blocks=cfg.audio.max_pending_blocks, fd=r,
                       name="the test pipe")
    try:
        pipe.read_header()
        args = argparse.Namespace(stream=None, no_print=True, exit_at_end=True)
        code = asyncio.run(asyncio.wait_for(
            _serve(args, cfg, ScriptedBackend(words_so_far, delay_s=delay_s), "talk", None,
                   pipe=pipe), 120))
    finally:
        os.close(r)
        writer.join(10)
    assert code == 0
    return submitted


def test_a_pipe_written_faster_than_it_plays_counts_as_unpaced(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """``cat talk.wav | serve --source -``: the whole file comes at once,
    so its finals wait in the model's queue by design, as a file's do with
    ``transcribe``. Once the pipe is a few seconds ahead of the clock, its
    requests are marked unpaced (said once in the log), and the model is
    not reported behind. It was: every request of a pipe counted as live."""
    audio, _ = speech_with_pauses([
        "The committee met on Tuesday.", "Several members raised concerns.",
        "The chair promised a full report.", "The vote was postponed.",
        "Nobody objected to the delay.", "The meeting ended at noon.",
        "Lunch was served in the hall.", "Everyone went home early."], 0.8)
    with caplog.at_level(logging.INFO):
        requests = _serve_pipe(bytes(audio.astype("<i2").tobytes()), paced=False,
                               delay_s=0.3, monkeypatch=monkeypatch)
    finals = [r for r in requests if r.kind is RequestKind.FINAL]
    assert len(finals) >= 8, finals
    # Paced: at most what came before the pipe was found ahead (what the
    # pipe held as reading began, 2 s here, and the allowance past it).
    paced = [r for r in finals if r.paced]
    assert all(r.end_sample <= 10 * SAMPLE_RATE for r in paced), paced
    assert len(paced) <= 3, paced
    assert [r.paced for r in finals] == sorted((r.paced for r in finals), reverse=True)
    ahead = [r.getMessage() for r in caplog.records if "faster than it plays" in r.getMessage()]
    assert len(ahead) == 1 and ahead[0].startswith("the test pipe sends audio"), caplog.text
    behind = [r.getMessage() for r in caplog.records
              if r.name == _WORKER_LOG and "behind" in r.getMessage()]
    assert behind == [], caplog.text


def test_a_pipe_written_at_real_time_stays_paced(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The guard of the test above: a writer at real-time pace (``arecord``),
    3 s of audio, stays live however its reads bunch up: every request is
    paced, and nothing says it is ahead."""
    audio, _ = speech_with_pauses(["Good morning everyone."], 1.0)
    audio = audio[:3 * SAMPLE_RATE]
    with caplog.at_level(logging.INFO):
        requests = _serve_pipe(bytes(audio.astype("<i2").tobytes()), paced=True,
                               delay_s=0.0, monkeypatch=monkeypatch)
    assert requests and all(r.paced for r in requests), requests
    assert "faster than it plays" not in caplog.text
