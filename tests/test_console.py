"""Captions on a terminal: a real pseudo-terminal, its width set as a user's."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import logging
import os
import re
import struct
import subprocess
import sys
import termios
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import pytest

from evoxtral_stream.cli.transcribe import _close_progress, _progress
from evoxtral_stream.console import CaptionPrinter, clip_columns, printable, text_columns
from evoxtral_stream.events import (
    SAMPLE_RATE,
    CaptionEvent,
    Hypothesis,
    RequestKind,
    StreamEnded,
    StreamError,
)
from evoxtral_stream.logs import configure_logging
from evoxtral_stream.text.merger import Merger
from tests.helpers.terminal import screen_rows as _screen

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _partial(stable: str, unstable: str, final: bool = False) -> CaptionEvent:
    text = stable + unstable
    return CaptionEvent("s", 0, 1, final, text, text, stable, unstable, (), 0.0, 9.5, None)


def _pty(columns: int, encoding: str = "utf-8", lines: int = 24
         ) -> tuple[int, int, Callable[[], str]]:
    """A pseudo-terminal ``columns`` wide and ``lines`` high: (master, slave,
    read all written so far, decoded from ``encoding``)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    os.set_blocking(master, False)
    written = bytearray()

    def drain() -> str:   # read as it goes: a full pty buffer would block the writes
        while True:
            try:
                written.extend(os.read(master, 65536))
            except BlockingIOError:
                return written.decode(encoding)

    return master, slave, drain


def _partial_log_final(tty: TextIO, drain: Callable[[], str], partial: CaptionEvent,
                       log: Callable[[], None], final: CaptionEvent) -> str:
    """What a printer on ``tty`` writes for ``partial``, a line ``log`` logs
    through the command's handler (on ``tty`` too), then ``final``."""
    root = logging.getLogger()
    handler = configure_logging("text", logging.INFO, stream=tty)
    assert handler is not None
    try:
        printer = CaptionPrinter(tty)
        printer(partial)
        log()
        printer(final)
        return drain()
    finally:
        root.removeHandler(handler)


