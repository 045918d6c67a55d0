"""A bounded queue of text and a thread that writes it to a file descriptor,
so that a reader that stops reading (journald or docker's blocking log
driver falling behind, a paused ``| less``) holds up that thread only,
never the one that queues (the event loop). Log records on stderr
(:class:`~.logs.QueuedLogHandler`) and ``serve``'s printed captions on
stdout (:class:`~.console.CaptionPrinter`) go through one each. Stdlib only.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

__all__ = ["EXIT_WAIT_S", "QueuedWriter"]

#: How long the exit waits for a writer to write what is queued.
EXIT_WAIT_S = 2.0


class QueuedWriter:
    """Writes the text :meth:`put` queues to ``stream``'s file descriptor,
    in order, on a thread of its own (``name``).

    Overflow: :meth:`put` drops a text that would make the queue hold more
    than its ``most`` texts or more than ``max_chars`` characters, and counts
    it; once the writer gets through again, ``dropped_line(n)`` (called under
    the queue's lock) is written where the ``n`` texts dropped would have
    been. :meth:`flush` waits for the queue to be written at most
    ``exit_wait`` seconds in all, over every call, then gives up: a reader
    that is stuck does not hang the exit.

    The thread writes to a duplicate of ``stream``'s descriptor with
    :func:`os.write`: a thread blocked in the stream's own write would hold
    its lock, which the interpreter's exit takes (and aborts on), and what
    redirects the descriptor for a while (an audio decoder's prints, held)
    leaves these lines where they were going. A text that cannot be written
    (the reader gone, a full disk) is lost; the first such error is kept in
    :attr:`error`. Raises :class:`OSError` (no descriptor to duplicate) or
    :class:`RuntimeError` (no thread to start).
    """

    def __init__(self, stream: TextIO, *, name: str, max_chars: int, exit_wait: float,
                 dropped_line: Callable[[int], str]) -> None:
        self._fd = os.dup(stream.fileno())
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        self._errors = getattr(stream, "errors", None) or "backslashreplace"
        self._max_chars = max_chars
        self._exit_wait = exit_wait
        self._dropped_line = dropped_line
        self._texts: deque[str] = deque()
        self._chars = 0
        self._dropped = 0
        self._busy = False   # the writer holds a text it took
        self._gave_up = False   # a flush timed out: later ones do not wait
        self.error: OSError | None = None
        """The first write that failed, or None."""
        self._cond = threading.Condition(threading.Lock())
        self._writer = threading.Thread(target=self._run, name=name, daemon=True)
        try:
            self._writer.start()
        except RuntimeError:
            os.close(self._fd)
            raise

    def put(self, text: str, most: int) -> bool:
        """Queue ``text`` behind the texts queued, unless ``most`` are
        queued already or it would not fit in the characters left: then it
        is dropped and counted (False)."""
        with self._cond:
            if len(self._texts) >= most or self._chars + len(text) > self._max_chars:
                self._dropped += 1
                self._cond.notify_all()   # a text too long for an empty queue
                return False
            if self._dropped:
                text = self._take_dropped() + text
            self._texts.append(text)
            self._chars += len(text)
            self._cond.notify_all()
            return True

    def _take_dropped(self) -> str:
        """The line counting the texts dropped (reset); under the lock."""
        n, self._dropped = self._dropped, 0
        return self._dropped_line(n)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._texts and not self._dropped:
                    self._cond.wait()
                if self._texts:
                    text = self._texts.popleft()
                    self._chars -= len(text)
                else:   # all written and some dropped since: say so now
                    text = self._take_dropped()
                self._busy = True
            self._write(text)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _write(self, text: str) -> None:
        try:
            raw = text.encode(self._encoding, self._errors)
        except UnicodeError:   # a strict stream's encoding lacks a character
            raw = text.encode(self._encoding, "backslashreplace")
        data = memoryview(raw)
        while data:
            try:
                data = data[os.write(self._fd, data):]
            except BlockingIOError:   # a descriptor someone made non-blocking
                time.sleep(0.01)
            except InterruptedError:
                continue
            except OSError as e:   # the reader gone, a full disk: the text is lost
                if self.error is None:
                    self.error = e
                return

    def flush(self) -> None:
        """Wait until what is queued is written, or ``exit_wait`` seconds
        (in all, over every call) have passed."""
        deadline = time.monotonic() + self._exit_wait
        with self._cond:
            while (self._texts or self._busy or self._dropped) and not self._gave_up:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._gave_up = True
                    break
                self._cond.wait(left)
