"""bench/pipe_read.py: the live pipe path gives the file path's samples, and
the table says what each costs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.bench import load_bench


def test_every_format_through_the_pipe_equals_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("pipe_read")
    out = tmp_path / "pipe.json"
    # measure() raises where the pipe gives other samples than the file.
    assert bench.main(["--seconds", "2", "--live-seconds", "0.3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(bench.FORMATS) * (2 + len(bench.PIECES))
    for row in rows:
        assert row["cpu_s"] >= 0
        assert row["wall_s"] > 0
    paced = [r for r in rows if "real-time pace" in r["path"]]
    assert paced
    assert all(r["wall_s"] >= 0.25 for r in paced)  # written at its pace, not faster
    shown = capsys.readouterr().out
    assert "| 48 kHz stereo 16-bit (arecord -f dat) | file, read whole (reference) | 2 |" in shown
