"""The event loop the command-line clients run on (:func:`run_client`).

Connecting to ``--url`` looks its host name up with ``loop.getaddrinfo``
(websockets' ``connect``, or an HTTP proxy's when the environment names one),
which asyncio runs in the loop's default executor. A lookup that never
answers (a DNS server that is down, an NSS module stuck) then held the exit:
``asyncio.run`` waits for that executor's threads at its end (Python 3.11:
with no limit) and the interpreter's exit joins them, so Ctrl-C ended a
client's work but never its process. On :class:`LookupLoop` each lookup runs
on a daemon thread of its own instead (:func:`~evoxtral_stream.detached.lookup`:
one per name, however many connection attempts give up waiting for it).

Nothing else changes: asyncio tries the addresses one after the other as
before, websockets checks the TLS certificate against the URL's name and
sends its ``Host``, and a connection's ``open_timeout`` still bounds its
opening, lookup included (a lookup given up is left to its thread).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Coroutine
from typing import Any, TypeVar

from evoxtral_stream.detached import lookup

__all__ = ["LookupLoop", "run_client"]

_T = TypeVar("_T")


class LookupLoop(asyncio.SelectorEventLoop):
    """asyncio's loop, its name lookups on daemon threads (see the module doc)."""

    async def getaddrinfo(self, host: bytes | str | None, port: bytes | str | int | None, *,
                          family: int = 0, type: int = 0, proto: int = 0,
                          flags: int = 0) -> list[Any]:
        """``socket.getaddrinfo`` of the arguments, awaited; an OSError (as
        from the resolver) when no thread can be started for it."""
        found = lookup(host, port, family=family, type=type, proto=proto, flags=flags,
                       thread_name="client-lookup")
        try:
            return await asyncio.wrap_future(found, loop=self)
        except RuntimeError as e:
            # The process at its thread limit: a failed attempt, as a
            # resolver's error is, that the clients report (and retry) so.
            shown = host.decode(errors="replace") if isinstance(host, bytes) else host
            raise OSError(errno.EAGAIN, f"no thread to look {shown} up ({e})") from None


def run_client(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(main)`` on a :class:`LookupLoop`: its result, and
    KeyboardInterrupt on Ctrl-C as from ``asyncio.run``."""
    with asyncio.Runner(loop_factory=LookupLoop) as runner:
        return runner.run(main)
