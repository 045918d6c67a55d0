"""bench/voxtral_kernels.py runs end to end on the tiny checkpoint (CPU)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers.bench import load_bench

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")



def _load() -> ModuleType:
    return load_bench("voxtral_kernels")


def test_tiny_run_reports_every_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load()
    out = tmp_path / "rows.json"
    argv = ["--tiny", "--batches", "1,2", "--new-tokens", "3", "--audio-s", "2", "--json", str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["mode"], r["batch"]) for r in rows] == [
        ("unmerged", 1),
        ("reference", 1),
        ("unmerged", 2),
        ("reference", 2),
        ("merged", 1),
        ("merged", 2),
        ("slots", 1),
        ("slots", 2),
    ]
    for r in rows:
        assert r["prep_ms"] > 0 or r["mode"] == "slots"  # slots: prep is inside admit
        assert r["end_to_end_ms"] > 0
        assert r["new_tokens"] == 3
        if r["mode"] != "reference":
            assert r["prefill_ms"] > 0
            assert r["prefill_per_window_ms"] == pytest.approx(r["prefill_ms"] / r["batch"])
            assert math.isfinite(r["decode_per_token_ms"])
    assert data["meta"]["tiny"] is True
    assert r["decode_per_token_ms"] > 0  # the last row: slots
    assert "merged B=2" in capsys.readouterr().out
