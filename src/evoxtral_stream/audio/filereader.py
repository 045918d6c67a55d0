"""Audio files opened up front and decoded lazily.

:func:`open_audio_file` reads a file's header and its first audio, so that
everything wrong with a file is said before anything runs; each
:meth:`AudioFile.blocks` is then a pass that decodes the file block by
block as its reader takes the blocks, to 16 kHz mono int16 (one block per
mix of channels asked for). Memory holds a block, whatever the file's
length. :func:`~evoxtral_stream.audio.sources.read_audio_channels` is one
such pass joined whole.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import stat
import sys
import tempfile
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf  # type: ignore[import-untyped,unused-ignore]

from evoxtral_stream.audio.resample import MixResampler
from evoxtral_stream.audio.wavsizes import Misread, misread_wav
from evoxtral_stream.audio.wavstream import (
    MAX_FILE_RATE,
    MIN_FILE_RATE,
    WavStreamDecoder,
    WavStreamError,
)
from evoxtral_stream.events import SAMPLE_RATE, Int16Array

__all__ = ["AudioFile", "AudioInputError", "FileMix", "FilePass", "joined", "open_audio_file",
           "open_pipe_file"]

log = logging.getLogger(__name__)

#: Frames decoded at a time: a pass holds one block, never the whole file.
_READ_FRAMES = 1 << 16
#: Frames decoded at a time past the last whole read before damage: a read
#: that fails loses what it decoded (soundfile drops the block), so the file
#: is read again up to the damage with small reads that lose little.
_DAMAGED_READ_FRAMES = 1024
#: The bytes at a file's start that tell the probed file from another at
#: the same inode number (ext4 gives a deleted file's number to the next
#: file made, and cp, sox or ffmpeg -y write over a file in place): its
#: header (which says its length, a FLAC's its audio's MD5 too) and first
#: audio.
_HEAD_BYTES = 1 << 16
#: Bytes copied at a time from a pipe into its temporary file.
_COPY_BYTES = 1 << 20
#: The most of the decoders' prints logged per pass: a long damaged MP3 can
#: make libmpg123 print a note per frame.
_MOST_PRINTS = 64 * 1024
#: Held while descriptor 2 points at a catcher's file: a pass may be read on
#: a worker thread, and two catches at once would each restore what the
#: other had put there, leaving descriptor 2 on a closed temporary file.
_FD2 = threading.Lock()
#: The formats whose decoder prints on descriptor 2 (libsndfile 1.2's MP3,
#: libmpg123: notes on every frame it resyncs past); FLAC, Ogg Vorbis,
#: Opus and WAV say nothing there, damaged or not...
_PRINTING_FORMATS = frozenset({"MP3"})
#: ... but for the encodings libmpg123 decodes in any of them: a WAV may
#: carry MP3 (format tag 0x55, as some recorders write it).
_PRINTING_SUBTYPES = frozenset({"MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III"})


class AudioInputError(Exception):
    """Audio input cannot be read; the message (one line) is for people."""


def open_audio_file(path: str | os.PathLike[str], mixes: Sequence[Sequence[int]],
                    channels_from: str = "audio.channels") -> AudioFile:
    """``path`` probed: its header read (rate, channels, length) and its
    first audio decoded, so that a file missing, a directory, unreadable,
    not audio, damaged before any audio, of an implausible rate, empty, or
    with fewer channels than ``mixes`` ask for (they come from
    ``channels_from``) is an :class:`AudioInputError` now, one line naming
    it. Nothing of the file is held but a pipe's copy (:func:`_copied`).
    ``mixes``: per output, the channels mixed, numbered from 1 (``()``: all
    of them)."""
    mixes = _checked_mixes(mixes)
    p = Path(path)
    try:
        if not p.exists():
            raise AudioInputError(f"audio file {p} does not exist")
        if p.is_dir():
            raise AudioInputError(f"audio file {p} is a directory, not a file")
        info = p.stat()
    except OSError as e:  # a name too long, a folder on the way that cannot be searched
        raise AudioInputError(f"cannot read audio file {p}: {e.strerror or e}") from None
    if stat.S_ISFIFO(info.st_mode):
        return _probed(AudioFile(p, _copied(p), mixes, channels_from))
    # As bytes on POSIX: soundfile encodes a str path strictly, so a name
    # with bytes that are no UTF-8 (held as surrogates) would not open.
    source = str(p) if os.name == "nt" else os.fsencode(p)
    audio = AudioFile(p, source, mixes, channels_from)
    if stat.S_ISREG(info.st_mode):
        audio._size, audio._id = info.st_size, (info.st_dev, info.st_ino)
        audio._head = _head(source, min(info.st_size, _HEAD_BYTES))
    return _probed(audio)


def _head(source: str | bytes, size: int) -> bytes | None:
    """A digest of the first ``size`` bytes of the file at ``source``;
    None where it cannot be read, or is shorter now."""
    try:
        with open(source, "rb") as f:
            data = f.read(size)
    except OSError:
        return None
    return hashlib.blake2b(data, digest_size=16).digest() if len(data) == size else None


def open_pipe_file(p: Path, head: bytes, fd: int, mixes: Sequence[Sequence[int]],
                   channels_from: str = "audio.channels") -> AudioFile:
    """:func:`open_audio_file` of a pipe already open as ``fd``, of which
    ``head`` was read (a live reader's look at its first bytes): the rest is
    copied to its end, and ``p`` names it in messages. ``fd`` is not
    closed."""
    return _probed(AudioFile(p, _copied(p, head, fd), _checked_mixes(mixes), channels_from))


def _checked_mixes(mixes: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    if not mixes:
        raise ValueError("no channel mix asked for")
    for mix in mixes:
        if any(c < 1 for c in mix) or len(set(mix)) != len(mix):
            raise ValueError(f"channels must be distinct numbers from 1, got {tuple(mix)}")
    return tuple(tuple(mix) for mix in mixes)


def _copied(p: Path, head: bytes = b"", fd: int | None = None) -> BinaryIO:
    """The bytes of the pipe ``p`` (``<(ffmpeg ...)``, ``/dev/stdin``;
    ``head`` then the rest of ``fd`` when given) in a temporary file, deleted
    once closed: libsndfile seeks in some formats (a FLAC or CAF from a pipe
    was refused, or read as empty), and a file is read more than once (its
    probe, each pass, a damaged one again). On disk, not in memory: the pipe
    may hold hours of audio at its own rate. The whole pipe is copied
    before its probe: it can be read again only so."""
    try:
        copy: BinaryIO = tempfile.TemporaryFile()  # noqa: SIM115 (AudioFile.close closes it)
    except OSError as e:
        raise AudioInputError(f"cannot copy audio from pipe {p} to a temporary file: "
                              f"{e.strerror or e}") from None
    try:
        copy.write(head)
        with open(p, "rb") if fd is None else open(fd, "rb", closefd=False) as source:
            while block := source.read(_COPY_BYTES):
                copy.write(block)
        copy.flush()  # a full disk shows here, not in the decoder
    except OSError as e:
        copy.close()
        raise AudioInputError(f"cannot copy audio from pipe {p} to a temporary file: "
                              f"{e.strerror or e}") from None
    return copy


class AudioFile:
    """A probed audio file (:func:`open_audio_file`): its header's facts,
    and passes over its audio (:meth:`blocks`). A pipe's copy is held until
    :meth:`close`."""

    def __init__(self, path: Path, source: str | bytes | BinaryIO,
                 mixes: tuple[tuple[int, ...], ...], channels_from: str) -> None:
        self.path = path
        self.mixes = mixes
        self._source = source
        self._channels_from = channels_from
        self.rate = 0
        self.channels = 0
        self.frames: int | None = None
        """Frames its header says (None: it does not say)."""
        self._misread: Misread | None = None
        self.prints = True
        """Whether its decoder may print on descriptor 2 (an MP3, or MP3
        audio in a WAV: see :class:`FilePass`); known at the probe, which
        assumes it may."""
        # Its size and identity when probed (a regular file's): a pass that
        # ends early on a file cut short since (libsndfile ends a WAV where
        # its bytes end, as at a header's end) says so.
        self._size: int | None = None
        self._id: tuple[int, int] | None = None
        self._head: bytes | None = None  # _head() of its start (_HEAD_BYTES) when probed
        # Warnings said already: every pass meets the same damage, and the
        # probe's pass may meet it first.
        self._said: set[str] = set()
        # Whether a pass has logged its failure: the passes of a file's
        # channel streams fed apart (not paced) each meet it, and the file is
        # one error line.
        self._failed = False
        # Those passes may run on threads of their own (run._Steps).
        self._lock = threading.Lock()

    @property
    def samples(self) -> int | None:
        """Each mix's length at 16 kHz as the header gives it (rounded as
        soxr rounds a whole run; None where the header says no length): a
        pass gives this many unless the file is damaged, or says less than
        it holds in a way that is read to its end."""
        if self.frames is None or self.rate <= 0:
            return None
        return (self.frames * SAMPLE_RATE * 2 + self.rate) // (2 * self.rate)

    def blocks(self, mixes: Sequence[int] | None = None) -> FilePass:
        """A new pass over the file: the outputs of the mixes numbered
        ``mixes`` (indexes into :attr:`mixes`; None: all)."""
        return FilePass(self, tuple(range(len(self.mixes))) if mixes is None else tuple(mixes))

    def close(self) -> None:
        """Let go of a pipe's copy (a file on disk holds nothing open)."""
        if not isinstance(self._source, str | bytes):
            self._source.close()

    def __enter__(self) -> AudioFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _say(self, level: int, message: str, *args: object) -> None:
        text = message % args
        with self._lock:
            if text in self._said:
                return
            self._said.add(text)
        log.log(level, "%s", text)

    def _first_failure(self) -> bool:
        """True the first time a pass of this file asks: that pass logs."""
        with self._lock:
            first, self._failed = not self._failed, True
        return first

    def _check_channels(self, channels: int) -> None:
        wanted = max((c for mix in self.mixes for c in mix), default=0)
        if wanted > channels:
            raise AudioInputError(f"{self._channels_from} asks for channel {wanted}, but audio "
                                  f"file {self.path} has {channels} channel(s)")

    def _open_sf(self) -> sf.SoundFile:
        """The file opened by libsndfile from its start."""
        if isinstance(self._source, str | bytes):
            try:
                return sf.SoundFile(self._source)
            except sf.LibsndfileError:
                # libsndfile says only "System error." of a file it cannot
                # open (deleted since its probe, no descriptor left): the
                # system's reason (OSError) where opening it says one.
                with open(self._source, "rb"):
                    pass
                raise
        return sf.SoundFile(_CopyView.open(self._source), closefd=False)

    def _at_name(self) -> tuple[tuple[int, int], int] | None:
        """The file now at the name, where a regular file was probed: its
        identity (device, inode) and size. None: not so, or gone."""
        if self._size is None or not isinstance(self._source, str | bytes):
            return None
        try:
            info = os.stat(self._source)
        except OSError:
            return None
        return (info.st_dev, info.st_ino), info.st_size

    def _size_kept(self) -> tuple[tuple[int, int], int] | None:
        """For a pass about to open the file by its name: the identity of the
        file it opens, and the size that file must keep: the probe's if it is
        the file probed (its identity, and its start as probed), else
        (replaced since) its size now. A file cut into its first
        :data:`_HEAD_BYTES` before the pass is taken for another: a cut
        missed, never one made up."""
        found = self._at_name()
        if found is None or self._size is None or not isinstance(self._source, str | bytes):
            return None
        probed = (found[0] == self._id and self._head is not None
                  and _head(self._source, min(self._size, _HEAD_BYTES)) == self._head)
        return found[0], self._size if probed else found[1]

    @contextlib.contextmanager
    def _open_bytes(self) -> Iterator[BinaryIO]:
        """The file's bytes from its start (for :class:`WavStreamDecoder`)."""
        if isinstance(self._source, str | bytes):
            with open(self._source, "rb") as f:
                yield f
        else:
            with _CopyView.open(self._source) as f:
                yield f


