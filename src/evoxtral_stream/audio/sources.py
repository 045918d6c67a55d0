"""Audio files (soundfile), decoded to mono int16 at
:data:`~evoxtral_stream.events.SAMPLE_RATE` (every channel mixed, or mixes of
the channels asked for), and the error every audio input raises. The
microphone is in :mod:`evoxtral_stream.audio.microphone`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from evoxtral_stream.audio.filereader import AudioFile, AudioInputError, joined, open_audio_file
from evoxtral_stream.audio.wavstream import MAX_FILE_RATE, MIN_FILE_RATE
from evoxtral_stream.events import Int16Array

__all__ = ["MAX_FILE_RATE", "MIN_FILE_RATE", "AudioInputError", "iter_chunks",
           "read_audio_channels", "read_audio_file", "rechunked"]

# --- files ------------------------------------------------------------------


def read_audio_file(path: str | os.PathLike[str]) -> Int16Array:
    """Decode a whole audio file (anything libsndfile reads: WAV, FLAC, OGG,
    MP3 with libsndfile >= 1.1; any rate from :data:`MIN_FILE_RATE` to
    :data:`MAX_FILE_RATE` and any channel count) to mono int16 at 16 kHz.
    Raises :class:`AudioInputError` naming the file on any failure.

    Decoded, downmixed and resampled in blocks (the same samples as the whole
    file at once: :class:`StreamResampler`), so an hour of 48 kHz stereo
    takes the memory of its 16 kHz mono result, not ten times that.

    A file damaged after some audio (a FLAC cut short) gives the audio
    before the damage, with a warning naming the file, as a WAV or OGG cut
    short gives its audio; damage before any audio is an error.

    A WAV whose header says less audio than follows it, and not a chunk or
    tag (a recording not closed properly: its data size left at 0, or
    written once and never again), is read to the end of the file (as PCM
    or float samples: :class:`WavStreamDecoder`), with a warning naming the
    file. libsndfile reads only what the header says: nothing, for a size
    of 0.

    A WAV of 24-bit samples in the low three bytes of 32-bit words, whose
    header says 24 bits with a block align of 4 bytes a channel (``arecord
    -f S24_LE``), is read so too, as its header says. libsndfile guesses
    from the data: 32-bit samples, 48 dB too quiet, or 3-byte ones, noise.

    A pipe (``<(ffmpeg ...)``, ``/dev/stdin``) is copied to a temporary file
    first, then read as that file: libsndfile seeks in some formats.

    Read whole, for short clips: a stream of a file takes it block by block
    (:mod:`evoxtral_stream.audio.filereader`)."""
    return read_audio_channels(path, [()])[0]


def read_audio_channels(path: str | os.PathLike[str], mixes: Sequence[Sequence[int]],
                        channels_from: str = "audio.channels") -> list[Int16Array]:
    """Decode ``path`` as :func:`read_audio_file` does, to one mono output
    per entry of ``mixes``: the mix of those channels of the file, numbered
    from 1 (``()``: all of them). The outputs are equally long, each
    resampled on its own, from one pass over the file. A file with fewer
    channels than the highest listed is an :class:`AudioInputError` that
    says they come from ``channels_from``, raised before anything is
    decoded. Whole: one pass of :func:`open_audio_file` joined (for short
    clips; a stream takes the pass's blocks as it goes)."""
    with open_audio_file(path, mixes, channels_from) as audio:
        return _joined(audio)


def _joined(audio: AudioFile) -> list[Int16Array]:
    with audio.blocks() as blocks:
        out = joined(blocks, len(audio.mixes))
        if blocks.error is not None:  # the file changed since its probe
            raise AudioInputError(blocks.error)
    return out


def iter_chunks(samples: Int16Array, chunk_samples: int) -> Iterator[Int16Array]:
    """Yield consecutive views of ``samples``, ``chunk_samples`` long (the last
    may be shorter)."""
    if chunk_samples < 1:
        raise ValueError(f"chunk_samples must be at least 1, got {chunk_samples}")
    for i in range(0, len(samples), chunk_samples):
        yield samples[i : i + chunk_samples]


def rechunked(blocks: Iterable[Sequence[Int16Array]], outputs: int,
              chunk_samples: int) -> Iterator[list[Int16Array]]:
    """The blocks of several equally long outputs (a pass over a file's
    mixes: :meth:`~evoxtral_stream.audio.filereader.AudioFile.blocks`)
    in chunks of ``chunk_samples``, one per output: what :func:`iter_chunks`
    gives of each output joined whole (the last may be shorter). Holds
    less than a chunk and a block."""
    if chunk_samples < 1:
        raise ValueError(f"chunk_samples must be at least 1, got {chunk_samples}")
    held = [np.zeros(0, np.int16) for _ in range(outputs)]
    for block in blocks:
        if len(block) != outputs or len({len(b) for b in block}) > 1:
            raise ValueError(f"expected {outputs} equally long outputs a block")
        if not len(block[0]):
            continue
        held = [np.concatenate([h, b]) for h, b in zip(held, block, strict=True)]
        whole = len(held[0]) - len(held[0]) % chunk_samples
        for at in range(0, whole, chunk_samples):
            yield [h[at:at + chunk_samples] for h in held]
        held = [h[whole:] for h in held]
    if len(held[0]):
        yield held
