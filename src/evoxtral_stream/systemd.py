"""Tell systemd how ``serve`` is doing: the ``sd_notify`` protocol, stdlib only.

Under a unit with ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (and, with
``WatchdogSec=``, ``$WATCHDOG_USEC``); elsewhere this does nothing. What is
said, and when (the contract ``docs/systemd.md`` documents):

- ``STATUS=...`` whenever the one-line status changes (``systemctl status``
  shows it): loading the model, warming up, serving with how many streams,
  stalled, reloading, stopping.
- ``READY=1`` once, when the model is loaded and warmed up and its thread
  serves, the port listening: what ``/readyz`` calls ready. Until then
  systemd holds the unit in ``activating``, so units ordered after it wait.
- ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` while ``/healthz`` would say
  ``ok``. A model thread stuck in one call past ``worker.stall_timeout_s``
  stops the pings, so systemd restarts the service once ``WatchdogSec``
  passes without one; a model thread given up on for good (``model down``)
  sends ``WATCHDOG=trigger`` at once.
- ``RELOADING=1`` with ``MONOTONIC_USEC`` when a SIGHUP reload starts, and
  ``READY=1`` when it is applied (so ``Type=notify-reload`` works too).
- ``STOPPING=1`` when the shutdown starts.

:class:`ServiceNotices` decides what to say from snapshots of the engine's
state and the time it is given: pure, no clock, no socket. :class:`Notifier`
is the socket; :func:`supervise` the loop task that joins them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Notifier", "ServiceNotices", "Snapshot", "merged", "monotonic_usec", "supervise"]

log = logging.getLogger(__name__)

#: How often :func:`supervise` looks at the engine, at most (seconds).
POLL_S = 0.5
#: ... and at least: a tiny ``WATCHDOG_USEC`` must not make it a busy loop.
MIN_POLL_S = 0.01


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The engine as ``/readyz`` and ``/healthz`` see it at one moment.

    ``unhealthy`` is ``"model stalled"``, ``"model down"`` or None;
    ``status`` the line for ``systemctl status``."""

    ready: bool
    unhealthy: str | None
    status: str


class ServiceNotices:
    """What to tell systemd, from snapshots of the engine (see the module doc).

    Every method returns one notification: newline-separated ``KEY=VALUE``
    assignments, "" when there is nothing to say. ``watchdog_s`` is
    ``WATCHDOG_USEC`` in seconds (None: no watchdog); ``now`` any monotonic
    clock in seconds.
    """

    def __init__(self, watchdog_s: float | None) -> None:
        if watchdog_s is not None and watchdog_s <= 0:
            raise ValueError(f"watchdog interval must be positive, got {watchdog_s}")
        self.watchdog_s = watchdog_s
        self._status = ""
        self._ready = False
        self._stopping = False
        self._triggered = False
        self._next_ping = float("-inf")

    @property
    def poll_s(self) -> float:
        """How often to call :meth:`update`: often enough for the watchdog
        (a ``WatchdogSec`` under ``4 * MIN_POLL_S`` cannot be kept up with
        exactly, but does not turn the event loop into a busy loop)."""
        if self.watchdog_s is None:
            return POLL_S
        return max(MIN_POLL_S, min(POLL_S, self.watchdog_s / 4))

    def update(self, now: float, snap: Snapshot) -> str:
        """The notification for the engine as ``snap`` shows it at ``now``."""
        if self._stopping:
            return ""
        lines = self._say(snap.status)
        if snap.ready and not self._ready:
            self._ready = True
            lines.append("READY=1")
        if self.watchdog_s is not None:
            if snap.unhealthy == "model down":
                if not self._triggered:
                    # Nothing will come back by itself: restart now rather
                    # than after WatchdogSec.
                    self._triggered = True
                    lines.append("WATCHDOG=trigger")
            elif snap.unhealthy is None and now >= self._next_ping:
                self._next_ping = now + self.watchdog_s / 2
                lines.append("WATCHDOG=1")
        return "\n".join(lines)

    def status(self, text: str) -> str:
        """A status line alone (e.g. before the engine exists)."""
        return "\n".join(self._say(text))

    def reloading(self, monotonic_usec: int) -> str:
        """A reload starts; ``monotonic_usec`` is CLOCK_MONOTONIC in µs, which
        ``Type=notify-reload`` requires beside ``RELOADING=1``."""
        if self._stopping:
            return ""
        return "\n".join(["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}",
                          *self._say("reloading the configuration")])

    def reloaded(self, snap: Snapshot) -> str:
        """The reload is applied (or refused: the old configuration serves on).
        ``READY=1`` again only if it was said before: a reload during the
        warm-up leaves the first one to :meth:`update`."""
        if self._stopping:
            return ""
        self._status = ""  # the serving line again, even if unchanged
        return "\n".join([*(["READY=1"] if self._ready else []), *self._say(snap.status)])

    def stopping(self, text: str) -> str:
        """The shutdown starts; nothing but this is said afterwards."""
        if self._stopping:
            return ""
        self._stopping = True
        return "\n".join(["STOPPING=1", *self._say(text)])

    def _say(self, text: str) -> list[str]:
        # A newline would start a new assignment: systemd would read the
        # rest as another (unknown) key.
        text = " ".join(text.split())
        if text == self._status:
            return []
        self._status = text
        return [f"STATUS={text}"]


