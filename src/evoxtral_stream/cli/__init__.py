"""``evoxtral-stream`` command line: serve, transcribe, devices.

Errors meant for people (bad config, unreadable audio, missing model or
audio device) are printed as one line and exit with status 2; ``--debug``
shows the traceback instead.

Logs go to stderr, as ``[logging] format`` (or ``--log-format``) says. In
``json`` mode everything the command writes to stderr is a JSON line: the
status lines and that one error line become log records too. Captions and
results on stdout are not logs and never change.

:func:`main` runs a command; :mod:`.parser` reads the command line,
:mod:`.messages` and :mod:`.results` say and write what a command has to,
:mod:`.exits` ends it; each command is :mod:`.transcribe`,
:mod:`.subtitles`, :mod:`.serve`, or one of :mod:`.tools`.
"""

from __future__ import annotations

import sys

# Every import inside the guard: a Ctrl-C while they run (asyncio alone takes
# tens of milliseconds, numpy and the engine a second or more from a cold
# disk) is the one line and status 130, not a traceback (..startup). The
# modules of this package import theirs as this imports them: inside it too.
try:
    from ..startup import (
        asked_log_format,
        fill_closed_descriptors,
        forget_caught_interrupts,
        interrupted_by_ctrl_c,
        say_interrupted,
        unwatch_ctrl_c,
        watch_ctrl_c,
    )

    watch_ctrl_c()
    from collections.abc import Sequence
    from dataclasses import replace

    from ..audio.sources import AudioInputError
    from ..config import ConfigError, LoggingConfig, load_config
    from ..engine.backends import BackendUnavailable
    from .exits import (
        EXIT_STDOUT_CLOSED,
        _drop_what_stdout_cannot_take,
        _exit_leaving_threads,
        _late_stops_ignored_to_the_exit,
        _native_threads_left,
        _stand_in_for_closed_streams,
        _stops_ignored_to_the_exit,
    )
    from .messages import UserError, _error_line, _fail, _say, _setup_logging, log
    from .parser import _flag_logging, _load_config, _parse
    from .results import _StdoutClosed
    from .serve import _cmd_serve
    from .subtitles import _cmd_subtitles
    from .tools import _cmd_config, _cmd_devices, _cmd_eval, _cmd_export_merged, _cmd_hash_token
    from .transcribe import _cmd_transcribe, _UnreadableFiles

    if unwatch_ctrl_c():
        raise KeyboardInterrupt  # one a library let go of: the user still asked
except BaseException as e:
    from ..startup import exit_if_interrupted

    exit_if_interrupted(e)
    raise


__all__ = ["main"]

#: Commands that use nothing of the config but its logging, and so run on
#: the built-in defaults when it does not load: hash-token makes the hash
#: that a [[auth.tokens]] entry still lacks (a placeholder, or the token
#: pasted there), the very error its config would stop it on; devices lists
#: what a broken ``audio.device`` should name.
_WITHOUT_CONFIG = frozenset({"hash-token", "devices"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; its exit status. Without ``argv`` this
    is the program (the console script, ``python -m``): it reads
    ``sys.argv``, and once the status is decided a Ctrl-C or SIGTERM no
    longer changes it (:func:`.exits._stops_ignored_to_the_exit`)."""
    logs: LoggingConfig | None = None  # once its handler is in place
    try:
        # Before anything is opened and kept: a descriptor 0-2 closed at the
        # start would be the first file or socket opened since.
        fill_closed_descriptors()
        _stand_in_for_closed_streams()
        args = _parse(argv)
        # The flags' logging now, so that an error in the config itself is
        # reported in the format --log-format asked for; the config's next.
        flag_logs = _flag_logging(args)
        _setup_logging(flag_logs)
        logs = flag_logs
        commands = {"serve": _cmd_serve, "transcribe": _cmd_transcribe,
                    "devices": _cmd_devices, "subtitles": _cmd_subtitles,
                    "eval": _cmd_eval, "export-merged": _cmd_export_merged,
                    "hash-token": _cmd_hash_token, "config": _cmd_config}
        try:
            try:
                cfg = _load_config(args)
            except ConfigError:
                if args.command not in _WITHOUT_CONFIG:
                    raise
                # The built-in defaults, logging as the flags say.
                cfg = replace(load_config(env={}), logging=flag_logs)
            if cfg.logging != logs:
                _setup_logging(cfg.logging)
                logs = cfg.logging
            status = commands[args.command](args, cfg)
            _late_stops_ignored_to_the_exit()
            return status
        except _StdoutClosed:
            log.debug("standard output closed by its reader: stopped")
            return EXIT_STDOUT_CLOSED
        except (ConfigError, AudioInputError, BackendUnavailable, UserError) as e:
            if args.debug or interrupted_by_ctrl_c(e):  # the latter: below
                raise
            if isinstance(e, _UnreadableFiles):
                for message in e.messages[:-1]:
                    _error_line(message, logs)
            _fail(str(e), logs)
    except BaseException as e:
        # A Ctrl-C, or what a library raised as one cut its import short
        # (the model's, while it loads): one line, status 130.
        if isinstance(e, SystemExit) or not interrupted_by_ctrl_c(e):
            raise
        if logs is None:  # before the logging: as the flags ask
            say_interrupted(asked_log_format(sys.argv[1:] if argv is None else argv) == "json")
        elif logs.format == "json":
            log.warning("interrupted")
        else:
            _say("evoxtral-stream: interrupted")  # in order with the log records
        if _native_threads_left():
            # A second Ctrl-C cut the engine's shutdown short (asyncio.run
            # raises it at once): the model thread may still be inside
            # native code, where interpreter exit would crash it.
            _exit_leaving_threads(130)
        return 130
    finally:
        if argv is None:
            _stops_ignored_to_the_exit()
        forget_caught_interrupts()
        _drop_what_stdout_cannot_take()
