"""Recorded finals split back into stream sessions (pure), and the
``subtitles`` command on a real journal written by the engine."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import pytest

from evoxtral_stream import outputs
from evoxtral_stream.cli import main
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import CaptionEvent
from evoxtral_stream.server.protocol import ProtocolError, caption_from_dict, caption_to_dict
from evoxtral_stream.text.sessions import SessionSplitter
from tests.engine.test_journal import config, run_stream
from tests.fakes import ScriptedBackend, words_so_far


def final(stream: str, segment: int, seq: int, text: str = "hi") -> CaptionEvent:
    return CaptionEvent(stream=stream, segment=segment, seq=seq, final=True, text=text,
                        plain_text=text, stable=text, unstable="", tags=(),
                        start=float(segment), end=segment + 0.5, latency=0.1)


def shape(splitter: SessionSplitter) -> list[tuple[str, int, list[int], bool]]:
    return [(s.stream, s.number, [f.seq for f in s.finals], s.ended)
            for s in splitter.sessions()]


def test_streams_and_their_ends_make_sessions_in_order() -> None:
    sp = SessionSplitter()
    sp.add_final(final("a", 0, 1))
    sp.add_final(final("b", 0, 1))
    sp.add_final(final("a", 1, 2))
    sp.add_end("a")
    sp.add_final(final("a", 0, 70))      # opened again: the journal numbers on
    assert shape(sp) == [("a", 1, [1, 2], True), ("b", 1, [1], False), ("a", 2, [70], False)]


def test_a_session_cut_by_a_crash_ends_where_the_segments_start_again() -> None:
    sp = SessionSplitter()
    for seg, seq in ((0, 1), (1, 2), (0, 66), (1, 67)):   # no end line between them
        sp.add_final(final("mic", seg, seq))
    assert shape(sp) == [("mic", 1, [1, 2], False), ("mic", 2, [66, 67], False)]


def test_repeats_are_dropped_and_another_numbering_is_another_session() -> None:
    sp = SessionSplitter()
    sp.add_final(final("mic", 0, 1))
    sp.add_final(final("mic", 1, 2))
    sp.add_end("mic")
    sp.add_final(final("mic", 1, 2))     # a resume replays the last final, and the end
    sp.add_end("mic")
    sp.add_final(final("mic", 0, 1, "other run"))   # a second recording, numbered from 1
    assert sp.repeats == 1
    assert shape(sp) == [("mic", 1, [1, 2], True), ("mic", 2, [1], False)]
    with pytest.raises(ValueError, match="final"):
        sp.add_final(CaptionEvent(**{**final("mic", 3, 9).__dict__, "final": False}))


def test_caption_messages_decode_back_to_the_event() -> None:
    event = final("mic", 2, 5, "[laughs] so it goes")
    assert caption_from_dict(caption_to_dict(event)) == event
    bare = {"type": "caption", "stream": "s", "segment": 0, "seq": 1, "final": True,
            "text": "[sighs] well.", "start": 0, "end": 1}
    decoded = caption_from_dict(bare)
    assert decoded.plain_text == "well." and decoded.tags == () and decoded.latency is None
    for broken in ({**bare, "seq": "1"}, {**bare, "final": 1}, {**bare, "type": "gap"},
                   {k: v for k, v in bare.items() if k != "end"},
                   # Not a time: a subtitle writer failed on them with a traceback.
                   {**bare, "end": float("inf")}, {**bare, "start": float("nan")},
                   {**bare, "end": 10 ** 400},
                   {**bare, "tags": [{"tag": "sighs"}]}):
        with pytest.raises(ProtocolError):
            caption_from_dict(broken)


async def test_subtitles_from_the_journal_of_a_live_server(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """Two sessions of "talk" and one of "desk", journaled by the engine as
    it serves them, become three subtitle files with their own times."""
    cfg = config(tmp_path)
    async with Engine(cfg, ScriptedBackend(words_so_far)) as engine:
        await run_stream(engine, "talk", 2)
        await run_stream(engine, "desk", 1)
        await run_stream(engine, "talk", 3)
    journal = tmp_path / "j"
    # A line cut short by a crash at the end of a file is skipped, not fatal.
    with next(journal.glob("desk.*")).open("a") as f:
        f.write('{"type":"caption","stream":"desk"')
    out = tmp_path / "subs"
    assert main(["subtitles", str(journal), "--srt", f"{out}/", "--text", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "desk.srt", "desk.txt", "talk.1.srt", "talk.1.txt", "talk.2.srt", "talk.2.txt"]
    first, second = (out / "talk.1.srt").read_text(), (out / "talk.2.srt").read_text()
    assert first.count(" --> ") == 2 and second.count(" --> ") == 3
    # Each session's times are its own: both begin near 0.
    assert first.split("\n")[1].startswith("00:00:0") and second.split("\n")[1].startswith(
        "00:00:0")
    assert (out / "desk.txt").read_text() == "w0 w1\n"       # a second of speech
    assert "1 line(s) that are not protocol messages skipped" in caplog.text
    # One stream to stdout.
    assert main(["subtitles", str(journal), "--stream", "desk"]) == 0
    assert capsys.readouterr().out == "w0 w1\n"


def test_subtitles_from_a_transcribe_jsonl_file_with_partials(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = [
        {"type": "stream.started", "stream": "talk", "source": "file"},
        {**caption_to_dict(final("talk", 0, 1, "[laughs] Hello")), "final": False},
        caption_to_dict(final("talk", 0, 2, "[laughs] Hello there.")),
        caption_to_dict(final("talk", 1, 3, "Bye.")),
        {"type": "stream.ended", "stream": "talk", "duration": 1.7, "segments": 2,
         "finals": 2},
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    srt = tmp_path / "talk.srt"
    assert main(["subtitles", str(path), "--srt", str(srt), "--set",
                 'captions.srt_tags="strip"']) == 0
    # The partial is not a cue; tags stripped as asked; captions.min_cue_s
    # holds, up to the end of the audio that stream.ended gives.
    assert srt.read_text() == ("1\n00:00:00,000 --> 00:00:00,833\nHello there.\n\n"
                               "2\n00:00:01,000 --> 00:00:01,700\nBye.\n")


@pytest.mark.parametrize(("argv", "message"), [
    (["missing.jsonl"], "missing.jsonl does not exist"),
    (["{empty}"], "a folder without .jsonl files"),
    (["{events}", "--stream", "nobody"], "no final captions of stream 'nobody'"),
    (["{events}", "--srt", "{events}/x/y.srt"], "the folder"),
    # It used to say "is one of the audio files" of the recording.
    (["{events}", "--text", "{events}"], "is one of the recordings: it would be overwritten"),
    # Nor through the .part file a subtitle is written to before it is renamed.
    (["{staged}", "--srt", "{srt}"], "talk.srt.part is one of the recordings: it would be"),
])
def test_subtitles_errors_are_one_line(argv: list[str], message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(caption_to_dict(final("talk", 0, 1))) + "\n")
    (tmp_path / "talk.srt.part").write_bytes(events.read_bytes())
    argv = [a.format(empty=tmp_path / "empty", events=events, staged=tmp_path / "talk.srt.part",
                     srt=tmp_path / "talk.srt") for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main(["subtitles", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_subtitles_that_write_nothing_leave_no_folder_they_made(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Output folders are made before the files are written: a refusal found
    after (two flags onto one file) or files that cannot be written (a
    folder the user may not write in, a full inode table) left the folders
    it had made, empty. Now they go, as transcribe's do; one that was
    there stays."""
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(caption_to_dict(final("talk", 0, 1))) + "\n")
    new, had = tmp_path / "new", tmp_path / "had"
    had.mkdir()

    def run(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            main(["subtitles", str(events), *argv])
        assert exit_.value.code == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        return line

    line = run("--srt", f"{new}/subs/", "--vtt", f"{new}/subs/talk.srt")
    assert "--srt and --vtt would both write" in line, line
    assert not new.exists()

    def refused(path: Path) -> BinaryIO:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    # Each file is created as a .part file first: that is what is refused.
    monkeypatch.setattr(outputs, "_create", refused)
    line = run("--srt", f"{new}/subs/", "--text", f"{had}/")
    assert "cannot write" in line and "Permission denied" in line, line
    assert not new.exists()
    assert had.is_dir()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_subtitles_printed_to_a_stdout_that_takes_nothing_are_one_line_and_status_two(
        tmp_path: Path) -> None:
    """The text printed to a full disk (or a pipe whose reader left, as
    ``| head`` does): one error line and status 2, as transcribe does. It
    used to end with a BrokenPipeError (or OSError) traceback and status 1."""
    import os
    import subprocess
    import sys

    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(caption_to_dict(final(f"s{n}", 0, 1))) + "\n"
                              for n in range(3)))
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "evoxtral_stream", "subtitles",
                               str(events)], stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("evoxtral-stream: error")]
    assert errors == ["evoxtral-stream: error: cannot write the text to standard output: "
                      "No space left on device"], proc.stderr



