"""The WAV stream decoder of live pipes: the same frames as libsndfile reads
from the whole file, in pieces of any size, and one clear error for what it
does not read."""

from __future__ import annotations

import io
import random
import shutil
import struct
import subprocess
import warnings

import numpy as np
import pytest
import soundfile as sf

from evoxtral_stream.audio.wavstream import (
    MAX_HEADER_BYTES,
    WavEncoding,
    WavStreamDecoder,
    WavStreamError,
)
from evoxtral_stream.events import Float32Array


def _wav(subtype: str, channels: int, rate: int = 22050, frames: int = 5000,
         seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    data = rng.uniform(-0.9, 0.9, (frames, channels))
    buf = io.BytesIO()
    sf.write(buf, data, rate, subtype=subtype, format="WAV")
    return buf.getvalue()


def _decode(data: bytes, pieces: list[int] | None = None) -> tuple[Float32Array,
                                                                   WavStreamDecoder]:
    dec = WavStreamDecoder()
    out = []
    at = 0
    sizes = iter(pieces or [])
    while at < len(data):
        n = next(sizes, len(data) - at)
        out.append(dec.feed(data[at:at + n]))
        at += n
    assert dec.format is not None
    return np.concatenate([o for o in out if len(o)]), dec


def _random_pieces(total: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    sizes = []
    while total > 0:
        n = min(total, rnd.choice([1, 2, 3, 7, 44, 100, 4096]))
        sizes.append(n)
        total -= n
    return sizes


@pytest.mark.parametrize(("subtype", "encoding"), [
    ("PCM_U8", WavEncoding.U8), ("PCM_16", WavEncoding.S16), ("PCM_24", WavEncoding.S24),
    ("PCM_32", WavEncoding.S32), ("FLOAT", WavEncoding.F32), ("DOUBLE", WavEncoding.F64),
])
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_frames_equal_libsndfiles_in_pieces_of_any_size(subtype: str, encoding: WavEncoding,
                                                        channels: int) -> None:
    """Every encoding and channel count (3 channels: WAVE_FORMAT_EXTENSIBLE),
    fed whole or a byte at a time or in random pieces, gives libsndfile's
    float32 frames exactly."""
    data = _wav(subtype, channels)
    want, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    for pieces in (None, [1] * len(data), _random_pieces(len(data), channels)):
        got, dec = _decode(data, pieces)
        assert dec.format is not None
        assert (dec.format.rate, dec.format.channels, dec.format.encoding) == (
            rate, channels, encoding)
        assert got.dtype == np.float32
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert dec.frames == len(want)
        assert dec.finish() == 0


def test_chunks_before_the_audio_are_skipped_and_bytes_past_its_size_ignored() -> None:
    """A chunk of odd size (and its pad byte) before ``data`` is skipped;
    what follows a data chunk of stated size (a LIST chunk) is not audio."""
    data = _wav("PCM_16", 1, frames=100)
    fmt_end = data.index(b"data")
    junk = b"JUNK" + struct.pack("<I", 5) + b"abcde" + b"\0"
    lst = b"LIST" + struct.pack("<I", 4) + b"INFO"
    stream = data[:fmt_end] + junk + data[fmt_end:] + lst
    got, dec = _decode(stream, [1] * len(stream))
    np.testing.assert_array_equal(got, sf.read(io.BytesIO(data), dtype="float32",
                                               always_2d=True)[0])
    assert dec.ended


def test_a_data_size_of_zero_reads_to_the_end_of_the_stream() -> None:
    """A live writer cannot know the size when it writes the header: 0 is
    'until the stream ends', and a last frame cut short is counted, not
    decoded."""
    data = bytearray(_wav("PCM_16", 2, frames=100))
    at = data.index(b"data")
    data[at + 4:at + 8] = struct.pack("<I", 0)
    extra = np.arange(-50, 50, dtype="<i2").tobytes()
    got, dec = _decode(bytes(data) + extra + b"\x01\x02\x03")
    assert len(got) == 150
    np.testing.assert_array_equal(got[100:].reshape(-1), np.arange(-50, 50) / 32768.0)
    assert not dec.ended
    assert dec.finish() == 3


def test_rf64_takes_the_data_size_from_ds64() -> None:
    pcm = np.arange(8, dtype="<i2").tobytes()
    ds64 = b"ds64" + struct.pack("<I", 28) + struct.pack("<QQQI", 0, 8, 4, 0)
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
    stream = (b"RF64" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + ds64 + fmt
              + b"data" + struct.pack("<I", 0xFFFFFFFF) + pcm + b"not audio")
    got, dec = _decode(stream)
    np.testing.assert_array_equal(got.reshape(-1), np.arange(4) / 32768.0)
    assert dec.ended


def _header(tag: int = 1, channels: int = 1, rate: int = 16000, bits: int = 16) -> bytes:
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", 0) + b"WAVE" + b"fmt "
            + struct.pack("<IHHIIHH", 16, tag, channels, rate, rate * block, block, bits)
            + b"data" + struct.pack("<I", 0))


@pytest.mark.parametrize(("stream", "message", "other_format"), [
    (b"fLaC\0\0\0\x22", "is not a WAV stream (it begins with bytes 66", True),
    (b"RIFF\0\0\0\0AVI LIST", "is not a WAV stream", True),
    (_header(tag=0x55), "WAV encoding (format 0x0055, 16-bit) is not read live", True),
    (_header(tag=7, bits=8), "WAV encoding (format 0x0007, 8-bit)", True),  # mu-law
    (_header(bits=12), "format 0x0001, 12-bit", True),
    (_header(channels=0), "says 0 channels", False),
    (_header(rate=500), "says 500 Hz, outside", False),
    (_header(rate=2**31 - 1), "says 2147483647 Hz", False),
    (b"RIFF\0\0\0\0WAVEdata\0\0\0\0", "audio begins before the WAV header says its format",
     False),
    (b"RIFF\0\0\0\0WAVEfmt " + struct.pack("<I", 1 << 20), "fmt chunk says 1048576 bytes",
     False),
])
def test_what_is_not_read_is_one_clear_error(stream: bytes, message: str,
                                             other_format: bool) -> None:
    """Raised at the byte that shows it, whole or fed a byte at a time,
    before any frame. Another format (one a file reader may read whole) is
    told apart from a damaged WAV."""
    for pieces in (None, [1] * len(stream)):
        dec = WavStreamDecoder()
        with pytest.raises(WavStreamError) as e:
            _feed_all(dec, stream + np.zeros(8, np.int16).tobytes(), pieces)
        assert message in str(e.value)
        assert "\n" not in str(e.value)
        assert e.value.other_format is other_format


def _feed_all(dec: WavStreamDecoder, stream: bytes, pieces: list[int] | None) -> None:
    """Feed ``stream`` in ``pieces`` (None: whole); no piece may give frames."""
    at = 0
    for n in pieces or [len(stream)]:
        assert not len(dec.feed(stream[at:at + n]))
        at += n


def test_a_stream_that_ends_before_its_audio_says_so() -> None:
    assert "before sending anything" in _finish_error(b"")
    assert "ended before its audio began" in _finish_error(b"RIF")
    assert "ended before its audio began" in _finish_error(_header()[:30])


def _finish_error(data: bytes) -> str:
    dec = WavStreamDecoder()
    dec.feed(data)
    with pytest.raises(WavStreamError) as e:
        dec.finish()
    return str(e.value)


def test_a_header_that_never_reaches_the_audio_is_refused() -> None:
    """Chunks skipped unread still count: noise after a RIFF header (chunk
    sizes of random bytes) is refused once past the bound, not read for
    ever. Skipping holds nothing in memory."""
    dec = WavStreamDecoder()
    dec.feed(b"RIFF\0\0\0\0WAVE" + b"JUNK" + struct.pack("<I", 0xFFFFFFF0))
    piece = bytes(1 << 20)
    for _ in range(MAX_HEADER_BYTES // len(piece)):
        dec.feed(piece)
        assert len(dec._buf) == 0
    with pytest.raises(WavStreamError, match="runs past 16 MiB"):
        _feed_all(dec, piece * 2, [len(piece)] * 2)


def _riff(*chunks: bytes, riff_size: int = 0) -> bytes:
    return b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + b"".join(chunks)


_FMT_16K_MONO = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)


@pytest.mark.parametrize("stream", [
    # ffmpeg -f wav - (riffenc.c ff_start_tag: -1, never fixed on a pipe),
    # after its LIST INFO chunk.
    _riff(_FMT_16K_MONO, b"LIST" + struct.pack("<I", 26) + b"INFO" + b"ISFT"
          + struct.pack("<I", 14) + b"Lavf60.16.100\0",
          b"data" + struct.pack("<I", 0xFFFFFFFF), riff_size=0xFFFFFFFF),
    # arecord -t wav to a pipe (aplay.c begin_wave: 0x7fffff00).
    _riff(_FMT_16K_MONO, b"data" + struct.pack("<I", 0x7FFFFF00), riff_size=0x7FFFFF24),
    # sox -t wav - and espeak-ng --stdout: 0x7ffff000, less what makes it
    # whole frames (sox).
    _riff(_FMT_16K_MONO, b"data" + struct.pack("<I", 0x7FFFF000), riff_size=0x7FFFF024),
    _riff(b"fmt " + struct.pack("<IHHIIHH", 16, 1, 3, 44100, 44100 * 9, 9, 24),
          b"data" + struct.pack("<I", 0x7FFFEFFF), riff_size=0x7FFFF023),
], ids=["ffmpeg", "arecord", "espeak-ng", "sox-24bit-3ch"])
def test_a_live_writers_placeholder_size_reads_to_the_end_of_the_stream(stream: bytes) -> None:
    """The sizes live writers put in a header they cannot go back to fix
    are hours of audio (2 to 4 GiB: 3.4 h of 44.1 kHz stereo from arecord,
    6.2 h of 48 kHz stereo from ffmpeg), but the writer does not stop
    there: they are read as 'until the stream ends', as 0 is, or a camera
    captioned day and night would fall silent after a few hours."""
    dec = WavStreamDecoder()
    dec.feed(stream)
    assert dec.format is not None
    assert dec.data_bytes is None


@pytest.mark.parametrize("command", [
    ["sox", "-n", "-t", "wav", "-", "synth", "0.1", "sine", "440"],
    ["sox", "-n", "-t", "wav", "-b", "24", "-c", "3", "-", "synth", "0.1", "sine", "440"],
    ["espeak-ng", "--stdout", "hello"],
], ids=["sox", "sox-24bit-3ch", "espeak-ng"])
def test_real_writers_to_a_pipe_are_read_to_the_end_of_the_stream(command: list[str]) -> None:
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} not installed")
    stream = subprocess.run(command, capture_output=True, check=True, timeout=60).stdout
    dec = WavStreamDecoder()
    assert len(dec.feed(stream))
    assert dec.data_bytes is None
    assert not dec.ended


