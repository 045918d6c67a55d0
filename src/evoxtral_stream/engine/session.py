"""Per-stream state: the open segment's audio and when to ask for decodes.

:class:`StreamSession` is pure and synchronous: it is fed 16 kHz int16 audio
(and the current time, which it only copies into requests) and returns the
:class:`DecodeRequest` objects to submit. It never touches a clock, a thread
or a socket.

Partial cadence is measured in audio, not wall time: while speech is open, a
partial is requested once ``partial_interval_ms`` of new audio has arrived
since the last one, provided no earlier partial of this stream is still in
flight. A slow model therefore stretches the cadence instead of building a
queue, and a file streamed faster than real time gets the same partials as a
live microphone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..audio.resample import int16_to_float32
from ..audio.vad import Segmenter
from ..config import StreamConfig, VadConfig
from ..events import (
    SAMPLE_RATE,
    DecodeFailure,
    DecodeRequest,
    Hypothesis,
    Int16Array,
    RequestKind,
    SegmentEvent,
    SpeechAudio,
    SpeechEnded,
    SpeechStarted,
)

__all__ = ["SessionStats", "StreamSession"]


@dataclass(frozen=True)
class SessionStats:
    samples_in: int
    segments: int
    partials_requested: int
    finals_requested: int
    finals_outstanding: int


class _OpenSegment:
    """Audio of the segment being spoken, as a list of contiguous chunks."""

    def __init__(self, index: int, start: int) -> None:
        self.index = index
        self.start = start
        self.chunks: list[Int16Array] = []
        self.length = 0
        self.revision = 0
        self.last_partial_len = 0
        self.exact: tuple[int, int] | None = None
        """(revision, end sample) of the latest partial made at a pause."""

    def append(self, audio: SpeechAudio) -> None:
        expected = self.start + self.length
        if audio.start_sample != expected:
            raise ValueError(
                f"segment {self.index}: audio at {audio.start_sample}, expected {expected}"
            )
        self.chunks.append(audio.samples)
        self.length += len(audio.samples)

    def audio(self, end: int | None = None) -> np.ndarray:
        data = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        if end is not None:
            data = data[: max(0, end - self.start)]
        return int16_to_float32(data)


class StreamSession:
    """Turns one stream's audio into partial and final decode requests."""

    def __init__(self, stream: str, vad: VadConfig, cfg: StreamConfig,
                 adapter: str | None = None, language: str | None = None) -> None:
        """``adapter`` names the LoRA adapter this stream's requests ask for,
        ``language`` their language (None: ``model.language``). Changing
        :attr:`language` applies to the requests made after the change."""
        self.stream = stream
        self.adapter = adapter
        self._language = language
        self._cfg = cfg
        self._segmenter = Segmenter(vad, SAMPLE_RATE)
        self._open: _OpenSegment | None = None
        self._next_segment = 0
        self._partial_in_flight: tuple[int, int] | None = None
        # Segment -> the ready time of its final's request.
        self._finals_outstanding: dict[int, float] = {}
        self._samples_in = 0
        self._partials = 0
        self._finals = 0
        self._interval = cfg.partial_interval_ms * SAMPLE_RATE // 1000
        self._min_partial = cfg.min_partial_ms * SAMPLE_RATE // 1000

    # --- input --------------------------------------------------------------

    def push(self, samples: Int16Array, now: float) -> list[DecodeRequest]:
        """Feed audio; return the requests to submit (stamped ready at ``now``).
        Raises ValueError for samples that are not 1-D int16, counting none."""
        events = self._segmenter.feed(samples)  # validates before anything is counted
        self._samples_in += len(samples)
        requests = self._apply(events, now)
        partial = self._maybe_partial(now)
        if partial is not None:
            requests.append(partial)
        return requests

    def cut(self, now: float, *, keep_candidate: bool = False) -> list[DecodeRequest]:
        """End the open segment here (if any): it becomes a final, as at a
        natural end. Input may go on; the next segment starts after the cut
        (the segmenter's ``flush`` contract). ``keep_candidate``: the caller
        knows the audio is an utterance (a client's commit), so speech too
        short to have opened a segment yet becomes one and its final too."""
        return self._apply(self._segmenter.flush(keep_candidate=keep_candidate), now)

    def finish(self, now: float) -> list[DecodeRequest]:
        """End of input: the open segment, if any, becomes a final."""
        return self.cut(now)

    def on_result(self, result: Hypothesis | DecodeFailure) -> None:
        """Account for a result of this stream coming back from the worker."""
        if result.kind is RequestKind.FINAL:
            self._finals_outstanding.pop(result.segment, None)
            return
        if self._partial_in_flight == (result.segment, result.revision):
            self._partial_in_flight = None
        seg = self._open
        if (isinstance(result, DecodeFailure) and seg is not None and seg.exact is not None
                and (seg.index, seg.exact[0]) == (result.segment, result.revision)):
            seg.exact = None  # nothing to take the final's text from

    def requeue_failed_submit(self, request: DecodeRequest) -> None:
        """A partial the worker refused: forget it, the next tick asks again."""
        if request.kind is RequestKind.PARTIAL and self._partial_in_flight == (
            request.segment, request.revision
        ):
            self._partial_in_flight = None
            seg = self._open
            if seg is not None and seg.exact is not None and seg.exact[0] == request.revision:
                seg.exact = None

    # --- state --------------------------------------------------------------

    @property
    def language(self) -> str | None:
        """The language of the requests made from now on (None: ``model.language``)."""
        return self._language

    @language.setter
    def language(self, language: str | None) -> None:
        if language == self._language:
            return
        self._language = language
        if self._open is not None:
            # A partial made at a pause before the change decoded the old
            # language: the segment's final is decoded in the new one instead.
            self._open.exact = None

    @property
    def partial_in_flight(self) -> bool:
        return self._partial_in_flight is not None

    def in_flight(self, segment: int, revision: int) -> bool:
        """True while the partial (``segment``, ``revision``) has not come back."""
        return self._partial_in_flight == (segment, revision)

    @property
    def finals_outstanding(self) -> int:
        return len(self._finals_outstanding)

    @property
    def outstanding_segments(self) -> tuple[int, ...]:
        """Segments whose final was requested and has not come back, in order."""
        return tuple(sorted(self._finals_outstanding))

    def final_ready_at(self, segment: int) -> float | None:
        """When ``segment``'s outstanding final was requested (None: none is)."""
        return self._finals_outstanding.get(segment)

    @property
    def position(self) -> int:
        """Samples received so far."""
        return self._samples_in

    def stats(self) -> SessionStats:
        return SessionStats(
            samples_in=self._samples_in, segments=self._next_segment,
            partials_requested=self._partials, finals_requested=self._finals,
            finals_outstanding=len(self._finals_outstanding),
        )

    # --- internals ----------------------------------------------------------

    def _apply(self, events: list[SegmentEvent], now: float) -> list[DecodeRequest]:
        out: list[DecodeRequest] = []
        for ev in events:
            if isinstance(ev, SpeechStarted):
                self._open = _OpenSegment(self._next_segment, ev.sample)
                self._next_segment += 1
            elif isinstance(ev, SpeechAudio):
                if self._open is None:
                    raise ValueError("segmenter sent audio with no open segment")
                self._open.append(ev)
            elif isinstance(ev, SpeechEnded):
                if self._open is None:
                    raise ValueError("segmenter ended a segment that was never started")
                out.append(self._final(self._open, ev, now))
                self._open = None
        return out

    def _final(self, seg: _OpenSegment, ev: SpeechEnded, now: float) -> DecodeRequest:
        seg.revision += 1
        self._finals += 1
        self._finals_outstanding[seg.index] = now
        # The partial made at this pause decoded exactly the final's audio:
        # its text is the final's (the engine waits for it if need be).
        reuse = seg.exact[0] if seg.exact is not None and seg.exact[1] == ev.sample else None
        if (reuse is None and self._partial_in_flight is not None
                and self._partial_in_flight[0] == seg.index):
            # The final supersedes it: the worker drops it or the merger ignores it.
            self._partial_in_flight = None
        return DecodeRequest(
            stream=self.stream, segment=seg.index, revision=seg.revision,
            kind=RequestKind.FINAL, audio=seg.audio(ev.sample),
            start_sample=seg.start, end_sample=ev.sample, ready_at=now,
            forced_end=ev.forced, adapter=self.adapter, language=self.language,
            reuse=reuse,
        )

    def _maybe_partial(self, now: float) -> DecodeRequest | None:
        seg = self._open
        if seg is None or self._interval <= 0 or self._partial_in_flight is not None:
            return None
        if seg.length < self._min_partial or seg.length == seg.last_partial_len:
            return None
        end = seg.start + seg.length
        # A pause past the end tail: the audio so far is the final's if the
        # pause ends the segment, so decode it now rather than at the next tick.
        at_pause = self._cfg.pause_partial and self._segmenter.held_end == end
        if not at_pause and seg.length - seg.last_partial_len < self._interval:
            return None
        seg.revision += 1
        seg.last_partial_len = seg.length
        seg.exact = (seg.revision, end) if at_pause else None
        self._partials += 1
        self._partial_in_flight = (seg.index, seg.revision)
        return DecodeRequest(
            stream=self.stream, segment=seg.index, revision=seg.revision,
            kind=RequestKind.PARTIAL, audio=seg.audio(),
            start_sample=seg.start, end_sample=end, ready_at=now,
            adapter=self.adapter, language=self.language, at_pause=at_pause,
        )
