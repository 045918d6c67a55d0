"""Audio files: decoding, chunking and errors."""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf  # type: ignore[import-untyped,unused-ignore]

from evoxtral_stream.audio.filereader import _PrintCatcher, joined, open_audio_file
from evoxtral_stream.audio.sources import (
    AudioInputError,
    iter_chunks,
    read_audio_channels,
    read_audio_file,
)
from evoxtral_stream.events import SAMPLE_RATE
from tests.helpers.audio import HAVE_ESPEAK, HAVE_SOX, dominant_frequency, espeak_wav, rms, sine

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


def _mp3_in_wav(mp3: bytes, rate: int, frames: int) -> bytes:
    """``mp3`` (one channel) as the data of a WAV whose format tag is
    MPEG Layer III (0x55, MPEGLAYER3WAVEFORMAT), as some recorders write;
    libsndfile decodes it with libmpg123."""
    fmt = (struct.pack("<HHIIHH", 0x55, 1, rate, 16000, 1, 0)
           + struct.pack("<HHIHHH", 12, 1, 2, 418, 1, 1393))
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"fact" + struct.pack("<II", 4, frames) + b"data" + struct.pack("<I", len(mp3)) + mp3)
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("name", ["glitch.mp3", "glitch.wav"])
def test_what_the_mp3_decoder_prints_is_logged_not_on_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    """libmpg123 prints its notes on an MP3 with a damaged frame ("Note:
    Illegal Audio-MPEG-Header ... Trying to resync...") straight to file
    descriptor 2: lines past logging on transcribe's stderr, in json mode
    too (docs/config.md: nothing else reaches stderr there), and before the
    one error line of a file it cannot decode. They are DEBUG records now,
    of a WAV that carries MP3 too (its format is WAV, its encoding MPEG
    Layer III: it was taken for a decoder that prints nothing, decoded
    uncaught and on a worker thread)."""
    path = tmp_path / name
    try:
        sf.write(tmp_path / "a.mp3", sine(440, 2.0, 44100, amp=0.4), 44100, format="MP3")
    except Exception as e:  # libsndfile built without LAME: nothing to test
        pytest.skip(f"this libsndfile cannot write MP3: {e}")
    data = bytearray((tmp_path / "a.mp3").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x55" * 64
    path.write_bytes(bytes(data) if name.endswith(".mp3") else
                     _mp3_in_wav(bytes(data), 44100, 2 * 44100))
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="evoxtral_stream"):
        with open_audio_file(path, [()]) as audio:
            assert audio.prints  # decoded on the event loop (run._Steps)
        out = read_audio_file(path)
    assert capfd.readouterr().err == ""
    assert abs(len(out) - 2 * SAMPLE_RATE) < SAMPLE_RATE // 5
    notes = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(name in n and "Illegal Audio-MPEG-Header" in n for n in notes), notes


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
        (_zero_bytes, "zero.flac", "is empty (0 bytes)"),
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


def test_an_empty_input_is_said_to_be_empty(tmp_path: Path) -> None:
    """Nothing to read (a zero-byte file, /dev/null, a pipe that ends at
    once: ``transcribe - </dev/null``, ``: | transcribe -``) is said so:
    libsndfile's word for it was "File does not exist or is not a regular
    file (possibly a pipe?)" of a file that is there, and "Format not
    recognised" of the others."""
    from evoxtral_stream.audio.filereader import AudioFile, open_audio_file, open_pipe_file

    (tmp_path / "zero.wav").write_bytes(b"")
    read, write = os.pipe()
    os.close(write)
    inputs: list[tuple[str, Callable[[], AudioFile]]] = [
        (str(tmp_path / "zero.wav"), lambda: open_audio_file(tmp_path / "zero.wav", [()])),
        ("/dev/null", lambda: open_audio_file("/dev/null", [()])),
        ("pipe", lambda: open_pipe_file(Path("pipe"), b"", read, [()])),
    ]
    try:
        for name, open_ in inputs:
            with pytest.raises(AudioInputError) as info:
                open_()
            assert str(info.value) == f"audio file {name} is empty (0 bytes)"
    finally:
        os.close(read)


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


