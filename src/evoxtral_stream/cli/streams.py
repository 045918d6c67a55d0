"""The stream ids of the command line: ``--stream``'s check, the audio files
named (``-`` for standard input) and the ids made from their names, and the
streams ``[audio]`` makes of a source's channels (``serve``'s device or
file, each file of ``transcribe``)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from ..config import Config
from ..events import MAX_STREAM_ID, stream_id_problem
from .messages import UserError

#: The file ``-`` names: standard input, read through the copy
#: :func:`~evoxtral_stream.audio.filereader.open_audio_file` makes of a pipe.
STDIN_PATH = Path("/dev/stdin")


def _audio_paths(names: Sequence[Path | str]) -> list[Path]:
    """The audio files named on the command line, ``-`` being standard input
    (stream id ``stdin``): at most once, since it can be read once, and not
    a terminal, which holds no audio. A file named ``-`` is ``./-``."""
    paths: list[Path] = []
    for name in names:
        if str(name) != "-":
            paths.append(Path(name))
            continue
        if STDIN_PATH in paths:
            raise UserError("- (standard input) is named more than once: it can be read once")
        if os.isatty(0):
            raise UserError("- reads the audio from standard input, which is a terminal: "
                            "pipe it in (ffmpeg -i talk.mp4 -f flac - | evoxtral-stream "
                            "transcribe -)")
        paths.append(STDIN_PATH)
    return paths


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


def _channel_mixes(cfg: Config) -> dict[int, tuple[int, ...]]:
    """The streams of a source (``serve``'s device or file, each file of
    ``transcribe``) by channel, each with the channels mixed into it: one
    per channel of ``audio.channels`` with ``audio.split_channels``
    (``{N: (N,)}``), else ``{0: audio.channels}``. ``()``, the default,
    is the first two channels of a device and every channel of a file."""
    if cfg.audio.split_channels:
        return {ch: (ch,) for ch in cfg.audio.channels}
    return {0: cfg.audio.channels}


def _channel_stream_ids(cfg: Config, stream_id: str) -> dict[int, str]:
    """The names of :func:`_channel_mixes`' streams: ``ID-N`` for channel
    N split off, ``ID`` for the mix."""
    return {ch: f"{stream_id}-{ch}" if ch else stream_id for ch in _channel_mixes(cfg)}


def _check_channel_stream_ids(cfg: Config, stream_id: str) -> None:
    """Refuse a stream name that ``-N`` makes too long, before the model loads."""
    for name in _channel_stream_ids(cfg, stream_id).values():
        if problem := stream_id_problem(name):
            raise UserError(f"cannot caption channels as stream {name!r}: {problem}")