def test_a_stated_data_size_is_kept() -> None:
    """A WAV file piped whole states its real size: what follows is not audio."""
    dec = WavStreamDecoder()
    dec.feed(_riff(_FMT_16K_MONO, b"data" + struct.pack("<I", 6)))
    assert dec.data_bytes == 6
    assert len(dec.feed(bytes(8) + b"LIST")) == 3
    assert dec.ended


@pytest.mark.parametrize("top", ["sign", "zero"])
def test_24_bit_samples_in_32_bit_words_as_arecord_writes_them(top: str) -> None:
    """``arecord -f S24_LE -t wav``: 24-bit samples in the low three bytes
    of 32-bit words, which the header says as 24 bits with 4-byte samples
    (block align). Each word is one sample: read as three-byte samples they
    were loud noise, a third more frames than were sent."""
    rate, channels = 16000, 2
    t = np.arange(1000) / rate
    want = np.stack([np.round(0.5 * np.sin(2 * np.pi * 440 * t) * 2**23),
                     np.round(-0.25 * np.sin(2 * np.pi * 300 * t) * 2**23)], 1).astype(np.int32)
    words = want if top == "sign" else want & 0xFFFFFF  # the top byte: ALSA leaves either
    block = 4 * channels
    stream = _riff(b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block,
                                         block, 24),
                   b"data" + struct.pack("<I", 0x7FFFFF00)) + words.astype("<i4").tobytes()
    got, dec = _decode(stream, _random_pieces(len(stream), seed=3))
    assert dec.format is not None and dec.format.frame_bytes == block
    assert got.shape == (1000, 2)
    np.testing.assert_array_equal(got, want / 2.0**23)
