"""``evoxtral-stream`` command line: serve, transcribe, devices.

Errors meant for people (bad config, unreadable audio, missing model or
audio device) are printed as one line and exit with status 2; ``--debug``
shows the traceback instead.

Logs go to stderr, as ``[logging] format`` (or ``--log-format``) says. In
``json`` mode everything the command writes to stderr is a JSON line: the
status lines and that one error line become log records too. Captions and
results on stdout are not logs and never change.
"""

from __future__ import annotations

import sys

# Every import inside the guard: a Ctrl-C while they run (asyncio alone takes
# tens of milliseconds, numpy and the engine a second or more from a cold
# disk) is the one line and status 130, not a traceback (.startup).
try:
    from .startup import (
        asked_log_format,
        forget_caught_interrupts,
        interrupted_by_ctrl_c,
        say_interrupted,
        unwatch_ctrl_c,
        watch_ctrl_c,
    )

    watch_ctrl_c()
    import argparse
    import asyncio
    import contextlib
    import dataclasses
    import errno
    import functools
    import io
    import itertools
    import json
    import logging
    import math
    import os
    import signal
    import threading
    import time
    import types
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path
    from typing import Any, NoReturn

    from . import __version__
    from .audio.microphone import ChannelRoute, list_input_devices, usable_input_device
    from .audio.sources import AudioInputError, read_audio_file
    from .config import Config, ConfigError, LoggingConfig, load_config, parse_override, to_toml
    from .console import CaptionPrinter, above_captions
    from .data import sample_path
    from .engine.backends import BackendUnavailable, load_backend
    from .engine.engine import Engine, StreamSummary
    from .engine.journal import parse_file_name
    from .events import (
        MAX_STREAM_ID,
        SAMPLE_RATE,
        CaptionEvent,
        EngineEvent,
        Int16Array,
        stream_id_problem,
    )
    from .logs import (
        FORMATS,
        LEVELS,
        configure_logging,
        install_json_hooks,
        install_text_hooks,
        quiet_library_progress_bars,
    )
    from .outputs import JsonlFile, SubtitleFiles, part_path, write_file
    from .run import FileJob, transcribe_samples
    from .server.app import CaptionServer, check_listen
    from .server.auth import install_token_redaction, redact_tokens
    from .server.protocol import caption_from_dict
    from .systemd import Notifier, Snapshot, monotonic_usec, supervise
    from .text.formats import CueLayout, SubtitleWriter, TagStyle, to_srt, to_text, to_vtt
    from .text.sessions import Session, SessionSplitter

    if unwatch_ctrl_c():
        raise KeyboardInterrupt  # one a library let go of: the user still asked
except BaseException as e:
    from .startup import exit_if_interrupted

    exit_if_interrupted(e)
    raise