def test_transcribe_s_progress_bar_and_the_live_partial_keep_their_own_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With stdout and stderr on one terminal, the bar is drawn on the row
    below the live partial, and a final that wraps clears it first. The bar
    used to be drawn on the partial's own row, so the partial was overwritten
    at once (never seen), and a wrapped final left half a bar behind it."""
    columns = 100
    master, slave, drain = _pty(columns)
    with open(slave, "w", encoding="utf-8") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        bar = _progress(60 * SAMPLE_RATE)
        assert bar is not None
        printer = CaptionPrinter(tty)
        for n in range(1, 6):
            printer(_partial("the committee met ", f"on Tuesday {n}"))
            bar.update(SAMPLE_RATE)
            bar.refresh()
            screen = _screen(drain(), columns)
            assert any(row.endswith(f"on Tuesday {n}") for row in screen), screen
            assert any("%|" in row for row in screen), screen
        printer(_partial("the committee met on Tuesday to discuss the budget " * 3, "",
                         final=True))
        bar.update(SAMPLE_RATE)
        bar.refresh()
        screen = _screen(drain(), columns)
        _close_progress(bar)
        tty.write("done\n")
        tty.flush()
        after = _screen(drain(), columns)
    os.close(master)
    assert [row for row in screen if "%|" in row and not re.match(r" *\d+%\|", row)] == []
    assert "done" in after and not any("%|" in row for row in after), after


def test_a_live_partial_fits_the_terminal_row_so_its_redraw_leaves_nothing_behind() -> None:
    """On an 80-column terminal each redraw of the growing partial is at most
    79 characters: the clear-line that redraws it clears one row only. The
    partial used to be cut at 150 characters, so on a usual terminal it
    wrapped and every redraw left its first rows on the screen."""
    master, slave, drain = _pty(80)
    with open(slave, "w", encoding="utf-8") as tty:
        printer = CaptionPrinter(tty)
        sentence = ("the committee met on Tuesday to discuss the budget and several members "
                    "raised concerns about the timeline")
        words = sentence.split()
        for n in range(1, len(words) + 1):
            printer(_partial(" ".join(words[:n - 1]) + " ", words[n - 1]))
            drain()
        printer(_partial("x" * 10, "y" * 200))   # an unstable tail longer than the row
        written = drain()
    os.close(master)
    redraws = [_ANSI.sub("", r) for r in written.split("\r\x1b[J") if r]
    assert len(redraws) == len(words) + 1
    assert max(len(r) for r in redraws) <= 79, max(redraws, key=len)
    assert redraws[-2].endswith("about the timeline")   # the newest words are kept
    assert redraws[-2].split("] ", 1)[1].startswith("…")
    assert redraws[-1].endswith("y" * 40)


def test_a_log_line_goes_above_the_live_partial_and_the_bar_not_into_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With stdout and stderr on one terminal, a warning logged from another
    thread while a partial is shown (and transcribe's bar below it) gets a
    row of its own, and the partial is drawn again below it. The log line
    used to be written after the partial on its row, which stayed on the
    screen as a garbled row, and into the bar's row."""
    columns = 100
    master, slave, drain = _pty(columns)
    root = logging.getLogger()
    with open(slave, "w", encoding="utf-8") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        monkeypatch.setattr(root, "handlers", [])   # as at a command's start: no handler yet
        handler = configure_logging("text", logging.INFO, stream=tty)
        assert handler is not None
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        bar = _progress(60 * SAMPLE_RATE)
        assert bar is not None
        printer = CaptionPrinter(tty)
        try:
            printer(_partial("the committee met ", "on Tuesday"))
            bar.update(SAMPLE_RATE)
            bar.refresh()
            drain()
            worker = threading.Thread(
                target=lambda: logging.getLogger("evoxtral_stream.test").warning(
                    "the model is 2.0 s behind"))
            worker.start()
            worker.join()
            screen = _screen(drain(), columns)
            assert "WARNING the model is 2.0 s behind" in screen, screen
            assert screen[-1].endswith("the committee met on Tuesday"), screen
            assert screen.index("WARNING the model is 2.0 s behind") < len(screen) - 1
            printer(_partial("the committee met on Tuesday", "", final=True))
            after = _screen(drain(), columns)
        finally:
            _close_progress(bar)
            root.removeHandler(handler)
    os.close(master)
    assert "WARNING the model is 2.0 s behind" in after, after
    captions = [row for row in after if "committee" in row]
    assert len(captions) == 1 and captions[0].endswith("the committee met on Tuesday"), after
    warning = "WARNING the model is 2.0 s behind"
    assert [row for row in after if "behind" in row and row != warning] == []


def test_lines_of_streams_other_than_its_own_name_their_stream() -> None:
    """serve prints its own source's lines as ever, and names the lines of
    streams clients send beside it; they used to be printed unnamed, so two
    speakers' captions could not be told apart."""
    out = io.StringIO()
    printer = CaptionPrinter(out, own="mic", partials=False, live=False)
    for stream in ("mic", "phone"):
        text = f"{stream} speaking"
        printer(CaptionEvent(stream, 0, 1, True, text, text, text, "", (), 0.0, 1.5, None))
    assert out.getvalue().splitlines() == ["[0:00.0 → 0:01.5] mic speaking",
                                           "phone [0:00.0 → 0:01.5] phone speaking"]


def test_a_live_partial_of_wide_characters_fits_the_terminal_row() -> None:
    """As test_console's 79-column test, with Chinese text (model.language =
    "zh", a multilingual Whisper model): each CJK character takes two columns,
    so a row cut at 79 *characters* wraps onto a second row, and the
    clear-line that redraws the partial leaves the first row on screen."""
    import unicodedata

    def width(text: str) -> int:
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)

    master, slave, drain = _pty(80)
    with open(slave, "w", encoding="utf-8") as tty:
        printer = CaptionPrinter(tty)
        printer(_partial("今天天气很好我们去公园散步吧" * 3, "然后一起吃饭"))
        written = drain()
    os.close(master)
    redraws = [_ANSI.sub("", r) for r in written.split("\r\x1b[J") if r]
    assert max(width(r) for r in redraws) <= 79, [(width(r), r) for r in redraws]


