"""model.voxtral.compile_cache_dir: compiled graphs survive a restart."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from evoxtral_stream.config import VoxtralConfig
from evoxtral_stream.engine.backends.base import BackendUnavailable
from evoxtral_stream.engine.backends.voxtral.backend import load_voxtral_backend
from evoxtral_stream.engine.backends.voxtral.compile_cache import (
    ENV,
    CacheTally,
    use_compile_cache,
)
from evoxtral_stream.engine.backends.voxtral.encoder import encoder_parts

from .helpers import audio_batch


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_an_empty_setting_leaves_torchs_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "/somewhere/else")
    assert use_compile_cache("") is None
    assert os.environ[ENV] == "/somewhere/else"


def test_a_folder_is_created_and_becomes_inductors_cache(
    tiny_cfg: VoxtralConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    folder = tmp_path / "cache" / "compile"
    load_voxtral_backend(dataclasses.replace(tiny_cfg, compile_cache_dir=str(folder)), "en")
    assert folder.is_dir()
    assert not list(folder.iterdir())  # the write check leaves nothing behind
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(folder)


def test_a_folder_that_cannot_be_written_stops_the_load_in_one_line(
    tiny_cfg: VoxtralConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    (tmp_path / "file").write_text("not a folder")
    bad = str(tmp_path / "file" / "compile")
    with pytest.raises(BackendUnavailable) as info:
        load_voxtral_backend(dataclasses.replace(tiny_cfg, compile_cache_dir=bad), "en")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"model.voxtral.compile_cache_dir {bad!r} cannot be used: ")
    assert "Not a directory" in msg
    assert ENV not in os.environ  # nothing half set


def test_the_tally_counts_only_what_compiled_after_it(fresh_dynamo: None) -> None:
    from torch._dynamo.utils import counters

    counters["inductor"]["fxgraph_cache_hit"] += 3
    tally = CacheTally()
    assert tally.counts() == (0, 0)
    assert tally.phrase() == ""
    counters["inductor"]["fxgraph_cache_hit"] += 1
    counters["inductor"]["fxgraph_cache_miss"] += 2
    assert tally.counts() == (1, 3)
    assert tally.phrase().startswith("1 of 3 compiled graphs from the cache in ")


@pytest.mark.slow
def test_a_restarted_engine_takes_its_compiled_encoder_from_the_cache(
    tiny_cfg: VoxtralConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    fresh_dynamo: None,
) -> None:
    """Real inductor on the CPU, twice with one folder: the second warm-up
    (what a restart or a reloaded model thread runs) compiles nothing, and
    its encoder gives the first one's hidden states."""
    monkeypatch.delenv(ENV, raising=False)
    folder = tmp_path / "compile"
    cfg = dataclasses.replace(tiny_cfg, encoder_compile=True, compile_cache_dir=str(folder))
    feats: torch.Tensor | None = None
    states = []
    said = []
    for _ in range(2):
        torch._dynamo.reset()  # what a new process starts from
        backend = load_voxtral_backend(cfg, "en")
        said.append(backend.warm_up(2))
        if feats is None:
            feats = backend.features(audio_batch([3.0], seed=41)).to(backend.loaded.dtype)
        with torch.inference_mode():
            states.append(encoder_parts(backend.model)[0](feats).last_hidden_state)
    assert said[0].startswith("encoder layers compiled in ")
    assert said[0].endswith(f"; 0 of 2 compiled graphs from the cache in {folder}")
    assert said[1].endswith(f"; 2 of 2 compiled graphs from the cache in {folder}")
    assert any(folder.iterdir())
    torch.testing.assert_close(states[1], states[0], rtol=0, atol=0)
