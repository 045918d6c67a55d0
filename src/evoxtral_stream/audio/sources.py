"""Audio files (soundfile), decoded to mono int16 at
:data:`~evoxtral_stream.events.SAMPLE_RATE` (every channel mixed, or mixes of
the channels asked for), and the error every audio input raises. The
microphone is in :mod:`evoxtral_stream.audio.microphone`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf  # type: ignore[import-untyped,unused-ignore]

from evoxtral_stream.audio.resample import StreamResampler
from evoxtral_stream.events import SAMPLE_RATE, Int16Array

__all__ = ["AudioInputError", "iter_chunks", "read_audio_channels", "read_audio_file",
           "read_pipe_channels"]

log = logging.getLogger(__name__)

#: Frames decoded at a time: the file is converted block by block, so memory
#: holds the 16 kHz result and one block, never the whole file as decoded.
_READ_FRAMES = 1 << 16
#: Frames decoded at a time past the last whole read before damage: a read
#: that fails loses what it decoded (soundfile drops the block), so the file
#: is read again up to the damage with small reads that lose little.
_DAMAGED_READ_FRAMES = 1024
#: The lowest sample rate a file may have: below it the header is damaged
#: (no recording of speech is made so), and the upsampling to 16 kHz would
#: turn a few kilobytes into hours of audio and a block into gigabytes.
MIN_FILE_RATE = 1000
#: The highest sample rate a file may say: 768 kHz, the highest that audio
#: interfaces record at. Past it the header is damaged (a fuzzed WAV said
#: 2**31 - 1 Hz), and resampling it to 16 kHz took seconds per block to
#: give a handful of samples of noise.
MAX_FILE_RATE = 768_000


class AudioInputError(Exception):
    """Audio input cannot be read; the message (one line) is for people."""


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

    A pipe (``<(ffmpeg ...)``, ``/dev/stdin``) is copied to a temporary file
    first, then read as that file: libsndfile seeks in some formats."""
    return read_audio_channels(path, [()])[0]


def read_audio_channels(path: str | os.PathLike[str], mixes: Sequence[Sequence[int]],
                        channels_from: str = "audio.channels") -> list[Int16Array]:
    """Decode ``path`` as :func:`read_audio_file` does, to one mono output
    per entry of ``mixes``: the mix of those channels of the file, numbered
    from 1 (``()``: all of them). The outputs are equally long, each
    resampled on its own, from one pass over the file. A file with fewer
    channels than the highest listed is an :class:`AudioInputError` that
    says they come from ``channels_from``, raised before anything is
    decoded."""
    if not mixes:
        raise ValueError("no channel mix asked for")
    for mix in mixes:
        if any(c < 1 for c in mix) or len(set(mix)) != len(mix):
            raise ValueError(f"channels must be distinct numbers from 1, got {tuple(mix)}")
    p = Path(path)
    try:
        if not p.exists():
            raise AudioInputError(f"audio file {p} does not exist")
        if p.is_dir():
            raise AudioInputError(f"audio file {p} is a directory, not a file")
        mode = p.stat().st_mode
    except OSError as e:  # a name too long, a folder on the way that cannot be searched
        raise AudioInputError(f"cannot read audio file {p}: {e.strerror or e}") from None
    with contextlib.ExitStack() as stack:
        if stat.S_ISFIFO(mode):
            return _read_channels(p, _copied(p, stack), mixes, channels_from)
        # As bytes on POSIX: soundfile encodes a str path strictly, so a name
        # with bytes that are no UTF-8 (held as surrogates) would not open.
        return _read_channels(p, str(p) if os.name == "nt" else os.fsencode(p), mixes,
                              channels_from)


#: Bytes copied at a time from a pipe into its temporary file.
_COPY_BYTES = 1 << 20


def read_pipe_channels(p: Path, head: bytes, fd: int, mixes: Sequence[Sequence[int]],
                       channels_from: str = "audio.channels") -> list[Int16Array]:
    """:func:`read_audio_channels` of a pipe already open as ``fd``, of which
    ``head`` was read (a live reader's look at its first bytes): the rest is
    read to its end, and ``p`` names it in messages. ``fd`` is not closed."""
    with contextlib.ExitStack() as stack:
        return _read_channels(p, _copied(p, stack, head, fd), mixes, channels_from)


def _copied(p: Path, stack: contextlib.ExitStack, head: bytes = b"",
            fd: int | None = None) -> BinaryIO:
    """The bytes of the pipe ``p`` (``<(ffmpeg ...)``, ``/dev/stdin``;
    ``head`` then the rest of ``fd`` when given) in a temporary file that
    ``stack`` deletes: libsndfile seeks in some formats (a FLAC or CAF from
    a pipe was refused, or read as empty), and a damaged file is read twice.
    On disk, not in memory: the pipe may hold hours of audio at its own
    rate."""
    try:
        # Kept open past this function (closing deletes it): the stack closes it.
        copy: BinaryIO = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
        copy.write(head)
        with open(p, "rb") if fd is None else open(fd, "rb", closefd=False) as source:
            while block := source.read(_COPY_BYTES):
                copy.write(block)
        copy.flush()  # a full disk shows here, not in the decoder
    except OSError as e:
        raise AudioInputError(f"cannot copy audio from pipe {p} to a temporary file: "
                              f"{e.strerror or e}") from None
    return copy


