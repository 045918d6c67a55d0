"""The embedded Whisper backend: what it answers for empty audio, and which
model folders it refuses at load with one line."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from evoxtral_stream.config import WhisperConfig, load_config
from evoxtral_stream.engine.backends.base import Backend, BackendUnavailable, Job
from evoxtral_stream.engine.backends.whisper import (
    WhisperBackend,
    embedded_model_path,
    load_whisper_backend,
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
