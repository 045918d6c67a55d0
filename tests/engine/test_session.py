"""StreamSession: partial cadence in audio time, finals, one partial in flight."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from evoxtral_stream.audio.vad import Segmenter, SegmenterState
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.session import StreamSession
from evoxtral_stream.events import SAMPLE_RATE, DecodeRequest, Hypothesis, RequestKind
from tests.speech import clipped_speech, have_espeak, speech_with_pauses

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")

SENTENCES = ["I was thinking maybe we could try that new restaurant downtown.",
             "Thank you for listening, and have a wonderful night."]


def answer(req: DecodeRequest) -> Hypothesis:
    return Hypothesis(req.stream, req.segment, req.revision, req.kind, "x", req.start_sample,
                      req.end_sample, req.ready_at, req.ready_at)


def run(session: StreamSession, audio: np.ndarray, *, answer_partials: bool,
        chunk: int = 1600) -> list[DecodeRequest]:
    out: list[DecodeRequest] = []
    for i in range(0, len(audio), chunk):
        for r in session.push(audio[i:i + chunk], now=float(i)):
            out.append(r)
            if answer_partials and r.kind is RequestKind.PARTIAL:
                session.on_result(answer(r))
    out += session.finish(now=float(len(audio)))
    return out


def test_partials_every_interval_of_audio_then_one_final_per_sentence() -> None:
    cfg = load_config()
    audio, spans = speech_with_pauses(SENTENCES, pause_s=1.5)
    reqs = run(StreamSession("s", cfg.vad, cfg.stream), audio, answer_partials=True)
    finals = [r for r in reqs if r.kind is RequestKind.FINAL]
    assert [f.segment for f in finals] == [0, 1]
    tol = int(0.4 * SAMPLE_RATE)
    for f, (a, b) in zip(finals, spans, strict=True):
        assert abs(f.start_sample - a) < tol
        assert abs(f.end_sample - b) < tol
        assert len(f.audio) == f.end_sample - f.start_sample
        assert f.audio.dtype == np.float32
        assert np.abs(f.audio).max() <= 1.0
    for seg, final in enumerate(finals):
        partials = [r for r in reqs if r.kind is RequestKind.PARTIAL and r.segment == seg]
        seconds = (final.end_sample - final.start_sample) / SAMPLE_RATE
        # One partial per second of open speech (the last second may end first).
        assert int(seconds) - 1 <= len(partials) <= int(seconds) + 1
        revisions = [p.revision for p in partials] + [final.revision]
        assert revisions == sorted(set(revisions))
        # Each partial holds the whole segment so far: a growing prefix.
        lengths = [len(p.audio) for p in partials]
        assert lengths == sorted(lengths)
        assert all(n >= SAMPLE_RATE for n in lengths)


def test_unanswered_partial_holds_back_the_next_one() -> None:
    cfg = load_config()
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    session = StreamSession("s", cfg.vad, cfg.stream)
    reqs = run(session, audio, answer_partials=False)
    partials = [r for r in reqs if r.kind is RequestKind.PARTIAL]
    assert len(partials) == 1  # the model never answered, so no second partial
    assert session.finals_outstanding == 1
    final = next(r for r in reqs if r.kind is RequestKind.FINAL)
    session.on_result(answer(final))
    assert session.finals_outstanding == 0
    assert not session.partial_in_flight


def test_partials_disabled() -> None:
    cfg = load_config(overrides={"stream.partial_interval_ms": 0})
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.5)
    reqs = run(StreamSession("s", cfg.vad, cfg.stream), audio, answer_partials=True)
    assert [r.kind for r in reqs] == [RequestKind.FINAL, RequestKind.FINAL]


def test_forced_split_keeps_audio_contiguous() -> None:
    cfg = load_config()
    vad = dataclasses.replace(cfg.vad, max_segment_s=3.0, split_search_s=1.0)
    audio, _ = speech_with_pauses([" ".join(SENTENCES * 2)], pause_s=1.0)
    reqs = run(StreamSession("s", vad, cfg.stream), audio, answer_partials=True)
    finals = [r for r in reqs if r.kind is RequestKind.FINAL]
    assert len(finals) >= 3
    assert all(f.forced_end for f in finals[:-1])
    assert not finals[-1].forced_end
    for a, b in itertools.pairwise(finals):
        assert a.end_sample == b.start_sample
    for f in finals:
        assert len(f.audio) == f.end_sample - f.start_sample <= 3 * SAMPLE_RATE


def test_a_pause_gets_a_partial_of_exactly_the_final_audio_which_the_final_reuses() -> None:
    cfg = load_config()
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.5)
    reqs = run(StreamSession("s", cfg.vad, cfg.stream), audio, answer_partials=True)
    finals = [r for r in reqs if r.kind is RequestKind.FINAL]
    assert len(finals) == 2
    for final in finals:
        at_pause = [r for r in reqs if r.kind is RequestKind.PARTIAL and r.at_pause
                    and r.segment == final.segment]
        # Mid-sentence pauses may get one too; the last is the end's.
        assert at_pause, "no partial at the final pause"
        last = at_pause[-1]
        assert last.end_sample == final.end_sample
        assert np.array_equal(last.audio, final.audio)
        assert final.reuse == last.revision
        # It came before the end of speech was decided: the tail, not the silence.
        assert last.ready_at < final.ready_at


def test_without_pause_partials_finals_decode_their_audio() -> None:
    cfg = load_config(overrides={"stream.pause_partial": False})
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.5)
    reqs = run(StreamSession("s", cfg.vad, cfg.stream), audio, answer_partials=True)
    assert not any(r.at_pause for r in reqs)
    assert all(r.reuse is None for r in reqs)


def test_a_pause_partial_that_failed_or_was_refused_is_not_reused() -> None:
    from evoxtral_stream.events import DecodeFailure

    cfg = load_config()
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.5)
    for outcome in ("failed", "refused"):
        session = StreamSession("s", cfg.vad, cfg.stream)
        reqs: list[DecodeRequest] = []
        for i in range(0, len(audio), 1600):
            for r in session.push(audio[i:i + 1600], now=float(i)):
                reqs.append(r)
                if r.kind is RequestKind.PARTIAL and not r.at_pause:
                    session.on_result(answer(r))
                elif r.at_pause and outcome == "failed":
                    assert session.in_flight(r.segment, r.revision)
                    session.on_result(DecodeFailure("s", r.segment, r.revision, r.kind, "x"))
                elif r.at_pause:
                    session.requeue_failed_submit(r)
        reqs += session.finish(now=float(len(audio)))
        final = next(r for r in reqs if r.kind is RequestKind.FINAL)
        assert any(r.at_pause for r in reqs)
        if outcome == "failed":
            assert final.reuse is None
        else:
            # Refused: the next push asked again at the same pause, and that one is reused.
            pause = [r for r in reqs if r.at_pause]
            assert final.reuse in (None, pause[-1].revision)


def test_an_explicit_cut_makes_short_speech_a_final_and_a_plain_one_drops_it() -> None:
    """A clipped "Yes" (less voiced audio than ``vad.min_speech_ms``): a
    client's commit (``keep_candidate``) decodes it; end of input does not."""
    cfg = load_config()
    yes = clipped_speech("Yes.", 200)
    reference = Segmenter(cfg.vad)
    reference.feed(yes)
    assert reference.state is SegmenterState.PENDING  # detected, not confirmed
    session = StreamSession("s", cfg.vad, cfg.stream)
    assert session.push(yes, now=0.0) == []
    (final,) = session.cut(now=1.0, keep_candidate=True)
    assert final.kind is RequestKind.FINAL
    assert final.start_sample < SAMPLE_RATE // 2 and final.end_sample == len(yes)
    assert len(final.audio) == final.end_sample - final.start_sample
    assert session.finals_outstanding == 1
    # The next explicit cut has nothing to keep.
    assert session.cut(now=2.0, keep_candidate=True) == []

    session = StreamSession("s", cfg.vad, cfg.stream)
    session.push(yes, now=0.0)
    assert session.cut(now=1.0) == []
    session = StreamSession("s", cfg.vad, cfg.stream)
    session.push(yes, now=0.0)
    assert session.finish(now=1.0) == []
