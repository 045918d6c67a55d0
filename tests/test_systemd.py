"""systemd notifications: the pure decisions, the socket, and ``serve`` under
a real ``$NOTIFY_SOCKET`` (a datagram socket the test reads, as systemd does).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from evoxtral_stream.cli.serve import _service_snapshot
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.systemd import Notifier, ServiceNotices, Snapshot, merged, supervise
from tests.docs_schema import ROOT
from tests.engine.test_drain import HangingBackend
from tests.engine.test_journal import talk

READY = Snapshot(True, None, "serving")


def lines(message: str) -> list[str]:
    return message.split("\n") if message else []


# --- what to say (pure) ---------------------------------------------------


def test_ready_once_when_the_engine_is_first_ready() -> None:
    n = ServiceNotices(None)
    assert lines(n.update(0, Snapshot(False, None, "warming up"))) == ["STATUS=warming up"]
    assert n.update(1, Snapshot(False, None, "warming up")) == ""
    assert lines(n.update(2, READY)) == ["STATUS=serving", "READY=1"]
    # Not ready again (a reload of the model after a death) and back: no second READY.
    n.update(3, Snapshot(False, None, "reloading"))
    assert lines(n.update(4, READY)) == ["STATUS=serving"]


def test_watchdog_pings_every_half_interval_only_while_healthy() -> None:
    n = ServiceNotices(2.0)
    assert n.poll_s == 0.5
    said = {t: lines(n.update(t, READY)) for t in (0.0, 0.5, 0.99, 1.0, 1.5)}
    assert [t for t, m in said.items() if "WATCHDOG=1" in m] == [0.0, 1.0]
    stalled = Snapshot(False, "model stalled", "model stalled")
    assert all("WATCHDOG=1" not in lines(n.update(t, stalled)) for t in (2.0, 3.0, 9.0))
    assert "WATCHDOG=1" in lines(n.update(9.5, READY))    # the call returned


def test_a_model_down_for_good_triggers_the_watchdog_once() -> None:
    n = ServiceNotices(30.0)
    n.update(0, READY)
    down = Snapshot(False, "model down", "model down")
    assert "WATCHDOG=trigger" in lines(n.update(1, down))
    assert "WATCHDOG=trigger" not in lines(n.update(2, down))
    # Without a watchdog there is nothing to trigger: /healthz says it.
    assert "WATCHDOG=trigger" not in lines(ServiceNotices(None).update(0, down))


def test_the_status_is_said_when_it_changes_and_always_on_one_line() -> None:
    n = ServiceNotices(None)
    assert lines(n.status("loading\nthe  model")) == ["STATUS=loading the model"]
    assert n.status("loading the model") == ""


def test_reload_and_stop() -> None:
    n = ServiceNotices(1.0)
    n.update(0, READY)
    assert lines(n.reloading(123)) == ["RELOADING=1", "MONOTONIC_USEC=123",
                                       "STATUS=reloading the configuration"]
    assert lines(n.reloaded(READY)) == ["READY=1", "STATUS=serving"]
    assert lines(n.stopping("stopping")) == ["STOPPING=1", "STATUS=stopping"]
    # Nothing after the stop: no ping that would suggest all is well, no
    # READY from a reload that ends during the shutdown.
    assert n.update(5, READY) == "" and n.stopping("stopping") == ""
    assert n.reloading(6) == "" and n.reloaded(READY) == ""
    # A reload during the warm-up does not say READY before the engine is.
    early = ServiceNotices(None)
    early.reloading(1)
    warming = Snapshot(False, None, "warming up")
    assert lines(early.reloaded(warming)) == ["STATUS=warming up"]
    assert "READY=1" in lines(early.update(2, READY))
    with pytest.raises(ValueError, match="positive"):
        ServiceNotices(0.0)


# --- the socket -------------------------------------------------------------


def test_the_environment_says_where_and_whether_to_ping(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    def made(env: dict[str, str]) -> Notifier | None:
        notifier = Notifier.from_environ(env, pid=42)
        if notifier is not None:
            notifier.close()
        return notifier

    assert made({}) is None
    path = made({"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "3000000"})
    assert path is not None and path.address == "/run/systemd/notify"
    assert path.notices.watchdog_s == 3.0
    abstract = made({"NOTIFY_SOCKET": "@sd/notify"})
    assert abstract is not None and abstract.address == b"\0sd/notify"
    assert abstract.notices.watchdog_s is None
    theirs = made({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "5", "WATCHDOG_PID": "7"})
    assert theirs is not None and theirs.notices.watchdog_s is None
    ours = made({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "5", "WATCHDOG_PID": "42"})
    assert ours is not None and ours.notices.watchdog_s == 5e-6
    with caplog.at_level(logging.WARNING):
        bad = made({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "soon"})
        assert bad is not None and bad.notices.watchdog_s is None
        # Past systemd's 64 bits: it used to stop serve with an OverflowError.
        huge = made({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "1" + "0" * 400})
        assert huge is not None and huge.notices.watchdog_s is None
        assert "WATCHDOG_USEC='1000" in caplog.text
        assert made({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    assert "WATCHDOG_USEC='soon'" in caplog.text and "vsock:2:1234" in caplog.text


@contextmanager
def notify_socket(address: str | bytes) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
        yield sock
    finally:
        sock.close()


def test_a_notification_reaches_the_socket_and_one_that_cannot_is_dropped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    address = str(tmp_path / "notify")
    with notify_socket(address) as sock:
        notifier = Notifier(address, None)
        notifier.send("READY=1\nSTATUS=serving")
        notifier.send("")                         # nothing to say: nothing sent
        sock.settimeout(5)
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    # The socket is gone (systemd restarted, say): logged once, never raised.
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            notifier.send("WATCHDOG=1")
    notifier.close()
    assert caplog.text.count("cannot notify systemd") == 1


def test_a_status_that_is_not_utf8_is_sent_with_a_replacement(tmp_path: Path) -> None:
    """Notifier.send "never raises", but a lone surrogate (what Python makes
    of bytes that are not UTF-8, in a name from argv or the environment)
    raised UnicodeEncodeError out of it: in the supervising task, the end of
    the watchdog pings."""
    address = str(tmp_path / "notify")
    with notify_socket(address) as sock:
        notifier = Notifier(address, None)
        try:
            notifier.send("STATUS=caf\udcff")
            sock.settimeout(5)
            assert sock.recv(4096) == b"STATUS=caf?"
        finally:
            notifier.close()


async def test_a_snapshot_that_fails_is_logged_once_and_the_pings_go_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Any exception but OSError ended supervise's task, silently (asyncio
    reports it, if ever, when the task is collected): no more pings, so
    systemd killed a healthy service once WatchdogSec passed, with nothing in
    the log to say why. A look that fails is now logged once, with its
    traceback, skipped (no ping for it), and the next one is made."""
    address = str(tmp_path / "notify")
    looks = 0

    def snapshot() -> Snapshot:
        nonlocal looks
        looks += 1
        if looks in (2, 3):
            raise RuntimeError("engine state in flux")
        return READY

    with notify_socket(address) as sock:
        sock.setblocking(False)
        notifier = Notifier(address, 0.4)             # a ping every 0.2 s
        task = asyncio.ensure_future(supervise(notifier, snapshot))
        try:
            with caplog.at_level(logging.ERROR, logger="evoxtral_stream.systemd"):
                said = await _received(sock, lambda got: got.count("WATCHDOG=1") >= 3,
                                       timeout=5)
        finally:
            task.cancel()
            notifier.close()
    assert "READY=1" in said and looks > 3
    logged = [r for r in caplog.records if "engine state in flux" in r.getMessage()]
    assert len(logged) == 1, caplog.text
    assert logged[0].exc_info is not None  # the traceback says where


