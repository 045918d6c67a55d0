"""Server test fixtures: a real mosquitto broker on a free local port."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.http import free_port

__all__ = ["MosquittoBroker", "free_port", "mosquitto", "mosquitto_binary"]


def mosquitto_binary() -> str | None:
    # Debian installs the broker in /usr/sbin, which a non-root PATH may lack.
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


class MosquittoBroker:
    """A mosquitto process on 127.0.0.1:``port``; ``stop``/``start`` keep the port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        assert not self.running, "broker already running"
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                          stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self._proc.returncode}): "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mosquitto did not listen on {self.port} "
                                       f"in {timeout} s") from None
                time.sleep(0.02)

    def stop(self, *, graceful: bool = False) -> None:
        """Kill the broker at once (no clean shutdown): what a crash looks like.
        ``graceful``: SIGTERM, after which mosquitto saves its persistence file."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            if graceful:
                proc.send_signal(signal.SIGCONT)  # a frozen broker would not see SIGTERM
                proc.terminate()
            else:
                proc.kill()
            proc.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing is read or answered."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A running mosquitto, killed at teardown; skips when it is not installed."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    broker = MosquittoBroker(binary, tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
