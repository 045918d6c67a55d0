"""stderr's reader falling behind (journald, docker's blocking log driver,
a paused ``| less``) must not stop the server: log records go to a pipe, a
file or a socket through a bounded queue and a writer thread of their own
(``logs.QueuedLogHandler``), through the real command in subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]

# The real command line, with a scripted model that answers at once, and
# the queue of log records made small (argv[1]), so that a test fills it
# in seconds rather than with ten thousand records.
_SCRIPTED = r"""
import sys
from evoxtral_stream import cli as cli_module, logs
from tests.fakes import ScriptedBackend
from tests.helpers.model_loader import replace_model_loader
replace_model_loader(lambda cfg: ScriptedBackend(lambda audio: "words"))
logs.LOG_QUEUE_RECORDS = int(sys.argv[1])
sys.exit(cli_module.main(sys.argv[2:]))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}


def _popen(queue: int, *args: str, stderr: int | None = subprocess.PIPE
           ) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _SCRIPTED, str(queue), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        cwd=ROOT, env=_env())


def _url_from(proc: subprocess.Popen[bytes]) -> str:
    """Read stderr up to the "serving captions on" line (text or JSON); then
    nobody reads it."""
    assert proc.stderr is not None
    for raw in proc.stderr:
        line = raw.decode()
        if "serving captions on " in line:
            return line.split("serving captions on ", 1)[1].split()[0].rstrip('"')
    proc.kill()
    raise AssertionError(f"serve did not start: {proc.communicate()}")


async def _connects(url: str, n: int, each_s: float) -> int:
    """Connect ``n`` times in turn, each until the hello; how many got one
    within ``each_s`` seconds (stops at the first that did not)."""
    for i in range(n):
        try:
            async with asyncio.timeout(each_s), connect(url) as ws:
                assert json.loads(await ws.recv())["type"] == "hello"
        except TimeoutError:
            return i
    return n


def _stop(proc: subprocess.Popen[bytes]) -> tuple[bytes, int]:
    """SIGTERM ``proc``, read all of its stderr; (stderr, exit status)."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    return err, proc.returncode


def _ends_on_sigterm(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM ends ``proc`` with status 0 within 30 s, whatever its pipes'
    readers do: the exit gives up on what is queued after its bounded wait."""
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert proc.wait(timeout=60) == 0
    assert time.monotonic() - started < 30


def test_a_stderr_nobody_reads_does_not_stop_serve_debug() -> None:
    """``serve --debug`` with a stderr pipe that nobody reads once it served:
    150 WebSocket connects are all answered (each logs a dozen handshake
    lines; the pipe's 64 KiB once filled after 41 and the event loop, which
    logs, then waited on it for good). Then the pipe is read: what the queue
    held, and a line saying how many records were dropped, all JSON lines."""
    proc = _popen(500, "serve", "--source", "none", "--no-print", "--port", "0",
                  "--debug", "--log-format", "json")
    assert proc.stderr is not None
    lines: list[bytes] = []
    try:
        url = _url_from(proc)
        answered = asyncio.run(_connects(url, 150, each_s=20))
        # Now read: the queue's lines come, then the count of those dropped.
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while not any(b'"dropped"' in line for line in list(lines)):
            assert time.monotonic() < deadline, "no count of dropped records came"
            time.sleep(0.1)
        time.sleep(0.5)  # the queue is written out: the stop logs into an empty one
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    assert answered == 150, f"only {answered} connects answered"
    assert status == 0, b"".join(lines)[-2000:]
    records = [json.loads(line) for line in lines]
    dropped = [r for r in records if "dropped" in r]
    assert dropped, records[-5:]
    assert all(r["level"] == "WARNING" and isinstance(r["dropped"], int)
               and r["dropped"] > 0 and f"{r['dropped']} log records" in r["msg"]
               for r in dropped), dropped
    # The exit waited for the queue: the stop's records are there, after
    # the last count (the stop, with its reader back, dropped none).
    last = max(i for i, r in enumerate(records) if "dropped" in r)
    assert any(r["msg"] == "server closed" for r in records[last:]), records[-5:]


# The real command line, with a model loader that logs ``argv[1]`` numbered
# records (INFO, from another thread too: the model's loads log from
# threads) and then fails to load (``argv[2]`` "fail") or loads a scripted
# model.
_FLOODING = r"""
import logging, sys, threading
from evoxtral_stream import cli as cli_module
from evoxtral_stream.engine.backends import BackendUnavailable
from tests.fakes import ScriptedBackend
from tests.helpers.model_loader import replace_model_loader
n, outcome = int(sys.argv[1]), sys.argv[2]
def load(cfg):
    log = logging.getLogger("evoxtral_stream.loader")
    for i in range(n // 2):
        log.info("record %d", i)
    other = threading.Thread(target=lambda: [log.info("record %d", i) for i in range(n // 2, n)])
    other.start()
    other.join()
    if outcome == "fail":
        raise BackendUnavailable("no model here")
    return ScriptedBackend(lambda audio: "words")
replace_model_loader(load)
sys.exit(cli_module.main(sys.argv[3:]))
"""

