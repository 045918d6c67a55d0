"""Where a command's results go: its output files and folders, checked
before any work and written whole or not at all, and standard output."""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import Config
from ..outputs import is_stdout, part_path, write_file
from ..text.formats import CueLayout
from .messages import UserError

#: The file suffix of each subtitle output flag (``--jsonl`` is one file).
_SUFFIXES = {"--srt": ".srt", "--vtt": ".vtt", "--text": ".txt"}


def _output_path(target: Path, stream: str, suffix: str, many: bool) -> Path:
    return target / f"{stream}{suffix}" if many or target.is_dir() else target


# ``-`` for an output is standard output, as it is standard input for the
# audio (parser._output_arg); the outputs' code knows /dev/stdout already
# (written in place, no caption printed between its lines).
STDOUT_PATH = "/dev/stdout"


def _prepare_outputs(outputs: Sequence[tuple[str, str | None]], inputs: Sequence[Path],
                     streams: Sequence[str], inputs_are: str = "audio files", *,
                     staged: bool = False) -> list[Path]:
    """Make the output folders, or refuse the outputs, before any work: each
    ``(flag, PATH)`` but ``--jsonl`` is one file, or a folder of one file per
    stream when there are several streams or PATH is one. Refused: two flags
    that would write one file, an output that would overwrite an input
    (one of the ``inputs_are``, the error says), and a stream's file that is
    a folder. ``staged``: subtitles are written to ``.part`` files first
    (:func:`evoxtral_stream.outputs.part_path`), which count as outputs of their flag too.
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
        on_stdout = raw == STDOUT_PATH or is_stdout(target)
        if flag != "--jsonl" and many and not folder and on_stdout:
            # mkdir would say "File exists": the files need a folder.
            each = "sessions" if inputs_are == "recordings" else "streams"
            raise UserError(f"{flag} {raw}: standard output takes one file, and the "
                            f"{len(streams)} {each} need one each: name a folder")
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
    # And the files themselves: another name of an input (a hard link, a
    # folder mounted twice) has a path of its own, and a --jsonl opened
    # there would empty the input.
    input_files = {ident for p in inputs if (ident := _file_id(p)) is not None}
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
            other = ("the input" if _file_id(path) in input_files
                     else writers.setdefault(resolved, flag))
            if other == "the input":
                raise UserError(f"{flag} {path} is one of the {inputs_are}: it would be "
                                "overwritten; name another file")
            if other != flag:
                raise UserError(f"{other} and {flag} would both write {path}: "
                                "name a file for each, or one folder")


def _file_id(path: Path) -> tuple[int, int] | None:
    """The regular file ``path`` names, as its device and inode (links
    followed); None when there is none (yet), it cannot be looked at, or it
    is no regular file (a folder; a terminal, which /dev/stdin and
    /dev/stdout may both be)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # none there, a NUL: reported elsewhere
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


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
    """Write a result file whole or not at all
    (:func:`evoxtral_stream.outputs.write_file`): a failure is a
    :class:`UserError`, the file as it was."""
    try:
        write_file(path, text.encode("utf-8"))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


class _StdoutClosed(UserError):
    """Standard output's reader has left (a pipe closed early, as ``| head``
    does): no error, but nothing more to print.
    :func:`~evoxtral_stream.cli.main` ends the command quietly with
    :data:`.exits.EXIT_STDOUT_CLOSED`."""

    def __init__(self) -> None:
        super().__init__("standard output closed by its reader")


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
