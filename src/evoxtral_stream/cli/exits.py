"""How a command ends: its exit statuses, standard streams the caller
closed or whose reader left, threads the shutdown left behind, and Ctrl-C
or SIGTERM once the status is decided (they no longer change it). Standard
library only."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import os
import signal
import sys
import threading
import types
from typing import Any, NoReturn

EXIT_USAGE = 2
# stdout's reader left (``| head``): 128 + SIGPIPE, as a shell reports a
# program that SIGPIPE ended (Python ignores SIGPIPE: a write fails instead).
EXIT_STDOUT_CLOSED = 141


#: The engine's threads that may still be inside the model's native code
#: when a shutdown gave up on them (a second Ctrl-C: engine.worker,
#: engine.engine).
_MODEL_THREADS = frozenset({"model-worker", "model-worker-stop"})


def _native_threads_left() -> bool:
    """Whether a thread is still inside native code that a shutdown left:
    a model thread (:data:`_MODEL_THREADS`), or a lost microphone's close
    or refresh stuck in PortAudio
    (:func:`~evoxtral_stream.audio.microphone.portaudio_threads_left`),
    which would hold the interpreter's exit, where sounddevice terminates
    PortAudio again on the main thread. Only then must
    :func:`_exit_leaving_threads` end the process. Other daemon threads (an
    embedding program's, a library's) do not count: ``main()`` returns to
    its caller past them."""
    from ..audio.microphone import portaudio_threads_left

    return portaudio_threads_left() or any(
        t.daemon and t.is_alive() and t.name in _MODEL_THREADS for t in threading.enumerate())


def _exit_leaving_threads(code: int) -> NoReturn:
    """End the process with ``code`` now, without Python's finalization
    (nor the exit handlers: sounddevice's would wait on a stuck PortAudio).

    A shutdown that gave up leaves the model thread behind, still inside the
    backend's native code (CTranslate2, torch). Finalization would end that
    thread with ``pthread_exit`` when the call returns, unwinding through C++
    frames: the process aborts ("terminate called without an active
    exception", status 134) or crashes, instead of exiting with ``code``.
    Everything that matters is done by now (finals sent and journaled,
    clients closed); the output is flushed first."""
    logging.shutdown()
    for out in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            out.flush()
    os._exit(code)


def _ignore_late_stops(loop: asyncio.AbstractEventLoop) -> None:
    """Ignore Ctrl-C and SIGTERM from here to the exit: the shutdown is done
    and its status decided, so there is nothing left to stop. Closing the loop
    would restore their defaults, and the interpreter's exit (a while, with the
    model's libraries loaded) would then die by a late one (status -2 or -15,
    not 0). A handler that does nothing, not SIG_IGN: that would be inherited
    by any program this process starts afterwards (a test run's next
    subprocess, an embedding program's), which Ctrl-C and SIGTERM could then
    not stop; :func:`~evoxtral_stream.cli.main` makes it SIG_IGN as it returns to the exit."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, ValueError):
            loop.remove_signal_handler(sig)
            signal.signal(sig, _late_stop)


def _late_stop(signum: int, frame: types.FrameType | None) -> None:
    """A Ctrl-C or SIGTERM once the shutdown is done: nothing left to stop."""


def _late_stops_ignored_to_the_exit() -> None:
    """After serve's shutdown, as :func:`~evoxtral_stream.cli.main` returns to the interpreter's
    exit: SIG_IGN, which Python's own handlers do not last through (they are
    reset before its last, slow moments). Only then, since SIG_IGN would be
    inherited by any program started afterwards."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is _late_stop:
            signal.signal(sig, signal.SIG_IGN)


class _ClosedStream(io.RawIOBase):
    """A standard stream the caller closed (``<&-``, ``>&-``), which Python
    leaves as None: it reads as empty, and each write fails as a write to a
    closed descriptor does (EBADF), reported like any stdout that takes
    nothing."""

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return 0

    def write(self, data: Any) -> int:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    def fileno(self) -> int:
        # EBADF, as for the closed descriptor: outputs.py tells a closed
        # stdout by it (descriptor 1 is then another file's).
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))


def _stand_in_for_closed_streams() -> None:
    """Put a :class:`_ClosedStream` where a standard stream is None."""
    for name in ("stdin", "stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, io.TextIOWrapper(_ClosedStream(), encoding="utf-8",
                                                write_through=True))


def _drop_what_stdout_cannot_take() -> None:
    """A stdout whose reader left takes nothing more: send what its buffer
    still holds to /dev/null, not into an "Exception ignored" message as
    the interpreter's exit flushes it (the Python docs' recipe for SIGPIPE)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
    except (OSError, ValueError):  # a full disk, a closed stream: theirs to say
        pass


def _stops_ignored_to_the_exit() -> None:
    """Ignore Ctrl-C and SIGTERM from here to the exit of the process, whose
    status is decided: the exit takes a while (numpy and the model's
    libraries unloading), and a signal then would end it instead (status -2
    or -15, or a traceback from an exit handler). SIG_IGN, as Python resets
    its own handlers before the exit's last moments; only in the program
    (:func:`~evoxtral_stream.cli.main` without ``argv``), as later programs would inherit it."""
    if threading.current_thread() is not threading.main_thread():
        return  # main() called by an embedding program: not its to decide
    for sig in (signal.SIGINT, signal.SIGTERM):
        while True:
            try:
                signal.signal(sig, signal.SIG_IGN)
                break
            except KeyboardInterrupt:
                # One that came just now, raised as the handler changes:
                # the status is decided all the same.
                continue
