"""``transcribe``: audio files streamed through the engine, their captions
printed and written as it runs (``--srt``, ``--vtt``, ``--jsonl``), served
too with ``--serve``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from ..audio.filereader import AudioFile, AudioInputError, FileMix, open_audio_file
from ..config import Config
from ..console import CaptionPrinter, redraws
from ..data import sample_path
from ..engine.backends import load_backend
from ..engine.engine import Engine, StreamSummary
from ..events import SAMPLE_RATE, CaptionEvent, EngineEvent
from ..logs import LEVELS
from ..outputs import JsonlFile, SubtitleFiles, is_stdout, stdout_closed
from ..run import FileJob, total_samples, transcribe_samples
from ..server.app import CaptionServer, check_listen
from ..text.formats import SubtitleWriter, TagStyle
from .exits import EXIT_STDOUT_CLOSED, EXIT_USAGE, _exit_leaving_threads, _native_threads_left
from .messages import UserError, _error_line, _notice
from .results import _SUFFIXES, _cue_layout, _output_path, _prepare_outputs, _unmade_if_empty
from .serve import _base_url, _check_serving, _start_mqtt
from .streams import (
    _audio_paths,
    _channel_mixes,
    _channel_stream_ids,
    _check_channel_stream_ids,
    _stream_ids,
)

log = logging.getLogger(__name__)


class _UnreadableFiles(UserError):
    """The files of one command that cannot be read: one message (one
    line) each, so a batch is mended in one go, not a file per try."""

    def __init__(self, messages: Sequence[str]) -> None:
        super().__init__(messages[-1])
        self.messages = tuple(messages)


def _read_files(paths: Sequence[Path], mixes: Sequence[Sequence[int]],
                stack: contextlib.ExitStack) -> list[AudioFile]:
    """Every file of ``paths`` opened, one output per mix of its channels
    (:func:`open_audio_file`: its header read, its audio decoded later as
    it is fed; ``stack`` closes them), or :class:`_UnreadableFiles` naming
    each that cannot be: a file without the channels asked for among
    them."""
    audio: list[AudioFile] = []
    problems: list[str] = []
    for path in paths:
        try:
            audio.append(stack.enter_context(open_audio_file(path, mixes)))
        except AudioInputError as e:
            problems.append(str(e))
    if problems:
        raise _UnreadableFiles(problems)
    return audio


def _cmd_transcribe(args: argparse.Namespace, cfg: Config) -> int:
    if not args.serve:
        # Alone they would be ignored: one who meant to serve would get no
        # server and no word of it.
        for flag in ("host", "port"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag} is for --serve (where it listens); add --serve, "
                                f"or leave --{flag} out")
    paths = _audio_paths(args.files)
    if args.sample:
        paths.append(sample_path())
    if not paths:
        raise UserError("no input: name audio files or use --sample")
    ids = _stream_ids(paths)
    # Each file's streams: the file's id, or ID-N for each channel split off
    # (distinct for distinct ids: N, a number, follows the last "-").
    for sid in ids:
        _check_channel_stream_ids(cfg, sid)
    names = [list(_channel_stream_ids(cfg, sid).values()) for sid in ids]
    streams = sum(len(n) for n in names)
    outputs = streams * ((args.srt is not None) + (args.vtt is not None)) + bool(args.jsonl)
    # A stream's pass holds its file open, a pipe its copy, a journal each
    # live stream's file: all for the whole run.
    _allow_open_files(len(paths), streams + outputs + sum(map(_is_pipe, paths))
                      + (streams if cfg.journal.enabled else 0))
    made = _prepare_outputs((("--srt", args.srt), ("--vtt", args.vtt), ("--jsonl", args.jsonl)),
                            paths, [n for file in names for n in file], staged=True)
    with _unmade_if_empty(made):
        return _transcribe(args, cfg, paths, ids, names)


#: Descriptors transcribe may hold besides its files and outputs: about 10
#: (stdin, stdout, stderr and the log writer's copy, the event loop's, a
#: block's decoder and its print catcher's two), the model's files while it
#: loads, and with --serve its listening sockets, MQTT link and a few dozen
#: clients.
_OPEN_FILES_MARGIN = 64


def _allow_open_files(files: int, held: int) -> None:
    """Make sure the process may open what a run over ``files`` files holds
    at once (``held`` descriptors, :data:`_OPEN_FILES_MARGIN` more): every
    file is fed at once, so a batch of a few hundred ran past the usual
    soft limit of 1024 (each file past it lost its audio, with an error
    line). The soft limit is raised to that, up to the hard limit; past the
    hard limit (or where it cannot be raised) the command is refused now,
    before the model loads, with a :class:`UserError`. Windows has no such
    limit: nothing is done there."""
    if sys.platform == "win32":
        return
    import resource

    need = held + _OPEN_FILES_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    needs = (f"{files} file(s) need about {need} open files at once (every file is fed at "
             "once, each output written as it runs)")
    if hard != resource.RLIM_INFINITY and need > hard:
        raise UserError(f"{needs}, over the hard limit of {hard} open files (ulimit -Hn): "
                        f"raise it and the soft one (ulimit -n {need}), or transcribe fewer "
                        "files at a time")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    except (OSError, ValueError) as e:  # macOS: past kern.maxfilesperproc
        raise UserError(f"{needs}, over the limit of {soft} open files (ulimit -n), which "
                        f"cannot be raised to that here ({e}): transcribe fewer files at a "
                        "time") from None
    log.debug("open files limit raised from %d to %d for %d files", soft, need, files)


def _is_pipe(path: Path) -> bool:
    """Whether ``path`` is a pipe (its audio is copied, and the copy held)."""
    try:
        return path.is_fifo()
    except OSError:
        return False


def _transcribe(args: argparse.Namespace, cfg: Config, paths: Sequence[Path],
                ids: Sequence[str], names: Sequence[Sequence[str]]) -> int:
    """:func:`_cmd_transcribe` once its outputs are prepared: ``ids`` holds
    each file's id, ``names`` its streams, as :func:`_channel_stream_ids`
    orders them."""
    with contextlib.ExitStack() as files:
        audio = _read_files(paths, list(_channel_mixes(cfg).values()), files)
        # A file's channels are equally long (one pass over the file feeds
        # them): their streams share the file's timeline, with --realtime its
        # clock.
        jobs = [FileJob(name, FileMix(file, mix), file=file_id)
                for file_id, file_names, file in zip(ids, names, audio, strict=True)
                for mix, name in enumerate(file_names)]
        return _transcribe_jobs(args, cfg, jobs)


def _transcribe_jobs(args: argparse.Namespace, cfg: Config, jobs: Sequence[FileJob]) -> int:
    """:func:`_transcribe` once its files are opened, as ``jobs``."""
    if args.serve:
        _check_serving(cfg)  # as serve does: before the model loads
        check_listen(cfg.server.host, cfg.server.port)
    backend = load_backend(cfg.model)
    stops: list[asyncio.Event] = []  # the job's, once it runs
    # An output that is stdout itself (--srt /dev/stdout | ..., --jsonl F > F)
    # holds that output only: caption lines between its cues would break it.
    on_stdout = _outputs_on_stdout(args, [j.stream for j in jobs])
    prints = not any(on_stdout)
    # When only stdout takes the captions (printed, or an output that is
    # stdout) and its reader has left (| head), nothing is left to make
    # them for: the reading stops.
    only_stdout = all(on_stdout) and not (args.serve or cfg.journal.enabled)

    def on_closed() -> None:
        if only_stdout and stops:
            stops[0].set()  # as a Ctrl-C does, without its line
    printer = CaptionPrinter(show_stream=len(jobs) > 1,
                             partials=True if args.partials else None, on_closed=on_closed)
    latencies: list[float] = []  # one float per final: the summary's p95

    def tally(event: EngineEvent) -> None:
        if isinstance(event, CaptionEvent) and event.final and event.latency is not None:
            latencies.append(event.latency)

    total = total_samples([j.samples for j in jobs])
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
                if prints:
                    engine.add_listener(printer)
                elif only_stdout:
                    engine.add_listener(_on_output_left(jsonl, subtitles, on_closed))
                # No progress bar in json mode (stderr holds JSON lines only),
                # nor with -q (only warnings and errors), nor where an output
                # is written onto the terminal (--srt - there): its lines take
                # no heed of the bar's row, and would leave the bar beside them.
                quiet = LEVELS[cfg.logging.level] > logging.INFO
                onto_terminal = not prints and redraws(sys.stdout)
                bar = (None if cfg.logging.format == "json" or quiet or onto_terminal
                       else _progress(total))
                try:
                    progress = None if bar is None else bar.update
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
    failures = _output_failures(jsonl, subtitles)
    # An output into stdout whose reader left (| head) is no error either.
    output_left = [f for f in failures if stdout_closed(*f)]
    failed = next((f for f in failures if f not in output_left), None)
    if failed is not None:
        raise UserError(f"cannot write {failed[0]}: {failed[1].strerror or failed[1]}")
    audio_s = sum(s.duration_s for s in summaries)
    p95 = _p95(latencies)
    reader_left = isinstance(printer.error, BrokenPipeError) or bool(output_left)
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
    if _native_threads_left():
        _exit_leaving_threads(code)  # a second Ctrl-C left the model thread behind
    return code


def _outputs_on_stdout(args: argparse.Namespace, streams: Sequence[str]) -> list[bool]:
    """For each file ``--srt``, ``--vtt`` and ``--jsonl`` name, whether it is
    the file stdout writes to (:func:`is_stdout`)."""
    many = len(streams) > 1
    paths = [Path(args.jsonl)] if args.jsonl else []
    paths += [_output_path(Path(raw), stream, _SUFFIXES[flag], many)
              for flag, raw in (("--srt", args.srt), ("--vtt", args.vtt)) if raw is not None
              for stream in streams]
    return [is_stdout(path) for path in paths]


def _output_failures(jsonl: JsonlFile | None,
                     subtitles: SubtitleFiles) -> list[tuple[Path, OSError]]:
    """Each output file that failed (its path and error), subtitles first."""
    return [*subtitles.errors,
            *([(jsonl.path, jsonl.error)] if jsonl is not None and jsonl.error else [])]


def _on_output_left(jsonl: JsonlFile | None, subtitles: SubtitleFiles,
                    on_closed: Callable[[], None]) -> Callable[[EngineEvent], None]:
    """A listener, after the outputs', that calls ``on_closed`` once one of
    them failed because stdout's reader left (:func:`stdout_closed`)."""
    seen = 0  # failures when last looked at: stat'ed when one is added, not at every event

    def listener(event: EngineEvent) -> None:
        nonlocal seen
        failed = _output_failures(jsonl, subtitles)
        if len(failed) != seen:
            seen = len(failed)
            if any(stdout_closed(*f) for f in failed):
                on_closed()
    return listener


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