class _CopyView(io.RawIOBase):
    """A pipe's copy read from a position of its own (``os.pread``): the
    passes of one file (its channel streams fed apart) read it at once,
    and one file position shared would have each read where another
    left it."""

    def __init__(self, copy: BinaryIO) -> None:
        super().__init__()
        self._fd = copy.fileno()
        self._at = 0

    @classmethod
    def open(cls, copy: BinaryIO) -> io.BufferedReader:
        """A view of ``copy`` from its start, buffered."""
        return io.BufferedReader(cls(copy))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = os.pread(self._fd, len(memoryview(buffer)), self._at)
        memoryview(buffer).cast("B")[:len(data)] = data
        self._at += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._at,
                os.SEEK_END: os.fstat(self._fd).st_size}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "seek before the start of the copy")
        self._at = base + offset
        return self._at

    def tell(self) -> int:
        return self._at


def _probed(audio: AudioFile) -> AudioFile:
    """``audio`` with its header read and its first audio decoded (see
    :func:`open_audio_file`); closed on an error."""
    try:
        _probe(audio)
    except BaseException:
        audio.close()
        raise
    return audio


def _probe(audio: AudioFile) -> None:
    p = audio.path
    try:
        with audio._open_bytes() as f:
            # libsndfile's word for no bytes is "Format not recognised", or
            # "File does not exist" of a file that is there. A terminal (not
            # seekable) is left to it: a read would wait for its input.
            if f.seekable() and not f.read(1):
                raise AudioInputError(f"audio file {p} is empty (0 bytes)")
            found = misread_wav(f)
        if found is not None and _probe_misread(audio, found):
            audio.prints = False  # WavStreamDecoder: Python's, it prints nothing
            return
        with FilePass(audio, (0,), probe=True) as first:
            f0 = first._prints
            with f0.caught(), audio._open_sf() as f:
                rate = int(f.samplerate)
                if rate < MIN_FILE_RATE:
                    raise AudioInputError(
                        f"audio file {p} says {f.samplerate} Hz, below the {MIN_FILE_RATE} "
                        "Hz of any speech recording (a damaged header?)")
                if rate > MAX_FILE_RATE:
                    raise AudioInputError(
                        f"audio file {p} says {f.samplerate} Hz, above the {MAX_FILE_RATE} "
                        "Hz of any audio recording (a damaged header?)")
                audio._check_channels(int(f.channels))
                audio.rate, audio.channels = rate, int(f.channels)
                audio.prints = (str(f.format) in _PRINTING_FORMATS
                                or str(f.subtype) in _PRINTING_SUBTYPES)
                frames = int(f.frames)
                # libsndfile says a huge count where a format keeps none.
                audio.frames = frames if 0 <= frames < sys.maxsize // 2 else None
            _first_audio(first)
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


