"""Direct prompt ids and torch log-mel features equal the processor's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from evoxtral_stream.engine.backends.voxtral.backend import VoxtralBackend

from .conftest import Tiny
from .helpers import audio_batch, int16_exact

LENGTHS_S = [1 / 16000, 3.0, 30.0, 30.0 + 1 / 16000, 35.0, 12.345]


def _processor(tiny: Tiny) -> Any:
    from transformers import AutoProcessor

    auto: Any = AutoProcessor
    return auto.from_pretrained(str(tiny.base))


@pytest.mark.parametrize("language", ["en", "fr", None])
def test_prompt_ids_equal_the_processor(tiny: Tiny, language: str | None) -> None:
    from evoxtral_stream.engine.backends.voxtral.backend import load_tokenizer
    from evoxtral_stream.engine.backends.voxtral.prompt import PromptSpec

    batch = [int16_exact(a) for a in audio_batch(LENGTHS_S)]
    ref = _processor(tiny).apply_transcription_request(
        audio=batch,
        model_id="mistralai/Voxtral-Mini-3B-2507",
        language=language,
        sampling_rate=16000,
        format=["wav"] * len(batch),
    )
    spec = PromptSpec.from_tokenizer(load_tokenizer(tiny.base), language or "")
    ids, masks = spec.left_padded([len(a) for a in batch])
    assert torch.equal(torch.tensor(ids), ref["input_ids"])
    assert torch.equal(torch.tensor(masks), ref["attention_mask"])
    # 35 s spans two windows: 750 audio tokens after one [BEGIN_AUDIO].
    assert ids[4].count(24) == 750
    assert ids[4][-1] == 34


def test_rows_in_mixed_languages_equal_the_processor_per_language(tiny: Tiny) -> None:
    from evoxtral_stream.engine.backends.voxtral.backend import load_tokenizer
    from evoxtral_stream.engine.backends.voxtral.prompt import PromptSpec, language_ids

    tok = load_tokenizer(tiny.base)
    spec = PromptSpec.from_tokenizer(tok, "en")
    batch = [int16_exact(a) for a in audio_batch([3.0, 35.0, 1.0, 12.0])]
    languages = ["fr", "de", None, "en"]
    ids, masks = spec.left_padded(
        [len(a) for a in batch], None,
        [language_ids(tok, code or "") for code in languages])
    processor = _processor(tiny)
    for audio, code, row, mask in zip(batch, languages, ids, masks, strict=True):
        ref = processor.apply_transcription_request(
            audio=[audio], model_id="mistralai/Voxtral-Mini-3B-2507", language=code,
            sampling_rate=16000, format=["wav"])
        assert [t for t, m in zip(row, mask, strict=True) if m] == ref["input_ids"][0].tolist()
    # None in a row means the spec's own language; () means none (detect).
    assert spec.ids(16000, None) == spec.ids(16000, language_ids(tok, "en"))
    assert spec.ids(16000, ()) == PromptSpec.from_tokenizer(tok, "auto").ids(16000)


def test_only_voxtral_languages_are_taken(tiny: Tiny) -> None:
    from evoxtral_stream.engine.backends.voxtral.backend import load_tokenizer
    from evoxtral_stream.engine.backends.voxtral.prompt import LANGUAGES, language_ids

    tok = load_tokenizer(tiny.base)
    assert language_ids(tok, "auto") == language_ids(tok, "") == ()
    assert language_ids(tok, "FR") == language_ids(tok, "fr") != language_ids(tok, "de")
    assert set(LANGUAGES) == {"auto", "de", "en", "es", "fr", "hi", "it", "nl", "pt"}
    with pytest.raises(ValueError, match="Voxtral does not transcribe language 'ru'"):
        language_ids(tok, "ru")


def test_prompt_uses_the_documented_ids(merged: VoxtralBackend) -> None:
    spec = merged.spec
    assert (spec.bos, spec.inst, spec.end_inst) == (1, 3, 4)
    assert (spec.audio, spec.begin_audio, spec.transcribe) == (24, 25, 34)
    assert spec.tokens_per_window == 375
    assert spec.frames_per_window == 3000
    assert len(spec.language) > 0
    ids = spec.ids(16000)
    assert ids[:3] == [1, 3, 25]
    assert ids[3:378] == [24] * 375
    assert ids[378] == 4
    assert ids[-1] == 34


def test_features_equal_whisper_feature_extractor(merged: VoxtralBackend, tiny: Tiny) -> None:
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(str(tiny.base))
    batch = audio_batch(LENGTHS_S, seed=3)
    ours = merged.features(batch)
    ref = []
    for a in batch:
        n = merged.spec.windows(len(a)) * 480_000
        x = fe(
            np.pad(a, (0, n - len(a))),
            sampling_rate=16000,
            padding="longest",
            pad_to_multiple_of=480_000,
            truncation=False,
            return_tensors="pt",
        )["input_features"]
        ref.append(x.reshape(128, -1, 3000).transpose(0, 1))
    want = torch.cat(ref)
    assert ours.shape == want.shape == (8, 128, 3000)
    diff = float((ours - want).abs().max())
    assert diff <= 1e-5, diff


def test_features_equal_the_processor_path(merged: VoxtralBackend, tiny: Tiny) -> None:
    # 16-bit values survive the processor's in-memory WAV unchanged, so the
    # whole reference path must agree exactly, not just approximately.
    batch = [int16_exact(a) for a in audio_batch(LENGTHS_S, seed=4)]
    ref = _processor(tiny).apply_transcription_request(
        audio=batch,
        model_id="mistralai/Voxtral-Mini-3B-2507",
        language="en",
        sampling_rate=16000,
        format=["wav"] * len(batch),
    )
    diff = float((merged.features(batch) - ref["input_features"]).abs().max())
    assert diff <= 1e-5, diff
