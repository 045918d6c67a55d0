"""A seeded random fuzz of the batched decode paths: every job decodes as alone.

See tests/helpers/batch_fuzz.py for what is drawn and what is checked. The
seeds are fixed, so CI runs the same cases every time; FUZZ_SEEDS=N and
FUZZ_SEED0=K run N seeds from K by hand.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from evoxtral_stream.engine.backends.voxtral.backend import VoxtralBackend
from evoxtral_stream.engine.backends.voxtral.slots import SlotDecoder
from tests.helpers.batch_fuzz import Case, draw, run
from tests.helpers.fuzz import fuzz_seeds

# 5: a model prone to EOS, two windows, an abort; 8: EOS held back, a ring no
# longer than needed, an abort; 12: EOS again, one first slot; 18: two
# adapters on the unmerged model.
SEEDS = fuzz_seeds([5, 8, 12, 18])
# 0: one step shared between buckets; 1: one per bucket, with lookahead.
COMPILED_SEEDS = fuzz_seeds([0, 1])


def _unmerged(case: Case, request: pytest.FixtureRequest) -> VoxtralBackend | None:
    """The unmerged backend (loaded on first use) for a case with adapters."""
    if not case.adapters:
        return None
    backend = request.getfixturevalue("unmerged")
    assert isinstance(backend, VoxtralBackend)
    return backend


@pytest.mark.parametrize("seed", SEEDS)
def test_random_schedules_decode_every_job_as_alone(
    merged: VoxtralBackend, request: pytest.FixtureRequest, seed: int
) -> None:
    case = draw(seed)
    report = run(case, merged, _unmerged(case, request))
    assert not report.problems, case.describe() + "\n" + "\n".join(report.problems[:30])


@pytest.mark.slow
@pytest.mark.parametrize("seed", COMPILED_SEEDS)
def test_compiled_steps_decode_every_job_as_alone(
    merged: VoxtralBackend, request: pytest.FixtureRequest, seed: int
) -> None:
    """The slot cache's step compiled (``aot_eager``: dynamo tracing and the
    functionalised cache writes, no C compiler), shared between buckets or
    not, with lookahead or without, as the seed says. At least 4 slots: with
    2, the shared step's symbolic batch size could only be 2, and dynamo
    refuses to compile it (the engine starts at 8)."""
    case = draw(seed)
    case = dataclasses.replace(case, first_slots=max(4, case.first_slots))
    shared, lookahead = seed % 2 == 0, seed % 4 in (1, 2)

    def compiled(backend: VoxtralBackend) -> SlotDecoder:
        return SlotDecoder(backend, compile={"backend": "aot_eager", "fullgraph": True,
                                             "dynamic": False},
                           lookahead=lookahead, shared=shared)

    torch._dynamo.reset()
    try:
        report = run(case, merged, _unmerged(case, request), ("compiled",), compiled)
    finally:
        torch._dynamo.reset()
    assert not report.problems, (f"shared {shared}, lookahead {lookahead}; " + case.describe()
                                 + "\n" + "\n".join(report.problems[:30]))
