"""What libsndfile misreads in a WAV file's header: the audio a recorder
not closed properly wrote after the data size it stated (0, a size never
written; or one written once and never again), which libsndfile does not
read, and 24-bit samples in 32-bit words (``arecord -f S24_LE``), which it
reads as 32-bit or 3-byte samples. :mod:`evoxtral_stream.audio.sources`
reads such a file with
:class:`~evoxtral_stream.audio.wavstream.WavStreamDecoder`. Reads the
header's few bytes from a seekable file; decodes nothing."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from evoxtral_stream.audio.wavstream import WavEncoding, WavStreamError, parse_fmt

__all__ = ["Misread", "misread_wav"]


@dataclass(frozen=True)
class Misread:
    """What of a WAV libsndfile misreads (:func:`misread_wav`)."""

    stated: int
    """Bytes of audio its data chunk states (0: a size never written, or
    RIFF's "unknown": to the end of the file)."""
    extra: int
    """Bytes after those to the end of the file that are audio too (0:
    none; the file is read as its header says)."""
    frame_bytes: int
    rate: int
    words: bool
    """Its samples are 24 bits in 32-bit words."""

    def seconds(self, size: int) -> float:
        return size // self.frame_bytes / self.rate


#: The size a data chunk of RIFF says for "unknown" (and RF64 for "see
#: ds64"): libsndfile reads it to the end of the file already.
_UNKNOWN_SIZE = 0xFFFFFFFF


def misread_wav(f: BinaryIO) -> Misread | None:
    """What libsndfile misreads of ``f``, if it is a RIFF or RF64 WAV: audio
    after what its data chunk states (bytes, at least a frame and a chunk
    header's 8, that are no chunk or tag), and samples of 24 bits in 32-bit
    words. None for any other file, and for a WAV with neither: libsndfile
    reads those.

    A recorder killed before it went back to write its sizes leaves the
    data size 0 (Python's ``wave``; a header written for a pipe); one that
    wrote it once and went on leaves it short. After audio of the stated
    size a whole WAV has nothing, a pad byte, a chunk (``LIST``, ``id3 ``,
    ``bext``: four printable letters and a size no larger than the file)
    or an ID3 tag appended. Nor does a WAV hold unsaid audio whose data
    size is not 0 and whose RIFF size counts the whole file: its writer
    went back to write both, and what follows its audio (a writer's zero
    padding, a chunk named otherwise) is not audio.

    ``arecord -f S24_LE`` writes each 24-bit sample in the low three bytes
    of a 32-bit word, and a fmt chunk of 24 bits with a block align of 4
    bytes a channel: libsndfile guesses from the data, and reads 32-bit
    samples (256 times too quiet) or 3-byte ones (noise). The fmt chunk is
    read as :class:`~evoxtral_stream.audio.wavstream.WavStreamDecoder`
    reads it (:func:`~evoxtral_stream.audio.wavstream.parse_fmt`)."""
    if not f.seekable():  # a terminal: libsndfile says what it makes of it
        return None
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:] != b"WAVE":
        return None
    at, frame_bytes, rate, ds64, words = 12, 0, 0, None, False
    riff: int | None = int(struct.unpack("<I", head[4:8])[0]) if head[:4] == b"RIFF" else None
    while at + 8 <= size:  # every step moves at least 8 bytes on
        f.seek(at)
        raw = f.read(8)
        if len(raw) < 8:  # cut shorter while read
            return None
        cid, stated = struct.unpack("<4sI", raw)
        at += 8
        if cid == b"data":
            if not (frame_bytes and rate):  # no format before the audio: damaged
                return None
            if stated == _UNKNOWN_SIZE:
                if head[:4] == b"RIFF" or ds64 is None:
                    # Audio to the end of the file, for libsndfile and the decoder alike.
                    return Misread(0, 0, frame_bytes, rate, words) if words else None
                stated = ds64
            if stated and riff is not None and abs(8 + riff - size) <= 1:
                extra = 0  # closed properly (its last pad byte may be left out)
            else:
                extra = _unsaid(f, size, at + stated, stated, frame_bytes)
            # Samples in words but none stated or unsaid: no audio to misread.
            if extra or (words and stated):
                return Misread(stated, extra, frame_bytes, rate, words)
            return None
        if cid in (b"fmt ", b"ds64"):
            body = f.read(min(stated, 32))
            if cid == b"fmt " and len(body) >= 14:
                rate, frame_bytes = (int(v) for v in struct.unpack("<I4xH", body[4:14]))
                try:
                    words = parse_fmt(body).encoding is WavEncoding.S24_IN_32
                except WavStreamError:  # an encoding it does not read, a damaged header
                    words = False
            elif cid == b"ds64" and len(body) >= 16:
                riff, ds64 = (int(v) for v in struct.unpack("<QQ", body[:16]))
        at += stated + (stated & 1)
    return None


def _unsaid(f: BinaryIO, size: int, end: int, stated: int, frame_bytes: int) -> int:
    """:func:`misread_wav`'s bytes of unsaid audio once the stated audio is
    known to end at ``end``: 0 for none."""
    extra = size - end
    if extra < max(8, frame_bytes):
        return 0  # nothing, a pad byte, or too little to be a chunk: as libsndfile reads it
    # A chunk after audio of odd size starts after its pad byte, or where
    # the writer left the pad byte out.
    for at in (end, end + 1) if stated & 1 else (end,):
        f.seek(at)
        lead = f.read(8)
        if lead[:3] in (b"ID3", b"TAG"):  # an ID3v2 or ID3v1 tag appended
            return 0
        if len(lead) == 8 and all(0x20 <= c <= 0x7E for c in lead[:4]) and (
                int.from_bytes(lead[4:], "little") <= size):
            return 0
    return extra
