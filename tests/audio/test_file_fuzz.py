"""A seeded random fuzz of damaged and odd audio files.

See tests/helpers/audio_fuzz.py for how the files are made and damaged and
what is checked. The seeds are fixed, so CI reads the same files every
time; FUZZ_SEEDS=N and FUZZ_SEED0=K run N seeds from K by hand (each seed
is a batch of files).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.audio import HAVE_ESPEAK
from tests.helpers.audio_fuzz import check_read, make_case
from tests.helpers.fuzz import fuzz_seeds

SEEDS = fuzz_seeds(4)
#: Files per seed: a read takes milliseconds, the whole batch a few seconds.
FILES = 40

pytestmark = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")


@pytest.mark.parametrize("seed", SEEDS)
def test_a_damaged_audio_file_is_read_or_refused_as_the_docs_say(seed: int,
                                                                 tmp_path: Path) -> None:
    problems: list[str] = []
    for n in range(seed * FILES, (seed + 1) * FILES):
        case = make_case(n, tmp_path)
        problems += [f"{case.describe()}: {p}" for p in check_read(case)]
        case.path.unlink(missing_ok=True)
    assert not problems, "\n".join(problems[:20])
