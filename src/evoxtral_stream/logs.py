"""Log output: the text lines people read, or one JSON object per line.

``[logging] format`` picks the formatter. ``"text"`` (:class:`TextFormatter`)
is the historical ``LEVEL logger: message``, one line whatever the message
holds. ``"json"`` (:class:`JsonFormatter`) is for log
shippers (Loki, ELK, journald → Vector): every record is one line holding
one JSON object, a multi-line message or traceback included.

:func:`configure_logging` owns one handler on the root logger, like
:func:`logging.basicConfig`, and can be called again to change its format
and level once the config file is read. On a terminal it writes each
record itself (:class:`~.console.TerminalLogHandler`, above the live
captions); anywhere else (a pipe, a file, a socket: journald, docker) a
writer thread of its own does (:class:`QueuedLogHandler`), so that a reader
that stops reading never stops the thread that logs. Stdlib only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
import traceback
import types
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from .console import TerminalLogHandler
from .writer import EXIT_WAIT_S, QueuedWriter

__all__ = [
    "FORMATS",
    "HANDLER_NAME",
    "LEVELS",
    "LOG_EXIT_WAIT_S",
    "LOG_QUEUE_CHARS",
    "LOG_QUEUE_RECORDS",
    "LOG_QUEUE_RESERVE",
    "STATUS_LINE",
    "TEXT_FORMAT",
    "JsonFormatter",
    "QueuedLogHandler",
    "TextFormatter",
    "adopt_library_loggers",
    "configure_logging",
    "install_json_hooks",
    "install_text_hooks",
    "make_formatter",
    "one_line",
    "quiet_library_progress_bars",
    "write_in_order",
]

#: The ``[logging] format`` values.
FORMATS = ("text", "json")
#: ``[logging] level`` values and the :mod:`logging` levels they stand for.
LEVELS: Mapping[str, int] = types.MappingProxyType({
    "debug": logging.DEBUG, "info": logging.INFO,
    "warning": logging.WARNING, "error": logging.ERROR,
})
#: The ``text`` format (what the engine has always written).
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
#: The name of the root handler :func:`configure_logging` adds and later finds.
HANDLER_NAME = "evoxtral-stream"
#: The most log records a :class:`QueuedLogHandler` holds for its writer...
LOG_QUEUE_RECORDS = 10_000
#: ... and the most characters they may take together.
LOG_QUEUE_CHARS = 8 * 1024 * 1024
#: The records beyond :data:`LOG_QUEUE_RECORDS` kept for warnings, errors
#: and the command's own status lines (:data:`STATUS_LINE`,
#: :func:`write_in_order`): the last error line is not lost to a flood of
#: DEBUG records.
LOG_QUEUE_RESERVE = 100
#: ``extra=`` of a record that is one of the command's status lines (the
#: JSON record of one): it may use :data:`LOG_QUEUE_RESERVE`. Not written.
STATUS_LINE: Mapping[str, object] = types.MappingProxyType({"_status_line": True})
#: How long the exit waits for the writer to write what is queued.
LOG_EXIT_WAIT_S = EXIT_WAIT_S

# Attributes every LogRecord has (plus the two the stdlib formatter adds):
# anything else on a record came from ``extra=``.
_RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# Keys of the JSON object itself; an ``extra=`` field of the same name is
# written as ``extra_<name>`` instead of replacing it.
_CORE = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})
# Nested ``extra=`` values deeper than this are stringified (cycles end here).
_MAX_DEPTH = 16


# C0 and C1 controls but the tab: a line break, a carriage return or a
# terminal escape in a message (a file name quoted) would end the line early,
# overwrite it, or rewrite the screen.
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_TEXT_ESCAPES = {"\n": "\\n", "\r": "\\r"}


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    return _TEXT_ESCAPES.get(char) or f"\\x{ord(char):02x}"


def one_line(text: str) -> str:
    """``text`` with its control characters but the tab written as ``\\n``,
    ``\\r`` and ``\\xNN``: one line of a text log, whatever it quotes."""
    return _TEXT_CONTROL.sub(_escape_control, text)


def _well_formed(text: str) -> str:
    """``text`` with each surrogate as the text ``\\udcff``, as a text-mode
    stderr writes it: JSON's ``\\udcff`` escape of a lone one (a byte of a
    file name that is not UTF-8) is refused by strict parsers (serde_json,
    in Vector), and a JSON line is for those too."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _text(obj: object) -> str:
    """``str(obj)``, else its ``repr``, else a placeholder: never raises."""
    for convert in (str, repr):
        try:
            return convert(obj)
        except Exception:
            pass
    return f"<unprintable {type(obj).__name__}>"


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON; never raises.

    Keys: ``ts`` (RFC 3339, UTC, milliseconds: ``2025-01-31T12:00:00.123Z``),
    ``level`` (``INFO``...), ``logger``, ``msg`` (the message with its
    arguments applied), ``exc`` (the traceback, when the record has
    exception info), ``stack`` (with ``stack_info=True``), then every
    ``extra=`` field: JSON values as they are (finite numbers, strings,
    booleans, null, lists and string-keyed tables of those), anything else
    as its ``str()``. The output is ASCII (``\\uXXXX`` escapes), so it is
    valid JSON on a stream of any encoding, and has no line break; a lone
    surrogate (a file name's byte that is not UTF-8) is the text
    ``\\udcff``, never that escape, which strict parsers refuse.

    ``redact``, when given, rewrites every string written (message,
    traceback, stack and extra fields, keys included): a redacting log
    filter only sees the message and traceback, not the extra fields.
    If a record cannot be formatted at all, a line saying so is written.
    """

    def __init__(self, redact: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        try:
            return self._format(record)
        except Exception as e:  # the contract: a log call always yields a line
            return json.dumps({
                "ts": self._ts(record),
                "level": _well_formed(_text(getattr(record, "levelname", "?"))),
                "logger": _well_formed(_text(getattr(record, "name", "?"))),
                "msg": f"log record could not be formatted ({type(e).__name__})",
            })

    @staticmethod
    def _ts(record: logging.LogRecord) -> str:
        try:
            when = datetime.fromtimestamp(record.created, UTC)
        except Exception:
            when = datetime.now(UTC)
        return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def _str(self, text: str) -> str:
        return _well_formed(self._redact(text) if self._redact is not None else text)

    def _message(self, record: logging.LogRecord) -> str:
        try:
            return record.getMessage()
        except Exception:
            # As the redacting filter does: show what there is.
            return (f"{_text(record.msg)} (arguments that do not fit: "
                    f"{_text(record.args)})")

    def _exception(self, record: logging.LogRecord) -> str | None:
        # exc_text first: a filter (RedactTokens) may have rewritten it.
        if not record.exc_text and record.exc_info and record.exc_info[0] is not None:
            try:
                record.exc_text = self.formatException(record.exc_info)
            except Exception as e:
                return f"{_text(record.exc_info[1])} (traceback unavailable: {type(e).__name__})"
        return record.exc_text or None

    def _value(self, value: object, depth: int = 0) -> Any:
        if value is None or isinstance(value, bool | int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else str(value)
        if isinstance(value, str):
            return self._str(value)
        if depth < _MAX_DEPTH:
            if isinstance(value, list | tuple):
                return [self._value(v, depth + 1) for v in value]
            if isinstance(value, dict):
                return dict(self._entry(_text(k), v, depth + 1) for k, v in value.items())
        return self._str(_text(value))

    def _entry(self, key: str, value: object, depth: int) -> tuple[str, Any]:
        """A table entry, redacted as the line ``key: value`` would be, so that
        ``{"Authorization": "Bearer TOKEN"}`` loses its token too."""
        name = self._str(key)
        if isinstance(value, str) and self._redact is not None:
            head = f"{name}: "
            line = self._redact(head + value)
            if line.startswith(head):
                return name, self._str(line[len(head):])
        return name, self._value(value, depth)

    def _format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self._ts(record), "level": _well_formed(record.levelname),
            "logger": _well_formed(record.name), "msg": self._str(self._message(record)),
        }
        exc = self._exception(record)
        if exc:
            out["exc"] = self._str(exc)
        if record.stack_info:
            out["stack"] = self._str(_text(record.stack_info))
        for key, value in list(vars(record).items()):
            if key in _RESERVED or key.startswith("_"):
                continue
            name, field = self._entry(key, value, 0)
            out[f"extra_{name}" if name in _CORE else name] = field
        return json.dumps(out, ensure_ascii=True, allow_nan=False)


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT`, one line per record: the control characters of
    the message (line breaks, carriage returns, terminal escapes: a file name
    may hold any) are written as ``\\n``, ``\\r`` and ``\\xNN``, as the
    one-line error lines write them, so that no message forges a record of
    its own. A traceback or stack follows on its own lines, as it always has.
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))


def make_formatter(fmt: str, redact: Callable[[str], str] | None = None) -> logging.Formatter:
    """The formatter for ``fmt`` (one of :data:`FORMATS`); ``redact`` only applies to JSON."""
    if fmt == "json":
        return JsonFormatter(redact)
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")


class QueuedLogHandler(logging.Handler):
    """Formats each record on the thread that logs, as any handler does, and
    leaves writing it to ``stream`` to a writer thread of its own, through a
    bounded queue: a reader of ``stream`` that stops reading (journald or
    docker's blocking log driver falling behind, a paused ``| less``) holds
    up that thread only, never the one that logs (the event loop).

    The queue holds at most ``records`` lines (:data:`LOG_QUEUE_RECORDS`;
    ``reserve`` more for warnings, errors, records logged with
    :data:`STATUS_LINE` and :meth:`write_text`) and ``max_chars`` characters.
    Overflow: the new line is dropped and counted, and once the writer gets
    through again it writes one WARNING record (formatted as the others,
    ``dropped`` its ``extra=`` field) saying how many were dropped, where
    they would have been. :meth:`flush` and :meth:`close` (the exit, through
    :func:`logging.shutdown`) wait for the queue to be written at most
    ``exit_wait`` seconds in all, then give up: a reader that is stuck does
    not hang the exit.

    The queue and its writer are a :class:`~.writer.QueuedWriter`: it
    writes to a duplicate of ``stream``'s file descriptor (what redirects
    descriptor 2 for a while, an audio decoder's prints held, leaves the
    log's lines where they were going), and a line that cannot be written
    (the reader gone, a full disk) is lost, as the logging module loses a
    record.
    """

    def __init__(self, stream: TextIO, *, records: int | None = None,
                 reserve: int = LOG_QUEUE_RESERVE, max_chars: int = LOG_QUEUE_CHARS,
                 exit_wait: float = LOG_EXIT_WAIT_S) -> None:
        self.stream = stream
        # Read at construction, so that a test can make it small beforehand.
        self._records = LOG_QUEUE_RECORDS if records is None else records
        self._reserve = reserve
        self._queue = QueuedWriter(stream, name="log-writer", max_chars=max_chars,
                                   exit_wait=exit_wait, dropped_line=self._dropped_line)
        # Last: it makes the handler known to logging.shutdown, which flushes
        # it at the exit; a Ctrl-C before the writer was made left one
        # without it there.
        super().__init__()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        reserved = record.levelno >= logging.WARNING or getattr(record, "_status_line", False)
        self._queue.put(line, self._records + (self._reserve if reserved else 0))

    def write_text(self, text: str) -> None:
        """Queue ``text`` (whole lines) behind the records queued, for the
        lines the command writes on stderr itself; it may use the reserve."""
        self._queue.put(text, self._records + self._reserve)

    def _dropped_line(self, n: int) -> str:
        """The record counting ``n`` records dropped, formatted."""
        record = logging.makeLogRecord({
            "name": "evoxtral_stream", "levelno": logging.WARNING, "levelname": "WARNING",
            "msg": "%d log records dropped: stderr's reader fell behind "
                   "(at most %d wait to be written)",
            "args": (n, self._records), "dropped": n})
        try:
            return self.format(record) + "\n"
        except Exception:
            return f"WARNING evoxtral_stream: {n} log records dropped\n"

    def flush(self) -> None:
        """Wait until what is queued is written, or :attr:`exit_wait`
        seconds (in all, over every call) have passed."""
        self._queue.flush()

    def close(self) -> None:
        """Flush (bounded); the writer and its descriptor stay for the
        process's life, for a record logged after it."""
        self.flush()
        super().close()


def _root_handler() -> logging.Handler | None:
    return next((h for h in logging.getLogger().handlers if h.get_name() == HANDLER_NAME),
                None)


def write_in_order(text: str) -> bool:
    """Queue ``text`` (whole lines) for stderr behind the log records queued,
    when :func:`configure_logging` made them go through a writer thread
    (:class:`QueuedLogHandler`): the command's status and error lines keep
    their order with the records. False, and nothing done, otherwise: the
    caller writes it itself."""
    handler = _root_handler()
    if isinstance(handler, QueuedLogHandler):
        handler.write_text(text)
        return True
    return False


def _direct(stream: TextIO) -> bool:
    """Whether records for ``stream`` are written by the thread that logs:
    on a terminal (the live captions' coordination needs it), and for a
    stream without a file descriptor (an in-memory one)."""
    try:
        if stream.isatty():
            return True
        stream.fileno()
    except (OSError, ValueError, AttributeError):   # closed, none, or not a file
        return True
    return False


def _queued(stream: TextIO) -> QueuedLogHandler | None:
    """A :class:`QueuedLogHandler` for ``stream``, or None where it cannot
    be had (no descriptor or thread left): then records are written directly."""
    try:
        return QueuedLogHandler(stream)
    except (OSError, RuntimeError):
        return None


def configure_logging(fmt: str, level: int, *, stream: TextIO | None = None,
                      redact: Callable[[str], str] | None = None) -> logging.Handler | None:
    """Write log records to ``stream`` (default: ``sys.stderr``) in ``fmt`` from ``level`` up.

    As :func:`logging.basicConfig` does, it adds a handler (named
    :data:`HANDLER_NAME`) only when the root logger has none, and sets the
    root level: a :class:`~.console.TerminalLogHandler` on a terminal (or a
    stream with no file descriptor), else a :class:`QueuedLogHandler`.
    Called again, it changes that handler's format and the level.
    When the root's handlers belong to someone else (pytest, a program
    embedding the engine), nothing is changed and ``None`` is returned;
    otherwise the handler.
    """
    formatter = make_formatter(fmt, redact)
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == HANDLER_NAME), None)
    if handler is None:
        if root.handlers:
            return None
        out = sys.stderr if stream is None else stream
        # On a terminal, log lines go above the live caption rows; anywhere
        # else a reader that stops reading must not stop the server.
        handler = None if _direct(out) else _queued(out)
        if handler is None:
            handler = TerminalLogHandler(out)
        handler.set_name(HANDLER_NAME)
        root.addHandler(handler)
    handler.setFormatter(formatter)
    if isinstance(handler, TerminalLogHandler):
        # JSON lines only on a terminal too (docker run -t): there is no
        # progress bar to clear in json mode.
        handler.clear_below = fmt == "text"
    root.setLevel(level)
    return handler


