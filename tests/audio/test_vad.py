"""Segmenter: exact state-machine behaviour with a deterministic energy
classifier, then webrtcvad on synthetic and espeak-ng speech, then
chunking-invariance properties."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evoxtral_stream.audio.vad import HELD_GAP_S, Segmenter, SegmenterState
from evoxtral_stream.config import VadConfig
from evoxtral_stream.events import (
    SAMPLE_RATE,
    Int16Array,
    SegmentEvent,
    SpeechAudio,
    SpeechEnded,
    SpeechStarted,
)
from tests.audio.conftest import Speech, needs_espeak
from tests.helpers.audio import (
    buzz,
    collect_segments,
    frame_energies,
    noise,
    norm,
    rms,
    sine,
    spans,
    to_int16,
    voiced_span,
)
from tests.speech import have_espeak, speak

F = 480  # 30 ms frames at 16 kHz (the default vad.frame_ms)
MS = SAMPLE_RATE // 1000


def loud(frame: Int16Array) -> bool:
    """Deterministic stand-in for webrtcvad: voiced iff RMS above ~100."""
    f = frame.astype(np.float64)
    return float(np.mean(f * f)) > 1e4


def frames_signal(n_frames: int, voiced: Sequence[tuple[int, int]], amp: float = 0.3
                  ) -> Int16Array:
    """Digital silence with a 440 Hz tone over each frame range [a, b)."""
    x = np.zeros(n_frames * F)
    for a, b in voiced:
        x[a * F : b * F] = sine(440, (b - a) * F / SAMPLE_RATE, amp=amp)
    return to_int16(x)


def run(seg: Segmenter, audio: Int16Array, chunks: Sequence[int] | None = None, *,
        keep: bool = False) -> list[SegmentEvent]:
    """Feed ``audio`` whole or cut by cycling ``chunks``, then flush
    (``keep``: as a commit, ``flush(keep_candidate=True)``)."""
    events: list[SegmentEvent] = []
    if not chunks:
        events += seg.feed(audio)
    else:
        pos, i = 0, 0
        while pos < len(audio):
            n = chunks[i % len(chunks)]
            events += seg.feed(audio[pos : pos + n])
            pos += n
            i += 1
    events += seg.flush(keep_candidate=keep)
    return events


# --- exact behaviour (energy classifier, default config) ----------------------------


def test_default_config_frames_match_these_tests(vad_cfg: VadConfig) -> None:
    # The exact expectations below are worked out for these defaults.
    assert (vad_cfg.frame_ms, vad_cfg.start_window_ms, vad_cfg.start_ratio) == (30, 300, 0.6)
    assert (vad_cfg.end_silence_ms, vad_cfg.pre_roll_ms, vad_cfg.min_speech_ms) == (500, 300, 250)
    assert vad_cfg.end_tail_ms == 200


def test_one_burst_has_exact_boundaries(vad_cfg: VadConfig) -> None:
    audio = frames_signal(200, [(50, 100)])
    segs = collect_segments(run(Segmenter(vad_cfg, classifier=loud), audio), audio)
    # start = onset - 300 ms pre-roll; end = last voiced frame + 200 ms tail.
    assert spans(segs) == [(50 * F - 300 * MS, 100 * F + 200 * MS)]
    assert not segs[0].forced


def test_speech_started_waits_for_min_speech(vad_cfg: VadConfig) -> None:
    audio = frames_signal(200, [(50, 100)])
    seg = Segmenter(vad_cfg, classifier=loud)
    first_start = None
    for i in range(200):
        evs = seg.feed(audio[i * F : (i + 1) * F])
        if any(isinstance(e, SpeechStarted) for e in evs):
            first_start = i
            # Everything from the pre-roll on arrives with the start.
            audio_evs = [e for e in evs if isinstance(e, SpeechAudio)]
            assert audio_evs[0].start_sample == 50 * F - 300 * MS
            assert audio_evs[-1].end_sample == (i + 1) * F
            break
        assert seg.state is not SegmenterState.ACTIVE
    # 250 ms of voiced 30 ms frames = 9 frames: the 9th voiced frame is frame 58.
    assert first_start == 58


@pytest.mark.parametrize(("voiced_frames", "expect"), [(8, 0), (9, 1)])
def test_blips_shorter_than_min_speech_emit_nothing(
    vad_cfg: VadConfig, voiced_frames: int, expect: int
) -> None:
    audio = frames_signal(120, [(40, 40 + voiced_frames)])
    events = run(Segmenter(vad_cfg, classifier=loud), audio)
    assert len(collect_segments(events, audio)) == expect
    if expect == 0:
        assert events == []


def test_short_pause_keeps_one_segment_and_holds_back_silence(vad_cfg: VadConfig) -> None:
    audio = frames_signal(260, [(50, 100), (110, 160)])  # 300 ms pause < 500 ms hangover
    seg = Segmenter(vad_cfg, classifier=loud)
    events: list[SegmentEvent] = []
    for i in range(260):
        new = seg.feed(audio[i * F : (i + 1) * F])
        events += new
        delivered = max((e.end_sample for e in events if isinstance(e, SpeechAudio)), default=0)
        if 100 <= i < 110:
            # During the pause, nothing past last voiced frame + tail is delivered.
            assert delivered <= 100 * F + 200 * MS
        if i == 110:
            assert delivered == 111 * F  # held audio delivered once speech resumed
    events += seg.flush()
    assert spans(collect_segments(events, audio)) == [(50 * F - 300 * MS, 160 * F + 200 * MS)]


def test_long_pause_gives_two_segments(vad_cfg: VadConfig) -> None:
    audio = frames_signal(260, [(50, 100), (130, 180)])
    segs = collect_segments(run(Segmenter(vad_cfg, classifier=loud), audio), audio)
    assert spans(segs) == [
        (50 * F - 300 * MS, 100 * F + 200 * MS),
        (130 * F - 300 * MS, 180 * F + 200 * MS),
    ]


def test_segment_ends_after_end_silence(vad_cfg: VadConfig) -> None:
    audio = frames_signal(200, [(50, 100)])
    seg = Segmenter(vad_cfg, classifier=loud)
    seg.feed(audio[: 116 * F])
    assert seg.in_segment  # 16 unvoiced frames = 480 ms < 500 ms
    evs = seg.feed(audio[116 * F : 117 * F])
    assert evs[-1] == SpeechEnded(100 * F + 200 * MS, forced=False)
    assert not seg.in_segment


def test_pre_roll_clamped_at_stream_start(vad_cfg: VadConfig) -> None:
    audio = frames_signal(100, [(3, 40)])
    segs = collect_segments(run(Segmenter(vad_cfg, classifier=loud), audio), audio)
    assert spans(segs) == [(0, 40 * F + 200 * MS)]


def test_pre_roll_clamped_at_previous_segment_end(vad_cfg: VadConfig) -> None:
    cfg = dataclasses.replace(vad_cfg, pre_roll_ms=600)
    # The first segment ends on frame 116; the second burst starts 2 frames later.
    audio = frames_signal(220, [(50, 100), (118, 160)])
    segs = collect_segments(run(Segmenter(cfg, classifier=loud), audio), audio)
    first_end = 100 * F + 200 * MS
    assert spans(segs) == [(50 * F - 600 * MS, first_end), (first_end, 160 * F + 200 * MS)]


def test_start_ratio_smoothing(vad_cfg: VadConfig) -> None:
    # Alternating voiced/unvoiced frames: 5 of every 10 voiced < 60 %: no speech.
    alternating = [(i, i + 1) for i in range(20, 120, 2)]
    audio = frames_signal(150, alternating)
    assert run(Segmenter(vad_cfg, classifier=loud), audio) == []
    # Two of every three voiced (>= 60 %): speech, starting at the first voiced frame.
    dense = [(i, i + 2) for i in range(20, 120, 3)]
    audio = frames_signal(150, dense)
    segs = collect_segments(run(Segmenter(vad_cfg, classifier=loud), audio), audio)
    assert [s.start for s in segs] == [20 * F - 300 * MS]


def test_flush_closes_open_segment_and_drops_pending(vad_cfg: VadConfig) -> None:
    audio = frames_signal(100, [(50, 100)])
    audio = np.concatenate((audio, audio[-100:]))  # a partial frame at the end
    seg = Segmenter(vad_cfg, classifier=loud)
    events = seg.feed(audio)
    assert seg.in_segment
    tail = seg.flush()
    # Flushed mid-speech, the segment ends where the input stands: the partial
    # frame (too short to classify) is inside the end tail.
    assert tail[-1] == SpeechEnded(len(audio), forced=False)
    assert spans(collect_segments(events + tail, audio)) == [(50 * F - 300 * MS, len(audio))]
    assert seg.position == len(audio)
    assert seg.state is SegmenterState.IDLE

    # Past the end tail, the partial frame is not the segment's.
    quiet = np.concatenate((frames_signal(110, [(50, 100)]), np.zeros(100, np.int16)))
    seg = Segmenter(vad_cfg, classifier=loud)
    events = seg.feed(quiet)
    assert seg.in_segment  # 10 unvoiced frames: below end_silence_ms, past the tail
    end = 100 * F + min(vad_cfg.end_tail_ms, vad_cfg.end_silence_ms) * MS
    assert seg.flush()[-1] == SpeechEnded(end, forced=False)
    assert seg.position == len(quiet)

    pending = frames_signal(100, [(93, 100)])  # 7 voiced frames: triggered, unconfirmed
    seg = Segmenter(vad_cfg, classifier=loud)
    assert seg.feed(pending) == []
    assert seg.state is SegmenterState.PENDING
    assert seg.candidate_start == 93 * F - 300 * MS  # pre-roll included
    assert seg.flush() == []
    assert seg.candidate_start is None


def test_an_explicit_cut_keeps_a_candidate_shorter_than_min_speech(vad_cfg: VadConfig) -> None:
    """``flush(keep_candidate=True)`` (a client's commit: "this is an
    utterance") makes the unconfirmed candidate a segment; a plain flush
    (end of input) still drops it as a click."""
    pending = frames_signal(100, [(93, 100)])  # 7 voiced frames: triggered, unconfirmed
    pending = np.concatenate((pending, pending[-100:]))  # and a partial frame
    seg = Segmenter(vad_cfg, classifier=loud)
    assert seg.feed(pending) == []
    assert seg.state is SegmenterState.PENDING
    events = seg.flush(keep_candidate=True)
    # As at a natural end: pre-roll to the input's end (inside the end tail).
    assert spans(collect_segments(events, pending)) == [(93 * F - 300 * MS, len(pending))]
    assert events[-1] == SpeechEnded(len(pending), forced=False)
    assert seg.candidate_start is None and not seg.in_segment
    assert seg.position == len(pending)

    # In the candidate's pause: it ends at its last voiced frame + the end tail.
    paused = frames_signal(100, [(80, 87)])  # 13 unvoiced frames: below end_silence_ms
    seg = Segmenter(vad_cfg, classifier=loud)
    assert seg.feed(paused) == []
    assert seg.state is SegmenterState.PENDING
    events = seg.flush(keep_candidate=True)
    assert spans(collect_segments(events, paused)) == [(80 * F - 300 * MS, 87 * F + 200 * MS)]

    # Nothing else changes: an open segment closes as at a plain flush, and
    # with nothing detected there is nothing to keep.
    audio = frames_signal(100, [(50, 100)])
    plain, explicit = Segmenter(vad_cfg, classifier=loud), Segmenter(vad_cfg, classifier=loud)
    assert norm(plain.feed(audio) + plain.flush()) == \
        norm(explicit.feed(audio) + explicit.flush(keep_candidate=True))
    seg = Segmenter(vad_cfg, classifier=loud)
    seg.feed(frames_signal(100, [(95, 100)]))  # 5 voiced frames: below the start ratio
    assert seg.state is SegmenterState.IDLE
    assert seg.flush(keep_candidate=True) == []


def test_an_explicit_cut_keeps_short_speech_that_ended_before_it(vad_cfg: VadConfig) -> None:
    """Push-to-talk: a short "Yes", then more than ``end_silence_ms`` of
    silence, then the commit. The candidate ended unconfirmed, but no
    segment came after it: ``flush(keep_candidate=True)`` makes it one, as
    it would have been (pre-roll to last voiced frame + tail)."""
    audio = frames_signal(100, [(40, 47)])  # 7 voiced frames, then 53 unvoiced
    seg = Segmenter(vad_cfg, classifier=loud)
    assert seg.feed(audio) == []
    assert seg.state is SegmenterState.IDLE
    assert seg.candidate_start == 40 * F - 300 * MS
    events = seg.flush(keep_candidate=True)
    assert spans(collect_segments(events, audio)) == [(40 * F - 300 * MS, 47 * F + 200 * MS)]
    assert events[-1] == SpeechEnded(47 * F + 200 * MS, forced=False)
    assert seg.candidate_start is None and seg.position == len(audio)
    # Only that flush emits it: a plain flush (end of input) drops it as a click.
    assert run(Segmenter(vad_cfg, classifier=loud), audio) == []
    # The next input starts afresh: nothing of it is kept past the flush.
    assert seg.flush(keep_candidate=True) == []

    # Several short pieces since the last segment ("Yes ... no") make one
    # segment from the first to the last, and so with a candidate under way.
    two = frames_signal(100, [(20, 27), (60, 67)])
    seg = Segmenter(vad_cfg, classifier=loud)
    assert seg.feed(two) == []
    events = seg.flush(keep_candidate=True)
    assert spans(collect_segments(events, two)) == [(20 * F - 300 * MS, 67 * F + 200 * MS)]
    under_way = frames_signal(70, [(20, 27), (63, 70)])
    seg = Segmenter(vad_cfg, classifier=loud)
    assert seg.feed(under_way) == []
    assert seg.state is SegmenterState.PENDING
    assert seg.candidate_start == 20 * F - 300 * MS
    events = seg.flush(keep_candidate=True)
    assert spans(collect_segments(events, under_way)) == [(20 * F - 300 * MS, 70 * F)]


def test_short_speech_before_a_segment_is_not_brought_back(vad_cfg: VadConfig) -> None:
    """The click filter still holds inside a dictation: a segment after the
    short speech drops it, and the cut only closes that segment."""
    for tail in (150, 250):  # the cut while the segment is open, and after its end
        audio = frames_signal(tail, [(20, 27), (60, 110)])
        plain, explicit = (Segmenter(vad_cfg, classifier=loud) for _ in range(2))
        kept = explicit.feed(audio) + explicit.flush(keep_candidate=True)
        assert norm(kept) == norm(plain.feed(audio) + plain.flush())
        assert spans(collect_segments(kept, audio)) == [(60 * F - 300 * MS, 110 * F + 200 * MS)]


def test_short_speech_far_before_the_last_is_not_joined_to_it(vad_cfg: VadConfig) -> None:
    """A cough, then seconds later a push-to-talk "Yes", then the commit:
    joined, they made one long segment of mostly silence (on which a model
    may invent words). Pieces more than HELD_GAP_S apart are not one
    utterance: only the later is kept, and so with one under way."""
    far = int(HELD_GAP_S * 1000 / 30) + 20   # frames between the two pieces
    audio = frames_signal(60 + far, [(10, 17), (17 + far, 24 + far)])
    seg = Segmenter(vad_cfg, classifier=loud)
    assert seg.feed(audio) == []
    assert seg.candidate_start == (17 + far) * F - 300 * MS
    events = seg.flush(keep_candidate=True)
    assert spans(collect_segments(events, audio)) == [
        ((17 + far) * F - 300 * MS, (24 + far) * F + 200 * MS)]
    under_way = frames_signal(24 + far, [(10, 17), (17 + far, 24 + far)])
    seg = Segmenter(vad_cfg, classifier=loud)
    assert seg.feed(under_way) == []
    assert seg.state is SegmenterState.PENDING
    assert seg.candidate_start == (17 + far) * F - 300 * MS


def test_short_speech_is_kept_for_at_most_max_segment_s(vad_cfg: VadConfig) -> None:
    """What a cut would keep fits one segment (``max_segment_s``): older
    short speech is forgotten, with its audio (bounded memory)."""
    cfg = dataclasses.replace(vad_cfg, max_segment_s=2.0, split_search_s=0.5)  # 66.7 frames
    audio = frames_signal(130, [(10, 17), (60, 67)])
    seg = Segmenter(cfg, classifier=loud)
    seg.feed(audio[: 90 * F])
    # The first piece (from frame 0) is too old to share a segment with the cut.
    assert seg.candidate_start == 60 * F - 300 * MS
    events = seg.flush(keep_candidate=True)
    assert spans(collect_segments(events, audio)) == [(60 * F - 300 * MS, 67 * F + 200 * MS)]

    seg = Segmenter(cfg, classifier=loud)
    kept = 0
    for i in range(130):
        seg.feed(audio[i * F : (i + 1) * F])
        kept = max(kept, sum(len(fr.samples) for fr in seg._frames))
    assert seg.candidate_start is None  # frame 130: the second is too old as well
    assert seg.flush(keep_candidate=True) == []
    assert kept <= 2 * SAMPLE_RATE + F


def test_input_after_flush_continues_the_sample_count(vad_cfg: VadConfig) -> None:
    audio = frames_signal(100, [(20, 60)])
    seg = Segmenter(vad_cfg, classifier=loud)
    first = collect_segments(run(seg, audio[:-7]))  # ends on a partial frame
    second = collect_segments(run(seg, audio))
    assert first[0].start == 20 * F - 300 * MS
    # Pre-roll cannot reach before the flush; positions continue.
    assert second[0].start == len(audio) - 7 + 20 * F - 300 * MS
    assert seg.position == 2 * len(audio) - 7


def test_reset_starts_over(vad_cfg: VadConfig) -> None:
    audio = to_int16(np.concatenate((noise(1.0), buzz(1.5), noise(1.0, seed=1))))
    seg = Segmenter(vad_cfg)
    a = norm(run(seg, audio))
    seg.reset()
    assert seg.position == 0
    assert norm(run(seg, audio)) == a


def test_rejects_bad_input(vad_cfg: VadConfig) -> None:
    seg = Segmenter(vad_cfg)
    with pytest.raises(ValueError, match="int16"):
        seg.feed(np.zeros(480, dtype=np.float32))
    with pytest.raises(ValueError, match="int16"):
        seg.feed(np.zeros((480, 2), dtype=np.int16))
    with pytest.raises(ValueError, match="sample rate"):
        Segmenter(vad_cfg, sample_rate=44100)
    assert seg.feed(np.zeros(0, dtype=np.int16)) == []


# --- maximum length -------------------------------------------------------------------


def split_signal(n_frames: int, dips: dict[int, float]) -> Int16Array:
    """Continuous 'speech' (per-frame random loudness) with quiet frames at ``dips``."""
    rng = np.random.default_rng(5)
    amps = rng.uniform(0.2, 0.5, n_frames)
    amps[:10] = 0.0
    amps[-30:] = 0.0
    for i, a in dips.items():
        amps[i] = a
    carrier = sine(440, n_frames * F / SAMPLE_RATE, amp=1.0)
    return to_int16(carrier * np.repeat(amps, F))


def test_forced_split_cuts_at_quietest_frame_in_search_window(vad_cfg: VadConfig) -> None:
    cfg = dataclasses.replace(vad_cfg, max_segment_s=4.0, split_search_s=1.0)
    # 0.02 at frame 60 is quieter but outside the first search window
    # (frames 100..131), so frame 120 wins there.
    audio = split_signal(430, {60: 0.02, 120: 0.05, 240: 0.05, 345: 0.05})
    events = run(Segmenter(cfg, classifier=loud), audio)
    segs = collect_segments(events, audio)
    cuts = [120 * F + F // 2, 240 * F + F // 2, 345 * F + F // 2]
    assert spans(segs) == [
        (0, cuts[0]), (cuts[0], cuts[1]), (cuts[1], cuts[2]), (cuts[2], 400 * F + 200 * MS)
    ]
    assert [s.forced for s in segs] == [True, True, True, False]
    assert all(s.end - s.start <= 4 * SAMPLE_RATE for s in segs)
    # The cut is announced when the segment would pass 4 s, then the next segment
    # re-delivers the audio already sent past the cut.
    i = events.index(SpeechEnded(cuts[0], forced=True))
    assert events[i + 1] == SpeechStarted(cuts[0])
    redelivered = events[i + 2]
    assert isinstance(redelivered, SpeechAudio)
    assert (redelivered.start_sample, redelivered.end_sample) == (cuts[0], 133 * F)


def test_split_falls_back_to_natural_end_in_a_long_pause(vad_cfg: VadConfig) -> None:
    cfg = dataclasses.replace(
        vad_cfg, max_segment_s=3.0, split_search_s=0.3, end_silence_ms=2000
    )
    audio = frames_signal(200, [(10, 44)])
    segs = collect_segments(run(Segmenter(cfg, classifier=loud), audio), audio)
    # The whole search window is silence: end where a natural end would be.
    assert [(s.start, s.end, s.forced) for s in segs] == [(0, 44 * F + 200 * MS, False)]


def test_pre_roll_and_start_window_never_make_a_segment_longer_than_the_maximum(
        vad_cfg: VadConfig) -> None:
    """With pre-roll plus start window longer than ``max_segment_s`` the
    candidate was already past the maximum when speech was detected, and the
    split (which cuts only in the last ``split_search_s``) left a first
    segment of 2.4 s under a 2 s maximum."""
    cfg = dataclasses.replace(vad_cfg, max_segment_s=2.0, split_search_s=0.3,
                              pre_roll_ms=1000, start_window_ms=1500)
    # Sparse voicing (50 % < 60 %) fills the start window, then steady speech.
    sparse = [(i, i + 1) for i in range(100, 140, 2)]
    audio = frames_signal(360, [*sparse, (140, 300)])
    segs = collect_segments(run(Segmenter(cfg, classifier=loud), audio), audio)
    assert segs and segs[-1].end == 300 * F + 200 * MS
    assert all(s.end - s.start <= 2 * SAMPLE_RATE for s in segs), spans(segs)
    # The clamp takes pre-roll only: the first segment still holds the first
    # voiced frame of the window that started it.
    assert segs[0].start <= 110 * F


# --- webrtcvad on synthetic audio ---------------------------------------------------


@pytest.mark.parametrize("kind", ["digital", "noise"])
def test_silence_gives_no_events(vad_cfg: VadConfig, kind: str) -> None:
    audio = np.zeros(10 * SAMPLE_RATE, np.int16) if kind == "digital" else to_int16(noise(10.0))
    assert run(Segmenter(vad_cfg), audio) == []


def test_buzz_bursts_found_within_tolerance(vad_cfg: VadConfig) -> None:
    x = noise(6.0, seed=3)
    bursts = [(1.0, 2.5), (4.0, 4.6)]
    for a, b in bursts:
        x[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)] += buzz(b - a)
    audio = to_int16(x)
    segs = collect_segments(run(Segmenter(vad_cfg), audio), audio)
    assert len(segs) == 2
    for s, (a, b) in zip(segs, bursts, strict=True):
        # Start: pre-roll before the onset, to within one frame.
        assert abs(s.start / SAMPLE_RATE - (a - 0.3)) <= 0.031
        # End: tail after the offset, plus up to ~150 ms webrtcvad's own hangover.
        assert 0.2 - 0.031 <= s.end / SAMPLE_RATE - b <= 0.2 + 0.15


@pytest.mark.parametrize("kind", ["buzz", "noise", "impulse"])
def test_a_click_never_meets_the_start_rule(vad_cfg: VadConfig, kind: str) -> None:
    """docs/config.md: with the defaults a 20 ms click is not even a
    candidate, so a commit (``keep_candidate``) does not make it a segment."""
    rng = np.random.default_rng(2)
    for amp in (0.05, 0.3, 0.9):
        for at in (SAMPLE_RATE, SAMPLE_RATE + 240, SAMPLE_RATE + 470):  # against the frames
            x = noise(3.0, level=0.001, seed=4)
            burst = {"buzz": buzz(0.02, amp=amp), "noise": rng.uniform(-amp, amp, 20 * MS),
                     "impulse": np.r_[amp, -amp, np.zeros(20 * MS - 2)]}[kind]
            x[at : at + 20 * MS] += burst
            audio = to_int16(x)
            seg = Segmenter(vad_cfg)
            seg.feed(audio)
            assert seg.candidate_start is None, (amp, at)
            assert seg.flush(keep_candidate=True) == []


# --- espeak-ng speech -----------------------------------------------------------------


@needs_espeak
def test_two_sentences_give_two_segments(vad_cfg: VadConfig, two_sentences: Speech) -> None:
    audio = two_sentences.audio
    segs = collect_segments(run(Segmenter(vad_cfg), audio), audio)
    assert len(segs) == 2, spans(segs)
    for s, (on, off) in zip(segs, two_sentences.spans, strict=True):
        # Nothing of the sentence is clipped, and at most pre-roll + 60 ms before
        # and tail + 200 ms after it are included.
        assert on - (300 + 60) * MS <= s.start <= on
        assert off <= s.end <= off + (200 + 200) * MS
        assert not s.forced


@needs_espeak
def test_long_utterance_is_split_at_quiet_frames(
    vad_cfg: VadConfig, long_utterance: Speech
) -> None:
    audio = long_utterance.audio
    (on, off), = long_utterance.spans
    assert (off - on) / SAMPLE_RATE > 40
    segs = collect_segments(run(Segmenter(vad_cfg), audio), audio)
    max_len = int(vad_cfg.max_segment_s * SAMPLE_RATE)
    search = int(vad_cfg.split_search_s * SAMPLE_RATE)
    assert len(segs) >= 2
    assert all(s.end - s.start <= max_len for s in segs)
    # Contiguous coverage of the whole utterance: forced cuts abut.
    assert segs[0].start <= on
    assert segs[-1].end >= off
    for a, b in itertools.pairwise(segs):
        assert a.forced
        assert a.end == b.start
    assert not segs[-1].forced
    energies = frame_energies(audio, F)
    for s in segs[:-1]:
        cut = s.end
        assert cut % F == F // 2  # the middle of a frame
        # The split happened on the frame that would have taken it past the max.
        split_at = ((s.start + max_len - F) // F + 1) * F
        lo = math.ceil((split_at - search) / F) + 1
        hi = split_at // F - 4  # the last voiced frame is among the last few
        window = energies[lo:hi]
        assert len(window) > 100
        assert energies[cut // F] <= window.min()
        assert energies[cut // F] < 0.1 * np.median(window)


# --- properties -------------------------------------------------------------------------

chunkings = st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=8)


@st.composite
def timelines(draw: st.DrawFn) -> Int16Array:
    """Alternating silence/tone runs of random (unaligned) lengths and loudness."""
    runs = draw(st.lists(st.tuples(st.integers(1, 30_000), st.integers(1, 60_000),
                                   st.floats(0.01, 0.8)), min_size=1, max_size=6))
    parts = []
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for gap, length, amp in runs:
        parts.append(np.zeros(gap))
        # Loudness varies per ~frame so the forced cut has a unique quietest frame.
        env = np.repeat(rng.uniform(0.3, 1.0, length // 400 + 1), 400)[:length]
        parts.append(amp * env * sine(300, length / SAMPLE_RATE, amp=1.0))
    return to_int16(np.concatenate(parts))


@settings(max_examples=60, deadline=None)
@given(audio=timelines(), chunks=chunkings)
def test_property_chunking_invariance_and_invariants(
    audio: Int16Array, chunks: list[int]
) -> None:
    cfg = VadConfig(
        aggressiveness=2, frame_ms=30, start_window_ms=300, start_ratio=0.6,
        end_silence_ms=500, end_tail_ms=200, pre_roll_ms=300, min_speech_ms=250,
        max_segment_s=2.0, split_search_s=0.5,
    )
    for keep in (False, True):  # end of input, and a commit
        whole = run(Segmenter(cfg, classifier=loud), audio, keep=keep)
        assert norm(run(Segmenter(cfg, classifier=loud), audio, chunks, keep=keep)) == \
            norm(whole)
        segs = collect_segments(whole, audio)  # grammar, contiguity, no overlap, content
        assert all(s.end - s.start <= 2 * SAMPLE_RATE for s in segs)


@needs_espeak
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=chunkings)
def test_property_chunking_invariance_on_speech(
    vad_cfg: VadConfig, two_sentences: Speech, chunks: list[int]
) -> None:
    audio = two_sentences.audio
    cfg = dataclasses.replace(vad_cfg, max_segment_s=2.0, split_search_s=0.5)
    whole = run(Segmenter(cfg), audio)
    assert norm(run(Segmenter(cfg), audio, chunks)) == norm(whole)
    segs = collect_segments(whole, audio)
    assert len(segs) >= 4  # two ~2.5 s sentences, each split at least once
    assert all(s.end - s.start <= 2 * SAMPLE_RATE for s in segs)


@st.composite
def vad_configs(draw: st.DrawFn) -> VadConfig:
    """Any valid ``[vad]`` table, frame lengths and odd (unaligned) durations included."""
    return VadConfig(
        aggressiveness=2, frame_ms=draw(st.sampled_from([10, 20, 30])),
        start_window_ms=draw(st.integers(10, 600)),
        start_ratio=draw(st.sampled_from([0.0, 0.3, 0.6, 1.0])),
        end_silence_ms=draw(st.integers(30, 1500)), end_tail_ms=draw(st.integers(0, 600)),
        pre_roll_ms=draw(st.integers(0, 1500)), min_speech_ms=draw(st.integers(0, 1000)),
        max_segment_s=draw(st.sampled_from([2.0, 2.5, 3.0])),
        split_search_s=draw(st.sampled_from([0.1, 0.3, 1.0, 1.9])),
    )


def run_with_flushes(cfg: VadConfig, audio: Int16Array, chunks: Sequence[int] | None,
                     flushes: Sequence[int], keeps: Sequence[bool]) -> list[SegmentEvent]:
    """Feed ``audio`` (cut by cycling ``chunks``) with a flush at each sample
    position of ``flushes`` and at the end, the n-th a commit if ``keeps``
    (cycled) says so."""
    seg = Segmenter(cfg, classifier=loud)
    events: list[SegmentEvent] = []
    pos, i = 0, 0
    for k, stop in enumerate([*flushes, len(audio)]):
        while pos < stop:
            n = min(chunks[i % len(chunks)], stop - pos) if chunks else stop - pos
            events += seg.feed(audio[pos : pos + n])
            pos, i = pos + n, i + 1
        events += seg.flush(keep_candidate=keeps[k % len(keeps)])
    return events


@settings(max_examples=80, deadline=None)
@given(cfg=vad_configs(), audio=timelines(), chunks=chunkings,
       flushes=st.lists(st.integers(1, 150_000), max_size=3),
       keeps=st.lists(st.booleans(), min_size=1, max_size=3))
def test_property_any_config_with_cuts_is_chunking_invariant_and_bounded(
    cfg: VadConfig, audio: Int16Array, chunks: list[int], flushes: list[int],
    keeps: list[bool],
) -> None:
    """Every config, with flushes and commits in between: the events do not
    depend on the chunking, no segment is longer than ``max_segment_s`` or
    spans a flush, and every run of voiced frames long enough to be speech
    by the start rule and ``min_speech_ms`` lies inside segments."""
    cuts = sorted({f for f in flushes if f < len(audio)})
    whole = run_with_flushes(cfg, audio, None, cuts, keeps)
    assert norm(run_with_flushes(cfg, audio, chunks, cuts, keeps)) == norm(whole)
    segs = collect_segments(whole, audio)
    for s in segs:
        assert s.end - s.start <= int(cfg.max_segment_s * SAMPLE_RATE)
        assert not any(s.start < c < s.end for c in cuts), (spans([s]), cuts)
    if cuts:
        return  # the frame grid moves at a flush: the voiced runs below assume none
    n = cfg.frame_ms * MS
    voiced = [loud(audio[i : i + n]) for i in range(0, len(audio) - n + 1, n)]
    window = max(1, round(cfg.start_window_ms / cfg.frame_ms))
    need = max(1, math.ceil(cfg.start_ratio * window - 1e-9),
               math.ceil(cfg.min_speech_ms / cfg.frame_ms))
    covered = np.zeros(len(audio), dtype=bool)
    for s in segs:
        covered[s.start : s.end] = True
    for is_voiced, group in itertools.groupby(enumerate(voiced), key=lambda iv: iv[1]):
        frames = [i for i, _ in group]
        if is_voiced and len(frames) >= need:
            assert covered[frames[0] * n : (frames[-1] + 1) * n].all(), (frames, spans(segs))


@settings(max_examples=80, deadline=None)
@given(cfg=vad_configs(), audio=timelines(), chunks=chunkings,
       flushes=st.lists(st.integers(1, 150_000), max_size=3),
       keeps=st.lists(st.booleans(), min_size=1, max_size=3))
def test_property_no_event_names_a_sample_before_the_horizon(
    cfg: VadConfig, audio: Int16Array, chunks: list[int], flushes: list[int],
    keeps: list[bool],
) -> None:
    """``horizon`` never decreases, and no event after it was read names a
    sample before it (a segment's start or end, its audio's start): what a
    caller may forget of its own map of positions (the realtime session's
    client time)."""
    seg = Segmenter(cfg, classifier=loud)
    cuts = sorted({f for f in flushes if f < len(audio)})
    horizon = seg.horizon
    pos, i = 0, 0
    for k, stop in enumerate([*cuts, len(audio)]):
        while pos <= stop:
            n = min(chunks[i % len(chunks)], stop - pos)
            if n:
                events = seg.feed(audio[pos : pos + n])
            else:
                events = seg.flush(keep_candidate=keeps[k % len(keeps)])
            for e in events:
                named = e.start_sample if isinstance(e, SpeechAudio) else e.sample
                assert named >= horizon, (e, horizon)
            assert seg.horizon >= horizon
            assert seg.horizon <= seg.position
            horizon = seg.horizon
            pos, i = pos + n, i + 1
            if not n:
                break


def pink_noise(n: int, seed: int) -> np.ndarray:
    """Unit-RMS 1/f noise."""
    spectrum = np.fft.rfft(np.random.default_rng(seed).normal(size=n))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
    x = np.fft.irfft(spectrum, n)
    return np.asarray(x / np.sqrt(np.mean(x * x)))


@pytest.fixture(scope="module")
def words_in_pink_noise() -> Speech:
    """A plosive onset ("Paper please.") and a soft /h/ ("Help me."), 1.5 s
    apart, in pink noise 20 dB below the speech."""
    if not have_espeak():
        pytest.skip("espeak-ng is not installed")
    parts: list[np.ndarray] = [np.zeros(SAMPLE_RATE)]
    where: list[tuple[int, int]] = []
    pos = SAMPLE_RATE
    for text in ("Paper please.", "Help me."):
        s = speak(text)
        on, off = voiced_span(s, threshold=100)
        where.append((pos, pos + off - on))
        parts += [s[on:off].astype(np.float64), np.zeros(3 * SAMPLE_RATE // 2)]
        pos += off - on + 3 * SAMPLE_RATE // 2
    clean = np.concatenate(parts)
    level = rms(np.concatenate(parts[1::2]))
    return Speech(to_int16((clean + pink_noise(len(clean), 3) * level / 10) / 32767), where)


@needs_espeak
@pytest.mark.parametrize("aggressiveness", [0, 1, 2, 3])
@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_every_frame_length_and_aggressiveness_keeps_whole_words_in_noise(
    vad_cfg: VadConfig, words_in_pink_noise: Speech, frame_ms: int, aggressiveness: int
) -> None:
    """Each word is one segment holding it whole, its first and last sounds
    (the "P", the "h", the trailing "s") with at least 150 ms to spare, and
    pushing the audio 1, 159, 161 or 4000 samples at a time changes nothing."""
    cfg = dataclasses.replace(vad_cfg, frame_ms=frame_ms, aggressiveness=aggressiveness)
    audio = words_in_pink_noise.audio
    whole = run(Segmenter(cfg), audio)
    segs = collect_segments(whole, audio)
    assert len(segs) == 2, spans(segs)
    for s, (on, off) in zip(segs, words_in_pink_noise.spans, strict=True):
        assert s.start <= on - 150 * MS and s.end >= off + 150 * MS, (spans([s]), on, off)
        assert not s.forced
    for chunks in ([1], [159], [161], [4000]):
        assert norm(run(Segmenter(cfg), audio, chunks)) == norm(whole), chunks


def test_held_end_is_where_a_pause_would_end_the_segment() -> None:
    from evoxtral_stream.config import load_config
    from evoxtral_stream.events import SpeechAudio, SpeechEnded

    cfg = load_config().vad
    frame = cfg.frame_ms * 16
    voiced = np.full(frame, 3000, np.int16)
    silent = np.zeros(frame, np.int16)
    seg = Segmenter(cfg, 16000, classifier=lambda f: bool(np.abs(f).max() > 0))
    speech = np.concatenate([voiced] * 40)
    events = seg.feed(speech)
    assert seg.in_segment and seg.held_end is None
    tail = round(cfg.end_tail_ms * 16)
    held: list[int | None] = []
    for _ in range(-(-tail // frame) + 2):
        events += seg.feed(silent)
        held.append(seg.held_end)
    assert held[0] is None  # within the end tail
    assert held[-1] == len(speech) + tail
    # Everything up to there was delivered, nothing after it.
    delivered = sum(len(e.samples) for e in events if isinstance(e, SpeechAudio))
    assert delivered == len(speech) + tail
    # Speech again: no longer held; then a real end lands where held_end said.
    events = seg.feed(voiced)
    assert seg.held_end is None
    last_held = None
    while not any(isinstance(e, SpeechEnded) for e in events):
        last_held = seg.held_end or last_held
        events = seg.feed(silent)
    (end,) = [e for e in events if isinstance(e, SpeechEnded)]
    assert end.sample == last_held
    assert seg.held_end is None  # no segment open