@pytest.mark.parametrize("flag", ["--srt", "--text"])
def test_subtitles_into_standard_output_appended_to_a_file_keep_what_it_held(
        tmp_path: Path, flag: str) -> None:
    """``subtitles REC --srt - >> all.srt``: ``-`` is standard output, so the
    file stdout is appended to keeps what it held and gets the output after
    it. It was written to ``all.srt.part`` and renamed over the file (what
    it held gone, and what the shell wrote to it after, into the old one)."""
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(caption_to_dict(final("talk", n, n + 1, f"s{n}")))
                              + "\n" for n in range(3)))
    log = tmp_path / "all.txt"
    log.write_text("held before\n")
    with open(log, "a") as out:
        proc = subprocess.run([sys.executable, "-m", "evoxtral_stream", "-q", "subtitles",
                               str(events), flag, "-"], stdout=out, stderr=subprocess.PIPE,
                              text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    assert text.startswith("held before\n") and "s0" in text and "s2" in text, text
    assert not list(tmp_path.glob("*.part"))


def test_subtitles_printed_into_head_stop_quietly_with_status_141(tmp_path: Path) -> None:
    """``subtitles RECORDING | head -1``: the reader leaving ends the command
    with nothing on stderr and status 141 (128 + SIGPIPE). It used to be an
    error line and status 2, where ``| head`` is no error."""
    import subprocess
    import sys

    events = tmp_path / "events.jsonl"
    # More text than a pipe holds: printing meets the closed pipe.
    events.write_text("".join(json.dumps(caption_to_dict(final(f"s{n}", 0, 1, "word " * 40)))
                              + "\n" for n in range(2000)))
    proc = subprocess.Popen([sys.executable, "-m", "evoxtral_stream", "subtitles", str(events)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline() == "== s0 ==\n"
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, err) == (141, "")


def test_each_session_gets_a_file_of_its_own_beside_a_stream_named_like_a_session(
        tmp_path: Path) -> None:
    """"talk" opened twice beside a stream called "talk.1": three files, each
    with its own captions. The first session of "talk" and the stream
    "talk.1" both used to be written to talk.1.txt, the later one over the
    other: a session's captions lost without a word."""
    ended = {"type": "stream.ended", "stream": "talk", "duration": 2.0}
    events = [caption_to_dict(final("talk", 0, 1, "first opening of talk")), ended,
              caption_to_dict(final("talk", 0, 2, "second opening of talk")),
              caption_to_dict(final("talk.1", 0, 1, "the stream called talk.1"))]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    out = tmp_path / "out"
    assert main(["subtitles", str(path), "--text", f"{out}/"]) == 0
    texts = {p.name: p.read_text() for p in out.iterdir()}
    assert texts == {"talk.1-2.txt": "first opening of talk\n",
                     "talk.2.txt": "second opening of talk\n",
                     "talk.1.txt": "the stream called talk.1\n"}


def test_a_resume_that_replays_an_earlier_session_adds_no_session() -> None:
    """A subscriber that resumed with ``since`` before the stream was opened
    again is replayed both sessions' finals: each is a repeat. The replay of
    the first session used to make a third session, and that of the second
    a fourth: every caption twice in the subtitles."""
    sp = SessionSplitter()
    first = [final("talk", 0, 1), final("talk", 1, 2)]
    second = [final("talk", 0, 70, "again"), final("talk", 1, 71, "and again")]
    for event in first:
        sp.add_final(event)
    sp.add_end("talk")
    for event in second:
        sp.add_final(event)
    for event in (*first, *second):     # the replay of a resume with since=talk:0
        sp.add_final(event)
    sp.add_final(final("talk", 2, 72, "live again"))
    assert sp.repeats == 4
    assert shape(sp) == [("talk", 1, [1, 2], True), ("talk", 2, [70, 71, 72], False)]
    # The same seq, segment and text at other times is another recording's.
    sp.add_final(dataclasses.replace(final("talk", 0, 1), start=5.0, end=6.0))
    assert shape(sp)[-1] == ("talk", 3, [1], False)


def test_a_rerun_that_captions_alike_is_a_session_of_its_own() -> None:
    """The same audio served twice by a server without its journal (seqs
    from 1 again) gives the same captions at the same times, but each with
    the latency of its run: a second session, not a replay of the first
    (whose repeats carry the very message, latency included). It was
    dropped as repeats, the second run's captions lost."""
    sp = SessionSplitter()
    sp.add_final(final("talk", 0, 1, "hello"))
    sp.add_end("talk")
    sp.add_final(dataclasses.replace(final("talk", 0, 1, "hello"), latency=0.3))
    assert sp.repeats == 0
    assert shape(sp) == [("talk", 1, [1], True), ("talk", 2, [1], False)]


def test_recorded_lines_with_times_that_are_no_times_are_skipped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """JSON takes NaN, Infinity and integers too large for a float: such a
    caption is a damaged line, such a stream.ended duration unknown. Each
    used to end subtitles with a traceback (ValueError, OverflowError)."""
    good = caption_to_dict(final("talk", 0, 1, "kept"))
    lines = [json.dumps({**good, "segment": 1, "seq": 2, "end": float("inf")}),
             json.dumps({**good, "segment": 2, "seq": 3, "start": 10 ** 400}),
             json.dumps(good),
             json.dumps({"type": "stream.ended", "stream": "talk", "duration": 10 ** 400})]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    srt = tmp_path / "talk.srt"
    assert main(["subtitles", str(path), "--srt", str(srt)]) == 0
    assert srt.read_text() == "1\n00:00:00,000 --> 00:00:00,833\nkept\n"
    assert "2 line(s) that are not protocol messages skipped (line 1, ...)" in caplog.text


def test_subtitles_are_named_as_transcribe_names_them(
        tmp_path: Path) -> None:
    """``transcribe café.wav --jsonl`` makes stream "café", whose SRT
    transcribe writes as café.srt: subtitles of that --jsonl writes the same
    name (it wrote caf%C3%A9.srt; and talk%20%282%29.srt for "talk (2)").
    What a file name cannot hold ("/", or ":" on Windows) is still escaped,
    and "%" with it, so no two streams share a name."""
    events = [caption_to_dict(final(stream, 0, 1, stream))
              for stream in ("café", "x/y.z", "x%2Fy.z", "日本", "talk (2)", "a:b")]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events))
    out = tmp_path / "out"
    assert main(["subtitles", str(path), "--text", f"{out}/"]) == 0
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "café.txt": "café\n", "x%2Fy.z.txt": "x/y.z\n", "x%252Fy.z.txt": "x%2Fy.z\n",
        "日本.txt": "日本\n", "talk (2).txt": "talk (2)\n", "a%3Ab.txt": "a:b\n"}


