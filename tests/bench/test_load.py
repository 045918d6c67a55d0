"""The load harness itself, at a size this machine runs in seconds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.speech import have_espeak

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
async def test_small_load_loses_no_final() -> None:
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_load"] = module
    spec.loader.exec_module(module)
    result = await module.run_load(2, 6, 6.0)
    assert result.finals_expected >= 2
    assert result.finals_lost == 0
    assert result.dropped_subscribers == 0
    assert 0 < result.latency_p95 < 30
