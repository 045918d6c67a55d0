"""Log formatting (logs.py): the JSON lines contract, pure; then the root handler."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from evoxtral_stream.logs import (
    HANDLER_NAME,
    TEXT_FORMAT,
    JsonFormatter,
    configure_logging,
    make_formatter,
)
from evoxtral_stream.server.auth import REDACTED, RedactTokens, redact_tokens

RFC3339_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def record(msg: object, *args: object, level: int = logging.INFO, **attrs: Any
           ) -> logging.LogRecord:
    rec = logging.LogRecord("evoxtral_stream.test", level, __file__, 1, msg, args or None, None)
    for k, v in attrs.items():
        setattr(rec, k, v)
    return rec


def one_object(line: str) -> dict[str, Any]:
    assert "\n" not in line and "\r" not in line, line
    assert line.isascii(), line
    obj: dict[str, Any] = json.loads(line)
    return obj


def test_core_keys_and_the_formatted_message() -> None:
    rec = record("caption %s of %d", "seg", 3, level=logging.WARNING)
    rec.created = 1735646400.1239  # 2024-12-31T12:00:00.123Z
    obj = one_object(JsonFormatter().format(rec))
    assert obj == {"ts": "2024-12-31T12:00:00.123Z", "level": "WARNING",
                   "logger": "evoxtral_stream.test", "msg": "caption seg of 3"}


def test_timestamp_is_rfc3339_utc_with_milliseconds() -> None:
    assert RFC3339_MS_UTC.match(one_object(JsonFormatter().format(record("x")))["ts"])


def test_newlines_stay_inside_the_string() -> None:
    obj = one_object(JsonFormatter().format(record("line one\nline two\r\n\u2028end")))
    assert obj["msg"] == "line one\nline two\r\n\u2028end"


def test_exception_info_gives_exc_with_the_traceback() -> None:
    try:
        raise ValueError("bad thing\nsecond line")
    except ValueError:
        rec = record("failed", exc_info=sys.exc_info())
    obj = one_object(JsonFormatter().format(rec))
    assert obj["msg"] == "failed"
    assert obj["exc"].startswith("Traceback (most recent call last):")
    assert obj["exc"].endswith("ValueError: bad thing\nsecond line")
    assert "exc" not in one_object(JsonFormatter().format(record("no exception")))


def test_stack_info_gives_stack() -> None:
    obj = one_object(JsonFormatter().format(record("here", stack_info="Stack (most recent):\n x")))
    assert obj["stack"] == "Stack (most recent):\n x"


class Opaque:
    def __str__(self) -> str:
        return "opaque!"


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_extra_fields_json_values_kept_others_stringified() -> None:
    rec = record("m", stream="talk", seq=7, ratio=0.5, ok=True, none=None,
                 ids=(1, "a"), nested={"k": [1, {"deep": Opaque()}], 3: "int key"},
                 obj=Opaque(), nan=float("nan"), bad=Unprintable())
    obj = one_object(JsonFormatter().format(rec))
    assert obj["stream"] == "talk" and obj["seq"] == 7 and obj["ratio"] == 0.5
    assert obj["ok"] is True and obj["none"] is None and obj["ids"] == [1, "a"]
    assert obj["nested"] == {"k": [1, {"deep": "opaque!"}], "3": "int key"}
    assert obj["obj"] == "opaque!" and obj["nan"] == "nan"
    assert obj["bad"] == "<unprintable Unprintable>"


def test_an_extra_field_never_replaces_a_core_key() -> None:
    obj = one_object(JsonFormatter().format(record("real", level=logging.ERROR,
                                                   ts="fake", level_="x", exc="e")))
    assert obj["level"] == "ERROR" and obj["msg"] == "real"
    assert obj["extra_ts"] == "fake" and obj["extra_exc"] == "e" and obj["level_"] == "x"
    assert RFC3339_MS_UTC.match(obj["ts"])


def test_a_cycle_in_an_extra_field_is_cut() -> None:
    loop: list[object] = [1]
    loop.append(loop)
    obj = one_object(JsonFormatter().format(record("m", loop=loop)))
    assert obj["loop"][0] == 1


@pytest.mark.parametrize("rec", [
    record("%d items", "not a number"),
    record("%s and %s", "only one"),
    record(Unprintable()),
    record("%s", Unprintable()),
])
def test_bad_arguments_still_yield_a_line(rec: logging.LogRecord) -> None:
    obj = one_object(JsonFormatter().format(rec))
    assert obj["level"] == "INFO" and isinstance(obj["msg"], str)


def test_a_record_that_cannot_be_formatted_still_yields_a_line() -> None:
    rec = record("m")
    rec.levelname = Unprintable()  # type: ignore[assignment]
    rec.created = "not a time"  # type: ignore[assignment]
    obj = one_object(JsonFormatter().format(rec))
    assert obj["level"] == "<unprintable Unprintable>"
    assert "could not be formatted" in obj["msg"]


def test_through_a_handler_with_the_redacting_filter() -> None:
    """As the command line sets it up: RedactTokens on the handler, JSON
    formatter with redaction for the extra fields the filter does not see."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter(redact=redact_tokens))
    handler.addFilter(RedactTokens())
    logger = logging.getLogger("test_logs.redact")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        logger.debug("> GET /v1/captions?token=%s HTTP/1.1\n> Authorization: Bearer %s",
                     "s3cr3t-q", "s3cr3t-h")
        try:
            raise OSError("cannot open ws://h/v1/captions?token=s3cr3t-exc")
        except OSError:
            logger.exception("connect failed for %s", "evoxtral.token.s3cr3t-sub")
        logger.info("with extra", extra={"url": "ws://h/?token=s3cr3t-x",
                                         "Authorization": "Bearer s3cr3t-top",
                                         "headers": {"authorization": "Bearer s3cr3t-d",
                                                     "x": ["Bearer not-a-header"]}})
        logger.info("%d bad args", "?token=s3cr3t-args")
    finally:
        logger.removeHandler(handler)
    text = buf.getvalue()
    assert "s3cr3t" not in text, text
    lines = [one_object(line) for line in text.splitlines()]
    assert len(lines) == 4
    assert lines[0]["msg"] == (f"> GET /v1/captions?token={REDACTED} HTTP/1.1\n"
                               f"> Authorization: Bearer {REDACTED}")
    assert lines[1]["msg"] == f"connect failed for evoxtral.token.{REDACTED}"
    assert lines[1]["exc"].endswith(f"OSError: cannot open ws://h/v1/captions?token={REDACTED}")
    assert lines[2]["url"] == f"ws://h/?token={REDACTED}"
    assert lines[2]["Authorization"] == f"Bearer {REDACTED}"
    assert lines[2]["headers"] == {"authorization": f"Bearer {REDACTED}",
                                   "x": ["Bearer not-a-header"]}


