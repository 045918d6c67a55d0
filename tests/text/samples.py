"""Tagged scripts for tests, copied from the Evoxtral scripts (the seed's
``data/scripts/scripts.json``) into ``scripts_sample.json``: a spread of slice
types, every rare tag, and the typographic edge cases (dashes, quotes, ``$``).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["SCRIPTS", "TRIPLE_REPEATS"]

_DATA = json.loads((Path(__file__).parent / "scripts_sample.json").read_text(encoding="utf-8"))

SCRIPTS: tuple[str, ...] = tuple(_DATA["scripts"])

# Scripts that say a word three times in a row: at a forced seam with audio
# overlap the overlap's length is ambiguous there (see the merger's docs).
TRIPLE_REPEATS: tuple[str, ...] = tuple(_DATA["triple_repeats"])
