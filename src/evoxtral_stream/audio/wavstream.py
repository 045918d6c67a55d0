"""A WAV stream decoder for live pipes: bytes in as they come, float32
frames out. Pure (no I/O, threads or clocks): :mod:`evoxtral_stream.audio.pipe`
reads the pipe and feeds it, and :mod:`evoxtral_stream.audio.sources` a WAV
file whose recorder never went back to write its sizes, or one of 24-bit
samples in 32-bit words (:mod:`evoxtral_stream.audio.wavsizes`).

libsndfile needs the whole file (it seeks, and reads the data size from the
header); a live writer (``arecord -t wav``, ``ffmpeg -f wav -``, ``sox -t wav
-``) cannot know that size when it writes the header, and says 0 or the
largest size it can: ffmpeg 0xFFFFFFFF, arecord 0x7FFFFF00, sox and espeak-ng
0x7FFFF000 (less what makes it whole frames). Those are hours of audio (3.4 h
of 44.1 kHz stereo from arecord), but the writer goes on past them. So a data
size of 0, or of 2 GiB less 128 KiB or more, is read as "until the end of the
stream"; any other is honoured (a WAV file piped whole may have chunks after
its audio). An RF64 stream's ds64 size is honoured unless 0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

import numpy as np

from evoxtral_stream.events import Float32Array

__all__ = ["MAX_FILE_RATE", "MIN_FILE_RATE", "WavEncoding", "WavFormat", "WavStreamDecoder",
           "WavStreamError", "parse_fmt"]

#: The lowest sample rate a file may have: below it the header is damaged
#: (no recording of speech is made so), and the upsampling to 16 kHz would
#: turn a few kilobytes into hours of audio and a block into gigabytes.
MIN_FILE_RATE = 1000
#: The highest sample rate a file may say: 768 kHz, the highest that audio
#: interfaces record at. Past it the header is damaged (a fuzzed WAV said
#: 2**31 - 1 Hz), and resampling it to 16 kHz took seconds per block to
#: give a handful of samples of noise.
MAX_FILE_RATE = 768_000

#: The most bytes read before the audio begins. A WAV header is tens of
#: bytes; metadata chunks (skipped unread, never held) a few kilobytes, cover
#: art a few megabytes. Past this the stream is no WAV that will ever reach
#: its audio (noise after a RIFF header), and it is refused.
MAX_HEADER_BYTES = 16 << 20

_FORMAT_PCM = 0x0001
_FORMAT_FLOAT = 0x0003
_FORMAT_EXTENSIBLE = 0xFFFE
#: The data size that RF64 puts in the RIFF fields (the real one is in ds64),
#: and that some writers use for "unknown".
_UNKNOWN_SIZE = 0xFFFFFFFF
#: The smallest data size read as a live writer's placeholder: sox writes
#: 0x7FFFF000 rounded down to whole frames (of up to 64 KiB).
_PLACEHOLDER_SIZE = 0x7FFE0000


class WavStreamError(ValueError):
    """The stream is not WAV audio this decoder reads; the message (one line,
    without the stream's name) is for people. ``other_format``: the stream
    is no WAV at all, or WAV in an encoding read here only from a whole file
    (µ-law, ADPCM...), so a file reader may still read it; else it is
    damaged or cut short."""

    def __init__(self, message: str, *, other_format: bool = False) -> None:
        super().__init__(message)
        self.other_format = other_format


class WavEncoding(Enum):
    """How the samples of a WAV stream are stored."""

    U8 = "8-bit unsigned PCM"
    S16 = "16-bit PCM"
    S24 = "24-bit PCM"
    S24_IN_32 = "24-bit PCM in 32-bit words"
    S32 = "32-bit PCM"
    F32 = "32-bit float"
    F64 = "64-bit float"


_WIDTHS = {WavEncoding.U8: 1, WavEncoding.S16: 2, WavEncoding.S24: 3,
           WavEncoding.S24_IN_32: 4, WavEncoding.S32: 4, WavEncoding.F32: 4,
           WavEncoding.F64: 8}


@dataclass(frozen=True)
class WavFormat:
    """What a WAV stream's header says of its audio."""

    rate: int
    channels: int
    encoding: WavEncoding

    @property
    def frame_bytes(self) -> int:
        return self.channels * _WIDTHS[self.encoding]


def _encoding(tag: int, bits: int) -> WavEncoding | None:
    if tag == _FORMAT_PCM:
        return {8: WavEncoding.U8, 16: WavEncoding.S16, 24: WavEncoding.S24,
                32: WavEncoding.S32}.get(bits)
    if tag == _FORMAT_FLOAT:
        return {32: WavEncoding.F32, 64: WavEncoding.F64}.get(bits)
    return None


def _samples(data: bytes, fmt: WavFormat) -> Float32Array:
    """Whole frames of ``data`` as float32 (frames, channels), scaled as
    libsndfile scales them (full scale is 1.0; no clipping of floats)."""
    enc = fmt.encoding
    if enc is WavEncoding.U8:
        flat = (np.frombuffer(data, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif enc is WavEncoding.S16:
        flat = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    elif enc in (WavEncoding.S24, WavEncoding.S24_IN_32):
        width = _WIDTHS[enc]  # a 32-bit word's top byte is not the sample's
        b = np.frombuffer(data, np.uint8).reshape(-1, width)[:, :3].astype(np.int32)
        # The three little-endian bytes into the top of an int32: the sign
        # comes with the shift, and full scale is 2**31 as for 32-bit PCM.
        flat = ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)).astype(np.float32)
        flat /= 2.0 ** 31
    elif enc is WavEncoding.S32:
        flat = np.frombuffer(data, "<i4").astype(np.float32) / 2.0 ** 31
    elif enc is WavEncoding.F32:
        flat = np.frombuffer(data, "<f4").astype(np.float32)
    else:
        # Past float32's range is ±inf and a signalling NaN a NaN, as
        # libsndfile casts them: a damaged file's noise, not a
        # RuntimeWarning on stderr.
        with np.errstate(over="ignore", invalid="ignore"):
            flat = np.frombuffer(data, "<f8").astype(np.float32)
    return flat.reshape(-1, fmt.channels)


class WavStreamDecoder:
    """Decode a WAV stream fed in pieces of any size (a byte at a time gives
    the same frames as the whole at once).

    :meth:`feed` returns the whole frames its bytes complete, float32
    ``(frames, channels)`` at the stream's own rate (empty while the header
    is still coming); :attr:`format` is set once the header is read. RIFF
    and RF64 (little-endian) with PCM 8/16/24/32-bit (24 also in 32-bit
    words, as ``arecord -f S24_LE`` sends it) or float 32/64-bit samples,
    plain or WAVE_FORMAT_EXTENSIBLE, any channel count, and a rate
    from :data:`MIN_FILE_RATE` to :data:`MAX_FILE_RATE`. Chunks before
    the audio are skipped; bytes past a data chunk's stated size are
    ignored (:attr:`ended`), unless that size is a live writer's
    placeholder (:attr:`data_bytes` None), or ``to_end``: then the audio
    runs to the end of the stream whatever size its header states (a file
    whose recorder stopped writing the size). Raises :class:`WavStreamError`
    on anything else, before any frame is returned. :meth:`finish` says how
    the stream ended."""

    def __init__(self, *, to_end: bool = False) -> None:
        self.format: WavFormat | None = None
        self.frames = 0
        """Frames returned so far."""
        self.ended = False
        """The data chunk's stated size was reached: later bytes are not audio."""
        self.data_bytes: int | None = None
        """The audio's size in bytes that the header states, once read;
        None: until the end of the stream (0, or a live writer's placeholder)."""
        self._buf = bytearray()
        self._header_bytes = 0
        self._skip = 0  # bytes of a chunk before the audio still to skip
        self._remaining: int | None = None  # audio bytes still due; None: to the end
        self._riff = False
        self._rf64 = False
        self._ds64_data: int | None = None
        self._pending_fmt: WavFormat | None = None
        self._to_end = to_end

    def feed(self, data: bytes) -> Float32Array:
        """Decode ``data``, the next bytes of the stream."""
        if self.ended or not data:
            return self._empty()
        if self.format is None:
            data = self._header(data)
            if self.format is None or not data:
                return self._empty()
        if self._remaining is not None:
            data = data[:self._remaining]
            self._remaining -= len(data)
            self.ended = self._remaining == 0
        self._buf += data
        fmt = self.format
        whole = len(self._buf) - len(self._buf) % fmt.frame_bytes
        if not whole:
            return self._empty()
        out = _samples(bytes(self._buf[:whole]), fmt)
        del self._buf[:whole]
        self.frames += len(out)
        return out

    def finish(self) -> int:
        """The stream ended: the bytes of a frame it left unfinished (0 when
        it ended on a frame). Raises :class:`WavStreamError` when it ended
        before its audio began."""
        if self.format is None:
            if not self._riff and not self._buf:
                raise WavStreamError("it ended before sending anything")
            raise WavStreamError("it ended before its audio began (an incomplete WAV header)")
        return len(self._buf)

    def _empty(self) -> Float32Array:
        channels = self.format.channels if self.format is not None else 1
        return np.zeros((0, channels), np.float32)

    def _header(self, data: bytes) -> bytes:
        """Take header bytes from ``data``; what follows the header (audio)
        is returned once :attr:`format` is set."""
        while data:
            if self._header_bytes > MAX_HEADER_BYTES:
                raise WavStreamError(f"its WAV header runs past {MAX_HEADER_BYTES >> 20} MiB "
                                     "without reaching the audio")
            if self._skip:
                n = min(self._skip, len(data))
                self._skip -= n
                self._header_bytes += n
                data = data[n:]
                continue
            self._buf += data
            data = b""
            while self.format is None:
                taken = self._header_step()
                if taken is None:
                    break
                self._header_bytes += taken
                del self._buf[:taken]
            if self.format is not None or self._skip:
                data, self._buf = bytes(self._buf), bytearray()
            if self.format is not None:
                return data
        return b""

    def _header_step(self) -> int | None:
        """Parse one piece of header at the start of the buffer: the bytes it
        took, or None when more are needed. May set a skip past the buffer."""
        buf = self._buf
        if not self._riff:
            if len(buf) < 12:
                if buf and not (b"RIFF".startswith(bytes(buf[:4]))
                                or b"RF64".startswith(bytes(buf[:4]))):
                    raise WavStreamError(_not_wav(bytes(buf)), other_format=True)
                return None
            magic, _, wave = struct.unpack("<4sI4s", buf[:12])
            if magic not in (b"RIFF", b"RF64") or wave != b"WAVE":
                raise WavStreamError(_not_wav(bytes(buf)), other_format=True)
            self._riff, self._rf64 = True, magic == b"RF64"
            return 12
        if len(buf) < 8:
            return None
        cid, stated = struct.unpack("<4sI", buf[:8])
        size = int(stated)
        if cid == b"data":
            fmt = self._pending_fmt
            if fmt is None:
                raise WavStreamError("its audio begins before the WAV header says its format")
            if self._rf64 and size == _UNKNOWN_SIZE:
                size = self._ds64_data or 0
            elif size >= _PLACEHOLDER_SIZE:
                size = 0  # a live writer's "as much as a WAV holds": it goes on
            # 0: a live writer's "unknown".
            self.data_bytes = size if size else None
            self._remaining = None if self._to_end else self.data_bytes
            self.format = fmt
            return 8
        padded = size + (size & 1)  # chunks are word-aligned
        if cid in (b"fmt ", b"ds64"):
            if padded > 4096:
                raise WavStreamError(f"its WAV {cid.decode().strip()} chunk says {size} bytes")
            if len(buf) < 8 + padded:
                return None
            body = bytes(buf[8:8 + size])
            if cid == b"fmt ":
                self._pending_fmt = parse_fmt(body)
            elif len(body) >= 16:
                self._ds64_data = int(struct.unpack("<Q", body[8:16])[0])
            return 8 + padded
        # Any other chunk (LIST, fact, bext, cue, ...): skipped unread.
        have = len(buf) - 8
        if have >= padded:
            return 8 + padded
        self._skip = padded - have
        return len(buf)


def parse_fmt(body: bytes) -> WavFormat:
    """The format a WAV fmt chunk's ``body`` says, as :class:`WavStreamDecoder`
    reads it; :class:`WavStreamError` for one it does not read."""
    if len(body) < 16:
        raise WavStreamError(f"its WAV fmt chunk is {len(body)} bytes, too short")
    tag, channels, rate, _, block, bits = struct.unpack("<HHIIHH", body[:16])
    if tag == _FORMAT_EXTENSIBLE:
        if len(body) < 26:
            raise WavStreamError("its WAV fmt chunk is extensible but too short")
        tag = struct.unpack("<H", body[24:26])[0]  # the sub-format GUID's first field
    encoding = _encoding(tag, bits)
    if encoding is None:
        raise WavStreamError(
            f"its WAV encoding (format 0x{tag:04x}, {bits}-bit) is not read live; "
            "send PCM or float samples (ffmpeg: -c:a pcm_s16le)", other_format=True)
    if channels < 1:
        raise WavStreamError("its WAV header says 0 channels")
    if encoding is WavEncoding.S24 and block == 4 * channels:
        # arecord -f S24_LE: ALSA's 24 bits in the low bytes of 32-bit words.
        # Any other block align is ignored, as libsndfile ignores it.
        encoding = WavEncoding.S24_IN_32
    if not MIN_FILE_RATE <= rate <= MAX_FILE_RATE:
        raise WavStreamError(f"its WAV header says {rate} Hz, outside the {MIN_FILE_RATE} to "
                             f"{MAX_FILE_RATE} Hz of audio (a damaged header?)")
    return WavFormat(rate, channels, encoding)


def _not_wav(head: bytes) -> str:
    shown = head[:12].hex(" ")
    return (f"it is not a WAV stream (it begins with bytes {shown}); send WAV, e.g. "
            "`ffmpeg ... -f wav -` or `arecord -t wav`")
