"""``serve`` signalled at random moments keeps what the docs promise
(tests/helpers/signal_fuzz.py), and so does a Ctrl-C at any moment of a
short command (tests/helpers/start_fuzz.py). More seeds by hand:
``FUZZ_SEEDS=40 FUZZ_SEED0=1 pytest tests/test_signal_fuzz.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.fuzz import fuzz_seeds
from tests.helpers.signal_fuzz import draw_plan, run_plan
from tests.helpers.start_fuzz import draw_start_plan, run_start_plan
from tests.speech import have_espeak

# term mid-speech, hup_term, handshake, int_twice, loading
SEEDS = fuzz_seeds([14, 0, 5, 7, 19])


@pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng")
@pytest.mark.parametrize("seed", SEEDS)
async def test_serve_stopped_by_signals_keeps_its_promises(seed: int, tmp_path: Path) -> None:
    plan = draw_plan(seed)
    problems = await run_plan(plan, tmp_path)
    assert not problems, f"{plan}:\n" + "\n".join(problems)


@pytest.mark.parametrize("seed", fuzz_seeds(3))
def test_a_ctrl_c_at_any_moment_of_a_command_is_its_line_and_130(seed: int) -> None:
    """One Ctrl-C anywhere in a short command's life (tests/helpers/start_fuzz.py):
    130 and its one line, or status 0 and the whole output once it had
    finished. In its first tens of milliseconds (asyncio and argparse
    importing, before the guard around the project's imports) it was a
    traceback and death by SIGINT; a library turning the KeyboardInterrupt
    into another error (webrtcvad's NameError, numpy's ImportError) was a
    traceback and status 1; a Ctrl-C during the exit (100 ms and more: numpy
    unloading) died by SIGINT after the whole output."""
    plan = draw_start_plan(seed)
    problems = run_start_plan(plan)
    assert not problems, f"{plan}:\n" + "\n".join(problems)
