"""bench/compile_cache.py: three starts of the tiny backend, the middle one
a restart that finds its compiled graphs (inductor on the CPU).

This is also model.voxtral.compile_cache_dir's restart test: each start is a
process of its own, as a restarted engine is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.bench import load_bench

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.mark.slow
def test_a_restart_with_the_same_folder_compiles_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_bench("compile_cache")
    out = tmp_path / "cache.json"
    # Batch 2: the layers' graphs for one window and for two.
    assert bench.main(["--max-batch", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["run"] for r in rows] == [run for run, _, _ in bench.RUNS]
    first, restart, reference = rows
    assert first["said"].startswith("encoder layers compiled in ")
    assert "; 0 of 2 compiled graphs from the cache in " in first["said"]
    assert first["graphs"] == 2 and first["hits"] == 0
    assert restart["hits"] == restart["graphs"] == first["graphs"]
    assert reference["hits"] == 0 and reference["graphs"] == first["graphs"]
    n = first["graphs"]
    assert f"; {n} of {n} compiled graphs from the cache in " in restart["said"]
    # The restart's encoder, from the cache, gives the first start's states
    # bit for bit.
    assert restart["encoder_sha256"] == first["encoder_sha256"]
    shown = capsys.readouterr().out
    assert "| restart, same folder (compile_cache_dir) | kept | " in shown
