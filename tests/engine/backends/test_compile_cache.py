"""model.voxtral.compile_cache_dir: compiled graphs survive a restart.

The restart itself (a process of its own that compiles nothing and gets the
first one's encoder states) is tests/bench/test_compile_cache.py's: the
compile-cache bench runs exactly those starts."""

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