def test_a_stream_picked_that_the_recording_lacks_is_said(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """``--stream talk --stream tlak``: talk's text, and a warning that tlak
    has no captions (it used to be left out without a word, as if it had
    been there and said nothing)."""
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(caption_to_dict(final("talk", 0, 1, "hello"))) + "\n")
    assert main(["subtitles", str(path), "--stream", "talk", "--stream", "tlak"]) == 0
    assert capsys.readouterr().out == "hello\n"
    assert "no final captions of stream 'tlak' in 1 recording file(s)" in caplog.text


def test_a_latency_or_tag_time_too_large_for_a_float_is_a_damaged_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """caption_from_dict promises ProtocolError for a field of the wrong
    type, and start/end 10**400 were fixed to be skipped as damaged lines
    (test_recorded_lines_with_times_that_are_no_times_are_skipped); the
    same integer as ``latency`` or a tag's ``t`` still ends ``subtitles``
    with an OverflowError traceback."""
    good = caption_to_dict(final("talk", 0, 1, "kept"))
    lines = [json.dumps({**good, "segment": 1, "seq": 2, "latency": 10 ** 400}),
             json.dumps({**good, "segment": 2, "seq": 3, "tags": [
                 {"tag": "laughs", "kind": "non-verbal", "index": 0, "t": 10 ** 400}]}),
             json.dumps(good)]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    srt = tmp_path / "talk.srt"
    with caplog.at_level(logging.WARNING):
        assert main(["subtitles", str(path), "--srt", str(srt)]) == 0
    assert srt.read_text() == "1\n00:00:00,000 --> 00:00:00,833\nkept\n"
    assert "2 line(s) that are not protocol messages skipped" in caplog.text


