"""Voice-activity segmentation: mono int16 samples in, segment events out.

:class:`Segmenter` is a pure, synchronous core in the style of a sans-I/O
protocol: no threads, no clocks, no I/O. Time is counted in samples.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import webrtcvad

from evoxtral_stream.config import VadConfig
from evoxtral_stream.events import (
    SAMPLE_RATE,
    Int16Array,
    SegmentEvent,
    SpeechAudio,
    SpeechEnded,
    SpeechStarted,
)

__all__ = ["HELD_GAP_S", "VAD_SAMPLE_RATES", "FrameClassifier", "Segmenter", "SegmenterState"]

logger = logging.getLogger(__name__)

#: Decides whether one frame (exactly ``frame_ms`` of int16 samples) is voiced.
FrameClassifier = Callable[[Int16Array], bool]

#: Rates webrtcvad accepts.
VAD_SAMPLE_RATES = (8000, 16000, 32000, 48000)

#: Short speech kept for an explicit cut (see :class:`Segmenter`, **Flush**)
#: further than this before the next (from its last voiced frame to the
#: next one's start) is not one utterance with it: forgotten, so a cough and
#: a "Yes" seconds later do not make one long segment of mostly silence.
HELD_GAP_S = 2.0


class SegmenterState(enum.Enum):
    IDLE = "idle"
    """No speech: watching the start window."""
    PENDING = "pending"
    """Speech detected but shorter than ``min_speech_ms``: nothing emitted yet."""
    ACTIVE = "active"
    """A segment is open: ``SpeechStarted`` was emitted."""


@dataclass(frozen=True, slots=True)
class _Frame:
    start: int
    samples: Int16Array
    energy: float
    voiced: bool

    @property
    def end(self) -> int:
        return self.start + len(self.samples)


class Segmenter:
    """Split a stream of mono int16 samples into speech segments.

    Call :meth:`feed` with samples of any length, :meth:`flush` at the end of
    input or to cut the open segment where the input stands (a "commit").
    Audio is cut into ``frame_ms`` frames from the first sample (a partial
    frame waits for the next call), each frame is classified by
    webrtcvad, and the events below come out. The events depend only on the
    samples, never on how they were chunked into :meth:`feed` calls.

    Contracts (all positions are stream sample indices):

    * **Start.** Speech is detected on a voiced frame when at least
      ``start_ratio`` of the frames in the last ``start_window_ms`` are voiced,
      counting only frames after the end of the last segment or candidate
      and after the last flush (the window starts empty there).
      The speech onset is the first voiced frame of that window; the segment
      starts ``pre_roll_ms`` earlier, clamped at the start of the stream, at
      the end of the previous segment (segments never overlap) and so that it
      is a frame shorter than ``max_segment_s`` when speech is detected.
    * **Minimum length.** Nothing is emitted until the candidate segment holds
      ``min_speech_ms`` of *voiced* frames (pre-roll and silences don't
      count). Then ``SpeechStarted(start)`` is emitted together with all its
      audio so far. A candidate that ends first is discarded silently
      (remembered only for an explicit cut). It is also confirmed if it
      reaches ``max_segment_s`` before that, or by an explicit cut: see
      **Flush**.
    * **Audio.** ``SpeechAudio`` events of a segment are contiguous from its
      start; while speech goes on, every frame is delivered as soon as it is
      analysed. During a pause, audio is held back beyond the last voiced
      frame + ``end_tail_ms``; it is delivered if speech resumes.
    * **End.** After ``end_silence_ms`` of consecutive unvoiced frames the
      segment ends with ``SpeechEnded(last_voiced_end + tail, forced=False)``,
      tail = min(``end_tail_ms``, ``end_silence_ms``). The audio delivered
      covers exactly ``[start, end)``.
    * **Maximum length.** No segment is longer than ``max_segment_s``. Before
      the next frame would exceed it, the segment is cut in the middle of the
      quietest (lowest mean-square) whole frame found in its last
      ``split_search_s`` seconds and before its last voiced frame (so the next
      segment holds speech): ``SpeechEnded(cut, forced=True)``, then
      ``SpeechStarted(cut)`` and a ``SpeechAudio`` re-delivering
      ``[cut, delivered)``. The first segment's audio is then
      ``[start, cut)``. The continuation is not subject to ``min_speech_ms``.
      If no such frame exists (the whole search window is a pause), the
      segment ends as at a natural end, ``forced=False``.
    * **Flush.** :meth:`flush` ends an open segment as at a natural end
      (``forced=False``), the trailing partial frame counting as unvoiced
      audio (so a segment still in speech, or within its end tail, ends at
      the flush point exactly), and discards an unconfirmed one; later input
      continues the same sample count but a fresh history (pre-roll cannot
      reach before the flush). ``flush(keep_candidate=True)`` is the
      explicit cut of a caller that knows the input is an utterance (a
      client's commit): the unconfirmed candidates since the last segment
      opened (or the last flush), the one under way and those that ended,
      are confirmed first as one segment (``SpeechStarted`` at the first
      one's start, pre-roll included), which then ends the same way,
      however little voiced audio it holds. So a push-to-talk "Yes"
      released a moment after it was said is kept. An ended candidate is
      forgotten once that segment would be longer than ``max_segment_s``
      (nothing is brought back from far behind, and the history kept for
      it stays bounded), and so are those more than :data:`HELD_GAP_S`
      before the next one (a cough seconds before the "Yes"). Speech that
      never met the start rule is not brought back; nor is a candidate once
      a later one is confirmed: the click filter holds within a dictation.
    """

    def __init__(
        self,
        cfg: VadConfig,
        sample_rate: int = SAMPLE_RATE,
        *,
        classifier: FrameClassifier | None = None,
    ) -> None:
        """``classifier`` replaces webrtcvad (tests, other VADs); it must be
        deterministic for the chunking guarantee to hold."""
        if classifier is None and sample_rate not in VAD_SAMPLE_RATES:
            raise ValueError(
                f"webrtcvad needs a sample rate in {VAD_SAMPLE_RATES}, got {sample_rate}"
            )
        if (sample_rate * cfg.frame_ms) % 1000:
            raise ValueError(
                f"{cfg.frame_ms} ms is not a whole number of samples at {sample_rate} Hz"
            )
        self.cfg = cfg
        self.sample_rate = sample_rate
        self._custom_classifier = classifier
        frame_ms = cfg.frame_ms
        self.frame_samples = sample_rate * frame_ms // 1000
        self._window_frames = max(1, round(cfg.start_window_ms / frame_ms))
        # At least one voiced frame, even with start_ratio = 0.
        self._start_voiced = max(1, math.ceil(cfg.start_ratio * self._window_frames - 1e-9))
        self._end_frames = max(1, math.ceil(cfg.end_silence_ms / frame_ms))
        self._min_frames = math.ceil(cfg.min_speech_ms / frame_ms)
        self._held_gap = round(HELD_GAP_S * sample_rate)
        self._pre_roll = self._ms(cfg.pre_roll_ms)
        self._tail = self._ms(min(cfg.end_tail_ms, cfg.end_silence_ms))
        self._max_len = int(cfg.max_segment_s * sample_rate)
        self._search = int(cfg.split_search_s * sample_rate)
        if self._max_len < 2 * self.frame_samples:
            raise ValueError("vad.max_segment_s must span at least two frames")
        self.reset()

    def _ms(self, ms: float) -> int:
        return round(ms * self.sample_rate / 1000)

    # --- public API ---------------------------------------------------------

    @property
    def position(self) -> int:
        """Samples consumed so far (including a partial frame not yet analysed)."""
        return self._framed_end + len(self._remainder)

    @property
    def state(self) -> SegmenterState:
        return self._state

    @property
    def in_segment(self) -> bool:
        """True between an emitted ``SpeechStarted`` and its ``SpeechEnded``."""
        return self._state is SegmenterState.ACTIVE

    @property
    def candidate_start(self) -> int | None:
        """Where the segment that ``flush(keep_candidate=True)`` would open
        starts (pre-roll included): the first of the unconfirmed candidates
        it keeps, under way (``PENDING``) or ended (see **Flush**); None when
        it would open none (nothing kept, or a segment is open)."""
        if self._ended:  # never while a segment is open
            return self._ended[0][0]
        return self._seg_start if self._state is SegmenterState.PENDING else None

    @property
    def held_end(self) -> int | None:
        """Where the open segment ends if the pause under way turns out to be
        its end, once the analysed audio has passed that point: the end of
        its last voiced frame plus the end tail. All its audio up to there has
        been delivered and nothing after it will be unless speech resumes
        (the **Audio** and **End** contracts). None while speech goes on, in
        the end tail, or with no segment open."""
        if self._state is not SegmenterState.ACTIVE or not self._unvoiced_run:
            return None
        end = self._last_voiced_end + self._tail
        return end if self._framed_end >= end else None

    @property
    def horizon(self) -> int:
        """No event from now on names a sample before this: the start of
        the segment or candidate under way, of the first candidate a
        ``flush(keep_candidate=True)`` would keep, or else of the audio
        still held (a segment's start never reaches before it, the
        **Start** contract). It never decreases (but by :meth:`reset`)."""
        marks = [self._framed_end]
        if self._state is not SegmenterState.IDLE:
            marks.append(self._seg_start)
        if self._ended:
            marks.append(self._ended[0][0])
        if self._frames:
            marks.append(self._frames[0].start)
        return min(marks)

    def reset(self) -> None:
        """Forget everything, as if newly constructed (position back to 0)."""
        if self._custom_classifier is not None:
            self._classify: FrameClassifier = self._custom_classifier
        else:
            # webrtcvad adapts to the noise floor; a reset stream starts fresh.
            vad = webrtcvad.Vad(self.cfg.aggressiveness)
            rate = self.sample_rate

            def classify(frame: Int16Array) -> bool:
                return bool(vad.is_speech(frame.tobytes(), rate))

            self._classify = classify
        self._remainder: Int16Array = np.zeros(0, dtype=np.int16)
        self._framed_end = 0
        self._frames: deque[_Frame] = deque()
        self._window: deque[bool] = deque(maxlen=self._window_frames)
        self._state = SegmenterState.IDLE
        self._prev_end = 0
        self._seg_start = 0
        self._delivered = 0
        self._voiced_count = 0
        self._last_voiced_end = 0
        self._unvoiced_run = 0
        # Candidates that ended unconfirmed since the last segment or flush,
        # as (start, last voiced end): what flush(keep_candidate=True) keeps.
        self._ended: deque[tuple[int, int]] = deque()

    def feed(self, samples: Int16Array) -> list[SegmentEvent]:
        """Consume mono int16 samples (any length); return the events they cause."""
        if samples.dtype != np.int16 or samples.ndim != 1:
            raise ValueError(f"expected 1-D int16 samples, got {samples.dtype} {samples.shape}")
        events: list[SegmentEvent] = []
        if len(samples) == 0:
            return events
        buf = np.concatenate((self._remainder, samples)) if len(self._remainder) else samples
        n = self.frame_samples
        whole = len(buf) - len(buf) % n
        for i in range(0, whole, n):
            # Copy: history must not keep the caller's (possibly large) array alive.
            self._step(buf[i : i + n].copy(), events)
        self._remainder = buf[whole:].copy()
        return events

    def flush(self, *, keep_candidate: bool = False) -> list[SegmentEvent]:
        """End of input: close an open segment (``forced=False``), discard
        unconfirmed speech, or with ``keep_candidate`` close it as a
        segment. See the class contract (**Flush**)."""
        events: list[SegmentEvent] = []
        if keep_candidate and (self._ended or self._state is SegmenterState.PENDING):
            if self._ended:
                self._seg_start = self._ended[0][0]
                if self._state is SegmenterState.IDLE:
                    self._last_voiced_end = self._ended[-1][1]
            self._confirm(events)
        if self._state is SegmenterState.ACTIVE:
            if len(self._remainder):
                # Too short to classify, but it is the audio up to the flush
                # point: within the end tail it belongs to the segment (a
                # commit mid-word keeps the word's last milliseconds).
                self._frames.append(_Frame(self._framed_end, self._remainder.copy(), 0.0,
                                           False))
                self._framed_end += len(self._remainder)
                self._remainder = np.zeros(0, dtype=np.int16)
            self._close(events)
        self._state = SegmenterState.IDLE
        self._framed_end += len(self._remainder)
        self._remainder = np.zeros(0, dtype=np.int16)
        self._frames.clear()
        self._window.clear()
        self._ended.clear()
        self._prev_end = self._framed_end
        return events

    # --- frame processing ---------------------------------------------------

    def _step(self, frame: Int16Array, events: list[SegmentEvent]) -> None:
        start = self._framed_end
        end = start + len(frame)
        f = frame.astype(np.float64)
        energy = float(np.dot(f, f)) / len(frame)
        voiced = self._classify(frame)
        self._frames.append(_Frame(start, frame, energy, voiced))
        self._framed_end = end
        self._window.append(voiced)

        if self._state is SegmenterState.IDLE:
            if voiced and sum(self._window) >= self._start_voiced:
                self._open(end)
        else:
            if voiced:
                self._voiced_count += 1
                self._last_voiced_end = end
                self._unvoiced_run = 0
            else:
                self._unvoiced_run += 1

        if self._state is SegmenterState.PENDING and (
            self._voiced_count >= self._min_frames
            or end - self._seg_start + self.frame_samples > self._max_len
        ):
            self._confirm(events)

        if self._state is not SegmenterState.IDLE and self._unvoiced_run >= self._end_frames:
            if self._state is SegmenterState.ACTIVE:
                self._close(events)
            else:
                self._ended.append((self._seg_start, self._last_voiced_end))
            self._state = SegmenterState.IDLE
            # Only frames after this segment may start the next one.
            self._window.clear()

        if self._state is SegmenterState.ACTIVE:
            self._deliver(min(end, self._last_voiced_end + self._tail), events)
            # Split before the next frame could push the segment past the maximum.
            if end - self._seg_start + self.frame_samples > self._max_len:
                self._split(events)

        # A kept candidate must fit one segment with the flush point, which is
        # before the next frame's end.
        while self._ended and end + self.frame_samples - self._ended[0][0] > self._max_len:
            self._ended.popleft()
        self._trim()

    def _open(self, end: int) -> None:
        n = self.frame_samples
        first = next(i for i, v in enumerate(self._window) if v)
        onset = end - (len(self._window) - first) * n
        history_start = self._frames[0].start
        # The split cuts only in the last split_search_s, so a candidate that
        # is already past the maximum here (pre-roll plus a long start window)
        # could never be cut short enough: it holds at most one frame less.
        room = end + n - self._max_len
        self._seg_start = max(onset - self._pre_roll, self._prev_end, history_start, room)
        self._voiced_count = sum(self._window)
        self._last_voiced_end = end
        self._unvoiced_run = 0
        self._state = SegmenterState.PENDING
        if self._ended and self._seg_start - self._ended[-1][1] > self._held_gap:
            self._ended.clear()

    def _confirm(self, events: list[SegmentEvent]) -> None:
        """The candidate becomes a segment; its audio is delivered from its start."""
        self._state = SegmenterState.ACTIVE
        self._delivered = self._seg_start
        self._ended.clear()
        events.append(SpeechStarted(self._seg_start))

    def _close(self, events: list[SegmentEvent]) -> None:
        seg_end = min(self._framed_end, self._last_voiced_end + self._tail)
        self._deliver(seg_end, events)
        events.append(SpeechEnded(seg_end, forced=False))
        self._prev_end = seg_end

    def _split(self, events: list[SegmentEvent]) -> None:
        search_from = max(self._seg_start, self._framed_end - self._search)
        last_voiced_start = self._last_voiced_end - self.frame_samples
        best: _Frame | None = None
        for fr in self._frames:
            if fr.start < search_from:
                continue
            if fr.start >= last_voiced_start:
                break
            # "<=": among equally quiet frames take the latest (longer first segment).
            if best is None or fr.energy <= best.energy:
                best = fr
        if best is None:
            self._close(events)
            self._state = SegmenterState.IDLE
            self._window.clear()
            return
        cut = best.start + self.frame_samples // 2
        self._deliver(cut, events)
        events.append(SpeechEnded(cut, forced=True))
        events.append(SpeechStarted(cut))
        if self._delivered > cut:
            events.append(SpeechAudio(cut, self._audio(cut, self._delivered)))
        self._prev_end = cut
        self._seg_start = cut
        self._voiced_count = sum(1 for fr in self._frames if fr.voiced and fr.start >= cut)
        logger.debug("segment reached the maximum length: cut at sample %d", cut)

    def _deliver(self, upto: int, events: list[SegmentEvent]) -> None:
        if upto > self._delivered:
            events.append(SpeechAudio(self._delivered, self._audio(self._delivered, upto)))
            self._delivered = upto

    def _audio(self, a: int, b: int) -> Int16Array:
        """Samples ``[a, b)`` from the frame history (always a fresh array)."""
        parts: list[Int16Array] = []
        for fr in reversed(self._frames):
            if fr.end <= a:
                break
            if fr.start >= b:
                continue
            parts.append(fr.samples[max(a, fr.start) - fr.start : min(b, fr.end) - fr.start])
        parts.reverse()
        out = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)
        assert len(out) == b - a, "segmenter history lost audio it still needed"
        return out

    def _trim(self) -> None:
        if self._state is SegmenterState.IDLE:
            keep_from = self._framed_end - self._window_frames * self.frame_samples - self._pre_roll
        elif self._state is SegmenterState.PENDING:
            keep_from = self._seg_start
        else:
            keep_from = min(self._delivered, self._framed_end - self._search)
        if self._ended:
            keep_from = min(keep_from, self._ended[0][0])
        frames = self._frames
        while frames and frames[0].end <= keep_from:
            frames.popleft()