def _first_audio(first: FilePass) -> None:
    """Take blocks of ``first`` until one holds audio, or say the file has none."""
    for block in first:
        if len(block[0]):
            return
    raise AudioInputError(f"audio file {first.audio.path} contains no audio (zero samples)")


def _probe_misread(audio: AudioFile, found: Misread) -> bool:
    """Probe a WAV that libsndfile misreads
    (:func:`~evoxtral_stream.audio.wavsizes.misread_wav`), read by
    :class:`WavStreamDecoder`: one whose header says less audio than it
    holds is read to the end of the file, with a warning; one of 24-bit
    samples in 32-bit words as its header says. False where libsndfile
    reads it after all: one that says less than it holds in an encoding
    :class:`WavStreamDecoder` does not read (libsndfile reads what its
    header says, with a warning); and one with a header the decoder finds
    damaged (libsndfile's error or audio, as before)."""
    p = audio.path
    audio._misread = found
    try:
        with FilePass(audio, (0,), probe=True) as first:
            _first_audio(first)
    except WavStreamError as e:
        audio._misread = None
        if not found.extra:  # libsndfile says what it makes of it, as before
            return False
        if found.stated and e.other_format:
            audio._say(logging.WARNING,
                       "audio file %s holds more audio than its WAV header says (it says %.1f "
                       "s, %.1f s more follow; a recording not closed properly?): only the %.1f "
                       "s it says is read, as its encoding is read past that only as PCM or "
                       "float samples", p, found.seconds(found.stated),
                       found.seconds(found.extra), found.seconds(found.stated))
            return False
        if found.stated:  # a damaged header: libsndfile says what it makes of it
            return False
        if e.other_format:
            raise AudioInputError(
                f"audio file {p}: its WAV header says no audio (a recording not closed "
                "properly?), and its encoding is read to the end of the file only as PCM "
                "or float samples; convert it (ffmpeg -i FILE -c:a pcm_s16le out.wav)"
            ) from None
        raise AudioInputError(f"cannot decode audio file {p}: {e}") from None
    size = found.stated + found.extra if found.extra else found.stated
    audio.frames = size // found.frame_bytes if size else None
    return True