def test_an_abstract_socket_name_that_is_not_utf8_is_reached(tmp_path: Path) -> None:
    """The environment holds bytes: os.environ gives a name that is not UTF-8
    with surrogate escapes, which str.encode() refused, so Notifier.from_environ
    raised UnicodeEncodeError and serve stopped before loading the model."""
    name = b"\0evoxtral-test-\xff-" + str(os.getpid()).encode()
    with notify_socket(name) as sock:
        raw = "@" + os.fsdecode(name[1:])
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": raw})
        assert notifier is not None
        try:
            notifier.send("READY=1")
            sock.settimeout(5)
            assert sock.recv(4096) == b"READY=1"
        finally:
            notifier.close()


@contextmanager
def systemd_busy(address: str) -> Iterator[None]:
    """The receive queue of the socket at ``address`` full, as a busy systemd
    leaves its notification socket: a send to it fails with EAGAIN (the
    kernel's per-socket limit, net.unix.max_dgram_qlen, whatever it is here)."""
    fillers: list[socket.socket] = []
    try:
        for _ in range(1000):
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            filler.setblocking(False)
            fillers.append(filler)
            sent = 0
            try:
                while True:
                    filler.sendto(b"FILLER=1", address)
                    sent += 1
            except BlockingIOError:
                pass
            if not sent:   # not this sender's buffer: the queue itself is full
                break
        else:
            raise AssertionError("could not fill the notification socket's queue")
        yield
    finally:
        for filler in fillers:
            filler.close()


