"""The clients exit when a name lookup never answers (a DNS server that is
down, an NSS module stuck).

Each client runs as a process of its own whose ``socket.getaddrinfo``
hangs for one name (:data:`_HUNG_LOOKUP`), as a resolver that never
answers does: no DNS server is needed, and none is asked. A lookup in
asyncio's default executor held the exit: ``asyncio.run`` waits for that
executor's threads at its end (Python 3.11: with no limit), and the
interpreter's exit joins them, so Ctrl-C ended the client's work but never
its process. A startup check that hangs (the bridge's run of espeak-ng)
ends on Ctrl-C too, with the status of any Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.server import ServerConnection, serve

from tests.clients.conftest import CLIENTS, client_env
from tests.helpers.threads import threads_refused

#: The name whose lookup hangs, and one that does not exist.
HUNG = "captions.hangs.invalid"
UNKNOWN = "captions.unknown.invalid"

# A client (argv[1]) whose lookups of HUNG never return: each one that
# began touches $HUNG_MARKER, so the test knows the client is stuck in it.
# UNKNOWN fails at once, as a name no DNS server knows does. Every lookup
# is logged in $HUNG_MARKER.log: the name, its thread, whether a daemon.
_HUNG_LOOKUP = rf"""
import os, runpy, socket, sys, threading
sys.path.insert(0, os.environ["CLIENTS"])
real = socket.getaddrinfo

def getaddrinfo(host, *args, **kwargs):
    me = threading.current_thread()
    with open(os.environ["HUNG_MARKER"] + ".log", "a") as log:
        log.write(f"{{host}} {{me.name}} {{'daemon' if me.daemon else 'joined'}}\n")
    if host == {HUNG!r}:
        open(os.environ["HUNG_MARKER"], "a").close()
        threading.Event().wait()
    if host == {UNKNOWN!r}:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return real(host, *args, **kwargs)

socket.getaddrinfo = getaddrinfo
sys.argv = [os.path.join(os.environ["CLIENTS"], sys.argv[1]), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


async def _start(script: str, tmp_path: Path, *args: str) -> asyncio.subprocess.Process:
    root = CLIENTS.parent
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HUNG_LOOKUP, script, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=tmp_path,
        env={**client_env(), "CLIENTS": str(CLIENTS), "HUNG_MARKER": str(tmp_path / "hung"),
             "PYTHONPATH": f"{root / 'src'}:{root}"})


async def _hung(proc: asyncio.subprocess.Process, tmp_path: Path) -> None:
    """Return once ``proc`` is stuck in the lookup of :data:`HUNG`."""
    deadline = time.monotonic() + 30
    while not (tmp_path / "hung").exists():
        assert proc.returncode is None, "the client exited before looking the name up"
        assert time.monotonic() < deadline, "the client never looked the name up"
        await asyncio.sleep(0.05)


