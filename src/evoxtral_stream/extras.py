"""The install command an error line names for an optional part (an extra).

The package is installed from its checkout (README: ``pip install -e .``),
so the hint is the checkout's command: ``pip install
'evoxtral-stream[mqtt]'`` would ask PyPI for a distribution of that name,
which is not this one's to vouch for.
"""

from __future__ import annotations

__all__ = ["extra_hint"]


def extra_hint(extra: str) -> str:
    """``pip install -e '.[EXTRA]'``, said to be run in the checkout."""
    return f"pip install -e '.[{extra}]' in the evoxtral-stream checkout"
