"""The one interface between the engine and a speech model.

Three levels, each optional beyond the first:

- :class:`Backend`: ``transcribe(batch)``, one text per array;
- :class:`JobBackend`: ``transcribe_jobs(jobs)``, with an adapter, a
  language and a committed text prefix per request;
- :class:`SteppingBackend`: continuous batching. Jobs join a running batch
  (``admit``) and leave it when done, between single decode steps
  (``step``), so a final never waits for a long batch to finish.

:class:`WarmsUp` is a capability beside them: work a backend does once
before serving (compiling its decode steps), so a live request never pays it.
:class:`Multilingual` is another: a job backend that takes a language per job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = [
    "AdapterBackend",
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "Done",
    "Job",
    "JobBackend",
    "Multilingual",
    "SteppingBackend",
    "WarmsUp",
    "one_line",
]


def one_line(exc: BaseException) -> str:
    """``exc`` in one line, ``Type: first line``, for an error message or a
    log line; a first line that only introduces what follows ("Error(s) in
    loading state_dict for PeftModel:", "backend='inductor' raised:") keeps
    the next line too."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return f"{type(exc).__name__}: {text}"


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
    ``adapter_names`` lists the names it accepts, ``default_adapter`` the
    one of them that ``None`` means.
    """

    @property
    def adapter_names(self) -> tuple[str, ...]: ...

    @property
    def default_adapter(self) -> str: ...

    def transcribe(
        self,
        batch: Sequence[npt.NDArray[np.float32]],
        adapters: Sequence[str | None] | None = None,
    ) -> list[str]: ...


@dataclass(frozen=True, eq=False)
class Job:
    """One request as a backend sees it; compared by identity.

    ``prefix`` is text the backend may continue from instead of decoding it
    again (the text returned then starts with it); "" decodes from scratch.
    ``draft`` is a guess at the model's first tokens (those of the segment's
    last partial, from :attr:`Done.token_ids`): a backend may check it in one
    pass and keep what it would have decoded anyway, or ignore it; it never
    changes the result. ``language`` is one of a :class:`Multilingual`
    backend's ``languages`` (None: the backend's configured language).
    ``key`` is the caller's handle, returned untouched.
    """

    key: object
    audio: npt.NDArray[np.float32]
    adapter: str | None = None
    prefix: str = ""
    language: str | None = None
    draft: tuple[int, ...] = ()


@dataclass(frozen=True)
class Done:
    """A job's result: its text, how many tokens the model generated for it,
    and the model's token ids of the text (prefix included, and a repetition
    loop the text was cut back from, see :mod:`evoxtral_stream.text.loops`;
    () when the backend does not report them). ``drafted`` is how many tokens of the
    job's draft the backend checked, ``kept`` how many of them it kept."""

    job: Job
    text: str
    tokens: int = 0
    token_ids: tuple[int, ...] = ()
    drafted: int = 0
    kept: int = 0


@runtime_checkable
class JobBackend(Backend, Protocol):
    """A backend that takes :class:`Job` objects: adapter and prefix per request."""

    def transcribe_jobs(self, jobs: Sequence[Job]) -> list[Done]: ...


@runtime_checkable
class SteppingBackend(JobBackend, Protocol):
    """Continuous batching: jobs join and leave a running batch between steps.

    Contract, for the one thread that owns the model:

    - ``admit(jobs)`` encodes and prefills ``jobs`` and adds them to the
      running batch; it returns the ones already done (nothing to generate).
      Only jobs for which ``can_admit`` is true may be given.
    - ``step()`` generates one token for every running job and returns those
      that finished (EOS or their token budget).
    - ``cancel(job)`` drops a running job (its result is no longer wanted);
      False if it is not running.
    - ``abort()`` drops every running job and returns them, leaving the
      backend empty and usable; the owner calls it after ``admit`` or
      ``step`` raised, and decides what to do with those jobs.
    - ``active`` is the number of running jobs.
    """

    @property
    def active(self) -> int: ...

    def can_admit(self, job: Job) -> bool: ...

    def admit(self, jobs: Sequence[Job]) -> list[Done]: ...

    def step(self) -> list[Done]: ...

    def cancel(self, job: Job) -> bool: ...

    def abort(self) -> list[Job]: ...


@runtime_checkable
class WarmsUp(Protocol):
    """A backend with one-off work to do before serving.

    ``warm_up(max_batch)`` runs on the model thread before the first request,
    for batches of up to ``max_batch``; it may take long (compiling) and
    returns a short description of what it did for the log.
    """

    def warm_up(self, max_batch: int) -> str: ...


@runtime_checkable
class Multilingual(JobBackend, Protocol):
    """A job backend that decodes each job in the language it names.

    ``languages`` lists the codes a :class:`Job` may name (ISO 639-1, and
    ``"auto"`` where the model can detect the language itself); jobs of
    different languages may share a batch. A job naming another code fails
    with :class:`BackendError`.
    """

    @property
    def languages(self) -> tuple[str, ...]: ...