class _UsageError(Exception):
    """A usage error argparse found, raised instead of printed (:class:`_Parser`)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` (its subcommands' too) whose usage
    errors are raised, so that :func:`_parse` reports them as ``--log-format``
    asks."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self, message)


__all__ = ["main"]

log = logging.getLogger("evoxtral_stream")

EXIT_USAGE = 2
# stdout's reader left (``| head``): 128 + SIGPIPE, as a shell reports a
# program that SIGPIPE ended (Python ignores SIGPIPE: a write fails instead).
EXIT_STDOUT_CLOSED = 141


class UserError(Exception):
    """An error with a message for people; exits with status 2."""


class _StdoutClosed(UserError):
    """Standard output's reader has left (a pipe closed early, as ``| head``
    does): no error, but nothing more to print. :func:`main` ends the
    command quietly with :data:`EXIT_STDOUT_CLOSED`."""

    def __init__(self) -> None:
        super().__init__("standard output closed by its reader")


class _UnreadableFiles(UserError):
    """The files of one command that cannot be read: one message (one
    line) each, so a batch is mended in one go, not a file per try."""

    def __init__(self, messages: Sequence[str]) -> None:
        super().__init__(messages[-1])
        self.messages = tuple(messages)


def _read_files(paths: Sequence[Path]) -> list[Int16Array]:
    """Every file of ``paths`` read, or :class:`_UnreadableFiles` naming
    each that cannot be."""
    audio: list[Int16Array] = []
    problems: list[str] = []
    for path in paths:
        try:
            audio.append(read_audio_file(path))
        except AudioInputError as e:
            problems.append(str(e))
    if problems:
        raise _UnreadableFiles(problems)
    return audio


# --- argument parsing --------------------------------------------------------


# The options every command takes; ``dest`` names each one's attribute.
_COMMON_DESTS = ("config", "overrides", "backend", "debug", "quiet", "log_format")


def _add_common(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """The options every command takes, stored as ``prefix + dest``.

    Before the command (``evoxtral-stream -q serve``) they are parsed by the
    main parser with ``prefix="pre_"`` and no defaults; :func:`_parse`
    merges them under the command's own.
    """
    def kw(dest: str, **more: Any) -> dict[str, Any]:
        if prefix:
            more["default"] = argparse.SUPPRESS
        return {"dest": prefix + dest, **more}

    parser.add_argument("--config", metavar="PATH",
                        help="config file (default: $EVOXTRAL_CONFIG, else built-in defaults)",
                        **kw("config"))
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. vad.aggressiveness=3",
                        **kw("overrides", default=[]))
    parser.add_argument("--backend", choices=["auto", "voxtral", "whisper"],
                        help="shortcut for --set model.backend=...", **kw("backend"))
    parser.add_argument("--debug", action="store_true", help="debug logs and tracebacks",
                        **kw("debug"))
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors",
                        **kw("quiet"))
    parser.add_argument("--log-format", choices=FORMATS,
                        help="log lines on stderr: text, or json (one object per line) for "
                             "log shippers (default: [logging] format, else text)",
                        **kw("log_format"))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments, with common options given before the command merged in:
    ``--set`` values before the command come first; any other option given
    on both sides takes the command's.

    A usage error is argparse's usage and error lines on stderr (exit status
    2), or with ``--log-format json`` one ERROR record: stderr stays JSON."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser().parse_args(argv)
    except _UsageError as e:
        if asked_log_format(argv) == "json":
            logs = LoggingConfig(format="json", level="info")
            _setup_logging(logs)
            _fail(f"{e.parser.prog}: {e.message} (see {e.parser.prog} --help)", logs)
        e.parser.print_usage(sys.stderr)
        # Redacted as the json record is: argparse quotes what it refused.
        e.parser.exit(EXIT_USAGE, f"{e.parser.prog}: error: {redact_tokens(e.message)}\n")
    given = vars(args)
    for dest in _COMMON_DESTS:
        if "pre_" + dest not in given:
            continue
        early = given.pop("pre_" + dest)
        if dest == "overrides":
            args.overrides = [*early, *args.overrides]
        elif getattr(args, dest) in (None, False):
            setattr(args, dest, early)
    return args


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    _add_common(common)

    p = _Parser(
        prog="evoxtral-stream",
        description="Live captions with expressive tags (Voxtral + Evoxtral LoRA).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_common(p, prefix="pre_")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="caption a live source and serve it",
                           description="Capture audio, caption it live, serve the captions "
                                       "over WebSocket and print them.")
    serve.add_argument("--source", default="mic", metavar="SRC",
                       help="'mic' (default), 'none' (serve only), 'sample', or an audio file "
                            "played at real-time pace")
    serve.add_argument("--stream", default=None, metavar="ID", type=_stream_id_arg,
                       help="stream id (default: 'mic', or the file's name without its "
                            "suffix; with audio.split_channels, ID-N per channel)")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--no-partials", action="store_true",
                       help="finals only: shortcut for --set stream.partial_interval_ms=0")
    serve.add_argument("--exit-at-end", action="store_true",
                       help="with a file source, stop when the file ends")
    serve.add_argument("--no-print", action="store_true", help="do not print captions")

    tr = sub.add_parser("transcribe", parents=[common],
                        help="stream audio files through the engine",
                        description="Stream audio files through the live pipeline and print "
                                    "their captions; several files run as concurrent streams.")
    tr.add_argument("files", nargs="*", type=Path, metavar="FILE")
    tr.add_argument("--sample", action="store_true", help="add the bundled speech sample")
    tr.add_argument("--realtime", action="store_true",
                    help="feed audio at real-time pace (default: as fast as possible)")
    tr.add_argument("--no-partials", action="store_true", help="finals only (fastest)")
    tr.add_argument("--partials", action="store_true",
                    help="print partials too when not on a terminal")
    # Strings, not Paths: Path drops the trailing "/" that says "a folder".
    tr.add_argument("--srt", metavar="PATH",
                    help="write SRT (a folder for several files, or when PATH ends with /)")
    tr.add_argument("--vtt", metavar="PATH", help="write WebVTT (likewise)")
    tr.add_argument("--jsonl", metavar="PATH",
                    help="write every event of every stream to one file, as JSON lines "
                         "(protocol v1 messages)")
    tr.add_argument("--serve", action="store_true",
                    help="also serve the captions over WebSocket while transcribing")
    tr.add_argument("--host", help="override server.host (with --serve)")
    tr.add_argument("--port", type=int, help="override server.port (with --serve)")

    sub.add_parser("devices", parents=[common], help="list audio input devices")

    st = sub.add_parser("subtitles", parents=[common],
                        help="subtitles from recorded captions (the journal, --jsonl files)",
                        description="Read recorded protocol v1 messages (journal files or "
                                    "folders, transcribe --jsonl output, a subscriber's log) "
                                    "and write each stream session's final captions as "
                                    "subtitles or text; without --srt, --vtt or --text, print "
                                    "the text.")
    st.add_argument("recordings", nargs="+", metavar="RECORDING",
                    help="a JSON-lines file, or a folder of them (the journal's)")
    st.add_argument("--stream", dest="streams", action="append", metavar="ID",
                    help="only this stream (repeatable; default: every stream)")
    st.add_argument("--srt", metavar="PATH",
                    help="write SRT (a folder for several sessions, or when PATH ends with /)")
    st.add_argument("--vtt", metavar="PATH", help="write WebVTT (likewise)")
    st.add_argument("--text", metavar="PATH", help="write running text (likewise)")

    ev = sub.add_parser("eval", parents=[common],
                        help="score the engine on a manifest (WER, tag F1, emphasis F1)",
                        description="Stream every file of MANIFEST (JSON lines "
                                    '{"audio": PATH, "text": TAGGED REFERENCE}) through the '
                                    "pipeline and score the finals with the Evoxtral "
                                    "authors' metrics.")
    ev.add_argument("manifest", type=Path, metavar="MANIFEST")
    ev.add_argument("--compare-offline", action="store_true",
                    help="also decode each whole file in one call and report both, "
                         "side by side with the difference")
    ev.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")

    ex = sub.add_parser("export-merged", parents=[common],
                        help="write Voxtral with the LoRA merged in (safetensors)",
                        description="Merge model.voxtral.adapter into model.voxtral.base and "
                                    "write the result (weights, config, tokenizer files) to "
                                    "OUTDIR, for engines without LoRA support for the audio "
                                    "tower and projector.")
    ex.add_argument("outdir", type=Path, metavar="OUTDIR")

    cf = sub.add_parser("config", parents=[common],
                        help="print the effective configuration as TOML (checks it, too)",
                        description="Print the configuration the other commands would run "
                                    "with (the defaults, then the config file, then --set "
                                    "and the shortcut flags), as a complete config file; "
                                    "secrets read \"<redacted>\". A bad value, or what serve "
                                    "would refuse at start (an unsafe bind, TLS files that "
                                    "do not load, MQTT without aiomqtt), is one error line "
                                    "and exit status 2.")
    # The shortcuts of serve and transcribe, so their command lines can be checked.
    cf.add_argument("--host", help="override server.host")
    cf.add_argument("--port", type=int, help="override server.port")
    cf.add_argument("--no-partials", action="store_true",
                    help="shortcut for --set stream.partial_interval_ms=0")
    sub.add_parser("hash-token", parents=[common],
                   help="print the sha256: hash of a token read from stdin, for [[auth.tokens]]",
                   description="Read one token from standard input (a trailing newline is "
                               "ignored; printable ASCII, no blanks at either end) and "
                               "print the hash to put in [[auth.tokens]] hash.")
    return p


def _load_config(args: argparse.Namespace) -> Config:
    overrides: dict[str, object] = {}
    for text in args.overrides:
        key, value = parse_override(text)
        overrides[key] = value
    if args.backend:
        overrides["model.backend"] = args.backend
    for flag, key in (("host", "server.host"), ("port", "server.port")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "no_partials", False):
        overrides["stream.partial_interval_ms"] = 0
    if args.log_format:
        overrides["logging.format"] = args.log_format
    if args.debug or args.quiet:
        overrides["logging.level"] = "debug" if args.debug else "warning"
    return load_config(args.config, overrides)


def _flag_logging(args: argparse.Namespace) -> LoggingConfig:
    """What the flags alone ask of logging: used until the config is loaded."""
    level = "debug" if args.debug else "warning" if args.quiet else "info"
    return LoggingConfig(format=args.log_format or "text", level=level)


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
    elif handler is not None:
        install_text_hooks(redact_tokens)  # the --debug traceback


def _base_url(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port``, an IPv6 literal in brackets (RFC 3986): the URL
    the status line shows must be one a client can open."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _notice(cfg: Config, message: str) -> None:
    """A status line for the operator on stderr, at INFO level: printed as it
    always was in text mode, an INFO record in json mode (so stderr stays JSON
    lines). In both, nothing when ``logging.level`` is above info (``-q``)."""
    if cfg.logging.format == "json":
        log.info("%s", message)
    elif LEVELS[cfg.logging.level] <= logging.INFO:
        # A stderr that takes nothing (a full disk) loses the line, as the
        # logging module loses a record, and must not change the exit status.
        with above_captions(sys.stderr), contextlib.suppress(OSError):
            print(message, file=sys.stderr, flush=True)


# --- commands ----------------------------------------------------------------


def _file_stream_id(path: Path) -> str:
    """A stream id from a file name: its stem, control characters as ``_``,
    white space at either end dropped, short enough to take a ``-N`` suffix
    (:func:`stream_id_problem`)."""
    # Each character judged inside an id: a space is fine there, not at an end.
    stem = "".join("_" if stream_id_problem(f"x{c}x") else c for c in path.stem)
    stem = stem.strip()[:MAX_STREAM_ID - 8]
    while stem and stream_id_problem(stem + "-9999999") is not None:
        stem = stem[:-1]  # non-ASCII characters take more room percent-encoded
    return stem.rstrip() or "stream"


def _stream_id_arg(value: str) -> str:
    """argparse type of ``--stream``: a usable stream id."""
    problem = stream_id_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def _stream_ids(paths: Sequence[Path]) -> list[str]:
    """One id per file (:func:`_file_stream_id`); a repeated one gets ``-N``,
    never the id of another file (whose SRT it would take: talk.wav twice
    and talk-2.wav give talk, talk-3 and talk-2)."""
    bases = [_file_stream_id(p) for p in paths]
    own = set(bases)
    ids: list[str] = []
    for base in bases:
        name, n = base, 1
        while name in ids or (name != base and name in own):
            n += 1
            name = f"{base}-{n}"
        ids.append(name)
    return ids


#: The file suffix of each subtitle output flag (``--jsonl`` is one file).
_SUFFIXES = {"--srt": ".srt", "--vtt": ".vtt", "--text": ".txt"}


def _output_path(target: Path, stream: str, suffix: str, many: bool) -> Path:
    return target / f"{stream}{suffix}" if many or target.is_dir() else target


def _prepare_outputs(outputs: Sequence[tuple[str, str | None]], inputs: Sequence[Path],
                     streams: Sequence[str], inputs_are: str = "audio files", *,
                     staged: bool = False) -> list[Path]:
    """Make the output folders, or refuse the outputs, before any work: each
    ``(flag, PATH)`` but ``--jsonl`` is one file, or a folder of one file per
    stream when there are several streams or PATH is one. Refused: two flags
    that would write one file, an output that would overwrite an input
    (one of the ``inputs_are``, the error says), and a stream's file that is
    a folder. ``staged``: subtitles are written to ``.part`` files first
    (:func:`.outputs.part_path`), which count as outputs of their flag too.
    Returns the folders it made (not those that were there), for
    :func:`_unmade_if_empty`; a refusal removes them first."""
    made: list[Path] = []
    with _unmade_if_empty(made):  # a refusal found after a folder was made
        _check_outputs(outputs, inputs, streams, inputs_are, staged, made)
    return made


def _check_outputs(outputs: Sequence[tuple[str, str | None]], inputs: Sequence[Path],
                   streams: Sequence[str], inputs_are: str, staged: bool,
                   made: list[Path]) -> None:
    """:func:`_prepare_outputs`, adding each folder it makes to ``made``."""
    many = len(streams) > 1
    for flag, raw in outputs:
        if raw is None:
            continue
        if not raw.strip():
            # Path("") is ".": the files would go into the working folder
            # (an unset shell variable, most often), named by no one.
            raise UserError(f"{flag} needs a file or folder name, got an empty one")
        target = Path(raw)
        folder = _is_dir(target, flag) or raw.endswith(("/", os.sep))
        if flag != "--jsonl" and (many or folder):
            # lexists: a link is the user's, even one to nothing.
            made += itertools.takewhile(lambda p: not os.path.lexists(p),
                                        (target, *target.parents))
            try:
                target.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                why = "several files need a folder" if many else f"{raw} names a folder"
                raise UserError(f"{flag} {target}: cannot make that folder ({e.strerror}); "
                                f"{why}") from None
        else:
            # --jsonl, or one file's SRT/VTT: a file in a folder that exists.
            _check_output_file(flag, raw, "--jsonl writes one file for every stream: "
                                          "name that file")
    # os.path.realpath, not Path.resolve: before Python 3.13 that raises
    # RuntimeError on a symlink loop (read_audio_file reports it in one line).
    writers = {Path(os.path.realpath(p)): "the input" for p in inputs}
    for flag, raw in outputs:
        if raw is None:
            continue
        suffix = _SUFFIXES.get(flag)
        paths = ([Path(raw)] if suffix is None
                 else [_output_path(Path(raw), s, suffix, many) for s in streams])
        if staged and suffix is not None:
            paths += [part for p in paths if (part := part_path(p)) is not None]
        for path in paths:
            try:
                is_dir, resolved = path.is_dir(), Path(os.path.realpath(path))
            except (OSError, ValueError) as e:  # a NUL, a name too long
                raise UserError(f"{flag} {str(path)!r} cannot name a file: "
                                f"{getattr(e, 'strerror', None) or e}") from None
            if is_dir:  # else found only once the stream's file is complete
                raise UserError(f"{flag} {path} is a folder, where that file would go; "
                                "move it, or name another place")
            other = writers.setdefault(resolved, flag)
            if other == "the input":
                raise UserError(f"{flag} {path} is one of the {inputs_are}: it would be "
                                "overwritten; name another file")
            if other != flag:
                raise UserError(f"{other} and {flag} would both write {path}: "
                                "name a file for each, or one folder")


@contextlib.contextmanager
def _unmade_if_empty(folders: Sequence[Path]) -> Iterator[None]:
    """Remove those of ``folders`` (:func:`_prepare_outputs` made them) still
    empty when the block raises (an error, Ctrl-C): a run that wrote nothing
    leaves no folder behind, and one holding a file (a ``.part``) stays."""
    try:
        yield
    except BaseException:
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty, or gone already
                folder.rmdir()
        raise


def _check_output_file(flag: str, raw: str, hint: str) -> None:
    """Refuse ``flag``'s output file ``raw`` before any work: its folder must
    exist, and it must not name a folder (``hint`` says what to name)."""
    target = Path(raw)
    if not _is_dir(target.parent, flag):
        where = (f"{target.parent} is a file, not a folder" if target.parent.exists()
                 else f"the folder {target.parent} does not exist")
        raise UserError(f"{flag} {target}: {where}")
    if _is_dir(target, flag) or raw.endswith(("/", os.sep)):
        raise UserError(f"{flag} {raw} is a folder; {hint}")


def _is_dir(path: Path, flag: str) -> bool:
    """``path.is_dir()``, for the output of ``flag`` (or a recording): an
    error other than "nothing there" (a name too long, a folder on the way
    that cannot be searched), which Path.is_dir raises, is a
    :class:`UserError` naming the path."""
    try:
        return path.is_dir()
    except OSError as e:
        raise UserError(f"{flag} {path}: {e.strerror or e}") from None


def _write(path: Path, text: str) -> None:
    """Write a result file whole or not at all (:func:`.outputs.write_file`):
    a failure is a :class:`UserError`, the file as it was."""
    try:
        write_file(path, text.encode("utf-8"))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _to_stdout(text: str, what: str) -> None:
    """Write ``text`` to stdout, flushed: a stdout that takes nothing (a full
    disk) is a :class:`UserError` naming ``what``, not a traceback; one whose
    reader left (``| head``) is :class:`_StdoutClosed`."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise _StdoutClosed from None
    except OSError as e:
        raise UserError(f"cannot write {what} to standard output: "
                        f"{e.strerror or e}") from None


