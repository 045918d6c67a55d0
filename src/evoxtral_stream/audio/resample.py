"""Sample-format conversion, downmixing and polyphase resampling (soxr).

Everything downstream of the audio sources works on mono int16 at
:data:`~evoxtral_stream.events.SAMPLE_RATE`; these helpers get audio there.
Resampling always filters (soxr's HQ polyphase filter): dropping or repeating
samples would alias and shift the pitch the model hears.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import soxr

from evoxtral_stream.events import SAMPLE_RATE, Float32Array, Int16Array

__all__ = [
    "SILENCE_PIECE",
    "SILENCE_PIECES_PER_TURN",
    "MixResampler",
    "StreamResampler",
    "float_to_int16",
    "int16_to_float32",
    "resample",
    "silence_pieces",
    "to_mono",
]

_S = TypeVar("_S", bound=np.generic)

_INT16_SCALE = 32768.0


def to_mono(x: npt.NDArray[_S]) -> npt.NDArray[_S]:
    """Downmix ``(frames, channels)`` to ``(frames,)`` by averaging channels.

    A 1-D array is returned unchanged. The dtype is kept; integer input is
    averaged in float and rounded, so int16 cannot overflow. Float frames
    holding NaN, or infinities of both signs, average to NaN (without a
    warning).
    """
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise ValueError(f"expected (frames,) or (frames, channels) audio, got shape {x.shape}")
    if x.shape[1] == 1:
        return x[:, 0]
    if np.issubdtype(x.dtype, np.integer):
        mean: npt.NDArray[np.float64] = np.rint(x.mean(axis=1, dtype=np.float64))
        return mean.astype(x.dtype)
    # A frame of +inf and -inf (or of sums past the float's range) is as bad
    # as its samples: NaN or inf, which float_to_int16 turns to 0 or
    # saturates, without numpy's RuntimeWarning on stderr.
    with np.errstate(invalid="ignore", over="ignore"):
        out: npt.NDArray[_S] = x.mean(axis=1, dtype=x.dtype)
    return out


def float_to_int16(x: npt.NDArray[np.floating[Any]]) -> Int16Array:
    """Convert float audio in [-1, 1] to int16 (scale 32768, rounded).

    Out-of-range values saturate at -32768 / 32767 instead of wrapping around,
    and NaN becomes 0.
    """
    # Clipped before scaling: inf (or 1e308) times the scale would overflow,
    # a RuntimeWarning on stderr, for the same saturated result.
    unit = np.clip(np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0), -1.0, 1.0)
    return np.clip(np.rint(unit * _INT16_SCALE), -32768, 32767).astype(np.int16)


def int16_to_float32(x: Int16Array) -> Float32Array:
    """Convert int16 audio to float32 in [-1, 1) (scale 1/32768)."""
    return np.asarray(x, dtype=np.float32) * np.float32(1.0 / _INT16_SCALE)


def _as_float32(x: npt.NDArray[Any]) -> Float32Array:
    if x.dtype == np.int16:
        return int16_to_float32(x)
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32, copy=False)
    raise TypeError(f"expected int16 or float audio, got dtype {x.dtype}")


def _full_scale(x: Float32Array) -> Float32Array:
    """``x`` clipped to [-1, 1], NaN as 0 (a copy only when something is
    out): what reaches the filter. A NaN or infinite sample inside it makes
    every output within the filter's reach NaN, tens of milliseconds of
    silence; clipped first, it is one bad sample, as without a filter."""
    with np.errstate(invalid="ignore"):
        if bool(np.all(np.abs(x) <= 1.0)):  # NaN compares False
            return x
    return np.clip(np.nan_to_num(x, nan=0.0), -1.0, 1.0)


def resample(x: npt.NDArray[_S], in_rate: int, out_rate: int) -> npt.NDArray[_S]:
    """Resample a whole array (1-D, or ``(frames, channels)``) with soxr HQ.

    The dtype is kept (soxr supports int16, int32, float32 and float64);
    equal rates return ``x`` itself.
    """
    if in_rate <= 0 or out_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
    if in_rate == out_rate or len(x) == 0:
        return x
    out: npt.NDArray[_S] = soxr.resample(x, in_rate, out_rate)
    return out


#: The largest piece of silence :func:`silence_pieces` gives (100 ms, as a
#: file chunk): a long gap is delivered in many small arrays, never one.
SILENCE_PIECE = SAMPLE_RATE // 10
#: Pieces of silence (1 s) one loop turn delivers when a gap is filled (the
#: microphone's dropped blocks, ingest's lost audio): a long gap goes on in
#: later turns, so the event loop stays responsive while it is filled.
SILENCE_PIECES_PER_TURN = 10


def silence_pieces(samples: int, piece: int = SILENCE_PIECE) -> Iterator[Int16Array]:
    """``samples`` int16 zeros, in fresh arrays of at most ``piece`` samples."""
    while samples > 0:
        n = min(samples, piece)
        samples -= n
        yield np.zeros(n, np.int16)


class StreamResampler:
    """Stateful resampler for a stream of blocks: any rate and channel count in,
    mono int16 at ``out_rate`` out.

    Blocks are downmixed first (one channel to filter instead of several), then
    fed through one ``soxr.ResampleStream`` so the filter state carries across
    block boundaries: the concatenated output equals resampling the whole
    signal at once. Float samples past full scale are clipped before the
    filter (NaN is 0), so a bad one is one bad sample, as in passthrough,
    not a stretch of NaN the filter spreads it into. soxr holds back a few
    milliseconds of filter delay; :meth:`flush` returns it at the end of
    the stream. When ``in_rate == out_rate`` blocks pass straight through
    (downmix and conversion only).
    :meth:`gap` accounts for input that never came, so the output keeps
    counting the input's time.
    """

    def __init__(self, in_rate: int, out_rate: int = SAMPLE_RATE, channels: int = 1) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.channels = channels
        self._stream: Any = None
        # Since creation: input frames (lost ones included) and output samples
        # (silence owed for lost frames included), for gap().
        self._frames_in = 0
        self._samples_out = 0
        self.silence = 0
        """Output samples of silence owed for lost input (see :meth:`gap`)."""
        if in_rate != out_rate:
            self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32")

    @property
    def passthrough(self) -> bool:
        """True when no resampling happens (input rate equals output rate)."""
        return self._stream is None

    def process(self, block: npt.NDArray[Any]) -> Int16Array:
        """Resample one block: int16 or float (frames,) / (frames, channels).

        Returns however many output samples are ready (possibly none).
        """
        if block.ndim == 2 and block.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {block.shape[1]}")
        mono = to_mono(block)
        self._frames_in += len(mono)
        if self._stream is None:
            if mono.dtype == np.int16:
                out = mono.astype(np.int16, copy=True)
            else:
                out = float_to_int16(_as_float32(mono))
        else:
            out = float_to_int16(self._stream.resample_chunk(
                np.ascontiguousarray(_full_scale(_as_float32(mono))), last=False))
        self._samples_out += len(out)
        return out

    def flush(self) -> Int16Array:
        """End of stream: return the samples still held in the filter and reset
        the stream so it can be reused from a clean state."""
        if self._stream is None:
            return np.zeros(0, dtype=np.int16)
        out = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream.clear()
        self._samples_out += len(out)
        return float_to_int16(out)

    def gap(self, frames: int) -> tuple[Int16Array, int]:
        """``frames`` input frames that never came (lost on the way).

        Returns the filter's tail of the audio before the gap (as
        :meth:`flush`, so the filter never joins the audio on either side of
        it) and how many output samples of silence the caller must deliver
        next, in pieces of its choice, so that the output counts the time of
        every input frame: they are counted as delivered (and in
        :attr:`silence`). The count is the output due for all input since
        creation, rounded as soxr rounds a flushed run, less the output so
        far, so rounding never adds up over many gaps. A gap of 0 frames
        changes nothing.
        """
        if frames < 0:
            raise ValueError(f"a gap has 0 frames or more, got {frames}")
        if frames == 0:
            return np.zeros(0, dtype=np.int16), 0
        tail = self.flush()
        self._frames_in += frames
        rate, out_rate = self.in_rate, self.out_rate
        due = (self._frames_in * out_rate * 2 + rate) // (2 * rate)
        missing = max(0, due - self._samples_out)
        self._samples_out += missing
        self.silence += missing
        return tail, missing


class MixResampler:
    """Blocks of frames ``channels`` wide at ``rate`` in; out, per mix of
    channels (numbered from 1; ``()``: every one), a 16 kHz mono int16
    block, each mix resampled by a :class:`StreamResampler` of its own (a
    filter's state never mixes two outputs). A file's reader and a live
    pipe's share it."""

    def __init__(self, rate: int, channels: int, mixes: Sequence[Sequence[int]]) -> None:
        # None: every channel, the block as read (no copy of its columns).
        self._columns = [None if not mix or list(mix) == list(range(1, channels + 1))
                         else [c - 1 for c in mix] for mix in mixes]
        self._converts = [StreamResampler(rate, SAMPLE_RATE,
                                          channels if cols is None else len(cols))
                          for cols in self._columns]

    def process(self, block: npt.NDArray[Any]) -> list[Int16Array]:
        """One block, ``(frames, channels)``: each mix's output ready."""
        return [convert.process(block if cols is None else block[:, cols])
                for convert, cols in zip(self._converts, self._columns, strict=True)]

    def flush(self) -> list[Int16Array]:
        """End of stream: each mix's tail (see :meth:`StreamResampler.flush`)."""
        return [convert.flush() for convert in self._converts]
