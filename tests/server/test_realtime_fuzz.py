"""A seeded random fuzz of /v1/realtime through the real server.

See tests/helpers/realtime_fuzz.py for what is sent and what is checked.
The seeds are fixed, so CI runs the same scripts every time; FUZZ_SEEDS=N
and FUZZ_SEED0=K run N seeds from K by hand.
"""

from __future__ import annotations

import pytest

from tests.helpers.fuzz import fuzz_seeds
from tests.helpers.realtime_fuzz import check, run_sequence
from tests.helpers.wire_fuzz import Clips
from tests.speech import have_espeak

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")

SEEDS = fuzz_seeds(8)


@pytest.fixture(scope="module")
def clips() -> Clips:
    return Clips()


@pytest.mark.parametrize("seed", SEEDS)
async def test_realtime_sessions_keep_the_protocol_under_random_clients(
        seed: int, clips: Clips) -> None:
    outcome = await run_sequence(seed, clips)
    problems = check(outcome)
    assert not problems, f"seed {seed} ({outcome.cfg}):\n" + "\n".join(problems[:30])