def test_a_line_nested_deeper_than_python_reads_is_a_damaged_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """json.loads raises RecursionError, not ValueError, for JSON nested
    past the interpreter's limit: such a line (damage, or a log holding
    some other program's output) ended ``subtitles`` with a traceback
    instead of being skipped as the other damaged lines are."""
    good = caption_to_dict(final("talk", 0, 1, "kept"))
    lines = ["[" * 100_000,
             '{"type": "caption", "final": true, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
             json.dumps(good)]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    srt = tmp_path / "talk.srt"
    with caplog.at_level(logging.WARNING):
        assert main(["subtitles", str(path), "--srt", str(srt)]) == 0
    assert srt.read_text() == "1\n00:00:00,000 --> 00:00:00,833\nkept\n"
    assert "2 line(s) that are not protocol messages skipped" in caplog.text


@pytest.mark.parametrize("odd", ["a\x00b", "x" * 300])
def test_an_odd_stream_id_in_a_recording_is_one_error_line(
        odd: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A recording is any log of protocol messages: a stream id the engine
    would refuse (a NUL, a name no file system holds) must give one error
    line and status 2, not a ValueError/OSError traceback from
    _prepare_outputs (path.resolve() / path.is_dir())."""
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(caption_to_dict(final(s, 0, 1))) + "\n"
                            for s in (odd, "talk")))
    with pytest.raises(SystemExit) as exit_:
        main(["subtitles", str(path), "--srt", f"{tmp_path / 'out'}/"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evoxtral-stream: error:"), err


def test_a_repeat_of_an_earlier_numbering_is_dropped_after_a_later_one_reused_its_seq(
) -> None:
    """Two logs of the same server across a restart without its journal
    (seqs from 1 again): the second log repeats every final of the first.
    The contract drops a repeat of a final of *any* of the stream's sessions."""
    run_a = [final("talk", 0, 1, "first run"), final("talk", 1, 2, "first run too")]
    run_b = [final("talk", 0, 1, "second run"), final("talk", 1, 2, "second run too")]
    sp = SessionSplitter()
    for _ in ("log1.jsonl", "log2.jsonl"):   # subtitles log1.jsonl log2.jsonl
        for event in run_a:
            sp.add_final(event)
        sp.add_end("talk")
        for event in run_b:
            sp.add_final(event)
        sp.add_end("talk")
    assert sp.repeats == 4
    assert shape(sp) == [("talk", 1, [1, 2], True), ("talk", 2, [1, 2], True)]


def test_a_caption_with_a_lone_surrogate_is_a_damaged_line_not_a_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """json.loads takes the escape "\\ud800" (a lone surrogate, no character);
    no UTF-8 file can hold it. The recording line should be skipped as not a
    protocol message, not crash `subtitles` with a UnicodeEncodeError."""
    bad = {**caption_to_dict(final("talk", 0, 1, "x")), "text": "Hi \ud800 there"}
    good = caption_to_dict(final("talk", 1, 2, "kept"))
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(bad) + "\n" + json.dumps(good) + "\n")  # ASCII: \ud800 escaped
    srt = tmp_path / "talk.srt"
    assert main(["subtitles", str(path), "--srt", str(srt)]) == 0
    assert "kept" in srt.read_text()


