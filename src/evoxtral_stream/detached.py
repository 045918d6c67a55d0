"""Blocking calls on daemon threads of their own, which never hold a process's exit.

A call that cannot be interrupted can hang for good: a name lookup
(``socket.getaddrinfo``: a DNS server that never answers, an NSS module
stuck). asyncio's own ``loop.getaddrinfo`` runs it in the loop's default
executor, whose threads ``asyncio.run`` waits for at its end (Python 3.11:
with no limit) and the interpreter's exit joins: a program stopped during
such a lookup never exits. :func:`lookup` runs it on a daemon thread of its
own instead, which neither waits for. The MQTT publisher's broker lookups
and the command-line clients' server lookups go through it.
:func:`off_the_loop` does the same for any other call (PortAudio's close or
refresh of a vanished device, the TTS bridge's HTTPS requests).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["lookup", "off_the_loop"]

_T = TypeVar("_T")

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


async def off_the_loop(call: Callable[[], _T], name: str) -> _T:
    """``call()`` run on a daemon thread of its own named ``name``, awaited
    on the loop.

    Not in asyncio's default executor, for a call that can hang for good
    (see the module doc). Cancelled, the call is left to its thread, and
    its result dropped. A thread that cannot start raises its RuntimeError.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()

    def run() -> None:
        settle: Callable[[], object]
        try:
            result = call()
            settle = functools.partial(done.set_result, result)
        except BaseException as e:
            settle = functools.partial(done.set_exception, e)

        def deliver() -> None:
            if not done.done():  # else cancelled meanwhile
                settle()

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(deliver)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done