async def test_what_systemd_could_not_hear_is_said_again_once_it_can(tmp_path: Path) -> None:
    """A notification that could not go (systemd's queue full: EAGAIN, since
    the socket never blocks) was dropped for good, READY=1 included: the
    unit stayed "activating" until TimeoutStartSec killed a serving engine.
    So did a reload's READY=1 (the unit left "reloading" and a Type=notify-
    reload job waiting) and STOPPING=1. What has not been heard now goes
    again with the next notification or look (every POLL_S), merged: the
    latest status wins, and a missed watchdog ping is not sent late."""
    address = str(tmp_path / "notify")
    ready = False
    looks = 0

    def snapshot() -> Snapshot:
        nonlocal looks
        looks += 1
        return Snapshot(ready, None, "serving" if ready else "warming up")

    async def looked(more: int) -> None:
        until = looks + more
        while looks < until:
            await asyncio.sleep(0.05)

    with notify_socket(address) as sock:
        sock.setblocking(False)
        notifier = Notifier(address, None)
        task = asyncio.ensure_future(supervise(notifier, snapshot))
        try:
            await _received(sock, lambda got: "STATUS=warming up" in got, timeout=10)
            with systemd_busy(address):
                ready = True
                await looked(2)                    # READY=1 said while systemd was busy
            said = await _received(sock, lambda got: "READY=1" in got, timeout=10)
            assert "STATUS=serving" in said
            with systemd_busy(address):
                notifier.send(notifier.notices.reloading(1234))
                notifier.send(notifier.notices.reloaded(snapshot()))
                await looked(2)
            said = await _received(sock, lambda got: "READY=1" in got, timeout=10)
            reload = said[said.index("RELOADING=1"):]
            # One message: Type=notify-reload takes RELOADING=1 with READY=1.
            assert sorted(reload) == ["MONOTONIC_USEC=1234", "READY=1", "RELOADING=1",
                                      "STATUS=serving"], said
            with systemd_busy(address):
                notifier.send(notifier.notices.stopping("stopping"))
                await looked(2)
            said = await _received(sock, lambda got: "STOPPING=1" in got, timeout=10)
            assert "STATUS=stopping" in said
        finally:
            task.cancel()
            notifier.close()


def test_what_is_owed_merges_with_the_next_notification() -> None:
    assert merged("", "") == "" and merged("", "READY=1") == "READY=1"
    # The latest status wins (systemd reads the first STATUS=), in place.
    assert merged("STATUS=loading\nREADY=1", "STATUS=serving\nWATCHDOG=1") == \
        "STATUS=serving\nREADY=1\nWATCHDOG=1"
    assert merged("WATCHDOG=1\nSTATUS=x", "", pings=False) == "STATUS=x"
    # A ping does not cancel a trigger still owed.
    assert merged("WATCHDOG=trigger", "WATCHDOG=1") == "WATCHDOG=trigger"
    assert merged("WATCHDOG=trigger", "", pings=False) == "WATCHDOG=trigger"


def test_a_watchdog_ping_that_could_not_go_is_not_sent_late(tmp_path: Path) -> None:
    """The socket gone (not there yet, or systemd away) and back: what was owed
    goes with the next send, but a ping only when one is due."""
    address = str(tmp_path / "notify")
    notifier = Notifier(address, 1.0)
    try:
        notifier.send("WATCHDOG=1")               # no socket yet: lost
        notifier.send("STATUS=serving\nREADY=1")   # also lost, but owed
        with notify_socket(address) as sock:
            sock.settimeout(5)
            notifier.send("")
            assert sock.recv(4096) == b"STATUS=serving\nREADY=1"
            notifier.send("")                     # nothing owed now
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                sock.recv(4096)
    finally:
        notifier.close()


# --- the engine's health, through the real socket ---------------------------


async def _received(sock: socket.socket, until: Callable[[list[str]], bool],
                    timeout: float = 20) -> list[str]:
    """Notifications (split in lines) until ``until(all so far)``."""
    loop = asyncio.get_running_loop()
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; received {got}")
        with_timeout = asyncio.wait_for(loop.sock_recv(sock, 4096), left)
        got.extend((await with_timeout).decode().split("\n"))
    return got


