"""A stateful model of the segmenter and the stream session above it
(Hypothesis RuleBasedStateMachine), on the real webrtcvad.

Audio is pushed in chunks of any size (1 sample to several frames, odd
sizes): espeak-ng speech, clipped speech, a harmonic buzz, digital silence,
a quiet noise floor and loud noise bursts, under a ``[vad]`` and
``[stream]`` config drawn at the start (every aggressiveness and frame
length, short maxima so that forced splits happen); flushes, plain and
keeping the candidate (a commit), come at any point, and input that is not
1-D int16 is refused; the session's partials are answered, failed or
refused, its finals answered, its language switched.

The same audio goes to a second segmenter one frame at a time (the
"shadow"), and to a third webrtcvad that says which frames are voiced (the
oracle). After every frame and every step the events are held against
:class:`~evoxtral_stream.audio.vad.Segmenter`'s contracts:

- the grammar (``SpeechStarted``, contiguous ``SpeechAudio``, ``SpeechEnded``;
  a forced end re-delivered by the next segment), each segment's audio the
  samples fed there, segments never overlapping nor spanning a flush, and
  the events the same however the audio was chunked;
- **Start**: a candidate opens on exactly the frame whose window (since the
  last end or flush) meets ``start_ratio``, at its first voiced frame less
  ``pre_roll_ms``, clamped; **Minimum length**: it is confirmed once it holds
  ``min_speech_ms`` of voiced frames (or reaches the maximum), not before;
- **Audio** and **End**: an open segment has delivered exactly up to its last
  voiced frame + tail (``held_end`` says where), and ends after
  ``end_silence_ms`` of unvoiced frames, there; **Maximum length**: no
  segment is longer than ``max_segment_s``, a forced cut lies in the middle
  of the quietest frame of the search window before the last voiced frame;
- **Flush**: an open segment ends at its tail or the flush point, a commit
  keeps the candidates the contract names (``candidate_start``), nothing is
  open after it and a second flush emits nothing; ``horizon`` never goes
  back and no event names a sample before it.

The session's requests are held against its module doc and docs/config.md
(``[stream]``): one final per segment, ids one up, with the segment's span,
audio and forced flag; partials only of the open segment, of all its audio
so far, at the documented cadence (``partial_interval_ms`` of new audio,
``min_partial_ms``, one in flight, the pause partial at ``held_end``), the
final reusing the pause partial that decoded exactly its audio (not one
that failed, was refused or came before a language switch), the stats
counting all of it. 200 examples of 30 steps take about 6 s.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import webrtcvad
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from evoxtral_stream.audio.resample import int16_to_float32
from evoxtral_stream.audio.vad import HELD_GAP_S, Segmenter, SegmenterState
from evoxtral_stream.config import StreamConfig, VadConfig, load_config
from evoxtral_stream.engine.session import StreamSession
from evoxtral_stream.events import (
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
from tests.helpers.audio import buzz, noise, norm, to_int16
from tests.speech import have_espeak, speak

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed")

SENTENCES = ("The quick brown fox jumps over the lazy dog.",
             "Paper please, and help me carry these boxes upstairs.",
             "Yes.")
MAX_PUSH = 2 * SAMPLE_RATE
# A push: which clip (seed), where in it, how long, cut in which chunk sizes (cycled).
Piece = tuple[int, float, int, list[int]]
PIECE: st.SearchStrategy[Piece] = st.tuples(
    st.integers(0, 2),
    st.floats(0.0, 1.0),
    st.one_of(st.integers(1, 2000), st.integers(2000, 2 * MAX_PUSH)),
    st.lists(st.sampled_from([1, 7, 159, 239, 479, 480, 481, 961, 1441, 4001]),
             min_size=1, max_size=4),
)


@functools.cache
def clip(kind: str, seed: int) -> Int16Array:
    """One source of audio, made once per process: pushes take slices of it."""
    if kind == "speech":
        return speak(SENTENCES[seed % len(SENTENCES)])
    if kind == "clipped":  # speech driven far past full scale
        s = speak(SENTENCES[seed % len(SENTENCES)]).astype(np.float64)
        return np.clip(s * (4 + 8 * seed), -32768, 32767).astype(np.int16)
    if kind == "buzz":
        return to_int16(buzz(1.5, f0=110.0 + 40 * seed))
    if kind == "floor":
        return to_int16(noise(4.0, level=0.002, seed=seed))
    if kind == "burst":
        rng = np.random.default_rng(seed)
        return to_int16(rng.uniform(-0.9, 0.9, MAX_PUSH))
    assert kind == "silence"
    return np.zeros(2 * MAX_PUSH, np.int16)


def energy(frame: Int16Array) -> float:
    """Mean square, as the contract's "quietest frame" means it."""
    f = frame.astype(np.float64)
    return float(np.dot(f, f)) / len(frame)