def test_caption_from_dict_refuses_a_lone_surrogate() -> None:
    obj = json.loads('{"type":"caption","stream":"talk","segment":0,"seq":1,"final":true,'
                     '"text":"Hi \\ud800","start":0,"end":1,"latency":null}')
    with pytest.raises(ProtocolError):
        caption_from_dict(obj)


def test_subtitles_cut_short_by_a_full_disk_leave_the_old_files_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A disk that fills up partway through the SRT: one error line, status
    2, the SRT and text files there before untouched, no file made where
    there was none, no .part left. They were written in place: the old
    files were emptied and left cut short, under the names a user then
    publishes. (The disk fills at a file size limit, for real: a full disk
    cuts a write short and refuses the next one just so.)"""
    from tests.helpers.disk import disk_full_after

    events = [caption_to_dict(final("talk", n, n + 1, f"sentence number {n} of the talk"))
              for n in range(6)]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    srt, text, vtt = tmp_path / "talk.srt", tmp_path / "talk.txt", tmp_path / "talk.vtt"
    srt.write_text("1\n00:00:00,000 --> 00:00:01,000\nthe old subtitles\n")
    text.write_text("the old text\n")
    with disk_full_after(100), pytest.raises(SystemExit) as exit_:
        main(["subtitles", str(path), "--srt", str(srt), "--text", str(text),
              "--vtt", str(vtt)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"evoxtral-stream: error: cannot write {srt}: File too large"], err
    assert srt.read_text() == "1\n00:00:00,000 --> 00:00:01,000\nthe old subtitles\n"
    assert text.read_text() == "the old text\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "talk.srt",
                                                          "talk.txt"]
    # With room on the disk, each is replaced whole.
    assert main(["subtitles", str(path), "--srt", str(srt), "--text", str(text),
                 "--vtt", str(vtt)]) == 0
    assert srt.read_text().count(" --> ") == 6 and vtt.read_text().startswith("WEBVTT")
    assert text.read_text().startswith("sentence number 0 of the talk")


def _subtitles_process(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "evoxtral_stream", "subtitles", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(root / "src")})


@pytest.mark.parametrize("flag", ["--srt", "--vtt", "--text"])
def test_subtitles_to_dash_go_to_stdout(tmp_path: Path, flag: str) -> None:
    """``subtitles events.jsonl --srt -`` writes the subtitles to stdout, as
    ``-`` for the audio is stdin (it wrote a file named ``-``); several
    sessions, which need a folder, are refused in one line before any is
    written."""
    events = [caption_to_dict(final("talk", 0, 1, "Hello there.")),
              caption_to_dict(final("talk", 1, 2, "Bye."))]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    proc = _subtitles_process(tmp_path, str(path), flag, "-")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "-").exists()
    assert "Hello there." in proc.stdout and "Bye." in proc.stdout
    assert (" --> " in proc.stdout) == (flag != "--text"), proc.stdout
    with path.open("a") as f:
        f.write(json.dumps(caption_to_dict(final("desk", 0, 1, "Other."))) + "\n")
    proc = _subtitles_process(tmp_path, str(path), flag, "-")
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "standard output" in errors[0] and "2 sessions" in errors[0], errors
    assert proc.stdout == "" and not (tmp_path / "-").exists()