async def test_a_stalled_model_stops_the_watchdog_pings_until_its_call_returns(
        tmp_path: Path) -> None:
    cfg = load_config(env={}, overrides={"stream.partial_interval_ms": 0,
                                         "worker.stall_timeout_s": 0.3})
    backend = HangingBackend()
    address = str(tmp_path / "notify")
    with notify_socket(address) as sock:
        sock.setblocking(False)
        notifier = Notifier(address, 0.4)             # a ping every 0.2 s
        try:
            async with Engine(cfg, backend) as engine:
                task = asyncio.ensure_future(supervise(
                    notifier, lambda: _service_snapshot(engine, "ws://here")))
                try:
                    said = await _received(sock, lambda got: got.count("WATCHDOG=1") >= 3)
                    assert "READY=1" in said
                    assert "STATUS=serving on ws://here: 0 streams open" in said
                    backend.hang()
                    stream = engine.open_stream("s")
                    stream.push(talk(1))
                    await asyncio.to_thread(backend.stuck.wait, 10)
                    said = await _received(sock, lambda got: any("model stalled" in x
                                                                 for x in got))
                    # Once stalled, a second of silence: systemd's WatchdogSec runs out.
                    quiet = await _received_for(sock, 1.0)
                    assert "WATCHDOG=1" not in quiet, quiet
                    backend.release()
                    said = await _received(sock, lambda got: "WATCHDOG=1" in got)
                    assert any(x.startswith("STATUS=serving") for x in said)
                    await stream.close()
                finally:
                    task.cancel()
        finally:
            backend.release()
            notifier.close()


async def _received_for(sock: socket.socket, seconds: float) -> list[str]:
    loop = asyncio.get_running_loop()
    got: list[str] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), left)
        except TimeoutError:
            break
        got.extend(data.decode().split("\n"))
    return got


async def test_a_tiny_watchdog_interval_does_not_spin_the_event_loop(tmp_path: Path) -> None:
    """WATCHDOG_USEC=1 made the poll interval 0.25 µs: supervise looked at the
    engine and sent a ping tens of thousands of times a second, a busy loop
    on the event loop that serves the captions, flooding systemd."""
    address = str(tmp_path / "notify")
    with notify_socket(address) as sock:
        sock.setblocking(False)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1"})
        assert notifier is not None
        looks = 0

        def snapshot() -> Snapshot:
            nonlocal looks
            looks += 1
            return READY

        task = asyncio.ensure_future(supervise(notifier, snapshot))
        try:
            said = await _received_for(sock, 0.5)
        finally:
            task.cancel()
            notifier.close()
    assert "WATCHDOG=1" in said                  # it still pings, as often as it can
    assert looks <= 100, looks


# --- serve under systemd ----------------------------------------------------


def _recv_until(sock: socket.socket, until: Callable[[list[str]], bool], got: list[str],
                timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; received {got}")
        sock.settimeout(left)
        got.extend(sock.recv(4096).decode().split("\n"))


def test_serve_tells_systemd_when_ready_pings_and_reports_reload_and_stop(
        tmp_path: Path) -> None:
    name = f"evoxtral-test-{os.getpid()}-{time.monotonic_ns()}"
    log = tmp_path / "serve.log"
    with notify_socket(b"\0" + name.encode()) as sock, log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evoxtral_stream", "serve", "--source", "none",
             "--port", "0", "--no-print"],
            stdout=subprocess.DEVNULL, stderr=err,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "NOTIFY_SOCKET": f"@{name}",
                 "WATCHDOG_USEC": "1000000"})
        try:
            got: list[str] = []
            _recv_until(sock, lambda g: "READY=1" in g, got)
            assert got[0] == "STATUS=loading the model", got
            serving = [x for x in got if x.startswith("STATUS=serving on ws://")]
            assert serving, got
            url = serving[-1].removeprefix("STATUS=serving on ").split(":", 3)
            base = f"http:{url[1]}:{url[2]}"
            # READY means what /readyz means.
            with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
                assert r.status == 200
            start = len(got)
            t0 = time.monotonic()
            _recv_until(sock, lambda g: g[start:].count("WATCHDOG=1") >= 4, got, 10)
            assert time.monotonic() - t0 >= 1.0, "pings come every half WATCHDOG_USEC"

            start = len(got)
            proc.send_signal(signal.SIGHUP)
            _recv_until(sock, lambda g: "READY=1" in g[start:], got, 30)
            reload = got[start:]
            assert reload.index("RELOADING=1") < reload.index("READY=1")
            stamp = next(x for x in reload if x.startswith("MONOTONIC_USEC="))
            usec = int(stamp.removeprefix("MONOTONIC_USEC="))
            assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 60e6

            start = len(got)
            proc.send_signal(signal.SIGTERM)
            _recv_until(sock, lambda g: "STOPPING=1" in g[start:], got, 30)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


