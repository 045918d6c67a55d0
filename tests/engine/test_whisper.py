"""The embedded Whisper backend: what it answers for empty audio and for
sounds that are not speech, and which model folders it refuses at load with
one line."""

from __future__ import annotations

import dataclasses
import functools
import shutil
from pathlib import Path

import numpy as np
import pytest

from evoxtral_stream.audio.resample import int16_to_float32
from evoxtral_stream.config import WhisperConfig, load_config
from evoxtral_stream.engine.backends.base import Backend, BackendUnavailable, Job
from evoxtral_stream.engine.backends.whisper import (
    WhisperBackend,
    embedded_model_path,
    load_whisper_backend,
)
from tests.helpers.audio import HAVE_SOX, sox_synth
from tests.speech import have_espeak, speak

# Sounds a VAD passes as voiced (webrtcvad passed every one of them), made by
# sox: the effects after ``sox -n``.
NON_SPEECH = {
    "white noise 0.3 s": "synth 0.3 whitenoise vol 0.3",
    "quiet white noise 1 s": "synth 1 whitenoise vol 0.05",
    "quiet white noise 3 s": "synth 3 whitenoise vol 0.05",
    "white noise 3 s": "synth 3 whitenoise vol 0.3",
    "quiet pink noise 0.3 s": "synth 0.3 pinknoise vol 0.05",
    "pink noise 1 s": "synth 1 pinknoise vol 0.3",
    "quiet pink noise 3 s": "synth 3 pinknoise vol 0.05",
    "brown noise 0.3 s": "synth 0.3 brownnoise vol 0.3",
    "quiet brown noise 1 s": "synth 1 brownnoise vol 0.05",
    "brown noise 3 s": "synth 3 brownnoise vol 0.3",
    "chirp": "synth 2 sine 200-3000 vol 0.3",
    "click train": "synth 2 square 10 vol 0.3 highpass 2000",
    "cough": "synth 0.35 whitenoise bandpass 600 400h fade q 0.01 0.35 0.3 gain -n -3",
    "three coughs": "synth 0.35 whitenoise bandpass 600 400h fade q 0.01 0.35 0.3 gain -n -3 "
                    "pad 0 0.25 repeat 2",
    "breathing": "synth 1.2 pinknoise lowpass 1500 highpass 200 fade h 0.5 1.2 0.6 vol 0.3",
    "door slam": "synth 0.6 brownnoise fade q 0.002 0.6 0.58 gain -n -1",
    "mains hum": "synth 5 sine 50 sine 100 sine 150 remix - vol 0.1",
    "chord": "synth 4 sine 261.6 sine 329.6 sine 392 remix - tremolo 4 60 vol 0.3",
}
# With keep_non_speech (the default) Whisper names most of these sounds in a
# tag it is sure of ([static], [MUSIC], [XBOX SOUND] for the cough): kept.
# These it put in words, or in a tag it was unsure of, or as [BLANK_AUDIO].
NON_SPEECH_DROPPED_WITH_TAGS = ("quiet white noise 3 s", "white noise 3 s", "three coughs",
                                "mains hum", "chord", "quiet pink noise 0.3 s",
                                "quiet pink noise 3 s", "quiet brown noise 1 s")
# Every sentence the tests speak with espeak-ng.
SENTENCES = (
    "Yes.", "Thank you.", "Hello there, how are you", "thank you for listening",
    "the weather is lovely today", "Good evening and welcome to the live captioning demo.",
    "Thank you for listening, and have a wonderful night.",
    "I was thinking maybe we could try that new restaurant downtown.",
    "please close the door behind you", "we will meet again tomorrow morning",
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you get home tonight.",
    "Seven red boats sailed past the old stone harbour.",
    "Our next speaker will talk about renewable energy.",
    "Please ignore this sentence entirely.", "Yes, and tomorrow too.",
    "The weather is lovely today, isn't it?", "hello there, this is the first file",
    "Please remember to turn off your phone before the show.",
    "Wait, wait, wait.", "ha ha ha ha",
)


def test_empty_audio_gives_empty_text(whisper_backend: Backend) -> None:
    """As Voxtral does; padded to a window and decoded, tiny.en said "you"."""
    assert isinstance(whisper_backend, WhisperBackend)
    empty = np.zeros(0, np.float32)
    assert whisper_backend.transcribe([empty]) == [""]
    assert whisper_backend.transcribe([]) == []
    rng = np.random.default_rng(0)
    noise = (0.01 * rng.standard_normal(16000)).astype(np.float32)
    (alone,) = whisper_backend.transcribe_jobs([Job(1, noise)])
    jobs = [Job(0, empty), Job(1, noise), Job(2, empty, prefix="Hello")]
    done = whisper_backend.transcribe_jobs(jobs)
    assert [d.job for d in done] == jobs
    assert [(d.text, d.tokens, d.token_ids) for d in done] == [
        ("", 0, ()), (alone.text, alone.tokens, alone.token_ids), ("", 0, ())]
    assert whisper_backend.transcribe([empty, noise, empty]) == ["", alone.text, ""]


def _copy(tmp_path: Path) -> tuple[Path, WhisperConfig]:
    folder = tmp_path / "whisper"
    shutil.copytree(embedded_model_path(), folder)
    return folder, dataclasses.replace(load_config().model.whisper, model_path=str(folder))


def _refused(cfg: WhisperConfig) -> str:
    with pytest.raises(BackendUnavailable) as info:
        load_whisper_backend(cfg, "en")
    msg = str(info.value)
    assert "\n" not in msg
    assert info.value.__context__ is None or info.value.__suppress_context__
    assert "model.whisper.model_path" in msg
    return msg


