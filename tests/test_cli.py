"""The command line, run as a user would: real process, real files."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from evoxtral_stream.audio.resample import resample
from evoxtral_stream.audio.sources import read_audio_file
from evoxtral_stream.cli.parser import _load_config
from evoxtral_stream.cli.serve import _serve
from evoxtral_stream.cli.transcribe import _p95
from evoxtral_stream.data import sample_path, sample_text
from evoxtral_stream.events import SAMPLE_RATE
from evoxtral_stream.server.auth import hash_token
from tests.fakes import ScriptedBackend, words_so_far
from tests.helpers.http import free_port
from tests.speech import have_espeak, speak
from tests.text_norm import loose_wer


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evoxtral_stream", *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("evoxtral-stream: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_transcribe_sample_prints_the_words_and_writes_outputs(tmp_path: Path) -> None:
    srt, vtt, jsonl = tmp_path / "s.srt", tmp_path / "s.vtt", tmp_path / "s.jsonl"
    proc = cli("transcribe", "--sample", "--srt", str(srt), "--vtt", str(vtt),
               "--jsonl", str(jsonl))
    assert proc.returncode == 0, proc.stderr
    reference = sample_text()
    printed = " ".join(line.split("] ", 1)[1] for line in proc.stdout.splitlines() if "] " in line)
    assert loose_wer(reference, printed) <= 0.15, proc.stdout
    assert srt.read_text().startswith("1\n00:00:")
    assert vtt.read_text().startswith("WEBVTT")
    events = [json.loads(line) for line in jsonl.read_text().splitlines()]
    finals = [e.get("final") for e in events if e["type"] == "caption"]
    assert False in finals
    assert finals.count(True) == 5
    assert "5 finals" in proc.stderr


def test_the_summary_p95_is_the_nearest_rank() -> None:
    """Of 20 latencies the 95th percentile is the 19th, not the largest (the
    summary took index int(0.95 n), one past the rank whenever 0.95 n is whole)."""
    assert _p95([float(i) for i in range(1, 21)]) == 19.0
    assert _p95([float(i) for i in range(100, 0, -1)]) == 95.0
    assert _p95([float(i) for i in range(1, 22)]) == 20.0   # 19.95: the 20th
    assert _p95([0.3]) == 0.3
    assert _p95([]) != _p95([])   # NaN: no finals


def test_bad_config_value_names_key_and_value() -> None:
    one_error_line(cli("transcribe", "--sample", "--set", "vad.aggressiveness=7"),
                   "vad.aggressiveness must be 0..3, got 7")


def test_unknown_config_key_and_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[vad]\nagressiveness = 1\n")
    one_error_line(cli("transcribe", "--sample", "--config", str(bad)), "vad.agressiveness")
    broken = tmp_path / "broken.toml"
    broken.write_text("[vad\n")
    one_error_line(cli("transcribe", "--sample", "--config", str(broken)), "not valid TOML")
    one_error_line(cli("transcribe", "--sample", env={"EVOXTRAL_CONFIG": str(bad)}),
                   "vad.agressiveness")


def test_unreadable_empty_and_missing_audio(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all" * 10)
    one_error_line(cli("transcribe", str(garbage)), "garbage.wav")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.int16), 16000)
    one_error_line(cli("transcribe", str(empty)), "empty.wav")
    one_error_line(cli("transcribe", str(tmp_path / "missing.flac")), "missing.flac")
    # Named together, each is named: a batch is mended in one go, not a file a try.
    proc = cli("transcribe", str(garbage), str(empty), str(tmp_path / "missing.flac"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("evoxtral-stream: error:")]
    assert [n for ln in lines for n in ("garbage.wav", "empty.wav", "missing.flac")
            if n in ln] == ["garbage.wav", "empty.wav", "missing.flac"], proc.stderr


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox is not installed")
def test_transcribe_checks_its_files_before_the_model_without_decoding_them(
        tmp_path: Path) -> None:
    """Two 5-minute 48 kHz stereo files, both channels asked for apart and
    mixed: transcribe checks every file before the model loads, and holds
    none of their audio then (it decoded every file of the batch whole
    first, one array per mix: 29 MB here, 115 MB per audio-hour a mix); a
    file is decoded as it is fed (tests/test_run.py)."""
    import tracemalloc

    from evoxtral_stream.cli.transcribe import _read_files

    paths = [tmp_path / "a.wav", tmp_path / "b.wav"]
    for path in paths:
        subprocess.run(["sox", "-n", "-r", "48000", "-c", "2", "-b", "16", str(path),
                        "synth", "300", "whitenoise", "vol", "0.1"], check=True)
    mixes = [(1,), (2,), ()]
    whole = len(paths) * len(mixes) * 300 * SAMPLE_RATE * 2
    tracemalloc.start()
    try:
        with contextlib.ExitStack() as stack:
            files = _read_files(paths, mixes, stack)
            _, peak = tracemalloc.get_traced_memory()
            assert [f.samples for f in files] == [300 * SAMPLE_RATE] * 2
    finally:
        tracemalloc.stop()
    assert peak < whole / 20, f"peak {peak / 1e6:.1f} MB for {whole / 1e6:.1f} MB of audio"


def test_the_progress_bar_takes_a_length_no_header_says_or_audio_past_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The bar's total is what the files' headers say: none where one says
    no length (it counts the seconds read), and raised to the count where
    the audio runs past a header's estimate (tqdm warns onto the terminal
    past its total)."""
    from evoxtral_stream.cli import transcribe

    monkeypatch.setattr(transcribe, "redraws", lambda stream: True)
    bar = transcribe._progress(None)
    bar.update(3 * SAMPLE_RATE)
    assert bar.n == 3 * SAMPLE_RATE and bar.total is None and str(bar) == "3 s"
    transcribe._close_progress(bar)
    bar = transcribe._progress(SAMPLE_RATE)
    for _ in range(3):
        bar.update(SAMPLE_RATE * 3 // 4)
    assert bar.n == bar.total == SAMPLE_RATE * 9 // 4 and str(bar).endswith("| 2/2 s")
    transcribe._close_progress(bar)
    err = capsys.readouterr().err
    assert "clamping" not in err and "Traceback" not in err, err


def _open_files_limit(soft: int, hard: int | None = None) -> Any:
    """A ``preexec_fn`` that sets the child's RLIMIT_NOFILE (``hard``: None
    leaves the hard limit as it is)."""
    def limit() -> None:
        import resource

        _, old_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old_hard if hard is None else hard))
    return limit


