"""What a WAV file's header leaves unsaid: the audio a recorder not closed
properly wrote after the data size it stated (0, a size never written; or
one written once and never again). libsndfile reads only what the header
says; :mod:`evoxtral_stream.audio.sources` reads the rest with
:class:`~evoxtral_stream.audio.wavstream.WavStreamDecoder`. Reads the
header's few bytes from a seekable file; decodes nothing."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["Unsized", "unsized_wav"]


@dataclass(frozen=True)
class Unsized:
    """Where a WAV's header leaves audio unsaid (:func:`unsized_wav`)."""

    stated: int
    """Bytes of audio its data chunk states (0: a size never written)."""
    extra: int
    """Bytes after those to the end of the file: audio too."""
    frame_bytes: int
    rate: int

    def seconds(self, size: int) -> float:
        return size // self.frame_bytes / self.rate


#: The size a data chunk of RIFF says for "unknown" (and RF64 for "see
#: ds64"): libsndfile reads it to the end of the file already.
_UNKNOWN_SIZE = 0xFFFFFFFF


def unsized_wav(f: BinaryIO) -> Unsized | None:
    """What of ``f``, if it is a RIFF or RF64 WAV, follows the audio its
    data chunk states and is audio too: bytes (at least a frame and a chunk
    header's 8) that are no chunk or tag. None for any other file, and for
    a WAV whose header leaves nothing unsaid: libsndfile reads those.

    A recorder killed before it went back to write its sizes leaves the
    data size 0 (Python's ``wave``; a header written for a pipe); one that
    wrote it once and went on leaves it short. After audio of the stated
    size a whole WAV has nothing, a pad byte, a chunk (``LIST``, ``id3 ``,
    ``bext``: four printable letters and a size no larger than the file)
    or an ID3 tag appended. Nor does a WAV hold unsaid audio whose data
    size is not 0 and whose RIFF size counts the whole file: its writer
    went back to write both, and what follows its audio (a writer's zero
    padding, a chunk named otherwise) is not audio."""
    if not f.seekable():  # a terminal: libsndfile says what it makes of it
        return None
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:] != b"WAVE":
        return None
    at, frame_bytes, rate, ds64 = 12, 0, 0, None
    riff: int | None = int(struct.unpack("<I", head[4:8])[0]) if head[:4] == b"RIFF" else None
    while at + 8 <= size:  # every step moves at least 8 bytes on
        f.seek(at)
        raw = f.read(8)
        if len(raw) < 8:  # cut shorter while read
            return None
        cid, stated = struct.unpack("<4sI", raw)
        at += 8
        if cid == b"data":
            if stated == _UNKNOWN_SIZE:
                if head[:4] == b"RIFF" or ds64 is None:
                    return None
                stated = ds64
            if not (frame_bytes and rate):  # no format before the audio: damaged
                return None
            if stated and riff is not None and abs(8 + riff - size) <= 1:
                return None  # closed properly (its last pad byte may be left out)
            return _unsaid(f, size, at + stated, stated, frame_bytes, rate)
        if cid in (b"fmt ", b"ds64"):
            body = f.read(min(stated, 32))
            if cid == b"fmt " and len(body) >= 14:
                rate, frame_bytes = (int(v) for v in struct.unpack("<I4xH", body[4:14]))
            elif cid == b"ds64" and len(body) >= 16:
                riff, ds64 = (int(v) for v in struct.unpack("<QQ", body[:16]))
        at += stated + (stated & 1)
    return None


def _unsaid(f: BinaryIO, size: int, end: int, stated: int, frame_bytes: int, rate: int
            ) -> Unsized | None:
    """:func:`unsized_wav` once the stated audio is known to end at ``end``."""
    extra = size - end
    if extra < max(8, frame_bytes):
        return None  # nothing, a pad byte, or too little to be a chunk: as libsndfile reads it
    # A chunk after audio of odd size starts after its pad byte, or where
    # the writer left the pad byte out.
    for at in (end, end + 1) if stated & 1 else (end,):
        f.seek(at)
        lead = f.read(8)
        if lead[:3] in (b"ID3", b"TAG"):  # an ID3v2 or ID3v1 tag appended
            return None
        if len(lead) == 8 and all(0x20 <= c <= 0x7E for c in lead[:4]) and (
                int.from_bytes(lead[4:], "little") <= size):
            return None
    return Unsized(stated, extra, frame_bytes, rate)
