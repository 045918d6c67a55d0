"""A seeded chaos fuzz of the MQTT publisher against a real mosquitto.

See tests/helpers/mqtt_chaos.py for what is fed, how the broker is
disrupted and what is checked. The seeds are fixed, so CI runs the same
scripts every time (the broker's timing varies): 2 to 4 cover a small queue
with restarts kept on disk, and both protocols through restarts that lose
the retained messages, freezes and stalls (about 7 s each). FUZZ_SEEDS=N
and FUZZ_SEED0=K run N seeds from K by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

try:
    import aiomqtt  # noqa: F401
except ImportError:  # the mqtt extra is optional
    pytest.skip("aiomqtt not installed (pip install -e '.[mqtt]')",
                allow_module_level=True)

from tests.helpers.fuzz import fuzz_seeds
from tests.helpers.mqtt_chaos import check, run_chaos
from tests.server.conftest import mosquitto_binary

SEEDS = fuzz_seeds(3, first=2)

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("seed", SEEDS)
async def test_the_publisher_keeps_its_promises_through_broker_chaos(
        seed: int, tmp_path: Path) -> None:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    outcome = await run_chaos(seed, binary, tmp_path)
    problems = check(outcome)
    assert not problems, (f"seed {seed} ({outcome.plan}; {'; '.join(outcome.acts)}):\n"
                          + "\n".join(problems[:30]))