def _transcribe_limited(limit: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evoxtral_stream", "transcribe", *args],
        capture_output=True, text=True, timeout=240, preexec_fn=limit,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.skipif(sys.platform == "win32" or not have_espeak(),
                    reason="no RLIMIT_NOFILE here, or espeak-ng is not installed")
def test_transcribe_raises_a_low_open_files_limit_for_its_files(tmp_path: Path) -> None:
    """60 clips of 0.3 s (the last one speech) with --srt, under a soft limit
    of 48 open files: every file is fed at once, each holding its file and
    its SRT open, so a batch of a few hundred ran out of the usual 1024 (each
    file past it one error line, its stream without its audio). transcribe
    raises the soft limit towards the hard one: every file's stream, output
    and the words spoken."""
    paths = [tmp_path / f"clip{i:02d}.wav" for i in range(60)]
    for path in paths[:-1]:
        sf.write(path, np.zeros(4800, np.int16), SAMPLE_RATE)
    quiet = np.zeros(SAMPLE_RATE // 4, np.int16)
    sf.write(paths[-1], np.concatenate([quiet, speak("Good morning everyone."), quiet]),
             SAMPLE_RATE)
    out, jsonl = tmp_path / "out", tmp_path / "e.jsonl"
    proc = _transcribe_limited(_open_files_limit(48), *map(str, paths), "--srt", str(out),
                               "--jsonl", str(jsonl), "--no-partials")
    assert proc.returncode == 0 and "ERROR" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"{p.stem}.srt" for p in paths]
    finals, ended = _by_stream(jsonl)
    assert ended == {p.stem: pytest.approx(0.3, abs=0.01) for p in paths[:-1]} | {
        paths[-1].stem: pytest.approx(ended[paths[-1].stem], abs=0)}
    assert ended[paths[-1].stem] > 1.0
    assert list(finals) == [paths[-1].stem], finals
    assert "morning" in (out / f"{paths[-1].stem}.srt").read_text().lower()


@pytest.mark.skipif(sys.platform == "win32", reason="no RLIMIT_NOFILE here")
def test_transcribe_refuses_more_files_than_the_hard_open_files_limit(tmp_path: Path) -> None:
    """Where even the hard limit is too low for the files, transcribe says
    so in one line before the model loads (each file past it lost its
    audio, status 1)."""
    paths = [tmp_path / f"clip{i:02d}.wav" for i in range(60)]
    for path in paths:
        sf.write(path, np.zeros(4800, np.int16), SAMPLE_RATE)
    proc = _transcribe_limited(_open_files_limit(48, 48), *map(str, paths))
    one_error_line(proc, "60 file(s) need about", "hard limit of 48 open files", "ulimit -n",
                          "fewer files at a time")
    assert "backend:" not in proc.stderr, proc.stderr


def _speech_file(path: Path, text: str, rate: int, channels: int, **fmt: str) -> None:
    x = resample(speak(text).astype(np.float32) / 32768, SAMPLE_RATE, rate)
    sf.write(path, np.stack([x] * channels, axis=1), rate, **fmt)


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed")
def test_odd_and_damaged_files_in_one_transcribe(tmp_path: Path) -> None:
    """Real speech in odd files through the CLI and the embedded Whisper:
    a 96 kHz stereo float WAV, a 22 kHz six-channel OGG and a FLAC cut
    short each get their captions, the cut one with one warning naming it
    (it was refused whole: "flac decoder lost sync"); stderr holds JSON
    records only. With a WAV whose header is damaged among them, nothing is
    decoded: one error line naming it, no traceback, none of libmpg123's
    notes it printed on stderr."""
    good = tmp_path / "good.wav"
    _speech_file(good, "Please call me back when you get home tonight.", 96000, 2,
                 subtype="FLOAT")
    wide = tmp_path / "wide.ogg"
    _speech_file(wide, "Seven red boats sailed past the old stone harbour.", 22050, 6,
                 format="OGG", subtype="VORBIS")
    cut = tmp_path / "cut.flac"
    _speech_file(tmp_path / "whole.flac", "The quick brown fox jumps over the lazy dog. "
                 "The weather today is sunny.", 44100, 1)
    data = (tmp_path / "whole.flac").read_bytes()
    cut.write_bytes(data[: len(data) * 3 // 5])
    jsonl = tmp_path / "e.jsonl"
    proc = cli("transcribe", str(good), str(wide), str(cut), "--jsonl", str(jsonl),
               "--log-format", "json")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]  # JSON only
    warnings = [r["msg"] for r in records if r["level"] == "WARNING"]
    assert len(warnings) == 1 and "cut.flac" in warnings[0] and "damaged" in warnings[0]
    finals: dict[str, str] = {}
    for e in map(json.loads, jsonl.read_text().splitlines()):
        if e["type"] == "caption" and e["final"]:
            finals[e["stream"]] = finals.get(e["stream"], "") + " " + e["text"]
    assert loose_wer("please call me back when you get home tonight", finals["good"]) <= 0.3
    assert loose_wer("seven red boats sailed past the old stone harbour", finals["wide"]) <= 0.5
    # The cut (3/5 of the bytes) is after the first sentence.
    assert loose_wer("the quick brown fox jumps over the lazy dog", finals["cut"]) <= 0.6

    try:  # the first 200 bytes of an MP3: libmpg123 prints a warning on it
        _speech_file(tmp_path / "whole.mp3", "Nothing of this is heard.", 44100, 2,
                     format="MP3")
        broken = tmp_path / "broken.mp3"
        broken.write_bytes((tmp_path / "whole.mp3").read_bytes()[:200])
    except sf.LibsndfileError:  # this libsndfile writes no MP3: a WAV of 0 channels
        broken = tmp_path / "broken.wav"
        _speech_file(broken, "Nothing of this is heard.", 22050, 2)
        head = bytearray(broken.read_bytes())
        head[22:24] = bytes(2)
        broken.write_bytes(bytes(head))
    proc = cli("transcribe", str(good), str(broken))
    line = one_error_line(proc, broken.name, "cannot decode")
    assert proc.stderr.strip() == line, proc.stderr
    assert proc.stdout == ""


def test_outputs_that_cannot_be_written_are_refused_before_decoding(tmp_path: Path) -> None:
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    for path in (a, b):
        sf.write(path, np.zeros(8000, np.int16), 16000)
    taken = tmp_path / "out.srt"
    taken.write_text("x")
    # Several files need a folder, and a file is in the way.
    one_error_line(cli("transcribe", str(a), str(b), "--srt", str(taken)),
                   f"--srt {taken}: cannot make that folder")
    # Nor can standard output ("-" is /dev/stdout) take them: said so.
    for where in ("-", "/dev/stdout"):
        one_error_line(cli("transcribe", str(a), str(b), "--vtt", where),
                       "--vtt /dev/stdout: standard output takes one file, and the 2 streams "
                       "need one each: name a folder")
    one_error_line(cli("transcribe", str(a), "--vtt", str(tmp_path / "no" / "a.vtt")),
                   "--vtt", "does not exist")
    # Two outputs onto one file: the VTT used to overwrite the SRT unsaid.
    subs = tmp_path / "subs"
    proc = cli("transcribe", str(a), "--srt", str(subs), "--vtt", str(subs))
    one_error_line(proc, f"--srt and --vtt would both write {subs}")
    assert not subs.exists() and "model worker started" not in proc.stderr
    one_error_line(cli("transcribe", str(a), str(b), "--srt", f"{tmp_path}/o/",
                       "--jsonl", f"{tmp_path}/o/b.srt"), "--srt and --jsonl would both write")
    assert not (tmp_path / "o").exists(), "the folder made for --srt is left behind"
    # An output onto an input: the audio used to be replaced by subtitles.
    one_error_line(cli("transcribe", str(a), str(b), "--jsonl", str(b)),
                   f"--jsonl {b} is one of the audio files", "would be overwritten")
    assert sf.info(b).frames == 8000
    # Nor onto one through the file a subtitle is written to until it ends.
    staged = tmp_path / "talk.srt.part"
    shutil.copy(a, staged)
    one_error_line(cli("transcribe", str(staged), "--srt", str(tmp_path / "talk.srt")),
                   f"--srt {staged} is one of the audio files")
    assert sf.info(staged).frames == 8000
    # An empty name (an unset shell variable) wrote into the working folder.
    for flag in ("--srt", "--jsonl"):
        one_error_line(cli("transcribe", str(a), flag, ""),
                       f"{flag} needs a file or folder name, got an empty one")
    # A file where its folder should be: said so, not "does not exist".
    one_error_line(cli("transcribe", str(a), "--vtt", str(a / "a.vtt")),
                   f"--vtt {a / 'a.vtt'}: {a} is a file, not a folder")
    # --jsonl is one file for every stream, never a folder.
    proc = cli("transcribe", str(a), "--jsonl", str(tmp_path))
    one_error_line(proc, f"--jsonl {tmp_path}", "is a folder")
    assert "model worker started" not in proc.stderr, "refused only after decoding"
    # A folder where one stream's file goes: it used to be found only once
    # every file was decoded, and the outputs after it (b.srt, the --jsonl
    # with every event) were never written.
    (tmp_path / "o2" / "a.srt").mkdir(parents=True)
    proc = cli("transcribe", str(a), str(b), "--srt", f"{tmp_path}/o2/",
               "--jsonl", str(tmp_path / "all.jsonl"))
    one_error_line(proc, f"--srt {tmp_path / 'o2' / 'a.srt'} is a folder")
    assert "model worker started" not in proc.stderr, "refused only after decoding"
    one_error_line(cli("transcribe", str(a), "--set", "vad.start_ratio=nan"),
                   "vad.start_ratio must be a finite number, got nan")


def test_an_output_that_is_a_hard_link_to_an_input_is_refused(tmp_path: Path) -> None:
    """The check that an output is not an input compared names (with links
    followed): a --jsonl that is another name of the audio file (a hard
    link, or the same folder mounted twice) passed it, and opening the
    --jsonl file emptied the audio, replaced by the run's events. An
    output that is the same file as an input is refused."""
    a = tmp_path / "a.wav"
    sf.write(a, np.zeros(8000, np.int16), 16000)
    events, subs = tmp_path / "events.jsonl", tmp_path / "a.srt"
    os.link(a, events)
    os.link(a, subs)
    for flag, path in (("--jsonl", events), ("--srt", subs)):
        proc = cli("transcribe", str(a), flag, str(path))
        one_error_line(proc, f"{flag} {path} is one of the audio files", "would be overwritten")
        assert "model worker started" not in proc.stderr
    assert sf.info(a).frames == 8000 and sf.info(events).frames == 8000


def test_an_output_that_cannot_be_created_leaves_no_part_files_of_the_others(
        tmp_path: Path) -> None:
    """An output whose file cannot be created once the model is loaded (a
    link into a folder that is gone, a folder not writable) ends the run
    before any audio, with one line. The ``.part`` files of the outputs
    created before it were left behind, empty, and with them the folder
    this run made for them. Now they are removed, and that folder too."""
    a = tmp_path / "a.wav"
    sf.write(a, np.zeros(8000, np.int16), 16000)
    gone = tmp_path / "gone"
    (tmp_path / "events.jsonl").symlink_to(gone / "events.jsonl")
    (tmp_path / "a.vtt").symlink_to(gone / "a.vtt")
    out = tmp_path / "out"
    for args in (["--jsonl", str(tmp_path / "events.jsonl")],
                 ["--vtt", str(tmp_path / "a.vtt")]):
        proc = cli("transcribe", str(a), "--srt", f"{out}/", *args)
        one_error_line(proc, "cannot write", "No such file or directory")
        assert not out.exists(), list(out.iterdir())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.vtt", "a.wav", "events.jsonl"]


def test_a_path_ending_in_a_slash_is_a_folder_even_for_one_file(tmp_path: Path) -> None:
    """``--srt out/ --vtt out/`` with one file writes out/a.srt and out/a.vtt, as
    with several files; it once wrote both to one file named ``out``."""
    a = tmp_path / "a.wav"
    sf.write(a, np.zeros(8000, np.int16), 16000)
    out = tmp_path / "out"
    proc = cli("transcribe", str(a), "--srt", f"{out}/", "--vtt", f"{out}/")
    assert proc.returncode == 0, proc.stderr
    assert out.is_dir()
    assert (out / "a.srt").exists()
    assert (out / "a.vtt").read_text().startswith("WEBVTT")
    one_error_line(cli("transcribe", str(a), "--jsonl", f"{tmp_path}/events/"),
                   "--jsonl", "is a folder")


def _popen_transcribe(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "evoxtral_stream", "transcribe", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_transcribe_writes_the_captions_it_made(
        tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C (or SIGTERM) mid-file: feeding stops, the open segment becomes a
    final, and the SRT and JSON lines hold every final printed, with exit
    status 128 + the signal. Both outputs used to be lost (written only after
    the last file ended): status 130 with nothing written, or, for SIGTERM,
    the process killed outright."""
    out, jsonl = tmp_path / "out", tmp_path / "all.jsonl"
    proc = _popen_transcribe("--sample", "--realtime", "--srt", f"{out}/",
                             "--jsonl", str(jsonl))
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()   # the first final (partials go unprinted)
        assert first.startswith("[0:0"), first
        time.sleep(2)                    # into the second sentence
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig.value, err
    assert "Traceback" not in err
    printed = [line.split("] ", 1)[1] for line in [first.rstrip("\n"), *rest.splitlines()]]
    assert 2 <= len(printed) < 5, "the open segment's final, not the whole sample"
    finals = [e for e in map(json.loads, jsonl.read_text().splitlines())
              if e["type"] == "caption" and e["final"]]
    assert [e["text"] for e in finals] == printed
    srt = " ".join((out / "sample.srt").read_text().split())
    assert srt.startswith("1 00:00:00,"), srt
    assert printed[-1].split()[-1] in srt, "the last final is in the subtitles"
    assert f"interrupted ({sig.name})" in err


_SRT_BLOCK = re.compile(r"(\d+)\n(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})\n"
                        r"((?:[^\n]+\n)+)")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_a_transcribe_killed_outright_leaves_what_it_had_made(tmp_path: Path) -> None:
    """kill -9 mid-file (as the out-of-memory killer does): the JSON lines
    file holds every event up to then, whole lines only, every final printed
    among them; the subtitles are whole cues in talk.srt.part and
    talk.vtt.part, the targets not made. Everything used to be held in
    memory until the end: nothing at all was written."""
    from tests.speech import speech_with_pauses

    sentences = ["The committee met on Tuesday to discuss the budget for next year.",
                 "Several members raised concerns about the cost of the new building.",
                 "The chair promised a full report before the end of the month.",
                 "Meanwhile the weather stayed cold and wet for most of the week.",
                 "Thank you all for listening, and see you at the next meeting.",
                 "Our guests tonight include two authors and a famous painter."]
    wav, out, jsonl = tmp_path / "talk.wav", tmp_path / "out", tmp_path / "all.jsonl"
    sf.write(wav, speech_with_pauses(sentences, 1.0)[0], 16000)   # about 30 s
    proc = _popen_transcribe(str(wav), "--realtime", "--srt", f"{out}/", "--vtt", f"{out}/",
                             "--jsonl", str(jsonl))
    try:
        assert proc.stdout is not None
        printed = [proc.stdout.readline() for _ in range(3)]   # three finals
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert all(line.startswith("[0:") for line in printed), printed
    texts = [line.rstrip("\n").split("] ", 1)[1] for line in printed]
    raw = jsonl.read_text(encoding="utf-8")
    assert raw.endswith("\n")
    events = [json.loads(line) for line in raw.splitlines()]   # every line whole
    assert events[0]["type"] == "stream.started"
    finals = [e["text"] for e in events if e["type"] == "caption" and e["final"]]
    assert finals[:3] == texts and len(finals) < len(sentences)
    assert sorted(p.name for p in out.iterdir()) == ["talk.srt.part", "talk.vtt.part"]
    srt = (out / "talk.srt.part").read_text(encoding="utf-8")
    blocks = _SRT_BLOCK.findall(srt)
    assert "\n".join("".join(b[:1]) + "\n" + f"{b[1]} --> {b[2]}\n" + b[3]
                     for b in blocks) == srt, "whole cues only"
    assert [int(b[0]) for b in blocks] == list(range(1, len(blocks) + 1))
    shown = " ".join(b[3].replace("\n", " ") for b in blocks).split()
    # The first two finals' cues are settled (the next final's start is known).
    assert shown[:len(" ".join(texts[:2]).split())] == " ".join(texts[:2]).split()
    vtt = (out / "talk.vtt.part").read_text(encoding="utf-8")
    assert vtt.startswith("WEBVTT\n\n00:00:0") and vtt.count(" --> ") == len(blocks)


def _ctrl_c_twice_once_started(proc: subprocess.Popen[str]) -> str:
    """Ctrl-C ``proc`` twice, 0.3 s apart, half a second after its engine
    started; its stderr."""
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "engine started" in line:
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return err


def test_a_second_ctrl_c_leaves_the_model_behind_and_still_writes(tmp_path: Path) -> None:
    """A second Ctrl-C while the model thread is deep in a long batch of finals:
    the thread is left behind, the outputs are still written and the status
    is 130. It used to crash at interpreter exit (status 139 or 134) with
    nothing written."""
    # No partials: every final is queued at once; beam search on one thread
    # makes each batch long.
    jsonl = tmp_path / "all.jsonl"
    proc = _popen_transcribe(str(sample_path()), str(sample_path()), str(sample_path()),
                             "--no-partials", "--jsonl", str(jsonl),
                             "--set", "model.whisper.beam_size=5",
                             "--set", "model.whisper.cpu_threads=1",
                             "--set", "model.whisper.min_window_s=30")
    err = _ctrl_c_twice_once_started(proc)
    assert "leaving it behind" in err, err   # the case under test did happen
    assert proc.returncode == 130, err
    assert "terminate called" not in err and "Traceback" not in err
    assert jsonl.exists()
    types = {json.loads(line)["type"] for line in jsonl.read_text().splitlines()}
    assert {"stream.started", "stream.ended"} <= types


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_captions_stdout_cannot_take_are_one_line_and_status_two(tmp_path: Path) -> None:
    """stdout on a full disk: one warning when printing stops, one error line
    at the end, exit status 2, and the SRT still written. It used to log a
    traceback from the engine's listener and exit 0, as if every caption had
    been printed. (A pipe whose reader left is no error: below.)"""
    srt = tmp_path / "s.srt"
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "evoxtral_stream", "transcribe", "--sample",
             "--no-partials", "--srt", str(srt)],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=240,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    one_error_line(proc, "cannot write captions to standard output",
                   "No space left on device")
    assert "captions are no longer printed" in proc.stderr
    assert srt.read_text().count(" --> ") >= 5, "the subtitles hold every final"


def _head_1(*args: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    """``evoxtral-stream transcribe ARGS | head -1``: the line head took, and
    the process once it ended (its stdout: what the pipe held after it)."""
    proc = _popen_transcribe(*args)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()   # head -1 leaves
        err = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    return first, subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


def _long_sample(tmp_path: Path) -> Path:
    """The sample six times over: 151 s, 30 finals."""
    long = tmp_path / "long.wav"
    sf.write(long, np.concatenate([read_audio_file(sample_path())] * 6), SAMPLE_RATE)
    return long


def _summary(err: str) -> tuple[int, float]:
    """The finals and seconds of audio transcribe's summary line counts."""
    found = re.search(r"stream\(s\), ([\d.]+) s of audio .*?; (\d+) finals", err)
    assert found is not None, err
    return int(found[2]), float(found[1])


def test_transcribe_into_head_stops_quietly_with_status_141(tmp_path: Path) -> None:
    """``transcribe ... | head -1``: the reader leaving stdout ends the
    command at once, as a Ctrl-C does (the audio not yet read is not
    decoded), with no warning nor error line, and status 141 as a shell
    reports a program SIGPIPE ended. It used to decode everything to the
    end, then print a warning and an error line and exit 2."""
    long = _long_sample(tmp_path)
    first, proc = _head_1(str(long), str(long), "--no-partials")
    # The two files' streams, long and long-2, decode on threads of their
    # own: either may print first.
    assert re.match(r"long(-2)? \[", first), first
    assert proc.returncode == 141, proc.stderr
    for word in ("Traceback", "error", "WARNING", "Exception ignored", "no longer printed"):
        assert word not in proc.stderr, proc.stderr
    # At most a batch's worth of finals (worker.max_batch) still owed per
    # stream, as on a Ctrl-C: not the whole files.
    finals, audio_s = _summary(proc.stderr)
    assert finals <= 30 and audio_s <= 0.5 * 2 * 151.2, proc.stderr
    assert "stopped, standard output closed" in proc.stderr


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_an_only_output_on_stdout_into_head_stops_the_reading(tmp_path: Path) -> None:
    """``transcribe long.wav --jsonl /dev/stdout | head -1``: the output that
    is stdout is the only one, so its reader leaving leaves nothing to make
    captions for, and the reading stops as it does for printed captions
    (README). It went on decoding both files to their end for nobody."""
    long = _long_sample(tmp_path)
    first, proc = _head_1(str(long), str(long), "--no-partials", "--jsonl", "/dev/stdout")
    assert first.startswith('{"type": "stream.started"'), first
    assert proc.returncode == 141, proc.stderr
    for word in ("Traceback", "error", "WARNING", "Exception ignored"):
        assert word not in proc.stderr, proc.stderr
    finals, audio_s = _summary(proc.stderr)
    assert finals <= 30 and audio_s <= 0.5 * 2 * 151.2, proc.stderr
    assert "stopped, standard output closed" in proc.stderr


def test_transcribe_into_head_still_writes_its_files_whole(tmp_path: Path) -> None:
    """With --srt (or --vtt, --jsonl, --serve) something still takes the
    captions: the reader leaving stdout stops the printing only, quietly,
    and the subtitles hold every final of the file; status 141 all the same."""
    srt = tmp_path / "s.srt"
    # Long enough that captions are still to come when head leaves: the
    # sample's five finals could all be in the pipe before the reader went,
    # which is no SIGPIPE (status 0, rightly) on a loaded machine.
    long = _long_sample(tmp_path)
    first, proc = _head_1(str(long), "--no-partials", "--srt", str(srt))
    assert first.startswith("[0:0"), first
    assert proc.returncode == 141, proc.stderr
    assert "error" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
    finals, audio_s = _summary(proc.stderr)
    assert finals == 30 and audio_s == pytest.approx(151.2, abs=0.1), proc.stderr
    assert srt.read_text().count(" --> ") >= finals, "the subtitles hold every final"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_an_output_on_stdout_into_head_stops_quietly_with_status_141(tmp_path: Path) -> None:
    """``transcribe --jsonl /dev/stdout | head -1`` (or --srt, --vtt): the
    reader leaving the output that is stdout is what it is for printed
    captions, no error: no warning nor error line, status 141, the other
    outputs written whole. It was a warning, an error line and status 2."""
    vtt = tmp_path / "s.vtt"
    first, proc = _head_1("--sample", "--no-partials", "--jsonl", "/dev/stdout",
                          "--vtt", str(vtt))
    assert first.startswith('{"type": "stream.started"'), first
    assert proc.returncode == 141, proc.stderr
    for word in ("Traceback", "error", "WARNING", "Broken pipe"):
        assert word not in proc.stderr, proc.stderr
    assert _summary(proc.stderr)[0] == 5
    assert vtt.read_text().count(" --> ") >= 5, "the subtitles hold every final"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_an_output_that_cannot_be_written_leaves_the_others_written(tmp_path: Path) -> None:
    """The SRT on a full disk: one error line and status 2, and the VTT and
    the --jsonl (every event) are still written. The first failure used to
    stop the writing: the outputs after it were lost with their captions."""
    from tests.speech import speak

    a = tmp_path / "a.wav"
    sf.write(a, np.concatenate([speak("thank you for listening"), np.zeros(8000, np.int16)]),
             16000)
    vtt, jsonl = tmp_path / "a.vtt", tmp_path / "all.jsonl"
    proc = cli("transcribe", str(a), "--srt", "/dev/full", "--vtt", str(vtt),
               "--jsonl", str(jsonl))
    one_error_line(proc, "cannot write /dev/full", "No space left on device")
    assert "listening" in vtt.read_text().lower()
    types = [json.loads(line)["type"] for line in jsonl.read_text().splitlines()]
    assert types[0] == "stream.started" and types[-1] == "stream.ended"
    # Written in place: a .part file renamed onto it would have replaced the
    # device (as root, /dev/full itself) with a regular file.
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert not Path("/dev/full.part").exists()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_subtitles_go_into_a_fifo_in_place_and_through_a_link_to_its_file(
        tmp_path: Path) -> None:
    """--srt naming a FIFO (or /dev/stdout) is written into it, and one naming
    a symbolic link replaces the file the link names, keeping the link: the
    .part file beside the target, renamed onto it at the end, replaced the
    FIFO with a regular file (the reader got nothing) and the link with a
    file. The file replaced keeps its permissions."""
    import threading

    from tests.speech import speak

    a = tmp_path / "a.wav"
    sf.write(a, np.concatenate([speak("thank you for listening"), np.zeros(8000, np.int16)]),
             16000)
    fifo = tmp_path / "captions.srt"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    real = tmp_path / "store" / "a.vtt"
    real.parent.mkdir()
    real.write_text("old")
    real.chmod(0o640)  # what the rename used to reset (to 0644 under the usual umask)
    link = tmp_path / "a.vtt"
    link.symlink_to(real)
    proc = cli("transcribe", str(a), "--srt", str(fifo), "--vtt", str(link))
    reader.join(30)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert got and b" --> " in got[0] and b"listening" in got[0].lower()
    assert link.is_symlink() and link.resolve() == real
    assert real.read_text().startswith("WEBVTT") and "listening" in real.read_text().lower()
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.vtt", "a.wav", "captions.srt",
                                                          "store"]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_each_file_s_subtitles_are_named_after_it_when_names_repeat(tmp_path: Path) -> None:
    """d1/talk.wav, d2/talk.wav and talk-2.wav into one folder: talk-2.srt is
    talk-2.wav's, and the second talk.wav gets a name no input has. The
    second talk.wav used to take talk-2.srt, and talk-2.wav became
    talk-2-2.srt: each file's captions under the other's name."""
    from tests.speech import speak

    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    files = {tmp_path / "d1" / "talk.wav": "hello there, this is a test of the engine",
             tmp_path / "d2" / "talk.wav": "several members raised concerns about it",
             tmp_path / "talk-2.wav": "thank you for listening"}
    for path, words in files.items():
        sf.write(path, np.concatenate([speak(words), np.zeros(8000, np.int16)]), 16000)
    out = tmp_path / "out"
    proc = cli("transcribe", *map(str, files), "--no-partials", "--srt", f"{out}/")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["talk-2.srt", "talk-3.srt", "talk.srt"]
    assert "listening" in (out / "talk-2.srt").read_text().lower()
    assert "members" in (out / "talk-3.srt").read_text().lower()
    assert "hello" in (out / "talk.srt").read_text().lower()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_finals_only_of_files_read_at_full_speed_are_not_reported_behind(
        tmp_path: Path) -> None:
    """transcribe --no-partials of two files: every final of a file is asked
    for at once and waits its turn; that is not the model falling behind a
    live source. It used to warn, every 5 s, that the model was ever more
    seconds "behind" (and that "partials are thinned first", with none),
    and to give the queueing as the final latency, unqualified. (How many
    warnings depends on the machine's speed; tests/engine/test_lag_warning.py
    makes the wait certain.)"""
    from tests.speech import speech_with_pauses

    sentences = ["The committee met on Tuesday to discuss the budget for next year.",
                 "Several members raised concerns about the cost of the new building.",
                 "The chair promised a full report before the end of the month.",
                 "Meanwhile the weather stayed cold and wet for most of the week.",
                 "Thank you all for listening, and see you at the next meeting.",
                 "Our guests tonight include two authors and a famous painter.",
                 "The train was late again, so we walked the last two miles.",
                 "Please remember to switch off the lights when you leave the room."]
    files = [tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "c.wav"]
    for i, path in enumerate(files):
        sf.write(path, speech_with_pauses(sentences[i:] + sentences[:i], 0.8)[0], 16000)
    # One final at a time, by beam search: the last of the 24 wait seconds
    # for their turn.
    proc = cli("transcribe", *map(str, files), "--no-partials", "--set", "worker.max_batch=1",
               "--set", "model.whisper.beam_size=5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 24, proc.stdout
    assert "behind" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
    assert "mostly waiting in the queue" in proc.stderr


def test_no_input_is_a_usage_error() -> None:
    one_error_line(cli("transcribe"), "no input")


@pytest.mark.parametrize("flag", [["--host", "0.0.0.0"], ["--port", "9000"]])
def test_transcribe_host_or_port_without_serve_is_a_usage_error(flag: list[str]) -> None:
    """They set where --serve listens; alone they would be ignored, and a
    user who meant to serve would get no server and no word of it."""
    one_error_line(cli("transcribe", "--sample", *flag), f"{flag[0]} is for --serve")


def test_missing_whisper_model_is_one_line(tmp_path: Path) -> None:
    one_error_line(cli("transcribe", "--sample", "--backend", "whisper",
                       "--set", f"model.whisper.model_path={str(tmp_path)!r}"),
                   "model.whisper.model_path")


def test_incomplete_whisper_model_is_one_line(tmp_path: Path) -> None:
    from evoxtral_stream.engine.backends.whisper import embedded_model_path

    folder = tmp_path / "whisper"
    shutil.copytree(embedded_model_path(), folder)
    (folder / "config.json").unlink()
    one_error_line(cli("transcribe", "--sample", "--backend", "whisper",
                       "--set", f"model.whisper.model_path={str(folder)!r}"),
                   "config.json missing", "model.whisper.model_path")


@pytest.mark.parametrize("args", [["--debug"], []])
def test_debug_shows_the_traceback(args: list[str]) -> None:
    proc = cli("transcribe", "--sample", "--set", "vad.frame_ms=25", *args)
    assert proc.returncode != 0
    assert ("Traceback" in proc.stderr) == bool(args)


def _popen_serve(*args: str) -> subprocess.Popen[str]:
    """``serve`` on a free port, its stdout and stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "evoxtral_stream", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def _start_serve(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``serve`` on a free port; return the process and its captions URL
    (from its "serving captions on" line, which ``-q`` hides)."""
    proc = _popen_serve(*args)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "serving captions on " in line:
            return proc, line.split("serving captions on ", 1)[1].split()[0]
    proc.kill()
    raise AssertionError(f"serve did not start: {proc.communicate()}")


def _from_the_start(url: str) -> str:
    """The captions ``url`` of ``serve --source`` the bundled sample, resuming
    the file's stream (named after the file's stem) from seq 0: serve plays
    the file from its "serving captions on" line on, and a subscriber without
    ``since`` gets only what comes after it connects (a late connect on a
    loaded machine missed the first final)."""
    return f"{url}?since={sample_path().stem}:0"


async def _collect(url: str, until: str, timeout: float = 120) -> list[dict[str, object]]:
    import asyncio
    import json

    from websockets.asyncio.client import connect

    out: list[dict[str, object]] = []
    async with connect(url) as ws:
        while not out or out[-1]["type"] != until:
            out.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    return out


async def _sigterm_mid_sentence(proc: subprocess.Popen[str],
                                url: str) -> list[dict[str, object]]:
    """Subscribe, SIGTERM ``proc`` while the second sentence is being spoken (a
    partial of segment 1), and return every message until the server closes."""
    import asyncio
    import json
    import signal

    from websockets.asyncio.client import connect

    seen: list[dict[str, object]] = []
    async with connect(_from_the_start(url)) as ws:
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
            seen.append(msg)
            if msg["type"] == "caption" and msg["segment"] == 1 and not msg["final"]:
                break
        proc.send_signal(signal.SIGTERM)
        async for raw in ws:
            seen.append(json.loads(raw))
        assert ws.close_code in (1000, 1001)
    return seen


async def test_serve_a_file_to_a_websocket_subscriber() -> None:
    proc, url = _start_serve("--source", str(sample_path()), "--exit-at-end")
    try:
        messages = await _collect(_from_the_start(url), "stream.ended")
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert messages[0]["type"] == "hello"
    captions = [m for m in messages if m["type"] == "caption"]
    finals = [m for m in captions if m["final"]]
    assert len(finals) == 5
    assert any(not m["final"] for m in captions)
    text = " ".join(str(m["text"]) for m in finals)
    assert loose_wer(sample_text(), text) <= 0.15, text


async def test_sigterm_flushes_the_open_segment_and_exits_zero() -> None:
    proc, url = _start_serve("--source", str(sample_path()))
    try:
        seen = await _sigterm_mid_sentence(proc, url)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    finals = [m for m in seen if m["type"] == "caption" and m["final"]]
    assert [m["segment"] for m in finals] == [0, 1], "the open segment became a final"
    assert seen[-1]["type"] == "stream.ended"


async def test_a_drain_cut_short_closes_the_open_segment_with_its_partial() -> None:
    """worker.drain_timeout_s far below a decode: the open segment's final is
    the last partial shown, and the exit status says the drain was cut short."""
    proc, url = _start_serve("--source", str(sample_path()),
                             "--set", "worker.drain_timeout_s=0.001")
    try:
        seen = await _sigterm_mid_sentence(proc, url)
        assert proc.wait(30) == 1
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert "drain_timeout_s" in err
    captions = [m for m in seen if m["type"] == "caption" and m["segment"] == 1]
    final = captions[-1]
    assert final["final"] and final["text"]
    assert final["text"] == captions[-2]["text"], "the final repeats the last partial"
    assert seen[-1]["type"] == "stream.ended"


async def _ingest_all(url: str, stream: str, pcm: bytes) -> ClientConnection:
    """Open ingest stream ``stream``, send ``pcm`` (16 kHz mono PCM16) at once and
    return the connection once the server has taken all of it (``pcm`` is sent
    in half seconds, each acknowledged, so its length must be a multiple)."""
    ws = await connect(f"{url.rsplit('/v1/', 1)[0]}/v1/ingest?stream={stream}")
    await ws.send(json.dumps({"type": "config", "sample_rate": 16000, "progress": True}))
    assert json.loads(await ws.recv())["type"] == "ingest.ready"
    for i in range(0, len(pcm), 16000):
        await ws.send(pcm[i:i + 16000])
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if msg["type"] == "ingest.progress" and msg["frames"] * 2 >= len(pcm):
            return ws


async def test_serve_names_the_lines_of_streams_clients_send_beside_its_own(
        tmp_path: Path) -> None:
    """serve's own source prints unnamed lines, as ever; a stream a client
    sends beside it has its lines named, which were unnamed too, so whose
    words were whose could not be told on stdout."""
    from tests.speech import have_espeak, speak

    if not have_espeak():
        pytest.skip("needs espeak-ng")
    desk = tmp_path / "desk.wav"
    sf.write(desk, np.concatenate([np.zeros(8000, np.int16), speak("the weather is lovely today"),
                                   np.zeros(32000, np.int16)]), 16000)
    proc, url = _start_serve("--source", str(desk), "--stream", "desk")
    pcm = speak("thank you for listening").tobytes()
    pcm += bytes(-len(pcm) % 16000) + bytes(32000)
    try:
        ws = await _ingest_all(url, "phone", pcm)
        await ws.send(json.dumps({"type": "end"}))
        while json.loads(await asyncio.wait_for(ws.recv(), 60))["type"] != "ingest.summary":
            pass
        await ws.close()
        await asyncio.sleep(3.0)  # the desk file plays in real time
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        proc.kill()
    lines = out.splitlines()
    assert any(line.startswith("phone [") and "listening" in line.lower() for line in lines), out
    assert any(line.startswith("[") and "lovely" in line.lower() for line in lines), out
    assert not any(line.startswith("desk ") for line in lines), out


_HOST = "Good evening and welcome to the panel."
_GUEST = "The weather is lovely today."
_THIRD = "Please switch off the lights."


def _multitrack(path: Path, *tracks: tuple[float, str | None], length_s: float,
                rate: int = 48000) -> None:
    """A float WAV at ``rate`` with one channel per track: ``text`` spoken
    from ``at`` seconds (None: silence only), silence elsewhere."""
    board = np.zeros((int(length_s * rate), len(tracks)), np.float32)
    for ch, (at, text) in enumerate(tracks):
        if text is not None:
            voice = resample(speak(text), SAMPLE_RATE, rate).astype(np.float32) / 32768
            board[int(at * rate):int(at * rate) + len(voice), ch] = voice
    sf.write(path, board, rate, subtype="FLOAT")


def _spoken_s(text: str) -> float:
    return len(speak(text)) / SAMPLE_RATE


def _three_speakers(path: Path) -> Path:
    """``path``: a three-channel WAV, _HOST, _GUEST and _THIRD each on its
    own channel, one after the other."""
    second = 0.5 + _spoken_s(_HOST) + 1.0
    third = second + _spoken_s(_GUEST) + 1.0
    _multitrack(path, (0.5, _HOST), (second, _GUEST), (third, _THIRD),
                length_s=third + _spoken_s(_THIRD) + 2.0)
    return path


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
async def test_serve_a_multitrack_file_as_one_stream_per_channel(tmp_path: Path) -> None:
    """A panel recorded host left, guest right (48 kHz), played with
    ``audio.channels = [1, 2]`` split: streams ``panel-1`` and ``panel-2``,
    each with its own speaker's words at that speaker's times, and
    ``--exit-at-end`` waits for both to end. The file's channels used to be
    mixed into one stream named after the file, whatever ``[audio]`` said."""
    path = tmp_path / "recording.wav"
    guest_at = 0.5 + _spoken_s(_HOST) + 1.0
    _multitrack(path, (0.5, _HOST), (guest_at, _GUEST), length_s=guest_at + 4.0)
    proc, url = _start_serve("--source", str(path), "--stream", "panel", "--exit-at-end",
                             "--set", "audio.channels=[1, 2]",
                             "--set", "audio.split_channels=true")
    messages: list[dict[str, Any]] = []
    try:
        async with connect(f"{url}?since=panel-1:0,panel-2:0") as ws:
            async for raw in ws:   # until serve closes it, having ended
                messages.append(json.loads(raw))
        assert await asyncio.to_thread(proc.wait, 60) == 0
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    finals: dict[str, list[dict[str, Any]]] = {}
    for m in messages:
        if m["type"] == "caption" and m["final"]:
            finals.setdefault(m["stream"], []).append(m)
    assert sorted(finals) == ["panel-1", "panel-2"], messages
    host = " ".join(str(m["text"]) for m in finals["panel-1"]).lower()
    guest = " ".join(str(m["text"]) for m in finals["panel-2"]).lower()
    assert "welcome" in host and "lovely" not in host, host
    assert "lovely" in guest and "welcome" not in guest, guest
    # Each stream's own times: the guest's speech starts where the file has it.
    assert finals["panel-1"][0]["start"] == pytest.approx(0.5, abs=0.4)
    assert finals["panel-2"][0]["start"] == pytest.approx(guest_at, abs=0.4)
    ended = [m["stream"] for m in messages if m["type"] == "stream.ended"]
    assert sorted(ended) == ["panel-1", "panel-2"], messages
    # Printed lines name their stream.
    printed = [line.split(" [")[0] for line in out.splitlines()]
    assert sorted(set(printed)) == ["panel-1", "panel-2"], out


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
@pytest.mark.parametrize(("channels", "heard", "unheard"), [
    ("[3]", ["lights"], ["welcome", "lovely"]),
    ("[1, 2]", ["welcome", "lovely"], ["lights"]),
])
def test_serve_a_file_captions_only_the_channels_listed(
        tmp_path: Path, channels: str, heard: list[str], unheard: list[str]) -> None:
    """``audio.channels`` picks a file's channels as it picks a device's:
    ``[3]`` captions the third alone, ``[1, 2]`` mixes those two, as one
    stream named after the file (lines unnamed). Every channel used to be
    mixed in."""
    path = _three_speakers(tmp_path / "three.wav")
    proc = cli("serve", "--port", "0", "--source", str(path), "--exit-at-end",
               "--set", f"audio.channels={channels}")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.lower()
    assert all(line.startswith("[") for line in proc.stdout.splitlines()), proc.stdout
    for word in heard:
        assert word in text, proc.stdout
    for word in unheard:
        assert word not in text, proc.stdout


@pytest.mark.parametrize(("source", "channels", "split", "has"), [
    ("sample", "[2]", "false", 1),
    ("stereo", "[1, 3]", "true", 2),
])
def test_serve_refuses_channels_a_file_lacks_before_loading_the_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        source: str, channels: str, split: str, has: int) -> None:
    from evoxtral_stream import cli as main

    if source == "stereo":
        source = str(tmp_path / "stereo.wav")
        sf.write(source, np.zeros((SAMPLE_RATE, 2), np.int16), SAMPLE_RATE)
    name = sample_path().name if source == "sample" else "stereo.wav"

    def no_model(*_: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(main.serve, "load_backend", no_model)
    with pytest.raises(SystemExit) as exit_:
        main.main(["serve", "--port", "0", "--source", source,
                   "--set", f"audio.channels={channels}",
                   "--set", f"audio.split_channels={split}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("evoxtral-stream: error: audio.channels asks for channel "
                             f"{channels[-2]}, but audio file "), err
    assert err[0].endswith(f"{name} has {has} channel(s)"), err


def _by_stream(jsonl: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """The finals of a ``--jsonl`` file by stream, and each stream's
    ``stream.ended`` duration."""
    finals: dict[str, list[dict[str, Any]]] = {}
    ended: dict[str, float] = {}
    for e in map(json.loads, jsonl.read_text().splitlines()):
        if e["type"] == "caption" and e["final"]:
            finals.setdefault(e["stream"], []).append(e)
        elif e["type"] == "stream.ended":
            ended[e["stream"]] = e["duration"]
    return finals, ended


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
def test_transcribe_splits_a_file_s_channels_into_streams_of_their_own(tmp_path: Path) -> None:
    """An interview recorded host left, guest right (48 kHz), transcribed
    with ``audio.channels = [1, 2]`` split: streams ``interview-1`` and
    ``interview-2``, each with its own SRT and VTT, its own speaker's words
    (not the other's) at that speaker's times, and its lines in --jsonl and
    on stdout; both on the file's timeline (as long as the file), and the
    summary counts both. transcribe used to mix every channel into one
    stream whatever ``[audio]`` said."""
    path = tmp_path / "interview.wav"
    guest_at = 0.5 + _spoken_s(_HOST) + 1.0
    length = guest_at + _spoken_s(_GUEST) + 2.0
    _multitrack(path, (0.5, _HOST), (guest_at, _GUEST), length_s=length)
    out, jsonl = tmp_path / "out", tmp_path / "events.jsonl"
    proc = cli("transcribe", str(path), "--srt", str(out), "--vtt", str(out),
               "--jsonl", str(jsonl), "--no-partials",
               "--set", "audio.channels=[1, 2]", "--set", "audio.split_channels=true")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "interview-1.srt", "interview-1.vtt", "interview-2.srt", "interview-2.vtt"]
    for suffix in (".srt", ".vtt"):
        host = (out / f"interview-1{suffix}").read_text().lower()
        guest = (out / f"interview-2{suffix}").read_text().lower()
        assert "welcome" in host and "lovely" not in host, host
        assert "lovely" in guest and "welcome" not in guest, guest
    finals, ended = _by_stream(jsonl)
    assert sorted(finals) == ["interview-1", "interview-2"], finals
    assert finals["interview-1"][0]["start"] == pytest.approx(0.5, abs=0.4)
    assert finals["interview-2"][0]["start"] == pytest.approx(guest_at, abs=0.4)
    # One timeline: each channel's stream is as long as the file.
    assert ended == {"interview-1": pytest.approx(length, abs=0.01),
                     "interview-2": pytest.approx(length, abs=0.01)}, ended
    printed = {line.split(" [")[0] for line in proc.stdout.splitlines()}
    assert printed == {"interview-1", "interview-2"}, proc.stdout
    # The summary counts both streams, each as long as the file.
    assert "2 stream(s)" in proc.stderr, proc.stderr
    assert _summary(proc.stderr)[1] == pytest.approx(2 * length, abs=0.06), proc.stderr


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
@pytest.mark.parametrize(("channels", "heard", "unheard"), [
    ("[3]", ["lights"], ["welcome", "lovely"]),
    ("[1, 2]", ["welcome", "lovely"], ["lights"]),
])
def test_transcribe_captions_only_the_channels_listed(
        tmp_path: Path, channels: str, heard: list[str], unheard: list[str]) -> None:
    """``audio.channels`` without split mixes the channels listed into the
    file's one stream (``[3]``: the third alone), named after the file, its
    lines unnamed. transcribe used to mix every channel in."""
    path = _three_speakers(tmp_path / "three.wav")
    srt = tmp_path / "three.srt"
    proc = cli("transcribe", str(path), "--no-partials", "--srt", str(srt),
               "--set", f"audio.channels={channels}")
    assert proc.returncode == 0, proc.stderr
    assert all(line.startswith("[") for line in proc.stdout.splitlines()), proc.stdout
    for text in (proc.stdout.lower(), srt.read_text().lower()):
        for word in heard:
            assert word in text, text
        for word in unheard:
            assert word not in text, text
    assert "1 stream(s)" in proc.stderr, proc.stderr


# transcribe's command line with a scripted model (one word per half second).
_SCRIPTED_WORDS = r"""
import sys
from evoxtral_stream import cli as cli_module
from tests.fakes import ScriptedBackend, words_so_far
from tests.helpers.model_loader import replace_model_loader
replace_model_loader(lambda cfg: ScriptedBackend(words_so_far))
sys.exit(cli_module.main(sys.argv[1:]))
"""


def test_split_channels_of_files_with_one_name_keep_apart(tmp_path: Path) -> None:
    """Two stereo files both named talk.wav, split: the first's channels are
    ``talk-1`` and ``talk-2``, the second's ``talk-2-1`` and ``talk-2-2``
    (its id de-duplicated as ever, then the channel): four streams, each
    with its own SRT holding its own channel's sound at that channel's
    times (a burst at 0.5 s on one, at 3 s on the other)."""
    rng = np.random.default_rng(5)

    def burst(at: float) -> np.ndarray[Any, np.dtype[np.int16]]:
        track = np.zeros(6 * SAMPLE_RATE, np.int16)
        track[int(at * SAMPLE_RATE):int((at + 1.5) * SAMPLE_RATE)] = (
            rng.standard_normal(int(1.5 * SAMPLE_RATE)) * 3000).astype(np.int16)
        return track

    first, second = tmp_path / "d1" / "talk.wav", tmp_path / "d2" / "talk.wav"
    for path, (left, right) in ((first, (0.5, 3.0)), (second, (3.0, 0.5))):
        path.parent.mkdir()
        sf.write(path, np.stack([burst(left), burst(right)], axis=1), SAMPLE_RATE)
    out, jsonl = tmp_path / "out", tmp_path / "e.jsonl"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPTED_WORDS, "transcribe", str(first), str(second),
         "--srt", str(out), "--jsonl", str(jsonl),
         "--set", "audio.channels=[1, 2]", "--set", "audio.split_channels=true"],
        capture_output=True, text=True, timeout=120, cwd=root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{root / 'src'}:{root}"})
    assert proc.returncode == 0, proc.stderr
    streams = ["talk-1", "talk-2", "talk-2-1", "talk-2-2"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.srt" for s in streams)
    finals, ended = _by_stream(jsonl)
    assert sorted(finals) == streams and sorted(ended) == streams, finals
    starts = {s: finals[s][0]["start"] for s in streams}
    assert starts == {"talk-1": pytest.approx(0.5, abs=0.4),
                      "talk-2": pytest.approx(3.0, abs=0.4),
                      "talk-2-1": pytest.approx(3.0, abs=0.4),
                      "talk-2-2": pytest.approx(0.5, abs=0.4)}, starts
    for s in streams:
        assert " --> " in (out / f"{s}.srt").read_text() and "w0" in finals[s][0]["text"], s
    assert all(d == pytest.approx(6.0, abs=0.01) for d in ended.values()), ended
    assert {line.split(" [")[0] for line in proc.stdout.splitlines()} == set(streams)
    assert "4 stream(s)" in proc.stderr, proc.stderr


# transcribe with a scripted model, its streams' pushes logged (to the file
# $PUSH_LOG) and the process busy for a moment right after the first.
_LOGGED_PUSHES = r"""
import json, os, sys, time
from evoxtral_stream import cli as cli_module
from evoxtral_stream.engine.engine import Stream
from tests.fakes import ScriptedBackend
from tests.helpers.model_loader import replace_model_loader
replace_model_loader(lambda cfg: ScriptedBackend(lambda a: "hi"))
pushes = []
real_push = Stream.push
def push(self, samples):
    real_push(self, samples)
    pushes.append(self.id)
    if len(pushes) == 1:
        time.sleep(0.3)
Stream.push = push
try:
    code = cli_module.main(sys.argv[1:])
finally:
    with open(os.environ["PUSH_LOG"], "w") as f:
        json.dump(pushes, f)
sys.exit(code)
"""


def test_transcribe_realtime_plays_a_file_s_channels_on_one_clock(tmp_path: Path) -> None:
    """``transcribe --realtime`` with a stereo file split: its two streams are
    fed in lock step (one chunk each in turn), as ``serve --source`` plays
    them, even when the process was busy between their first chunks. Each
    stream used to keep its own clock, started when its feeder first ran:
    the one fed first then ran ahead for the rest of the file."""
    path, pushes = tmp_path / "duo.wav", tmp_path / "pushes.json"
    sf.write(path, np.zeros((2 * SAMPLE_RATE, 2), np.int16), SAMPLE_RATE)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _LOGGED_PUSHES, "transcribe", str(path), "--realtime",
         "--set", "audio.channels=[1, 2]", "--set", "audio.split_channels=true",
         "--set", "audio.file_chunk_ms=100"],
        capture_output=True, text=True, timeout=120, cwd=root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PUSH_LOG": str(pushes),
             "PYTHONPATH": f"{root / 'src'}:{root}"})
    assert proc.returncode == 0, proc.stderr
    order = json.loads(pushes.read_text())
    assert order.count("duo-1") == order.count("duo-2") == 20, order
    ahead = [order[:i].count("duo-1") - order[:i].count("duo-2") for i in range(len(order))]
    assert all(abs(a) <= 1 for a in ahead), order


def test_transcribe_reads_a_recording_whose_header_says_no_audio(tmp_path: Path) -> None:
    """A WAV recorder killed before it wrote its sizes (data size 0) with 6 s
    of audio after its header: ``transcribe`` captions all of it, the
    stream as long as the file, with one warning naming the file. It was
    refused: "contains no audio (zero samples)"."""
    rng = np.random.default_rng(7)
    x = np.zeros(6 * SAMPLE_RATE, np.int16)
    for at in (0.5, 4.0):  # a burst of sound early, and one past the first seconds
        x[int(at * SAMPLE_RATE):int((at + 1.5) * SAMPLE_RATE)] = (
            rng.standard_normal(int(1.5 * SAMPLE_RATE)) * 3000).astype(np.int16)
    path = tmp_path / "rec.wav"
    sf.write(path, x, SAMPLE_RATE)
    data = bytearray(path.read_bytes())
    at = data.index(b"data")
    data[4:8] = data[at + 4:at + 8] = bytes(4)
    path.write_bytes(bytes(data))
    jsonl = tmp_path / "e.jsonl"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPTED_WORDS, "transcribe", str(path), "--jsonl", str(jsonl),
         "--log-format", "json"],
        capture_output=True, text=True, timeout=120, cwd=root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{root / 'src'}:{root}"})
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    warnings = [r["msg"] for r in records if r["level"] == "WARNING"]
    assert warnings == [f"audio file {path}: its WAV header says no audio (a recording not "
                        "closed properly?): read to the end of the file, 6.0 s"], warnings
    finals, ended = _by_stream(jsonl)
    assert ended == {"rec": pytest.approx(6.0, abs=0.01)}, ended
    starts = [f["start"] for f in finals["rec"]]
    assert starts == [pytest.approx(0.5, abs=0.4), pytest.approx(4.0, abs=0.4)], finals


@pytest.mark.parametrize(("channels", "split"), [("[3]", "false"), ("[1, 3]", "true")])
def test_transcribe_refuses_channels_its_files_lack_before_loading_the_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        channels: str, split: str) -> None:
    """Each file with fewer channels than ``audio.channels`` lists is one
    error line naming it and its channel count, the files that have them
    named in none; the model is not loaded, and the output folder this
    run made is gone."""
    from evoxtral_stream import cli as main

    for name, count in (("mono.wav", 1), ("three.wav", 3), ("stereo.wav", 2)):
        sf.write(tmp_path / name, np.zeros((SAMPLE_RATE, count), np.int16), SAMPLE_RATE)

    def no_model(*_: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(main.transcribe, "load_backend", no_model)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main.main(["transcribe", *(str(tmp_path / n) for n in
                                   ("mono.wav", "three.wav", "stereo.wav")),
                   "--srt", f"{out}/", "--set", f"audio.channels={channels}",
                   "--set", f"audio.split_channels={split}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    for line, (name, has) in zip(err, (("mono.wav", 1), ("stereo.wav", 2)), strict=True):
        assert line.startswith("evoxtral-stream: error: audio.channels asks for channel 3, "
                               "but audio file "), line
        assert line.endswith(f"{name} has {has} channel(s)"), line
    assert not out.exists()


@pytest.mark.parametrize("hangup", [False, True])
async def test_a_second_sigterm_while_the_model_is_busy_exits_one_without_crashing(
        hangup: bool) -> None:
    """SIGTERM twice while the model thread is deep in a long batch of finals:
    the thread is left behind (it is inside CTranslate2 and cannot be
    interrupted), and the process still exits with status 1, as promised. It
    used to abort at interpreter exit instead ("terminate called without an
    active exception", status 134, or a segfault, 139). A SIGHUP while the
    model thread gets its last second (``hangup``) changes nothing; it used to
    end the process (status 129)."""
    from tests.speech import have_espeak, speak

    if not have_espeak():
        pytest.skip("needs espeak-ng")
    # No partials: the model sits idle until the shutdown asks for every
    # stream's final at once; beam search on one thread makes that batch long.
    proc, url = _start_serve("--source", "none", "--no-print",
                             "--set", "stream.partial_interval_ms=0",
                             "--set", "model.whisper.beam_size=5",
                             "--set", "model.whisper.cpu_threads=1",
                             "--set", "model.whisper.min_window_s=30",
                             "--set", "vad.end_silence_ms=3000")
    pcm = speak("the quick brown fox jumps over the lazy dog and then it runs far away "
                "into the forest where it meets a bear and a wolf and a very old owl "
                "who tells it a story about the weather and the river").tobytes()
    pcm += bytes(-len(pcm) % 16000)
    conns: list[ClientConnection] = []
    try:
        conns = list(await asyncio.gather(*(_ingest_all(url, f"s{i}", pcm) for i in range(6))))
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        if hangup:
            await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGHUP)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        proc.kill()
        for ws in conns:
            await ws.close()
    assert "leaving it behind" in err, err   # the case under test did happen
    assert proc.returncode == 1, err
    assert "terminate called" not in err


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    """A second server on a taken port (the usual mistake) is an error for
    people: one line naming the address and the key, exit status 2. It
    comes before the model loads: it came after (a minute for Voxtral).
    config, which checks a configuration (typically while the server it is
    for runs), does not look at the port."""
    audio = tmp_path / "a.wav"
    sf.write(audio, np.zeros(8000, np.int16), 16000)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proc = cli("serve", "--source", "none", "--port", port)
        one_error_line(proc, f"127.0.0.1:{port}", "in use", "server.port")
        assert "backend:" not in proc.stderr  # refused before the model was loaded
        # The outputs are left as they were: the --jsonl of an earlier run
        # used to be emptied, and an empty .part file left beside the SRT.
        events, srt = tmp_path / "events.jsonl", tmp_path / "a.srt"
        events.write_text("an earlier run's events\n")
        proc = cli("transcribe", str(audio), "--serve", "--port", port,
                   "--jsonl", str(events), "--srt", str(srt))
        one_error_line(proc, f"127.0.0.1:{port}", "in use", "server.port")
        assert "backend:" not in proc.stderr
        assert events.read_text() == "an earlier run's events\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "events.jsonl"]
        assert cli("config", "--port", port).returncode == 0


def test_a_journal_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    """journal.dir under a file (or anywhere it cannot be made or read) stops
    the start with one line naming the key and the folder, exit status 2; it
    was a traceback."""
    (tmp_path / "file").write_text("not a folder")
    folder = tmp_path / "file" / "journal"
    one_error_line(cli("--backend", "whisper", "--set", "journal.enabled=true",
                       "--set", f"journal.dir={folder}", "serve", "--source", "none",
                       "--port", str(free_port())),
                   f"journal.dir {folder}", "cannot open the journal", "Not a directory")


_DISK_FULL = ("import resource, runpy, sys; "
              "resource.setrlimit(resource.RLIMIT_FSIZE, "
              "(0, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
              "sys.argv[0] = 'evoxtral-stream'; "
              "runpy.run_module('evoxtral_stream', run_name='__main__')")


@pytest.mark.skipif(sys.platform == "win32", reason="needs RLIMIT_FSIZE")
def test_a_journal_on_a_full_disk_at_the_exit_is_one_error_line(tmp_path: Path) -> None:
    """The journal's disk full to the end (no file of the process may grow:
    RLIMIT_FSIZE, which holds for root too): each final is reported
    journal_failed and still printed, and closing the journal at the exit,
    which fails again, is one error line. It was a traceback out of the
    engine's shutdown (serve's too), status 1 from the interpreter, and no
    summary."""
    folder = tmp_path / "journal"
    proc = subprocess.run(
        [sys.executable, "-c", _DISK_FULL, "transcribe", "--sample", "--no-partials",
         "--set", "journal.enabled=true", "--set", f"journal.dir={folder}"],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "Traceback" not in proc.stderr, proc.stderr
    # Each final was made, printed and reported: the exit status is what it
    # would be without the journal (README: 1 for decode_failed, final_lost).
    assert proc.returncode == 0, proc.stderr
    closing = [ln for ln in proc.stderr.splitlines() if "cannot close" in ln]
    assert len(closing) == 1 and "journal" in closing[0], proc.stderr
    assert len([ln for ln in proc.stdout.splitlines() if ln.startswith("[0:")]) == 5
    assert proc.stdout.count("journal_failed") >= 5, proc.stdout
    assert "5 finals" in proc.stderr, "the summary is still printed"


async def test_quiet_hides_every_status_line_as_in_json_mode(tmp_path: Path) -> None:
    """`-q` is `logging.level = "warning"` (docs/config.md): `serve -q` once
    still printed "serving captions on ..." (and "stopping: ...") while
    `transcribe -q` hid its summary, and `level = "warning"` in a config
    file hid neither; in json mode they were INFO records, hidden by both."""
    port = free_port()
    err_path = tmp_path / "serve.err"
    with err_path.open("w") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "evoxtral_stream", "serve", "--source", "sample",
            "--port", str(port), "-q", stdout=subprocess.PIPE, stderr=err,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                async with connect(f"ws://127.0.0.1:{port}/v1/captions") as ws:
                    await _hello(ws)
                break
            except OSError:
                assert proc.returncode is None and time.monotonic() < deadline, \
                    err_path.read_text()
                await asyncio.sleep(0.1)
        await _stop(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err_path.read_text()
    assert err_path.read_text() == ""
    for quiet in (["-q"], ["--set", "logging.level=warning"]):
        done = cli("transcribe", "--sample", "--serve", "--port", "0", *quiet)
        assert done.returncode == 0, done.stderr
        assert done.stderr == "" and "] " in done.stdout


def test_devices_without_a_sound_card_is_one_line(tmp_path: Path) -> None:
    proc = cli("devices")
    if proc.returncode == 0:
        pytest.skip("this machine has an audio input device")
    one_error_line(proc, "no audio input device")
    # devices needs nothing of the config: one that does not load (an
    # audio.device left as a placeholder, the reason to list the devices)
    # does not stop it.
    conf = tmp_path / "evoxtral.toml"
    conf.write_text('[audio]\ndevice = 3.5\n')
    assert "audio.device" in one_error_line(cli("serve", "--config", str(conf)))
    one_error_line(cli("devices", "--config", str(conf)), "no audio input device")


def test_serve_without_its_microphone_is_one_line_before_the_model_loads() -> None:
    """`serve` (source mic) with no such input device once loaded the model (a
    minute for Voxtral) and said it was serving before it failed. A name no
    device has fails the same way on a machine with a sound card."""
    proc = cli("serve", "--port", "0", "--set", "audio.device=no such microphone xyz")
    line = one_error_line(proc)
    assert "no audio input device" in line or "PortAudio" in line, line
    assert "backend:" not in proc.stderr  # refused before the model was loaded
    assert "serving" not in proc.stderr


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_eval_compares_streaming_with_offline(tmp_path: Path) -> None:
    from tests.speech import speak

    refs = ["[excited] Good evening, and welcome to the live captioning demo.",
            "Thank you for listening, and have a WONDERFUL night. [laughs]"]
    lines = []
    for i, ref in enumerate(refs):
        plain = ref.replace("[excited] ", "").replace(" [laughs]", "")
        sf.write(tmp_path / f"{i}.wav", speak(plain), 16000)
        lines.append(json.dumps({"audio": f"{i}.wav", "text": ref}))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "report.json"
    proc = cli("eval", str(manifest), "--compare-offline", "--json", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    assert "streaming - offline" in proc.stdout
    report = json.loads(out.read_text())
    streaming, offline = report["streaming"]["metrics"], report["offline"]["metrics"]
    # Case and punctuation count in the seed's WER, so allow the model's slips.
    assert streaming["wer"] <= 0.35 and offline["wer"] <= 0.35
    assert abs(report["delta"]["wer"] - (streaming["wer"] - offline["wer"])) < 1e-9
    assert streaming["tag_recall"] == 0.0  # Whisper writes no Evoxtral tags
    assert report["streaming"]["n"] == 2
    # The character error rate beside WER, in the table and the report.
    assert "CER (mean per utterance)" in proc.stdout and "CER (corpus)" in proc.stdout
    assert 0.0 <= streaming["cer"] <= 0.35 and 0.0 <= offline["corpus_cer"] <= 0.35
    assert abs(report["delta"]["cer"] - (streaming["cer"] - offline["cer"])) < 1e-9
    assert all("cer" in s for s in report["streaming"]["samples"])


def test_a_second_ctrl_c_during_eval_exits_130_without_crashing(tmp_path: Path) -> None:
    """eval has no partial report to write: Ctrl-C twice while the model
    thread is deep in a long batch ends it with status 130. The thread left
    inside CTranslate2 used to crash the interpreter at exit (status 139)."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio": str(sample_path()), "text": "x"}) + "\n"
                                for _ in range(2)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "evoxtral_stream", "eval", str(manifest),
         "--set", "stream.partial_interval_ms=0", "--set", "model.whisper.beam_size=5",
         "--set", "model.whisper.cpu_threads=1", "--set", "model.whisper.min_window_s=30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    err = _ctrl_c_twice_once_started(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "terminate called" not in err


def test_eval_bad_manifest_is_one_line(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": 3}\n')
    one_error_line(cli("eval", str(manifest)), "m.jsonl line 1")
    one_error_line(cli("eval", str(tmp_path / "none.jsonl")), "none.jsonl")


def test_eval_refuses_an_empty_reference_before_the_model_loads(tmp_path: Path) -> None:
    """A manifest line with ``"text": ""`` (a transcript missing) scored WER 0
    and perfect tag and emphasis scores whatever the model said, lifting the
    report unsaid. It is a bad line like the others: one error line naming
    it, status 2, before any decoding."""
    sf.write(tmp_path / "a.wav", np.zeros(16000, dtype=np.int16), 16000)
    manifest = tmp_path / "m.jsonl"
    for empty in ("", " \t"):
        manifest.write_text(json.dumps({"audio": "a.wav", "text": "hello"}) + "\n"
                            + json.dumps({"audio": "a.wav", "text": empty}) + "\n")
        proc = cli("eval", str(manifest))
        one_error_line(proc, f"{manifest} line 2: ", '"text" is empty')
        assert "backend:" not in proc.stderr


def test_eval_audio_that_cannot_be_read_is_one_line_before_the_model_loads(
        tmp_path: Path) -> None:
    """A manifest naming a missing or undecodable file was found out only after
    the model had loaded (a minute for Voxtral); now at once, with its line."""
    sf.write(tmp_path / "a.wav", np.zeros(16000, dtype=np.int16), 16000)
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 10)
    manifest = tmp_path / "m.jsonl"
    for name, needle in (("gone.wav", "does not exist"), ("junk.wav", "cannot decode")):
        manifest.write_text(json.dumps({"audio": "a.wav", "text": "hello"}) + "\n"
                            + json.dumps({"audio": name, "text": "hello"}) + "\n")
        proc = cli("eval", str(manifest))
        one_error_line(proc, f"{manifest} line 2: ", str(tmp_path / name), needle)
        assert "backend:" not in proc.stderr  # refused before the model was loaded


def test_eval_without_jiwer_is_one_line_before_decoding(tmp_path: Path) -> None:
    """The quick start installs no eval extra: eval says so at once, not with a
    traceback after streaming the whole manifest."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "jiwer.py").write_text('raise ImportError("jiwer hidden by the test")\n')
    sf.write(tmp_path / "a.wav", np.zeros(16000, dtype=np.int16), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "hello"}) + "\n")
    path = os.pathsep.join(p for p in (str(hidden), os.environ.get("PYTHONPATH")) if p)
    proc = cli("eval", str(manifest), env={"PYTHONPATH": path})
    # The checkout's command, as the README installs: a PyPI name is not ours.
    one_error_line(proc, "jiwer", "pip install -e '.[eval]' in the evoxtral-stream checkout")
    assert "backend:" not in proc.stderr  # refused before the model was loaded


def test_eval_report_that_cannot_be_written_is_refused_before_decoding(tmp_path: Path) -> None:
    """A typo in --json must not cost a whole manifest's run: it was only
    found when the report was written, after every file was decoded."""
    sf.write(tmp_path / "a.wav", np.zeros(16000, dtype=np.int16), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "hello"}) + "\n")
    for report, needle in ((tmp_path / "no" / "r.json", "does not exist"),
                           (tmp_path, "is a folder"),
                           # It used to overwrite the manifest or the audio.
                           (manifest, "would be overwritten"),
                           (tmp_path / "a.wav", "would be overwritten")):
        proc = cli("eval", str(manifest), "--json", str(report))
        one_error_line(proc, "--json", needle)
        assert "backend:" not in proc.stderr  # refused before the model was loaded
    assert json.loads(manifest.read_text())["text"] == "hello"


def test_mqtt_without_aiomqtt_is_one_line_before_decoding(tmp_path: Path) -> None:
    """README's MQTT line on the quick start's install (no mqtt extra); and
    config, which checks a configuration, says it too (it printed it, status 0)."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "aiomqtt.py").write_text('raise ImportError("aiomqtt hidden by the test")\n')
    path = os.pathsep.join(p for p in (str(hidden), os.environ.get("PYTHONPATH")) if p)
    for args in (["serve", "--source", "none", "--port", "0"],
                 ["transcribe", "--sample", "--serve", "--port", "0"], ["config"]):
        proc = cli(*args, "--set", "mqtt.enabled=true", env={"PYTHONPATH": path})
        one_error_line(proc, "aiomqtt", "pip install -e '.[mqtt]'", "mqtt.enabled")
        assert "backend:" not in proc.stderr  # refused before the model was loaded


def test_an_unsafe_bind_is_one_line_before_the_model_loads() -> None:
    """serve refused a non-loopback host without tokens before loading the
    model; transcribe --serve (which has --host too) only after it; config,
    which is how a configuration is checked, printed it with status 0."""
    for args in (["serve", "--source", "none"], ["transcribe", "--sample", "--serve"],
                 ["config"]):
        proc = cli(*args, "--host", "0.0.0.0", "--port", "0")
        one_error_line(proc, "server.host '0.0.0.0'", "[[auth.tokens]]")
        assert "backend:" not in proc.stderr  # refused before the model was loaded


def test_a_server_host_that_cannot_be_bound_does_not_quote_its_credentials() -> None:
    """server.host given as user:password@host (with anonymous access, so
    the unsafe-bind check passes) cannot be listened on: the error line
    quoted the password. The real command line, with a scripted model."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPTED_MODEL, "serve", "--source", "none", "--no-print",
         "--port", "0", "--set", "server.host=cam:hunter2@localhost",
         "--set", "server.allow_anonymous=true"],
        capture_output=True, text=True, timeout=60, cwd=root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{root / 'src'}:{root}"})
    one_error_line(proc, "cannot listen on <redacted>@localhost:0")
    assert "hunter2" not in proc.stderr, proc.stderr


