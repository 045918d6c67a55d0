"""Audio files: decoding, chunking and errors."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf  # type: ignore[import-untyped,unused-ignore]

from evoxtral_stream.audio.sources import (
    AudioInputError,
    iter_chunks,
    read_audio_channels,
    read_audio_file,
)
from evoxtral_stream.events import SAMPLE_RATE
from tests.helpers.audio import HAVE_ESPEAK, dominant_frequency, espeak_wav, rms, sine

# --- files ------------------------------------------------------------------------------


def test_wav_at_16k_is_read_exactly(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(-20000, 20000, 16000).astype(np.int16)
    sf.write(tmp_path / "a.wav", x, SAMPLE_RATE, subtype="PCM_16")
    out = read_audio_file(tmp_path / "a.wav")
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize(
    ("name", "rate", "channels", "fmt"),
    [
        ("stereo.flac", 44100, 2, {}),
        ("stereo48.wav", 48000, 2, {"subtype": "FLOAT"}),
        ("mono.ogg", 48000, 1, {"format": "OGG", "subtype": "VORBIS"}),
        ("narrow.wav", 8000, 1, {}),
        ("six.wav", 22050, 6, {}),
        ("highest.wav", 768000, 1, {}),  # MAX_FILE_RATE: still read
    ],
)
def test_files_decode_to_mono_16k(
    tmp_path: Path, name: str, rate: int, channels: int, fmt: dict[str, str]
) -> None:
    x = np.stack([sine(440, 1.5, rate, amp=0.4)] * channels, axis=1)
    path = tmp_path / name
    sf.write(path, x, rate, **fmt)
    out = read_audio_file(path)
    assert out.ndim == 1
    assert out.dtype == np.int16
    assert abs(len(out) - int(1.5 * SAMPLE_RATE)) <= 2
    mid = out[2000:-2000]
    assert dominant_frequency(mid, SAMPLE_RATE) == pytest.approx(440, abs=1.0)
    assert rms(mid) / 32768 == pytest.approx(0.4 / np.sqrt(2), rel=0.03)


def test_a_long_file_is_converted_in_blocks_not_held_whole(tmp_path: Path) -> None:
    """A minute of 48 kHz stereo float (23 MB decoded) peaks at a few times its
    16 kHz mono result (1.9 MB), and gives the same samples as converting it
    whole. It used to decode the whole file, then downmix, resample and scale
    it in float64: a peak near 20 times the result (660 MB for 25 minutes)."""
    import tracemalloc

    from evoxtral_stream.audio.resample import float_to_int16, resample, to_mono

    rate = 48000
    x = np.random.default_rng(1).uniform(-0.5, 0.5, (60 * rate, 2)).astype(np.float32)
    path = tmp_path / "long.wav"
    sf.write(path, x, rate, subtype="FLOAT")
    whole = float_to_int16(resample(np.ascontiguousarray(to_mono(x)), rate, SAMPLE_RATE))
    del x
    tracemalloc.start()
    try:
        out = read_audio_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out, whole)
    assert peak < 4 * out.nbytes, f"peak {peak / 1e6:.1f} MB for {out.nbytes / 1e6:.1f} MB"


def test_channels_of_a_file_are_read_apart_or_mixed_each_resampled_on_its_own(
        tmp_path: Path) -> None:
    """A 48 kHz 3-channel file, random noise on each (any leak would show):
    each mix asked for equals the whole file's columns mixed and resampled
    alone, every output as long as the others; ``()`` is every channel,
    as :func:`read_audio_file` reads it. Long enough for several reads."""
    from evoxtral_stream.audio.resample import float_to_int16, resample, to_mono

    rate = 48000
    x = np.random.default_rng(2).uniform(-0.5, 0.5, (3 * rate, 3)).astype(np.float32)
    path = tmp_path / "three.wav"
    sf.write(path, x, rate, subtype="FLOAT")
    mixes = [(3,), (1,), (1, 2), (), (1, 2, 3)]
    out = read_audio_channels(path, mixes)
    for mix, got in zip(mixes, out, strict=True):
        cols = [c - 1 for c in mix] or [0, 1, 2]
        alone = float_to_int16(resample(np.ascontiguousarray(to_mono(x[:, cols])),
                                        rate, SAMPLE_RATE))
        np.testing.assert_array_equal(got, alone, err_msg=str(mix))
    np.testing.assert_array_equal(out[3], read_audio_file(path))


def test_a_channel_the_file_lacks_is_an_error_naming_the_option(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    sf.write(path, np.zeros((SAMPLE_RATE, 2), np.int16), SAMPLE_RATE)
    with pytest.raises(AudioInputError) as e:
        read_audio_channels(path, [(1,), (3,)])
    assert str(e.value) == (f"audio.channels asks for channel 3, but audio file {path} "
                            "has 2 channel(s)")
    with pytest.raises(ValueError, match="distinct"):
        read_audio_channels(path, [(1, 1)])


def test_mp3_decodes_where_libsndfile_supports_it(tmp_path: Path) -> None:
    path = tmp_path / "a.mp3"
    try:
        sf.write(path, sine(440, 1.0, 44100, amp=0.4), 44100, format="MP3")
    except Exception as e:  # libsndfile built without LAME: nothing to test
        pytest.skip(f"this libsndfile cannot write MP3: {e}")
    out = read_audio_file(path)
    assert abs(len(out) - SAMPLE_RATE) < SAMPLE_RATE // 10  # MP3 pads a little
    assert dominant_frequency(out[2000:-2000], SAMPLE_RATE) == pytest.approx(440, abs=2.0)


def test_what_the_mp3_decoder_prints_is_logged_not_on_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """libmpg123 prints its notes on an MP3 with a damaged frame ("Note:
    Illegal Audio-MPEG-Header ... Trying to resync...") straight to file
    descriptor 2: lines past logging on transcribe's stderr, in json mode
    too (docs/config.md: nothing else reaches stderr there), and before the
    one error line of a file it cannot decode. They are DEBUG records now."""
    path = tmp_path / "glitch.mp3"
    try:
        sf.write(path, sine(440, 2.0, 44100, amp=0.4), 44100, format="MP3")
    except Exception as e:  # libsndfile built without LAME: nothing to test
        pytest.skip(f"this libsndfile cannot write MP3: {e}")
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x55" * 64
    path.write_bytes(bytes(data))
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="evoxtral_stream"):
        out = read_audio_file(path)
    assert capfd.readouterr().err == ""
    assert abs(len(out) - 2 * SAMPLE_RATE) < SAMPLE_RATE // 5
    notes = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("glitch.mp3" in n and "Illegal Audio-MPEG-Header" in n for n in notes), notes


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")
def test_espeak_wav_decodes(tmp_path: Path) -> None:
    out = read_audio_file(espeak_wav("hello world", tmp_path / "hello.wav"))
    assert 0.5 * SAMPLE_RATE < len(out) < 3 * SAMPLE_RATE
    assert rms(out) > 300


def _garbage(p: Path) -> None:
    p.write_bytes(bytes(range(256)) * 40)


def _empty_wav(p: Path) -> None:
    sf.write(p, np.zeros(0, np.int16), SAMPLE_RATE)


def _zero_bytes(p: Path) -> None:
    p.write_bytes(b"")


def _truncated_header(p: Path) -> None:
    sf.write(p, np.zeros(1000, np.int16), SAMPLE_RATE)
    p.write_bytes(p.read_bytes()[:20])


def _directory(p: Path) -> None:
    p.mkdir()


def _one_hertz(p: Path) -> None:
    # A damaged header: 20 000 samples at 1 Hz are 5.5 hours, 320 million
    # samples at 16 kHz (a block of it 8 GB as float64): the read used to
    # run out of memory, or hours of captions of noise followed.
    sf.write(p, np.ones(20000, np.int16), 1)


def _two_gigahertz(p: Path) -> None:
    # A damaged header the other way: 2**31 - 1 Hz. No recording is made so;
    # resampling it to 16 kHz took seconds per 64k frames (a CI run under
    # load took over 20 s for a 3 s file) to give a handful of samples.
    sf.write(p, np.ones(300_000, np.int16), 2**31 - 1)


@pytest.mark.parametrize(
    ("make", "name", "words"),
    [
        (None, "missing.wav", "does not exist"),
        (_garbage, "garbage.wav", "cannot decode"),
        (_empty_wav, "empty.wav", "no audio"),
        (_zero_bytes, "zero.flac", "cannot decode"),
        (_truncated_header, "cut.wav", "cannot decode"),
        (_directory, "folder.wav", "directory"),
        (_one_hertz, "slow.wav", "says 1 Hz"),
        (_two_gigahertz, "fast.wav", "says 2147483647 Hz, above the 768000 Hz"),
    ],
)
def test_bad_files_raise_audio_input_error(
    tmp_path: Path, make: Callable[[Path], None] | None, name: str, words: str
) -> None:
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(AudioInputError) as info:
        read_audio_file(path)
    message = str(info.value)
    assert name in message
    assert words in message
    assert "\n" not in message
    assert info.value.__cause__ is None  # no chained traceback for people to read


@pytest.mark.parametrize("keep", [0.97, 0.6, 0.2])
def test_a_flac_cut_short_gives_the_audio_before_the_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, keep: float
) -> None:
    """A FLAC download cut short, as a WAV or OGG cut short: its audio up to
    the cut, and a warning naming the file. libsndfile decodes up to the
    cut, then reports lost sync; the whole file was refused ("cannot decode
    ... flac decoder lost sync"), even with a few bytes missing at its end."""
    x = np.random.default_rng(2).integers(-8000, 8000, 5 * SAMPLE_RATE).astype(np.int16)
    whole = tmp_path / "whole.flac"
    sf.write(whole, x, SAMPLE_RATE, format="FLAC")
    data = whole.read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(data[: int(len(data) * keep)])
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"):
        out = read_audio_file(cut)
    # Up to the last whole FLAC frame before the cut (4096 samples each).
    assert len(x) * keep - 2 * 4096 < len(out) <= len(x) * keep
    np.testing.assert_array_equal(out, x[: len(out)])
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "cut.flac" in warning and "damaged" in warning and "\n" not in warning


def test_a_flac_cut_inside_its_first_frame_is_refused(tmp_path: Path) -> None:
    """Nothing decoded before the damage: an error, as before."""
    x = np.random.default_rng(3).integers(-8000, 8000, SAMPLE_RATE).astype(np.int16)
    sf.write(tmp_path / "whole.flac", x, SAMPLE_RATE)
    data = (tmp_path / "whole.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 8])  # 4 frames: inside the first
    with pytest.raises(AudioInputError, match=r"cannot decode audio file .*cut\.flac"):
        read_audio_file(tmp_path / "cut.flac")


def test_a_file_name_that_is_not_utf8_is_read(tmp_path: Path) -> None:
    """Python holds a file name's bytes that are no UTF-8 (café.wav named in
    Latin-1) as lone surrogates, which soundfile encodes strictly: such a
    file could not be opened at all ("cannot decode audio file")."""
    x = np.random.default_rng(1).integers(-20000, 20000, 1600).astype(np.int16)
    sf.write(tmp_path / "a.wav", x, SAMPLE_RATE, subtype="PCM_16")
    latin1 = tmp_path / os.fsdecode(b"caf\xe9.wav")
    (tmp_path / "a.wav").rename(latin1)
    np.testing.assert_array_equal(read_audio_file(latin1), x)


def test_iter_chunks() -> None:
    x = np.arange(10, dtype=np.int16)
    chunks = list(iter_chunks(x, 4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), x)
    assert list(iter_chunks(x[:0], 4)) == []
    with pytest.raises(ValueError, match="at least 1"):
        list(iter_chunks(x, 0))


def test_a_path_that_cannot_be_looked_at_is_an_audio_input_error(tmp_path: Path) -> None:
    """Not only a missing file: a name too long (or, for a user, a folder on
    the way it may not search) raised a bare OSError, a traceback in the CLI."""
    with pytest.raises(AudioInputError, match="File name too long"):
        read_audio_file(tmp_path / ("a" * 300 + ".wav"))


def _through_a_fifo(tmp_path: Path, data: bytes) -> tuple[Path, threading.Thread]:
    """A named pipe that a thread fills with ``data`` once it is opened for
    reading (as ``<(ffmpeg ...)`` or ``cat x | ... /dev/stdin`` give a pipe)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def write() -> None:
        # open() blocks until the reader opens the pipe.
        with contextlib.suppress(BrokenPipeError), open(fifo, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return fifo, writer


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize(("fmt", "subtype"), [("WAV", "PCM_16"), ("FLAC", "PCM_16"),
                                              ("CAF", "PCM_16"), ("OGG", "VORBIS")])
def test_a_pipe_is_read_as_the_same_file_on_disk(tmp_path: Path, fmt: str, subtype: str) -> None:
    """A pipe (``transcribe <(ffmpeg ... -f flac -)``, ``curl ... |
    transcribe /dev/stdin``) gives what the file gives. libsndfile seeks in
    some formats: a FLAC from a pipe was refused as "not audio ... convert
    it to WAV or FLAC", and a CAF gave "contains no audio"."""
    x = (sine(440, 2.0, 44100, amp=0.4)).astype(np.float32)
    disk = tmp_path / f"a.{fmt.lower()}"
    sf.write(disk, x, 44100, format=fmt, subtype=subtype)
    want = read_audio_file(disk)
    fifo, writer = _through_a_fifo(tmp_path, disk.read_bytes())
    got = read_audio_file(fifo)
    writer.join(10)
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_flac_cut_short_in_a_pipe_gives_the_audio_before_the_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The damaged-file reading (read again up to the damage) works on a
    pipe too, which cannot be read twice."""
    x = np.random.default_rng(4).integers(-8000, 8000, 5 * SAMPLE_RATE).astype(np.int16)
    sf.write(tmp_path / "whole.flac", x, SAMPLE_RATE)
    data = (tmp_path / "whole.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: int(len(data) * 0.6)])
    want = read_audio_file(tmp_path / "cut.flac")
    fifo, writer = _through_a_fifo(tmp_path, data[: int(len(data) * 0.6)])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"):
        got = read_audio_file(fifo)
    writer.join(10)
    np.testing.assert_array_equal(got, want)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(fifo) in warning and "damaged" in warning
