"""A seeded random fuzz of audio files: real speech, encoded, then damaged.

:func:`make_case` speaks a sentence with espeak-ng and writes it with
soundfile in a format drawn from the seed (WAV PCM16/PCM24/float32/float64/
u8, WAV extensible, FLAC, OGG Vorbis, MP3 where libsndfile has it), at a
rate from 8 to 96 kHz, mono or multi-channel. Then it damages the file as
disks, downloads and broken writers do: truncation anywhere (mid-header,
mid-frame, mid-page), flipped bytes in the header or the body, WAV header
fields that claim what is not there (65535 channels, a rate of 0 or 4e9,
a data chunk larger than the file, odd bit depths, an extensible header's
channel mask and sub-format), NaN/Inf/huge float samples, and a file that
is shortened or grows while it is read (a writer thread). Some cases are
left intact, as a control.

:func:`check_read` reads the file as ``transcribe`` does
(:func:`read_audio_file`) and holds the result against the docs: 16 kHz
mono int16 with audio in it, or an :class:`AudioInputError` with one line
naming the file and no chained traceback; no other exception, no hang, no
more audio than the file can hold, bounded memory (a header claiming hours
allocates nothing of them). An intact file decodes to its length with the
speech in it; bad float samples disturb only the audio around them. It
returns the problems found (empty: none), so a failing seed can be rerun.
"""

from __future__ import annotations

import logging
import os
import random
import struct
import tempfile
import threading
import time
import tracemalloc
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf  # type: ignore[import-untyped,unused-ignore]

from evoxtral_stream.audio.resample import resample
from evoxtral_stream.audio.sources import AudioInputError, read_audio_file
from evoxtral_stream.events import SAMPLE_RATE, Int16Array
from tests.speech import speak

__all__ = ["KINDS", "Case", "Read", "check_read", "make_case", "mp3_writable"]

SENTENCES = ("The quick brown fox jumps over the lazy dog.",
             "Please call me back when you get home tonight.",
             "Seven red boats sailed past the old stone harbour.")


@dataclass(frozen=True)
class Kind:
    """A way to encode: soundfile's format and subtype, and its limits."""

    name: str
    format: str
    subtype: str
    suffix: str
    max_channels: int
    rates: tuple[int, ...]


_ANY_RATE = (8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000)
_MPEG_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)

KINDS = (
    Kind("pcm16", "WAV", "PCM_16", ".wav", 8, _ANY_RATE),
    Kind("pcm24", "WAV", "PCM_24", ".wav", 8, _ANY_RATE),
    Kind("float", "WAV", "FLOAT", ".wav", 8, _ANY_RATE),
    Kind("double", "WAV", "DOUBLE", ".wav", 8, _ANY_RATE),
    Kind("u8", "WAV", "PCM_U8", ".wav", 8, _ANY_RATE),
    Kind("wavex", "WAVEX", "PCM_16", ".wav", 8, _ANY_RATE),
    Kind("wavex-float", "WAVEX", "FLOAT", ".wav", 8, _ANY_RATE),
    Kind("flac", "FLAC", "PCM_16", ".flac", 8, _ANY_RATE),
    Kind("vorbis", "OGG", "VORBIS", ".ogg", 8, _ANY_RATE),
    Kind("mp3", "MP3", "MPEG_LAYER_III", ".mp3", 2, _MPEG_RATES),
)


def mp3_writable() -> bool:
    """Whether this libsndfile encodes MP3 (1.1 and later, built with LAME)."""
    return "MP3" in sf.available_formats()


@dataclass(frozen=True)
class Case:
    """One file to read, how it was made and what was done to it."""

    seed: int
    path: Path
    kind: str
    rate: int
    channels: int
    frames: int
    """Frames as encoded (before any damage)."""
    acts: tuple[str, ...]
    """What was done to the file; empty: intact."""
    clean: Int16Array | None
    """For float samples made NaN/Inf/huge and nothing else: the intact
    file as read, to compare with."""
    bursts: int
    """How many runs of bad float samples were written."""
    race: str | None = None
    """``shrink`` or ``grow``: the file changes while it is read."""

    def describe(self) -> str:
        race = f", {self.race} while read" if self.race else ""
        return (f"seed {self.seed}: {self.kind} {self.rate} Hz x{self.channels}, "
                f"{self.frames} frames; {'; '.join(self.acts) or 'intact'}{race}")