def test_doubles_float32_cannot_hold_are_read_as_libsndfile_reads_them_quietly() -> None:
    """A 64-bit float sample past float32's range (a damaged file, a writer
    gone wrong) is ±inf, and a signalling NaN a NaN, as libsndfile reads
    them, quietly: numpy's "overflow" and "invalid value encountered in
    cast" RuntimeWarnings went to stderr, past logging."""
    x = np.array([[0.5], [1e300], [-1e300], [3.5e38], [np.nan], [0.0]])
    buf = io.BytesIO()
    sf.write(buf, x, 16000, subtype="DOUBLE", format="WAV")
    data = buf.getvalue()[:-8] + (0x7FF0000000000001).to_bytes(8, "little")  # signalling NaN
    want = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = WavStreamDecoder().feed(data)
    np.testing.assert_array_equal(got, want)


def test_to_end_reads_past_the_stated_size_to_the_end_of_the_stream() -> None:
    """For a file whose recorder wrote its data size once and went on: with
    ``to_end`` every byte after the header is audio, in RIFF and in RF64."""
    data = bytearray(_wav("PCM_16", 1, frames=100))
    at = data.index(b"data")
    data[at + 4:at + 8] = struct.pack("<I", 20)  # 10 frames
    got, dec = _decode(bytes(data))
    assert len(got) == 10 and dec.ended
    dec = WavStreamDecoder(to_end=True)
    got = np.concatenate([dec.feed(bytes(data[i:i + 7])) for i in range(0, len(data), 7)])
    assert len(got) == 100 and not dec.ended
    np.testing.assert_array_equal(got, sf.read(io.BytesIO(_wav("PCM_16", 1, frames=100)),
                                               dtype="float32", always_2d=True)[0])
    pcm = np.arange(8, dtype="<i2").tobytes()
    ds64 = b"ds64" + struct.pack("<I", 28) + struct.pack("<QQQI", 0, 4, 2, 0)
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
    stream = (b"RF64" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + ds64 + fmt
              + b"data" + struct.pack("<I", 0xFFFFFFFF) + pcm)
    dec = WavStreamDecoder(to_end=True)
    np.testing.assert_array_equal(dec.feed(stream).reshape(-1), np.arange(8) / 32768.0)