# --- the documented unit ----------------------------------------------------


def _documented_unit() -> str:
    doc = (ROOT / "docs" / "systemd.md").read_text()
    block = re.search(r"<!-- systemd-unit -->\n```ini\n(.+?)```\n<!-- /systemd-unit -->",
                      doc, re.S)
    assert block is not None, "docs/systemd.md lacks its unit"
    return block.group(1)


def _seconds(value: str) -> float:
    units = {"min": 60, "s": 1}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * factor
    return float(value)


def test_the_documented_unit_fits_what_serve_does(tmp_path: Path) -> None:
    unit = _documented_unit()
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
    cfg = load_config(env={})
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["WatchdogSignal"] == "SIGTERM"       # a drain, not a core dump
    # Pings every half WatchdogSec, looked for every POLL_S: room for both.
    assert _seconds(settings["WatchdogSec"]) >= 10
    # The stop's longest wait with the defaults, in the order serve stops:
    # the drain of the last finals, MQTT's last sends (drain_s, then the
    # goodbye's bound), the flush to clients and their close, the model thread.
    from evoxtral_stream.engine.engine import _STOP_GRACE_S
    from evoxtral_stream.server.app import CLOSE_TIMEOUT_S

    parts = [cfg.worker.drain_timeout_s, cfg.mqtt.drain_s + 2 * cfg.mqtt.timeout_s + 1,
             cfg.server.shutdown_flush_s + CLOSE_TIMEOUT_S + 1, _STOP_GRACE_S]
    longest = sum(parts)
    assert _seconds(settings["TimeoutStopSec"]) >= longest + 10
    # The comment above it says that sum, and the parts it adds up.
    comment = " ".join(line.lstrip("# ") for line in unit.splitlines()
                       if line.startswith("#"))
    said = re.search(r"the longest stop with the default config, about (\d+) s", comment)
    assert said is not None and int(said.group(1)) == round(longest), (comment, longest)
    stated = [float(n) for n in re.findall(r"(\d+(?:\.\d+)?) s\)", comment)]
    assert stated == parts, f"the unit's comment adds up {stated}, serve waits {parts}"
    assert " serve " in settings["ExecStart"] and "--no-print" in settings["ExecStart"]
    # PrivateTmp empties torch's default compile cache at every start.
    assert settings["PrivateTmp"] != "true" or settings["CacheDirectory"] == "evoxtral"
    # Restart=on-failure must not loop on what a restart cannot fix (below).
    assert settings["Restart"] == "on-failure"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # the rest is systemd's own parser, where there is one
    exe = Path(sys.executable).with_name("evoxtral-stream")
    path = tmp_path / "evoxtral-stream.service"
    path.write_text(unit.replace("/opt/evoxtral-stream/.venv/bin/evoxtral-stream", str(exe)))
    proc = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                          timeout=60)
    # It exits 0 on settings it ignores, so anything it says is a fault.
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), \
        proc.stdout + proc.stderr


def test_the_documented_unit_does_not_restart_a_serve_that_cannot_start(tmp_path: Path
                                                                        ) -> None:
    """A configuration serve refuses exits with status 2 before the model
    loads. Under the unit's Restart=on-failure that was a restart every
    RestartSec, forever (never StartLimitBurst in StartLimitIntervalSec: 5 s
    apart): the unit stayed "activating (auto-restart)" and the journal
    repeated the error. RestartPreventExitStatus= lists it, so the unit
    fails and says why; status 1, a shutdown that had to close finals early
    (the watchdog's SIGTERM on a stalled model), is still restarted."""
    settings = dict(line.split("=", 1) for line in _documented_unit().splitlines()
                    if "=" in line and not line.startswith("#"))
    prevented = settings.get("RestartPreventExitStatus", "").split()
    config = tmp_path / "config.toml"
    config.write_text("[vad]\naggressiveness = 7\n")
    proc = subprocess.run(
        [sys.executable, "-m", "evoxtral_stream", "serve", "--source", "none",
         "--port", "0", "--no-print", "--config", str(config)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "vad.aggressiveness" in proc.stderr, proc.stderr
    assert str(proc.returncode) in prevented, (proc.returncode, prevented)
    assert "1" not in prevented and "0" not in prevented
