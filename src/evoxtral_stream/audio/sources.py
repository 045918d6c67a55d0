"""Audio files (soundfile), decoded to mono int16 at
:data:`~evoxtral_stream.events.SAMPLE_RATE`, and the error every audio input
raises. The microphone is in :mod:`evoxtral_stream.audio.microphone`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf  # type: ignore[import-untyped,unused-ignore]

from evoxtral_stream.audio.resample import StreamResampler
from evoxtral_stream.events import SAMPLE_RATE, Int16Array

__all__ = ["AudioInputError", "iter_chunks", "read_audio_file"]

#: Frames decoded at a time: the file is converted block by block, so memory
#: holds the 16 kHz result and one block, never the whole file as decoded.
_READ_FRAMES = 1 << 16
#: The lowest sample rate a file may have: below it the header is damaged
#: (no recording of speech is made so), and the upsampling to 16 kHz would
#: turn a few kilobytes into hours of audio and a block into gigabytes.
MIN_FILE_RATE = 1000


class AudioInputError(Exception):
    """Audio input cannot be read; the message (one line) is for people."""


# --- files ------------------------------------------------------------------


def read_audio_file(path: str | os.PathLike[str]) -> Int16Array:
    """Decode a whole audio file (anything libsndfile reads: WAV, FLAC, OGG,
    MP3 with libsndfile >= 1.1; any rate from :data:`MIN_FILE_RATE` and any
    channel count) to mono int16 at 16 kHz. Raises :class:`AudioInputError`
    naming the file on any failure.

    Decoded, downmixed and resampled in blocks (the same samples as the whole
    file at once: :class:`StreamResampler`), so an hour of 48 kHz stereo
    takes the memory of its 16 kHz mono result, not ten times that."""
    p = Path(path)
    try:
        if not p.exists():
            raise AudioInputError(f"audio file {p} does not exist")
        if p.is_dir():
            raise AudioInputError(f"audio file {p} is a directory, not a file")
    except OSError as e:  # a name too long, a folder on the way that cannot be searched
        raise AudioInputError(f"cannot read audio file {p}: {e.strerror or e}") from None
    parts: list[Int16Array] = []
    try:
        # As bytes on POSIX: soundfile encodes a str path strictly, so a
        # name with bytes that are no UTF-8 (held as surrogates) would not open.
        with sf.SoundFile(str(p) if os.name == "nt" else os.fsencode(p)) as f:
            if f.samplerate < MIN_FILE_RATE:
                raise AudioInputError(
                    f"audio file {p} says {f.samplerate} Hz, below the {MIN_FILE_RATE} Hz "
                    "of any speech recording (a damaged header?)")
            convert = StreamResampler(int(f.samplerate), SAMPLE_RATE, int(f.channels))
            while len(block := f.read(_READ_FRAMES, dtype="float32", always_2d=True)):
                parts.append(convert.process(block))
            parts.append(convert.flush())
    except sf.LibsndfileError as e:
        raise AudioInputError(
            f"cannot decode audio file {p}: {e.error_string} (not audio, or a format "
            "libsndfile does not read; convert it to WAV or FLAC)"
        ) from None
    except OSError as e:
        raise AudioInputError(f"cannot read audio file {p}: {e.strerror or e}") from None
    except AudioInputError:
        raise
    except Exception as e:  # soundfile raises assorted types (TypeError, RuntimeError...)
        raise AudioInputError(f"cannot decode audio file {p}: {e}") from None
    out: Int16Array = np.concatenate(parts)
    if len(out) == 0:
        raise AudioInputError(f"audio file {p} contains no audio (zero samples)")
    return out


def iter_chunks(samples: Int16Array, chunk_samples: int) -> Iterator[Int16Array]:
    """Yield consecutive views of ``samples``, ``chunk_samples`` long (the last
    may be shorter)."""
    if chunk_samples < 1:
        raise ValueError(f"chunk_samples must be at least 1, got {chunk_samples}")
    for i in range(0, len(samples), chunk_samples):
        yield samples[i : i + chunk_samples]