@pytest.mark.parametrize("columns", range(30, 52))
def test_a_live_partial_cut_inside_a_hindi_word_shows_no_mark_without_its_letter(
        columns: int) -> None:
    """A Hindi partial too long for the row loses its start: it was cut
    between a letter and its vowel signs or virama (हूँ, क्योंकि), which then
    began the row after the ellipsis, drawn on it or on a dotted circle.
    They go with their letter; the row still fits."""
    import unicodedata

    master, slave, drain = _pty(columns)
    with open(slave, "w", encoding="utf-8") as tty:
        printer = CaptionPrinter(tty)
        printer(_partial("मैं ठीक हूँ। आप कैसे हैं? मैं office जा रहा हूँ क्योंकि",
                         " मुझे देर हो रही है"))
        written = drain()
    os.close(master)
    rows = [_ANSI.sub("", r) for r in written.split("\r\x1b[J") if r]
    assert rows
    for row in rows:
        words = row.split("] ", 1)[-1].lstrip("\u2026")
        assert words and unicodedata.category(words[0])[0] != "M", row
        assert text_columns(row) <= columns - 1, row


@pytest.mark.parametrize(("flags", "bar"), [((), True), (("-q",), False)],
                         ids=["default", "quiet"])
def test_transcribe_on_a_terminal_draws_its_progress_bar_unless_quiet(
        flags: tuple[str, ...], bar: bool) -> None:
    """``-q`` is "only warnings and errors": the bar is neither. It was drawn
    on a terminal's stderr whatever the flags (only json logging left it out)."""
    master, slave, drain = _pty(100)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evoxtral_stream", "transcribe", "--sample",
             "--no-partials", *flags],
            stdout=subprocess.PIPE, stderr=slave, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 240
        while proc.poll() is None:   # read as it goes: a full pty would block the bar
            assert time.monotonic() < deadline, drain()
            drain()
            time.sleep(0.05)
        out = proc.stdout.read() if proc.stdout else ""
        shown = drain()
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 0, shown
    assert out.count("\n") == 5
    assert ("%|" in shown) is bar, shown
    if not bar:
        assert shown == ""


def test_printable_and_clip_columns_for_a_log_line() -> None:
    assert printable("a\x1b[2Jb\nc\x85d\u00e9") == "a [2Jb c d\u00e9"
    assert clip_columns("short", 5) == "short"
    assert clip_columns("abcdef", 5) == "abcd\u2026"
    # Wide characters take two columns; a mark stays with its letter.
    assert clip_columns("\u4e2d\u6587\u5b57\u5e55", 6) == "\u4e2d\u6587\u2026"
    assert clip_columns("abe\u0301fg", 4) == "abe\u0301\u2026"
    # A Hindi letter and its vowel sign (ि takes a column) stay together.
    assert clip_columns("ab\u0915\u093fx", 4) == "ab\u2026"
    assert all(text_columns(clip_columns("\u4e2dx" * 9, n)) <= n for n in range(1, 30))


#: Bidi controls (embeddings, overrides, isolates, marks) and invisible
#: format characters (zero-width space, word joiner, BOM, soft hyphen, a
#: tag character): each reorders or hides what a terminal shows.
HIDDEN = ("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
          "\u200b\u2060\ufeff\u00ad\U000e0041")


def test_printable_drops_bidi_controls_and_invisible_format_characters() -> None:
    """printable() took control characters only: U+202E (right-to-left
    override) from a model or another server showed the rest of a line
    reversed on a terminal that does bidi, and isolates or a zero-width
    space hid what a line holds (the "Trojan Source" class). Dropped now:
    they take no column, so what was seen stays, in the order it is held."""
    assert printable("refund \u202e0001$\u202c ok") == "refund 0001$ ok"
    assert printable("".join("a" + c for c in HIDDEN)) == "a" * len(HIDDEN)
    # ZWNJ and ZWJ change how visible letters join (Persian, Indic scripts,
    # emoji sequences): kept.
    for kept in ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
                 "\U0001f469\u200d\U0001f4bb", "\u0915\u094d\u200d\u0937"):
        assert printable(kept) == kept


