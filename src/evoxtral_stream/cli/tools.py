"""The commands beside captioning: ``config``, ``hash-token``, ``devices``,
``eval`` and ``export-merged``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..audio.microphone import list_input_devices
from ..config import Config, to_toml
from ..engine.backends import load_backend
from ..extras import extra_hint
from ..outputs import part_path
from .messages import UserError, log
from .results import _attempt, _check_output_file, _raise_first, _to_stdout, _write
from .serve import _check_serving


def _cmd_config(args: argparse.Namespace, cfg: Config) -> int:
    # Refused as serve refuses it: config is how a configuration is checked.
    _check_serving(cfg)
    _to_stdout(to_toml(cfg), "the configuration")
    return 0


def _cmd_hash_token(args: argparse.Namespace, cfg: Config) -> int:
    from ..server.auth import hash_token, printable_ascii

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


def _cmd_devices(args: argparse.Namespace, cfg: Config) -> int:
    devices = list_input_devices()
    if not devices:
        raise UserError("no audio input device found")
    _to_stdout("".join(f"{'*' if d.is_default else ' '} {d.index:3d}  {d.name}  "
                       f"({d.channels} ch, {d.default_samplerate:.0f} Hz)\n" for d in devices),
               "the devices")
    return 0


def _cmd_eval(args: argparse.Namespace, cfg: Config) -> int:
    from ..evaluation import load_audio, run_eval
    from ..text.manifest import ManifestError, read_manifest
    from ..text.metrics import compare, format_comparison, format_table

    try:
        entries = read_manifest(args.manifest)
    except ManifestError as e:
        raise UserError(str(e)) from None
    try:
        # WER and CER come last, after every file is streamed: check they can be had now.
        import jiwer  # noqa: F401
    except ImportError:
        raise UserError(f"eval needs jiwer for WER and CER: {extra_hint('eval')}") from None
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
        from ..engine.backends.voxtral import ExportError, export_merged
    except ImportError as e:
        raise UserError(f"export-merged needs the voxtral extra ({e.name} missing): "
                        f"{extra_hint('voxtral', torch_first=True)}") from None
    try:
        export_merged(cfg.model.voxtral, args.outdir)
    except ExportError as e:
        raise UserError(str(e)) from None
    return 0  # the export logged where it wrote (once: not a second status line)
