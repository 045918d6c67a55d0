"""bench/loop_stall.py: both paths feed the same samples, a damaged file's
to its damage, and the table has a row for each file and path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.bench import load_bench


def test_both_paths_feed_the_same_samples_whole_and_damaged(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("loop_stall")
    out = tmp_path / "stall.json"
    # measure() raises where the two paths feed other samples.
    assert bench.main(["--minutes", "0.2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["file"], r["decoded"]) for r in rows] == [
        ("whole", "event loop (reference)"), ("whole", "worker thread"),
        ("damaged", "event loop (reference)"), ("damaged", "worker thread")]
    assert rows[0]["audio_s"] == pytest.approx(12.0)
    assert 0 < rows[2]["audio_s"] < rows[0]["audio_s"]
    assert all(r["longest_gap_ms"] >= r["p99_gap_ms"] > 0 for r in rows)
    assert "| damaged | worker thread |" in capsys.readouterr().out