class FilePass(Iterator[list[Int16Array]]):
    """One pass over an :class:`AudioFile`: each ``next`` decodes the next
    block of the file, downmixed and resampled (:class:`MixResampler`), one
    16 kHz mono int16 array per mix asked for, equally long; blocks may be
    empty. Joined, they are what decoding the whole file gives, sample for
    sample.

    A file damaged part way ends where the damage is met, with a warning
    naming the file (read again up to the damage in small reads, which
    lose little of what precedes it, unless its name is no longer the file
    read: then at its last whole block); a WAV read to its end past what its
    header says warns at the end. A failure past the probe (the file
    deleted before the pass opened it, cut short under the reader: smaller
    at the pass's end than at its probe, or than when the pass opened it
    if another file had taken its name, or other bytes its start, since; a
    disk error) ends the pass with :attr:`error` set, and one error line
    logged for the file (the first of its passes to fail): what came
    before it is kept. A file renamed or replaced under the reader
    (rotated) is read to its end as opened. :meth:`close` lets go of the
    file (a pass at its end has).

    What the decoders print on file descriptor 2 (libmpg123's notes on an
    MP3) is held while each block decodes and logged (DEBUG): in json
    mode stderr must hold log records only. The log writer writes to its
    own copy of stderr, so logging is not held; what another thread writes
    on descriptor 2 in those moments is logged so too. So only a file
    whose decoder prints is caught (:attr:`AudioFile.prints`, MP3 audio);
    any other may be read on a worker thread (one ``next`` at a time),
    descriptor 2 left alone. A file replaced by an MP3 since its probe
    is not caught."""

    def __init__(self, audio: AudioFile, mixes: tuple[int, ...], *, probe: bool = False) -> None:
        self.audio = audio
        self.error: str | None = None
        """Why the pass ended before the file's end; None: it did not."""
        self._wanted = mixes
        self._probe = probe  # errors raised (to the probe), not logged
        self._prints = _PrintCatcher(audio.path)
        self._frames = 0
        self._rate = audio.rate
        # The file this pass opened by its name, and the size it must keep
        # (AudioFile._size_kept).
        self._opened: tuple[tuple[int, int], int] | None = None
        self._gen = self._run()

    def __next__(self) -> list[Int16Array]:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> FilePass:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _check_size(self) -> None:
        """Raise :class:`AudioInputError` if the file this pass opened is
        smaller than it must be (cut short under its reader). A file gone
        (unlinked while open, read whole) or another at its name (rotated:
        the pass reads the one it opened to its end) says nothing; so does
        one whose inode number changes (some FUSE mounts): a cut missed,
        never one made up."""
        now = self.audio._at_name()
        if self._opened is None or now is None or now[0] != self._opened[0]:
            return
        if now[1] < self._opened[1]:
            raise AudioInputError(f"it was cut short while read ({self._opened[1]} bytes when "
                                  f"opened, {now[1]} now)")

    def _name_is_still_read(self) -> bool:
        """Whether the file at the name is still the one this pass opened
        (always, for a pipe's copy): a file rotated away or deleted under
        the reader is not opened again by its name."""
        if self._opened is None:
            return True
        now = self.audio._at_name()
        return now is not None and now[0] == self._opened[0]

    def _mixer(self, rate: int, channels: int) -> MixResampler:
        self._rate = rate
        return MixResampler(rate, channels, [self.audio.mixes[i] for i in self._wanted])

    def _run(self) -> Generator[list[Int16Array], None, None]:
        mixers: list[MixResampler] = []  # the one made once the format is known
        try:
            if self.audio._misread is not None:
                yield from self._wav(self.audio._misread, mixers)
            else:
                yield from self._sndfile(mixers)
        except GeneratorExit:
            raise
        except Exception as e:
            if self._probe:
                raise
            if isinstance(e, sf.LibsndfileError):
                why = e.error_string.strip()
            elif isinstance(e, OSError):
                why = e.strerror or str(e)
            else:
                why = str(e) or type(e).__name__
            seconds = self._frames / self._rate if self._rate else 0.0
            self.error = (f"cannot read audio file {self.audio.path} past {seconds:.1f} s: "
                          f"{why}; its audio ends there")
            if self.audio._first_failure():
                log.error("%s", self.error)
        if mixers:
            yield mixers[0].flush()

    def _sndfile(self, mixers: list[MixResampler]) -> Iterator[list[Int16Array]]:
        # Descriptor 2 is the process's: redirected for a decoder that
        # prints nothing, it would take what other threads write there.
        catch = self._prints.caught if self.audio.prints else contextlib.nullcontext
        damage: sf.LibsndfileError | None = None
        self._opened = self.audio._size_kept()
        with catch():
            f = self.audio._open_sf()
        with f:
            mixers.append(self._mixer(int(f.samplerate), int(f.channels)))
            while True:
                try:
                    with catch():
                        block = f.read(_READ_FRAMES, dtype="float32", always_2d=True)
                except sf.LibsndfileError as e:
                    damage = e
                    break
                if not len(block):
                    self._check_size()
                    return
                self._frames += len(block)
                yield mixers[0].process(block)
        # Read again up to the damage, as the blocks before it were read
        # (they decoded then), then in small reads up to the damage: by its
        # name, so only while the name is still the file read (not rotated
        # away or deleted); else the pass ends at its last whole block.
        if self._name_is_still_read():
            with catch():
                f = self.audio._open_sf()
            with f:
                again = 0
                while again < self._frames:
                    with catch():
                        block = f.read(min(_READ_FRAMES, self._frames - again), dtype="float32",
                                       always_2d=True)
                    if not len(block):
                        break
                    again += len(block)
                while again == self._frames:
                    try:
                        with catch():
                            block = f.read(_DAMAGED_READ_FRAMES, dtype="float32", always_2d=True)
                    except sf.LibsndfileError:
                        break
                    if not len(block):
                        break
                    again += len(block)
                    self._frames += len(block)
                    yield mixers[0].process(block)
        if self._frames == 0:
            raise damage
        self._check_size()  # no damage: cut short under the reader
        self.audio._say(logging.WARNING, "audio file %s is damaged %.1f s in (%s): only the "
                        "audio before that is read", self.audio.path, self._frames / self._rate,
                        damage.error_string.strip())

    def _wav(self, found: Misread, mixers: list[MixResampler]) -> Iterator[list[Int16Array]]:
        decoder = WavStreamDecoder(to_end=bool(found.extra))
        read_bytes = _READ_FRAMES * found.frame_bytes
        self._opened = self.audio._size_kept()
        with self.audio._open_bytes() as f:
            f.seek(0)
            while block := f.read(read_bytes):
                frames = decoder.feed(block)
                if not mixers and decoder.format is not None:
                    self.audio._check_channels(decoder.format.channels)
                    self.audio.rate = decoder.format.rate
                    self.audio.channels = decoder.format.channels
                    mixers.append(self._mixer(decoder.format.rate, decoder.format.channels))
                if mixers and len(frames):
                    self._frames += len(frames)
                    yield mixers[0].process(frames)
                if decoder.ended:  # what follows the audio the header states is no audio
                    break
            decoder.finish()
        self._check_size()
        # finish() raised for a file whose audio never began.
        assert decoder.format is not None
        seconds = decoder.frames / decoder.format.rate
        p = self.audio.path
        if found.extra and found.stated:
            self.audio._say(logging.WARNING, "audio file %s holds more audio than its WAV header "
                            "says (it says %.1f s; a recording not closed properly?): read to "
                            "the end of the file, %.1f s", p, found.seconds(found.stated), seconds)
        elif found.extra:
            self.audio._say(logging.WARNING, "audio file %s: its WAV header says no audio (a "
                            "recording not closed properly?): read to the end of the file, "
                            "%.1f s", p, seconds)


