"""``serve`` signalled at random moments keeps what the docs promise
(tests/helpers/signal_fuzz.py). More seeds by hand:
``FUZZ_SEEDS=1-40 pytest tests/test_signal_fuzz.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.signal_fuzz import draw_plan, run_plan
from tests.speech import have_espeak


def _seeds() -> list[int]:
    raw = os.environ.get("FUZZ_SEEDS", "")
    if not raw:
        return [14, 0, 5, 7, 19]  # term mid-speech, hup_term, handshake, int_twice, loading
    lo, _, hi = raw.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


@pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng")
@pytest.mark.parametrize("seed", _seeds())
async def test_serve_stopped_by_signals_keeps_its_promises(seed: int, tmp_path: Path) -> None:
    plan = draw_plan(seed)
    problems = await run_plan(plan, tmp_path)
    assert not problems, f"{plan}:\n" + "\n".join(problems)
