"""The load harness itself, at a size this machine runs in seconds."""

from __future__ import annotations

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