# --- WAV headers a recorder never finished ----------------------------------------------


def _sizes(path: Path, *, riff: int | None = None, data: int | None = None) -> None:
    """Overwrite the RIFF size and the data chunk's size in ``path``'s header
    (what a recorder killed before it went back to write them leaves)."""
    b = bytearray(path.read_bytes())
    at = b.index(b"data")
    if riff is not None:
        b[4:8] = riff.to_bytes(4, "little")
    if data is not None:
        b[at + 4:at + 8] = data.to_bytes(4, "little")
    path.write_bytes(bytes(b))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("rate", "channels", "subtype", "riff"), [
    (16000, 1, "PCM_16", None),   # only the data size left at 0
    (16000, 1, "PCM_16", 0),      # both sizes the 0 placeholders
    (16000, 1, "PCM_16", 36),     # Python's wave: the RIFF size of no data
    (48000, 2, "FLOAT", 0),       # a fact and a PEAK chunk before the audio
    (44100, 3, "PCM_24", 0),      # WAVE_FORMAT_EXTENSIBLE
    (8000, 1, "PCM_U8", 0),
])
def test_a_wav_whose_header_says_no_audio_is_read_to_its_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, rate: int, channels: int, subtype: str,
    riff: int | None,
) -> None:
    """A WAV whose data size was never written (0) but that holds 3 s of
    audio after its header gives the samples of the same file with its
    sizes right, and one warning naming it. libsndfile reads such a file as
    empty: "contains no audio"."""
    x = np.random.default_rng(rate).uniform(-0.5, 0.5, (3 * rate, channels))
    whole, unsized = tmp_path / "whole.wav", tmp_path / "rec.wav"
    sf.write(whole, x, rate, subtype=subtype)
    unsized.write_bytes(whole.read_bytes())
    _sizes(unsized, riff=riff, data=0)
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"):
        got = read_audio_file(unsized)
    np.testing.assert_array_equal(got, read_audio_file(whole))
    (warning,) = _warnings(caplog)
    assert warning == (f"audio file {unsized}: its WAV header says no audio (a recording not "
                       "closed properly?): read to the end of the file, 3.0 s")


_KILLED_RECORDER = r"""
import os, sys, wave
import numpy as np
rng = np.random.default_rng(0)
f = open(sys.argv[1], "wb")
w = wave.open(f, "wb")
w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
for i in range(int(sys.argv[2])):  # a second at a time, as a recorder writes
    w.writeframesraw((rng.standard_normal(16000) * 3000).astype("<i2").tobytes())
f.flush()
os._exit(0)  # killed: the header's sizes are never written again
"""