class _PrintCatcher:
    """Holds what is printed on file descriptor 2 during each decoder call
    (:meth:`caught`) in a temporary file, and logs it (DEBUG): libmpg123
    prints its notes there (an MP3 frame it resyncs past; some even for an
    MP3 that LAME wrote), past logging. It holds no descriptor between
    calls: transcribe keeps a pass of every file of the command open at
    once, and two descriptors each for the whole pass ran a few hundred
    files out of the usual limit of 1024."""

    def __init__(self, p: Path) -> None:
        self._p = p
        self._logged = 0
        self._seen: set[str] = set()

    @contextlib.contextmanager
    def caught(self) -> Iterator[None]:
        """Descriptor 2 goes to a new temporary file for the ``with`` block,
        then back, and what was printed is logged; one catch at a time in
        the process, whatever thread it is on. Where there is no
        descriptor 2 (nor was at the start: another file may hold it now),
        or no temporary file can be made, prints go where they went."""
        held: BinaryIO | None = None
        # Started without a descriptor 2 (2>&-: Python's stderr is None),
        # descriptor 2 is whatever was opened first since, as soon as the
        # file decoded: pointed at the temporary file, its blocks were read
        # from that. (The commands fill it with /dev/null first,
        # startup.fill_closed_descriptors; a program using this may not.)
        if sys.__stderr__ is not None:
            with contextlib.suppress(OSError):  # no temporary folder, or no descriptor left
                held = tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
        with contextlib.ExitStack() as undo:  # its callbacks run last first
            if held is not None:
                undo.callback(held.close)
                undo.callback(self._log, held)
                # What descriptor 2 is, taken under the lock: taken before,
                # it could be another catch's file.
                undo.enter_context(_FD2)
                saved = _pointed_at(held)
                if saved >= 0:
                    undo.callback(os.close, saved)
                    undo.callback(os.dup2, saved, 2)
            yield

    def _log(self, held: BinaryIO) -> None:
        end = held.tell()
        if not end:
            return
        held.seek(0)
        text = held.read(max(0, _MOST_PRINTS - self._logged)).decode("utf-8", "replace")
        self._logged += min(end, _MOST_PRINTS)
        for line in text.splitlines():
            line = line.strip()
            if line and line not in self._seen:  # once each: resync notes repeat
                self._seen.add(line)
                log.debug("audio file %s: decoder says: %s", self._p, line)