# The real command line, with a scripted model that answers at once.
_SCRIPTED_MODEL = r"""
import sys
from evoxtral_stream import cli as cli_module
from tests.fakes import ScriptedBackend
from tests.helpers.model_loader import replace_model_loader
replace_model_loader(lambda cfg: ScriptedBackend(lambda audio: "words"))
sys.exit(cli_module.main(sys.argv[1:]))
"""


# The real command line, with a model loader that ends it, saying so.
_NO_MODEL = r"""
import sys
from evoxtral_stream import cli as cli_module
from tests.helpers.model_loader import replace_model_loader
def load(cfg):
    sys.exit("the model loader was called")
replace_model_loader(load)
sys.exit(cli_module.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(tls_cert, tls_key) pairs by name: a good one and three that do not load."""
    from tests.helpers.pki import self_signed

    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    _, other_key = self_signed(tmp_path_factory.mktemp("other"))
    return {"good": (cert, key), "mismatched": (cert, other_key),
            "encrypted": (cert, key.parent / "encrypted.key"),
            "missing": (cert, key.parent / "none.pem")}


@pytest.mark.parametrize("command", [["serve", "--source", "none"],
                                     ["transcribe", "--sample", "--serve"], ["config"]])
def test_tls_files_that_do_not_load_stop_serving_before_the_model_loads(
        tls_files: dict[str, tuple[Path, Path]], command: list[str]) -> None:
    """docs/config.md: an unreadable, mismatched or encrypted pair stops the
    start with one line. serve and transcribe --serve said it only once the
    server started, after the model had loaded (a minute for Voxtral); config,
    which checks what serve would refuse, printed the pair with status 0."""
    root = Path(__file__).resolve().parents[1]
    expected = {"mismatched": "are not a PEM certificate and its private key",
                "encrypted": "is encrypted; give an unencrypted key",
                "missing": "is not a file"}
    for which, needle in expected.items():
        cert, key = tls_files[which]
        proc = subprocess.run(
            [sys.executable, "-c", _NO_MODEL, *command, "--port", "0",
             "--set", f"server.tls_cert={cert}", "--set", f"server.tls_key={key}"],
            capture_output=True, text=True, timeout=60, cwd=root,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{root / 'src'}:{root}"})
        assert "model loader" not in proc.stderr, (which, proc.stderr)
        one_error_line(proc, "server.tls_", needle)
    if command == ["config"]:  # a pair that loads passes the check
        cert, key = tls_files["good"]
        proc = cli("config", "--set", f"server.tls_cert={cert}", "--set", f"server.tls_key={key}")
        assert proc.returncode == 0, proc.stderr


def test_subtitle_tag_styles_and_layout_come_from_config(tmp_path: Path) -> None:
    from tests.speech import speak

    wav = tmp_path / "talk.wav"
    sf.write(wav, speak("Thank you for listening, and have a wonderful night."), 16000)
    vtt, srt = tmp_path / "t.vtt", tmp_path / "t.srt"
    proc = cli("transcribe", str(wav), "--vtt", str(vtt), "--srt", str(srt), "-q",
               "--set", "captions.max_line_chars=16", "--set", "captions.vtt_tags=class")
    assert proc.returncode == 0, proc.stderr
    cue_lines = [ln for ln in vtt.read_text().splitlines()[1:]
                 if ln and "-->" not in ln]
    assert cue_lines and all(len(ln) <= 16 for ln in cue_lines), cue_lines
    assert srt.read_text().startswith("1\n")
    one_error_line(cli("transcribe", str(wav), "--set", "captions.srt_tags=class"),
                   "captions.srt_tags must be one of 'inline', 'strip'")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_no_cue_outlasts_the_audio(tmp_path: Path) -> None:
    """A short last word at the very end of a file: its cue is not stretched
    to the minimum cue length past the end of the audio."""
    from tests.speech import speak

    wav = tmp_path / "yes.wav"
    audio = speak("Yes.")
    sf.write(wav, audio, 16000)
    srt = tmp_path / "yes.srt"
    proc = cli("transcribe", str(wav), "--srt", str(srt), "-q")
    assert proc.returncode == 0, proc.stderr
    last_end = srt.read_text().strip().splitlines()[1].split(" --> ")[1]
    h, m, rest = last_end.split(":")
    seconds = int(h) * 3600 + int(m) * 60 + float(rest.replace(",", "."))
    assert seconds <= len(audio) / 16000 + 0.001, (seconds, len(audio) / 16000)


BY_HEADER, BY_QUERY, BY_PROTOCOL = "hdr-S3cret_1", "qry-S3cret_2", "sub-S3cret_3.x~"
UNKNOWN_TOKEN = "unknown-S3cret_4"
SECRETS = (BY_HEADER, BY_QUERY, BY_PROTOCOL, UNKNOWN_TOKEN)


def _tokens_override() -> str:
    """``--set`` value giving the three known tokens the subscribe role."""
    from evoxtral_stream.server.auth import hash_token

    tokens = ", ".join(f'{{hash = "{hash_token(t)}", roles = ["subscribe"]}}'
                       for t in (BY_HEADER, BY_QUERY, BY_PROTOCOL))
    return f"auth.tokens=[{tokens}]"


async def _serve_logging_to(log: Path, *args: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start ``serve --port 0 ARGS`` with stderr to the file ``log``; return the
    process and its captions URL once it serves. A file, not a pipe: nothing
    reads a pipe while a test runs, and --debug writes enough to fill one."""
    with log.open("w") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "evoxtral_stream", "serve", "--port", "0", *args,
            stdout=subprocess.PIPE, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    async def started() -> str:
        # The text line, or the msg of the JSON one: the URL is followed by a blank.
        while "serving captions on " not in (text := await asyncio.to_thread(log.read_text)):
            assert proc.returncode is None, text
            await asyncio.sleep(0.1)
        return text.split("serving captions on ", 1)[1].split()[0]

    try:
        return proc, await asyncio.wait_for(started(), 120)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise


async def _hello(ws: ClientConnection) -> dict[str, Any]:
    msg: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert msg["type"] == "hello"
    return msg


async def _present_every_token(url: str) -> None:
    """Subscribe with each carrier of a known token, and once with an unknown one."""
    async with connect(url, additional_headers={"authorization": f"Bearer {BY_HEADER}"}) \
            as ws:
        await _hello(ws)
    async with connect(f"{url}?stream=talk&token={BY_QUERY}") as ws:
        await _hello(ws)
    async with connect(url, subprotocols=[Subprotocol("other"),
                                          Subprotocol(f"evoxtral.token.{BY_PROTOCOL}")]) as ws:
        await _hello(ws)
    with pytest.raises(InvalidStatus):
        async with connect(url, additional_headers={"Authorization": f"Bearer {UNKNOWN_TOKEN}"}):
            pass


async def _stop(proc: asyncio.subprocess.Process) -> bytes:
    """SIGTERM ``proc``, wait for it; return its stdout."""
    try:
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_serve_debug_logs_every_handshake_line_but_no_token(tmp_path: Path) -> None:
    """``serve --debug`` logs each handshake header (websockets), yet no token:
    neither the one a client sends by header, query or subprotocol, nor the
    subprotocol the server echoes, nor a token it refuses."""
    log = tmp_path / "stderr.log"
    proc, url = await _serve_logging_to(log, "--source", "none", "--no-print", "--debug",
                                        "--set", _tokens_override())
    try:
        await _present_every_token(url)
    finally:
        await _stop(proc)
    text = log.read_text()
    for secret in SECRETS:
        assert secret not in text, text
    # The lines are there, redacted: both ways for the subprotocol.
    assert "< authorization: Bearer ***\n" in text, text
    assert "< GET /v1/captions?stream=talk&token=*** HTTP/1.1\n" in text, text
    assert "< Sec-WebSocket-Protocol: other, evoxtral.token.***\n" in text, text
    assert "> Sec-WebSocket-Protocol: evoxtral.token.***\n" in text, text
    assert "< Authorization: Bearer ***\n" in text, text
    assert "refused /v1/captions" in text, text


JSON_KEYS = {"ts", "level", "logger", "msg"}


def _json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a JSON object with the core keys, or fail naming the line."""
    records = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(obj, dict) and obj.keys() >= JSON_KEYS, line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["ts"]), line
        records.append(obj)
    return records


async def test_serve_json_logs_are_one_object_per_line_without_tokens(tmp_path: Path) -> None:
    """``serve --log-format json --debug`` on the bundled sample (embedded
    Whisper): every stderr line is a JSON object, status lines included; the
    handshake lines are there as messages, their tokens redacted; captions
    still go to stdout as text."""
    log = tmp_path / "stderr.log"
    proc, url = await _serve_logging_to(
        log, "--source", "sample", "--backend", "whisper", "--log-format", "json", "--debug",
        "--set", _tokens_override())
    try:
        await _present_every_token(url)
        async with connect(f"{url}?token={BY_QUERY}") as ws:  # until a final caption
            while not ((msg := json.loads(await asyncio.wait_for(ws.recv(), 60)))["type"]
                       == "caption" and msg["final"]):
                pass
    finally:
        out = (await _stop(proc)).decode()
    assert proc.returncode == 0
    text = log.read_text()
    for secret in SECRETS:
        assert secret not in text, text
    records = _json_lines(text)
    msgs = [r["msg"] for r in records]
    assert any(m.startswith("backend: whisper") for m in msgs), msgs
    assert any(m.startswith("serving captions on ws://") for m in msgs), msgs
    assert any(m.startswith("stopping: finishing open captions") for m in msgs), msgs
    assert {r["level"] for r in records} >= {"DEBUG", "INFO"}
    # The handshake lines are there, redacted (websockets logs one record each).
    for line in ("< GET /v1/captions?token=*** HTTP/1.1", "< authorization: Bearer ***",
                 "< Sec-WebSocket-Protocol: other, evoxtral.token.***",
                 "> Sec-WebSocket-Protocol: evoxtral.token.***",
                 "< Authorization: Bearer ***"):
        assert line in msgs, msgs
    assert any("refused /v1/captions" in m for m in msgs), msgs
    # Captions are not logs: text on stdout, as in text mode.
    captions = [line for line in out.splitlines() if line.startswith("[")]
    assert captions and "Good evening" in out, out


def test_transcribe_json_logs_and_json_errors(tmp_path: Path) -> None:
    """--log-format json: stderr is JSON lines, the summary an INFO record; a
    bad [logging] value is one ERROR record and status 2, in text mode the
    usual one line."""
    proc = cli("transcribe", "--sample", "--no-partials", "--log-format", "json")
    assert proc.returncode == 0, proc.stderr
    records = _json_lines(proc.stderr)
    assert any(" finals" in r["msg"] and r["level"] == "INFO" for r in records), records
    assert "] " in proc.stdout  # the captions
    # format from the config file; -q still wins over its level.
    mine = tmp_path / "mine.toml"
    mine.write_text('[logging]\nformat = "json"\nlevel = "debug"\n')
    proc = cli("transcribe", "--sample", "--no-partials", "--config", str(mine), "-q")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    proc = cli("transcribe", "--sample", "--log-format", "json",
               "--set", "logging.level=verbose")
    assert proc.returncode == 2
    [record] = _json_lines(proc.stderr)
    assert record["level"] == "ERROR"
    assert record["msg"] == ("logging.level must be one of 'debug', 'info', 'warning', "
                             "'error', got 'verbose'")
    one_error_line(cli("transcribe", "--sample", "--set", "logging.format=xml"),
                   "logging.format must be one of 'text', 'json', got 'xml'")
    # With --debug the traceback is the exc of one CRITICAL record.
    proc = cli("transcribe", "--sample", "--log-format", "json", "--debug",
               "--set", "vad.frame_ms=25")
    assert proc.returncode == 1
    [record] = _json_lines(proc.stderr)
    assert record["level"] == "CRITICAL"
    assert record["exc"].startswith("Traceback") and "vad.frame_ms" in record["exc"]


def test_usage_and_error_lines_in_text_mode_redact_tokens_as_json_mode_does() -> None:
    """A token in a mistyped argument (a URL given to --port, a header pasted
    after the command) or in a refused config value: json mode wrote
    ``***`` in its place, text mode the token itself, to stderr and so to
    the journal or a CI log; so did the traceback of --debug."""
    for args in (["serve", "--port", "ws://h/?token=s3cret"],
                 ["config", "Authorization: Bearer s3cret"],
                 ["config", "--set", "server.host=ws://h/?token=s3cret"]):
        proc = cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert "s3cret" not in proc.stderr, proc.stderr
        assert "***" in proc.stderr, proc.stderr
    # And the traceback --debug shows instead of the error line.
    proc = cli("config", "--set", "server.host=ws://h/?token=s3cret", "--debug")
    assert "Traceback" in proc.stderr and "s3cret" not in proc.stderr, proc.stderr


# Each a way a secret reaches a config error: (--set value, or a config file
# when it holds a newline; what the error must say). "hunter2" and 987654321
# stand for the secret.
_SECRET_ERRORS = [
    ('auth.tokens=["hunter2"]', "auth.tokens[0] must be a table, got <redacted> (text)"),
    ('auth.tokens="hunter2"', "auth.tokens must be an array, got <redacted> (text)"),
    ('auth.tokens={hash="hunter2"}', "auth.tokens must be an array, got <redacted> (a table)"),
    ('auth="hunter2"', "auth must be a table, got <redacted>"),
    ('auth.tokens=[{hash="hunter2", roles=["subscribe"]}]',
     "got <redacted>: it does not start with sha256:"),
    ('auth.tokens=[{hash="sha256:hunter2", roles=["subscribe"]}]',
     "got <redacted>: its digest is not 64 characters long"),
    (f'auth.tokens=[{{hash="sha256:{"A" * 57}hunter2", roles=["subscribe"]}}]',
     "got <redacted>: its digest holds characters other than 0-9 and a-f"),
    ('auth.tokens=[{hash=["hunter2"], roles=["subscribe"]}]',
     "auth.tokens[0].hash must be str, got <redacted> (an array)"),
    ('mqtt.password=["hunter2"]', "mqtt.password must be str, got <redacted> (an array)"),
    ('mqtt.password.x="hunter2"', "mqtt.password must be str, got <redacted> (a table)"),
    ("mqtt.host=mqtt://cam:pw@hunter2@broker:1883", "got 'mqtt://<redacted>@broker:1883'"),
    # The unsafe-bind check quoted server.host whole.
    ("server.host=cam:hunter2@0.0.0.0", "server.host '<redacted>@0.0.0.0' is reachable"),
    ("server.host=ws://cam:hunter2@0.0.0.0", "server.host 'ws://<redacted>@0.0.0.0' is"),
    # An override without a key, or without "=": the whole text was quoted.
    ("=hunter2", "override '=<redacted>' has no key: it must look like section.key=value"),
    ("mqtt.password hunter2",
     "override 'mqtt.password<redacted>' has no '=': it must look like section.key=value"),
    # ... and the value run into its key, all of it key characters.
    ("mqtt.passwordhunter2",
     "override 'mqtt.password<redacted>' has no '=': it must look like section.key=value"),
    ("auth.tokens[hunter2]", "override 'auth.tokens<redacted>' has no '='"),
    ("auth.tokenshunter2", "override 'auth.tokens<redacted>' has no '='"),
    # ... or with an "=" after all: a base64 password's padding (the key's
    # own "=" left out), one in the password, or one typed after it.
    ("mqtt.passwordhunter2==", "unknown config key 'mqtt.password<redacted>' (known here: "),
    ("mqtt.password hunter2=x", "unknown config key 'mqtt.password<redacted>' (known here: "),
    ("auth.tokenshunter2=", "unknown config key 'auth.tokens<redacted>' (known here: tokens)"),
    ('[mqtt]\nusername = "u"\npassword = ["hunter2"]\n', "mqtt.password must be str"),
    ('[[auth.tokens]]\nhash = "hunter2"\nroles = ["admin"]\n', "does not start with sha256:"),
    ('[[auth.tokens]]\nhash = 987654321\nroles = ["admin"]\n',
     "auth.tokens[0].hash must be text: quote it"),
    ('[auth]\ntokens = ["hunter2"]\n', "auth.tokens[0] must be a table, got <redacted>"),
    ('mqtt = "hunter2"\n', "mqtt must be a table, got <redacted>"),
    ('[mqtt]\npasswd = "hunter2"\n', "unknown config key 'mqtt.passwd'"),
]


@pytest.mark.parametrize(("given", "expected"), _SECRET_ERRORS)
def test_config_errors_say_what_is_wrong_with_a_secret_without_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        given: str, expected: str) -> None:
    """A bad auth.tokens value (a token pasted where its hash goes, say) or
    mqtt.password was quoted back in the error line, so into the journal or
    a CI log: `got 'hunter2'`, or a bad hash's first 16 characters. Now the
    line says what is wrong and "<redacted>" where the value was; from a
    --set, a --config file or $EVOXTRAL_CONFIG alike (and config, serve and
    reload print the same message)."""
    from evoxtral_stream import cli as cli_module

    if "\n" in given:
        mine = tmp_path / "mine.toml"
        mine.write_text(given)
        monkeypatch.setenv("EVOXTRAL_CONFIG", str(mine))
        argv = ["config"]
    else:
        argv = ["config", "--set", given]
    with pytest.raises(SystemExit) as exc:
        cli_module.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err and "987654321" not in err, err
    [line] = err.splitlines()
    assert line.startswith("evoxtral-stream: error: ") and expected in line, line


