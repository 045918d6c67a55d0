"""Audio files probed up front and decoded lazily (audio/filereader.py)."""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf  # type: ignore[import-untyped,unused-ignore]

from evoxtral_stream.audio.filereader import (
    AudioFile,
    AudioInputError,
    open_audio_file,
    open_pipe_file,
)
from evoxtral_stream.audio.resample import MixResampler
from evoxtral_stream.audio.sources import read_audio_channels
from evoxtral_stream.events import SAMPLE_RATE, Int16Array
from tests.helpers.audio import HAVE_SOX


def _lazy(audio: AudioFile, mixes: list[int] | None = None) -> list[Int16Array]:
    """A pass's blocks joined, checking that each block is equally long in every mix."""
    n = len(audio.mixes) if mixes is None else len(mixes)
    parts: list[list[Int16Array]] = [[] for _ in range(n)]
    with audio.blocks(mixes) as blocks:
        for block in blocks:
            assert len({len(b) for b in block}) == 1
            for part, b in zip(parts, block, strict=True):
                part.append(b)
        assert blocks.error is None
    return [np.concatenate(p) for p in parts]


def _whole(path: Path, mixes: list[tuple[int, ...]]) -> list[Int16Array]:
    """The file decoded whole, then converted in one call (the filter's
    state carries across blocks, so blocks change nothing)."""
    x, rate = sf.read(path, dtype="float32", always_2d=True)
    convert = MixResampler(rate, x.shape[1], mixes)
    return [np.concatenate([a, b]) for a, b in
            zip(convert.process(x), convert.flush(), strict=True)]


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_a_pass_gives_the_samples_of_the_whole_file(
        tmp_path: Path, rate: int, channels: int) -> None:
    """3.3 s (several blocks at every rate but 8 kHz): the blocks of a pass
    of every mix at once, and of each mix alone, are the whole read's,
    sample for sample; the header's length is theirs."""
    rng = np.random.default_rng(rate + channels)
    x = rng.uniform(-0.6, 0.6, (int(3.3 * rate), channels)).astype(np.float32)
    path = tmp_path / "a.flac"
    sf.write(path, x, rate, subtype="PCM_16")
    mixes: list[tuple[int, ...]] = [(), (1,)] if channels == 1 else [(), (1,), (2,), (2, 1)]
    whole = _whole(path, mixes)
    with open_audio_file(path, mixes) as audio:
        assert audio.samples == len(whole[0])
        for got, want in zip(_lazy(audio), whole, strict=True):
            np.testing.assert_array_equal(got, want)
        for i, want in enumerate(whole):
            np.testing.assert_array_equal(_lazy(audio, [i])[0], want)
    for got, want in zip(read_audio_channels(path, mixes), whole, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_damaged_file_warns_when_a_pass_meets_the_damage(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A FLAC cut short 60 % in: the probe says nothing; each pass gives the
    audio up to the cut (recovered in small reads near it) and the same
    blocks as the whole read; the warning is said once, when met."""
    x = np.random.default_rng(2).integers(-8000, 8000, (12 * 44100, 2)).astype(np.int16)
    whole = tmp_path / "whole.flac"
    sf.write(whole, x, 44100, format="FLAC")
    data = whole.read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"):
        with open_audio_file(cut, [(), (2,)]) as audio:
            assert not caplog.records
            first = _lazy(audio)
            assert len(caplog.records) == 1
            assert _lazy(audio, [1])[0].tolist() == first[1].tolist()
        whole_read = read_audio_channels(cut, [(), (2,)])
    for got, want in zip(first, whole_read, strict=True):
        np.testing.assert_array_equal(got, want)
    # Up to the last whole FLAC frame before the cut, as the whole read was.
    assert 0.6 * 12 * SAMPLE_RATE - 2 * 4096 < len(first[0]) <= 0.6 * 12 * SAMPLE_RATE
    (warning,) = {r.getMessage() for r in caplog.records}
    assert "cut.flac" in warning and "damaged" in warning


def test_a_damaged_file_rotated_under_its_reader_gives_none_of_the_new_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The FLAC cut 60 % in, renamed away while a pass reads it and the whole
    file written at its name: the pass ends at the damage of the file it
    opened, with the warning, and no audio of the new file. Reading again up
    to the damage opened the name, the new file, and went on past it to
    that file's end."""
    x = np.random.default_rng(2).integers(-8000, 8000, (12 * 44100, 2)).astype(np.int16)
    whole = tmp_path / "whole.flac"
    sf.write(whole, x, 44100, format="FLAC")
    path = tmp_path / "talk.flac"
    path.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    damaged = read_audio_channels(path, [()])[0]
    got = []
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"), \
            open_audio_file(path, [()]) as audio, audio.blocks() as blocks:
        for i, block in enumerate(blocks):
            got.append(block[0])
            if i == 0:
                path.rename(tmp_path / "old.flac")
                whole.rename(path)
    joined = np.concatenate(got)
    assert blocks.error is None
    assert 0 < len(joined) <= len(damaged)
    # The same audio, but for the resampler's tail, flushed where it ends
    # (and a rounding step where its blocks fall otherwise).
    np.testing.assert_allclose(joined[:-256], damaged[:len(joined) - 256], atol=1)
    assert any("damaged" in r.getMessage() for r in caplog.records), caplog.records


def test_a_wav_libsndfile_misreads_is_read_lazily_to_its_end(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 48 kHz stereo WAV whose data size was never written (0): a pass
    gives what the same file with its sizes right gives, and the warning
    comes at its end, once."""
    x = np.random.default_rng(5).uniform(-0.5, 0.5, (5 * 48000, 2)).astype(np.float32)
    right, unsized = tmp_path / "right.wav", tmp_path / "rec.wav"
    sf.write(right, x, 48000, subtype="PCM_16")
    b = bytearray(right.read_bytes())
    at = b.index(b"data")
    b[at + 4:at + 8] = (0).to_bytes(4, "little")
    unsized.write_bytes(bytes(b))
    mixes: list[tuple[int, ...]] = [(), (2,)]
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"), \
            open_audio_file(unsized, mixes) as audio:
        assert (audio.rate, audio.channels) == (48000, 2)
        assert audio.samples == 5 * SAMPLE_RATE
        got = _lazy(audio)
    for g, want in zip(got, _whole(right, mixes), strict=True):
        np.testing.assert_array_equal(g, want)
    (warning,) = {r.getMessage() for r in caplog.records}
    assert "read to the end of the file, 5.0 s" in warning


def test_every_problem_is_found_by_the_probe_without_decoding_the_file(
        tmp_path: Path) -> None:
    """The probe refuses what the whole read refused (a missing file, a
    channel it lacks, no audio) and decodes only its first block."""
    with pytest.raises(AudioInputError, match="does not exist"):
        open_audio_file(tmp_path / "none.wav", [()])
    path = tmp_path / "mono.wav"
    sf.write(path, np.zeros(SAMPLE_RATE, np.int16), SAMPLE_RATE)
    with pytest.raises(AudioInputError, match=r"audio.channels asks for channel 2"):
        open_audio_file(path, [(2,)])
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.int16), SAMPLE_RATE)
    with pytest.raises(AudioInputError, match="contains no audio"):
        open_audio_file(tmp_path / "empty.wav", [()])


def test_a_file_gone_after_its_probe_ends_its_pass_with_one_error_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Deleted between the probe and the pass (while the model loads, say):
    the pass ends at once, logs one error line and says why (libsndfile
    says only "System error." of a file it cannot open)."""
    path = tmp_path / "gone.wav"
    sf.write(path, np.zeros(SAMPLE_RATE, np.int16), SAMPLE_RATE)
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"), \
            open_audio_file(path, [()]) as audio:
        path.unlink()
        with audio.blocks() as blocks:
            assert list(blocks) == []
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and "\n" not in record.getMessage()
    assert record.getMessage() == blocks.error
    assert record.getMessage() == (f"cannot read audio file {path} past 0.0 s: No such file "
                                   "or directory; its audio ends there")


@pytest.mark.skipif(not HAVE_SOX, reason="sox is not installed")
def test_a_long_file_is_decoded_in_bounded_memory(tmp_path: Path) -> None:
    """20 minutes of 48 kHz stereo (460 MB as float frames, 38 MB at 16 kHz
    mono): a pass peaks at a few blocks, whatever the file's length, where
    the whole read held the 16 kHz result at least."""
    import tracemalloc

    path = tmp_path / "long.wav"
    subprocess.run(["sox", "-n", "-r", "48000", "-c", "2", "-b", "16", str(path),
                    "synth", "1200", "whitenoise", "vol", "0.1"], check=True)
    whole_bytes = 1200 * SAMPLE_RATE * 2
    with open_audio_file(path, [(), (1,)]) as audio:
        assert audio.samples == 1200 * SAMPLE_RATE
        samples = 0
        tracemalloc.start()
        try:
            with audio.blocks() as blocks:
                for block in blocks:
                    samples += len(block[0])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert samples == 1200 * SAMPLE_RATE
    assert peak < whole_bytes / 8, f"peak {peak / 1e6:.1f} MB"


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_a_file_cut_short_under_its_reader_ends_the_pass_with_one_error_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, fmt: str) -> None:
    """10 s of 48 kHz stereo cut to a third while a pass reads it (a file
    rotated or overwritten): the pass gives the audio read before, then
    ends with one error line saying so and why. A WAV used to end there
    without a word (libsndfile ends it where its bytes end), a FLAC with
    a warning that it was damaged."""
    path = tmp_path / f"talk.{fmt}"
    x = np.random.default_rng(6).uniform(-0.5, 0.5, (10 * 48000, 2)).astype(np.float32)
    sf.write(path, x, 48000, subtype="PCM_16")
    size = path.stat().st_size
    samples = 0
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"), \
            open_audio_file(path, [()]) as audio, audio.blocks() as blocks:
        for i, block in enumerate(blocks):
            samples += len(block[0])
            if i == 0:
                with open(path, "r+b") as f:
                    f.truncate(size // 3)
    assert 0 < samples < 4 * SAMPLE_RATE
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.getMessage() == blocks.error
    assert (f"cannot read audio file {path} past " in record.getMessage()
            and f"it was cut short while read ({size} bytes when opened, {size // 3} now); "
            "its audio ends there" in record.getMessage())


@pytest.mark.parametrize("fmt", ["wav", "flac", "unsized.wav"])
def test_a_file_rotated_under_its_reader_is_read_to_its_end_without_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, fmt: str) -> None:
    """10 s of 48 kHz stereo renamed away while a pass reads it, and a
    shorter file written in its place (a log rotated): the pass reads the
    file it opened to its end, as a deleted one is, without a word. The
    size of the new file at the name was taken for the old one's, cut short
    ('cut short while read'), and its streams lost the audio past that."""
    path = tmp_path / f"talk.{fmt.split('.')[-1]}"
    x = np.random.default_rng(8).uniform(-0.5, 0.5, (10 * 48000, 2)).astype(np.float32)
    sf.write(path, x, 48000, subtype="PCM_16")
    if fmt == "unsized.wav":  # libsndfile misreads it: read by WavStreamDecoder
        _say_no_size(path)
    whole = _lazy(open_audio_file(path, [()]))
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"), \
            open_audio_file(path, [()]) as audio, audio.blocks() as blocks:
        got = []
        for i, block in enumerate(blocks):
            got.append(block[0])
            if i == 0:
                path.rename(tmp_path / "old")
                sf.write(path, x[:48000], 48000, subtype="PCM_16")
    assert blocks.error is None and [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    np.testing.assert_array_equal(np.concatenate(got), whole[0])


def test_a_file_replaced_before_its_pass_is_read_as_the_pass_finds_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Replaced by a shorter file (another name renamed onto it) between
    its probe and its pass (while the model loads): the pass reads the file
    it finds, to its end, without taking it for the probed one cut short."""
    path = tmp_path / "talk.wav"
    x = np.random.default_rng(9).uniform(-0.5, 0.5, (10 * 48000, 2)).astype(np.float32)
    sf.write(path, x, 48000, subtype="PCM_16")
    short = tmp_path / "short.wav"
    sf.write(short, x[:3 * 48000], 48000, subtype="PCM_16")
    expected = _lazy(open_audio_file(short, [()]))
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"), \
            open_audio_file(path, [()]) as audio:
        short.rename(path)
        with audio.blocks() as blocks:
            got = [block[0] for block in blocks]
    assert blocks.error is None and [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    np.testing.assert_array_equal(np.concatenate(got), expected[0])


@pytest.mark.parametrize("how", ["deleted", "overwritten"])
def test_a_file_replaced_at_its_inode_before_its_pass_is_read_as_the_pass_finds_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    """Replaced by a shorter file between its probe and its pass, at the
    same inode number: deleted and another written at its name (ext4 gives
    the new file the freed number at once), or written over in place (cp,
    sox, ffmpeg -y). The pass reads the file it finds without an error; the
    identity (device, inode) alone took it for the probed file cut short,
    'cut short while read', its streams' audio_input_lost and status 1."""
    path = tmp_path / "talk.wav"
    x = np.random.default_rng(10).uniform(-0.5, 0.5, (10 * 48000, 2)).astype(np.float32)
    sf.write(path, x, 48000, subtype="PCM_16")
    inode = path.stat().st_ino
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"), \
            open_audio_file(path, [()]) as audio:
        if how == "deleted":
            path.unlink()
        y = np.random.default_rng(11).uniform(-0.5, 0.5, (3 * 48000, 2)).astype(np.float32)
        sf.write(path, y, 48000, subtype="PCM_16")
        if path.stat().st_ino != inode:
            pytest.skip("this filesystem gave the new file another inode number")
        with audio.blocks() as blocks:
            got = [block[0] for block in blocks]
        expected = _lazy(open_audio_file(path, [()]))
    assert blocks.error is None and [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    np.testing.assert_array_equal(np.concatenate(got), expected[0])


@pytest.mark.parametrize("fmt", ["wav", "flac", "unsized.wav"])
def test_a_file_cut_short_before_its_pass_ends_the_pass_with_one_error_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, fmt: str) -> None:
    """Cut to a third in place between its probe and its pass (while the
    model loads): still the probed file (its start unchanged), so the pass
    says it was cut short."""
    path = tmp_path / f"talk.{fmt.split('.')[-1]}"
    x = np.random.default_rng(12).uniform(-0.5, 0.5, (10 * 48000, 2)).astype(np.float32)
    sf.write(path, x, 48000, subtype="PCM_16")
    if fmt == "unsized.wav":
        _say_no_size(path)
    size = path.stat().st_size
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"), \
            open_audio_file(path, [()]) as audio:
        os.truncate(path, size // 3)
        with audio.blocks() as blocks:
            samples = sum(len(block[0]) for block in blocks)
    assert 0 < samples < 4 * SAMPLE_RATE
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.getMessage() == blocks.error
    assert (f"it was cut short while read ({size} bytes when opened, {size // 3} now)"
            in record.getMessage())


def _say_no_size(path: Path) -> None:
    """Zero the WAV's data size, as a live writer leaves it."""
    b = bytearray(path.read_bytes())
    at = b.index(b"data")
    b[at + 4:at + 8] = (0).to_bytes(4, "little")
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("name", ["talk.flac", "unsized.wav"])
def test_passes_over_a_pipe_s_copy_read_it_at_once_each_at_its_own_place(
        tmp_path: Path, name: str) -> None:
    """A pipe's copy read by two passes at once, a block of each in turn (a
    file's channel streams fed apart: transcribe, not paced): each gives
    what the file on disk gives. They shared the copy's file position, so
    each read where the other had left it."""
    x = np.random.default_rng(7).uniform(-0.5, 0.5, (6 * 44100, 2)).astype(np.float32)
    path = tmp_path / name
    sf.write(path, x, 44100, subtype="PCM_16")
    if name == "unsized.wav":  # libsndfile misreads it: read by WavStreamDecoder
        _say_no_size(path)
    mixes: list[tuple[int, ...]] = [(1,), (2,)]
    want = read_audio_channels(path, mixes)
    read, write = os.pipe()
    writer = threading.Thread(target=_write_and_close, args=(write, path.read_bytes()))
    writer.start()
    try:
        audio = open_pipe_file(tmp_path / "pipe", b"", read, mixes)
    finally:
        writer.join()
        os.close(read)
    got: list[list[Int16Array]] = [[], []]
    with audio, audio.blocks([0]) as left, audio.blocks([1]) as right:
        for one, other in itertools.zip_longest(left, right):
            for out, block in zip(got, (one, other), strict=True):
                if block is not None:
                    out.append(block[0])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.concatenate(g), w)


def _write_and_close(fd: int, data: bytes) -> None:
    with open(fd, "wb") as f:
        f.write(data)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="no /proc/self/fd to count")
def test_a_pass_between_blocks_holds_only_its_file_s_descriptor(tmp_path: Path) -> None:
    """transcribe feeds every file of the command at once, a pass each: a
    pass held three descriptors between its blocks (its file, and the
    temporary file and copy of stderr that catch the decoder's prints), so
    a few hundred files ran out of the usual 1024. The catcher now holds
    its two only while a block decodes."""
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"clip{i}.flac")
        sf.write(paths[-1], np.zeros((3 * 48000, 2), np.int16), 48000)
    audios = [open_audio_file(p, [()]) for p in paths]
    before = len(os.listdir("/proc/self/fd"))
    passes = [audio.blocks() for audio in audios]
    try:
        for blocks in passes:
            assert len(next(blocks)[0])
        assert len(os.listdir("/proc/self/fd")) == before + len(passes)
    finally:
        for blocks in passes:
            blocks.close()
        for audio in audios:
            audio.close()
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.skipif(os.name == "nt", reason="POSIX descriptors")
def test_a_process_started_without_stderr_reads_its_files_whole(tmp_path: Path) -> None:
    """Started with descriptor 2 closed (``2>&-``), a process's first file
    opened since takes descriptor 2: a pass's file did, and the catcher of
    the decoder's prints, which now points descriptor 2 at its temporary
    file around each block, had each block read from that file (empty):
    'contains no audio' at the probe, ``serve --source F 2>&-`` and
    ``transcribe F 2>&-`` status 2 where they ran. Every file reads whole."""
    paths = [tmp_path / "talk.wav", tmp_path / "talk.flac"]
    for path in paths:
        sf.write(path, np.full((3 * 48000, 2), 1000, np.int16), 48000)
    code = ("import sys\n"
            "from evoxtral_stream.audio.sources import read_audio_channels\n"
            "print(*(len(read_audio_channels(p, [(1,), (2,)])[1]) for p in sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True,
                          text=True, timeout=120, preexec_fn=lambda: os.close(2))
    assert (proc.returncode, proc.stdout.split()) == (0, [str(3 * SAMPLE_RATE)] * 2), proc