def _cmd_transcribe(args: argparse.Namespace, cfg: Config) -> int:
    paths: list[Path] = list(args.files)
    if args.sample:
        paths.append(sample_path())
    if not paths:
        raise UserError("no input: name audio files or use --sample")
    ids = _stream_ids(paths)
    made = _prepare_outputs((("--srt", args.srt), ("--vtt", args.vtt), ("--jsonl", args.jsonl)),
                            paths, ids, staged=True)
    with _unmade_if_empty(made):
        return _transcribe(args, cfg, paths, ids)


def _transcribe(args: argparse.Namespace, cfg: Config, paths: Sequence[Path],
                ids: Sequence[str]) -> int:
    """:func:`_cmd_transcribe` once its outputs are prepared."""
    jobs = [FileJob(sid, audio) for sid, audio in zip(ids, _read_files(paths), strict=True)]
    if args.serve:
        _check_serving(cfg)  # as serve does: before the model loads
        check_listen(cfg.server.host, cfg.server.port)
    backend = load_backend(cfg.model)
    stops: list[asyncio.Event] = []  # the job's, once it runs
    # When only stdout takes the captions and its reader has left (| head),
    # nothing is left to make them for: the reading stops.
    only_stdout = not (args.srt or args.vtt or args.jsonl or args.serve or cfg.journal.enabled)

    def on_closed() -> None:
        if only_stdout and stops:
            stops[0].set()  # as a Ctrl-C does, without its line

    printer = CaptionPrinter(show_stream=len(jobs) > 1,
                             partials=True if args.partials else None, on_closed=on_closed)
    latencies: list[float] = []  # one float per final: the summary's p95

    def tally(event: EngineEvent) -> None:
        if isinstance(event, CaptionEvent) and event.final and event.latency is not None:
            latencies.append(event.latency)

    total = sum(len(j.samples) for j in jobs)
    interrupted: list[signal.Signals] = []
    opened: list[tuple[JsonlFile | None, SubtitleFiles]] = []

    async def job() -> list[StreamSummary]:
        async with Engine(cfg, backend) as engine:
            stop = _stop_on_signals(cfg, engine, interrupted)
            stops.append(stop)
            server = CaptionServer(engine, cfg.server) if args.serve else None
            async with contextlib.AsyncExitStack() as stack:
                if server is not None:
                    await stack.enter_async_context(server)
                    await _start_mqtt(stack, cfg, engine, server)
                    scheme = "wss" if cfg.server.tls_cert else "ws"
                    _notice(cfg, f"serving captions on "
                                 f"{_base_url(scheme, cfg.server.host, server.port)}/v1/captions")
                # Opened once nothing can refuse the run (a port in use):
                # opening empties a --jsonl file an earlier run left there.
                opened.append(_open_outputs(args, cfg, [j.stream for j in jobs]))
                jsonl, subtitles = opened[0]
                # The files first: a caption printed is on disk already.
                if jsonl is not None:
                    engine.add_listener(jsonl)
                engine.add_listener(subtitles)
                engine.add_listener(tally)
                engine.add_listener(printer)
                # No progress bar in json mode (stderr holds JSON lines only),
                # nor with -q (only warnings and errors).
                quiet = LEVELS[cfg.logging.level] > logging.INFO
                bar = None if cfg.logging.format == "json" or quiet else _progress(total)
                try:
                    progress = None if bar is None else (
                        lambda n: bar.update(n / SAMPLE_RATE))
                    return await transcribe_samples(cfg, engine, jobs, realtime=args.realtime,
                                                    progress=progress, stop=stop)
                finally:
                    if bar is not None:
                        _close_progress(bar)

    loop_start = time.monotonic()
    complete = False
    try:
        summaries = asyncio.run(job())
        complete = True
    finally:
        # Interrupted or not, the outputs hold every caption made; every
        # stream has ended by now, so each subtitle file is complete. On an
        # exception they stay .part files.
        for jsonl, subtitles in opened:
            subtitles.close(complete=complete)
            if jsonl is not None:
                jsonl.close()
    jsonl, subtitles = opened[0]
    elapsed = time.monotonic() - loop_start
    failed = (subtitles.error if subtitles.error is not None
              else (jsonl.path, jsonl.error) if jsonl is not None and jsonl.error is not None
              else None)
    if failed is not None:
        raise UserError(f"cannot write {failed[0]}: {failed[1].strerror or failed[1]}")
    audio_s = sum(s.duration_s for s in summaries)
    p95 = _p95(latencies)
    reader_left = isinstance(printer.error, BrokenPipeError)
    stopped = (f"interrupted ({interrupted[0].name}): " if interrupted
               else "stopped, standard output closed: " if reader_left and only_stdout else "")
    # Finals only, not paced: every final of a file is asked for at once,
    # so their latency is mostly the wait for their turn.
    queued = (" (files read faster than they play: mostly waiting in the queue)"
              if not args.realtime and cfg.stream.partial_interval_ms == 0 else "")
    _notice(cfg, f"{stopped}{len(summaries)} stream(s), {audio_s:.1f} s of audio in "
                 f"{elapsed:.1f} s (speed ×{audio_s / max(elapsed, 1e-9):.1f}); "
                 f"{sum(s.finals for s in summaries)} finals, "
                 f"{sum(s.partials for s in summaries)} partials; "
                 f"final latency p95 {p95:.2f} s{queued}")
    code = 0 if all(s.errors == 0 for s in summaries) else 1
    if printer.error is not None and not reader_left:
        # Written above: the files hold the captions stdout did not take.
        _error_line(f"cannot write captions to standard output: "
                    f"{printer.error.strerror or printer.error}", cfg.logging)
        code = EXIT_USAGE
    if reader_left and code == 0:
        code = EXIT_STDOUT_CLOSED  # no error: stdout's reader left (| head)
    if interrupted:
        code = 128 + interrupted[0].value  # as a shell reports a process ended by it
    if any(t.daemon and t.is_alive() for t in threading.enumerate()):
        _exit_leaving_threads(code)  # a second Ctrl-C left the model thread behind
    return code


