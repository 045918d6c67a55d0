"""``serve`` signalled at random moments keeps what the docs promise
(tests/helpers/signal_fuzz.py). More seeds by hand:
``FUZZ_SEEDS=40 FUZZ_SEED0=1 pytest tests/test_signal_fuzz.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.fuzz import fuzz_seeds
from tests.helpers.signal_fuzz import draw_plan, run_plan
from tests.speech import have_espeak

# term mid-speech, hup_term, handshake, int_twice, loading
SEEDS = fuzz_seeds([14, 0, 5, 7, 19])


@pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng")
@pytest.mark.parametrize("seed", SEEDS)
async def test_serve_stopped_by_signals_keeps_its_promises(seed: int, tmp_path: Path) -> None:
    plan = draw_plan(seed)
    problems = await run_plan(plan, tmp_path)
    assert not problems, f"{plan}:\n" + "\n".join(problems)