@pytest.mark.parametrize("argv", [
    ["serve", "--set", "mqtt.password", "hunter2"],
    ["transcribe", "talk.wav", "--set", "mqtt.password", "hunter2"],
    ["--set", "mqtt.password", "hunter2", "config"],
    ["--log-format", "json", "config", "--set", "mqtt.password", "hunter2"],
])
def test_a_set_given_as_two_words_is_said_without_its_value(argv: list[str]) -> None:
    """``--set mqtt.password hunter2`` (a blank for the "="): argparse
    refused the second word, the password, and its error line quoted it
    (``unrecognized arguments: hunter2``, ``invalid choice: 'hunter2'``
    before the command), so into the journal or a CI log. The --set is
    said instead, as when nothing follows it."""
    proc = cli(*argv)
    assert proc.returncode == 2, proc.stderr
    assert "hunter2" not in proc.stderr, proc.stderr
    said = "override 'mqtt.password' has no '=': it must look like section.key=value"
    if "json" in argv:
        [record] = _json_lines(proc.stderr)
        assert (record["level"], record["msg"]) == ("ERROR", said), record
    else:
        assert proc.stderr.splitlines() == [f"evoxtral-stream: error: {said}"], proc.stderr


def test_json_error_records_do_not_hold_a_secret_either(tmp_path: Path) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text('[[auth.tokens]]\nhash = "sha256:hunter2"\nroles = ["admin"]\n')
    for args in (["--config", str(mine)], ["--set", 'mqtt.password=["hunter2"]']):
        proc = cli("config", "--log-format", "json", *args)
        assert proc.returncode == 2, proc.stderr
        [record] = _json_lines(proc.stderr)
        assert record["level"] == "ERROR" and "<redacted>" in record["msg"], record
        assert "hunter2" not in proc.stderr, proc.stderr


