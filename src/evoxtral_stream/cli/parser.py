"""The command line: its arguments (argparse, usage errors reported as
``--log-format`` asks) and the configuration they ask for."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .. import __version__
from ..config import Config, ConfigError, LoggingConfig, load_config, parse_override
from ..logs import FORMATS
from ..server.auth import redact_tokens
from ..startup import asked_log_format
from .exits import EXIT_USAGE
from .messages import _fail, _setup_logging
from .results import STDOUT_PATH
from .streams import _stream_id_arg


def _output_arg(raw: str) -> str:
    """An output's PATH as given (a string: Path drops the trailing "/" that
    says "a folder"), ``-`` being standard output."""
    return STDOUT_PATH if raw == "-" else raw


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
        json_mode = asked_log_format(argv) == "json"
        logs = LoggingConfig(format="json" if json_mode else "text", level="info")
        if json_mode:
            _setup_logging(logs)
        # --set given as two words (--set mqtt.password hunter2): argparse
        # refuses the second, which may be a secret, quoting it; the --set
        # is said instead, as when nothing follows it.
        unset = _set_without_equals(argv)
        if unset is not None:
            _fail(unset, logs)
        if json_mode:
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


def _set_without_equals(argv: Sequence[str]) -> str | None:
    """The error of the first ``--set`` in ``argv`` that has no ``=``, read
    leniently (the arguments around it may be what argparse refused); None
    where each has one, or none can be read."""
    scan = _Parser(add_help=False)
    scan.add_argument("--set", action="append", default=[], dest="overrides")
    try:
        given: list[str] = scan.parse_known_args(argv)[0].overrides
    except _UsageError:
        return None
    for text in given:
        if "=" not in text:
            try:
                parse_override(text)
            except ConfigError as e:
                return str(e)
    return None


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
                       help="'mic' (default), 'none' (serve only), 'sample', an audio file "
                            "played at real-time pace, or a pipe carrying WAV read live "
                            "('-': standard input)")
    serve.add_argument("--stream", default=None, metavar="ID", type=_stream_id_arg,
                       help="stream id (default: 'mic', or the file's name without its "
                            "suffix; with audio.split_channels, ID-N per channel)")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--no-partials", action="store_true",
                       help="finals only: shortcut for --set stream.partial_interval_ms=0")
    serve.add_argument("--exit-at-end", action="store_true",
                       help="with a file or pipe source, stop when it ends")
    serve.add_argument("--no-print", action="store_true", help="do not print captions")

    tr = sub.add_parser("transcribe", parents=[common],
                        help="stream audio files through the engine",
                        description="Stream audio files through the live pipeline and print "
                                    "their captions; several files run as concurrent streams.")
    tr.add_argument("files", nargs="*", type=Path, metavar="FILE",
                    help="audio files ('-': standard input)")
    tr.add_argument("--sample", action="store_true", help="add the bundled speech sample")
    tr.add_argument("--realtime", action="store_true",
                    help="feed audio at real-time pace (default: as fast as possible)")
    tr.add_argument("--no-partials", action="store_true", help="finals only (fastest)")
    tr.add_argument("--partials", action="store_true",
                    help="print partials too when not on a terminal")
    # Strings, not Paths: Path drops the trailing "/" that says "a folder".
    tr.add_argument("--srt", metavar="PATH", type=_output_arg,
                    help="write SRT ('-': standard output; a folder for several streams: "
                         "files, or channels split; or when PATH ends with /)")
    tr.add_argument("--vtt", metavar="PATH", type=_output_arg, help="write WebVTT (likewise)")
    tr.add_argument("--jsonl", metavar="PATH", type=_output_arg,
                    help="write every event of every stream to one file ('-': standard "
                         "output), as JSON lines (protocol v1 messages)")
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
    st.add_argument("--srt", metavar="PATH", type=_output_arg,
                    help="write SRT ('-': standard output; a folder for several sessions, "
                         "or when PATH ends with /)")
    st.add_argument("--vtt", metavar="PATH", type=_output_arg, help="write WebVTT (likewise)")
    st.add_argument("--text", metavar="PATH", type=_output_arg,
                    help="write running text (likewise)")

    ev = sub.add_parser("eval", parents=[common],
                        help="score the engine on a manifest (WER, CER, tag F1, emphasis F1)",
                        description="Stream every file of MANIFEST (JSON lines "
                                    '{"audio": PATH, "text": TAGGED REFERENCE}) through the '
                                    "pipeline and score the finals with the Evoxtral "
                                    "authors' metrics, and the character error rate "
                                    "beside WER.")
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
