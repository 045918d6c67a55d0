"""The soak harness itself (bench/soak.py), at a size this machine runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.bench import load_bench


def test_tiny_soak_prints_the_table_and_loses_no_final(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "soak.json"
    argv = ["--backend", "scripted", "--hours", str(3 / 60), "--streams", "2",
            "--subscribers", "1", "--stream-minutes", "1", "--subscriber-minutes", "0.5",
            "--sample-minutes", "1", "--journal-max-bytes", "2048",
            "--journal-retention-s", "1", "--tracemalloc", "--json", str(out_json)]
    assert load_bench("soak").main(argv) == 0

    out = capsys.readouterr().out
    assert "| sample | audio h (all streams) |" in out
    for label in ("start", "25%", "100%", "end"):
        assert f"| {label} |" in out
    assert "Growth: RSS" in out
    assert "Allocation sites that grew most" in out

    r = json.loads(out_json.read_text())
    # Client 0's first connection is half as long: 4 + 3 streams.
    assert r["streams_opened"] == 7
    assert r["audio_h"] == pytest.approx(2 * 3 / 60, rel=0.01)
    assert r["finals_expected"] >= 20
    assert r["finals_ingest"] == r["finals_expected"]
    assert r["finals_lost"] == 0
    assert r["finals_extra"] == 0
    assert r["gaps"] == 0
    assert r["partials"] > 0
    assert r["subscriber_sessions"] >= 3  # it reconnected and resumed
    assert r["journal_max_index"] >= 2  # files rotated
    end = r["end"]
    assert (end["streams_open"], end["journal_open_files"], end["subscribers"]) == (0, 0, 0)
    assert end["heap_mb"] is not None
    assert r["top_growth"]