def test_a_recording_python_s_wave_never_closed_is_read_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A recorder writing with Python's ``wave`` and killed: its header says
    the size of its first block (``wave`` writes the header then, and the
    real sizes at close), 1 s; the file holds 5 s. libsndfile reads 1 s."""
    path = tmp_path / "killed.wav"
    subprocess.run([sys.executable, "-c", _KILLED_RECORDER, str(path), "5"], check=True,
                   timeout=60)
    assert sf.info(path).frames == SAMPLE_RATE  # what libsndfile makes of it
    rng = np.random.default_rng(0)
    want = np.concatenate([(rng.standard_normal(16000) * 3000).astype(np.int16)
                           for _ in range(5)])
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"):
        got = read_audio_file(path)
    np.testing.assert_array_equal(got, want)
    (warning,) = _warnings(caplog)
    assert warning == (f"audio file {path} holds more audio than its WAV header says (it says "
                       "1.0 s; a recording not closed properly?): read to the end of the file, "
                       "5.0 s")


@pytest.mark.skipif(not HAVE_SOX, reason="sox is not installed")
def test_a_wav_sox_wrote_to_a_pipe_with_zero_sizes_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """sox writing to a pipe (``sox ... -t wav - | ...``, saved to disk):
    WAVE_FORMAT_EXTENSIBLE with a fact chunk, 32-bit, stereo 48 kHz. With
    its size placeholders 0 (as a writer for a pipe may leave them) it
    gives what sox's own file gives."""
    sox = subprocess.run(["sox", "-R", "-n", "-r", "48000", "-c", "2", "-b", "32", "-t", "wav",
                          "-", "synth", "2", "pinknoise", "vol", "0.3"],
                         check=True, capture_output=True, timeout=60).stdout
    original, zeroed = tmp_path / "sox.wav", tmp_path / "zeroed.wav"
    original.write_bytes(sox)
    zeroed.write_bytes(sox)
    _sizes(zeroed, riff=0, data=0)
    want = read_audio_file(original)
    assert abs(len(want) - 2 * SAMPLE_RATE) <= 2
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"):
        got = read_audio_file(zeroed)
    np.testing.assert_array_equal(got, want)
    (warning,) = _warnings(caplog)
    assert "zeroed.wav" in warning and "2.0 s" in warning


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")
def test_espeak_speech_with_zero_sizes_is_read(tmp_path: Path) -> None:
    """espeak-ng's speech (``--stdout``, its own size placeholders) with the
    sizes 0: the same samples as its file."""
    speech = subprocess.run(["espeak-ng", "--stdout", "hello world, this is a test"],
                            check=True, capture_output=True, timeout=60).stdout
    original, zeroed = tmp_path / "espeak.wav", tmp_path / "zeroed.wav"
    original.write_bytes(speech)
    zeroed.write_bytes(speech)
    _sizes(zeroed, riff=0, data=0)
    want = read_audio_file(original)
    assert rms(want) > 300
    np.testing.assert_array_equal(read_audio_file(zeroed), want)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_wav_with_zero_sizes_from_a_pipe_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``transcribe -`` of such a file (its copy on disk) reads it too."""
    x = np.random.default_rng(9).integers(-8000, 8000, 2 * SAMPLE_RATE).astype(np.int16)
    path = tmp_path / "rec.wav"
    sf.write(path, x, SAMPLE_RATE)
    _sizes(path, riff=0, data=0)
    fifo, writer = _through_a_fifo(tmp_path, path.read_bytes())
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"):
        got = read_audio_file(fifo)
    writer.join(10)
    np.testing.assert_array_equal(got, x)
    (warning,) = _warnings(caplog)
    assert str(fifo) in warning and "2.0 s" in warning


def test_channels_of_a_wav_with_zero_sizes_are_read_apart(tmp_path: Path) -> None:
    """Mixes of its channels as of the whole file; a channel it lacks is the
    error naming the option, as ever."""
    rate = 48000
    x = np.random.default_rng(2).uniform(-0.5, 0.5, (3 * rate, 3)).astype(np.float32)
    whole, unsized = tmp_path / "whole.wav", tmp_path / "three.wav"
    sf.write(whole, x, rate, subtype="FLOAT")
    unsized.write_bytes(whole.read_bytes())
    _sizes(unsized, riff=0, data=0)
    mixes = [(3,), (1,), (1, 2), ()]
    for got, want in zip(read_audio_channels(unsized, mixes), read_audio_channels(whole, mixes),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(AudioInputError) as e:
        read_audio_channels(unsized, [(1,), (4,)])
    assert str(e.value) == (f"audio.channels asks for channel 4, but audio file {unsized} "
                            "has 3 channel(s)")


def test_a_long_wav_with_zero_sizes_is_read_in_blocks(tmp_path: Path) -> None:
    """Memory stays bounded as for any file: a minute of 48 kHz stereo float
    peaks at a few times its 16 kHz mono result."""
    import tracemalloc

    rate = 48000
    x = np.random.default_rng(1).uniform(-0.5, 0.5, (60 * rate, 2)).astype(np.float32)
    whole, unsized = tmp_path / "whole.wav", tmp_path / "long.wav"
    sf.write(whole, x, rate, subtype="FLOAT")
    del x
    unsized.write_bytes(whole.read_bytes())
    _sizes(unsized, riff=0, data=0)
    want = read_audio_file(whole)
    tracemalloc.start()
    try:
        out = read_audio_file(unsized)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out, want)
    assert peak < 4 * out.nbytes, f"peak {peak / 1e6:.1f} MB for {out.nbytes / 1e6:.1f} MB"


def test_a_wav_whose_header_says_less_than_it_holds_is_read_to_its_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A recorder that wrote its sizes 1 s in and went on recording: what
    follows the stated audio is no chunk, so it is the rest of the
    recording. All 3 s are read, with a warning that says so. libsndfile
    reads the 1 s the header states."""
    x = np.random.default_rng(4).integers(-8000, 8000, 3 * SAMPLE_RATE).astype(np.int16)
    path = tmp_path / "rec.wav"
    sf.write(path, x, SAMPLE_RATE)
    _sizes(path, riff=36 + 2 * SAMPLE_RATE, data=2 * SAMPLE_RATE)
    assert sf.info(path).frames == SAMPLE_RATE
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"):
        got = read_audio_file(path)
    np.testing.assert_array_equal(got, x)
    (warning,) = _warnings(caplog)
    assert warning == (f"audio file {path} holds more audio than its WAV header says (it says "
                       "1.0 s; a recording not closed properly?): read to the end of the file, "
                       "3.0 s")


