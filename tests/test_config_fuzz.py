"""A seeded random fuzz of the configuration: a config that loads must run.

See tests/helpers/config_fuzz.py for what is drawn, run and checked. The
seeds are fixed, so CI runs the same configs every time; FUZZ_SEEDS=N and
FUZZ_SEED0=K run N seeds from K by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.config_fuzz import Clip, check, draw, load, run
from tests.helpers.fuzz import fuzz_seeds
from tests.speech import have_espeak

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")

# Files and the server, both batchings, short segments, tight queues, no
# history, partials off, and two refused (a cross-key rule, a floor).
SEEDS = fuzz_seeds([0, 1, 2, 11, 14, 16, 20, 23, 26])


@pytest.fixture(scope="module")
def clip() -> Clip:
    return Clip.make()


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_config_that_loads_runs(seed: int, clip: Clip, tmp_path: Path) -> None:
    d = draw(seed)
    cfg, problems = load(d, tmp_path)
    if cfg is not None and not problems:
        problems = check(d, cfg, await run(d, cfg, clip))
    assert not problems, f"{d}:\n" + "\n".join(problems[:30])
