"""A seeded random fuzz of the journal against a damaged disk.

See tests/helpers/journal_fuzz.py for what is written, what is done to
the folder and what is checked. The seeds are fixed, so CI runs the same
journals every time; FUZZ_SEEDS=N and FUZZ_SEED0=K run N seeds from K by
hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.fuzz import fuzz_seeds
from tests.helpers.journal_fuzz import check, damage, write_journal

# 8: a journal file copied as "copy of ..."; 14: a zeroed line in a rotated
# file, before finals left whole; 41: a line longer than the file's buffer
# cut short by a full disk, then finals written whole; 81: a final the disk
# refused whole, between finals written.
SEEDS = fuzz_seeds([*range(9), 14, 41, 81])


@pytest.mark.parametrize("seed", SEEDS)
def test_a_damaged_journal_is_read_and_written_as_the_docs_say(seed: int,
                                                              tmp_path: Path) -> None:
    written = write_journal(seed, tmp_path / "j")
    assert not written.problems, f"seed {seed}, as written:\n" + "\n".join(written.problems)
    acts = damage(seed, written)
    problems = check(seed, written, acts)
    assert not problems, (f"seed {seed} after {'; '.join(acts.acts)}:\n"
                          + "\n".join(problems[:30]))
