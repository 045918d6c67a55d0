"""A disk that fills up partway through a write, for real: the kernel's
file size limit (``RLIMIT_FSIZE``), which holds for root too (permission
tricks do not), and which a file system cannot be made to do without
mounting one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

resource = pytest.importorskip("resource")  # POSIX only


@contextlib.contextmanager
def disk_full_after(size: int) -> Iterator[None]:
    """For the block, no file of this process grows past ``size`` bytes: a
    write that would is cut there (a short write) and the next one fails
    with EFBIG, as a full disk cuts one and then fails with ENOSPC. Python
    ignores SIGXFSZ, which would otherwise end the process. Pipes and
    terminals have no size: use it where stdout and stderr are captured in
    memory (``capsys``, ``caplog``), not by pytest's file descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