def _speech(rng: random.Random, rate: int, channels: int) -> np.ndarray:
    """A sentence or two at ``rate``, float32 (frames, channels) in [-1, 1]:
    each channel the speech at its own gain (some silent), so a downmix
    keeps it."""
    parts = [speak(s) for s in rng.sample(SENTENCES, rng.randint(1, 2))]
    x = np.concatenate(parts).astype(np.float32) / 32768
    if rate != SAMPLE_RATE:
        x = resample(x, SAMPLE_RATE, rate)
    gains = [rng.choice((1.0, 0.8, 0.5, 0.0)) for _ in range(channels)]
    gains[rng.randrange(channels)] = 1.0
    return np.stack([x * g for g in gains], axis=1).astype(np.float32)


def _chunks(data: bytes | bytearray) -> dict[bytes, int]:
    """A RIFF file's chunk ids and the offset of each one's body."""
    found: dict[bytes, int] = {}
    i = 12
    while i + 8 <= len(data):
        (n,) = struct.unpack_from("<I", data, i + 4)
        found.setdefault(bytes(data[i:i + 4]), i + 8)
        i += 8 + n + (n & 1)
    return found


#: WAV header fields (offset in the "fmt " body, struct format) and values
#: a damaged or hostile header holds.
_WAV_FIELDS: dict[str, tuple[int, str, tuple[int, ...]]] = {
    "format tag": (0, "<H", (0, 1, 2, 3, 0x55, 0xFFFE, 0xFFFF)),
    "channels": (2, "<H", (0, 1, 3, 255, 1024, 1025, 65535)),
    "rate": (4, "<I", (0, 1, 999, 1000, 7999, 2**31 - 1, 4_000_000_000, 2**32 - 1)),
    "byte rate": (8, "<I", (0, 1, 2**32 - 1)),
    "block align": (12, "<H", (0, 1, 3, 65535)),
    "bits": (14, "<H", (0, 7, 8, 12, 24, 33, 64, 65535)),
}
_WAVEX_FIELDS: dict[str, tuple[int, str, tuple[int, ...]]] = {
    "extension size": (16, "<H", (0, 1, 100, 65535)),
    "valid bits": (18, "<H", (0, 1, 17, 65535)),
    "channel mask": (20, "<I", (0, 1, 7, 0x3F, 0x80000000, 2**32 - 1)),
    "sub-format": (24, "<H", (0, 1, 2, 3, 0x55, 0xFFFF)),
}


def _damage_header_field(rng: random.Random, data: bytearray, kind: Kind) -> str | None:
    chunks = _chunks(data)
    fmt = chunks.get(b"fmt ")
    if fmt is None:
        return None
    fields = dict(_WAV_FIELDS)
    if kind.format == "WAVEX":
        fields.update(_WAVEX_FIELDS)
    if b"data" in chunks:
        fields["data size"] = (chunks[b"data"] - 4 - fmt, "<I",
                               (0, 1, 2**31, 2**32 - 1, len(data) * 10))
    fields["RIFF size"] = (4 - fmt, "<I", (0, 4, 2**32 - 1))
    name = rng.choice(sorted(fields))
    off, code, values = fields[name]
    value = rng.choice(values)
    if fmt + off + struct.calcsize(code) > len(data):
        return None
    struct.pack_into(code, data, fmt + off, value)
    return f"{name} := {value}"


def _flip(rng: random.Random, data: bytearray, lo: int, hi: int, what: str) -> str:
    hi = min(hi, len(data))
    if hi <= lo:
        return f"no {what} to flip"
    n = rng.choice((1, 1, 2, 8, 64))
    for _ in range(n):
        i = rng.randrange(lo, hi)
        data[i] = rng.choice((data[i] ^ (1 << rng.randrange(8)), 0, 0xFF, rng.randrange(256)))
    return f"{n} byte(s) of the {what} changed in [{lo}, {hi})"