def _p95(values: Sequence[float]) -> float:
    """The nearest-rank 95th percentile: the smallest value that at least 95 %
    of ``values`` do not exceed (NaN for none)."""
    if not values:
        return float("nan")
    return sorted(values)[(95 * len(values) + 99) // 100 - 1]


def _stop_on_signals(cfg: Config, engine: Engine,
                     interrupted: list[signal.Signals]) -> asyncio.Event:
    """An event set by the first Ctrl-C or SIGTERM (recorded in
    ``interrupted``); a second one cuts the engine's drain short."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if interrupted:
            engine.give_up()
            return
        interrupted.append(sig)
        stop.set()
        _notice(cfg, "stopping: finishing open captions, then writing the outputs "
                     "(press Ctrl-C again to stop at once)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal, sig)
    return stop


def _progress(total_samples: int) -> Any:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    # position=1: on the row below the live partial (CaptionPrinter redraws
    # its row in place), which the bar would otherwise overwrite.
    return tqdm(total=round(total_samples / SAMPLE_RATE, 1), unit="s", unit_scale=False,
                file=sys.stderr, leave=False, position=1,
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s")


def _close_progress(bar: Any) -> None:
    """Close :func:`_progress`'s bar. Closed below the caption row, tqdm
    leaves the cursor past the row's end: the next line starts at column 0."""
    bar.close()
    bar.fp.write("\r")
    bar.fp.flush()


def _open_outputs(args: argparse.Namespace, cfg: Config, streams: Sequence[str]
                  ) -> tuple[JsonlFile | None, SubtitleFiles]:
    """Create transcribe's output files, written as the engine runs
    (:mod:`.outputs`): the ``--jsonl`` file, and each stream's ``--srt`` and
    ``--vtt`` as ``.part`` files until the stream ends."""
    layout = _cue_layout(cfg)
    many = len(streams) > 1
    files = [(stream, _output_path(Path(raw), stream, _SUFFIXES[flag], many),
              SubtitleWriter(vtt=flag == "--vtt", layout=layout, tags=TagStyle(
                  cfg.captions.vtt_tags if flag == "--vtt" else cfg.captions.srt_tags)))
             for flag, raw in (("--srt", args.srt), ("--vtt", args.vtt)) if raw is not None
             for stream in streams]
    try:
        subtitles = SubtitleFiles(files)
    except OSError as e:
        raise UserError(f"cannot write {e.filename}: {e.strerror or e}") from None
    if not args.jsonl:
        return None, subtitles
    try:
        return JsonlFile(Path(args.jsonl)), subtitles
    except OSError as e:
        subtitles.close(complete=False)
        raise UserError(f"cannot write {args.jsonl}: {e.strerror or e}") from None


def _cue_layout(cfg: Config) -> CueLayout:
    cap = cfg.captions
    return CueLayout(max_line_chars=cap.max_line_chars, max_lines=cap.max_lines,
                     max_cue_s=cap.max_cue_s, min_cue_s=cap.min_cue_s)


def _attempt(failed: list[UserError], write: Callable[..., None], *args: Any) -> None:
    """``write(*args)``, a :class:`UserError` kept in ``failed`` instead of raised."""
    try:
        write(*args)
    except UserError as e:
        failed.append(e)


def _raise_first(failed: Sequence[UserError]) -> None:
    """The first of ``failed``, if any: one error line, as ever. A stdout
    whose reader left comes last: it is no error."""
    for e in sorted(failed, key=lambda e: isinstance(e, _StdoutClosed)):
        raise e


def _cmd_subtitles(args: argparse.Namespace, cfg: Config) -> int:
    splitter = SessionSplitter()
    paths = _recording_files(args.recordings)
    for path in paths:
        _read_recording(path, splitter)
    sessions = [s for s in splitter.sessions()
                if not args.streams or s.stream in args.streams]
    if not sessions:
        which = f" of stream {', '.join(map(repr, args.streams))}" if args.streams else ""
        raise UserError(f"no final captions{which} in {len(paths)} recording file(s)")
    found = {s.stream for s in sessions}
    if missing := [s for s in dict.fromkeys(args.streams or ()) if s not in found]:
        # A mistyped id among good ones: said, while the others are written.
        log.warning("no final captions of stream %s in %d recording file(s)",
                    ", ".join(map(repr, missing)), len(paths))
    outputs = (("--srt", args.srt), ("--vtt", args.vtt), ("--text", args.text))
    many = len(sessions) > 1
    names = _session_names(sessions)
    # Each file is written to its .part file first (_write), then renamed.
    made = _prepare_outputs(outputs, paths, names, "recordings", staged=True)
    if any(raw for _, raw in outputs):
        failed: list[UserError] = []
        with _unmade_if_empty(made):  # nothing written: no folder left empty
            for session, name in zip(sessions, names, strict=True):
                _attempt(failed, _write_captions, cfg, outputs, name, session.finals, many,
                         session.duration)
            _raise_first(failed)
    else:
        for session, name in zip(sessions, names, strict=True):
            head = f"== {name} ==\n" if many else ""
            _to_stdout(head + to_text(session.finals, tags=TagStyle(cfg.captions.srt_tags)),
                       "the text")
    log.info("%d session(s) of %d stream(s) from %d file(s)%s", len(sessions),
             len({s.stream for s in sessions}), len(paths),
             f"; {splitter.repeats} repeated final(s) skipped" if splitter.repeats else "")
    return 0


def _session_names(sessions: Sequence[Session]) -> list[str]:
    """The name of each session's output: its stream id (escaped for a file
    name), ``ID.N`` for a stream opened several times. Such a name that is
    also another stream's id, or repeats, gets ``-2``, ``-3``, ...: the
    stream keeps its own name (``talk`` opened twice beside a stream
    ``talk.1``: ``talk.1-2``, ``talk.2`` and ``talk.1``)."""
    several = {s.stream for s in sessions if s.number > 1}
    plain = {_escape(s.stream) for s in sessions if s.stream not in several}
    names: list[str] = []
    for session in sessions:
        if session.stream not in several:
            names.append(_escape(session.stream))  # distinct: one session per stream
            continue
        base = f"{_escape(session.stream)}.{session.number}"
        name, n = base, 1
        while name in plain or name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


#: What a file name cannot hold on some file system ("/" on every one, the
#: rest on Windows or exFAT), and "%" that encodes them.
_UNSAFE_IN_NAMES = frozenset('/\\<>:"|?*%')


def _escape(stream: str) -> str:
    """``stream`` as a file name: :data:`_UNSAFE_IN_NAMES` percent-encoded
    (so each stream has its own name), other characters as they are
    (``café.srt`` and ``talk (2).srt``, as transcribe names the SRTs of
    café.wav and talk (2).wav)."""
    return "".join(f"%{ord(c):02X}" if c in _UNSAFE_IN_NAMES else c for c in stream)


def _recording_files(raw: Sequence[str]) -> list[Path]:
    """The files to read, in order: a folder gives its ``*.jsonl`` files; the
    journal's files go by stream and index (their names say), others as given."""
    paths: list[Path] = []
    for item in raw:
        path = Path(item)
        if _is_dir(path, "cannot read"):
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise UserError(f"{path}: a folder without .jsonl files")
            paths += found
        elif path.exists():
            paths.append(path)
        else:
            raise UserError(f"{path} does not exist")
    names = [parse_file_name(p.name) for p in paths]
    if all(n is not None for n in names):
        order = {p: (n.stream, n.index) for p, n in zip(paths, names, strict=True)
                 if n is not None}
        paths.sort(key=order.__getitem__)
    return paths


def _read_recording(path: Path, splitter: SessionSplitter) -> None:
    """Feed ``path``'s final captions and stream ends to ``splitter``; lines
    that are not protocol messages (a line cut by a crash) are skipped and
    counted in one warning."""
    damaged: list[int] = []
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                    if not isinstance(obj, dict):
                        raise ValueError("not an object")
                    kind = obj.get("type")
                    if kind == "caption" and obj.get("final") is True:
                        splitter.add_final(caption_from_dict(obj))
                    elif kind == "stream.ended" and isinstance(obj.get("stream"), str):
                        splitter.add_end(obj["stream"], _seconds(obj.get("duration")))
                except ValueError:  # bad JSON or UTF-8, or a ProtocolError
                    damaged.append(number)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if damaged:
        log.warning("%s: %d line(s) that are not protocol messages skipped (line %s%s)",
                    path, len(damaged), damaged[0], ", ..." if len(damaged) > 1 else "")


def _seconds(value: object) -> float | None:
    """``value`` as finite seconds, None when it is none (NaN, an int too
    large for a float, not a number)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    with contextlib.suppress(OverflowError):
        if math.isfinite(t := float(value)):
            return t
    return None


def _write_captions(cfg: Config, outputs: Sequence[tuple[str, str | None]], name: str,
                    finals: Sequence[CaptionEvent], many: bool,
                    until: float | None = None) -> None:
    """Write ``finals`` as each ``(--srt|--vtt|--text, PATH)`` asks, the
    file named after ``name`` in a folder (see :func:`_output_path`); no cue
    outlasts ``until``, the end of the audio, when known. Each is tried even
    when one before it failed, so no caption is lost for another's sake;
    then the first failure, if any, as :class:`UserError`."""
    failed: list[UserError] = []
    cap = cfg.captions
    layout = _cue_layout(cfg)
    for flag, raw in outputs:
        if raw is None:
            continue
        if flag == "--srt":
            suffix, text = ".srt", to_srt(finals, tags=TagStyle(cap.srt_tags), layout=layout,
                                          until=until)
        elif flag == "--vtt":
            suffix, text = ".vtt", to_vtt(finals, tags=TagStyle(cap.vtt_tags), layout=layout,
                                          until=until)
        else:
            suffix, text = ".txt", to_text(finals, tags=TagStyle(cap.srt_tags))
        _attempt(failed, _write, _output_path(Path(raw), name, suffix, many), text)
    _raise_first(failed)


def _cmd_config(args: argparse.Namespace, cfg: Config) -> int:
    # Refused as serve refuses it: config is how a configuration is checked.
    _check_serving(cfg)
    _to_stdout(to_toml(cfg), "the configuration")
    return 0


def _cmd_hash_token(args: argparse.Namespace, cfg: Config) -> int:
    from .server.auth import hash_token, printable_ascii

    # Bytes, decoded as UTF-8 whatever the locale: the server hashes the
    # UTF-8 of the token a client sends, so no other bytes can ever match.
    try:
        token = sys.stdin.buffer.readline().decode("utf-8").rstrip("\r\n")
        more = sys.stdin.buffer.read(1 << 16).strip()
    except UnicodeDecodeError:
        raise UserError("hash-token reads a token from stdin, got bytes that are not "
                        "UTF-8 text") from None
    if not token:
        raise UserError("hash-token reads a token from stdin, got an empty line")
    if token != token.strip():
        # An Authorization header loses them (HTTP drops the blanks around a
        # value): such a hash could never match what a client sends.
        raise UserError("hash-token: the token starts or ends with blanks, which an "
                        "Authorization header drops; remove them")
    if not printable_ascii(token):
        # The server reads a header as Latin-1 and hashes the UTF-8 of what it
        # read: UTF-8 sent (curl) never matches, Latin-1 (websockets) only
        # for the characters it has; no subprotocol name holds such a token.
        raise UserError("hash-token: the token holds characters that are not printable "
                        "ASCII, which an Authorization header carries only from some "
                        "clients and a browser's subprotocol never; use printable ASCII, "
                        "as secrets.token_urlsafe() makes")
    if more:
        raise UserError("hash-token reads one token, from the first line of stdin; "
                        "more lines followed (hash each token on its own)")
    _to_stdout(hash_token(token) + "\n", "the hash")
    return 0


class _HeldHangups:
    """SIGHUP while ``serve`` cannot reload: loading the model (a minute for
    Voxtral), or shutting down. Its default action ends the process, so a
    ``systemctl reload`` then would kill the server; it is recorded instead,
    and one that came while loading is applied once serving."""

    def __init__(self) -> None:
        self.pending = False

    def install(self) -> None:
        # Not on Windows, nor where Python allows no handler (a thread other
        # than the main one: main() called by an embedding program or a test).
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, self._record)

    def _record(self, signum: int, frame: object) -> None:
        self.pending = True


def _cmd_serve(args: argparse.Namespace, cfg: Config) -> int:
    hangups = _HeldHangups()
    hangups.install()
    # Before loading the model, so an unsafe bind fails in a moment.
    _check_serving(cfg)
    check_listen(cfg.server.host, cfg.server.port)
    source: str = args.source
    file_audio = None
    if source == "mic":
        # Also before the model: no microphone is one line at once, not after a
        # minute of loading Voxtral. The capture resolves audio.device again as
        # it starts (and at each reopen of a device lost later).
        usable_input_device(cfg.audio.device, cfg.audio.channels)
        for name in _mic_stream_ids(cfg, args.stream or "mic").values():
            if problem := stream_id_problem(name):
                raise UserError(f"cannot caption channels as stream {name!r}: {problem}")
    elif source != "none":
        path = sample_path() if source == "sample" else Path(source)
        file_audio = read_audio_file(path)
        source = _file_stream_id(path)
    notifier = Notifier.from_environ()
    try:
        if notifier is not None:
            notifier.send(notifier.notices.status("loading the model"))
        backend = load_backend(cfg.model)
        code = asyncio.run(_serve(args, cfg, backend, source, file_audio, hangups, notifier))
    finally:
        if notifier is not None:
            notifier.close()
    if any(t.daemon and t.is_alive() for t in threading.enumerate()):
        _exit_leaving_threads(code)
    return code


def _exit_leaving_threads(code: int) -> NoReturn:
    """End the process with ``code`` now, without Python's finalization.

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


async def _serve(args: argparse.Namespace, cfg: Config, backend: Any, source: str,
                 file_audio: Any, hangups: _HeldHangups | None = None,
                 notifier: Notifier | None = None) -> int:
    from .audio.microphone import MicrophoneCapture
    from .run import feed_samples

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    # If the model thread dies, the worker reloads the model with this.
    reload = functools.partial(load_backend, cfg.model)
    async with Engine(cfg, backend, backend_factory=reload) as engine, \
            CaptionServer(engine, cfg.server) as server, \
            contextlib.AsyncExitStack() as stack:
        await _start_mqtt(stack, cfg, engine, server)
        running = [cfg]
        reloads: set[asyncio.Task[None]] = set()
        scheme = "wss" if cfg.server.tls_cert else "ws"
        url = _base_url(scheme, cfg.server.host, server.port)

        def snapshot() -> Snapshot:
            return _service_snapshot(engine, url)

        if notifier is not None:
            supervisor = asyncio.ensure_future(supervise(notifier, snapshot))
            stack.callback(supervisor.cancel)

        def on_sighup() -> None:
            task = asyncio.ensure_future(_reload(args, running, server, notifier, snapshot))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        def hold_sighup() -> None:
            loop.remove_signal_handler(signal.SIGHUP)  # restores the default action
            if hangups is not None:
                hangups.install()

        with contextlib.suppress(NotImplementedError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
            stack.callback(hold_sighup)
            if hangups is not None and hangups.pending:
                on_sighup()  # one that came while the model loaded
        stream_id = args.stream or source
        if not args.no_print:
            # Channels split into streams, or only clients' streams: each
            # line says whose it is. Else the source's lines are unnamed and
            # those of streams clients send name theirs.
            several = source == "mic" and len(_mic_stream_ids(cfg, stream_id)) > 1
            everyone = several or args.source == "none"
            engine.add_listener(CaptionPrinter(show_stream=everyone,
                                               own=None if everyone else stream_id))
        _notice(cfg, f"serving captions on {url}/v1/captions (Ctrl-C to stop)")
        feeder: asyncio.Task[Any] | None = None
        mic: MicrophoneCapture | None = None
        if source == "mic":
            streams = {ch: engine.open_stream(name, source="mic")
                       for ch, name in _mic_stream_ids(cfg, stream_id).items()}

            def mic_lost(message: str) -> None:
                # End the open segments now: their finals must not wait for
                # the device to come back.
                for stream in streams.values():
                    if not stream.closed:
                        stream.cut()
                        stream.report_error("audio_input_lost", message)

            routes = [ChannelRoute(s.push, (ch,) if ch else cfg.audio.channels)
                      for ch, s in streams.items()]
            mic = MicrophoneCapture.from_config(cfg.audio, routes, on_stall=mic_lost)
            mic.start(loop)
            stack.callback(mic.stop)  # however this block is left, before the engine closes
        elif file_audio is not None:
            stream = engine.open_stream(stream_id, source="file")
            chunk = cfg.audio.file_chunk_ms * SAMPLE_RATE // 1000
            feeder = asyncio.ensure_future(feed_samples(stream, file_audio, chunk, realtime=True))
            if args.exit_at_end:
                feeder.add_done_callback(lambda _: stop.set())
        await stop.wait()
        # From here a SIGHUP is ignored (docs/config.md): a reload now would
        # close subscribers still owed the drained finals (token_revoked).
        with contextlib.suppress(NotImplementedError, AttributeError):
            loop.add_signal_handler(
                signal.SIGHUP, log.info, "reload: SIGHUP ignored while shutting down")
        if notifier is not None:
            notifier.send(notifier.notices.stopping("stopping: finishing open captions"))
        if mic is not None:
            mic.stop()
        if feeder is not None and not feeder.done():
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
        # A second Ctrl-C (or SIGTERM) stops at once: finals still owed are
        # closed with their last partials instead of waited for.
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, engine.give_up)
        if engine.streams:
            _notice(cfg, "stopping: finishing open captions "
                         "(press Ctrl-C again to stop at once)")
        # Flush open segments as finals while subscribers are still connected;
        # only then does the server close them (1001, going away).
        drained = await engine.drain()
    _ignore_late_stops(loop)
    # Exit status 1: some final had to be closed early or was lost (logged).
    return 0 if drained else 1


def _ignore_late_stops(loop: asyncio.AbstractEventLoop) -> None:
    """Ignore Ctrl-C and SIGTERM from here to the exit: the shutdown is done
    and its status decided, so there is nothing left to stop. Closing the loop
    would restore their defaults, and the interpreter's exit (a while, with the
    model's libraries loaded) would then die by a late one (status -2 or -15,
    not 0). A handler that does nothing, not SIG_IGN: that would be inherited
    by any program this process starts afterwards (a test run's next
    subprocess, an embedding program's), which Ctrl-C and SIGTERM could then
    not stop; :func:`main` makes it SIG_IGN as it returns to the exit."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, ValueError):
            loop.remove_signal_handler(sig)
            signal.signal(sig, _late_stop)


def _late_stop(signum: int, frame: types.FrameType | None) -> None:
    """A Ctrl-C or SIGTERM once the shutdown is done: nothing left to stop."""


def _late_stops_ignored_to_the_exit() -> None:
    """After serve's shutdown, as :func:`main` returns to the interpreter's
    exit: SIG_IGN, which Python's own handlers do not last through (they are
    reset before its last, slow moments). Only then, since SIG_IGN would be
    inherited by any program started afterwards."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is _late_stop:
            signal.signal(sig, signal.SIG_IGN)


