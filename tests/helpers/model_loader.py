"""The command line's model loader replaced, for a test that runs the real
``main`` with a scripted model (or none)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import evoxtral_stream.cli  # noqa: F401  (its commands' modules, each imported)

__all__ = ["replace_model_loader"]


def replace_model_loader(load: Callable[[Any], Any]) -> None:
    """Make ``load`` the ``load_backend`` of every command: each module of
    :mod:`evoxtral_stream.cli` that loads the model looks the name up in its
    own namespace, so each is replaced (none is missed as commands move)."""
    modules: list[Any] = [m for name, m in sorted(sys.modules.items())
                          if name.startswith("evoxtral_stream.cli.")
                          and hasattr(m, "load_backend")]
    assert modules, "no module of evoxtral_stream.cli loads the model"
    for module in modules:
        module.load_backend = load
