"""A Ctrl-C before the command can handle it: while its modules import.

The ``evoxtral-stream`` command imports asyncio, numpy, websockets and the
engine before :func:`~evoxtral_stream.cli.main` runs (a second or more from
a cold disk). A Ctrl-C then is its one ``interrupted`` line and status 130,
not a traceback: :mod:`.cli` imports them between :func:`watch_ctrl_c` and
:func:`unwatch_ctrl_c`, and ``__main__`` and :mod:`.cli` give what ended
their imports to :func:`exit_if_interrupted`. From :func:`watch_ctrl_c` on,
for the command's whole life, a Ctrl-C that Python could only report
("Exception ignored in", its KeyboardInterrupt raised inside a weakref
callback) is not lost either (:class:`_SendAgain`). Nothing is imported here
before it is needed (and then the standard library only): this module
serves while those imports are what a Ctrl-C cut short.

And the standard descriptors a process was started without (``<&-``,
``>&-``, ``2>&-``): :func:`fill_closed_descriptors`, first thing in
:func:`~evoxtral_stream.cli.main` and in the clients (``clients/_terminal.py``).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing's: importing typing takes tens of milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import FrameType, TracebackType
    from typing import NoReturn

__all__ = ["asked_log_format", "exit_if_interrupted", "fill_closed_descriptors",
           "forget_caught_interrupts", "interrupted_by_ctrl_c", "keep_sending_lost_ctrl_c",
           "say_interrupted", "unwatch_ctrl_c", "watch_ctrl_c"]

_seen = False  # a Ctrl-C came while watched
_main: int | None = None  # the main thread, where watch_ctrl_c took Python's handler over


def _record(signum: int, frame: FrameType | None) -> None:
    """Python's own Ctrl-C handler (a KeyboardInterrupt), remembered."""
    global _seen
    _seen = True
    raise KeyboardInterrupt


def watch_ctrl_c() -> None:
    """Until :func:`unwatch_ctrl_c`, a Ctrl-C is remembered: a library whose
    import it cuts short may turn the KeyboardInterrupt into another error
    without a trace of it (numpy's C code makes it an ImportError), and C
    code may print it as it gives up (then it is not printed:
    :class:`_QuietOnceSeen`). Only over Python's own handler, in the main
    thread: a handler someone set is theirs. There, from now on, a Ctrl-C
    that Python could only report is not lost
    (:func:`keep_sending_lost_ctrl_c`)."""
    global _main
    import _thread
    import contextlib
    import signal

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        with contextlib.suppress(ValueError):  # not the main thread: not its to set
            signal.signal(signal.SIGINT, _record)
            _main = _thread.get_ident()
            keep_sending_lost_ctrl_c()
            sys.excepthook = _QuietOnceSeen(sys.excepthook)


def unwatch_ctrl_c() -> bool:
    """Python's own Ctrl-C handler again, where :func:`watch_ctrl_c` set its;
    whether a Ctrl-C came while watched (then forgotten)."""
    global _seen
    import signal

    if signal.getsignal(signal.SIGINT) is _record:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if isinstance(sys.excepthook, _QuietOnceSeen):
        sys.excepthook = sys.excepthook.previous
    seen, _seen = _seen, False
    return seen


class _QuietOnceSeen:
    """``sys.excepthook`` over ``previous`` while watched: C code a Ctrl-C
    cut short may print the KeyboardInterrupt as it gives up (PyErr_Print:
    numpy's ``import_array()``, in the modules built on numpy's, then raises
    an ImportError), a traceback above the one line. One remembered is not
    printed; anything else goes to ``previous``."""

    __slots__ = ("previous",)

    def __init__(self, previous: Callable[[type[BaseException], BaseException,
                                           TracebackType | None], object]) -> None:
        self.previous = previous

    def __call__(self, exc_type: type[BaseException], exc: BaseException,
                 tb: TracebackType | None) -> None:
        if not (_seen and issubclass(exc_type, KeyboardInterrupt)):
            self.previous(exc_type, exc, tb)


class _SendAgain:
    """``sys.unraisablehook`` over ``previous``: a KeyboardInterrupt that
    Python could only report ("Exception ignored in" and its traceback on
    stderr) in the main thread ``main`` is a Ctrl-C whose handler ran
    inside a weakref callback or a ``__del__`` (the import system's
    ``_get_module_lock.<locals>.cb``, as a module's import ends), and would
    be lost. It is not printed: one :func:`watch_ctrl_c` remembered ends the
    command at its guard; any other is sent again (:func:`_send_ctrl_c`).
    Anything else goes to ``previous``, another error whose context holds a
    KeyboardInterrupt too: a ``__del__`` failing while a caught Ctrl-C is
    handled would otherwise stop the command a second time."""

    __slots__ = ("main", "previous")

    def __init__(self, main: int, previous: Callable[[sys.UnraisableHookArgs], object]) -> None:
        self.main = main
        self.previous = previous

    def __call__(self, args: sys.UnraisableHookArgs) -> None:
        import _thread

        if isinstance(args.exc_value, KeyboardInterrupt) and _thread.get_ident() == self.main:
            if _seen:
                return  # and then the 130 of the imports' guard
            try:
                # From another thread: sent from this one, its handler would
                # run at once, inside this hook, whose error Python would
                # report instead. Nothing after it here: the main thread
                # takes it once the GIL has changed hands, and then only at
                # its next instruction that looks for signals, past this.
                _thread.start_new_thread(_send_ctrl_c, (self.main,))
                return
            except RuntimeError:  # no thread to be had (the interpreter exiting)
                pass
        self.previous(args)