def test_serve_prints_no_bidi_control_of_a_stream_id_or_an_error() -> None:
    """A stream id is the ingest client's choice: one holding U+202E
    reversed serve's caption lines on its terminal after the id."""
    out = io.StringIO()
    printer = CaptionPrinter(out, own="mic", partials=False, live=False)
    printer(CaptionEvent("ph\u202eone", 0, 1, True, "hi", "hi", "hi", "", (), 0.0, 1.5, None))
    printer(StreamError("ph\u202eone", "decode_failed", "RuntimeError: \u2066x\u2069", 1))
    assert out.getvalue().splitlines() == ["phone [0:00.0 → 0:01.5] hi",
                                           "! phone: decode_failed: RuntimeError: x"]


def _no_speech_segment() -> list[CaptionEvent]:
    """The events the real merger makes of a segment Whisper first heard as
    "You", then rated as no speech (``model.whisper.no_speech_threshold``):
    a partial "You", a partial with no text, an empty final."""
    def hyp(revision: int, kind: RequestKind, text: str, end_s: float) -> Hypothesis:
        return Hypothesis("s", 0, revision, kind, text, 0, round(end_s * SAMPLE_RATE),
                          0.0, 0.1)

    merger = Merger("s", final_replaces_stable=True)
    events = [e for h in (hyp(1, RequestKind.PARTIAL, "You", 1.0),
                          hyp(2, RequestKind.PARTIAL, "", 2.0),
                          hyp(3, RequestKind.FINAL, "", 2.5)) for e in merger.feed(h)]
    assert [(e.final, e.text) for e in events] == [(False, "You"), (False, ""), (True, "")]
    return events


def test_a_live_partial_that_loses_its_text_leaves_the_row_empty() -> None:
    """A partial whose segment Whisper then rates as no speech comes with no
    text: the "You" of the partial before stayed on the terminal as if the
    segment still said it, until the segment's (empty) final, seconds later
    for a long noise."""
    master, slave, drain = _pty(80)
    screens = []
    with open(slave, "w", encoding="utf-8") as tty:
        printer = CaptionPrinter(tty)
        for event in _no_speech_segment():
            printer(event)
            screens.append(_screen(drain(), 80))
        printer(CaptionEvent("s", 1, 4, False, "next", "next", "", "next", (), 3.0, 3.5, None))
        screens.append(_screen(drain(), 80))
    os.close(master)
    assert any("You" in row for row in screens[0]), screens[0]
    for screen in screens[1:]:
        assert not any("You" in row for row in screen), screens
    assert [row for row in screens[-1] if row] == ["[0:03.0 → 0:03.5] next"]


def _final(stream: str, n: int, text: str) -> CaptionEvent:
    return CaptionEvent(stream, n, 1, True, text, text, text, "", (), float(n), n + 0.5, None)