def test_config_prints_the_effective_config_and_checks_it(tmp_path: Path) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text("[server]\nport = 9100\n[mqtt]\nusername = \"cam\"\npassword = \"s3cret\"\n")
    proc = cli("config", "--config", str(mine), "--set", "vad.aggressiveness=3", "--debug")
    assert proc.returncode == 0, proc.stderr
    effective = tomllib.loads(proc.stdout)
    assert effective["server"]["port"] == 9100            # the file
    assert effective["vad"]["aggressiveness"] == 3        # --set
    assert effective["logging"]["level"] == "debug"       # a flag
    assert effective["vad"]["frame_ms"] == 30             # a default
    assert "s3cret" not in proc.stdout
    # What it prints is a config file that gives the same config.
    saved = tmp_path / "effective.toml"
    saved.write_text(proc.stdout)
    again = cli("config", "--config", str(saved))
    assert again.returncode == 0, again.stderr
    assert again.stdout == proc.stdout
    one_error_line(cli("config", "--set", "vad.aggressiveness=9"),
                   "vad.aggressiveness must be 0..3, got 9")


def test_config_takes_the_shortcut_flags_of_serve_and_transcribe() -> None:
    """docs/config.md: `config` takes the same flags as the command it checks,
    so `serve --port 9200 --host localhost` and `transcribe --no-partials`
    can be checked as they will run."""
    proc = cli("config", "--port", "9200", "--host", "localhost", "--no-partials")
    assert proc.returncode == 0, proc.stderr
    effective = tomllib.loads(proc.stdout)
    assert effective["server"]["port"] == 9200
    assert effective["server"]["host"] == "localhost"
    assert effective["stream"]["partial_interval_ms"] == 0


def test_common_options_work_before_the_command_too(tmp_path: Path) -> None:
    """`evoxtral-stream --config prod.toml -q serve` as in git: the options
    every command takes may come before it. --set values add up, in command
    line order; another option given on both sides takes the command's."""
    mine = tmp_path / "mine.toml"
    mine.write_text("[server]\nport = 9100\n")
    proc = cli("--config", str(mine), "--set", "vad.aggressiveness=1",
               "--set", "server.host=localhost", "-q", "--backend", "whisper",
               "config", "--set", "vad.aggressiveness=3", "--backend", "auto")
    assert proc.returncode == 0, proc.stderr
    effective = tomllib.loads(proc.stdout)
    assert effective["server"]["port"] == 9100                 # --config before
    assert effective["server"]["host"] == "localhost"          # --set before
    assert effective["vad"]["aggressiveness"] == 3             # the later --set
    assert effective["logging"]["level"] == "warning"          # -q before
    assert effective["model"]["backend"] == "auto"             # the command's own
    # An error in an option before the command is still one line, status 2.
    one_error_line(cli("--set", "vad.aggressiveness=9", "config"),
                   "vad.aggressiveness must be 0..3, got 9")
    json_error = cli("--log-format", "json", "config", "--set", "vad.frame_ms=25")
    assert json_error.returncode == 2
    assert json.loads(json_error.stderr.strip().splitlines()[-1])["level"] == "ERROR"


