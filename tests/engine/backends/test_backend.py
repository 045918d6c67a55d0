"""Batched greedy transcription: one generate call, same text as one by one."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evoxtral_stream.config import VoxtralConfig
from evoxtral_stream.engine.backends.base import Backend, BackendError, Job
from evoxtral_stream.engine.backends.voxtral.backend import (
    NO_ADAPTER,
    VoxtralBackend,
    load_voxtral_backend,
)

from .conftest import Tiny
from .helpers import audio_batch

SECONDS = [3.0, 35.0, 1.0, 5.0, 12.0]


def _count_generate(backend: VoxtralBackend, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the batch size of every generate call on ``backend``."""
    calls: list[int] = []
    real: Callable[..., Any] = backend.model.generate  # type: ignore[assignment]

    def counting(**kwargs: Any) -> Any:
        calls.append(int(kwargs["input_ids"].shape[0]))
        return real(**kwargs)

    monkeypatch.setattr(backend.model, "generate", counting)
    return calls


def test_is_a_backend(merged: VoxtralBackend) -> None:
    assert isinstance(merged, Backend)
    assert merged.name == "voxtral+lora"


def test_batched_equals_one_by_one(merged: VoxtralBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = audio_batch(SECONDS, seed=1)
    calls = _count_generate(merged, monkeypatch)
    together = merged.generate_tokens(batch)
    assert calls == [len(batch)]  # one generate call for the whole batch
    alone = [merged.generate_tokens([a])[0] for a in batch]
    assert together == alone
    assert len({tuple(t) for t in together}) >= 3, "the random model must tell inputs apart"
    texts = merged.transcribe(batch)
    assert texts == [merged.transcribe([a])[0] for a in batch]
    assert all(texts)


def test_budget_grows_with_the_audio(merged: VoxtralBackend) -> None:
    # tiny_cfg: 2 tokens per second, at least 6.
    assert merged.max_new_tokens(16000) == 6
    assert merged.max_new_tokens(35 * 16000) == 70
    assert merged.max_new_tokens(12 * 16000 + 1) == math.ceil(2 * (12 + 1 / 16000))
    rows = merged.generate_tokens(audio_batch(SECONDS, seed=2))
    for row, s in zip(rows, SECONDS, strict=True):
        assert len(row) <= merged.max_new_tokens(int(s * 16000))
    forced = merged.generate_tokens(audio_batch([1.0, 2.0]), max_new_tokens=9, min_new_tokens=9)
    assert [len(r) for r in forced] == [9, 9]


def test_text_is_what_the_model_wrote_without_special_tokens(merged: VoxtralBackend) -> None:
    tok: Any = merged.loaded.tokenizer
    text = "[laughs] Can you IMAGINE her face? [pause] ok"
    ids = tok.encode(text, False, False)
    assert merged.decode([1, 3, *ids[:3], 24, *ids[3:], 11, 2]) == text
    assert merged.decode(ids) == text


def test_empty_audio_gives_empty_text(merged: VoxtralBackend) -> None:
    batch = [np.zeros(0, np.float32), *audio_batch([2.0])]
    out = merged.transcribe(batch)
    assert out[0] == ""
    assert out[1] == merged.transcribe(batch[1:])[0]


def test_rejects_stereo(merged: VoxtralBackend) -> None:
    with pytest.raises(BackendError, match="mono"):
        merged.transcribe([np.zeros((100, 2), np.float32)])


def test_merged_backend_has_one_adapter(merged: VoxtralBackend) -> None:
    assert merged.adapter_names == ("default",)
    assert merged.default_adapter == "default"
    with pytest.raises(BackendError, match="unknown adapter 'rl'"):
        merged.transcribe(audio_batch([1.0]), adapters=["rl"])
    with pytest.raises(BackendError, match="adapter names"):
        merged.transcribe(audio_batch([1.0]), adapters=[None, None])


def test_adapters_per_request_group_into_one_call_each(
    unmerged: VoxtralBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = audio_batch([3.0, 4.0, 5.0, 6.0, 2.0], seed=3)
    names: list[str | None] = [None, "rl", NO_ADAPTER, "rl", "default"]
    calls = _count_generate(unmerged, monkeypatch)
    mixed = unmerged.transcribe(batch, adapters=names)
    assert sorted(calls) == [1, 2, 2]  # default x2, rl x2, plain x1
    for audio, name, text in zip(batch, names, mixed, strict=True):
        assert unmerged.transcribe([audio], adapters=[name]) == [text]
    # The adapters really differ on the same audio.
    same = [batch[0]] * 3
    assert len(set(unmerged.transcribe(same, adapters=["default", "rl", NO_ADAPTER]))) == 3


def test_languages_per_job_batch_like_alone(merged: VoxtralBackend) -> None:
    batch = audio_batch([3.0, 4.0, 5.0, 6.0, 2.0], seed=6)
    codes: list[str | None] = ["fr", None, "de", "auto", "en"]
    jobs = [Job(i, a, language=c) for i, (a, c) in enumerate(zip(batch, codes, strict=True))]
    together = merged.transcribe_jobs(jobs)
    assert together == [merged.transcribe_jobs([j])[0] for j in jobs]
    assert merged.languages == ("auto", "de", "en", "es", "fr", "hi", "it", "nl", "pt")
    # None is model.language ("en" here); other languages change the prompt,
    # and with it what the random model writes.
    english = [Job(j.key, j.audio) for j in jobs]
    assert merged.transcribe_jobs(english)[4].text == together[4].text
    assert merged.transcribe_jobs(english)[0].text != together[0].text
    with pytest.raises(BackendError, match="does not transcribe language 'xx'"):
        merged.transcribe_jobs([Job(0, batch[0], language="xx")])


def test_unmerged_default_equals_merged(merged: VoxtralBackend, unmerged: VoxtralBackend) -> None:
    batch = audio_batch([2.5, 8.0], seed=4)
    assert merged.generate_tokens(batch) == unmerged.generate_tokens(batch)


def test_prefix_is_continued_from_and_counts_against_the_budget(merged: VoxtralBackend) -> None:
    batch = audio_batch([4.0, 9.0], seed=5)
    plain = merged.generate_tokens(batch)
    assert all(len(row) >= 4 for row in plain)
    prefixes = [row[:3] for row in plain]
    rest = merged.generate_tokens(batch, prefixes=prefixes)
    # Greedy decoding fed its own first tokens writes the same continuation.
    assert [p + r for p, r in zip(prefixes, rest, strict=True)] == plain
    for r, a in zip(rest, batch, strict=True):
        assert len(r) <= merged.row_budget(len(a), 3)
    assert merged.row_budget(16000, 100) == 1    # a long prefix never silences the rest


def test_force_tokens_generates_whole_budgets(merged: VoxtralBackend) -> None:
    batch = audio_batch([1.0, 5.0, 9.0], seed=6)
    merged.force_tokens = True
    try:
        before = merged.tokens_generated
        rows = merged.generate_tokens(batch)
    finally:
        merged.force_tokens = False
    budgets = [merged.max_new_tokens(len(a)) for a in batch]
    assert [len(r) for r in rows] == budgets
    assert merged.tokens_generated - before == sum(budgets)


def test_static_cache_equals_dynamic(merged: VoxtralBackend) -> None:
    batch = audio_batch([3.0, 7.0, 1.0], seed=7)
    dynamic = merged.generate_tokens(batch)
    static = VoxtralBackend(merged.loaded, dataclasses.replace(merged._cfg, static_cache=True))
    assert static.generate_tokens(batch) == dynamic


def test_a_generation_config_beyond_greedy_is_ignored_on_every_path(
    tiny_cfg: VoxtralConfig, tiny: Tiny, merged: VoxtralBackend, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A checkpoint's generation_config.json with a repetition penalty would
    change what plain generate writes but not what the decoders write."""
    base = tmp_path / "base"
    shutil.copytree(tiny.base, base)
    gen_file = base / "generation_config.json"
    gen = json.loads(gen_file.read_text())
    gen_file.write_text(json.dumps({**gen, "repetition_penalty": 50.0,
                                    "no_repeat_ngram_size": 1}))
    with caplog.at_level(logging.WARNING):
        odd = load_voxtral_backend(dataclasses.replace(tiny_cfg, base=str(base)), "en")
    (warning,) = [r.getMessage() for r in caplog.records if "generation config" in r.getMessage()]
    assert "no_repeat_ngram_size=1, repetition_penalty=50.0" in warning
    batch = audio_batch([3.0, 6.0, 1.0], seed=4)
    expected = merged.generate_tokens(batch)
    # The random model repeats tokens, so the penalty would have changed them.
    assert any(len(set(row)) < len(row) for row in expected)
    assert odd.generate_tokens(batch) == expected