def _chunk(cid: bytes, body: bytes) -> bytes:
    return cid + len(body).to_bytes(4, "little") + body + b"\0" * (len(body) & 1)


def _append(path: Path, tail: bytes) -> None:
    data = path.read_bytes() + tail
    path.write_bytes(data[:4] + (len(data) - 8).to_bytes(4, "little") + data[8:])


@pytest.mark.parametrize(("frames", "tail", "named"), [
    (SAMPLE_RATE, _chunk(b"LIST", b"INFO" + _chunk(b"INAM", b"a title")), "a LIST chunk"),
    (1001, _chunk(b"id3 ", b"ID3\x04" + bytes(40)), "odd size, then its pad byte"),
    (1001, _chunk(b"id3 ", b"ID3\x04" + bytes(40)), "odd size, its pad byte left out"),
    (SAMPLE_RATE, b"TAG" + b"a title".ljust(125, b"\0"), "an ID3v1 tag"),
    (SAMPLE_RATE, b"ID3\x04\0\0\0\0\0\x10" + bytes(16), "an ID3v2 tag"),
    (SAMPLE_RATE, b"\0\0\0", "a few stray bytes"),
    # Past what a chunk looks like, but inside the RIFF size the writer wrote
    # last: a recording closed properly, its data size final too.
    (SAMPLE_RATE, bytes(4096), "zero padding that the RIFF size counts"),
    (1001, _chunk(b"\0\x01\xfe\xff", bytes(100)), "a chunk whose id is no letters"),
])
def test_what_follows_the_audio_of_a_whole_wav_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, frames: int, tail: bytes, named: str
) -> None:
    """A WAV with its sizes right and a chunk or a tag after its audio reads
    as it always has: its audio, no warning."""
    x = np.random.default_rng(5).integers(-8000, 8000, frames).astype(np.int16)
    path = tmp_path / "tagged.wav"
    sf.write(path, x, SAMPLE_RATE, subtype="PCM_U8" if frames % 2 else "PCM_16")
    if "left out" in named:  # the pad byte after the odd-sized audio that libsndfile wrote
        path.write_bytes(path.read_bytes()[:-1])
    _append(path, tail)
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"):
        got = read_audio_file(path)
    assert len(got) == frames, named
    assert _warnings(caplog) == [], named


def test_an_empty_wav_is_still_empty(tmp_path: Path) -> None:
    """Data size 0 and nothing after it, or only a chunk after it: a WAV
    with no audio, an error as ever."""
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.int16), SAMPLE_RATE)
    with pytest.raises(AudioInputError, match="contains no audio"):
        read_audio_file(path)
    _append(path, _chunk(b"LIST", b"INFO" + _chunk(b"INAM", b"a title")))
    with pytest.raises(AudioInputError, match="contains no audio"):
        read_audio_file(path)


