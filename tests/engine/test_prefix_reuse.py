"""Prefix reuse: the engine hands a segment's stable text back to the model.

``stream.prefix_reuse`` decides which requests carry it; the merger decides
what it is (tests/text/test_merger_prefix.py); the Whisper backend continues
from it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import pytest

from evoxtral_stream.audio.resample import int16_to_float32
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.backends.base import Backend, BackendError, Done, Job, JobBackend
from evoxtral_stream.engine.backends.whisper import WhisperBackend
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import CaptionEvent, DecodeRequest, RequestKind
from evoxtral_stream.run import FileJob, LatencyLog, transcribe_samples
from tests.fakes import words_so_far
from tests.speech import have_espeak, speak, speech_with_pauses
from tests.text_norm import loose_wer

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")

SENTENCES = ["Good evening and welcome to the live captioning demo.",
             "I was thinking maybe we could try that new restaurant downtown.",
             "Thank you for listening, and have a wonderful night."]


def starts_with_words(text: str, prefix: str) -> bool:
    return (text + " ").startswith(prefix + " ") if prefix else True


class RecordingJobBackend:
    """A :class:`JobBackend` that records every job it gets.

    It answers through ``inner`` when given, else like a model scripted with
    ``script`` (:func:`words_so_far`): the text continues the job's prefix
    (forced, as a real model does, even where the script would say otherwise).
    """

    name = "recording"

    def __init__(self, inner: JobBackend | None = None, *,
                 script: Callable[[npt.NDArray[np.float32]], str] = words_so_far) -> None:
        self.inner = inner
        self.script = script
        self.jobs: list[Job] = []
        self.lock = threading.Lock()

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]:
        return [d.text for d in self.transcribe_jobs([Job(i, a) for i, a in enumerate(batch)])]

    def transcribe_jobs(self, jobs: Sequence[Job]) -> list[Done]:
        with self.lock:
            self.jobs.extend(jobs)
        if self.inner is not None:
            return self.inner.transcribe_jobs(jobs)
        return [Done(job, self._answer(job)) for job in jobs]

    def _answer(self, job: Job) -> str:
        text = self.script(job.audio)
        if starts_with_words(text, job.prefix):
            return text
        return f"{job.prefix} {text}".strip()

    def requests(self) -> list[DecodeRequest]:
        """The engine's requests behind the jobs (the job's key), in order."""
        return [job.key for job in self.jobs if isinstance(job.key, DecodeRequest)]


async def run_engine(backend: Backend, audio: npt.NDArray[np.int16], mode: str,
                     **overrides: object) -> list[CaptionEvent]:
    cfg = load_config(overrides={"stream.prefix_reuse": mode, **overrides})
    record = LatencyLog()
    async with Engine(cfg, backend) as engine:
        engine.add_listener(record)
        await transcribe_samples(cfg, engine, [FileJob("s", audio)], realtime=False)
    return record.captions("s")


def finals(captions: list[CaptionEvent]) -> list[tuple[int, str]]:
    return [(c.segment, c.text) for c in captions if c.final]


# --- the engine attaches prefixes per mode (scripted model) -----------------


async def test_modes_decide_which_requests_carry_the_stable_text() -> None:
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.2)
    results: dict[str, tuple[list[DecodeRequest], list[CaptionEvent]]] = {}
    for mode in ("off", "partials", "all"):
        backend = RecordingJobBackend()
        # Finals decoded, not taken from the partial made at their pause.
        captions = await run_engine(backend, audio, mode, **{"stream.pause_partial": False})
        assert backend.jobs, "the worker decodes through transcribe_jobs"
        assert len(backend.requests()) == len(backend.jobs)
        results[mode] = (backend.requests(), captions)

    def with_prefix(mode: str, kind: RequestKind) -> list[DecodeRequest]:
        return [r for r in results[mode][0] if r.kind is kind and r.prefix]

    assert not with_prefix("off", RequestKind.PARTIAL)
    assert not with_prefix("off", RequestKind.FINAL)
    assert with_prefix("partials", RequestKind.PARTIAL)
    assert not with_prefix("partials", RequestKind.FINAL)
    assert with_prefix("all", RequestKind.PARTIAL)
    assert with_prefix("all", RequestKind.FINAL)
    for mode in ("partials", "all"):
        requests, captions = results[mode]
        for r in requests:
            # What the model said for this very audio starts with it...
            assert starts_with_words(words_so_far(r.audio), r.prefix)
            # ...and it is text the captions had already made stable.
            if r.prefix:
                assert any(c.segment == r.segment and c.stable == r.prefix
                           for c in captions), r.prefix
    # A model that agrees with its own prefix gives the same captions.
    assert finals(results["partials"][1]) == finals(results["off"][1])
    assert finals(results["all"][1]) == finals(results["off"][1])
    assert ([(c.segment, c.text, c.stable) for c in results["all"][1]]
            == [(c.segment, c.text, c.stable) for c in results["off"][1]])


def ten_words_a_second(audio: npt.NDArray[np.float32]) -> str:
    return " ".join(f"w{i}" for i in range(len(audio) // 1600))


async def test_forced_splits_and_their_continuations_get_no_prefix() -> None:
    # One long utterance with no pause, cut at the quietest frame of the
    # last 3 s every 5 s, with partials every 0.3 s (so the stable text runs
    # past the cut); words every 0.1 s show where the audio stops.
    audio = np.concatenate([speak(" ".join(SENTENCES))] * 2)
    backend = RecordingJobBackend(script=ten_words_a_second)
    await run_engine(backend, audio, "all", **{
        "vad.max_segment_s": 5.0, "vad.split_search_s": 3.0,
        "stream.partial_interval_ms": 300, "stream.min_partial_ms": 300})
    requests = backend.requests()
    forced = {r.segment for r in requests if r.kind is RequestKind.FINAL and r.forced_end}
    assert len(forced) >= 2, "the test needs forced splits"
    assert any(r.prefix for r in requests)
    for r in requests:
        # A forced final's audio stops before what its partials heard: a
        # prefix from them could say words past the cut.
        assert starts_with_words(ten_words_a_second(r.audio), r.prefix), (r.segment, r.prefix)
        if r.segment - 1 in forced:
            assert r.prefix == "", "a continuation is stitched, not its own text"


# --- the Whisper backend continues from a prefix ----------------------------


@pytest.fixture(scope="module")
def whisper(whisper_backend: Backend) -> WhisperBackend:
    assert isinstance(whisper_backend, WhisperBackend)
    return whisper_backend


def f32(text: str) -> npt.NDArray[np.float32]:
    return int16_to_float32(speak(text))


def test_whisper_continues_from_the_first_words(whisper: WhisperBackend) -> None:
    audio = f32(SENTENCES[1])
    (plain,) = whisper.transcribe([audio])
    assert loose_wer(SENTENCES[1], plain) < 0.2, plain
    words = plain.split()
    for k in (1, 4, len(words) - 1):
        head = " ".join(words[:k])
        (done,) = whisper.transcribe_jobs([Job("k", audio, prefix=head)])
        assert done.job.key == "k"
        assert done.text.startswith(head)
        assert loose_wer(plain, done.text) <= 0.1, (head, done.text)
        # Only the tokens after the prefix count as generated.
        assert done.tokens == len(whisper.encode_prefix(done.text)) - len(
            whisper.encode_prefix(head))
    (scratch,) = whisper.transcribe_jobs([Job(0, audio)])
    assert scratch.text == plain
    assert scratch.tokens == len(whisper.encode_prefix(plain))


def test_whisper_is_held_to_a_prefix_it_would_not_write(whisper: WhisperBackend) -> None:
    (done,) = whisper.transcribe_jobs([Job(0, f32(SENTENCES[0]), prefix="Good morning")])
    assert done.text.startswith("Good morning")
    assert "welcome" in done.text.lower()


def test_whisper_batches_mixed_prefixes_as_it_decodes_them_alone(
        whisper: WhisperBackend) -> None:
    audios = [f32(s) for s in SENTENCES]
    plain = whisper.transcribe(audios)
    jobs = [Job(0, audios[0]), Job(1, audios[1], prefix=" ".join(plain[1].split()[:3])),
            Job(2, audios[2], prefix=plain[2].split()[0]), Job(3, np.zeros(0, np.float32))]
    together = whisper.transcribe_jobs(jobs)
    alone = [whisper.transcribe_jobs([j])[0] for j in jobs]
    assert [d.job for d in together] == jobs
    assert [d.text for d in together] == [d.text for d in alone]
    assert [d.text for d in together[:3]] == plain


def test_whisper_has_no_adapters(whisper: WhisperBackend) -> None:
    with pytest.raises(BackendError, match="no adapters"):
        whisper.transcribe_jobs([Job(0, f32("Hello."), adapter="rl")])


# --- end to end: the real engine with the embedded Whisper -------------------


async def test_partials_mode_leaves_whisper_finals_as_they_were(
        whisper: WhisperBackend) -> None:
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.2)
    off = await run_engine(RecordingJobBackend(whisper), audio, "off")
    recording = RecordingJobBackend(whisper)
    partials = await run_engine(recording, audio, "partials")
    reused = [r for r in recording.requests() if r.prefix]
    assert reused, "some partials continued from stable text"
    assert all(r.kind is RequestKind.PARTIAL for r in reused)
    # Finals decode from scratch, so they are what they were.
    assert finals(partials) == finals(off)
    assert len(finals(off)) == len(SENTENCES)
    for (_, text), sentence in zip(finals(off), SENTENCES, strict=True):
        assert loose_wer(sentence, text) < 0.25, text
    # Stable text is never retracted in either mode.
    for captions in (off, partials):
        by_segment: dict[int, str] = {}
        for c in captions:
            if not c.final:
                assert c.stable.startswith(by_segment.get(c.segment, ""))
                by_segment[c.segment] = c.stable


def test_the_recording_backend_is_a_job_backend() -> None:
    assert isinstance(RecordingJobBackend(), JobBackend)


async def test_a_partial_at_a_pause_is_decoded_from_scratch_as_a_final_is() -> None:
    audio, _ = speech_with_pauses(SENTENCES, pause_s=1.2)
    backend = RecordingJobBackend()
    await run_engine(backend, audio, "partials")
    at_pause = [r for r in backend.requests() if r.at_pause]
    assert at_pause and not any(r.prefix for r in at_pause)
    assert any(r.prefix for r in backend.requests() if not r.at_pause)
    assert not any(r.kind is RequestKind.FINAL for r in backend.requests())
