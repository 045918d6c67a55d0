"""The seeds a seeded fuzz test runs: fixed for CI, more by hand."""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["fuzz_seeds"]


def fuzz_seeds(default: int | Sequence[int], first: int = 0) -> list[int]:
    """``default`` seeds (a count from ``first``, or a list) unless
    ``FUZZ_SEEDS=N`` asks for N seeds from ``FUZZ_SEED0=K`` (default
    ``first``), as every fuzz test reads them."""
    count = os.environ.get("FUZZ_SEEDS")
    start = int(os.environ.get("FUZZ_SEED0", first))
    if count is not None:
        return list(range(start, start + int(count)))
    if isinstance(default, int):
        return list(range(start, start + default))
    return list(default)
