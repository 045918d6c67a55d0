"""What a command tells people on stderr: the log setup (``--log-format``,
``-q``, ``--debug``), status lines, and the one error line of a
:class:`UserError` with exit status 2."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import NoReturn

from ..config import Config, LoggingConfig
from ..console import above_captions
from ..logs import (
    LEVELS,
    STATUS_LINE,
    configure_logging,
    install_json_hooks,
    install_text_hooks,
    one_line,
    quiet_library_progress_bars,
    write_in_order,
)
from ..server.auth import install_token_redaction, redact_tokens
from ..startup import keep_sending_lost_ctrl_c
from .exits import EXIT_USAGE

log = logging.getLogger("evoxtral_stream")


class UserError(Exception):
    """An error with a message for people; exits with status 2."""


# Held back below DEBUG: the websockets handshake lines, the tokenizer's
# vocabulary sizes (mistral_common, at every Voxtral load) and the like.
_NOISY_LOGGERS = ("websockets", "faster_whisper", "httpx", "urllib3", "mistral_common")


def _setup_logging(logs: LoggingConfig) -> None:
    """Send log records to stderr in ``logs.format`` from ``logs.level`` up.

    Called with the flags' settings first, then again with the loaded config
    (where the flags already won); the second call reformats the same handler.
    """
    level = LEVELS[logs.level]
    json_mode = logs.format == "json"
    handler = configure_logging(logs.format, level, stream=sys.stderr,
                                redact=redact_tokens)
    # Tokens out of the logs, in every mode: under --debug websockets logs
    # each handshake header, and in any mode a message or traceback may hold
    # a URL. On the root's handlers, which see the records of every logger.
    # In json mode the formatter redacts extra= fields too, which the filter
    # does not see.
    install_token_redaction()
    for noisy in _NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.NOTSET if level <= logging.DEBUG
                                          else logging.WARNING)
    if level > logging.INFO:
        quiet_library_progress_bars()
    if json_mode and handler is not None:
        install_json_hooks()
        # Its unraisablehook would log a Ctrl-C lost in a weakref callback
        # as an error record: it goes under the one that sends it again.
        keep_sending_lost_ctrl_c()
    elif handler is not None:
        install_text_hooks(redact_tokens)  # the --debug traceback


def _notice(cfg: Config, message: str) -> None:
    """A status line for the operator on stderr, at INFO level: printed as it
    always was in text mode, an INFO record in json mode (so stderr stays JSON
    lines). In both, nothing when ``logging.level`` is above info (``-q``)."""
    if cfg.logging.format == "json":
        log.info("%s", message, extra=STATUS_LINE)
    elif LEVELS[cfg.logging.level] <= logging.INFO and not write_in_order(message + "\n"):
        # In order with the log records where a writer thread writes them;
        # here (a terminal), above the live captions. A stderr that takes
        # nothing (a full disk) loses the line, as the logging module loses
        # a record, and must not change the exit status.
        with above_captions(sys.stderr), contextlib.suppress(OSError):
            print(message, file=sys.stderr, flush=True)


def _error_line(message: str, logs: LoggingConfig) -> None:
    """Report an error meant for people in one line (an ERROR record in json mode)."""
    if logs.format == "json":
        log.error("%s", message)
    else:
        # One line even when the message quotes a file name holding a line
        # break (or a terminal escape), as a log record is; tokens redacted,
        # as the json record's are (it quotes values).
        _say(f"evoxtral-stream: error: {one_line(redact_tokens(message))}")


def _say(line: str) -> None:
    """``line`` on stderr, in order with the log records queued for it
    (:func:`~evoxtral_stream.logs.write_in_order`)."""
    if not write_in_order(line + "\n"):
        with contextlib.suppress(OSError):  # stderr full: the exit status still tells
            print(line, file=sys.stderr, flush=True)


def _fail(message: str, logs: LoggingConfig) -> NoReturn:
    """:func:`_error_line`, then exit with status 2."""
    _error_line(message, logs)
    raise SystemExit(EXIT_USAGE)