@dataclass
class Seg:
    """A segment seen in the shadow's events."""

    index: int
    start: int
    delivered: int
    end: int | None = None
    forced: bool = False
    redeliver_to: int | None = None   # a forced cut's audio past the cut, owed first
    final: DecodeRequest | None = None
    partials: list[DecodeRequest] = field(default_factory=list)
    bad_partials: set[int] = field(default_factory=set)  # failed or refused revisions
    last_partial_len: int = 0
    answered: bool = False            # its final came back


@dataclass
class Cand:
    """A candidate the shadow opened: its start, first and last voiced frame."""

    start: int
    onset: int
    last_voiced_end: int
    ended: bool = False


class VadMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.all: Int16Array = np.zeros(0, np.int16)  # every sample fed
        self.fed = 0

    # --- setup ------------------------------------------------------------------

    @initialize(
        aggressiveness=st.integers(0, 3),
        frame_ms=st.sampled_from([10, 20, 30]),
        start_window_ms=st.sampled_from([10, 100, 300, 600, 1500]),
        start_ratio=st.sampled_from([0.0, 0.3, 0.6, 1.0]),
        end_silence_ms=st.sampled_from([30, 200, 500, 1500]),
        end_tail_ms=st.sampled_from([0, 200, 600]),
        pre_roll_ms=st.sampled_from([0, 300, 1000, 2000]),
        min_speech_ms=st.sampled_from([0, 250, 1000]),
        max_segment_s=st.sampled_from([2.0, 2.0, 3.0, 5.0]),
        split_search_s=st.sampled_from([0.1, 0.5, 1.9]),
        partial_interval_ms=st.sampled_from([0, 300, 1000]),
        min_partial_ms=st.sampled_from([0, 0, 500, 1000]),
        pause_partial=st.sampled_from([True, True, False]),
    )
    def start(self, aggressiveness: int, frame_ms: int, start_window_ms: int,
              start_ratio: float, end_silence_ms: int, end_tail_ms: int, pre_roll_ms: int,
              min_speech_ms: int, max_segment_s: float, split_search_s: float,
              partial_interval_ms: int, min_partial_ms: int, pause_partial: bool) -> None:
        self.cfg = VadConfig(
            aggressiveness=aggressiveness, frame_ms=frame_ms,
            start_window_ms=start_window_ms, start_ratio=start_ratio,
            end_silence_ms=end_silence_ms, end_tail_ms=end_tail_ms, pre_roll_ms=pre_roll_ms,
            min_speech_ms=min_speech_ms, max_segment_s=max_segment_s,
            split_search_s=split_search_s)
        base = load_config().stream
        self.scfg = StreamConfig(
            partial_interval_ms=partial_interval_ms, min_partial_ms=min_partial_ms,
            final_replaces_stable=base.final_replaces_stable, prefix_reuse=base.prefix_reuse,
            draft=base.draft, pause_partial=pause_partial)
        self.main = Segmenter(self.cfg)
        self.shadow = Segmenter(self.cfg)
        self.session = StreamSession("s", self.cfg, self.scfg)
        self.oracle = webrtcvad.Vad(aggressiveness)
        # The contract's quantities, in samples and frames.
        ms = SAMPLE_RATE // 1000
        self.F = frame_ms * ms
        self.W = max(1, round(start_window_ms / frame_ms))
        self.start_voiced = max(1, math.ceil(start_ratio * self.W - 1e-9))
        self.end_frames = max(1, math.ceil(end_silence_ms / frame_ms))
        self.min_frames = math.ceil(min_speech_ms / frame_ms)
        self.pre_roll = pre_roll_ms * ms
        self.tail = min(end_tail_ms, end_silence_ms) * ms
        self.max_len = int(max_segment_s * SAMPLE_RATE)
        self.search = int(split_search_s * SAMPLE_RATE)
        self.held_gap = round(HELD_GAP_S * SAMPLE_RATE)
        # Events: the main segmenter's, the shadow's (checked frame by frame).
        self.main_events: list[SegmentEvent] = []
        self.shadow_events: list[SegmentEvent] = []
        self.segs: list[Seg] = []
        self.horizon = 0
        self.now = 0.0
        self.in_flight: tuple[int, int] | None = None
        self.new_epoch()

    def new_epoch(self) -> None:
        """After a flush: a fresh frame grid and history from here."""
        self.origin = self.fed
        self.frames: list[tuple[int, bool, float]] = []   # (start, voiced, energy)
        self.cleared = 0          # frames[:cleared] are outside every start window
        self.prev_end = self.origin
        self.cands: list[Cand] = []   # since the last segment opened or flush
        self.framed = self.origin     # the shadow's frame grid position

    # --- audio ------------------------------------------------------------------------

    def audio(self, a: int, b: int) -> Int16Array:
        return self.all[a:b]

    @rule(kind=st.sampled_from(["speech", "speech", "clipped", "buzz"]), piece=PIECE)
    def speak(self, kind: str, piece: Piece) -> None:
        self.push(kind, *piece)

    @rule(kind=st.sampled_from(["silence", "floor", "floor", "burst"]), piece=PIECE)
    def pause(self, kind: str, piece: Piece) -> None:
        self.push(kind, *piece)

    def push(self, kind: str, seed: int, where: float, length: int,
             chunks: list[int]) -> None:
        """A slice of ``kind``'s clip, fed in ``chunks`` (cycled)."""
        c = clip(kind, seed)
        if kind == "burst":
            length = min(length, SAMPLE_RATE // 3)
        length = min(length, len(c))
        at = int(where * (len(c) - length))
        piece = c[at : at + length].copy()
        if sum(chunks) < 400:
            chunks = [*chunks, 4001]  # 1-sample pushes only among larger ones (speed)
        self.all = np.concatenate((self.all, piece))
        self.now += 1.0
        pos, i = 0, 0
        while pos < len(piece):
            part = piece[pos : pos + chunks[i % len(chunks)]]
            events = self.main.feed(part)
            requests = self.session.push(part, now=self.now)
            self.take_main(events, len(part))
            # The events do not depend on the chunking.
            assert norm(self.shadow_feed(part)) == norm(events)
            self.check_requests(events, requests, at_flush=False)
            pos, i = pos + len(part), i + 1
        self.after_step()

    @rule(bad=st.sampled_from(["float32", "stereo", "int32"]))
    def bad_input(self, bad: str) -> None:
        """Samples that are not 1-D int16 are refused and count for nothing."""
        samples = {"float32": np.zeros(481, np.float32), "stereo": np.zeros((480, 2), np.int16),
                   "int32": np.zeros(480, np.int32)}[bad]
        with pytest.raises(ValueError, match="1-D int16"):
            self.main.feed(samples)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="1-D int16"):
            self.session.push(samples, now=self.now)  # type: ignore[arg-type]
        self.after_step()

    @precondition(lambda self: getattr(self, "fed", 0) > getattr(self, "origin", 0))
    @rule(keep=st.booleans(), finish=st.booleans())
    def flush(self, keep: bool, finish: bool) -> None:
        """A flush (end of input) or a commit (``keep_candidate``), then input may go on."""
        expect_start = self.shadow.candidate_start if keep else None
        open_before = self.shadow.in_segment
        pending = self.shadow.state is SegmenterState.PENDING
        self.now += 1.0
        events = self.main.flush(keep_candidate=keep)
        if keep or not finish:
            requests = self.session.cut(self.now, keep_candidate=keep)
        else:
            requests = self.session.finish(self.now)
        self.take_main(events)
        shadow = self.shadow.flush(keep_candidate=keep)
        self.take_shadow(shadow)
        assert norm(shadow) == norm(events)
        starts = [e for e in events if isinstance(e, SpeechStarted)]
        ends = [e for e in events if isinstance(e, SpeechEnded)]
        if open_before:
            assert not starts and len(ends) == 1
        elif expect_start is not None:
            # The kept candidates become one segment from the first one's start.
            assert [s.sample for s in starts] == [expect_start] and len(ends) == 1
        else:
            assert events == []
        if ends:
            (end,) = ends
            assert not end.forced
            # As at a natural end: the tail, or the flush point within it.
            if open_before or pending:
                last = self.last_voiced_end()
            else:
                last = max(c.last_voiced_end for c in self.cands if c.ended)
            assert end.sample == min(self.fed, last + self.tail), (end, last, self.fed)
        self.check_requests(events, requests, at_flush=True)
        # Nothing is open; nothing more comes out of a second flush.
        for seg in (self.main, self.shadow):
            assert seg.state is SegmenterState.IDLE and not seg.in_segment
            assert seg.candidate_start is None and seg.held_end is None
            assert seg.position == self.fed
        assert self.segs == [] or self.segs[-1].end is not None
        assert self.main.flush(keep_candidate=True) == []
        assert self.shadow.flush() == []
        assert self.session.cut(self.now, keep_candidate=True) == []
        self.new_epoch()
        self.after_step()

    # --- the session's results ----------------------------------------------------------

    def hyp(self, r: DecodeRequest) -> Hypothesis:
        return Hypothesis("s", r.segment, r.revision, r.kind, "x", r.start_sample,
                          r.end_sample, r.ready_at, r.ready_at)

    @rule(language=st.sampled_from([None, "en", "fr"]))
    def switch_language(self, language: str | None) -> None:
        """Requests made after the change ask for the new language; a pause
        partial made before it decoded the old one, so no final reuses it."""
        if language != self.session.language and self.segs and self.segs[-1].end is None:
            open_seg = self.segs[-1]
            if open_seg.partials:
                open_seg.bad_partials.add(open_seg.partials[-1].revision)
        self.session.language = language
        assert self.session.language == language

    @precondition(lambda self: bool(getattr(self, "segs", [])))
    @rule(data=st.data())
    def results(self, data: st.DataObject) -> None:
        """The worker answers: the partial in flight (answered, failed or
        refused), a final owed, or a stale partial (which changes nothing)."""
        owed = [s for s in self.segs if s.final is not None and not s.answered]
        kinds = ["stale"] + ["partial"] * (self.in_flight is not None) + ["final"] * bool(owed)
        kind = data.draw(st.sampled_from(kinds), label="result")
        if kind == "partial":
            assert self.in_flight is not None
            sid, rev = self.in_flight
            s = self.segs[sid]
            (r,) = [p for p in s.partials if p.revision == rev]
            assert self.session.in_flight(sid, rev)
            outcome = data.draw(st.sampled_from(["answer", "answer", "fail", "refuse"]),
                                label="outcome")
            if outcome == "answer":
                self.session.on_result(self.hyp(r))
            elif outcome == "fail":
                self.session.on_result(DecodeFailure("s", sid, rev, RequestKind.PARTIAL, "x"))
                s.bad_partials.add(rev)
            else:
                self.session.requeue_failed_submit(r)
                s.bad_partials.add(rev)
            self.in_flight = None
            assert not self.session.partial_in_flight
        elif kind == "final":
            s = data.draw(st.sampled_from(owed), label="segment")
            assert s.final is not None
            assert s.index in self.session.outstanding_segments
            self.session.on_result(self.hyp(s.final))
            s.answered = True
            assert s.index not in self.session.outstanding_segments
        else:
            s = data.draw(st.sampled_from(self.segs), label="segment")
            rev = data.draw(st.integers(0, 3), label="revision")
            if self.in_flight != (s.index, rev):
                self.session.on_result(Hypothesis("s", s.index, rev, RequestKind.PARTIAL,
                                                  "x", 0, 0, 0.0, 0.0))
        assert self.session.partial_in_flight == (self.in_flight is not None)

    # --- the shadow, frame by frame ------------------------------------------------------

    def shadow_feed(self, piece: Int16Array) -> list[SegmentEvent]:
        """Feed ``piece`` (the last samples fed) to the shadow cut at its
        frame grid, checking every frame; return the events."""
        pos = 0
        start = self.fed - len(piece)
        out: list[SegmentEvent] = []
        while pos < len(piece):
            n = min(len(piece) - pos, self.framed + self.F - (start + pos))
            before = self.shadow.state
            events = self.shadow.feed(piece[pos : pos + n])
            pos += n
            if start + pos < self.framed + self.F:
                assert events == []  # a partial frame waits
                continue
            frame = self.all[self.framed : self.framed + self.F]
            voiced = self.oracle.is_speech(frame.tobytes(), SAMPLE_RATE)
            self.frames.append((self.framed, voiced, energy(frame)))
            self.framed += self.F
            self.check_frame(before, events)
            out += events
        return out

    def last_voiced_end(self) -> int:
        return next((s + self.F for s, v, _ in reversed(self.frames) if v), self.origin)

    def trailing_unvoiced(self) -> int:
        n = 0
        for _, v, _ in reversed(self.frames):
            if v:
                break
            n += 1
        return n

    def check_frame(self, before: SegmenterState, events: list[SegmentEvent]) -> None:
        """The contracts at one frame: the shadow's state before and after it,
        the events it caused, and what the oracle says of the frames."""
        end = self.framed
        k = len(self.frames) - 1
        voiced = self.frames[k][1]
        after = self.shadow.state
        first = max(self.cleared, k + 1 - self.W)
        window = [v for _, v, _ in self.frames[first:]]
        cur = self.segs[-1] if self.segs and self.segs[-1].end is None else None
        self.take_shadow(events)
        fresh = [e for e in events if isinstance(e, SpeechStarted)][: 1 if cur is None else 0]
        ends = [e for e in events if isinstance(e, SpeechEnded)]
        run = self.trailing_unvoiced()
        last_voiced = self.last_voiced_end()

        # Start: a candidate opens on exactly the voiced frame whose window
        # (since the last end or flush) meets the ratio, at the window's first
        # voiced frame less the pre-roll, clamped.
        if before is SegmenterState.IDLE:
            opened = after is not SegmenterState.IDLE or bool(fresh)
            assert opened == (voiced and sum(window) >= self.start_voiced), (after, window)
            if opened:
                onset = next(s for s, v, _ in self.frames[first:] if v)
                start = max(onset - self.pre_roll, self.prev_end, self.origin,
                            end + self.F - self.max_len)
                if self.cands and start - self.cands[-1].last_voiced_end > self.held_gap:
                    self.cands.clear()  # too far before this one to be one utterance
                # Its start shows at its confirmation or in candidate_start (below).
                self.cands.append(Cand(start, onset, end))

        # Minimum length: confirmed once it holds min_speech_ms of voiced
        # frames from its onset (or reaches the maximum), not before.
        if before is not SegmenterState.ACTIVE and self.cands and not self.cands[-1].ended:
            c = self.cands[-1]
            if after is SegmenterState.PENDING or fresh:
                c.last_voiced_end = last_voiced
                held = sum(1 for s, v, _ in self.frames if v and s >= c.onset)
                reached = held >= self.min_frames or end - c.start + self.F > self.max_len
                assert bool(fresh) == reached, (held, c, end)
                if fresh:
                    assert fresh[0].sample == c.start
                    self.cands.clear()

        # End: after end_silence_ms of unvoiced frames, at the last voiced frame + tail.
        if after is not SegmenterState.IDLE:
            assert run < self.end_frames, run
        if before is SegmenterState.PENDING and after is SegmenterState.IDLE and not fresh:
            assert run >= self.end_frames and not events
            c = self.cands[-1]
            c.ended, c.last_voiced_end = True, last_voiced
        natural = [e for e in ends if not e.forced]
        if natural:
            (e,) = natural
            assert after is SegmenterState.IDLE
            opened_at = self.segs[-1].start if cur is None else cur.start
            if run >= self.end_frames:
                assert e.sample == last_voiced + self.tail
            else:
                # The split found no frame to cut at: ends as at a natural end.
                assert end - opened_at + self.F > self.max_len
                assert self.split_frames(opened_at, last_voiced) == [], (
                    "a forced split fell back to a natural end with a frame to cut at")
                assert e.sample == min(end, last_voiced + self.tail)
            self.prev_end = e.sample
        elif before is SegmenterState.ACTIVE:
            assert after is SegmenterState.ACTIVE

        # Maximum length: cut in the middle of the quietest frame of the
        # search window before the last voiced frame.
        forced = [e for e in ends if e.forced]
        if forced:
            (e,) = forced
            opened_at = self.segs[-2].start
            assert after is SegmenterState.ACTIVE
            assert end - opened_at + self.F > self.max_len
            frames = self.split_frames(opened_at, last_voiced)
            assert frames, "a forced cut with no frame to cut at"
            quietest = min(en for _, en in frames)
            assert e.sample in [s + self.F // 2 for s, en in frames if en == quietest], e
            self.prev_end = e.sample
        if after is SegmenterState.ACTIVE:
            seg = self.segs[-1]
            assert seg.end is None
            assert end - seg.start + self.F <= self.max_len
            # Audio: everything up to the last voiced frame + tail, nothing after it.
            assert seg.delivered == min(end, last_voiced + self.tail), (
                seg.delivered, end, last_voiced)
        if after is SegmenterState.IDLE and (before is not SegmenterState.IDLE or fresh):
            self.cleared = k + 1  # only frames after this end may start the next

        # Kept candidates: forgotten once a segment with them would pass the maximum.
        while self.cands and self.cands[0].ended and (
                end + self.F - self.cands[0].start > self.max_len):
            self.cands.pop(0)
        kept = [c for c in self.cands if c.ended or after is SegmenterState.PENDING]
        want_cand = kept[0].start if kept and after is not SegmenterState.ACTIVE else None
        assert self.shadow.candidate_start == want_cand, (self.shadow.candidate_start, kept)

    def split_frames(self, seg_start: int, last_voiced: int) -> list[tuple[int, float]]:
        """The whole frames a forced cut may take: in the search window, before
        the last voiced frame."""
        lo = max(seg_start, self.framed - self.search)
        return [(s, en) for s, _, en in self.frames if lo <= s < last_voiced - self.F]

    # --- events -------------------------------------------------------------------------

    def take_main(self, events: list[SegmentEvent], fed: int = 0) -> None:
        self.fed += fed
        for e in events:
            named = e.start_sample if isinstance(e, SpeechAudio) else e.sample
            assert named >= self.horizon, (e, self.horizon)
            assert named <= self.fed
        self.main_events += events

    def take_shadow(self, events: list[SegmentEvent]) -> None:
        """The grammar, each segment's audio the samples fed there, no overlap."""
        for e in events:
            cur = self.segs[-1] if self.segs and self.segs[-1].end is None else None
            if isinstance(e, SpeechStarted):
                assert cur is None, e
                last = self.segs[-1] if self.segs else None
                if last is not None:
                    assert e.sample >= last.end  # type: ignore[operator]
                    if last.forced:  # the continuation starts at the cut
                        assert e.sample == last.end
                assert e.sample >= self.origin
                self.segs.append(Seg(len(self.segs), e.sample, e.sample))
            elif isinstance(e, SpeechAudio):
                assert cur is not None, e
                assert e.start_sample == cur.delivered and len(e.samples) > 0
                assert e.samples.dtype == np.int16
                assert np.array_equal(e.samples, self.audio(e.start_sample, e.end_sample))
                cur.delivered = e.end_sample
                prev = self.segs[-2] if len(self.segs) > 1 else None
                if prev is not None and prev.redeliver_to is not None:
                    assert e.end_sample == prev.redeliver_to  # the re-delivery, whole
                    prev.redeliver_to = None
            else:
                assert cur is not None, e
                prev = self.segs[-2] if len(self.segs) > 1 else None
                assert prev is None or prev.redeliver_to is None, "re-delivery missing"
                assert cur.start < e.sample <= cur.delivered
                assert e.sample - cur.start <= self.max_len
                if not e.forced:
                    assert e.sample == cur.delivered
                elif cur.delivered > e.sample:
                    cur.redeliver_to = cur.delivered
                cur.end, cur.forced = e.sample, e.forced
        self.shadow_events += events

    def after_step(self) -> None:
        # The events do not depend on the chunking.
        assert norm(self.main_events) == norm(self.shadow_events)
        assert self.main.position == self.shadow.position == self.fed
        assert self.session.position == self.fed
        assert self.main.state is self.shadow.state
        # held_end: where a pause under way would end the open segment.
        open_seg = self.segs[-1] if self.segs and self.segs[-1].end is None else None
        held = None
        if open_seg is not None and self.trailing_unvoiced():
            h = self.last_voiced_end() + self.tail
            held = h if self.framed >= h else None
            if held is not None:
                assert open_seg.delivered == held
        assert self.main.held_end == self.shadow.held_end == held
        stats = self.session.stats()
        assert (stats.samples_in, stats.segments) == (self.fed, len(self.segs))
        assert stats.partials_requested == sum(len(s.partials) for s in self.segs)
        assert stats.finals_requested == sum(s.final is not None for s in self.segs)
        assert stats.finals_outstanding == self.session.finals_outstanding == sum(
            s.final is not None and not s.answered for s in self.segs)
        horizon = self.main.horizon
        assert self.horizon <= horizon <= self.fed
        self.horizon = horizon

    # --- the session ------------------------------------------------------------------------

    def check_requests(self, events: list[SegmentEvent], requests: list[DecodeRequest],
                       *, at_flush: bool) -> None:
        """One final per segment ended by ``events``, in order, then at most
        one partial, at the documented cadence."""
        ended = [e for e in events if isinstance(e, SpeechEnded)]
        finals, partials = requests[: len(ended)], requests[len(ended) :]
        assert all(r.kind is RequestKind.FINAL for r in finals)
        assert [r.kind for r in partials] in ([], [RequestKind.PARTIAL])
        assert len(finals) == len(ended)
        closed = [s for s in self.segs if s.end is not None and s.final is None]
        assert [s.index for s in closed] == [r.segment for r in finals]
        for s, r in zip(closed, finals, strict=True):
            assert s.end is not None
            assert (r.start_sample, r.end_sample, r.forced_end) == (s.start, s.end, s.forced)
            assert np.array_equal(r.audio, int16_to_float32(self.audio(s.start, s.end)))
            assert r.stream == "s" and r.ready_at == self.now
            assert r.language == self.session.language and r.adapter is None
            assert all(p.revision < r.revision for p in s.partials)
            # The final reuses the pause partial that decoded exactly its audio.
            p = s.partials[-1] if s.partials else None
            reuse = (p.revision if p is not None and p.at_pause and p.end_sample == r.end_sample
                     and p.revision not in s.bad_partials else None)
            assert r.reuse == reuse, (r.reuse, reuse)
            if reuse is None and self.in_flight is not None and self.in_flight[0] == s.index:
                self.in_flight = None  # the final supersedes it
            s.final = r
        owed = sorted(s.index for s in self.segs if s.final is not None and not s.answered)
        assert list(self.session.outstanding_segments) == owed
        open_seg = self.segs[-1] if self.segs and self.segs[-1].end is None else None
        if at_flush:
            assert partials == []
            assert self.session.partial_in_flight == (self.in_flight is not None)
            return
        want = False
        if open_seg is not None and self.scfg.partial_interval_ms > 0 and self.in_flight is None:
            length = open_seg.delivered - open_seg.start
            at_pause = self.scfg.pause_partial and self.main.held_end == open_seg.delivered
            interval = self.scfg.partial_interval_ms * SAMPLE_RATE // 1000
            want = (length >= self.scfg.min_partial_ms * SAMPLE_RATE // 1000
                    and length != open_seg.last_partial_len
                    and (at_pause or length - open_seg.last_partial_len >= interval))
        assert bool(partials) == want, (partials, open_seg)
        if partials:
            (r,) = partials
            assert open_seg is not None
            assert (r.segment, r.start_sample, r.end_sample) == (
                open_seg.index, open_seg.start, open_seg.delivered)
            assert r.at_pause == at_pause and r.reuse is None and not r.forced_end
            assert r.language == self.session.language and r.ready_at == self.now
            assert np.array_equal(r.audio, int16_to_float32(
                self.audio(open_seg.start, open_seg.delivered)))
            revs = [p.revision for p in open_seg.partials]
            assert r.revision == (revs[-1] if revs else 0) + 1
            open_seg.partials.append(r)
            open_seg.last_partial_len = open_seg.delivered - open_seg.start
            self.in_flight = (r.segment, r.revision)
        assert self.session.partial_in_flight == (self.in_flight is not None)

    def teardown(self) -> None:
        # After a failed step the end's checks would report the same fault again.
        if hasattr(self, "main") and sys.exc_info()[0] is None:
            self.flush(keep=False, finish=True)


VadMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_segmenter_and_session_contracts = VadMachine.TestCase