_RECORDS = 3000


def _numbered(lines: list[str]) -> list[int]:
    return [int(line.rsplit("record ", 1)[1].split('"')[0]) for line in lines
            if "record " in line]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_record_then_the_error_line_last(fmt: str) -> None:
    """A command that logs thousands of records (from two threads) and then
    fails: stderr holds every record, in order, and the one error line is
    its last line (the exit waits for the writer thread)."""
    proc = subprocess.run(
        [sys.executable, "-c", _FLOODING, str(_RECORDS), "fail", "transcribe", "--sample",
         "--log-format", fmt],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=_env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert _numbered(lines) == list(range(_RECORDS)), proc.stderr[-2000:]
    assert "no model here" in lines[-1], lines[-3:]
    assert not any("dropped" in line for line in lines)
    if fmt == "json":
        records = [json.loads(line) for line in lines]
        assert records[-1]["level"] == "ERROR", records[-1]
    else:
        assert lines[-1].startswith("evoxtral-stream: error: "), lines[-1]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_status_lines_keep_their_place_among_the_records(fmt: str) -> None:
    """``serve``: the "serving captions on" status line comes after every
    record the model's load logged, in text mode (written straight to
    stderr once) as in json mode (a record)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _FLOODING, str(_RECORDS), "load", "serve", "--source", "none",
         "--no-print", "--port", "0", "--log-format", fmt],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, cwd=ROOT, env=_env())
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if "serving captions on " in line:
                break
        proc.send_signal(signal.SIGTERM)
        lines += proc.communicate(timeout=60)[1].splitlines()
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, lines[-5:]
    serving = next(i for i, line in enumerate(lines) if "serving captions on " in line)
    assert _numbered(lines[:serving]) == list(range(_RECORDS)), lines[:5]
    if fmt == "json":
        assert all(json.loads(line) for line in lines)


def test_a_stderr_closed_or_left_by_its_reader_changes_nothing() -> None:
    """stderr closed (``2>&-``), or a pipe whose reader left at once: the
    command fails as it would, status 2, and does not hang."""
    closed = subprocess.run(
        ["sh", "-c", '"$0" -c "$1" "$2" fail transcribe --sample 2>&-', sys.executable,
         _FLOODING, str(_RECORDS)],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=120, cwd=ROOT, env=_env())
    assert closed.returncode == 2, closed.stderr
    proc = subprocess.Popen(
        [sys.executable, "-c", _FLOODING, str(_RECORDS), "fail", "transcribe", "--sample"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=ROOT, env=_env())
    assert proc.stderr is not None
    proc.stderr.close()
    try:
        assert proc.wait(timeout=120) == 2
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()


def test_a_reader_stuck_at_the_exit_does_not_hang_it() -> None:
    """``serve --debug``, its stderr pipe never read: SIGTERM still ends it,
    with status 0, the exit giving up on the queue after its bounded wait."""
    proc = _popen(500, "serve", "--source", "none", "--no-print", "--port", "0",
                  "--debug", "--log-format", "json")
    try:
        url = _url_from(proc)
        assert asyncio.run(_connects(url, 100, each_s=20)) == 100
        _ends_on_sigterm(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


_CUT_AT_INIT = r"""
import sys
from evoxtral_stream import logs

def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
logs.QueuedWriter = interrupted
try:
    logs.QueuedLogHandler(sys.stderr)
except KeyboardInterrupt as e:
    kept = e  # its traceback holds the half-built handler, as a command's exit does
print("cut")
"""


def test_a_ctrl_c_while_the_handler_is_built_leaves_the_exit_clean() -> None:
    """A Ctrl-C that lands while the log handler is built, its writer not
    made yet (tests/test_signal_fuzz.py met it: SIGINT 560 ms into a
    command): the half-built handler was already known to logging, whose
    flush at the exit raised "'QueuedLogHandler' object has no attribute
    '_queue'" into the interrupted command's one line. Now it is known to
    logging only once built: the exit prints nothing."""
    proc = subprocess.run([sys.executable, "-c", _CUT_AT_INIT], capture_output=True,
                          text=True, env=_env(), timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "cut\n", "")
