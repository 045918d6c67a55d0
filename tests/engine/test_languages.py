"""A language per stream: checked when the stream opens, carried by every
request to the model, changeable between requests."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from evoxtral_stream.audio.resample import int16_to_float32
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.backends.base import Backend, BackendError, Job, Multilingual
from evoxtral_stream.engine.backends.whisper import WhisperBackend
from evoxtral_stream.engine.engine import Engine, Stream
from evoxtral_stream.events import DecodeRequest, RequestKind
from evoxtral_stream.run import LatencyLog
from tests.fakes import LanguageScriptedBackend, ScriptedBackend, words_so_far
from tests.speech import have_espeak, speak, speech_with_pauses

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")

SENTENCES = ["Good evening and welcome to the live captioning demo.",
             "Thank you for listening, and have a wonderful night."]


def test_embedded_whisper_is_english_only(whisper_backend: Backend) -> None:
    assert isinstance(whisper_backend, WhisperBackend)
    assert isinstance(whisper_backend, Multilingual)
    assert whisper_backend.languages == ("en",)
    audio = int16_to_float32(speak(SENTENCES[0]))
    plain, english = whisper_backend.transcribe_jobs([Job(0, audio), Job(1, audio, language="en")])
    assert plain.text == english.text and "welcome" in plain.text.lower()
    with pytest.raises(BackendError, match="does not transcribe language 'fr'"):
        whisper_backend.transcribe_jobs([Job(0, audio, language="fr")])


async def test_open_stream_checks_the_language(whisper_backend: Backend) -> None:
    async with Engine(load_config(), whisper_backend) as engine:
        assert engine.languages == ("en",)
        assert engine.open_stream("a", language="en").language is None  # model.language
        with pytest.raises(ValueError, match=r"unknown language 'fr' \(known: en\)"):
            engine.open_stream("b", language="fr")
        assert "b" not in engine.streams
        await engine.close_streams()
    # A backend that cannot switch languages takes model.language only.
    async with Engine(load_config(overrides={"model.language": "de"}),
                      ScriptedBackend()) as engine:
        assert engine.languages == ()
        engine.open_stream("a", language="de")
        with pytest.raises(ValueError, match="de only: the backend cannot switch languages"):
            engine.open_stream("b", language="en")
        await engine.close_streams()


async def test_every_request_carries_its_stream_language() -> None:
    audio, spans = speech_with_pauses(SENTENCES, pause_s=1.2)
    # The switch comes once the first sentence's pause has ended it.
    half = spans[1][0]
    backend = LanguageScriptedBackend(words_so_far)
    log = LatencyLog()
    async with Engine(load_config(), backend) as engine:
        engine.add_listener(log)
        fr = engine.open_stream("fr", language="fr")
        plain = engine.open_stream("plain")
        for stream in (fr, plain):
            stream.push(audio[:half])
        # From now on stream "fr" is German; a code the backend lacks changes nothing.
        with pytest.raises(ValueError, match="unknown language 'xx'"):
            fr.set_language("xx")
        assert fr.language == "fr"
        await fr.wait_idle()
        fr.set_language("de")
        for stream in (fr, plain):
            stream.push(audio[half:])
            await stream.close()
    requests = [j.key for j in backend.jobs if isinstance(j.key, DecodeRequest)]
    assert len(requests) == len(backend.jobs)
    fr_langs = [r.language for r in requests if r.stream == "fr"]
    assert {r.language for r in requests if r.stream == "plain"} == {None}
    # Switched once, between requests, never back.
    assert fr_langs[0] == "fr" and fr_langs[-1] == "de"
    switch = fr_langs.index("de")
    assert set(fr_langs[:switch]) == {"fr"} and set(fr_langs[switch:]) == {"de"}
    assert any(r.kind is RequestKind.FINAL for r in requests if r.language == "fr")
    # The captions are what the backend said in each language.
    finals = {s: [c.text for c in log.captions(s) if c.final] for s in ("fr", "plain")}
    assert len(finals["fr"]) == len(finals["plain"]) == 2
    assert finals["fr"][0].startswith("fr:") and finals["fr"][1].startswith("de:")
    assert all(t.startswith("default:") for t in finals["plain"])
    assert [t.split(":", 1)[1] for t in finals["fr"]] == [
        p.split(":", 1)[1] for p in finals["plain"]]


def voiced(ms: int) -> np.ndarray:
    return np.full(16 * ms, 1000, np.int16)


def silence(ms: int) -> np.ndarray:
    return np.zeros(16 * ms, np.int16)


async def settle(stream: Stream) -> None:
    for _ in range(4):
        await stream.wait_idle()
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("answered", [True, False])
async def test_a_final_after_a_language_change_is_in_the_new_language(answered: bool) -> None:
    """The partial made at a pause decoded the old language: the final, made
    after the change, does not take its text (with stream.pause_partial on or
    off, the final is the same). ``answered``: the pause partial came back
    before the change, else it is still in flight then."""
    finals: dict[bool, list[str]] = {}
    for pause_partial in (False, True):
        backend = LanguageScriptedBackend(words_so_far)
        log = LatencyLog()
        cfg = load_config(overrides={"stream.pause_partial": pause_partial})
        async with Engine(cfg, backend) as engine:
            engine.add_listener(log)
            s = engine.open_stream("s", language="fr")
            s.session._segmenter._classify = lambda frame: bool(frame.any())  # scripted VAD
            for _ in range(15):                   # 1.5 s of speech
                s.push(voiced(100))
            await settle(s)
            for _ in range(3):                    # a pause past vad.end_tail_ms
                s.push(silence(100))
                if answered:
                    await settle(s)
            assert s.session._open is not None    # the segment is still open
            assert (s.session._open.exact is not None) == pause_partial
            s.set_language("de")
            for _ in range(6):                    # the pause ends the segment
                s.push(silence(100))
            await s.close()
        finals[pause_partial] = [c.text for c in log.captions() if c.final]
        final_jobs = [j.key for j in backend.jobs if isinstance(j.key, DecodeRequest)
                      and j.key.kind is RequestKind.FINAL]
        assert [r.language for r in final_jobs] == ["de"]   # decoded, in German
    assert len(finals[False]) == 1 and finals[False][0].startswith("de: w0 w1")
    assert finals[True] == finals[False]


async def test_setting_the_same_language_keeps_the_pause_partial() -> None:
    backend = LanguageScriptedBackend(words_so_far)
    async with Engine(load_config(), backend) as engine:
        s = engine.open_stream("s", language="fr")
        s.session._segmenter._classify = lambda frame: bool(frame.any())
        for _ in range(15):
            s.push(voiced(100))
        await settle(s)
        for _ in range(3):
            s.push(silence(100))
            await settle(s)
        s.set_language("fr")                      # no change
        for _ in range(6):
            s.push(silence(100))
        await s.close()
    kinds = [j.key.kind for j in backend.jobs if isinstance(j.key, DecodeRequest)]
    assert RequestKind.FINAL not in kinds         # the final took the pause partial's text


def test_multilingual_whisper_prompts_carry_the_language_token(
    whisper_backend: Backend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The prompt a multilingual model gets per language, built with the real
    Whisper tokenizer (tiny.en's vocabulary has the language tokens, so the
    embedded model stands in for a multilingual one here)."""
    assert isinstance(whisper_backend, WhisperBackend)
    monkeypatch.setattr(whisper_backend, "_multilingual", True)
    monkeypatch.setattr(whisper_backend, "_languages", None)
    monkeypatch.setattr(whisper_backend, "_prompts", {})
    vocab = whisper_backend._tok.tokenizer
    languages = whisper_backend.languages
    assert {"en", "fr", "de", "ja"} <= set(languages)
    # No token, no code: a prompt without it would decode in no set language.
    assert "yue" not in languages and vocab.token_to_id("<|yue|>") is None
    sot, transcribe, no_ts = (vocab.token_to_id(t) for t in
                              ("<|startoftranscript|>", "<|transcribe|>", "<|notimestamps|>"))
    assert whisper_backend._prompt_for("fr") == [sot, vocab.token_to_id("<|fr|>"), transcribe,
                                                  no_ts]
    with pytest.raises(BackendError, match="does not transcribe language 'yue'"):
        whisper_backend._prompt_for("yue")