def _poison(rng: random.Random, x: np.ndarray) -> tuple[np.ndarray, int, str]:
    """Runs of NaN, Inf or huge values in float samples."""
    y = x.copy()
    bursts = rng.randint(1, 3)
    values = []
    for _ in range(bursts):
        v = rng.choice((np.nan, np.inf, -np.inf, 1e30, -3.4e38, 1e4))
        start = rng.randrange(len(y))
        n = rng.choice((1, 5, 100))
        y[start:start + n, rng.randrange(y.shape[1])] = v
        values.append(f"{v:g}x{n}@{start}")
    return y, bursts, "float samples " + ", ".join(values)


def make_case(seed: int, folder: Path) -> Case:
    """Write the file of ``seed`` into ``folder`` (damaged, or intact as a
    control) and say how it was made."""
    rng = random.Random(seed)
    kinds = [k for k in KINDS if k.format != "MP3" or mp3_writable()]
    kind = rng.choice(kinds)
    rate = rng.choice(kind.rates)
    channels = rng.choice([c for c in (1, 1, 2, 3, 6, 8) if c <= kind.max_channels])
    x = _speech(rng, rate, channels)
    path = folder / f"s{seed}-{kind.name}{kind.suffix}"
    acts: list[str] = []
    clean: Int16Array | None = None
    bursts = 0
    is_float = kind.subtype in ("FLOAT", "DOUBLE")
    if is_float and rng.random() < 0.3:
        sf.write(path, x, rate, format=kind.format, subtype=kind.subtype)
        clean = read_audio_file(path)
        x, bursts, act = _poison(rng, x)
        acts.append(act)
    sf.write(path, x, rate, format=kind.format, subtype=kind.subtype)
    data = bytearray(path.read_bytes())
    race: str | None = None
    if rng.random() >= 0.15:  # else intact (or only its float samples bad): a control
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            what = rng.choice(("truncate", "header", "body", "field", "field", "race"))
            if what == "truncate" and data:
                at = rng.choice((rng.randrange(0, min(len(data), 200)),
                                 rng.randrange(len(data)), len(data) - rng.randint(1, 64)))
                del data[max(0, at):]
                acts.append(f"cut at byte {max(0, at)}")
            elif what == "header":
                acts.append(_flip(rng, data, 0, 64, "header"))
            elif what == "body":
                acts.append(_flip(rng, data, 64, len(data), "body"))
            elif what == "field" and kind.format in ("WAV", "WAVEX"):
                changed = _damage_header_field(rng, data, kind)
                if changed is not None:
                    acts.append(changed)
            elif what == "race" and race is None:
                race = rng.choice(("shrink", "grow"))
        if not acts and race is None:
            acts.append(_flip(rng, data, 0, len(data), "file"))
    path.write_bytes(bytes(data))
    if acts and not (clean is not None and len(acts) == 1):
        clean = None  # other damage too: nothing to compare with
    return Case(seed, path, kind.name, rate, channels, len(x), tuple(acts), clean, bursts,
                race)