async def _exit(proc: asyncio.subprocess.Process, within: float) -> tuple[int, str]:
    """``proc``'s exit status and stderr once it exits by ``within`` s; it is
    killed, and the test failed, if it does not."""
    assert proc.stderr is not None
    try:
        # Its few lines wait in the pipe: none is lost to a timeout.
        await asyncio.wait_for(proc.wait(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"the client did not exit within {within} s: "
                             f"{(await proc.stderr.read()).decode()!r}") from None
    assert proc.returncode is not None
    return proc.returncode, (await proc.stderr.read()).decode()


def _silence(tmp_path: Path) -> Path:
    wav = tmp_path / "silence.wav"
    sf.write(wav, np.zeros(16000 * 5, np.int16), 16000, subtype="PCM_16")
    return wav


def _bridge_args(tmp_path: Path, url: str, base_url: str = "https://api.elevenlabs.io"
                 ) -> list[str]:
    # ElevenLabs with a key never checked: nothing to install, as espeak-ng is.
    return ["--url", url, "--out", str(tmp_path / "out"), "--mode", "elevenlabs",
            "--voice", "v", "--api-key", "k", "--base-url", base_url]


async def test_ctrl_c_ends_the_viewer_while_the_server_s_name_lookup_hangs(
        tmp_path: Path) -> None:
    proc = await _start("viewer.py", tmp_path, "--url", f"ws://{HUNG}:8765")
    await _hung(proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    code, err = await _exit(proc, 5)
    assert code == 0, err  # the viewer's status on Ctrl-C
    assert "Traceback" not in err, err


async def test_ctrl_c_twice_ends_the_mic_client_while_the_server_s_name_lookup_hangs(
        tmp_path: Path) -> None:
    proc = await _start("mic_client.py", tmp_path, "--url", f"ws://{HUNG}:8765",
                        "--file", str(_silence(tmp_path)))
    await _hung(proc, tmp_path)
    assert proc.stderr is not None
    proc.send_signal(signal.SIGINT)
    while "finishing" not in (line := (await asyncio.wait_for(proc.stderr.readline(),
                                                              5)).decode()):
        assert line, "the client exited before finishing"
    proc.send_signal(signal.SIGINT)  # the second quits at once
    code, err = await _exit(proc, 5)
    assert code == 130, err
    assert "Traceback" not in err, err


async def test_ctrl_c_ends_the_tts_bridge_while_the_server_s_name_lookup_hangs(
        tmp_path: Path) -> None:
    proc = await _start("tts_bridge.py", tmp_path, *_bridge_args(tmp_path, f"ws://{HUNG}:8765"))
    await _hung(proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    code, err = await _exit(proc, 5)
    assert code == 130, err
    assert "Traceback" not in err, err


async def test_ctrl_c_ends_the_tts_bridge_while_its_espeak_check_hangs(tmp_path: Path) -> None:
    """The bridge runs espeak-ng once before it connects (a bad --voice is
    found at the start); a Ctrl-C then is an exit 130 as any other, not a
    KeyboardInterrupt traceback."""
    espeak = tmp_path / "espeak-ng"
    espeak.write_text('#!/bin/sh\ntouch "$HUNG_MARKER"\nexec sleep 60\n')
    espeak.chmod(0o755)
    proc = await _start("tts_bridge.py", tmp_path, "--url", "ws://127.0.0.1:9",
                        "--out", str(tmp_path / "out"), "--espeak", str(espeak))
    await _hung(proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    code, err = await _exit(proc, 10)
    assert code == 130, err
    assert "Traceback" not in err, err


@pytest.mark.slow
async def test_a_lookup_that_never_answers_is_given_up_at_the_open_timeout(
        tmp_path: Path) -> None:
    """The 10 s the clients give a connection to open bound its lookup too:
    then one line, and the process exits with its status."""
    proc = await _start("viewer.py", tmp_path, "--url", f"ws://{HUNG}:8765")
    await _hung(proc, tmp_path)
    t0 = time.monotonic()
    code, err = await _exit(proc, 25)
    assert code == 1, err
    assert time.monotonic() - t0 < 15, err
    assert err == (f"cannot connect to ws://{HUNG}:8765/v1/captions: timed out during "
                   "opening handshake (is the server running?)\n")


@pytest.mark.parametrize("script", ["viewer.py", "mic_client.py", "tts_bridge.py"])
async def test_a_name_that_does_not_exist_is_still_one_line(tmp_path: Path,
                                                            script: str) -> None:
    """The resolver's own reason, as before the lookups left asyncio's executor."""
    url = f"ws://{UNKNOWN}:8765"
    args = {"viewer.py": ["--url", url],
            "mic_client.py": ["--url", url, "--file", str(_silence(tmp_path))],
            "tts_bridge.py": _bridge_args(tmp_path, url)}[script]
    proc = await _start(script, tmp_path, *args)
    code, err = await _exit(proc, 20)
    assert code == 1, err
    where = f"{url}/v1/ingest" if script == "mic_client.py" else f"{url}/v1/captions"
    said = {"viewer.py": f"cannot connect to {where}: [Errno -2] Name or service not known "
                         "(is the server running?)",
            "mic_client.py": f"cannot stream to {where}: [Errno -2] Name or service not "
                             "known (is the server running?)",
            "tts_bridge.py": f"tts_bridge: cannot subscribe to {where}: [Errno -2] Name or "
                             "service not known (is `evoxtral-stream serve` running there?)"}
    assert err.splitlines()[-1] == said[script], err
    assert "Traceback" not in err, err


async def test_ctrl_c_ends_the_tts_bridge_while_the_synthesiser_s_name_lookup_hangs(
        tmp_path: Path) -> None:
    """The ElevenLabs request's lookup hangs (urllib's timeout does not
    bound it): the request ran in asyncio's default executor, which held
    the exit after Ctrl-C."""
    hello = json.dumps({"type": "hello", "v": 1, "server": "evoxtral-stream",
                        "version": "0", "backend": "scripted", "streams": ["talk"]})
    final = json.dumps({"type": "caption", "stream": "talk", "segment": 0, "seq": 1,
                        "final": True, "text": "Hello there.", "stable": "Hello there.",
                        "unstable": "", "tags": [], "start": 0.0, "end": 1.0})

    async def handler(ws: ServerConnection) -> None:
        await ws.send(hello)
        await ws.send(final)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        proc = await _start("tts_bridge.py", tmp_path,
                            *_bridge_args(tmp_path, f"ws://127.0.0.1:{port}",
                                          base_url=f"https://{HUNG}"))
        await _hung(proc, tmp_path)
        proc.send_signal(signal.SIGINT)
        code, err = await _exit(proc, 5)
    assert code == 130, err
    assert "Traceback" not in err, err


def test_a_lookup_whose_thread_cannot_start_fails_that_attempt_as_the_resolver_would() -> None:
    """No thread to be had (the process at its thread limit): that
    connection attempt fails with an OSError, which each client reports (and
    retries) as it does a resolver's, not with a RuntimeError's traceback;
    the next one looks the name up anew."""
    from _loop import LookupLoop

    loop = LookupLoop()
    try:
        with threads_refused("client-lookup"), \
                pytest.raises(OSError, match="no thread to look localhost up"):
            loop.run_until_complete(loop.getaddrinfo("localhost", 8765))
        assert loop.run_until_complete(loop.getaddrinfo("localhost", 8765))
    finally:
        loop.close()


async def test_a_server_named_by_a_name_is_looked_up_on_a_daemon_thread(tmp_path: Path) -> None:
    """The lookup that works: on a daemon thread of its own, then each
    address tried in turn (localhost may be ::1 first; the server listens
    on 127.0.0.1 only)."""
    script = [json.dumps({"type": "hello", "v": 1, "server": "evoxtral-stream",
                          "version": "0", "backend": "scripted", "streams": ["talk"]}),
              json.dumps({"type": "caption", "stream": "talk", "segment": 0, "seq": 1,
                          "final": True, "text": "Hello there.", "start": 0.0, "end": 1.0}),
              json.dumps({"type": "stream.ended", "stream": "talk", "finals": 1,
                          "duration": 1.0})]

    async def handler(ws: ServerConnection) -> None:
        for message in script:
            await ws.send(message)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        proc = await _start("viewer.py", tmp_path, "--url", f"ws://localhost:{port}",
                            "--stream", "talk", "--exit-on-end", "--no-color")
        code, err = await _exit(proc, 20)
        assert proc.stdout is not None
        out = (await proc.stdout.read()).decode()
    assert code == 0, err
    assert out == "[0:00.0 → 0:01.0] Hello there.\n", (out, err)
    lookups = (tmp_path / "hung.log").read_text().splitlines()
    assert "localhost client-lookup daemon" in lookups, lookups
