"""The one interface between the engine and a speech model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["AdapterBackend", "Backend", "BackendError", "BackendUnavailable"]


class BackendError(RuntimeError):
    """A backend failed on a batch; the message is for people."""


class BackendUnavailable(RuntimeError):
    """A backend cannot be loaded (missing weights, library or device).

    The message is one line saying what is missing and which config key to set.
    """


@runtime_checkable
class Backend(Protocol):
    """A speech-to-text model, owned and called by one thread only.

    ``transcribe`` takes a batch of mono 16 kHz float32 arrays in [-1, 1] and
    returns one text per array, in order. It may raise :class:`BackendError`
    (or any exception; the worker treats them alike). ``name`` is a short label
    for logs.
    """

    name: str

    def transcribe(self, batch: Sequence[npt.NDArray[np.float32]]) -> list[str]: ...


@runtime_checkable
class AdapterBackend(Backend, Protocol):
    """A backend that can switch LoRA adapters per request.

    ``adapters`` names one adapter per array (``None``: the default one);
    ``adapter_names`` lists the names it accepts.
    """

    @property
    def adapter_names(self) -> tuple[str, ...]: ...

    def transcribe(
        self,
        batch: Sequence[npt.NDArray[np.float32]],
        adapters: Sequence[str | None] | None = None,
    ) -> list[str]: ...