@dataclass(frozen=True)
class Read:
    """What :func:`read_audio_file` gave: samples or the error, and at what cost."""

    audio: Int16Array | None
    error: BaseException | None
    seconds: float
    peak_bytes: int
    warnings: tuple[str, ...]
    """Warnings logged under ``evoxtral_stream``."""
    stray: str
    """What reached stderr other than through logging: the C libraries'
    own prints (file descriptor 2), Python warnings."""


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _race(case: Case, stop: threading.Event) -> None:
    """Change the file while it is read: cut it down in steps, or append
    bytes to it (its own tail again: more frames than the header says)."""
    rng = random.Random(case.seed * 7 + 1)
    size = case.path.stat().st_size
    tail = case.path.read_bytes()[size // 2:]
    while not stop.is_set():
        try:
            if case.race == "shrink":
                size = max(0, size - rng.randint(1, 4096))
                os.truncate(case.path, size)
                if size == 0:
                    return
            else:
                with case.path.open("ab") as f:
                    f.write(tail[:rng.randint(1, 4096)])
                if case.path.stat().st_size > 64 * size:
                    return
        except OSError:
            return
        time.sleep(0)


def read(case: Case, timeout: float = 20.0) -> Read:
    """Read ``case`` as ``transcribe`` does, measuring time, memory and the
    warnings logged; a read still going after ``timeout`` is a hang (its
    thread is left behind, so the test fails instead of hanging)."""
    box: dict[str, object] = {}
    records = _Records()
    logger = logging.getLogger("evoxtral_stream")
    logger.addHandler(records)

    def work() -> None:
        try:
            box["audio"] = read_audio_file(case.path)
        except BaseException as e:  # everything, to report it
            box["error"] = e

    stop = threading.Event()
    racer = threading.Thread(target=_race, args=(case, stop), daemon=True) if case.race else None
    with tempfile.TemporaryFile() as err, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        tracemalloc.start()
        t0 = time.monotonic()
        try:
            if racer is not None:
                racer.start()
            reader = threading.Thread(target=work, daemon=True)
            reader.start()
            reader.join(timeout)
            seconds = time.monotonic() - t0
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            stop.set()
            logger.removeHandler(records)
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        stray = err.read().decode("utf-8", "replace")
        stray += "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    if racer is not None:
        racer.join(5)
    if reader.is_alive():
        return Read(None, TimeoutError(f"no result after {timeout:.0f} s"), seconds, peak,
                    tuple(records.lines), stray)
    audio = box.get("audio")
    error = box.get("error")
    return Read(audio if isinstance(audio, np.ndarray) else None,
                error if isinstance(error, BaseException) else None,
                seconds, peak, tuple(records.lines), stray)


def check_read(case: Case) -> list[str]:
    """Read ``case`` and return every way the result breaks the contracts."""
    r = read(case)
    problems: list[str] = []
    name = case.path.name
    if r.seconds > 10:
        problems.append(f"the read took {r.seconds:.1f} s")
    if r.stray:
        problems.append(f"wrote to stderr past logging: {r.stray[:300]!r}")
    if r.error is not None:
        e = r.error
        if not isinstance(e, AudioInputError):
            return [*problems, f"raised {type(e).__name__}: {e!r} (not an AudioInputError)"]
        message = str(e)
        if "\n" in message or "\r" in message:
            problems.append(f"the error is not one line: {message!r}")
        if name not in message:
            problems.append(f"the error does not name the file: {message!r}")
        if e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
            problems.append(f"the error chains a traceback: {message!r}")
        if not case.acts and case.race is None:
            problems.append(f"an intact file was refused: {message}")
        return problems
    audio = r.audio
    if audio is None:
        return [*problems, "neither audio nor an error"]
    if audio.dtype != np.int16 or audio.ndim != 1:
        problems.append(f"got {audio.dtype} {audio.shape}, not 1-D int16")
    if len(audio) == 0:
        problems.append("zero samples returned (not an AudioInputError)")
    # No header makes more audio than the file's frames at the lowest rate
    # (grown: the bytes appended), nor allocates for more.
    most = (case.frames * case.channels * 4 + case.path.stat().st_size) * 16 + SAMPLE_RATE
    if case.race == "grow":
        most *= 64
    if len(audio) > most:
        problems.append(f"{len(audio)} samples from a file of {case.frames} frames")
    if r.peak_bytes > 4 * audio.nbytes + (64 << 20):
        problems.append(f"peak memory {r.peak_bytes / 1e6:.0f} MB for "
                        f"{audio.nbytes / 1e6:.1f} MB of audio")
    if not case.acts and case.race is None:
        want = case.frames * SAMPLE_RATE / case.rate
        slack = 0.01 * want + (SAMPLE_RATE * 0.15 if case.kind == "mp3" else 4)
        if abs(len(audio) - want) > slack:
            problems.append(f"an intact file gave {len(audio)} samples, not about {want:.0f}")
        if r.warnings:
            problems.append(f"an intact file was warned about: {r.warnings}")
    if case.clean is not None and len(case.acts) == 1 and case.race is None:
        # Bad float samples are damage around them, not the end of the file.
        if len(audio) != len(case.clean):
            problems.append(f"bad float samples changed the length: {len(audio)} "
                            f"!= {len(case.clean)}")
        else:
            changed = int(np.count_nonzero(audio != case.clean))
            if changed > case.bursts * (SAMPLE_RATE // 4 + 100):
                problems.append(f"{changed} samples changed by {case.bursts} run(s) of "
                                "bad float samples")
    return problems