def test_a_malformed_tokenizer_is_one_line(tmp_path: Path) -> None:
    folder, cfg = _copy(tmp_path)
    (folder / "tokenizer.json").write_text("{")
    assert _refused(cfg).startswith(f"cannot load the Whisper model in {folder}")


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json"])
def test_a_folder_without_its_config_or_tokenizer_is_refused_at_load(
    tmp_path: Path, missing: str
) -> None:
    """Without config.json it loaded, and every decode then failed in CTranslate2;
    without tokenizer.json faster-whisper would fetch one from the hub."""
    folder, cfg = _copy(tmp_path)
    (folder / missing).unlink()
    msg = _refused(cfg)
    assert msg.startswith(f"no CTranslate2 Whisper model in {folder} ({missing} missing)")


@pytest.mark.parametrize("language", ["fr", "english"])
def test_a_language_the_model_cannot_transcribe_is_refused_at_load(language: str) -> None:
    """tiny.en given model.language "fr" captioned French speech in English
    words under the label "fr", without a word of warning."""
    with pytest.raises(BackendUnavailable) as info:
        load_whisper_backend(load_config().model.whisper, language)
    assert str(info.value) == (
        f"model.language {language!r} is not a language this Whisper model transcribes "
        "(whisper tiny.en (embedded)); use one of en, or a multilingual model in "
        "model.whisper.model_path")


@functools.cache
def _whisper(**changes: object) -> WhisperBackend:
    """The embedded model with ``changes`` to [model.whisper], loaded once."""
    cfg = load_config(overrides={f"model.whisper.{k}": v for k, v in changes.items()})
    return load_whisper_backend(cfg.model.whisper, "en")


def _non_speech(names: tuple[str, ...]) -> list[np.ndarray]:
    return [int16_to_float32(sox_synth(NON_SPEECH[n])) for n in names]


@pytest.mark.skipif(not HAVE_SOX, reason="sox is not installed")
def test_sounds_that_are_not_speech_get_no_words(whisper_backend: Backend) -> None:
    """Noise, a chirp, clicks, coughs, a breath, a slam, hum and a chord,
    as a VAD passes them: tiny.en captioned them "You", "I'm gonna go to
    the end of the video.", "(rooster crowing)", "[BLANK_AUDIO]" ...; it
    rated each as no speech (no_speech_prob 0.70 to 0.95) and was unsure of
    what it wrote (avg_logprob -1.1 to -2.4), or wrote [BLANK_AUDIO]."""
    names = tuple(NON_SPEECH)
    words = _whisper(keep_non_speech=False).transcribe(_non_speech(names))
    assert dict(zip(names, words, strict=True)) == dict.fromkeys(names, "")
    # The default keeps the tags Whisper is sure of, and drops the rest.
    assert isinstance(whisper_backend, WhisperBackend)
    tags = NON_SPEECH_DROPPED_WITH_TAGS
    got = whisper_backend.transcribe(_non_speech(tags))
    assert dict(zip(tags, got, strict=True)) == dict.fromkeys(tags, "")
    (done,) = whisper_backend.transcribe_jobs([Job(0, _non_speech(tags[:1])[0])])
    assert (done.text, done.token_ids) == ("", ())
    # What the filter is for: without it, every one of them has a caption.
    before = _whisper(keep_non_speech=False, no_speech_threshold=0.0).transcribe(
        _non_speech(names))
    assert all(before), before
    before = _whisper(no_speech_threshold=0.0).transcribe(_non_speech(tags))
    assert all(before), before

@pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed")
def test_speech_keeps_its_words(whisper_backend: Backend) -> None:
    """Every sentence the tests speak, whole and cut every 0.5 s as partials
    see it, keeps a caption (no_speech_prob at most 0.55 over them all; with
    the filter off none of them is empty either), with keep_non_speech and
    (whole) without."""
    assert isinstance(whisper_backend, WhisperBackend)
    for sentence in SENTENCES:
        audio = int16_to_float32(speak(sentence))
        cuts = [audio[:n] for n in range(8000, len(audio), 8000)] + [audio]
        texts = whisper_backend.transcribe(cuts)
        assert all(texts), (sentence, texts)
    whole = [int16_to_float32(speak(sentence)) for sentence in SENTENCES]
    texts = _whisper(keep_non_speech=False).transcribe(whole)
    assert all(texts), texts


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed")
def test_a_repetition_loop_is_cut_back(whisper_backend: Backend) -> None:
    """tiny.en heard espeak's "No, no, no." (without the VAD's lead-in) as
    "No" 20 times, to its token budget."""
    assert isinstance(whisper_backend, WhisperBackend)
    audio = int16_to_float32(speak("No, no, no."))
    assert whisper_backend.transcribe([audio]) == ["No No No"]
    (done,) = whisper_backend.transcribe_jobs([Job(0, audio)])
    assert done.text == "No No No"
    assert done.tokens == 20  # what the model generated
    # Committed text is never cut: the loop after it is.
    (done,) = whisper_backend.transcribe_jobs([Job(0, audio, prefix="No No No No No")])
    assert done.text == "No No No No No"


@pytest.mark.skipif(not HAVE_SOX, reason="sox is not installed")
def test_a_tone_looping_into_words_gets_no_text(whisper_backend: Backend) -> None:
    """A 440 Hz tone: tiny.en wrote "( Be Be Be ... Be" to its budget, sure
    of every repeat (avg_logprob -0.27) while rating it no speech (0.83). A
    loop counts as unsure."""
    assert isinstance(whisper_backend, WhisperBackend)
    tone = [int16_to_float32(sox_synth("synth 2 sine 440 vol 0.3"))]
    assert whisper_backend.transcribe(tone) == [""]
    assert _whisper(no_speech_threshold=0.0).transcribe(tone) == ["( Be Be Be"]
