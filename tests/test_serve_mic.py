"""``serve`` from the microphone when the microphone is lost mid-sentence.

The real ``serve`` code path (engine, server, microphone capture, subscribers
over a real WebSocket) with one stand-in: there is no sound card here, so a
PortAudio stream that plays speech in real time replaces sounddevice's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from websockets.asyncio.client import ClientConnection, connect

from evoxtral_stream.audio import microphone
from evoxtral_stream.audio.microphone import InputDevice
from evoxtral_stream.cli.serve import _serve
from evoxtral_stream.config import load_config
from evoxtral_stream.events import SAMPLE_RATE
from tests.fakes import ScriptedBackend, words_so_far
from tests.helpers.http import free_port
from tests.helpers.portaudio import LiveStream, hung_refresh_lines, playback
from tests.speech import have_espeak, speak

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")


async def test_a_lost_microphone_ends_the_open_segment_and_tells_subscribers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lead = np.zeros(SAMPLE_RATE // 2, np.int16)
    first = np.concatenate([lead, speak("The weather is lovely today, isn't it?")])
    second = np.concatenate([lead, speak("Yes, and tomorrow too."), lead, lead, lead])
    unplug_at = len(lead) + (len(first) - len(lead)) * 3 // 5  # mid-sentence
    streams: list[LiveStream] = []
    # The device delivers silence until the subscriber is there: serve opens
    # it at once, and the error is sent live only, so a subscriber that a
    # loaded machine connected late missed it.
    subscribed = threading.Event()

    def factory(device: InputDevice, samplerate: int, channels: int, blocksize: int,
                callback: Callable[..., None]) -> LiveStream:
        assert (samplerate, channels) == (SAMPLE_RATE, 1)
        audio, cut = (first, unplug_at) if not streams else (second, None)
        streams.append(LiveStream(playback(audio.astype(np.float32) / 32768), samplerate,
                                  channels, blocksize, callback, unplug_at=cut,
                                  hold=subscribed))
        return streams[-1]

    _fake_sounddevice(monkeypatch, "Desk Mic", 1)
    monkeypatch.setattr(microphone, "_sounddevice_stream", factory)
    port = free_port()
    cfg = load_config(env={}, overrides={
        "server.port": port, "audio.stall_timeout_s": 0.5, "audio.reopen_interval_s": 0.2,
        "stream.partial_interval_ms": 500})
    args = argparse.Namespace(stream=None, no_print=True, exit_at_end=False)
    serving = asyncio.ensure_future(
        _serve(args, cfg, ScriptedBackend(words_so_far), "mic", None))
    messages: list[dict[str, Any]] = []
    async with await _subscribe(port, serving) as ws:
        subscribed.set()

        async def read() -> None:
            async for raw in ws:
                messages.append(json.loads(raw))

        reader = asyncio.ensure_future(read())

        def finals() -> list[dict[str, Any]]:
            return [m for m in messages if m["type"] == "caption" and m["final"]]

        def errors() -> list[dict[str, Any]]:
            return [m for m in messages if m["type"] == "error"]

        async def until(cond: Callable[[], bool], what: str) -> float:
            deadline = time.monotonic() + 30
            while not cond():
                assert time.monotonic() < deadline, f"no {what}: {messages}"
                await asyncio.sleep(0.02)
            return time.monotonic()

        lost = await until(lambda: bool(errors()), "error event")
        assert errors()[0]["code"] == "audio_input_lost" and errors()[0]["stream"] == "mic"
        assert "'Desk Mic' delivered no audio" in errors()[0]["message"]
        # The sentence cut short is final at once: it does not wait for the device.
        got_final = await until(lambda: len(finals()) >= 1, "final of the cut segment")
        assert got_final - lost < 5.0
        cut = finals()[0]
        assert cut["segment"] == 0 and cut["text"]
        assert cut["end"] <= (streams[0].held + unplug_at) / SAMPLE_RATE + 0.05
        # The device comes back (reopened by the watchdog) and captions go on.
        await until(lambda: len(finals()) >= 2, "final after the device came back")
        assert len(streams) == 2 and finals()[1]["segment"] == 1
        assert finals()[1]["start"] >= cut["end"]
        os.kill(os.getpid(), signal.SIGTERM)   # as Ctrl-C would: drain and exit
        assert await asyncio.wait_for(serving, 30) == 0
        await asyncio.wait_for(reader, 10)
    assert len(errors()) == 1
    assert [m["type"] for m in messages][-1] == "stream.ended"
    # serve ignores Ctrl-C and SIGTERM after its drain, but not for the
    # programs this process starts next: SIG_IGN would be inherited by them
    # (a test run's later subprocesses could not be stopped).
    child = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is "
         "signal.default_int_handler, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)"],
        capture_output=True, text=True, timeout=30)
    assert child.stdout.split() == ["True", "True"], child


async def _subscribe(port: int, serving: asyncio.Future[int]) -> ClientConnection:
    """A subscriber of ``serve`` on ``port``, once it listens."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await connect(f"ws://127.0.0.1:{port}/v1/captions")
        except OSError:
            assert time.monotonic() < deadline and not serving.done()
            await asyncio.sleep(0.05)


