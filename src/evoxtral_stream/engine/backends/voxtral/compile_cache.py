"""Where torch keeps what it compiles, so that a restart does not compile again.

torch's inductor stores every graph it compiles (and, on a GPU, Triton's
kernels) on disk and looks there before compiling a graph again. Its default
folder is under the system's temp folder, which systemd's ``PrivateTmp`` and
a fresh container empty at every start, so each restart of ``serve`` would
compile the slot decoder's steps and the encoder's layers from scratch.
``model.voxtral.compile_cache_dir`` names a folder that survives restarts.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..base import BackendUnavailable, one_line

__all__ = ["CacheTally", "use_compile_cache"]

ENV = "TORCHINDUCTOR_CACHE_DIR"
_KEY = "model.voxtral.compile_cache_dir"


def use_compile_cache(folder: str) -> Path | None:
    """Point inductor's cache at ``folder`` for this process and return it.

    ``folder`` is created if missing (``~`` expanded). ``""`` changes nothing
    (torch's default, or ``$TORCHINDUCTOR_CACHE_DIR`` if set) and returns
    None. Raises :class:`BackendUnavailable` (one line naming the key) when
    the folder cannot be created or written: better at start than a compile
    failing on the first request.
    """
    if not folder:
        return None
    path = Path(folder).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A real write: os.access says yes to root on a read-only mount.
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise BackendUnavailable(
            f"{_KEY} {folder!r} cannot be used: {one_line(e)}; "
            f"set it to a writable folder, or to \"\" for torch's default"
        ) from None
    os.environ[ENV] = str(path)
    return path


class CacheTally:
    """How many of the graphs compiled since it was made came from the cache.

    Reads inductor's own counters, which count per process; a cache that
    torch disabled counts nothing and :meth:`phrase` says nothing.
    """

    def __init__(self) -> None:
        self._hits, self._misses = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        from torch._dynamo.utils import counters

        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    def counts(self) -> tuple[int, int]:
        """(graphs from the cache, graphs compiled) since it was made."""
        hits, misses = self._read()
        return hits - self._hits, hits - self._hits + misses - self._misses

    def phrase(self) -> str:
        """E.g. ``"2 of 2 compiled graphs from the cache in /var/cache/x"``; "" if none."""
        hits, total = self.counts()
        if total == 0:
            return ""
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return f"{hits} of {total} compiled graphs from the cache in {cache_dir()}"