def _pointed_at(held: BinaryIO) -> int:
    """Point descriptor 2 at ``held``; a duplicate of what it was, or -1
    (left as it was) where there is no descriptor 2 or none is left."""
    try:
        saved = os.dup(2)
    except OSError:
        return -1
    with contextlib.suppress(Exception):  # a closed or odd sys.stderr
        sys.stderr.flush()
    try:
        os.dup2(held.fileno(), 2)
    except OSError:
        os.close(saved)
        return -1
    return saved


def joined(blocks: Iterator[list[Int16Array]], outputs: int) -> list[Int16Array]:
    """The blocks of a pass joined: one array per output."""
    parts: list[list[Int16Array]] = [[] for _ in range(outputs)]
    for block in blocks:
        for out, part in zip(parts, block, strict=True):
            out.append(part)
    return [np.concatenate(part) if part else np.zeros(0, np.int16) for part in parts]


@dataclass(frozen=True)
class FileMix:
    """One output of an :class:`AudioFile` (its mix numbered ``mix`` in
    :attr:`AudioFile.mixes`): what a stream of the file is fed, a pass at
    a time."""

    audio: AudioFile
    mix: int

    @property
    def samples(self) -> int | None:
        """Its length as the header gives it (:attr:`AudioFile.samples`)."""
        return self.audio.samples