async def _reload(args: argparse.Namespace, running: list[Config], server: CaptionServer,
                  notifier: Notifier | None = None,
                  snapshot: Callable[[], Snapshot] | None = None) -> None:
    """SIGHUP: read the configuration again (the same file and flags) and apply
    its [auth] section; other changes wait for a restart (logged). A bad
    configuration changes nothing. systemd hears of the reload's start and
    end either way."""
    if notifier is not None:
        notifier.send(notifier.notices.reloading(monotonic_usec()))
    try:
        await _apply_reload(args, running, server)
    finally:
        if notifier is not None and snapshot is not None:
            notifier.send(notifier.notices.reloaded(snapshot()))


async def _apply_reload(args: argparse.Namespace, running: list[Config],
                        server: CaptionServer) -> None:
    current = running[0]
    try:
        new = _load_config(args)
        if new.auth != current.auth:
            closed = await server.reload_auth(new.auth)
            log.info("reload: [auth] applied: %d token(s); %d connection(s) whose token is no "
                     "longer accepted were closed", len(new.auth.tokens), closed)
        else:
            log.info("reload: [auth] unchanged")
    except ConfigError as e:
        log.error("reload: %s; the running configuration is kept", e)
        return
    running[0] = dataclasses.replace(current, auth=new.auth)
    later = [f.name for f in dataclasses.fields(Config)
             if f.name != "auth" and getattr(new, f.name) != getattr(current, f.name)]
    if later:
        log.warning("reload: [%s] changed; only [auth] is applied at a reload, the rest "
                    "at a restart", "], [".join(later))