def test_a_wav_with_zero_sizes_in_an_encoding_not_read_to_the_end_says_so(
        tmp_path: Path) -> None:
    """A mu-law WAV with its sizes 0: one error line saying why, not
    "contains no audio"."""
    path = tmp_path / "phone.wav"
    sf.write(path, np.zeros(8000, np.int16), 8000, subtype="ULAW")
    _sizes(path, riff=0, data=0)
    with pytest.raises(AudioInputError) as e:
        read_audio_file(path)
    assert str(e.value).startswith(f"audio file {path}: its WAV header says no audio")
    assert "PCM or float" in str(e.value) and "\n" not in str(e.value)


def test_a_damaged_header_with_zero_sizes_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "slow.wav"
    sf.write(path, np.zeros(8000, np.int16), 8000)
    b = bytearray(path.read_bytes())
    b[24:28] = (500).to_bytes(4, "little")  # 500 Hz
    path.write_bytes(bytes(b))
    _sizes(path, riff=0, data=0)
    with pytest.raises(AudioInputError, match=r"slow\.wav.*500 Hz"):
        read_audio_file(path)


def test_a_mu_law_wav_that_says_less_than_it_holds_gives_what_it_says(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An encoding read past its stated size only as PCM or float: the audio
    the header states, and a warning that the rest is not read."""
    path = tmp_path / "phone.wav"
    sf.write(path, sine(440, 3.0, 8000, amp=0.4), 8000, subtype="ULAW")
    # Both sizes written 1 s in, and never again.
    _sizes(path, riff=path.read_bytes().index(b"data") + 8000, data=8000)
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"):
        got = read_audio_file(path)
    assert len(got) == SAMPLE_RATE
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"audio file {path} holds more audio than its WAV header says")
    assert "(it says 1.0 s, 2.0 s more follow;" in warning
    assert "only the 1.0 s it says is read, as its encoding" in warning


def test_an_rf64_whose_ds64_says_no_audio_is_read_to_its_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """RF64 keeps its sizes in ds64: a data size of 0 there is read to the
    end too; the whole RF64 reads as ever, without a warning."""
    x = np.random.default_rng(6).integers(-8000, 8000, 2 * SAMPLE_RATE).astype(np.int16)
    whole, unsized = tmp_path / "whole.wav", tmp_path / "rec.wav"
    sf.write(whole, x, SAMPLE_RATE, format="RF64")
    b = bytearray(whole.read_bytes())
    at = b.index(b"ds64") + 8
    b[at + 8:at + 16] = bytes(8)  # its data size
    unsized.write_bytes(bytes(b))
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"):
        np.testing.assert_array_equal(read_audio_file(whole), x)
        assert _warnings(caplog) == []
        np.testing.assert_array_equal(read_audio_file(unsized), x)
    (warning,) = _warnings(caplog)
    assert "rec.wav: its WAV header says no audio" in warning and "2.0 s" in warning


# --- 24-bit samples in 32-bit words (arecord -f S24_LE) ---------------------------------

#: KSDATAFORMAT_SUBTYPE_PCM, the sub-format of a WAVE_FORMAT_EXTENSIBLE fmt chunk.
_GUID_PCM = (1).to_bytes(4, "little") + bytes.fromhex("00001000800000aa00389b71")


def _s24_words_wav(path: Path, samples: np.ndarray, rate: int, *, fmt: str,
                   top: str = "sign", tail: bytes = b"") -> None:
    """``samples`` (int32 (frames, channels) of 24-bit values) as a WAV of
    32-bit words, its header written by hand: ``fmt`` "pcm" as ``arecord -f
    S24_LE`` writes it (format 1, 24 bits, block align 4 per channel),
    "extensible" the same as WAVE_FORMAT_EXTENSIBLE (24 bits, 24 valid),
    "extensible32" WAVE_FORMAT_EXTENSIBLE as its spec has it (32-bit words,
    24 valid bits, the sample in the top three bytes). The sample is in the
    low three bytes of its word, the top byte its sign or 0 (``top``: ALSA
    leaves either), but for "extensible32". ``tail`` follows the audio."""
    channels = samples.shape[1]
    block = 4 * channels
    if fmt == "pcm":
        body = _fmt16(1, channels, rate, block, 24)
    elif fmt == "extensible":
        body = _fmt16(0xFFFE, channels, rate, block, 24) + _extension(24)
    else:
        body = _fmt16(0xFFFE, channels, rate, block, 32) + _extension(24)
    if fmt == "extensible32":
        words = samples.astype(np.int64) << 8
    else:
        words = samples if top == "sign" else samples & 0xFFFFFF
    audio = words.astype("<i4").tobytes()
    chunks = _chunk(b"fmt ", body) + _chunk(b"data", audio) + tail
    path.write_bytes(b"RIFF" + (4 + len(chunks)).to_bytes(4, "little") + b"WAVE" + chunks)


def _fmt16(tag: int, channels: int, rate: int, block: int, bits: int) -> bytes:
    return (tag.to_bytes(2, "little") + channels.to_bytes(2, "little")
            + rate.to_bytes(4, "little") + (rate * block).to_bytes(4, "little")
            + block.to_bytes(2, "little") + bits.to_bytes(2, "little"))


def _extension(valid_bits: int) -> bytes:
    return ((22).to_bytes(2, "little") + valid_bits.to_bytes(2, "little")
            + bytes(4) + _GUID_PCM)  # no channel mask


def _s24(seconds: float, rate: int, channels: int) -> np.ndarray:
    """Half-scale 24-bit sines, a frequency per channel."""
    return np.stack([np.round(sine(440 + 110 * c, seconds, rate, amp=0.5) * 2**23)
                     for c in range(channels)], axis=1).astype(np.int32)


@pytest.mark.parametrize(("fmt", "top"), [("pcm", "sign"), ("pcm", "zero"),
                                          ("extensible", "sign")])
@pytest.mark.parametrize(("channels", "rate", "seconds"), [
    (1, 16000, 1.0),   # libsndfile read it as 32-bit samples: 48 dB too quiet
    (1, 16000, 0.05),  # too short for libsndfile's guess: 3-byte samples, noise
    (2, 48000, 1.0),
])
def test_24_bit_samples_in_32_bit_words_are_read_as_the_same_audio_packed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fmt: str, top: str, channels: int,
    rate: int, seconds: float,
) -> None:
    """A WAV ``arecord -f S24_LE`` recorded and closed: each 24-bit sample in
    the low three bytes of a 32-bit word, which its header says as 24 bits
    with a block align of 4 bytes a channel. It gives the samples of the
    same audio written as packed 24-bit, without a warning; libsndfile read
    it as 32-bit samples (a half-scale sine peaked at 64 in int16, not
    16384) or as 3-byte ones (noise, a third more of it), as its guess
    from the data went."""
    x = _s24(seconds, rate, channels)
    packed, words = tmp_path / "packed.wav", tmp_path / "rec.wav"
    sf.write(packed, x / 2**23, rate, subtype="PCM_24")
    _s24_words_wav(words, x, rate, fmt=fmt, top=top)
    want = read_audio_channels(packed, [()] + [(c,) for c in range(1, channels + 1)])
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"):
        got = read_audio_channels(words, [()] + [(c,) for c in range(1, channels + 1)])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert np.abs(got[1]).max() == pytest.approx(16384, rel=0.01)  # channel 1, half scale
    assert _warnings(caplog) == []


def test_24_bit_samples_in_32_bit_words_end_where_the_header_says(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunk after the audio, inside the sizes the header states, is not
    audio (as libsndfile reads a WAV); a recording not closed properly (its
    data size left at 0) is read to the end of its file, with the warning."""
    x = _s24(1.0, 16000, 2)
    packed, words = tmp_path / "packed.wav", tmp_path / "rec.wav"
    sf.write(packed, x / 2**23, 16000, subtype="PCM_24")
    want = read_audio_file(packed)
    _s24_words_wav(words, x, 16000, fmt="pcm",
                   tail=_chunk(b"LIST", b"INFO" + _chunk(b"ISFT", b"arecord" + bytes(993))))
    with caplog.at_level(logging.WARNING, logger="evoxtral_stream"):
        np.testing.assert_array_equal(read_audio_file(words), want)
        assert _warnings(caplog) == []
        _s24_words_wav(words, x, 16000, fmt="pcm")
        _sizes(words, riff=0, data=0)
        np.testing.assert_array_equal(read_audio_file(words), want)
    (warning,) = _warnings(caplog)
    assert "rec.wav: its WAV header says no audio" in warning and "1.0 s" in warning
    # No audio, then a chunk: no audio, as ever.
    _s24_words_wav(words, x[:0], 16000, fmt="pcm", tail=_chunk(b"LIST", b"INFO" + bytes(100)))
    with pytest.raises(AudioInputError, match="contains no audio"):
        read_audio_file(words)


class _NoDecoder:
    def __init__(self, **_: object) -> None:
        raise AssertionError("read by WavStreamDecoder, not libsndfile")


@pytest.mark.parametrize("kind", ["PCM_24", "PCM_32", "extensible32"])
def test_other_24_and_32_bit_wavs_are_still_read_by_libsndfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Packed 24-bit, 32-bit PCM, and WAVE_FORMAT_EXTENSIBLE's 24 valid bits
    in 32-bit words (the sample in the top three bytes, as its spec has it,
    which libsndfile reads right): libsndfile reads them, the samples of
    the packed file."""
    x = _s24(1.0, 48000, 2)
    packed, path = tmp_path / "packed.wav", tmp_path / "other.wav"
    sf.write(packed, x / 2**23, 48000, subtype="PCM_24")
    want = read_audio_file(packed)
    if kind == "extensible32":
        _s24_words_wav(path, x, 48000, fmt=kind)
    else:
        sf.write(path, x / 2**23, 48000, subtype=kind)
    monkeypatch.setattr("evoxtral_stream.audio.filereader.WavStreamDecoder", _NoDecoder)
    np.testing.assert_array_equal(read_audio_file(packed), want)
    np.testing.assert_array_equal(read_audio_file(path), want)


def test_two_catches_at_once_leave_descriptor_2_where_it_was(tmp_path: Path) -> None:
    """Passes may be read on worker threads: two catches of descriptor 2 at
    once each restored what the other had put there, leaving descriptor 2
    on a closed temporary file (every later line on stderr lost). One
    catch at a time: the second waits for the first."""
    before = os.fstat(2)
    inside, second_in = threading.Event(), threading.Event()

    def first() -> None:
        with _PrintCatcher(tmp_path / "a.mp3").caught():
            inside.set()
            second_in.wait(0.5)  # the second must not get in meanwhile

    def second() -> None:
        inside.wait(5)
        with _PrintCatcher(tmp_path / "b.mp3").caught():
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


@pytest.mark.parametrize("fmt", ["FLAC", "OGG", "WAV", "MP3"])
def test_only_a_decoder_that_prints_has_descriptor_2_caught(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """Descriptor 2 is the process's: caught while a block of a FLAC, Ogg or
    WAV decodes (none prints there), it took what the event loop's thread
    wrote there meanwhile (a log line on a terminal) once blocks decode on
    worker threads. Only an MP3's blocks (libmpg123) are caught."""
    path = tmp_path / f"a.{fmt.lower()}"
    try:
        sf.write(path, sine(440, 1.0, 44100, amp=0.4), 44100, format=fmt)
    except Exception as e:  # libsndfile built without LAME: nothing to test
        pytest.skip(f"this libsndfile cannot write {fmt}: {e}")
    redirected: list[int] = []
    real_dup2 = os.dup2

    def dup2(fd: int, fd2: int, inheritable: bool = True) -> int:
        if fd2 == 2:
            redirected.append(fd)
        return real_dup2(fd, fd2, inheritable)

    with open_audio_file(path, [()]) as audio:
        monkeypatch.setattr(os, "dup2", dup2)
        blocks = joined(audio.blocks(), 1)[0]
    assert len(blocks) > SAMPLE_RATE * 0.9
    assert audio.prints == (fmt == "MP3")
    assert bool(redirected) == (fmt == "MP3")