@pytest.mark.parametrize("command", ["serve", "transcribe", "config"])
def test_serve_transcribe_and_config_take_the_same_shortcuts(command: str) -> None:
    """docs/config.md lists --host, --port and --no-partials as shortcuts, and
    config takes all three; transcribe had no --host (for --serve) and serve
    no --no-partials."""
    from evoxtral_stream.cli.parser import _parser

    args = _parser().parse_args([command, "--host", "localhost", "--port", "9200",
                                 "--no-partials"])
    cfg = _load_config(args)
    assert (cfg.server.host, cfg.server.port) == ("localhost", 9200)
    assert cfg.stream.partial_interval_ms == 0


async def test_serve_applies_new_tokens_at_sighup(tmp_path: Path) -> None:
    """SIGHUP re-reads the config file: a removed token's connection is closed
    (token_revoked), a new token gets in, other changes wait for a restart,
    and a broken file changes nothing."""
    from evoxtral_stream.server.auth import hash_token

    def tokens(*names: str) -> str:
        return "".join(f'[[auth.tokens]]\nname = "{n}"\nhash = "{hash_token(n + "-secret")}"\n'
                       f'roles = ["subscribe"]\n' for n in names)

    async def logged(needle: str) -> str:
        deadline = time.monotonic() + 30
        while needle not in (text := log.read_text()):
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.1)
        return text

    conf = tmp_path / "serve.toml"
    conf.write_text(tokens("old", "kept"))
    log = tmp_path / "serve.log"
    proc, url = await _serve_logging_to(log, "--config", str(conf), "--source", "none",
                                        "--no-print")
    try:
        async with connect(f"{url}?token=old-secret") as old, \
                connect(f"{url}?token=kept-secret") as kept:
            await _hello(old)
            await _hello(kept)
            conf.write_text(tokens("kept", "new") + "[vad]\naggressiveness = 3\n")
            proc.send_signal(signal.SIGHUP)
            err = json.loads(await asyncio.wait_for(old.recv(), 30))
            assert err["type"] == "error" and err["code"] == "token_revoked"
            assert "token old was revoked" in err["message"]
            await asyncio.wait_for(old.wait_closed(), 30)
            assert old.close_code == 1008
            async with connect(f"{url}?token=new-secret") as new:
                await _hello(new)
            with pytest.raises(InvalidStatus):
                async with connect(f"{url}?token=old-secret"):
                    pass
            await logged("reload: [auth] applied: 2 token(s); 1 connection(s)")
            await logged("reload: [vad] changed; only [auth] is applied at a reload")
            # A file that does not load: nothing changes, the server goes on.
            conf.write_text("[auth\n")
            proc.send_signal(signal.SIGHUP)
            assert "is not valid TOML" in await logged("the running configuration is kept")
            async with connect(f"{url}?token=new-secret") as new:
                await _hello(new)
            await kept.ping()
        await _stop(proc)
        assert proc.returncode == 0, log.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_sighup_while_the_model_loads_is_applied_once_serving(tmp_path: Path) -> None:
    """A SIGHUP (``systemctl reload``) that comes while ``serve`` loads the
    model is kept and applied once it serves. Its default action used to end
    the process at once, silently (status 129)."""
    from evoxtral_stream.server.auth import hash_token

    def token(name: str) -> str:
        return (f'[[auth.tokens]]\nname = "{name}"\nhash = "{hash_token(name + "-secret")}"\n'
                'roles = ["subscribe"]\n')

    conf = tmp_path / "serve.toml"
    conf.write_text(token("old"))
    proc = _popen_serve("--source", "none", "--no-print", "--config", str(conf))
    assert proc.stderr is not None
    try:
        url = ""
        for line in proc.stderr:
            if "backend: " in line:   # chosen, and about to load
                conf.write_text(token("new"))
                proc.send_signal(signal.SIGHUP)
            if "serving captions on " in line:
                url = line.split("serving captions on ", 1)[1].split()[0]
                break
        assert url, f"serve ended at a SIGHUP while loading (status {proc.wait(10)})"
        deadline = time.monotonic() + 30
        while True:   # the reload runs once serving
            try:
                async with connect(f"{url}?token=new-secret") as ws:
                    await _hello(ws)
                break
            except InvalidStatus:
                assert time.monotonic() < deadline, "the SIGHUP while loading was not applied"
                await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        proc.kill()
        proc.communicate()


def test_a_language_whisper_cannot_transcribe_is_one_line_before_decoding() -> None:
    one_error_line(cli("transcribe", "--sample", "--backend", "whisper",
                       "--set", "model.language=fr"),
                   "model.language 'fr' is not a language this Whisper model transcribes")


def _run_to(stdout: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The command with stdout on ``/dev/full``, or (``"closed pipe"``) on a
    pipe whose reader has already left, as after ``| head``."""
    if stdout == "closed pipe":
        read, write = os.pipe()
        os.close(read)
        out: Any = write
    else:
        out = open(stdout, "w")  # noqa: SIM115 (closed below)
    try:
        return subprocess.run([sys.executable, "-m", "evoxtral_stream", *args],
                              input=stdin, stdout=out, stderr=subprocess.PIPE, text=True,
                              timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        os.close(out) if isinstance(out, int) else out.close()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("stdout", ["/dev/full", "closed pipe"])
def test_config_hash_token_and_eval_on_a_stdout_that_takes_nothing(
        tmp_path: Path, stdout: str) -> None:
    """stdout on a full disk: one error line and status 2, as transcribe and
    subtitles do; a pipe whose reader left (``| head``): nothing on stderr
    and status 141. Either way eval's --json report is still written. Each
    used to end with an OSError (or BrokenPipeError) traceback and status 1,
    eval's report lost with it after the whole manifest was decoded; then a
    closed pipe was an error line and status 2, where ``| head`` is no
    error."""
    def check(proc: subprocess.CompletedProcess[str], what: str) -> None:
        if stdout == "closed pipe":
            assert (proc.returncode, proc.stderr) == (141, ""), proc.stderr
        else:
            one_error_line(proc, f"cannot write {what} to standard output")
        assert "Exception ignored" not in proc.stderr

    for args, stdin, what in ((["config"], "", "the configuration"),
                              (["hash-token"], "s3cret\n", "the hash")):
        check(_run_to(stdout, *args, stdin=stdin), what)
    sf.write(tmp_path / "a.wav", np.zeros(16000, dtype=np.int16), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "hello"}) + "\n")
    report = tmp_path / "r.json"
    check(_run_to(stdout, "eval", str(manifest), "--json", str(report), "-q"), "the report")
    assert json.loads(report.read_text())["streaming"]["n"] == 1


def test_hash_token_of_bytes_that_are_not_utf8_is_one_line() -> None:
    """Tokens are hashed as UTF-8, so bytes that are not UTF-8 can match no
    token a client sends: one error line. They used to end in a
    UnicodeEncodeError traceback."""
    proc = subprocess.run([sys.executable, "-m", "evoxtral_stream", "hash-token"],
                          input=b"\xff\xfesecret\n", capture_output=True, timeout=60,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, "",
                                               proc.stderr.decode()), "not UTF-8")
    ok = subprocess.run([sys.executable, "-m", "evoxtral_stream", "hash-token"],
                        input=b"s3cret\r\n", capture_output=True, timeout=60)
    from evoxtral_stream.server.auth import hash_token

    assert ok.stdout.decode() == hash_token("s3cret") + "\n", ok.stderr


def test_hash_token_works_beside_a_config_whose_token_entry_is_still_a_placeholder(
        tmp_path: Path) -> None:
    """hash-token loaded the config (--config, or $EVOXTRAL_CONFIG as a
    service's environment sets it) and stopped on its errors: a
    [[auth.tokens]] entry with the placeholder hash of the README's example,
    or the token itself pasted there, refused the one command that makes the
    hash to put there ("print it with `evoxtral-stream hash-token`")."""
    conf = tmp_path / "evoxtral.toml"
    conf.write_text('[[auth.tokens]]\nname = "studio"\nhash = "sha256:..."\n'
                    'roles = ["ingest"]\n')
    for args, env in ((["--config", str(conf)], {}), ([], {"EVOXTRAL_CONFIG": str(conf)})):
        proc = subprocess.run([sys.executable, "-m", "evoxtral_stream", "hash-token", *args],
                              input="s3cret\n", capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == hash_token("s3cret") + "\n"
    # A config it can read still sets how its errors are told.
    conf.write_text('[logging]\nformat = "json"\n')
    proc = subprocess.run([sys.executable, "-m", "evoxtral_stream", "hash-token", "--config",
                           str(conf)], input="\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert json.loads(proc.stderr.splitlines()[-1])["msg"].endswith("got an empty line")


@pytest.mark.parametrize(("stdin", "why"), [
    (" s3cret\n", "starts or ends with blanks"), ("s3cret \t\n", "starts or ends with blanks"),
    ("one\ntwo\n", "more lines followed"),
    ("sécret\n", "not printable ASCII"), ("s€cret\n", "not printable ASCII"),
    ("日本語のトークン\n", "not printable ASCII"), ("s3\x01cret\n", "not printable ASCII"),
    ("s3\tcret\n", "not printable ASCII"), ("s3\x7fcret\n", "not printable ASCII")])
def test_hash_token_refuses_a_token_no_client_could_send_or_a_list(
        stdin: str, why: str) -> None:
    """hash-token hashed ' s3cret' (a paste with a blank) as it was, while
    the server strips the blanks around an Authorization header's token:
    that hash never matched. A second line was silently ignored. A token
    that is not printable ASCII was hashed too, though the server reads an
    Authorization header as Latin-1 (curl's UTF-8 never matches, and
    websockets cannot send what Latin-1 lacks), no subprotocol holds one,
    and a control character but tab fails the header (test_auth's
    test_a_token_that_is_not_ascii_gets_in_only_by_the_query_or_a_latin1_header)."""
    # Bytes: UTF-8 whatever this test's locale, as hash-token reads them.
    proc = subprocess.run([sys.executable, "-m", "evoxtral_stream", "hash-token"],
                          input=stdin.encode(), capture_output=True, timeout=60)
    one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, "",
                                               proc.stderr.decode()), why)
    assert proc.stdout == b""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_stderr_that_takes_nothing_leaves_the_exit_status_as_it_was(tmp_path: Path) -> None:
    """stderr on a full disk: the status lines and the error line are lost,
    but not the exit status. A transcribe that made every caption used to
    exit 1 (README: a caption failed) from its summary line's OSError, and a
    bad config value 1 instead of 2."""
    sf.write(tmp_path / "a.wav", np.zeros(16000, dtype=np.int16), 16000)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open("/dev/full", "w") as full:
        ok = subprocess.run([sys.executable, "-m", "evoxtral_stream", "transcribe",
                             str(tmp_path / "a.wav")], stdout=subprocess.PIPE, stderr=full,
                            text=True, timeout=240, env=env)
        bad = subprocess.run([sys.executable, "-m", "evoxtral_stream", "config", "--set",
                              "vad.aggressiveness=9"], stdout=subprocess.PIPE, stderr=full,
                             text=True, timeout=60, env=env)
    assert ok.returncode == 0
    assert bad.returncode == 2 and bad.stdout == ""


def test_a_file_name_that_is_not_utf8_gives_a_stream_id_that_is(tmp_path: Path) -> None:
    """A Latin-1 file name (café.wav from an old share) is no UTF-8: Python
    holds its byte 0xE9 as a lone surrogate, which the stream id used to
    keep, ending in a UnicodeEncodeError traceback. It becomes "_", as a
    control character does."""
    name = os.fsdecode(b"caf\xe9.wav")
    sf.write(tmp_path / "a.wav", np.zeros(16000, dtype=np.int16), 16000)
    (tmp_path / "a.wav").rename(tmp_path / name)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "evoxtral_stream", "transcribe",
                           os.fsencode(tmp_path / name), "--srt", f"{out}/",
                           "--jsonl", str(tmp_path / "all.jsonl")],
                          capture_output=True, timeout=240,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert [p.name for p in out.iterdir()] == ["caf_.srt"]
    started = json.loads((tmp_path / "all.jsonl").read_text().splitlines()[0])
    assert started["stream"] == "caf_"


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_eval_with_a_failed_decode_says_which_lines_and_exits_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A final whose decode failed (a GPU out of memory on one long file) is
    closed with its last partial's text: eval scored that as the model's
    answer and exited 0, a score silently not the model's. Now the report
    names the manifest lines (also in --json) and the status is 1, as
    transcribe's is. The backend is scripted: a real one cannot be made to
    fail on one file."""
    from evoxtral_stream import cli as cli_module
    from evoxtral_stream.cli import tools as cli_tools
    from tests.fakes import ScriptedBackend
    from tests.speech import speak

    short, long = speak("hello there, this is the first file"), speak(
        "and this is the second file, which is longer and fails")
    for name, audio in (("a.wav", short), ("b.wav", long)):
        sf.write(tmp_path / name, audio, 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio": n, "text": "words"}) + "\n"
                                for n in ("a.wav", "b.wav")))
    backend = ScriptedBackend(lambda a: "words", fail_when=lambda a: len(a) > len(short) + 2000)
    monkeypatch.setattr(cli_tools, "load_backend", lambda cfg: backend)
    report = tmp_path / "r.json"
    assert cli_module.main(["eval", str(manifest), "--json", str(report), "-q"]) == 1
    assert f"{manifest} line 2: a decode failed" in caplog.text, caplog.text
    assert json.loads(report.read_text())["decode_failed"] == [2]


def test_eval_compare_offline_with_a_failed_offline_decode_exits_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The offline pass decodes a whole file in one call (a batch of 30 s
    pieces), which the backend may fail (the GPU out of memory, where the
    worker's smaller batches did not): that ended eval in a traceback after
    the whole streaming pass. Now it is that file's failure, as in
    streaming: named, in the report, status 1."""
    from evoxtral_stream import cli as cli_module
    from evoxtral_stream.cli import tools as cli_tools
    from tests.fakes import ScriptedBackend

    rng = np.random.default_rng(3)
    sizes = {"a.wav": 16000, "b.wav": 24000}
    silence = np.zeros(8000, np.int16)  # around the sound: a segment is not the file
    for name, n in sizes.items():
        sound = (rng.standard_normal(n) * 3000).astype(np.int16)
        sf.write(tmp_path / name, np.concatenate([silence, sound, silence]), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio": n, "text": "words"}) + "\n"
                                for n in sizes))
    # Only the whole of b.wav, which only the offline pass asks for.
    backend = ScriptedBackend(lambda a: "words", fail_when=lambda a: len(a) == 40000)
    monkeypatch.setattr(cli_tools, "load_backend", lambda cfg: backend)
    report = tmp_path / "r.json"
    assert cli_module.main(["eval", str(manifest), "--compare-offline", "--json", str(report),
                            "-q"]) == 1
    assert f"{manifest} line 2: a decode failed" in caplog.text, caplog.text
    assert json.loads(report.read_text())["decode_failed"] == [2]


def test_an_eval_report_cut_short_by_a_full_disk_leaves_the_old_report_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills up partway through --json: one error line, status 2,
    the report of an earlier run untouched and no .part left. It was written
    in place: the old report emptied and left cut short, not JSON. (The disk
    fills at a file size limit, for real: a full disk cuts a write short and
    refuses the next one just so.) Nor may the .part file the report is
    written to first be the manifest."""
    from evoxtral_stream import cli as cli_module
    from evoxtral_stream.cli import tools as cli_tools
    from tests.fakes import ScriptedBackend
    from tests.helpers.disk import disk_full_after

    rng = np.random.default_rng(5)
    silence = np.zeros(8000, np.int16)
    sound = (rng.standard_normal(16000) * 3000).astype(np.int16)
    sf.write(tmp_path / "a.wav", np.concatenate([silence, sound, silence]), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "words"}) + "\n")
    monkeypatch.setattr(cli_tools, "load_backend",
                        lambda cfg: ScriptedBackend(lambda a: "words"))
    report = tmp_path / "r.json"
    report.write_text('{"old": "report"}\n')
    with disk_full_after(200), pytest.raises(SystemExit) as exit_:
        cli_module.main(["eval", str(manifest), "--json", str(report), "-q"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"evoxtral-stream: error: cannot write {report}: File too large"], err
    assert json.loads(report.read_text()) == {"old": "report"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "m.jsonl", "r.json"]
    # Refused before decoding: writing r.json would first remove r.json.part.
    staged = tmp_path / "r.json.part"
    manifest.rename(staged)
    monkeypatch.setattr(cli_tools, "load_backend", lambda cfg: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exit_:
        cli_module.main(["eval", str(staged), "--json", str(report), "-q"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would be overwritten" in err[0], err
    assert json.loads(staged.read_text())["audio"] == "a.wav"


def test_closed_standard_streams_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A stream the caller closed (``>&-``, ``<&-``) is None in Python: config,
    hash-token and transcribe ended in an AttributeError traceback. Closed
    stdout is a stdout that takes nothing (status 2, the files still
    written); closed stdin reads as empty."""
    srt = tmp_path / "s.srt"

    def run(redirect: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-c", f'"$0" -m evoxtral_stream "$@" {redirect}',
                               sys.executable, *args], capture_output=True, text=True,
                              timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    one_error_line(run(">&-", "config"), "cannot write the configuration to standard output")
    one_error_line(run("<&-", "hash-token"), "got an empty line")
    one_error_line(run(">&-", "transcribe", "--sample", "--no-partials", "--srt", str(srt)),
                   "cannot write captions to standard output")
    assert srt.read_text().count(" --> ") >= 5, "the subtitles hold every final"
    assert run("2>&-", "config", "--set", "vad.aggressiveness=9").returncode == 2


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_closed_standard_input_reads_as_empty_not_as_the_file_opened_in_its_place() -> None:
    """``transcribe - <&-``: descriptor 0 was the first the process opened
    and kept, the log writer's copy of stderr, and ``-`` (/dev/stdin) read
    that: with stderr a pipe, the process read its own log's pipe, whose
    writing end it holds, and waited for its end for ever. Descriptors
    closed at the start are /dev/null from it: ``-`` reads as empty, as
    with ``</dev/null``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    closed = subprocess.run(["sh", "-c", 'exec "$0" -m evoxtral_stream transcribe - <&-',
                             sys.executable], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, timeout=120, env=env)
    empty = subprocess.run([sys.executable, "-m", "evoxtral_stream", "transcribe", "-"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, timeout=120, env=env)
    assert one_error_line(closed, "/dev/stdin") == one_error_line(empty)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_closed_descriptors_are_filled_with_dev_null_that_programs_started_inherit(
        tmp_path: Path) -> None:
    """fill_closed_descriptors: each of 0-2 closed is /dev/null, inherited by
    a program started from there (os.open's are not), and Python's streams
    stay None: the process still knows it has none."""
    code = ("import os, subprocess, sys\n"
            "from evoxtral_stream.startup import fill_closed_descriptors\n"
            "fill_closed_descriptors()\n"
            "own = [os.readlink(f'/proc/self/fd/{fd}') for fd in (0, 1, 2)]\n"
            "child = subprocess.run(['readlink', '/proc/self/fd/0', '/proc/self/fd/2'],"
            " stdout=subprocess.PIPE, text=True).stdout.split()\n"
            "out = os.open(sys.argv[1], os.O_WRONLY)\n"
            "os.write(out, repr((own, child, sys.stdin, sys.stdout, sys.stderr,"
            " sys.__stderr__)).encode())\n")
    report = tmp_path / "report"
    report.touch()
    proc = subprocess.run(["sh", "-c", 'exec "$0" -c "$1" "$2" <&- >&- 2>&-', sys.executable,
                           code, str(report)], timeout=120)
    assert proc.returncode == 0
    assert report.read_text() == repr((["/dev/null"] * 3, ["/dev/null"] * 2,
                                       None, None, None, None))


def test_an_input_that_cannot_be_read_is_one_error_line_whatever_the_reason(
        tmp_path: Path) -> None:
    """A name too long, a symlink loop (Path.resolve raised RuntimeError before
    Python 3.13), or a name with a line break: one line, exit status 2."""
    loop = tmp_path / "loop.wav"
    loop.symlink_to(loop)
    one_error_line(cli("transcribe", str(tmp_path / ("a" * 300 + ".wav"))), "aaaa")
    one_error_line(cli("transcribe", str(loop)), "loop.wav")
    proc = cli("transcribe", str(tmp_path / "a\nevoxtral-stream: error: b.wav"))
    assert one_error_line(proc, "a\\nevoxtral-stream")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_an_output_that_is_a_symlink_loop_is_no_traceback(tmp_path: Path) -> None:
    audio = tmp_path / "a.wav"
    sf.write(audio, np.zeros(8000, np.int16), 16000)
    loop = tmp_path / "loop.srt"
    loop.symlink_to(loop)
    proc = cli("transcribe", str(audio), "--srt", str(loop))
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 2), proc.stderr


@pytest.mark.parametrize("name", ["loop.wav", "a\u0000.wav"])
def test_eval_json_with_an_unreadable_audio_path_is_one_line_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        name: str) -> None:
    """README: every file is read before the model loads, one that cannot be
    read is one error line naming its manifest line (exit 2). Without --json
    it is; with --json the refusal check (Path.resolve) raises first:
    RuntimeError for a symlink loop (Python < 3.13), ValueError for a NUL."""
    from evoxtral_stream import cli as cli_module
    from evoxtral_stream.cli import tools as cli_tools

    (tmp_path / "loop.wav").symlink_to(tmp_path / "loop.wav")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": name, "text": "hello"}) + "\n")
    monkeypatch.setattr(cli_tools, "load_backend", lambda cfg: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exc:
        cli_module.main(["eval", str(manifest), "--json", str(tmp_path / "r.json")])
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines()
             if ln.startswith("evoxtral-stream: error:")]
    assert len(lines) == 1 and "line 1" in lines[0], lines


_SRT_TO_STDOUT = r"""
import sys, numpy as np, soundfile as sf
from pathlib import Path
from evoxtral_stream import cli as cli_module
from tests.fakes import ScriptedBackend, words_so_far
from tests.helpers.model_loader import replace_model_loader
wav = Path(sys.argv[1])
rng = np.random.default_rng(3)
sil = np.zeros(8000, np.int16)
sf.write(wav, np.concatenate([sil, (rng.standard_normal(16000) * 3000).astype(np.int16), sil]),
         16000)
replace_model_loader(lambda cfg: ScriptedBackend(words_so_far))
sys.exit(cli_module.main(["transcribe", str(wav), *sys.argv[2:], "-q"]))
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("target", ["/dev/stdout", "-"])
@pytest.mark.parametrize("flag", ["--srt", "--vtt", "--jsonl"])
def test_srt_to_dev_stdout_into_a_pipe_is_written_in_place(tmp_path: Path, flag: str,
                                                           target: str) -> None:
    """README: "a target that is a FIFO or a device, such as /dev/stdout, is
    written in place". With stdout a pipe (| less, | tee), /dev/stdout is a
    link to /proc/PID/fd/pipe:[N], which realpath cannot follow: part_path
    made /proc/PID/fd/pipe:[N].part, and transcribe failed with exit 2.
    And stdout holds that output only: the caption lines were printed into
    it too, between the cues (an SRT no player reads, JSON lines no parser).
    ``-`` is stdout, as it is stdin for the audio (it made a file named -)."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _SRT_TO_STDOUT, str(tmp_path / "a.wav"), flag, target],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1",
             "PYTHONPATH": f"{root / 'src'}:{root}"})
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "-").exists()
    assert "w0 w1" in proc.stdout, proc.stdout
    if flag == "--jsonl":
        assert all(json.loads(line) for line in proc.stdout.splitlines()), proc.stdout
    else:
        cues = proc.stdout.removeprefix("WEBVTT\n\n")
        assert re.fullmatch(r"(?:(?:\d+\n)?[\d:.,]+ --> [\d:.,]+\n(?:[^\n]+\n)+\n?)+",
                            cues), proc.stdout