def _progress(total_samples: int | None) -> Any:
    """A bar on a terminal's stderr (else None), updated in samples and
    shown in seconds. ``total_samples`` is what the files' headers say
    (None: one says no length, and the bar counts with no end); where the
    audio runs past it (a header's estimate) it is raised to the count."""
    if not redraws(sys.stderr):
        return None
    from tqdm import tqdm

    class Bar(tqdm):  # type: ignore[misc]
        """Clears the rest of its row with an erase (CSI K) where tqdm pads
        with spaces to the last bar's length: after the window is made
        narrower, those spaces would wrap onto the rows below."""

        def update(self, n: float | None = 1) -> bool | None:
            # Past its total, tqdm prints a warning onto the terminal.
            total, done = getattr(self, "total", None), getattr(self, "n", 0)
            if total is not None and n is not None and done + n > total:
                self.total = done + n
            result: bool | None = super().update(n)
            return result

        @staticmethod
        def status_printer(file: TextIO) -> Callable[[str], None]:
            def print_status(s: str) -> None:
                file.write(f"\r{s}\x1b[K")
                file.flush()
            return print_status

    # position=1: on the row below the live partial (CaptionPrinter redraws
    # its row in place), which the bar would otherwise overwrite. Counted in
    # samples: the total in seconds, rounded or summed, ends below the count
    # and tqdm prints a warning onto the terminal ("clamping frac").
    # dynamic_ncols: the width read at each redraw, as the partial's is: a bar
    # wider than a window made narrower would wrap, and leave a row behind.
    return Bar(total=total_samples, unit="s", unit_scale=1 / SAMPLE_RATE,
               file=sys.stderr, leave=False, position=1, dynamic_ncols=True,
               bar_format=("{l_bar}{bar}| {n:.0f}/{total:.0f} s" if total_samples is not None
                           else "{n:.0f} s"))


def _close_progress(bar: Any) -> None:
    """Close :func:`_progress`'s bar. Closed below the caption row, tqdm
    leaves the cursor past the row's end: the next line starts at column 0."""
    bar.close()
    bar.fp.write("\r")
    bar.fp.flush()


def _open_outputs(args: argparse.Namespace, cfg: Config, streams: Sequence[str]
                  ) -> tuple[JsonlFile | None, SubtitleFiles]:
    """Create transcribe's output files, written as the engine runs
    (:mod:`evoxtral_stream.outputs`): the ``--jsonl`` file, and each stream's ``--srt`` and
    ``--vtt`` as ``.part`` files until the stream ends. One that cannot be
    created is a :class:`UserError`, the ``.part`` files made before it
    removed."""
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
        subtitles.discard()
        raise UserError(f"cannot write {args.jsonl}: {e.strerror or e}") from None