def _mic_stream_ids(cfg: Config, stream_id: str) -> dict[int, str]:
    """The microphone's streams by channel: one per channel of
    ``audio.channels`` with ``audio.split_channels`` (``ID-N``), else
    ``{0: ID}``, the channels mixed."""
    if cfg.audio.split_channels:
        return {ch: f"{stream_id}-{ch}" for ch in cfg.audio.channels}
    return {0: stream_id}


def _service_snapshot(engine: Engine, url: str) -> Snapshot:
    """The engine as systemd's status line and watchdog see it."""
    why = engine.unhealthy_reason
    if why is not None:
        status = f"{why} (see the log); serving on {url}"
    elif engine.ready:
        n = len(engine.streams)
        status = f"serving on {url}: {n} stream{'s' if n != 1 else ''} open"
    else:
        status = f"preparing the model (warm-up or reload); listening on {url}"
    return Snapshot(engine.ready, why, status)


def _check_serving(cfg: Config) -> None:
    """What serving refuses from the configuration alone, before the model
    loads (``serve``, ``transcribe --serve``; ``config`` checks it too): a
    non-loopback bind without tokens, TLS files that do not load, MQTT
    without aiomqtt."""
    from .server.auth import check_bind, tls_context

    check_bind(cfg.server.host, cfg.auth.tokens, cfg.server.allow_anonymous)
    # Loaded as the server loads them at its start, which reads them again:
    # the context made here is dropped.
    tls_context(cfg.server.tls_cert, cfg.server.tls_key)
    _check_mqtt_extra(cfg)


