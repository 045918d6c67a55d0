"""Blocking calls on daemon threads of their own, which never hold a process's exit.

A call that cannot be interrupted can hang for good: a name lookup
(``socket.getaddrinfo``: a DNS server that never answers, an NSS module
stuck). asyncio's own ``loop.getaddrinfo`` runs it in the loop's default
executor, whose threads ``asyncio.run`` waits for at its end (Python 3.11:
with no limit) and the interpreter's exit joins: a program stopped during
such a lookup never exits. :func:`lookup` runs it on a daemon thread of its
own instead, which neither waits for. The MQTT publisher's broker lookups
and the command-line clients' server lookups go through it.
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading
from typing import Any

__all__ = ["lookup"]

# The lookups under way, by their arguments; _LOOKUPS_LOCK guards it (each
# lookup's thread removes its own).
_Key = tuple[Any, Any, int, int, int, int]
_LOOKUPS: dict[_Key, concurrent.futures.Future[list[Any]]] = {}
_LOOKUPS_LOCK = threading.Lock()


def lookup(host: str | bytes | None, port: str | bytes | int | None, *, family: int = 0,
           type: int = 0, proto: int = 0, flags: int = 0,
           thread_name: str = "lookup") -> concurrent.futures.Future[list[Any]]:
    """``socket.getaddrinfo`` of these arguments, in a daemon thread of its
    own named ``thread_name``, or the lookup of the same ones already under
    way.

    A thread cannot be stopped, so a caller that gives up (a deadline, a
    cancellation) leaves its lookup running; the next callers wait for that
    one rather than start another, so a resolver that never answers holds
    one thread per name, not one per attempt. The future cannot be
    cancelled (it is running). A thread that cannot start (the process at
    its thread limit) fails that lookup only, with the RuntimeError, and
    the next one tries anew.
    """
    key: _Key = (host, port, family, type, proto, flags)
    with _LOOKUPS_LOCK:
        found = _LOOKUPS.get(key)
        if found is not None:
            return found
        future: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        _LOOKUPS[key] = future

    def run() -> None:
        try:
            infos = socket.getaddrinfo(host, port, family=family, type=type, proto=proto,
                                       flags=flags)
        except BaseException as e:
            with _LOOKUPS_LOCK:
                del _LOOKUPS[key]
            future.set_exception(e)
        else:
            with _LOOKUPS_LOCK:
                del _LOOKUPS[key]
            future.set_result(infos)

    try:
        threading.Thread(target=run, name=thread_name, daemon=True).start()
    except RuntimeError as e:
        with _LOOKUPS_LOCK:
            del _LOOKUPS[key]
        future.set_exception(e)
    return future