@pytest.mark.parametrize("flag", ["--srt", "--jsonl"])
def test_an_output_into_standard_output_appended_to_a_file_keeps_what_it_held(
        tmp_path: Path, flag: str) -> None:
    """``transcribe talk.wav --jsonl - >> log.jsonl``: ``-`` is standard
    output, so the file it is appended to keeps what it held. ``--jsonl``
    opened /dev/stdout anew, which emptied it, and ``--srt`` wrote it to
    ``log.jsonl.part`` renamed over it."""
    root = Path(__file__).resolve().parents[1]
    log = tmp_path / "log.txt"
    log.write_text("held before\n")
    with open(log, "a") as out:
        proc = subprocess.run(
            [sys.executable, "-c", _SRT_TO_STDOUT, str(tmp_path / "a.wav"), flag, "-"],
            stdout=out, stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp_path,
            env={**os.environ, "HF_HUB_OFFLINE": "1",
                 "PYTHONPATH": f"{root / 'src'}:{root}"})
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    assert text.startswith("held before\n") and "w0 w1" in text, text
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("flag", ["--srt", "--jsonl"])
def test_an_output_into_a_closed_standard_output_is_refused_and_writes_nothing_else(
        tmp_path: Path, flag: str) -> None:
    """``transcribe talk.wav --jsonl - >&- 2>> err.log``: with stdout closed,
    /dev/stdout is whatever the process opened in its place (the copy of
    stderr the log writer takes): ``--jsonl`` wrote its lines into
    err.log, and ``--srt`` wrote err.log.part and renamed it over err.log
    (what it held and the error lines gone). It is refused, in one line."""
    root = Path(__file__).resolve().parents[1]
    err = tmp_path / "err.log"
    err.write_text("held before\n")
    script = tmp_path / "run.py"
    script.write_text(_SRT_TO_STDOUT)
    with open(err, "a") as stderr:
        proc = subprocess.run(
            ["sh", "-c", 'exec "$0" "$@" >&-', sys.executable, str(script),
             str(tmp_path / "a.wav"), flag, "-"],
            stdout=subprocess.DEVNULL, stderr=stderr, timeout=120, cwd=tmp_path,
            env={**os.environ, "HF_HUB_OFFLINE": "1",
                 "PYTHONPATH": f"{root / 'src'}:{root}"})
    text = err.read_text()
    assert proc.returncode == 2, text
    assert text.startswith("held before\n"), text
    assert "w0 w1" not in text and "standard output is closed" in text, text
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_an_output_onto_the_terminal_gets_no_progress_bar(tmp_path: Path) -> None:
    """``transcribe talk.wav --srt -`` in a terminal: the cues are written
    cue by cue onto the terminal, which stderr's progress bar shares. The
    bar, drawn on the row below the cursor, was overwritten by the cues'
    lines only as far as they reached, and the rest of it stayed beside the
    cue's times. An output onto that terminal now gets no bar (a pipe or a
    file does: its bar is on another screen)."""
    import fcntl
    import struct
    import termios

    root = Path(__file__).resolve().parents[1]
    script = _SRT_TO_STDOUT.replace(', "-q"]', "]")

    def run(*args: str) -> str:
        main_fd, tty = os.openpty()
        fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", script, str(tmp_path / "a.wav"), *args],
                stdin=subprocess.DEVNULL, stdout=tty, stderr=tty, cwd=tmp_path,
                env={**os.environ, "HF_HUB_OFFLINE": "1",
                     "PYTHONPATH": f"{root / 'src'}:{root}"})
            os.close(tty)
            tty = -1
            written = bytearray()
            with contextlib.suppress(OSError):  # EIO: every writer has closed it
                while chunk := os.read(main_fd, 65536):
                    written.extend(chunk)
            assert proc.wait(timeout=120) == 0, written.decode(errors="replace")
        finally:
            os.close(main_fd)
            if tty >= 0:
                os.close(tty)
        return written.decode(errors="replace")

    assert "%|" in run(), "no bar even without an output on the terminal"
    shown = run("--srt", "-")
    assert "00:00:00," in shown and "w0 w1" in shown, shown
    assert "%|" not in shown, shown


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_jsonl_that_is_stdout_s_file_is_not_written_over_by_caption_lines(
        tmp_path: Path) -> None:
    """``transcribe a.wav --jsonl out.jsonl > out.jsonl``: stdout and the
    --jsonl are one file, written from two offsets, so the caption lines
    overwrote JSON lines. Stdout being an output, no caption is printed."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out.jsonl"
    with out.open("w") as stdout:
        proc = subprocess.run(
            [sys.executable, "-c", _SRT_TO_STDOUT, str(tmp_path / "a.wav"), "--jsonl", str(out)],
            stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120, cwd=root,
            env={**os.environ, "HF_HUB_OFFLINE": "1",
                 "PYTHONPATH": f"{root / 'src'}:{root}"})
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert events[0]["type"] == "stream.started" and events[-1]["type"] == "stream.ended"


class _SlowLater(ScriptedBackend):
    """Quick until ``slow`` is set; then each call takes 3 s (a long final)."""

    def __init__(self) -> None:
        super().__init__(words_so_far)
        self.slow = threading.Event()

    def transcribe(self, batch: Any) -> list[str]:
        if self.slow.is_set():
            time.sleep(3)
        return super().transcribe(batch)


def _token(name: str) -> str:
    return (f'[[auth.tokens]]\nname = "{name}"\nhash = "{hash_token(name + "-secret")}"\n'
            'roles = ["subscribe"]\n')


async def test_a_sighup_during_the_shutdown_is_ignored(tmp_path: Path) -> None:
    """docs/config.md [auth]: "A SIGHUP ... during its shutdown is ignored".
    A subscriber still waiting for the drained finals must get them, not be
    closed by a reload that came after SIGTERM."""
    conf = tmp_path / "serve.toml"
    conf.write_text(_token("old"))
    port = free_port()
    args = argparse.Namespace(
        config=str(conf), overrides=["stream.partial_interval_ms=300",
                                     "worker.drain_timeout_s=20"],
        backend=None, log_format=None, debug=False, quiet=False, port=port, host=None,
        no_partials=False, stream=None, no_print=True, exit_at_end=False, source="sample")
    cfg = _load_config(args)
    backend = _SlowLater()
    serving = asyncio.ensure_future(
        _serve(args, cfg, backend, "sample", {0: read_audio_file(sample_path())}))
    deadline = time.monotonic() + 30
    while True:
        try:
            ws = await connect(f"ws://127.0.0.1:{port}/v1/captions?token=old-secret")
            break
        except OSError:
            assert time.monotonic() < deadline and not serving.done()
            await asyncio.sleep(0.05)
    seen: list[dict[str, Any]] = []
    async with ws:
        while True:   # until a segment is open (a partial)
            msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
            seen.append(msg)
            if msg["type"] == "caption" and not msg["final"]:
                break
        backend.slow.set()
        os.kill(os.getpid(), signal.SIGTERM)       # shutdown: the drain waits 3 s
        await asyncio.sleep(0.5)
        conf.write_text(_token("new"))
        os.kill(os.getpid(), signal.SIGHUP)        # during the shutdown: ignored
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                seen.append(json.loads(raw))
        close_code = ws.close_code
    assert await asyncio.wait_for(serving, 30) == 0
    kinds = [(m["type"], m.get("code"), m.get("final")) for m in seen[-3:]]
    assert not any(m["type"] == "error" for m in seen), kinds
    assert close_code in (1000, 1001), (close_code, kinds)
    assert seen[-1]["type"] == "stream.ended", kinds


async def _serve_tokens_in_process(conf: Path, first: str) -> tuple[asyncio.Future[int], int]:
    """``serve --source none`` run in this process on config file ``conf``,
    once it lets token ``first`` in: its task and its port."""
    port = free_port()
    args = argparse.Namespace(
        config=str(conf), overrides=[], backend=None, log_format=None, debug=False,
        quiet=False, port=port, host=None, no_partials=False, stream=None, no_print=True,
        exit_at_end=False, source="none")
    serving = asyncio.ensure_future(
        _serve(args, _load_config(args), ScriptedBackend(words_so_far), "none", None))
    deadline = time.monotonic() + 30
    while True:
        try:
            async with connect(f"ws://127.0.0.1:{port}/v1/captions?token={first}-secret"):
                return serving, port
        except OSError:
            assert time.monotonic() < deadline and not serving.done()
            await asyncio.sleep(0.05)


async def test_sighups_close_together_are_applied_in_turn(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two SIGHUPs close together ran two reloads at once. The first, slow
    (closing a client its tokens revoke takes a close handshake), ended
    after the second and recorded its older [auth] as the running one, so a
    third reload back to that older file was "unchanged" and not applied:
    the server kept the second file's tokens. Now reloads run in turn."""
    from evoxtral_stream.server.app import CaptionServer

    real = CaptionServer.reload_auth
    calls: list[int] = []

    async def first_is_slow(self: CaptionServer, auth: Any) -> int:
        calls.append(len(calls))
        closed = await real(self, auth)
        if len(calls) == 1:
            await asyncio.sleep(1.5)
        return closed

    monkeypatch.setattr(CaptionServer, "reload_auth", first_is_slow)
    conf = tmp_path / "serve.toml"
    conf.write_text(_token("a"))
    serving, port = await _serve_tokens_in_process(conf, "a")

    async def gets_in(name: str) -> bool:
        try:
            async with connect(f"ws://127.0.0.1:{port}/v1/captions?token={name}-secret"):
                return True
        except InvalidStatus:
            return False

    try:
        for name, wait_s in (("b", 0.3), ("c", 3.0), ("b", 0.5)):
            conf.write_text(_token(name))
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(wait_s)
        deadline = time.monotonic() + 10
        while not await gets_in("b"):
            assert time.monotonic() < deadline, "the third reload (back to b) not applied"
            await asyncio.sleep(0.1)
        assert not await gets_in("c")
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(serving, 30) == 0


async def test_a_sighup_storm_queues_at_most_one_reload_behind_the_running_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Reloads run in turn; the SIGHUPs that came while one ran used to
    queue a reload each, without bound (a script looping `systemctl
    reload`). One waiting reload reads the file after the running one,
    which is all the others would do: they are folded into it."""
    from evoxtral_stream.server.app import CaptionServer

    real = CaptionServer.reload_auth
    runs: list[int] = []

    async def slow(self: CaptionServer, auth: Any) -> int:
        runs.append(len(runs))
        closed = await real(self, auth)
        await asyncio.sleep(1.0)
        return closed

    monkeypatch.setattr(CaptionServer, "reload_auth", slow)
    caplog.set_level("INFO", logger="evoxtral_stream")
    conf = tmp_path / "serve.toml"
    conf.write_text(_token("a"))
    serving, port = await _serve_tokens_in_process(conf, "a")
    try:
        for n in range(6):       # each a change, so each reload would apply one
            conf.write_text(_token(f"t{n}"))
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + 15
        while len(runs) < 2:
            assert time.monotonic() < deadline, runs
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.5)  # time for any other queued reload to run
        assert len(runs) == 2, runs
        done = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("reload: [auth]")]
        assert len(done) == 2, done      # not 6: one per SIGHUP
        # The waiting one read the file as the last SIGHUP left it.
        async with connect(f"ws://127.0.0.1:{port}/v1/captions?token=t5-secret"):
            pass
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(serving, 30) == 0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_the_printed_url_of_an_ipv6_host_can_be_connected_to() -> None:
    """``serve --host ::1`` prints "serving captions on URL": URL must be a URL
    a client can open (an IPv6 literal in brackets, RFC 3986)."""
    proc, url = _start_serve("--source", "none", "--no-print", "--host", "::1")
    try:
        async with connect(url) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "hello"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_an_output_or_recording_name_too_long_is_one_error_line(tmp_path: Path) -> None:
    """An --srt, --jsonl, --json or subtitles output (or recording) whose name
    is too long for the file system: the checks before any work called
    Path.is_dir, which raises ENAMETOOLONG (only "not found"-like errors
    read as False), so each was a traceback instead of one line."""
    audio = tmp_path / "a.wav"
    sf.write(audio, np.zeros(8000, np.int16), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "hello"}) + "\n")
    recording = tmp_path / "r.jsonl"
    recording.write_text(json.dumps({
        "type": "caption", "stream": "s", "segment": 0, "seq": 1, "final": True,
        "text": "hi", "plain_text": "hi", "stable": "hi", "unstable": "", "tags": [],
        "start": 0.0, "end": 1.0, "latency": 0.1}) + "\n")
    long = str(tmp_path / ("x" * 300))
    for args in (["transcribe", str(audio), "--srt", long + ".srt"],
                 ["transcribe", str(audio), "--jsonl", long + ".jsonl"],
                 ["transcribe", str(audio), str(audio), "--vtt", long + "/"],
                 ["eval", str(manifest), "--json", long + ".json"],
                 ["subtitles", str(recording), "--srt", long + "/"],
                 ["subtitles", long + ".jsonl"]):
        one_error_line(cli(*args), "xxxx", "too long")


@pytest.mark.parametrize("override", ["model.whisper.model_path", "model.voxtral.base"])
def test_a_model_folder_that_cannot_be_looked_at_is_one_error_line(
        tmp_path: Path, override: str) -> None:
    """A model folder whose name is too long (or, run as a service user, one
    inside a folder it may not search): the checks for the model's files
    called Path.is_dir/is_file, which raise for such errors, so the bad
    config value was a traceback instead of one line."""
    audio = tmp_path / "a.wav"
    sf.write(audio, np.zeros(8000, np.int16), 16000)
    backend = "whisper" if "whisper" in override else "voxtral"
    proc = cli("transcribe", str(audio), "--backend", backend,
               "--set", f"{override}={tmp_path / ('x' * 300)}")
    one_error_line(proc, "xxxx", "too long")


def test_backend_auto_with_a_voxtral_folder_that_cannot_be_looked_at_runs_whisper(
        tmp_path: Path) -> None:
    """model.backend = "auto" with such a model.voxtral.base: the check for a
    local Voxtral raised out of the choice (a traceback) instead of finding
    Voxtral unavailable and running the embedded Whisper."""
    audio = tmp_path / "a.wav"
    sf.write(audio, np.zeros(8000, np.int16), 16000)
    proc = cli("transcribe", str(audio), "--backend", "auto",
               "--set", f"model.voxtral.base={tmp_path / ('x' * 300)}")
    assert proc.returncode == 0, proc.stderr
    assert "whisper" in proc.stderr, proc.stderr


def test_export_merged_to_a_name_too_long_is_one_error_line(tmp_path: Path) -> None:
    """An OUTDIR the file system cannot name: the check that it is new or
    empty called Path.exists, which raises ENAMETOOLONG, a traceback."""
    pytest.importorskip("torch", reason="export-merged needs the voxtral extra")
    one_error_line(cli("export-merged", str(tmp_path / ("x" * 300))), "xxxx", "too long")


def test_export_merged_without_the_voxtral_extra_says_to_install_it(tmp_path: Path) -> None:
    """Without torch, export-merged said the Voxtral backend needs it "or set
    model.backend = \"whisper\"", which exports nothing: the one way on is
    the extra, installed after a torch for the machine."""
    program = ("import sys; sys.modules['torch'] = None; from evoxtral_stream.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", program, "export-merged", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = one_error_line(proc, "export-merged needs the voxtral extra (torch missing)",
                          "pip install torch", "'.[voxtral]'")
    assert "model.backend" not in line, line
    assert not (tmp_path / "m").exists()


# A model that takes long to load, and modules that take long to import:
# each says so on stderr (the moment to press Ctrl-C), then waits, in short
# sleeps as a load runs Python between its C calls. The kernel may hand a
# Ctrl-C to another thread (a loaded machine, the main thread's signal
# pending); Python then takes it at the main thread's next instruction, and
# one sleep of 120 s had none: about 2 % of runs under load hung.
_SLOW_LOAD = r"""
import sys, time
from evoxtral_stream import cli as cli_module
from tests.helpers.model_loader import replace_model_loader
def load(cfg):
    print("LOADING", file=sys.stderr, flush=True)
    for _ in range(1200): time.sleep(0.1)
