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

from evoxtral_stream.audio.resample import MixResampler
from evoxtral_stream.audio.wavsizes import misread_wav
from evoxtral_stream.audio.wavstream import (
    MAX_FILE_RATE,
    MIN_FILE_RATE,
    WavStreamDecoder,
    WavStreamError,
)
from evoxtral_stream.events import Float32Array, Int16Array

__all__ = ["MAX_FILE_RATE", "MIN_FILE_RATE", "AudioInputError", "iter_chunks",
           "read_audio_channels", "read_audio_file", "read_pipe_channels"]

log = logging.getLogger(__name__)

#: Frames decoded at a time: the file is converted block by block, so memory
#: holds the 16 kHz result and one block, never the whole file as decoded.
_READ_FRAMES = 1 << 16
#: Frames decoded at a time past the last whole read before damage: a read
#: that fails loses what it decoded (soundfile drops the block), so the file
#: is read again up to the damage with small reads that lose little.
_DAMAGED_READ_FRAMES = 1024


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
        misread = _read_misread(p, source, mixes, channels_from)
        if misread is not None:
            parts = misread
        else:
            parts = _read_libsndfile(p, source, mixes, channels_from)
    except OSError as e:
        raise AudioInputError(f"cannot read audio file {p}: {e.strerror or e}") from None
    out: list[Int16Array] = [np.concatenate(blocks) for blocks in parts]
    if len(out[0]) == 0:
        raise AudioInputError(f"audio file {p} contains no audio (zero samples)")
    return out


def _read_libsndfile(p: Path, source: str | bytes | BinaryIO, mixes: Sequence[Sequence[int]],
                     channels_from: str) -> list[list[Int16Array]]:
    """:func:`_read_channels` by libsndfile: the blocks of each mix."""
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
                _check_channels(p, mixes, int(f.channels), channels_from)
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
    return parts


def _check_channels(p: Path, mixes: Sequence[Sequence[int]], channels: int,
                    channels_from: str) -> None:
    wanted = max((c for mix in mixes for c in mix), default=0)
    if wanted > channels:
        raise AudioInputError(f"{channels_from} asks for channel {wanted}, but audio file {p} "
                              f"has {channels} channel(s)")


# --- WAV files libsndfile misreads ---------------------------------------------------


def _read_misread(p: Path, source: str | bytes | BinaryIO, mixes: Sequence[Sequence[int]],
                  channels_from: str) -> list[list[Int16Array]] | None:
    """:func:`_read_channels` of a WAV that libsndfile misreads
    (:func:`~evoxtral_stream.audio.wavsizes.misread_wav`), by
    :class:`WavStreamDecoder`: the blocks of each mix. One whose header
    says less audio than it holds is read to the end of the file, with a
    warning; one of 24-bit samples in 32-bit words as its header says. None
    for any other file; for one that says less than it holds in an encoding
    :class:`WavStreamDecoder` does not read (then libsndfile reads what its
    header says, with a warning); and for one with a header the decoder
    finds damaged (libsndfile's error or audio, as before)."""
    with contextlib.ExitStack() as stack:
        if isinstance(source, str | bytes):
            f: BinaryIO = stack.enter_context(open(source, "rb"))
        else:
            f = source
        found = misread_wav(f)
        if found is None:
            return None
        f.seek(0)
        decoder = WavStreamDecoder(to_end=bool(found.extra))
        mixer: _Mixer | None = None
        read_bytes = _READ_FRAMES * found.frame_bytes
        try:
            while block := f.read(read_bytes):
                frames = decoder.feed(block)
                if mixer is None and decoder.format is not None:
                    _check_channels(p, mixes, decoder.format.channels, channels_from)
                    mixer = _Mixer(decoder.format.rate, decoder.format.channels, mixes)
                if mixer is not None and len(frames):
                    mixer.add(frames)
                if decoder.ended:  # what follows the audio the header states is no audio
                    break
            decoder.finish()
        except WavStreamError as e:
            if not found.extra:  # libsndfile says what it makes of it, as before
                return None
            if found.stated and e.other_format:
                log.warning("audio file %s holds more audio than its WAV header says (it says "
                            "%.1f s, %.1f s more follow; a recording not closed properly?): "
                            "only the %.1f s it says is read, as its encoding is read past that "
                            "only as PCM or float samples", p, found.seconds(found.stated),
                            found.seconds(found.extra), found.seconds(found.stated))
                return None
            if found.stated:  # a damaged header: libsndfile says what it makes of it
                return None
            if e.other_format:
                raise AudioInputError(
                    f"audio file {p}: its WAV header says no audio (a recording not closed "
                    "properly?), and its encoding is read to the end of the file only as PCM "
                    "or float samples; convert it (ffmpeg -i FILE -c:a pcm_s16le out.wav)"
                ) from None
            raise AudioInputError(f"cannot decode audio file {p}: {e}") from None
    # finish() raised for a file whose audio never began.
    assert mixer is not None
    assert decoder.format is not None
    seconds = decoder.frames / decoder.format.rate
    if found.extra and found.stated:
        log.warning("audio file %s holds more audio than its WAV header says (it says %.1f s; "
                    "a recording not closed properly?): read to the end of the file, %.1f s",
                    p, found.seconds(found.stated), seconds)
    elif found.extra:
        log.warning("audio file %s: its WAV header says no audio (a recording not closed "
                    "properly?): read to the end of the file, %.1f s", p, seconds)
    return mixer.finish()


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
    mixer = _Mixer(int(f.samplerate), int(f.channels), mixes)
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
        mixer.add(block)
    return mixer.finish(), decoded, damage


class _Mixer:
    """Float32 frames of a file in blocks; out, one list of 16 kHz mono
    int16 blocks per mix of channels (:func:`read_audio_channels`), as
    :class:`MixResampler` makes them."""

    def __init__(self, rate: int, channels: int, mixes: Sequence[Sequence[int]]) -> None:
        self._convert = MixResampler(rate, channels, mixes)
        self._parts: list[list[Int16Array]] = [[] for _ in mixes]

    def add(self, block: Float32Array) -> None:
        for out, block16 in zip(self._parts, self._convert.process(block), strict=True):
            out.append(block16)

    def finish(self) -> list[list[Int16Array]]:
        for out, tail in zip(self._parts, self._convert.flush(), strict=True):
            out.append(tail)
        return self._parts


def iter_chunks(samples: Int16Array, chunk_samples: int) -> Iterator[Int16Array]:
    """Yield consecutive views of ``samples``, ``chunk_samples`` long (the last
    may be shorter)."""
    if chunk_samples < 1:
        raise ValueError(f"chunk_samples must be at least 1, got {chunk_samples}")
    for i in range(0, len(samples), chunk_samples):
        yield samples[i : i + chunk_samples]