def _send_ctrl_c(main: int) -> None:
    """The Ctrl-C again, to the main thread ``main``, where its handler
    takes it as any other; none sent where no handler of Python's is in
    place (SIG_IGN: the status is decided; SIG_DFL would end the process).
    A signal, not ``_thread.interrupt_main()``, so that a wait the main
    thread is in (a sleep, a lock, a read) ends for it, as for any Ctrl-C."""
    import contextlib
    import signal

    if callable(signal.getsignal(signal.SIGINT)):
        with contextlib.suppress(OSError):  # the main thread gone: the process is ending
            signal.pthread_kill(main, signal.SIGINT)


def keep_sending_lost_ctrl_c() -> None:
    """Make ``sys.unraisablehook`` a :class:`_SendAgain` over the hook in
    place, unless it is one: where :func:`watch_ctrl_c` took Python's
    handler over, for the command's whole life, so again after something
    replaced it (the JSON logs' hooks). Elsewhere (a handler someone set,
    another thread) nothing."""
    if _main is not None and not isinstance(sys.unraisablehook, _SendAgain):
        sys.unraisablehook = _SendAgain(_main, sys.unraisablehook)


def interrupted_by_ctrl_c(exc: BaseException) -> bool:
    """Whether ``exc`` is a KeyboardInterrupt or came of one (in its causes):
    a library whose import a Ctrl-C cut short may raise another error while
    handling it (a NameError, webrtcvad's; Python's RuntimeError around a
    class attribute's ``__set_name__``)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt):
            return True
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    return False


def asked_log_format(argv: Sequence[str]) -> str | None:
    """The ``--log-format`` in ``argv``, read leniently: the arguments around
    it may be what argparse refused."""
    import argparse

    class Scan(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise ValueError(message)

    scan = Scan(add_help=False)
    scan.add_argument("--log-format")
    try:
        value: str | None = scan.parse_known_args(argv)[0].log_format
    except ValueError:
        return None
    return value


def say_interrupted(json_mode: bool) -> None:
    """The one line for a Ctrl-C that ended the command before its own
    handling (loading the model, importing modules)."""
    import contextlib
    import json
    from datetime import UTC, datetime

    if json_mode:
        # The shape of logs.JsonFormatter's records, which may not be importable yet.
        ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        line = json.dumps({"ts": ts, "level": "WARNING", "logger": "evoxtral_stream",
                           "msg": "interrupted"})
    else:
        line = "evoxtral-stream: interrupted"
    with contextlib.suppress(OSError):  # stderr full: the exit status still tells
        print(line, file=sys.stderr, flush=True)


def forget_caught_interrupts() -> None:
    """Let the status the command decided be the exit status after a Ctrl-C
    it caught. CPython takes a KeyboardInterrupt that left code run by
    ``exec()`` of a string as never handled, even once caught: dataclasses
    and namedtuple make their methods so, as a module imports (ours before
    main() runs, the model's libraries as it loads). ``python -m`` then ends
    by SIGINT (status -2), not 130. Each ``exec()`` of a string starts by
    forgetting it."""
    exec("")


def fill_closed_descriptors() -> None:
    """Open /dev/null onto each of descriptors 0, 1 and 2 that is closed, so
    that no file or socket opened later takes its number: whatever did was
    read as stdin (``transcribe -`` read the log writer's copy of stderr)
    and got what native code writes to descriptor 2 (libmpg123's notes went
    into a pipe's copy of the audio). To call before the process opens
    anything it keeps. Python's ``sys.stdin``, ``sys.stdout`` and
    ``sys.stderr`` stay as Python made them, None where it found a
    descriptor closed (and ``sys.__stderr__`` too): the program still
    knows it has none. Where /dev/null cannot be opened, they stay closed."""
    import os

    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            continue
        except OSError:  # EBADF: closed
            pass
        try:
            null = os.open(os.devnull, os.O_RDWR)
        except OSError:  # none in a bare chroot, or no descriptor left
            return
        if null == fd:  # the lowest number free, the ones below being open
            # os.open's are not inherited (PEP 446); a standard one must be,
            # or a program started from here would find it closed again.
            os.set_inheritable(fd, True)
        else:  # another thread's file took fd meanwhile: not to be replaced
            os.close(null)


def exit_if_interrupted(exc: BaseException) -> None:
    """If a Ctrl-C ended the imports (``exc`` their error): its line, in the
    format ``--log-format`` asks, and exit status 130. Otherwise return, for
    the caller to raise ``exc`` again; a SystemExit too (this has run)."""
    seen = unwatch_ctrl_c()
    if isinstance(exc, SystemExit) or not (seen or interrupted_by_ctrl_c(exc)):
        return
    say_interrupted(asked_log_format(sys.argv[1:]) == "json")
    forget_caught_interrupts()
    raise SystemExit(130) from None