def _check_mqtt_extra(cfg: Config) -> None:
    """Refuse ``mqtt.enabled`` without aiomqtt before the model loads, in one line."""
    if not cfg.mqtt.enabled:
        return
    try:
        import aiomqtt  # noqa: F401
    except ImportError:
        raise UserError("MQTT needs aiomqtt: pip install 'evoxtral-stream[mqtt]', "
                        "or set mqtt.enabled=false") from None


async def _start_mqtt(stack: contextlib.AsyncExitStack, cfg: Config, engine: Engine,
                      server: CaptionServer) -> None:
    """Publish captions to MQTT too when ``mqtt.enabled``; never blocks the engine.
    The publisher's counters join the server's ``/metrics``."""
    if not cfg.mqtt.enabled:
        return
    from .server.mqtt import MqttPublisher

    publisher = await stack.enter_async_context(MqttPublisher(cfg.mqtt))
    engine.add_listener(publisher)
    stack.callback(engine.remove_listener, publisher)
    server.metrics.watch_mqtt(publisher.stats)
    stack.callback(server.metrics.watch_mqtt, None)
    scheme = "mqtts" if cfg.mqtt.tls else "mqtt"
    _notice(cfg, f"publishing captions to {scheme}://{cfg.mqtt.host}:{cfg.mqtt.port}/"
                 f"{cfg.mqtt.prefix}/")


