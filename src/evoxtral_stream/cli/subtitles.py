"""``subtitles``: recorded captions (journal files, ``transcribe --jsonl``
output) back into each stream session's subtitles or text."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

from ..config import Config
from ..engine.journal import parse_file_name
from ..events import CaptionEvent
from ..server.protocol import caption_from_dict
from ..text.formats import TagStyle, to_srt, to_text, to_vtt
from ..text.sessions import Session, SessionSplitter
from .messages import UserError, log
from .results import (
    _attempt,
    _cue_layout,
    _is_dir,
    _output_path,
    _prepare_outputs,
    _raise_first,
    _to_stdout,
    _unmade_if_empty,
    _write,
)


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
                except (ValueError, RecursionError):
                    # Bad JSON or UTF-8, or a ProtocolError; RecursionError is
                    # json.loads' for JSON nested past the interpreter's limit.
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
    file named after ``name`` in a folder (see :func:`.results._output_path`); no cue
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