def test_make_formatter_text_is_the_historical_format() -> None:
    fmt = make_formatter("text")
    assert fmt.format(record("hello %s", "you")) == "INFO evoxtral_stream.test: hello you"
    assert fmt.format(record("a\nb\tc\r\x1b[2J\x85")) == (
        "INFO evoxtral_stream.test: a\\nb\tc\\r\\x1b[2J\\x85")
    try:
        raise ValueError("two\nlines")
    except ValueError:
        failed = record("x\ny", exc_info=sys.exc_info())
    # The traceback follows on its own lines, as ever.
    assert fmt.format(failed).startswith("INFO evoxtral_stream.test: x\\ny\nTraceback")
    assert TEXT_FORMAT == "%(levelname)s %(name)s: %(message)s"
    assert isinstance(make_formatter("json"), JsonFormatter)
    with pytest.raises(ValueError, match="text, json"):
        make_formatter("xml")


@contextmanager
def bare_root() -> Iterator[logging.Logger]:
    """The root logger without pytest's handlers, restored afterwards."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        yield root
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_configure_owns_one_handler_and_reformats_it() -> None:
    buf = io.StringIO()
    with bare_root() as root:
        handler = configure_logging("text", logging.INFO, stream=buf)
        assert handler is not None and handler.get_name() == HANDLER_NAME
        logging.getLogger("evoxtral_stream.t").info("as text")
        logging.getLogger("evoxtral_stream.t").debug("not shown")
        assert configure_logging("json", logging.DEBUG, stream=io.StringIO()) is handler
        assert root.handlers == [handler] and root.level == logging.DEBUG
        logging.getLogger("evoxtral_stream.t").debug("as json")
    first, second = buf.getvalue().splitlines()
    assert first == "INFO evoxtral_stream.t: as text"
    assert one_object(second)["msg"] == "as json"


def test_configure_leaves_foreign_handlers_alone() -> None:
    foreign = logging.StreamHandler(io.StringIO())
    with bare_root() as root:
        root.addHandler(foreign)
        root.setLevel(logging.ERROR)
        assert configure_logging("json", logging.DEBUG) is None
        assert root.handlers == [foreign] and root.level == logging.ERROR
    assert foreign.formatter is None


def test_json_mode_keeps_stderr_json_for_libraries_and_unraisable_errors() -> None:
    """In a fresh interpreter (the hooks are process-wide): transformers and
    huggingface_hub warnings, a warning, an exception in ``__del__`` and an
    uncaught one all come out as JSON lines, each once."""
    pytest.importorskip("transformers", reason="needs the voxtral extra's transformers")
    program = textwrap.dedent("""
        import logging, warnings
        from evoxtral_stream.logs import configure_logging, install_json_hooks
        configure_logging("json", logging.INFO)
        install_json_hooks()
        import transformers.utils.logging as tl
        tl.get_logger("transformers.generation").warning("pad token set")
        import huggingface_hub.utils.logging as hl
        hl.get_logger("huggingface_hub.file_download").warning("hub says")
        warnings.warn("careful")
        class Dying:
            def __del__(self):
                raise ValueError("boom in del")
        d = Dying(); del d
        raise RuntimeError("the end")
    """)
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [(r["level"], r["logger"]) for r in records] == [
        ("WARNING", "transformers.generation"), ("WARNING", "huggingface_hub.file_download"),
        ("WARNING", "py.warnings"), ("ERROR", "evoxtral_stream"),
        ("CRITICAL", "evoxtral_stream")]
    assert records[0]["msg"] == "pad token set" and records[1]["msg"] == "hub says"
    assert "boom in del" in records[3]["msg"] and "ValueError" in records[3]["exc"]
    assert "RuntimeError: the end" in records[4]["exc"]


def test_text_mode_hooks_redact_uncaught_tracebacks() -> None:
    """In text mode an uncaught exception (what --debug lets through), in the
    main thread or another, was Python's own report, tokens and all, where
    json mode's hooks log it redacted."""
    program = textwrap.dedent("""
        import threading
        from evoxtral_stream.logs import install_text_hooks
        from evoxtral_stream.server.auth import redact_tokens
        install_text_hooks(redact_tokens)
        def fail():
            raise ValueError("ws://h/?token=s3cret-thread")
        t = threading.Thread(target=fail, name="worker"); t.start(); t.join()
        raise RuntimeError("ws://h/?token=s3cret-main")
    """)
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "s3cret" not in proc.stderr, proc.stderr
    assert "Exception in thread worker:" in proc.stderr
    assert "ValueError: ws://h/?token=***" in proc.stderr
    assert proc.stderr.rstrip().endswith("RuntimeError: ws://h/?token=***"), proc.stderr