def _cmd_devices(args: argparse.Namespace, cfg: Config) -> int:
    devices = list_input_devices()
    if not devices:
        raise UserError("no audio input device found")
    _to_stdout("".join(f"{'*' if d.is_default else ' '} {d.index:3d}  {d.name}  "
                       f"({d.channels} ch, {d.default_samplerate:.0f} Hz)\n" for d in devices),
               "the devices")
    return 0


def _cmd_eval(args: argparse.Namespace, cfg: Config) -> int:
    from .evaluation import load_audio, run_eval
    from .text.manifest import ManifestError, read_manifest
    from .text.metrics import compare, format_comparison, format_table

    try:
        entries = read_manifest(args.manifest)
    except ManifestError as e:
        raise UserError(str(e)) from None
    try:
        # WER comes last, after every file is streamed: check it can be had now.
        import jiwer  # noqa: F401
    except ImportError:
        raise UserError("eval needs jiwer for WER: "
                        "pip install 'evoxtral-stream[eval]'") from None
    # The report is written last, after every file is decoded: check its place now.
    if args.json is not None:
        _check_output_file("--json", str(args.json), "name the report's file")
        # os.path.realpath, not Path.resolve: before Python 3.13 that raises
        # RuntimeError on a symlink loop; a NUL in a name is a ValueError.
        def real(path: Path) -> str | None:
            try:
                return os.path.realpath(path)
            except (OSError, ValueError):
                return None  # read_audio_file reports it in one line

        report_path = real(args.json)
        if report_path is None:
            raise UserError(f"--json {str(args.json)!r} cannot name a file")
        # Nor its .part file (_write), which writing the report first removes.
        part = part_path(args.json)
        reports = {report_path} if part is None else {report_path, real(part)}
        if reports & {real(args.manifest), *(real(e.audio) for e in entries)} - {None}:
            raise UserError(f"--json {args.json} is the manifest or one of its audio files: "
                            "it would be overwritten; name another file")
    # Every file of the manifest decoded now (eval holds them all anyway): a
    # missing or unreadable one is one line before the model loads.
    audio = load_audio(entries, source=str(args.manifest))
    backend = load_backend(cfg.model)
    result = run_eval(cfg, backend, entries, audio, compare_offline=args.compare_offline)
    failed = [entries[i].line for i in result.failed]
    report: dict[str, Any] = {"manifest": str(args.manifest), "backend": backend.name,
                              "streaming": result.streaming.to_dict(),
                              "decode_failed": failed}
    if result.offline is not None:
        comparison = compare(result.offline, result.streaming)
        table = (f"{format_comparison(comparison)}\n"
                 f"files whose streaming text equals the offline text: "
                 f"{result.identical}/{len(entries)}\n")
        report.update(offline=result.offline.to_dict(), delta=comparison.delta(),
                      identical=result.identical)
    else:
        table = format_table(result.streaming, title="streaming") + "\n"
    # The report file even when stdout takes nothing: it is the run's result.
    written: list[UserError] = []
    _attempt(written, _to_stdout, table, "the report")
    if args.json:
        _attempt(written, _write, args.json,
                 json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    _raise_first(written)
    if failed:
        # Scored all the same (the rest of the run is sound), but said: the
        # text of these files is not all the model's.
        log.warning("%s line %s: a decode failed (logged above); the scores count "
                    "what was decoded", args.manifest, ", ".join(map(str, failed)))
        return 1
    return 0


def _cmd_export_merged(args: argparse.Namespace, cfg: Config) -> int:
    try:
        from .engine.backends.voxtral import ExportError, export_merged
    except ImportError as e:
        raise UserError(f"export-merged needs the voxtral extra ({e.name} missing): "
                        "pip install torch==2.13.0 'evoxtral-stream[voxtral]'") from None
    try:
        export_merged(cfg.model.voxtral, args.outdir)
    except ExportError as e:
        raise UserError(str(e)) from None
    return 0  # the export logged where it wrote (once: not a second status line)


def _error_line(message: str, logs: LoggingConfig) -> None:
    """Report an error meant for people in one line (an ERROR record in json mode)."""
    if logs.format == "json":
        log.error("%s", message)
    else:
        with contextlib.suppress(OSError):  # stderr full: the exit status still tells
            # One line even when the message quotes a file name holding one;
            # tokens redacted, as the json record's are (it quotes values).
            shown = redact_tokens(message).replace("\r", "\\r").replace("\n", "\\n")
            print(f"evoxtral-stream: error: {shown}", file=sys.stderr, flush=True)


def _fail(message: str, logs: LoggingConfig) -> NoReturn:
    """:func:`_error_line`, then exit with status 2."""
    _error_line(message, logs)
    raise SystemExit(EXIT_USAGE)


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


def _stand_in_for_closed_streams() -> None:
    """Put a :class:`_ClosedStream` where a standard stream is None."""
    for name in ("stdin", "stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, io.TextIOWrapper(_ClosedStream(), encoding="utf-8",
                                                write_through=True))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; its exit status. Without ``argv`` this
    is the program (the console script, ``python -m``): it reads
    ``sys.argv``, and once the status is decided a Ctrl-C or SIGTERM no
    longer changes it (:func:`_stops_ignored_to_the_exit`)."""
    logs: LoggingConfig | None = None  # once its handler is in place
    try:
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
            cfg = _load_config(args)
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
            say_interrupted(json_mode=False)
        if any(t.daemon and t.is_alive() for t in threading.enumerate()):
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
    (:func:`main` without ``argv``), as later programs would inherit it."""
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


if __name__ == "__main__":
    sys.exit(main())