replace_model_loader(load)
sys.exit(cli_module.main(sys.argv[1:]))
"""
_SLOW_IMPORT = r"""
import importlib.abc, sys, time
class Slow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "evoxtral_stream.engine.engine":
            print("IMPORTING", file=sys.stderr, flush=True)
            for _ in range(1200): time.sleep(0.1)
        return None
sys.meta_path.insert(0, Slow())
sys.argv[0] = "evoxtral-stream"
from evoxtral_stream.cli import main  # as the console script does
sys.exit(main())
"""


def _ctrl_c_at(program: str, *args: str, site: Path | None = None) -> tuple[int, list[str]]:
    """Run ``program`` with ``args``, Ctrl-C it once it says it is slow; its
    status and the stderr lines after that. With ``site`` (a folder),
    ``program`` is the ``sitecustomize`` there of ``python -m evoxtral_stream``
    instead, the command run as the tests and many users run it."""
    root = Path(__file__).resolve().parents[1]
    path = f"{root / 'src'}:{root}"
    command = [sys.executable, "-c", program]
    if site is not None:
        (site / "sitecustomize.py").write_text(program)
        path = f"{site}:{path}"
        command = [sys.executable, "-m", "evoxtral_stream"]
    proc = subprocess.Popen(
        [*command, *args], stderr=subprocess.PIPE, text=True, cwd=root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path})
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith(("LOADING", "IMPORTING")):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err.splitlines()


def test_ctrl_c_while_the_model_loads_says_so_and_leaves_no_empty_output_folder(
        tmp_path: Path) -> None:
    """Ctrl-C during a slow model load: transcribe exited 130 without a word,
    leaving the --srt folders it had made empty. Now one line, 130, and the
    folders it made are gone; one the user had stays."""
    audio = tmp_path / "a.wav"
    sf.write(audio, np.zeros(8000, np.int16), 16000)
    made, had = tmp_path / "new" / "subs", tmp_path / "had"
    had.mkdir()
    status, err = _ctrl_c_at(_SLOW_LOAD, "transcribe", str(audio), "--srt", f"{made}/",
                             "--vtt", f"{had}/")
    assert (status, err) == (130, ["evoxtral-stream: interrupted"])
    assert not (tmp_path / "new").exists()
    assert had.is_dir()
    # serve too, and in json mode that line is a record.
    status, err = _ctrl_c_at(_SLOW_LOAD, "--log-format", "json", "serve", "--source", "none",
                             "--port", "0")
    assert status == 130
    assert [json.loads(line)["msg"] for line in err] == ["interrupted"]


# A module that builds a dataclass or a namedtuple, imported as the model
# loads (faster_whisper's, Voxtral's) or before main() runs (ours): their
# methods are made by exec() of a string, run here slowly.
_SLOW_EXEC = r"""
import importlib.abc, sys
class SlowExec(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == %r:
            print("LOADING", file=sys.stderr, flush=True)
            exec("import time\nfor _ in range(1200): time.sleep(0.1)")
        return None
sys.meta_path.insert(0, SlowExec())
"""


@pytest.mark.parametrize("module", ["evoxtral_stream.engine.backends.whisper",
                                    "evoxtral_stream.engine.engine"])
def test_ctrl_c_in_code_made_by_exec_exits_130_not_by_sigint(tmp_path: Path,
                                                              module: str) -> None:
    """``python -m evoxtral_stream`` Ctrl-C'd while a module imported by the
    model's load (or before main() runs) ran code made by exec() of a
    string: it printed its line and returned 130, then died by SIGINT
    (status -2). CPython remembers a KeyboardInterrupt that left such code
    as never handled, though main() caught it."""
    status, err = _ctrl_c_at(_SLOW_EXEC % module, "transcribe", "--sample", site=tmp_path)
    assert (status, err) == (130, ["evoxtral-stream: interrupted"])


def test_ctrl_c_while_the_modules_import_is_one_line_not_a_traceback() -> None:
    """Before main() runs (numpy, websockets: seconds from a cold disk) a
    Ctrl-C was a KeyboardInterrupt traceback and death by SIGINT."""
    status, err = _ctrl_c_at(_SLOW_IMPORT, "config")
    assert (status, err) == (130, ["evoxtral-stream: interrupted"])
    status, err = _ctrl_c_at(_SLOW_IMPORT, "--log-format", "json", "config")
    assert status == 130
    assert [json.loads(line)["msg"] for line in err] == ["interrupted"]


# The import of ``module`` waits, then ends as a Ctrl-C makes it end.
_INTERRUPTED_IMPORT = r"""
import importlib.abc, sys, time
class Slow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == %r:
            print("IMPORTING", file=sys.stderr, flush=True)
            %s
        return None
sys.meta_path.insert(0, Slow())
sys.argv[0] = "evoxtral-stream"
from evoxtral_stream.cli import main  # as the console script does
sys.exit(main())
"""
# webrtcvad: "except PackageNotFoundError:" with that name not imported yet.
_AS_WEBRTCVAD = """try:
                for _ in range(1200): time.sleep(0.1)
            except PackageNotFoundError:
                pass"""
# numpy's C code: an ImportError that keeps nothing of the KeyboardInterrupt.
_AS_NUMPY = """try:
                for _ in range(1200): time.sleep(0.1)
            except KeyboardInterrupt:
                failed = True
            if failed:
                raise ImportError("PyCapsule_Import could not import module 'datetime'")"""
# numpy's import_array(), in the C code of a module built on numpy's: the
# KeyboardInterrupt goes to PyErr_Print (sys.excepthook), then an ImportError.
_AS_IMPORT_ARRAY = """try:
                for _ in range(1200): time.sleep(0.1)
            except KeyboardInterrupt:
                sys.excepthook(*sys.exc_info())
                failed = True
            if failed:
                raise ImportError("numpy.core.multiarray failed to import")"""


@pytest.mark.parametrize(("module", "wait"), [
    ("asyncio", "for _ in range(1200): time.sleep(0.1)"),
    ("importlib.metadata", _AS_WEBRTCVAD),
    ("numpy", _AS_NUMPY),
    ("numpy.linalg._umath_linalg", _AS_IMPORT_ARRAY),
    ("evoxtral_stream.cli.transcribe", "for _ in range(1200): time.sleep(0.1)")],
    ids=["stdlib", "another-error", "no-trace-left", "printed-by-c", "the-cli-package's-own"])
def test_ctrl_c_while_any_module_imports_is_one_line_whatever_it_raises(
        module: str, wait: str) -> None:
    """A Ctrl-C while the standard library imports (asyncio: tens of
    milliseconds, before the project's imports) was a traceback and death
    by SIGINT; one that a library's import turned into another error (a
    NameError, as webrtcvad's does; an ImportError, as numpy's C code does)
    was that error's traceback and status 1; one that C code printed
    (PyErr_Print, as numpy's import_array() does, the start fuzz's
    traceback from _lock_unlock_module) was that traceback before the line.
    The modules of the cli package import inside its guard too (the last of
    them here)."""
    status, err = _ctrl_c_at(_INTERRUPTED_IMPORT % (module, wait), "config")
    assert (status, err) == (130, ["evoxtral-stream: interrupted"])


# A Ctrl-C whose handler runs inside a weakref callback, as one landing in
# the import system's own (_get_module_lock's, as a module's import ends)
# does: what it raises there, Python can only report ("Exception ignored
# in"). Here as a module of the cli package imports, or as the model loads
# (then a wait, as a load may be in one).
_CTRL_C_IN_A_CALLBACK = r"""
import importlib.abc, signal, sys, time, weakref
def ctrl_c_in_a_callback():
    class Thing:
        pass
    thing = Thing()
    ref = weakref.ref(thing, lambda ref: signal.raise_signal(signal.SIGINT))
    del thing
class AtImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "evoxtral_stream.engine.engine" and %(at_import)s:
            ctrl_c_in_a_callback()
        return None
sys.meta_path.insert(0, AtImport())
sys.argv[0] = "evoxtral-stream"
from evoxtral_stream import cli as cli_module
from tests.helpers.model_loader import replace_model_loader
def load(cfg):
    ctrl_c_in_a_callback()
    # In short sleeps, as a real load runs Python between its C calls: a
    # SIGINT sent again just before one long sleep began (no instruction
    # in between to take it) waited for its end, 60 s.
    for _ in range(600):
        time.sleep(0.1)
    sys.exit("the model loaded")
replace_model_loader(load)
sys.exit(cli_module.main())  # as the console script does
"""


@pytest.mark.parametrize("json_logs", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("at_import", [True, False], ids=["import", "model-load"])
def test_a_ctrl_c_python_could_only_report_is_not_lost(at_import: bool,
                                                       json_logs: bool) -> None:
    """A Ctrl-C whose KeyboardInterrupt was raised inside a weakref callback
    (where the start fuzz found it: the import system's own, as a module's
    import ends): Python printed "Exception ignored in" and its traceback,
    then, while the modules imported, the line and 130; as the model loaded,
    the Ctrl-C was lost, the load went on (the wait to its end, status 1).
    Now the one line and 130, the wait cut short: the Ctrl-C is sent again."""
    root = Path(__file__).resolve().parents[1]
    flags = ["--log-format", "json"] if json_logs else []
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _CTRL_C_IN_A_CALLBACK % {"at_import": at_import}, *flags,
         "transcribe", "--sample"],
        capture_output=True, text=True, timeout=120, cwd=root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{root / 'src'}:{root}"})
    took = time.monotonic() - start
    if json_logs:
        assert proc.returncode == 130, proc.stderr
        assert [json.loads(line)["msg"] for line in proc.stderr.splitlines()] == [
            "interrupted"], proc.stderr
    else:
        assert (proc.returncode, proc.stderr) == (130, "evoxtral-stream: interrupted\n")
    assert proc.stdout == ""
    assert took < 40  # not the load's minute-long wait


def test_the_lost_ctrl_c_hook_passes_on_everything_else() -> None:
    """What the hook of a lost Ctrl-C does not send again goes to the hook it
    replaced, as before: any other error; one whose context is a caught
    Ctrl-C (a ``__del__`` failing as it is handled: sent again, it would stop
    the command twice); a KeyboardInterrupt of another thread (no handler of
    a signal raised it). One of the main thread is sent again, as a SIGINT."""
    from types import SimpleNamespace

    from evoxtral_stream.startup import _SendAgain

    def report(exc: BaseException) -> Any:
        return SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None,
                               err_msg=None, object=None)

    passed: list[Any] = []
    hook = _SendAgain(threading.get_ident(), passed.append)
    handled = RuntimeError("in __del__")
    handled.__context__ = KeyboardInterrupt()
    others = [report(ValueError("boom")), report(handled)]
    for args in others:
        hook(args)
    another = report(KeyboardInterrupt())
    _SendAgain(threading.get_ident() + 1, passed.append)(another)
    assert passed == [*others, another]

    sent = threading.Event()
    before = signal.signal(signal.SIGINT, lambda signum, frame: sent.set())
    try:
        hook(report(KeyboardInterrupt()))
        # In short waits: the handler runs at the main thread's next
        # instruction, and a SIGINT that came just before one long wait
        # began left it pending for the whole wait (seen once in CI).
        deadline = time.monotonic() + 30
        while not sent.wait(0.05):
            assert time.monotonic() < deadline, "the Ctrl-C was not sent again"
    finally:
        signal.signal(signal.SIGINT, before)
    assert passed == [*others, another]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_that_keep_coming_after_the_shutdown_do_not_change_the_status(
        sig: signal.Signals) -> None:
    """Ctrl-C (or SIGTERM) pressed again and again while ``serve`` stops: once
    its shutdown is done, the interpreter's exit (a while, with the model's
    libraries loaded) took the next one with the default action, and the
    process died by the signal (status -2 or -15) instead of exiting 0."""
    proc, _ = _start_serve("--source", "none", "--no-print")
    try:
        while proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            time.sleep(0.02)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def _noise_wav(path: Path) -> Path:
    """Half a second of silence, a second of noise, half a second of silence:
    one segment, whatever a scripted model makes of it."""
    rng = np.random.default_rng(3)
    silence = np.zeros(8000, np.int16)
    sound = (rng.standard_normal(16000) * 3000).astype(np.int16)
    sf.write(path, np.concatenate([silence, sound, silence]), 16000)
    return path


_SAYS_A_SURROGATE = r"""
import sys
from evoxtral_stream import cli as cli_module
from tests.fakes import ScriptedBackend
from tests.helpers.model_loader import replace_model_loader
replace_model_loader(lambda cfg: ScriptedBackend(lambda a: "caf\udce9 ok"))
sys.exit(cli_module.main(sys.argv[1:]))
"""


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -c script ARGS`` from the repository, as the command line runs."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True, text=True, errors="backslashreplace", timeout=120, cwd=root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{root / 'src'}:{root}"})


_EMBEDDED = r"""
import sys, threading, time
from evoxtral_stream import cli as cli_module
from tests.fakes import ScriptedBackend
from tests.helpers.model_loader import replace_model_loader
replace_model_loader(lambda cfg: ScriptedBackend(lambda a: "words"))
# The embedding program's own daemon thread (a monitor, a library's pool).
threading.Thread(target=lambda: time.sleep(600), name="host-monitor", daemon=True).start()
status = cli_module.main(sys.argv[1:])
print(f"main returned {status}", flush=True)
"""


def test_main_returns_to_an_embedding_program_that_has_daemon_threads(tmp_path: Path) -> None:
    """transcribe ended the whole process with os._exit whenever any daemon
    thread was alive: that is for the model thread a second Ctrl-C left in
    native code, but a program calling main() with a daemon thread of its
    own (or a pytest-xdist worker) was ended with it. Now only the engine's
    model threads count."""
    wav = _noise_wav(tmp_path / "talk.wav")
    proc = _run_script(_EMBEDDED, "transcribe", str(wav), "--srt", str(tmp_path / "t.srt"),
                       "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "main returned 0", proc.stdout


def test_a_lone_surrogate_in_the_model_text_is_written_as_a_replacement_character(
        tmp_path: Path) -> None:
    """A backend's text holding a lone surrogate (what a decoder that uses
    surrogateescape makes of a byte that is no UTF-8) is no text: the
    --jsonl and subtitle listeners raised UnicodeEncodeError on its first
    caption and were removed, leaving a --jsonl file without the stream's
    captions or end, an empty talk.srt, and a traceback at the end with
    talk.vtt.part left. The tokenizer, which every caption's text goes
    through, writes it as U+FFFD, as the console shows it. (In a process of
    its own: transcribe ends a process that has daemon threads left with
    os._exit, which would end a pytest-xdist worker.)"""
    wav = _noise_wav(tmp_path / "talk.wav")
    srt, vtt, jsonl = tmp_path / "talk.srt", tmp_path / "talk.vtt", tmp_path / "all.jsonl"
    proc = _run_script(_SAYS_A_SURROGATE, "transcribe", str(wav), "--srt", str(srt),
                       "--vtt", str(vtt), "--jsonl", str(jsonl), "-q")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert [e["type"] for e in events][-2:] == ["caption", "stream.ended"]
    assert events[-2]["final"] and events[-2]["text"] == "caf\ufffd ok"
    assert srt.read_text(encoding="utf-8").endswith("\ncaf\ufffd ok\n")
    assert vtt.read_text(encoding="utf-8").endswith("\ncaf\ufffd ok\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "all.jsonl", "talk.srt", "talk.vtt", "talk.wav"]


_FAILING_ON_A_SURROGATE_PATH = r"""
import os, sys
from evoxtral_stream import cli as cli_module
from tests.fakes import ScriptedBackend
from tests.helpers.model_loader import replace_model_loader
path = os.fsdecode(b"/models/caf\xe9")
class Failing(ScriptedBackend):
    def transcribe(self, batch):
        raise RuntimeError(f"cannot open {path}")
replace_model_loader(lambda cfg: Failing())
sys.exit(cli_module.main(sys.argv[1:]))
"""


def test_an_error_message_with_a_lone_surrogate_leaves_the_jsonl_file_whole(
        tmp_path: Path) -> None:
    """A backend failing with a message that names a path whose bytes are no
    UTF-8 (``caf\\xe9``, held as a lone surrogate): the decode_failed event
    could not be encoded, the --jsonl listener was removed, and the file
    stopped there, without the stream's end, status 1 the only sign. The
    message goes with U+FFFD there, as on the wire. (In a process of its
    own: pytest-xdist cannot send a test's captured log holding the
    surrogate back from its worker, and see above.)"""
    wav = _noise_wav(tmp_path / "talk.wav")
    jsonl = tmp_path / "all.jsonl"
    proc = _run_script(_FAILING_ON_A_SURROGATE_PATH, "transcribe", str(wav),
                       "--jsonl", str(jsonl), "-q")
    assert proc.returncode == 1, proc.stderr
    events = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert events[-1]["type"] == "stream.ended"
    errors = [e for e in events if e["type"] == "error"]
    assert errors and all(e["message"] == "RuntimeError: cannot open /models/caf\ufffd"
                          for e in errors), errors


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed")
def test_a_dash_reads_the_audio_from_standard_input(tmp_path: Path) -> None:
    """``ffmpeg ... -f flac - | evoxtral-stream transcribe -``: ``-`` is
    standard input, as for most commands that read files (it was "audio file
    - does not exist"), stream ``stdin``; serve --source takes it too. Named
    twice, or a terminal, it is one error line."""
    flac = tmp_path / "talk.flac"
    _speech_file(flac, "Please call me back when you get home tonight.", 44100, 1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    srt = tmp_path / "out.srt"
    proc = subprocess.run([sys.executable, "-m", "evoxtral_stream", "transcribe", "-",
                           "--srt", str(srt)], input=flac.read_bytes(), capture_output=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert "home tonight" in proc.stdout.decode().lower(), proc.stdout
    assert "tonight" in srt.read_text().lower()
    proc = subprocess.run([sys.executable, "-m", "evoxtral_stream", "serve", "--port", "0",
                           "--source", "-", "--exit-at-end"], input=flac.read_bytes(),
                          capture_output=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert "home tonight" in proc.stdout.decode().lower(), proc.stdout
    twice = subprocess.run([sys.executable, "-m", "evoxtral_stream", "transcribe", "-", "-"],
                           input=flac.read_bytes(), capture_output=True, timeout=120, env=env)
    one_error_line(subprocess.CompletedProcess(twice.args, twice.returncode, "",
                                               twice.stderr.decode()),
                   "named more than once")
    main_fd, tty = os.openpty()
    try:
        with os.fdopen(tty, "rb", closefd=False) as stdin:
            term = subprocess.run([sys.executable, "-m", "evoxtral_stream", "transcribe", "-"],
                                  stdin=stdin, capture_output=True, text=True, timeout=120,
                                  env=env)
    finally:
        os.close(main_fd)
        os.close(tty)
    one_error_line(term, "standard input, which is a terminal")