def test_a_queued_printer_never_waits_on_a_pipe_nobody_reads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``queued`` (serve's stdout) on a pipe nobody reads: 200 lines of 2 KB
    (six times the pipe) are taken at once; the exit's wait gives up after
    its bounded while; then reading the pipe gives the first lines in order
    and one line counting those dropped."""
    import evoxtral_stream.console as console

    monkeypatch.setattr(console, "PRINT_QUEUE_LINES", 5)
    monkeypatch.setattr(console, "EXIT_WAIT_S", 0.3)
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as out, os.fdopen(read_end, "rb") as reader:
        printer = CaptionPrinter(out, show_stream=True, queued=True)
        words = " ".join(f"w{i}" for i in range(400))
        started = time.monotonic()
        for n in range(200):
            printer(_final("s", n, words))
        printer.flush()
        assert time.monotonic() - started < 5, "the printer waited on the pipe"
        assert printer.error is None
        os.set_blocking(read_end, False)
        data = bytearray()
        deadline = time.monotonic() + 30
        while b"dropped" not in data and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                data += reader.read() or b""
            time.sleep(0.01)
        time.sleep(0.2)
        with contextlib.suppress(BlockingIOError):
            data += reader.read() or b""
    lines = data.decode().splitlines()
    finals = [line for line in lines if line.startswith("s [")]
    assert all(line.endswith(" w399") for line in finals)
    assert [line.split("[", 1)[1].split(" ", 1)[0] for line in finals] == [
        f"0:{n:04.1f}" for n in range(len(finals))], "in order, from the first"
    counts = [re.fullmatch(r"! (\d+) caption lines dropped: standard output's reader "
                           r"fell behind", line) for line in lines if line not in finals]
    assert len(counts) == 1 and counts[0] is not None, lines[len(finals):]
    assert len(finals) + int(counts[0].group(1)) == 200
    assert "dropped" in lines[-1], "where the lines dropped would have been"


def test_a_queued_printer_whose_reader_left_stops_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """Every line in order while the pipe is read; once its reader left,
    the printing stops at the next line with one warning, as a failed
    print does, and the caller never sees the error."""
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as out:
        printer = CaptionPrinter(out, show_stream=True, queued=True)
        for n in range(100):
            printer(_final("s", n, f"line {n}"))
        printer.flush()
        with os.fdopen(read_end, "rb") as reader:
            os.set_blocking(read_end, False)
            lines = reader.read().decode().splitlines()
        assert [line.rsplit(" ", 1)[1] for line in lines] == [str(n) for n in range(100)]
        with caplog.at_level(logging.WARNING, "evoxtral_stream.console"):
            printer(_final("s", 100, "after the reader left"))
            printer.flush()   # the writer met the broken pipe
            for n in range(101, 105):
                printer(_final("s", n, "more"))
    assert isinstance(printer.error, BrokenPipeError)
    warnings = [r.getMessage() for r in caplog.records if "no longer printed" in r.getMessage()]
    assert len(warnings) == 1, warnings


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_queued_printer_whose_last_line_is_lost_says_so_at_its_flush(
        caplog: pytest.LogCaptureFixture) -> None:
    """serve's printing onto a full disk (``> /dev/full``): the writer's
    failure stopped the printing only at the next line, so where none came
    (a file source of one final, the last lines of any run) the lines were
    lost without the warning README promises. The flush at the end now says
    it, once."""
    with open("/dev/full", "w") as out, \
            caplog.at_level(logging.WARNING, "evoxtral_stream.console"):
        printer = CaptionPrinter(out, queued=True)
        printer(_final("s", 0, "the only final"))
        printer.flush()
        printer.flush()
    assert isinstance(printer.error, OSError) and printer.error.errno == errno.ENOSPC
    warnings = [r.getMessage() for r in caplog.records if "no longer printed" in r.getMessage()]
    assert warnings == ["captions are no longer printed: cannot write to the caption output: "
                        "No space left on device"], warnings


def test_a_terminal_whose_encoding_lacks_a_caption_s_characters_gets_them_replaced(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-UTF-8 locale (LC_ALL=en_US.ISO-8859-1) gives stdout a strict
    Latin-1 encoding: the "→" of every caption's time span, and any CJK or
    emoji word, raised UnicodeEncodeError out of the printer, and out of a
    log call from any thread redrawing the partial after its line, which
    ended the run with a traceback. What the encoding lacks is written as
    ASCII marks ("->", "...") or "?" instead."""
    master, slave, drain = _pty(80, "latin-1")
    root = logging.getLogger()
    with open(slave, "w", encoding="latin-1") as tty:   # strict, as Python sets it up
        monkeypatch.setattr(root, "handlers", [])
        written = _partial_log_final(
            tty, drain, _partial("na\u00efve \u4e2d\u6587 ", "\U0001f600 " + "word " * 30),
            lambda: logging.getLogger("evoxtral_stream.test").warning("a line above"),
            _partial("na\u00efve \u4e2d\u6587 \U0001f600", "", final=True))
    os.close(master)
    screen = _screen(written, 80)
    assert "a line above" in " ".join(screen), screen
    assert "[0:00.0 -> 0:09.5] na\u00efve ?? ?" in screen, screen
    redraws = [_ANSI.sub("", r) for r in written.split("\r\x1b[J") if r.startswith("[")]
    assert redraws[0].startswith("[0:00.0 -> 0:09.5] ...") and len(redraws[0]) <= 79, redraws


def test_a_non_utf8_locale_prints_finals_off_a_terminal() -> None:
    """As above, off a terminal (transcribe > file under a Latin-1 locale)."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="latin-1", write_through=True)
    printer = CaptionPrinter(out)
    printer(_partial("caf\u00e9 \u2713", "", final=True))
    assert raw.getvalue().decode("latin-1") == "[0:00.0 -> 0:09.5] caf\u00e9 ?\n"


def test_the_progress_bar_of_audio_not_a_whole_tenth_of_a_second_long_ends_without_a_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundled sample is 25.2036 s long: the bar's total was rounded to
    25.2 s, the audio fed went past it, and tqdm printed "TqdmWarning:
    clamping frac to range [0, 1]" (two lines, with its source path) onto
    the terminal among the captions at the end of every such run."""
    master, slave, drain = _pty(100)
    with open(slave, "w", encoding="utf-8") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        samples = 403_258
        bar = _progress(samples)
        assert bar is not None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(samples // 1600):
                bar.update(1600)
            bar.update(samples % 1600)
            bar.refresh()
            assert bar.format_dict["n"] == bar.format_dict["total"]
            _close_progress(bar)
        drain()
    os.close(master)


def test_the_progress_bar_follows_a_terminal_made_narrower() -> None:
    """The bar took the terminal's width once, at its start: a window made
    narrower mid-run (SIGWINCH) got bars wider than its rows, each wrapping
    onto a second row that the bar's move back up and the partial's redraw
    never cleared, so every update left a row of bar on the screen."""
    master, slave, drain = _pty(100)
    with open(slave, "w", encoding="utf-8") as tty:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "stderr", tty)
            bar = _progress(60 * SAMPLE_RATE)
        assert bar is not None
        bar.update(SAMPLE_RATE)
        bar.refresh()
        before = len(drain())
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
        for _ in range(3):
            bar.update(SAMPLE_RATE)
            bar.refresh()
        written = drain()[before:]
        _close_progress(bar)
    os.close(master)
    bars = [row for row in re.split(r"[\r\n]|\x1b\[A", written) if "%|" in row]
    assert bars and max(text_columns(_ANSI.sub("", row)) for row in bars) <= 40, bars


@pytest.mark.parametrize(("columns", "stream"), [(20, "s"), (16, "s"), (30, "speaker-two"),
                                                 (20, "speaker-two")])
def test_a_live_partial_fits_a_narrow_terminal_s_row_with_its_stream_and_span(
        columns: int, stream: str) -> None:
    """The text was cut to fit the row, the prefix never: on a narrow
    terminal (a split pane, a phone) the stream's name and time span alone
    took more than the row, so every redraw wrapped and left its first rows
    on the screen, and no word was shown. The span goes first, then the
    name is clipped: the newest words keep a row of their own."""
    master, slave, drain = _pty(columns)
    with open(slave, "w", encoding="utf-8") as tty:
        printer = CaptionPrinter(tty, show_stream=True)
        words = ["the", "committee", "met", "on", "Tuesday", "to", "discuss", "the", "budget"]
        for n in range(1, len(words) + 1):
            text = " ".join(words[:n])
            printer(CaptionEvent(stream, 0, 1, False, text, text, " ".join(words[:n - 1]),
                                 " " + words[n - 1], (), 0.0, 9.5, None))
        written = drain()
    os.close(master)
    redraws = [_ANSI.sub("", r) for r in written.split("\r\x1b[J") if r]
    assert max(text_columns(r) for r in redraws) <= columns - 1, redraws
    assert redraws[-1].endswith("budget"), redraws
    assert [row for row in _screen(written, columns) if row] == [redraws[-1].rstrip()]


def test_a_final_of_another_stream_goes_above_the_live_partial_and_keeps_it() -> None:
    """Two streams (transcribe of two files, serve with a client's stream
    beside the microphone): a final or an error of stream a, landing while
    stream b's partial is shown, erased b's partial, which stayed gone
    until b's next partial. Now the line goes above and b's partial is
    drawn again below it; a's own partial is still replaced by its final."""
    master, slave, drain = _pty(80)
    with open(slave, "w", encoding="utf-8") as tty:
        printer = CaptionPrinter(tty, show_stream=True)
        printer(CaptionEvent("a", 0, 1, False, "one", "one", "", "one", (), 0.0, 1.0, None))
        printer(CaptionEvent("b", 0, 1, False, "two", "two", "", "two", (), 0.0, 1.0, None))
        printer(CaptionEvent("a", 0, 2, True, "one done", "one done", "one done", "", (),
                             0.0, 1.5, None))
        printer(StreamError("a", "decode_failed", "RuntimeError: x", 2))
        screen = [row for row in _screen(drain(), 80) if row]
        printer(CaptionEvent("b", 0, 2, True, "two done", "two done", "two done", "", (),
                             0.0, 1.5, None))
        after = [row for row in _screen(drain(), 80) if row]
    os.close(master)
    assert screen == ["a [0:00.0 → 0:01.5] one done", "! a: decode_failed: RuntimeError: x",
                      "b [0:00.0 → 0:01.0] two"], screen
    assert after == [*screen[:2], "b [0:00.0 → 0:01.5] two done"], after


def test_a_dumb_terminal_gets_finals_as_plain_lines_and_no_bar(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``TERM=dumb`` (Emacs' shell buffer, some CI consoles) moves no cursor:
    the partial's redraw, its dim style and the progress bar showed there as
    escape codes and stacked rows. There only finals are printed, as lines,
    and log lines go as they are."""
    monkeypatch.setenv("TERM", "dumb")
    master, slave, drain = _pty(80)
    root = logging.getLogger()
    with open(slave, "w", encoding="utf-8") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        monkeypatch.setattr(root, "handlers", [])   # as at a command's start: no handler yet
        assert _progress(60 * SAMPLE_RATE) is None
        shown = _partial_log_final(
            tty, drain, _partial("the committee ", "met"),
            lambda: logging.getLogger("evoxtral_stream.test").info("a log line"),
            _partial("the committee met on Tuesday.", "", final=True))
    os.close(master)
    assert "\x1b" not in shown, repr(shown)
    assert "met on Tuesday." in shown and "a log line" in shown
    assert "the committee met\r" not in shown and shown.count("committee") == 1, repr(shown)


def test_no_color_keeps_the_redraw_but_not_the_dim_style(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``NO_COLOR`` (no-color.org) set and not empty: the partial's words not
    yet stable are not dimmed; the row is still redrawn in place."""
    monkeypatch.setenv("NO_COLOR", "1")
    master, slave, drain = _pty(80)
    with open(slave, "w", encoding="utf-8") as tty:
        printer = CaptionPrinter(tty)
        printer(_partial("the committee ", "met"))
        shown = drain()
    os.close(master)
    assert "\x1b[2m" not in shown and "\x1b[0m" not in shown, repr(shown)
    assert "\r\x1b[J" in shown and shown.endswith("the committee met"), repr(shown)


def _said(stream: str, text: str, final: bool = False) -> CaptionEvent:
    return CaptionEvent(stream, 0, 1, final, text, text, text if final else "",
                        "" if final else text, (), 0.0, 1.0, None)


def test_each_stream_s_live_partial_has_a_row_of_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two streams speaking at once (a stereo interview split by channel,
    serve with a client's stream beside the microphone) took turns on one
    live row: each partial overwrote the other's, so neither could be read.
    Now each stream's partial keeps a row of its own, in the order they
    came; a log line goes above both, the progress bar below both, and a
    stream's final replaces its row and leaves the other's."""
    columns = 100
    master, slave, drain = _pty(columns)
    root = logging.getLogger()
    with open(slave, "w", encoding="utf-8") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        monkeypatch.setattr(root, "handlers", [])
        handler = configure_logging("text", logging.INFO, stream=tty)
        assert handler is not None
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        bar = _progress(60 * SAMPLE_RATE)
        assert bar is not None
        printer = CaptionPrinter(tty, show_stream=True)
        try:
            printer(_said("left", "so I was"))
            printer(_said("right", "right and"))
            printer(_said("left", "so I was thinking"))
            bar.update(SAMPLE_RATE)
            bar.refresh()
            screen = [row for row in _screen(drain(), columns) if row]
            assert screen[:2] == ["left [0:00.0 → 0:01.0] so I was thinking",
                                  "right [0:00.0 → 0:01.0] right and"], screen
            assert len(screen) == 3 and "%|" in screen[2], screen
            logging.getLogger("evoxtral_stream.test").warning("the model is 2.0 s behind")
            printer(_said("right", "right and then"))
            screen = [row for row in _screen(drain(), columns) if row]
            assert screen == ["WARNING the model is 2.0 s behind",
                              "left [0:00.0 → 0:01.0] so I was thinking",
                              "right [0:00.0 → 0:01.0] right and then"], screen
            printer(_said("left", "so I was thinking maybe.", final=True))
            screen = [row for row in _screen(drain(), columns) if row]
            assert screen == ["WARNING the model is 2.0 s behind",
                              "left [0:00.0 → 0:01.0] so I was thinking maybe.",
                              "right [0:00.0 → 0:01.0] right and then"], screen
            printer(_said("right", "", final=True))   # rated no speech: its row goes
            screen = [row for row in _screen(drain(), columns) if row]
            assert screen == ["WARNING the model is 2.0 s behind",
                              "left [0:00.0 → 0:01.0] so I was thinking maybe."], screen
        finally:
            _close_progress(bar)
            root.removeHandler(handler)
    os.close(master)


def test_a_short_terminal_shows_the_live_rows_that_changed_last() -> None:
    """More streams speaking than a short terminal has rows for: the rows
    whose partials changed last are shown (in their streams' order), so
    the cursor never moves above the screen's top to redraw them."""
    master, slave, drain = _pty(80, lines=5)
    with open(slave, "w", encoding="utf-8") as tty:
        printer = CaptionPrinter(tty, show_stream=True)
        for name in "abcde":
            printer(_said(name, f"{name} speaks"))
        printer(_said("b", "b speaks again"))
        screen = [row for row in _screen(drain(), 80) if row]
        printer(_said("b", "b is done.", final=True))
        after = [row for row in _screen(drain(), 80) if row]
    os.close(master)
    assert [row.split()[0] for row in screen] == ["b", "d", "e"], screen
    assert screen[0].endswith("b speaks again"), screen
    assert [row.split()[0] for row in after] == ["b", "c", "d", "e"], after
    assert after[0].endswith("b is done."), after


def test_a_stream_that_ends_takes_its_live_row_away() -> None:
    """A stream that ended with its partial still on its row (every final
    of it came, or its last partial's segment was rated no speech past the
    partial shown) left the row there for good, under every later line."""
    master, slave, drain = _pty(80)
    with open(slave, "w", encoding="utf-8") as tty:
        printer = CaptionPrinter(tty, show_stream=True)
        printer(_said("a", "one"))
        printer(_said("b", "two"))
        printer(StreamEnded("a", 1.0, 1, 0))
        screen = [row for row in _screen(drain(), 80) if row]
    os.close(master)
    assert screen == ["b [0:00.0 → 0:01.0] two"], screen


def test_an_emoji_shown_as_one_takes_two_columns() -> None:
    """A heart written with VS16 (``❤️``) is drawn two columns wide, but
    was counted one (the heart one, the selector none), so a live partial
    full of them was cut too late and wrapped, and its redraw left rows
    behind; a family (ZWJ sequence) was counted 8 for its 2."""
    heart, family = "\u2764\ufe0f", "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    assert (text_columns(heart), text_columns(family), text_columns("a" + heart)) == (2, 2, 3)
    clipped = clip_columns(heart * 30, 21)
    assert clipped == heart * 10 + "…" and text_columns(clipped) == 21