def _open(source: str | bytes | BinaryIO) -> sf.SoundFile:
    """``source`` opened from its start (a file's name, or a pipe's copy)."""
    if isinstance(source, str | bytes):
        return sf.SoundFile(source)
    source.seek(0)
    return sf.SoundFile(source, closefd=False)


def _read_channels(p: Path, source: str | bytes | BinaryIO, mixes: Sequence[Sequence[int]],
                   channels_from: str) -> list[Int16Array]:
    """:func:`read_audio_channels` of ``source``, the file ``p`` (named in
    messages) or a pipe's copy."""
    try:
        with _decoder_prints_logged(p):
            with _open(source) as f:
                rate = int(f.samplerate)
                if rate < MIN_FILE_RATE:
                    raise AudioInputError(
                        f"audio file {p} says {f.samplerate} Hz, below the {MIN_FILE_RATE} "
                        "Hz of any speech recording (a damaged header?)")
                if rate > MAX_FILE_RATE:
                    raise AudioInputError(
                        f"audio file {p} says {f.samplerate} Hz, above the {MAX_FILE_RATE} "
                        "Hz of any audio recording (a damaged header?)")
                wanted = max((c for mix in mixes for c in mix), default=0)
                if wanted > f.channels:
                    raise AudioInputError(
                        f"{channels_from} asks for channel {wanted}, but audio file {p} "
                        f"has {f.channels} channel(s)")
                parts, decoded, damage = _decode(f, mixes, None)
            if damage is not None:
                parts = []
                with _open(source) as f:
                    parts, decoded, _ = _decode(f, mixes, decoded)
                if decoded == 0:
                    raise damage
        if damage is not None:  # logged once stderr is stderr again
            log.warning("audio file %s is damaged %.1f s in (%s): only the audio before "
                        "that is read", p, decoded / rate, damage.error_string.strip())
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
    out: list[Int16Array] = [np.concatenate(blocks) for blocks in parts]
    if len(out[0]) == 0:
        raise AudioInputError(f"audio file {p} contains no audio (zero samples)")
    return out


#: The most of the decoders' prints logged per file: a long damaged MP3 can
#: make libmpg123 print a note per frame.
_MOST_PRINTS = 64 * 1024


@contextlib.contextmanager
def _decoder_prints_logged(p: Path) -> Iterator[None]:
    """Hold what is printed on file descriptor 2 while ``p`` is decoded, and
    log it (DEBUG) afterwards.

    libmpg123 prints its notes there (an MP3 frame it resyncs past; some
    even for an MP3 that LAME wrote), past logging: in json mode stderr must
    hold log records only, and an unreadable file one error line. Nothing
    else in the process prints while a file is read (the CLI reads every
    file before the engine and the server start)."""
    with contextlib.ExitStack() as stack:
        try:
            held = stack.enter_context(tempfile.TemporaryFile())
            saved = os.dup(2)
        except OSError:  # no descriptor 2, or no temporary folder: as they were
            saved = -1
        if saved < 0:
            yield
            return
        stack.callback(os.close, saved)
        with contextlib.suppress(Exception):  # a closed or odd sys.stderr
            sys.stderr.flush()
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            held.seek(0)
            text = held.read(_MOST_PRINTS).decode("utf-8", "replace")
            for line in dict.fromkeys(text.splitlines()):  # once each: resync notes repeat
                if line.strip():
                    log.debug("audio file %s: decoder says: %s", p, line.strip())


def _decode(f: sf.SoundFile, mixes: Sequence[Sequence[int]], whole: int | None
            ) -> tuple[list[list[Int16Array]], int, sf.LibsndfileError | None]:
    """Decode ``f`` to 16 kHz mono blocks, one list per mix of channels
    (:func:`read_audio_channels`), until its end or a read that fails: the
    blocks, the frames they hold and the failure. With ``whole`` (frames
    read before a failure), reads past it are small."""
    rate, channels = int(f.samplerate), int(f.channels)
    # None: every channel, the block as read (no copy of its columns).
    columns = [None if not mix or list(mix) == list(range(1, channels + 1))
               else [c - 1 for c in mix] for mix in mixes]
    # One resampler per output: a filter's state never mixes two outputs.
    converts = [StreamResampler(rate, SAMPLE_RATE, channels if cols is None else len(cols))
                for cols in columns]
    parts: list[list[Int16Array]] = [[] for _ in mixes]
    decoded = 0
    damage = None
    while True:
        frames = (_READ_FRAMES if whole is None
                  else min(_READ_FRAMES, whole - decoded) if decoded < whole
                  else _DAMAGED_READ_FRAMES)
        try:
            block = f.read(frames, dtype="float32", always_2d=True)
        except sf.LibsndfileError as e:
            damage = e
            break
        if not len(block):
            break
        decoded += len(block)
        for out, convert, cols in zip(parts, converts, columns, strict=True):
            out.append(convert.process(block if cols is None else block[:, cols]))
    for out, convert in zip(parts, converts, strict=True):
        out.append(convert.flush())
    return parts, decoded, damage


def iter_chunks(samples: Int16Array, chunk_samples: int) -> Iterator[Int16Array]:
    """Yield consecutive views of ``samples``, ``chunk_samples`` long (the last
    may be shorter)."""
    if chunk_samples < 1:
        raise ValueError(f"chunk_samples must be at least 1, got {chunk_samples}")
    for i in range(0, len(samples), chunk_samples):
        yield samples[i : i + chunk_samples]
