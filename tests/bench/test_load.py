"""The load harness itself, at a size this machine runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.bench import load_bench
from tests.speech import have_espeak


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
async def test_small_load_loses_no_final() -> None:
    result = await load_bench("load").run_load(2, 6, 6.0)
    assert result.finals_expected >= 2
    assert result.finals_lost == 0
    assert result.dropped_subscribers == 0
    assert 0 < result.latency_p95 < 30


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
def test_scripted_host_load_measures_the_server_process(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "load.json"
    argv = ["--backend", "scripted", "--journal", "on", "--streams", "3",
            "--subscribers", "2", "--seconds", "6", "--json", str(out_json)]
    assert load_bench("load").main(argv) == 0

    out = capsys.readouterr().out
    assert "| streams | subscribers | audio s/stream |" in out
    assert "| scripted | on | 3 |" in out
    r = json.loads(out_json.read_text())
    assert r["finals_expected"] >= 3
    assert r["finals_lost"] == 0
    assert r["partials_per_stream_s"] > 0
    # The clients ran in their own process: the server's CPU is its own,
    # a fraction of the clients' wall time.
    assert 0 < r["server_cpu_s"] < r["ingest_s"]
    assert r["client_cpu_s"] > 0
    assert 0 <= r["loop_lag_p95_ms"] < 5000
    # No model time: a final arrives within seconds of its end of speech.
    assert 0 < r["e2e_p95"] < 5
