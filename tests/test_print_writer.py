"""stdout's reader falling behind (journald, docker's blocking log driver)
must not stop ``serve``: off a terminal its printed captions go through a
bounded queue and a writer thread of their own, through the real command in
a subprocess."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers.audio import buzz, noise, to_int16
from tests.test_log_writer import ROOT, _connects, _ends_on_sigterm, _env, _url_from

# The real command line, with a scripted model that answers at once with a
# long caption (2 KB: the pipe's 64 KiB fills after some thirty), and the
# queue of printed lines made small (argv[1]).
_LONG_CAPTIONS = r"""
import sys
from evoxtral_stream import cli as cli_module, console
from tests.fakes import ScriptedBackend
from tests.helpers.model_loader import replace_model_loader
text = " ".join(f"w{i}" for i in range(400))
replace_model_loader(lambda cfg: ScriptedBackend(lambda audio: text))
console.PRINT_QUEUE_LINES = int(sys.argv[1])
sys.exit(cli_module.main(sys.argv[2:]))
"""

_FINALS = 120


def _bursts(n: int) -> bytes:
    """16 kHz mono PCM16: ``n`` voiced bursts, each a final of its own, in
    whole seconds (the ingest sends them in half-second messages)."""
    parts = [noise(0.5)]
    for i in range(n):
        parts += [buzz(0.6), noise(0.9, seed=i + 1)]
    pcm = to_int16(np.concatenate(parts)).tobytes()
    return pcm + bytes(-len(pcm) % 16000) + bytes(32000)


async def _ingest_and_follow(url: str, n: int, timeout_s: float) -> int:
    """Subscribe to stream ``burst``, ingest ``n`` bursts into it; how many
    finals the subscriber got within ``timeout_s`` seconds."""
    base = url.rsplit("/v1/", 1)[0]
    finals = 0
    try:
        async with asyncio.timeout(timeout_s), connect(f"{url}?stream=burst") as sub, \
                connect(f"{base}/v1/ingest?stream=burst") as ws:
            assert json.loads(await sub.recv())["type"] == "hello"
            await ws.send(json.dumps({"type": "config", "sample_rate": 16000}))
            assert json.loads(await ws.recv())["type"] == "ingest.ready"
            pcm = _bursts(n)
            for i in range(0, len(pcm), 16000):
                await ws.send(pcm[i:i + 16000])
            await ws.send(json.dumps({"type": "end"}))
            async for raw in sub:
                msg = json.loads(raw)
                if msg["type"] == "caption" and msg["final"]:
                    finals += 1
                elif msg["type"] == "stream.ended":
                    break
    except (TimeoutError, ConnectionClosed):   # the server stopped answering
        pass
    return finals


def _serve_printing() -> subprocess.Popen[bytes]:
    """``serve --source none`` printing long captions through a queue of 10
    lines, its stdout and stderr pipes for the test to read, or not."""
    return subprocess.Popen(
        [sys.executable, "-c", _LONG_CAPTIONS, "10", "serve", "--source", "none",
         "--port", "0", "--set", "server.max_ingest_speed=0",
         "--set", "stream.partial_interval_ms=0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=ROOT, env=_env())


def test_a_stdout_nobody_reads_does_not_stop_serve() -> None:
    """``serve --source none`` printing the captions of a stream a client
    sends, its stdout a pipe nobody reads: the subscriber gets every final
    and connects are answered (the pipe's 64 KiB once filled after some
    thirty lines and the event loop, which printed them, then waited on it
    for good). Then stdout is read: the lines the queue held, in order, and
    one saying how many were dropped."""
    proc = _serve_printing()
    try:
        url = _url_from(proc)
        finals = asyncio.run(_ingest_and_follow(url, _FINALS, timeout_s=60))
        answered = asyncio.run(_connects(url, 5, each_s=20))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    assert finals == _FINALS, f"the subscriber got {finals} of {_FINALS} finals"
    assert answered == 5, f"only {answered} connects answered"
    assert proc.returncode == 0, err[-2000:]
    lines = out.decode().splitlines()
    dropped = [line for line in lines if "caption lines dropped" in line]
    assert dropped, lines[-3:]
    counts = [int(m.group(1)) for line in dropped
              if (m := re.fullmatch(r"! (\d+) caption lines dropped: .*", line))]
    assert len(counts) == len(dropped) and all(n > 0 for n in counts), dropped
    printed = [line for line in lines if line not in dropped]
    assert all(line.startswith("burst [") and line.endswith(" w399") for line in printed), \
        printed[:3]
    # Every final is either printed or counted, and those printed are in order.
    assert len(printed) + sum(counts) == _FINALS, (len(printed), counts)
    starts = [line.split("[", 1)[1].split(" ", 1)[0] for line in printed]
    assert starts == sorted(starts, key=lambda s: [float(p) for p in s.split(":")])


def test_a_stdout_reader_stuck_at_the_exit_does_not_hang_it() -> None:
    """The same, stdout never read: SIGTERM still ends ``serve``, with
    status 0, the exit giving up on the queued lines after its bounded
    wait (it used to wait on the pipe for good)."""
    proc = _serve_printing()
    try:
        url = _url_from(proc)
        asyncio.run(_ingest_and_follow(url, 60, timeout_s=60))
        _ends_on_sigterm(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            assert pipe is not None
            pipe.close()