def _fake_sounddevice(monkeypatch: pytest.MonkeyPatch, name: str, channels: int) -> None:
    sd = types.ModuleType("sounddevice")
    sd.query_devices = lambda: [  # type: ignore[attr-defined]
        {"index": 0, "name": name, "max_input_channels": channels,
         "default_samplerate": float(SAMPLE_RATE)}]
    sd.default = types.SimpleNamespace(device=[0, -1])  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sounddevice", sd)


async def test_split_channels_caption_each_microphone_as_its_own_stream(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A 4-channel interface with a panel: speech on channels 2 and 4 (at
    different times and lengths), silence on 1 and 3. With
    ``audio.channels = [2, 4]`` split, each speaker is a stream of its own
    whose captions keep their own times, and each printed line names its
    stream (they used to be printed unnamed, the speakers indistinguishable)."""
    lead = np.zeros(SAMPLE_RATE // 2, np.int16)
    a = speak("Good evening and welcome to the panel.")
    b = speak("Thank you.")
    length = len(lead) * 2 + len(a) + len(b) + SAMPLE_RATE * 2
    board = np.zeros((length, 4), np.float32)
    board[len(lead):len(lead) + len(a), 1] = a / 32768          # channel 2 first
    b_at = len(lead) * 2 + len(a)
    board[b_at:b_at + len(b), 3] = b / 32768                    # then channel 4
    subscribed = threading.Event()  # silence until then (see the test above)
    streams: list[LiveStream] = []

    def factory(device: InputDevice, samplerate: int, channels: int, blocksize: int,
                callback: Callable[..., None]) -> LiveStream:
        assert channels == 4
        streams.append(LiveStream(lambda first, n, ch: _pad(board[first:first + n], n),
                                  samplerate, channels, blocksize, callback, hold=subscribed))
        return streams[-1]

    _fake_sounddevice(monkeypatch, "Panel Interface", 4)
    monkeypatch.setattr(microphone, "_sounddevice_stream", factory)
    port = free_port()
    cfg = load_config(env={}, overrides={
        "server.port": port, "audio.channels": [2, 4], "audio.split_channels": True,
        "stream.partial_interval_ms": 0})
    args = argparse.Namespace(stream="panel", no_print=False, exit_at_end=False)
    serving = asyncio.ensure_future(
        _serve(args, cfg, ScriptedBackend(words_so_far), "mic", None))
    messages: list[dict[str, Any]] = []
    async with await _subscribe(port, serving) as ws:
        subscribed.set()

        async def finals() -> dict[str, list[dict[str, Any]]]:
            out: dict[str, list[dict[str, Any]]] = {}
            for m in messages:
                if m["type"] == "caption" and m["final"]:
                    out.setdefault(m["stream"], []).append(m)
            return out

        async def read() -> None:
            async for raw in ws:
                messages.append(json.loads(raw))

        reader = asyncio.ensure_future(read())
        deadline = time.monotonic() + 30
        while len(await finals()) < 2:
            assert time.monotonic() < deadline, messages
            await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(serving, 30) == 0
        await asyncio.wait_for(reader, 10)
    got = await finals()
    assert sorted(got) == ["panel-2", "panel-4"]
    (first,), (second,) = got["panel-2"], got["panel-4"]
    # Each stream hears its own speaker, at that speaker's time.
    held = streams[0].held  # the silence before the subscriber came
    assert first["start"] == pytest.approx((held + len(lead)) / SAMPLE_RATE, abs=0.4)
    assert first["end"] == pytest.approx((held + len(lead) + len(a)) / SAMPLE_RATE, abs=0.6)
    assert second["start"] == pytest.approx((held + b_at) / SAMPLE_RATE, abs=0.4)
    assert second["end"] - second["start"] < first["end"] - first["start"]
    # Both end at the shutdown (they started before this subscriber came).
    ended = [m["stream"] for m in messages if m["type"] == "stream.ended"]
    assert sorted(ended) == ["panel-2", "panel-4"]
    printed = capsys.readouterr().out.splitlines()
    assert sorted(line.split(" [")[0] for line in printed) == ["panel-2", "panel-4"], printed


def _pad(block: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.float32]:
    """``block`` with silence after it up to ``n`` frames (past the board's end)."""
    if len(block) == n:
        return block
    out = np.zeros((n, block.shape[1]), np.float32)
    out[:len(block)] = block
    return out


def test_serve_refuses_channels_the_device_lacks_before_loading_the_model(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from evoxtral_stream import cli

    _fake_sounddevice(monkeypatch, "Desk Mic", 2)

    def no_model(*_: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli.serve, "load_backend", no_model)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--set", "audio.channels=[1, 3]"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["evoxtral-stream: error: audio.channels asks for channel 3, but audio "
                   "device 'Desk Mic' has 2 input channel(s)"]


# The real command line from a microphone that is lost at once, whose
# PortAudio then hangs (hung_refresh_lines).
_HUNG_REFRESH = r"""
import sys
from evoxtral_stream import cli as cli_module
from tests.fakes import ScriptedBackend
from tests.helpers.model_loader import replace_model_loader

replace_model_loader(lambda cfg: ScriptedBackend(lambda audio: "words"))
""" + hung_refresh_lines("0") + r"""
sys.exit(cli_module.main(sys.argv[1:]))
"""


def test_serve_exits_while_a_lost_microphone_s_refresh_hangs(tmp_path: Path) -> None:
    """The device refresh before a reopen (PortAudio's terminate and
    initialise) hangs for good: serve stopped by SIGTERM used to wait for
    it forever, since it ran in asyncio's default executor, which
    ``asyncio.run`` (Python 3.11: with no time limit) and then the
    interpreter's exit wait for; Ctrl-C and SIGTERM are ignored by then, so
    only SIGKILL ended it. Then sounddevice's exit handler, terminating
    PortAudio again on the main thread while the refresh is stuck inside it,
    held the exit the same way. Now it exits with its status at once."""
    root = Path(__file__).resolve().parents[1]
    marker = tmp_path / "refresh-hangs"
    log = (tmp_path / "stderr").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-c", _HUNG_REFRESH, "serve", "--source", "mic", "--no-print",
         "--port", "0", "--set", "audio.stall_timeout_s=0.5",
         "--set", "audio.reopen_interval_s=0.2"],
        stdout=subprocess.DEVNULL, stderr=log, cwd=root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HUNG_MARKER": str(marker),
             "PYTHONPATH": f"{root / 'src'}:{root}"})
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, \
                log.seek(0) or log.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("serve did not exit while the refresh hangs") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    stderr = log.read()
    log.close()
    assert code == 0, stderr
    assert "'Desk Mic' delivered no audio" in stderr