@pytest.mark.parametrize("argv", [
    ["serve", "--log-format", "json", "--port", "abc"],
    ["--log-format=json", "serve", "--no-such-flag"],
    ["--log-format", "json", "no-such-command"],
])
def test_a_usage_error_under_log_format_json_is_a_json_line(argv: list[str]) -> None:
    """argparse wrote its usage and "error:" line as plain text on stderr
    even with --log-format json, where stderr must be one JSON object per line."""
    proc = subprocess.run([sys.executable, "-m", "evoxtral_stream", *argv],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [r["level"] for r in records] == ["ERROR"], proc.stderr
    assert argv[-1] in records[0]["msg"]


def test_a_usage_error_in_text_mode_is_argparse_s() -> None:
    proc = subprocess.run([sys.executable, "-m", "evoxtral_stream", "serve", "--port", "abc"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: evoxtral-stream serve")
    assert proc.stderr.splitlines()[-1] == (
        "evoxtral-stream serve: error: argument --port: invalid int value: 'abc'")


_SCRIPTED_CLI = r"""
import sys
from evoxtral_stream import cli as cli_module
from tests.fakes import ScriptedBackend, words_so_far
from tests.helpers.model_loader import replace_model_loader
replace_model_loader(lambda cfg: ScriptedBackend(words_so_far))
sys.exit(cli_module.main(sys.argv[1:]))
"""


def scripted_cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
    """The real command line on a scripted backend (no model to load); stderr as bytes."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", _SCRIPTED_CLI, *map(os.fsdecode, args)],
                          capture_output=True, timeout=120, cwd=root,
                          env={**os.environ, "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": f"{root / 'src'}:{root}"})


def unsized_wav(path: Path) -> Path:
    """A WAV whose header says no audio (data size 0) before 1 s of silence:
    reading it logs a warning that names the file."""
    with wave.open(os.fsdecode(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(32000))
    data = bytearray(path.read_bytes())
    at = data.index(b"data")
    data[at + 4:at + 8] = bytes(4)
    path.write_bytes(bytes(data))
    return path


def test_a_text_record_is_one_line_whatever_its_message_holds(tmp_path: Path) -> None:
    """A file name holding a line break (or a carriage return, or a terminal
    escape) made a warning quoting it two lines in text mode, the second a
    forged record ("ERROR evoxtral_stream: ..."): one line per record, the
    controls written as escapes, as the one-line errors write them."""
    wav = unsized_wav(tmp_path / "a\nERROR evoxtral_stream: forged\r\x1b[2J.wav")
    proc = scripted_cli("-q", "transcribe", wav)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.decode().splitlines() == [
        f"WARNING evoxtral_stream.audio.filereader: audio file {tmp_path}/a\\nERROR "
        "evoxtral_stream: forged\\r\\x1b[2J.wav: its WAV header says no audio (a recording "
        "not closed properly?): read to the end of the file, 1.0 s"], proc.stderr


def strict_json(line: bytes) -> dict[str, Any]:
    """``line`` parsed as a strict parser does (Rust's serde_json, in Vector):
    a ``\\uDCFF`` with no surrogate before it is an error there, where
    Python takes it."""
    obj: dict[str, Any] = json.loads(line)

    def check(value: object) -> None:
        if isinstance(value, str):
            value.encode("utf-8")  # a lone surrogate raises
        elif isinstance(value, dict):
            for k, v in value.items():
                check(k)
                check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)

    check(obj)
    return obj


def test_lone_surrogates_are_text_in_every_field() -> None:
    rec = record("m\udcff %s", "a\ud800", path="p\udcfe", table={"k\udc80": "Bearer \udc81"},
                 name="n\udcfd")
    for fmt in (JsonFormatter(), JsonFormatter(redact=redact_tokens)):
        obj = strict_json(fmt.format(rec).encode())
        assert obj["msg"] == "m\\udcff a\\ud800" and obj["path"] == "p\\udcfe"
        assert obj["logger"] == "n\\udcfd"
        assert obj["table"] == {"k\\udc80": "Bearer \\udc81"}
    # A pair of surrogates that Python keeps apart is the same text, not an emoji.
    assert one_object(JsonFormatter().format(record("\ud83d\ude00")))["msg"] == (
        "\\ud83d\\ude00")


def test_a_file_name_that_is_not_utf8_leaves_every_json_line_strict(tmp_path: Path) -> None:
    """A file name with a byte that is not UTF-8 (Python reads it as a lone
    surrogate, U+DCFF) was written as the escape ``\\udcff``, which strict
    parsers (serde_json: "lone leading surrogate in hex escape") refuse, and
    the record was lost to the shipper: it is the text ``\\udcff``, as text
    mode shows it, in the warning and in the one-line error."""
    wav = unsized_wav(Path(os.fsdecode(bytes(tmp_path) + b"/bad\xff.wav")))
    proc = scripted_cli("--log-format", "json", "-q", "transcribe", wav)
    assert proc.returncode == 0, proc.stderr
    records = [strict_json(line) for line in proc.stderr.splitlines()]
    assert [r["msg"] for r in records] == [
        f"audio file {tmp_path}/bad\\udcff.wav: its WAV header says no audio (a recording not "
        "closed properly?): read to the end of the file, 1.0 s"], proc.stderr
    missing = Path(os.fsdecode(bytes(tmp_path) + b"/gone\xfe.wav"))
    proc = scripted_cli("--log-format", "json", "transcribe", missing)
    assert proc.returncode == 2, proc.stderr
    records = [strict_json(line) for line in proc.stderr.splitlines()]
    assert [(r["level"], r["msg"]) for r in records] == [
        ("ERROR", f"audio file {tmp_path}/gone\\udcfe.wav does not exist")], proc.stderr


def stderr_on_a_terminal(script: str, *args: str) -> bytes:
    """What ``python -c script args`` (run from the checkout's root) wrote
    on its stderr, a pseudo-terminal; it must exit 0."""
    root = Path(__file__).resolve().parents[1]
    primary, secondary = os.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary, cwd=root,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{root / 'src'}:{root}"})
        os.close(secondary)
        secondary = -1
        written = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not chunk:
                break
            written += chunk
        assert proc.wait(timeout=120) == 0, written
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    return written


def test_json_lines_on_a_terminal_are_json_lines_too(tmp_path: Path) -> None:
    """stderr a terminal (``docker run -t``, whose output a shipper reads):
    each JSON record came after ``\\r\\x1b[J``, the clearing of a progress bar
    that json mode never draws, so no line parsed. The terminal's ``\\r\\n``
    is its own."""
    wav = unsized_wav(tmp_path / "rec.wav")
    written = stderr_on_a_terminal(_SCRIPTED_CLI, "--log-format", "json", "transcribe", str(wav))
    lines = written.split(b"\r\n")
    assert lines[-1] == b"", written
    records = [strict_json(line) for line in lines[:-1]]
    assert any(r["msg"].startswith("audio file") for r in records), records
    assert records[-1]["msg"].startswith("1 stream(s)"), records


_LOGGED_DURING_A_CATCH = r"""
import logging, threading
from pathlib import Path
from evoxtral_stream.audio.filereader import _PrintCatcher
from evoxtral_stream.logs import configure_logging
configure_logging("text", logging.INFO)
log = logging.getLogger("evoxtral_stream.audio.filereader")
with _PrintCatcher(Path("talk.mp3")).caught():
    other = threading.Thread(target=log.warning, args=("audio file b.flac is damaged",))
    other.start()
    other.join()
log.info("done")
"""


def test_a_record_logged_while_an_mp3_block_decodes_reaches_the_terminal() -> None:
    """An MP3's block decodes on the event loop with descriptor 2 caught
    (libmpg123's prints: DEBUG records); other files decode on worker
    threads meanwhile (run._Steps) and log their damage there. On a
    terminal the records were written to descriptor 2 itself, so one
    logged during a catch was taken for the decoder's: a DEBUG line, not
    shown (seen with transcribe of MP3s and damaged FLACs on a terminal,
    a warning in six lost). The terminal's handler writes to its own copy
    of the descriptor, as the queued one does elsewhere."""
    written = stderr_on_a_terminal(_LOGGED_DURING_A_CATCH).decode()
    assert "WARNING evoxtral_stream.audio.filereader: audio file b.flac is damaged\r\n" in written
    assert written.index("is damaged") < written.index("done"), written