def install_json_hooks() -> None:
    """Route what Python itself writes to stderr through logging, so that
    stderr stays one JSON object per line: warnings (``py.warnings``),
    uncaught exceptions of the main thread and of other threads (CRITICAL
    and ERROR records of the ``evoxtral_stream`` logger, traceback in
    ``exc``), exceptions Python can only report ("Exception ignored in",
    from ``__del__`` and the like), and the libraries that print on their
    own handlers (:func:`adopt_library_loggers`). Process-wide; meant for the
    command line in JSON mode."""
    log = logging.getLogger("evoxtral_stream")
    logging.captureWarnings(True)
    adopt_library_loggers()

    def unraisablehook(args: sys.UnraisableHookArgs) -> None:
        exc_info = (None if args.exc_value is None
                    else (args.exc_type, args.exc_value, args.exc_traceback))
        where = f" in {_text(args.object)}" if args.object is not None else ""
        log.error("%s%s: %s", args.err_msg or "Exception ignored", where,
                  _text(args.exc_value), exc_info=exc_info)

    def excepthook(exc_type: type[BaseException], exc: BaseException,
                   tb: types.TracebackType | None) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        log.critical("uncaught exception: %s", _text(exc), exc_info=(exc_type, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:  # what the default hook ignores too
            return
        name = args.thread.name if args.thread is not None else "?"
        exc_info = (None if args.exc_value is None
                    else (args.exc_type, args.exc_value, args.exc_traceback))
        log.error("uncaught exception in thread %s: %s", name, _text(args.exc_value),
                  exc_info=exc_info)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    sys.unraisablehook = unraisablehook


def install_text_hooks(redact: Callable[[str], str]) -> None:
    """Write what Python reports of an uncaught exception (``--debug`` lets
    one through, in the main thread or another) as it would, with ``redact``
    applied: as the tracebacks that are logged are. Process-wide; meant for
    the command line in text mode."""
    def write(text: str) -> None:
        text = redact(text)
        if write_in_order(text):  # in order with the records, where queued
            return
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):  # stderr full, closed, gone
            pass

    def excepthook(exc_type: type[BaseException], exc: BaseException,
                   tb: types.TracebackType | None) -> None:
        write("".join(traceback.format_exception(exc_type, exc, tb)))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:  # what the default hook ignores too
            return
        name = args.thread.name if args.thread is not None else "?"
        report = traceback.format_exception(args.exc_type, args.exc_value,
                                            args.exc_traceback)
        write(f"Exception in thread {name}:\n" + "".join(report))

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


def quiet_library_progress_bars() -> None:
    """Turn off the tqdm bars of transformers and huggingface_hub ("Loading
    weights", "Writing model shards", downloads), which they draw on stderr
    whatever the log level: ``-q`` asks for warnings and errors only.

    Process-wide. Neither library is imported for it (the embedded Whisper
    needs neither): one not imported yet reads the environment variable
    when it is; one already imported is told directly. An explicit
    ``HF_HUB_DISABLE_PROGRESS_BARS`` is left as it is.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] != "1":
        return
    if "transformers.utils.logging" in sys.modules:
        off: Any = sys.modules["transformers.utils.logging"].disable_progress_bar
        off()
    if "huggingface_hub.utils" in sys.modules:
        sys.modules["huggingface_hub.utils"].disable_progress_bars()


def adopt_library_loggers() -> None:
    """Have transformers and huggingface_hub log through the root logger's
    handlers instead of their own stderr handlers (which would write plain
    text, or each line twice), and turn off the progress bars of both (tqdm
    writes them to stderr: transformers' "Loading weights" and "Writing model
    shards", huggingface_hub's downloads).
    Libraries that are not installed are skipped; importing their logging
    modules here makes them set up their handlers now, so that removing them
    is final."""
    try:
        import transformers.utils.logging as transformers_logging
    except ImportError:
        pass
    else:
        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
        off: Any = transformers_logging.disable_progress_bar  # untyped in transformers
        off()
    try:
        # Importing its logging module adds the handler removed below.
        import huggingface_hub.utils.logging  # noqa: F401
        from huggingface_hub.utils import disable_progress_bars  # type: ignore[attr-defined]
    except ImportError:
        pass
    else:
        hub = logging.getLogger("huggingface_hub")
        for handler in list(hub.handlers):
            if type(handler) is logging.StreamHandler:
                hub.removeHandler(handler)
        hub.propagate = True
        disable_progress_bars()