class Notifier:
    """The notification socket systemd gave the process (``$NOTIFY_SOCKET``).

    :meth:`send` never raises and never blocks, because serving captions
    matters more than telling systemd about it: a notification that cannot
    go (systemd's queue full, its socket away) is logged (once per kind of
    failure) and owed. What is owed goes with the next send, merged into it
    (see :func:`merged`), until one goes: ``READY=1`` or ``STOPPING=1`` said
    once must not be lost, or systemd waits for it until a timeout kills
    the service. Bounded: one value per key.
    """

    def __init__(self, address: str | bytes, watchdog_s: float | None) -> None:
        self.address = address
        self.notices = ServiceNotices(watchdog_s)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._failures: set[str] = set()
        self._owed = ""

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None,
                     pid: int | None = None) -> Notifier | None:
        """The notifier ``env`` (default ``os.environ``) asks for, or None
        without ``NOTIFY_SOCKET``. A socket address systemd can give but this
        cannot use (``vsock:``), or a malformed ``WATCHDOG_USEC``, is logged
        and ignored. ``WATCHDOG_PID`` naming another process than ``pid``
        (default: this one) means the watchdog is not ours."""
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        if not raw:
            return None
        address: str | bytes
        if raw.startswith("/"):
            address = raw
        elif raw.startswith("@"):
            # Linux abstract namespace. The name is bytes in the environment:
            # os.fsencode gives back those that are not UTF-8 too.
            address = b"\0" + os.fsencode(raw[1:])
        else:
            log.warning("NOTIFY_SOCKET=%r is not a socket path this process can use; "
                        "systemd will not hear from it", raw)
            return None
        return cls(address, _watchdog_s(env, os.getpid() if pid is None else pid))

    def send(self, message: str) -> bool:
        """Send ``message`` with what is owed (see the class doc: never
        raises); "" sends only what is owed. False when it could not go. A
        character that is no text (a lone surrogate) goes as ``?``: systemd
        reads UTF-8."""
        message = merged(self._owed, message)
        if not message:
            return True
        try:
            self._sock.sendto(message.encode("utf-8", "replace"), self.address)
        except Exception as e:  # the contract: the watchdog task must not end here
            # A ping is worth something only on time; the next is due soon.
            self._owed = merged(message, "", pings=False)
            kind = type(e).__name__
            if kind not in self._failures:
                self._failures.add(kind)
                log.warning("cannot notify systemd at %s (%s: %s); what it has not heard "
                            "goes again with the next notification", _shown(self.address),
                            kind, e)
            return False
        self._owed = ""
        log.debug("notified systemd: %s", message.replace("\n", "; "))
        return True

    def close(self) -> None:
        self._sock.close()


async def supervise(notifier: Notifier, snapshot: Callable[[], Snapshot]) -> None:
    """Tell systemd about ``snapshot()`` every ``poll_s`` until cancelled.

    A look that raises is logged (once per kind of exception, with its
    traceback) and says nothing, so no ping: the next look is made as ever.
    Ending here instead would stop the pings of a healthy service, and
    systemd would kill it with nothing in the log to say why."""
    notices = notifier.notices
    failures: set[str] = set()
    while True:
        try:
            message = notices.update(time.monotonic(), snapshot())
        except Exception as e:
            message = ""
            if type(e).__name__ not in failures:
                failures.add(type(e).__name__)
                log.error("cannot tell systemd how the engine is (%s: %s); no watchdog "
                          "ping until it can", type(e).__name__, e, exc_info=True)
        notifier.send(message)
        await asyncio.sleep(notices.poll_s)


def merged(owed: str, message: str, *, pings: bool = True) -> str:
    """``owed`` and then ``message`` as one notification: one assignment per
    key, the later value winning (systemd reads the first ``STATUS=``; the
    latest is the true one), in the order the keys first came. ``RELOADING=1``
    owed with the ``READY=1`` that ends the reload is what ``Type=notify-reload``
    takes as a whole reload. ``WATCHDOG=trigger`` stays one (a ping after it
    must not cancel it); ``pings=False`` leaves out ``WATCHDOG=1``."""
    values: dict[str, str] = {}
    for line in (*owed.split("\n"), *message.split("\n")):
        key, sep, value = line.partition("=")
        if not sep or (line == "WATCHDOG=1" and (not pings or "WATCHDOG" in values)):
            continue
        values[key] = value
    return "\n".join(f"{key}={value}" for key, value in values.items())


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``MONOTONIC_USEC`` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _watchdog_s(env: Mapping[str, str], pid: int) -> float | None:
    raw = env.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        usec = 0
    if not 0 < usec < 2 ** 64:  # systemd's is a uint64; a float would overflow past it
        log.warning("WATCHDOG_USEC=%r is not a positive whole number of microseconds; "
                    "no watchdog pings", raw)
        return None
    return usec / 1e6


def _shown(address: str | bytes) -> str:
    return address if isinstance(address, str) else "@" + address[1:].decode(errors="replace")
