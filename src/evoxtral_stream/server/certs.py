"""Certificate files that are renewed under a running server.

Let's Encrypt clients and cert-manager renew certificates every 60 to 90 days
and rewrite the PEM files in place, or swap a symlink to a new copy; the
engine runs for months. This module notices such a change and says what to
do about it:

- :func:`fingerprint`: the ``os.stat`` identity of each file (device, inode,
  size, mtime in ns). ``stat`` follows symlinks, so a swapped link shows as
  another inode even when the new file has the same size and time.
- :class:`CertWatcher`: the pure core. Given fingerprints, it says whether the
  files must be loaded again, and whether a failure to load them is news
  (logged once per distinct bad state, retried at every check).
- :class:`ServerCertificate`: the server's ``ssl.SSLContext`` and its two
  files. :meth:`~ServerCertificate.poll` loads renewed files into a context
  of their own, to which each new handshake on the server's context is moved,
  so new handshakes get the new certificate while open connections keep
  theirs; renewed files that do not load (half written, key not matching)
  leave the old certificate in service. The timer that calls it is in
  ``app.py``; the MQTT client (``mqtt.py``) uses :class:`CertWatcher` to
  rebuild its own context before a reconnect.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Iterable
from typing import Literal, NamedTuple

from ..config import ConfigError
from .auth import load_server_certificate, tls_context

__all__ = ["CertWatcher", "FileStamp", "Fingerprint", "ServerCertificate", "fingerprint"]

log = logging.getLogger(__name__)


class FileStamp(NamedTuple):
    """What ``os.stat`` says about one file; any change means "read it again"."""

    device: int
    inode: int
    size: int
    mtime_ns: int


#: One stamp per file, in a fixed order; None for a file that cannot be
#: stat'ed (missing, a dangling link, no permission on its folder).
Fingerprint = tuple[FileStamp | None, ...]


def fingerprint(paths: Iterable[str]) -> Fingerprint:
    """The stamps of ``paths`` now, following symlinks."""
    stamps: list[FileStamp | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append(FileStamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


class CertWatcher:
    """When certificate files must be loaded again, from fingerprints alone.

    Pure: it reads no file and no clock. The caller stats the files
    (:func:`fingerprint`) *before* reading them, so a change made while they
    are read shows at the next check rather than being lost.

    - :meth:`due`: the files differ from those last loaded. This stays true
      after a failed load, so a bad renewal is retried at every check.
    - :meth:`loaded`: the files seen were loaded; they are the reference now.
    - :meth:`failed`: they did not load; True when this bad state (the files
      and the reason) is new, i.e. worth one log line.
    """

    def __init__(self, loaded: Fingerprint) -> None:
        """``loaded``: the fingerprint of the files in use, taken before they were read."""
        self._loaded = loaded
        self._bad: tuple[Fingerprint, str] | None = None

    @property
    def current(self) -> Fingerprint:
        """The fingerprint of the files in use."""
        return self._loaded

    def due(self, seen: Fingerprint) -> bool:
        """Whether files whose fingerprint is ``seen`` must be loaded."""
        if seen == self._loaded:
            # Back to the files in use (a bad renewal undone): nothing to
            # load, and the same failure coming back later is news again.
            self._bad = None
            return False
        return True

    def loaded(self, seen: Fingerprint) -> None:
        """The files were loaded, stat'ed as ``seen`` just before."""
        self._loaded = seen
        self._bad = None

    def failed(self, seen: Fingerprint, reason: str) -> bool:
        """The files stat'ed as ``seen`` did not load; True when this is new."""
        state = (seen, reason)
        news = state != self._bad
        self._bad = state
        return news


class ServerCertificate:
    """The server's TLS context, kept in step with its PEM files.

    :meth:`poll` is synchronous and meant for the event loop's thread: the
    certificate served then never changes in the middle of a handshake there.
    """

    def __init__(self, context: ssl.SSLContext, cert: str, key: str,
                 loaded: Fingerprint) -> None:
        """``loaded``: the fingerprint of ``cert`` and ``key`` taken before
        ``context`` read them."""
        #: The context the server listens with. Renewed files are never loaded
        #: into it: OpenSSL drops its key as soon as a certificate that does
        #: not match is set (a half-renewed pair would break every handshake),
        #: and keeps one certificate per key type (a renewal from ECDSA to RSA
        #: would sit beside the old pair, which handshakes could still choose).
        #: Each handshake on it is moved, at its ClientHello, to the context
        #: holding only the pair loaded last.
        self.context = context
        self.cert = cert
        self.key = key
        self._watcher = CertWatcher(loaded)
        self._serving = context
        context.sni_callback = self._serve_current

    def _serve_current(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                       context: ssl.SSLContext) -> None:
        if self._serving is not context:
            conn.context = self._serving

    @classmethod
    def open(cls, cert: str, key: str) -> ServerCertificate | None:
        """Load the pair (:func:`.auth.tls_context`: ConfigError when unusable);
        None when neither is set."""
        # Stat'ed before the read: a renewal during the read shows at the first poll.
        stamp = fingerprint((cert, key))
        ctx = tls_context(cert, key)
        return None if ctx is None else cls(ctx, cert, key, stamp)

    def poll(self) -> Literal["unchanged", "reloaded", "failed"]:
        """Load the files again if they changed since last loaded; new
        handshakes on :attr:`context` get them from then on.

        ``failed``: they changed but do not load; the previous pair is still
        served, one ERROR line was logged for this bad state, and the next
        poll tries again.
        """
        seen = fingerprint((self.cert, self.key))
        if not self._watcher.due(seen):
            return "unchanged"
        try:
            # Read once, straight from the files (no copies: a read-only root
            # file system has no temporary folder, and a private key has no
            # business in one); the context is used only if both load.
            fresh = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            load_server_certificate(fresh, self.cert, self.key)
        except (ConfigError, OSError) as e:
            if self._watcher.failed(seen, str(e)):
                log.error("server TLS files %s and %s changed but cannot be loaded: %s; "
                          "still serving the previous certificate, and trying again at each "
                          "check", self.cert, self.key, e)
            return "failed"
        self._serving = fresh
        self._watcher.loaded(seen)
        log.info("server TLS certificate reloaded from %s and %s", self.cert, self.key)
        return "reloaded"
