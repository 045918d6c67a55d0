"""The install command an error line names for an optional part (an extra).

The package is installed from its checkout (README: ``pip install -e .``),
so the hint is the checkout's command: ``pip install
'evoxtral-stream[mqtt]'`` would ask PyPI for a distribution of that name,
which is not this one's to vouch for.
"""

from __future__ import annotations

__all__ = ["extra_hint"]


def extra_hint(extra: str, *, torch_first: bool = False) -> str:
    """``pip install -e '.[EXTRA]'``, said to be run in the checkout;
    ``torch_first``: after installing torch, whose bare requirement would
    pull a CUDA build onto a CPU machine."""
    hint = f"pip install -e '.[{extra}]' in the evoxtral-stream checkout"
    return f"pip install torch (torch==2.13.0 for the CPU), then {hint}" if torch_first else hint
