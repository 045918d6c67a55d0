"""Access control and connection limits: pure, synchronous, no sockets.

The server (``app.py``) calls into this module from its handshake hook and
its connection handlers; everything here can be tested without a network:

- :func:`hash_token` and :class:`AccessPolicy`: tokens are configured as
  ``sha256:<hex>`` digests (``[[auth.tokens]]``), each with roles and stream
  glob patterns. A request is granted, or refused with an HTTP status (401:
  no or unknown token; 403: wrong role, stream, or origin).
- :func:`find_credentials`: the three carriers of a token (``Authorization:
  Bearer``, ``?token=``, and the browser's ``evoxtral.token.<TOKEN>``
  WebSocket subprotocol).
- :class:`StreamSlots`, :class:`TokenUsage`, :class:`IngestRate`: the
  accounting behind ``server.max_streams``, the per-token limits and
  ``server.max_ingest_speed``.
- :func:`check_bind` and :func:`tls_context`: start-up checks that raise
  :class:`ConfigError` with a one-line message; :func:`load_server_certificate`
  loads the TLS files, at start and when ``certs.py`` reloads renewed ones.
- :func:`redact_tokens`, :class:`RedactTokens` and :func:`install_token_redaction`:
  keep tokens out of logs (``websockets`` logs every handshake header at DEBUG).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import ssl
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal
from urllib.parse import urlsplit

from ..config import AuthTokenConfig, ConfigError, redact_host

__all__ = [
    "OPENAI_KEY_PREFIX",
    "REDACTED",
    "ROLES",
    "SUBPROTOCOL_PREFIX",
    "AccessPolicy",
    "Credentials",
    "Grant",
    "IngestRate",
    "RedactTokens",
    "Refusal",
    "Role",
    "StreamSlots",
    "TokenUsage",
    "check_bind",
    "find_credentials",
    "hash_token",
    "incomplete_pem",
    "install_token_redaction",
    "is_loopback",
    "key_pair_reason",
    "load_server_certificate",
    "printable_ascii",
    "redact_tokens",
    "tls_context",
]

Role = Literal["ingest", "subscribe", "admin"]
ROLES: tuple[Role, ...] = ("ingest", "subscribe", "admin")
SUBPROTOCOL_PREFIX = "evoxtral.token."
#: How OpenAI's browser clients offer their API key (a subprotocol).
OPENAI_KEY_PREFIX = "openai-insecure-api-key."


def hash_token(token: str) -> str:
    """The form a token is stored in: ``sha256:`` and the hex digest of its UTF-8."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def printable_ascii(token: str) -> bool:
    """Whether ``token`` is printable ASCII (blanks included): the tokens that
    ``hash-token`` hashes and the bundled clients send. Only those match the
    same from every carrier: the server reads a header as Latin-1 and hashes
    the UTF-8 of what it read, and curl sends UTF-8."""
    return all(" " <= c <= "~" for c in token)


@dataclass(frozen=True)
class Credentials:
    """A token as presented, and the subprotocol to echo when it came as one."""

    token: str | None
    subprotocol: str | None = None


def find_credentials(authorization: str | None, subprotocols: Iterable[str],
                     query_tokens: Sequence[str], *, openai_key: bool = False) -> Credentials:
    """The token a request carries, whichever way it came.

    ``authorization`` is the ``Authorization`` header, ``subprotocols`` the
    names offered in ``Sec-WebSocket-Protocol`` (already split on commas) and
    ``query_tokens`` the ``token`` query values. The header wins, then the
    query, then the subprotocol; the subprotocol is reported in every case
    where one was offered, because a browser fails a connection whose
    offered protocol the server does not select. With ``openai_key`` (the
    OpenAI-compatible path), OpenAI's browser carrier of an API key,
    ``openai-insecure-api-key.KEY``, carries a token last of all, so a
    client written for OpenAI passes its token as its API key unchanged
    (that subprotocol is not echoed: the path selects ``realtime``).
    """
    subprotocols = list(subprotocols)
    offered = next((p for p in subprotocols if p.startswith(SUBPROTOCOL_PREFIX)), None)
    from_protocol = offered.removeprefix(SUBPROTOCOL_PREFIX) if offered else None
    if from_protocol is None and openai_key:
        key = next((p for p in subprotocols if p.startswith(OPENAI_KEY_PREFIX)), None)
        from_protocol = key.removeprefix(OPENAI_KEY_PREFIX) if key else None
    token: str | None = None
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            token = value.strip()
    if token is None and query_tokens:
        token = query_tokens[0] or None
    if token is None:
        token = from_protocol or None
    return Credentials(token, offered)


@dataclass(frozen=True)
class Grant:
    """Access granted; ``token`` is None when no tokens are configured (open)."""

    token: AuthTokenConfig | None


@dataclass(frozen=True)
class Refusal:
    """Access refused: the HTTP status (401 or 403) and a one-line reason."""

    status: int
    message: str


def _origin_of(host: str | None, origin: str) -> bool:
    """True when ``origin`` names the server itself (the page it served)."""
    return host is not None and urlsplit(origin).netloc.lower() == host.strip().lower()


def _host_name(host: str) -> str:
    """The name or address of a ``Host`` header (``[::1]:8765`` -> ``::1``)."""
    try:
        return urlsplit("//" + host.strip()).hostname or ""
    except ValueError:   # a malformed port or bracket
        return ""


class AccessPolicy:
    """Decides, per request, whether a path may be used and with which token.

    With no tokens configured every request is granted (the historical,
    local-only behaviour). Browser pages (requests with an ``Origin``) are
    checked in either case: the server's own page, the origins listed, or
    any with ``"*"``. Without the check any web site open in the user's
    browser could read a local server's captions of their microphone. On a
    ``loopback`` server the own-page rule also needs a loopback ``Host``: a
    site whose name was rebound to 127.0.0.1 (DNS rebinding) sends its own
    name as both ``Origin`` and ``Host``.
    """

    def __init__(self, tokens: Sequence[AuthTokenConfig], allowed_origins: Sequence[str],
                 *, loopback: bool = False) -> None:
        self._tokens = tuple(tokens)
        self._origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)
        self._loopback = loopback

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        if "*" in self._origins or origin.rstrip("/").lower() in self._origins:
            return True
        if not _origin_of(host, origin):
            return False
        return not self._loopback or (host is not None and is_loopback(_host_name(host)))

    @property
    def enabled(self) -> bool:
        """Whether any token is configured (and so required)."""
        return bool(self._tokens)

    def lookup(self, token: str) -> AuthTokenConfig | None:
        """The configured token whose digest matches ``token``, if any."""
        digest = hash_token(token)
        found = None
        # Compare against every entry in constant time, so the position of a
        # match does not show in the timing.
        for entry in self._tokens:
            if hmac.compare_digest(entry.hash, digest):
                found = entry
        return found

    def authorize(self, role: Role, streams: Sequence[str] | None, credentials: Credentials,
                  *, origin: str | None = None, host: str | None = None) -> Grant | Refusal:
        """Grant or refuse a connection asking for ``role`` on ``streams``.

        ``streams`` are the stream ids named in the request; none means "all"
        for a subscriber and "a name the server picks" for ingest, which a
        token limited by stream patterns may not ask for. ``None``: the
        request reports on every stream whatever it names (``/metrics``),
        which such a token may not read either. ``origin`` is the
        ``Origin`` header (sent by browsers only), ``host`` the ``Host`` header
        (see the class doc for which origins pass).
        """
        if origin is not None and not self._origin_allowed(origin, host):
            return Refusal(403, f"origin {origin} is not in server.allowed_origins "
                                "(list it there, or \"*\" for any)")
        if not self._tokens:
            return Grant(None)
        if credentials.token is None:
            return Refusal(401, "a token is required: send Authorization: Bearer TOKEN, "
                                "?token=TOKEN or the subprotocol evoxtral.token.TOKEN")
        entry = self.lookup(credentials.token)
        if entry is None:
            return Refusal(401, "unknown token")
        return self._check(entry, role, streams)

    def recheck(self, token: AuthTokenConfig | None, role: Role, streams: Sequence[str]
                ) -> Grant | Refusal:
        """Whether a connection granted ``token`` earlier (by another policy:
        the configuration before a reload) may go on under this one, with the
        same ``role`` and ``streams``. A token is the same when its hash is;
        the grant then carries this policy's entry (its roles and limits)."""
        if not self._tokens:
            return Grant(None)
        if token is None:
            return Refusal(401, "a token is now required")
        entry = next((e for e in self._tokens if hmac.compare_digest(e.hash, token.hash)),
                     None)
        if entry is None:
            return Refusal(401, f"token {token.name or '(unnamed)'} was revoked")
        return self._check(entry, role, streams)

    def _check(self, entry: AuthTokenConfig, role: Role, streams: Sequence[str] | None
               ) -> Grant | Refusal:
        """``entry``'s roles and stream patterns against the request."""
        if role not in entry.roles and "admin" not in entry.roles:
            return Refusal(403, f"token {entry.name or '(unnamed)'} lacks the {role} role")
        if "*" not in entry.streams:
            if streams is None:
                return Refusal(403, f"token {entry.name or '(unnamed)'} is limited to streams "
                                    f"{', '.join(entry.streams)}: /metrics reports on every "
                                    "stream")
            if not streams:
                return Refusal(403, f"token {entry.name or '(unnamed)'} is limited to streams "
                                    f"{', '.join(entry.streams)}: name them with ?stream=ID")
            for stream in streams:
                if not any(fnmatchcase(stream, p) for p in entry.streams):
                    return Refusal(403, f"token {entry.name or '(unnamed)'} may not use "
                                        f"stream {stream}")
        return Grant(entry)


class StreamSlots:
    """The server-wide cap on open streams, counting ingest connections that
    are still handshaking, so two of them cannot both take the last slot or
    the same stream id."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._reserved: set[str] = set()

    def check(self, open_ids: Collection[str]) -> str | None:
        """``too_many_streams`` when no slot is free, else None."""
        if len(self._reserved | set(open_ids)) >= self._limit:
            return "too_many_streams"
        return None

    def reserve(self, stream_id: str, open_ids: Collection[str]) -> str | None:
        """Take a slot for ``stream_id``: None, or the error code that refuses it."""
        if stream_id in self._reserved or stream_id in open_ids:
            return "stream_busy"
        code = self.check(open_ids)
        if code is None:
            self._reserved.add(stream_id)
        return code

    def reserved(self, stream_id: str) -> bool:
        """Whether a handshaking connection holds ``stream_id``."""
        return stream_id in self._reserved

    def release(self, stream_id: str) -> None:
        """Give the slot back; the open stream (if any) still counts until closed."""
        self._reserved.discard(stream_id)


class TokenUsage:
    """Streams and subscribers in use per token, against the token's limits
    (``max_streams``, ``max_subscribers``; 0 = no limit of its own)."""

    def __init__(self) -> None:
        self._used: Counter[tuple[str, str]] = Counter()

    def acquire(self, token: AuthTokenConfig | None, kind: Literal["streams", "subscribers"]
                ) -> bool:
        """Count one more use; False (and nothing counted) when over the limit."""
        if token is None:
            return True
        limit = token.max_streams if kind == "streams" else token.max_subscribers
        key = (token.hash, kind)
        if limit and self._used[key] >= limit:
            return False
        self._used[key] += 1
        return True

    def release(self, token: AuthTokenConfig | None,
                kind: Literal["streams", "subscribers"]) -> None:
        """Undo one :meth:`acquire` that returned True."""
        if token is not None:
            key = (token.hash, kind)
            self._used[key] -= 1
            if self._used[key] <= 0:
                del self._used[key]

    def in_use(self, token: AuthTokenConfig, kind: Literal["streams", "subscribers"]) -> int:
        return self._used[(token.hash, kind)]


class IngestRate:
    """Refuses audio pushed faster than ``max_speed`` times real time.

    A token bucket measured in audio seconds: it holds up to ``burst_s``
    (the grace a client gets, e.g. to send a buffered start at once) and
    refills at ``max_speed`` audio seconds per wall second. A client that
    sends faster than that for long enough to empty the bucket is too fast;
    one that keeps at or below ``max_speed`` never is. ``max_speed`` 0
    disables the check. Times are wall-clock seconds from the caller's clock.
    """

    def __init__(self, max_speed: float, burst_s: float, now: float) -> None:
        self._speed = max_speed
        self._burst = burst_s
        self._level = burst_s
        self._last = now

    @property
    def refusal(self) -> str:
        """What a client refused as too fast is told (``too_fast``)."""
        return f"audio arrives faster than {self._speed:g}x real time (server.max_ingest_speed)"

    def take(self, audio_s: float, now: float) -> bool:
        """Account ``audio_s`` seconds of audio received at ``now``; False if too fast."""
        if self._speed <= 0:
            return True
        self._level = min(self._burst, self._level + (now - self._last) * self._speed)
        self._last = now
        self._level -= audio_s
        return self._level >= 0


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        # Any other host name may resolve to a public address.
        return False


def check_bind(host: str, tokens: Sequence[AuthTokenConfig], allow_anonymous: bool) -> None:
    """Refuse to serve a non-loopback address with no token configured."""
    if not tokens and not allow_anonymous and not is_loopback(host):
        raise ConfigError(
            f"server.host {redact_host(host)!r} is reachable from other machines but no "
            "[[auth.tokens]] is configured: add a token, bind 127.0.0.1, or set "
            "server.allow_anonymous = true")


def tls_context(cert: str, key: str) -> ssl.SSLContext | None:
    """The server's TLS context from PEM files, or None when neither is set.

    Raises :class:`ConfigError` with one line naming the files when they are
    not set together or do not load (:func:`load_server_certificate`). A
    running server loads renewed files into a context of their own and moves
    the handshakes on this one to it (``certs.ServerCertificate``).
    """
    if not cert and not key:
        return None
    if not cert or not key:
        raise ConfigError("server.tls_cert and server.tls_key must be set together, "
                          f"got tls_cert={cert!r}, tls_key={key!r}")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load_server_certificate(ctx, cert, key)
    return ctx


def load_server_certificate(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    """Load the PEM certificate chain ``cert`` and its key ``key`` into ``ctx``.

    Raises :class:`ConfigError` with one line naming the files and the reason;
    anything but a regular file (a folder, a named pipe, whose read would
    block) is refused unread. On an error ``ctx`` may be left with no usable
    key (OpenSSL drops the old one when a certificate that does not match it
    is set): load renewed files into a fresh context, never into one in use
    (``certs.ServerCertificate``).
    """
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        # ssl's own errors do not say which file is at fault.
        if not os.path.isfile(path):
            raise ConfigError(f"server.{name} {path!r} is not a file")

    def encrypted() -> bytes:
        # Without a callback OpenSSL would prompt on the terminal, which hangs
        # a service (and, at a reload, its event loop).
        raise ConfigError(f"server.tls_key {key!r} is encrypted; give an unencrypted key")

    try:
        ctx.load_cert_chain(cert, key, password=encrypted)
    except OSError as e:  # ssl.SSLError included
        # A file cut off first: its reason (BAD_END_LINE, PEM lib) says less.
        detail = (incomplete_pem((("server.tls_cert", cert, "certificate"),
                                  ("server.tls_key", key, "private key")))
                  or key_pair_reason(getattr(e, "reason", None))
                  or e.strerror or str(e))
        raise ConfigError(f"server.tls_cert {cert!r} and server.tls_key {key!r} "
                          f"are not a PEM certificate and its private key ({detail})") from None


#: OpenSSL's reasons for a private key that is not the certificate's, in words.
_NOT_A_PAIR = {
    "KEY_VALUES_MISMATCH": "the private key is not the certificate's",
    "NO_CERTIFICATE_ASSIGNED": "the private key is not the certificate's, another type of key",
}


def key_pair_reason(reason: str | None) -> str | None:
    """OpenSSL's ``reason`` for a failed ``load_cert_chain``, said in words
    where it means the key and certificate are not a pair (the code kept,
    for searching); else as it is."""
    words = _NOT_A_PAIR.get(reason or "")
    return reason if words is None else f"{words}: {reason}"


PemKind = Literal["certificate", "private key"]
_PEM_BEGINS: dict[PemKind, re.Pattern[str]] = {
    "certificate": re.compile(r"-----BEGIN [A-Z0-9 ]*CERTIFICATE-----"),
    "private key": re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"),
}
_PEM_BLOCKS: dict[PemKind, re.Pattern[str]] = {
    "certificate": re.compile(r"-----BEGIN [A-Z0-9 ]*CERTIFICATE-----.+?"
                              r"-----END [A-Z0-9 ]*CERTIFICATE-----", re.DOTALL),
    "private key": re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.+?"
                              r"-----END [A-Z0-9 ]*PRIVATE KEY-----", re.DOTALL),
}


def incomplete_pem(files: Iterable[tuple[str, str, PemKind]]) -> str | None:
    """Which of ``files`` (setting name, path, kind) lacks a whole PEM block,
    or has one cut off after its whole ones (a chain or CA bundle).

    For the errors where OpenSSL only says "PEM lib" or "BAD_END_LINE": a
    renewal caught half written is the usual cause, so naming the file is
    worth the read. None when each file has its blocks whole (or cannot be
    read: the caller says so).
    """
    for name, path, kind in files:
        try:
            with open(path, "rb") as f:
                text = f.read(1 << 20).decode("ascii", errors="replace")
        except OSError:
            continue
        whole = _PEM_BLOCKS[kind]
        if not whole.search(text):
            return f"{name} holds no complete PEM {kind}"
        if _PEM_BEGINS[kind].search(whole.sub("", text)):
            return f"{name} holds a PEM {kind} cut off before its END line"
    return None


# --- tokens out of logs ---------------------------------------------------------------

#: What a token is replaced with in logs.
REDACTED = "***"

# An auth scheme ("Bearer", "Basic", ...), kept in the log: it says which
# carrier was used without saying what it carried.
_SCHEME = r"(?:[A-Za-z][A-Za-z0-9.+-]*[ \t]+)?"
# A header on a line of its own, as websockets logs it ("> Authorization:
# Bearer X") and HTTP sends it: everything after the scheme is secret,
# blanks included (a token read from stdin by hash-token may hold some).
_AUTH_LINE = re.compile(
    r"^(?P<head>[<>]?[ \t]*(?:proxy-)?authorization[ \t]*:[ \t]*" + _SCHEME + r")"
    r"(?P<secret>\S[^\r\n]*?)(?=[ \t]*\r?$)", re.IGNORECASE | re.MULTILINE)
# The header anywhere else (in prose, a dict's repr): up to a blank, quote,
# comma or semicolon, so the rest of the message stays readable.
_AUTH_INLINE = re.compile(
    r"(?P<head>\b(?:proxy-)?authorization['\"]?[ \t]*[:=][ \t]*['\"]?" + _SCHEME + r")"
    r"(?P<secret>[^\s'\",;]+)", re.IGNORECASE)
# A quote that closes a quoted URL or name (``got 'ws://h/?token=X'``): one
# followed by the end, a blank or closing punctuation. It ends the secret
# and stays in the text; a quote inside a token (``a'b``) does not.
_CLOSING_QUOTE = r"""['"](?=[\s,;:.)\]}>]|$)"""
# The subprotocol carrier, wherever it appears (the offered list, the one the
# server selects and echoes): a subprotocol name holds no blank or comma.
# OpenAI's browser clients offer their API key the same way on /v1/realtime:
# no token here, but a real key the user's code may hold.
_SUBPROTOCOL = re.compile(r"(?P<head>(?:" + re.escape(SUBPROTOCOL_PREFIX)
                          + r"|" + re.escape(OPENAI_KEY_PREFIX) + r"))"
                          r"(?P<secret>(?:(?!" + _CLOSING_QUOTE + r")[^\s,\"])+)",
                          re.IGNORECASE)
# On a line that names the Sec-WebSocket-Protocol header (websockets logs the
# header, and quotes it in its error when it refuses it), a carrier's value
# runs to the comma that ends it in the list, blanks included, as the server
# splits the header (app.py): a token with blanks offered so (no browser can)
# is what the server checked, and the rest of the line is more of it.
_PROTOCOL_LINE = re.compile(r"^[^\n]*sec-websocket-protocol[^\n]*", re.IGNORECASE | re.MULTILINE)
_PROTOCOL_ITEM = re.compile(r"(?P<head>(?:" + re.escape(SUBPROTOCOL_PREFIX)
                            + r"|" + re.escape(OPENAI_KEY_PREFIX) + r"))"
                            r"(?P<secret>[^,\r]*?)(?=[ \t]*(?:,|\r|$))", re.IGNORECASE)
# The query carrier, in a request line or a URL: up to the next parameter.
# The server percent-decodes query keys (``?%74oken=`` is ``?token=``), so
# every spelling of the key that decodes to ``token`` is matched. The page's
# link carries a token in its fragment (``/#token=``), which a client's
# ``--url`` may be: ``#`` starts a parameter too.
_QUERY_KEY = "".join(f"(?:{c}|%{ord(c):02x}|%{ord(c.upper()):02x})" for c in "token")
_QUERY = re.compile(r"(?P<head>[?&#]" + _QUERY_KEY + r"=)"
                    r"(?P<secret>(?:(?!" + _CLOSING_QUOTE + r")[^&#\s])+)", re.IGNORECASE)

# websockets' error for a header line it cannot parse (a control character in
# the value: a token file with Windows line ends leaves a CR in curl's header;
# no colon) quotes the value or the line, but not the header's name: any of
# them may be an Authorization value, so each is secret to the end of its line.
_HEADER_ERROR = re.compile(r"(?P<head>invalid HTTP header (?:value|line): )(?P<secret>[^\n]+)",
                           re.IGNORECASE)

# The userinfo of a URL (``ws://user:password@host``), which websockets sends
# as HTTP Basic auth: the password, up to the last ``@`` before the path (a
# password may hold an ``@``), or a user name alone (it may be a token). One
# redacted already (the config's ``<redacted>@``, see redact_host) stays so.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://(?:[^\s/?#@:'\"]*:)?)"
                       r"(?!(?:<redacted>|\*\*\*)@)"
                       r"(?P<secret>(?:(?!" + _CLOSING_QUOTE + r")[^\s/?#])*)@")


def redact_tokens(text: str) -> str:
    """``text`` with every token it carries replaced by :data:`REDACTED`.

    Covers the three carriers: ``Authorization`` values of any scheme (the
    scheme is kept; ``Proxy-Authorization`` too; any case), the part after
    ``evoxtral.token.`` (or OpenAI's ``openai-insecure-api-key.``) of a
    subprotocol (on a ``Sec-WebSocket-Protocol`` line, up to its comma, blanks
    included), ``token=`` query (and fragment) values, and the password of a URL's
    ``user:password@`` (a user name alone too); a quote that closes a quoted
    URL or name stays (``got '...?token=***'``). The value (or line) that
    websockets quotes when it cannot parse a header is redacted whole, to the
    end of its line, quote included. Errs on the side of
    redacting: prose such as ``Authorization: Bearer TOKEN`` is redacted as
    well.
    """
    text = _PROTOCOL_LINE.sub(
        lambda line: _PROTOCOL_ITEM.sub(lambda m: m["head"] + REDACTED, line[0]), text)
    for pattern in (_HEADER_ERROR, _AUTH_LINE, _AUTH_INLINE, _SUBPROTOCOL, _QUERY):
        text = pattern.sub(lambda m: m["head"] + REDACTED, text)
    return _USERINFO.sub(lambda m: m["head"] + REDACTED + "@", text)


class RedactTokens(logging.Filter):
    """A logging filter that redacts tokens (:func:`redact_tokens`) from each
    record's formatted message, traceback and stack; it drops no record.

    Install it on handlers, not loggers: a logger's filters do not see the
    records of its child loggers (``websockets.server`` under
    ``websockets``), while a handler's filters see every record it emits.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            fits = True
        except Exception:
            # Arguments that do not fit the format: the handler would report
            # the mistake with the arguments as they are, so they are shown
            # here instead, redacted.
            message = f"{record.msg!s} (arguments that do not fit: {record.args!r})"
            fits = False
        redacted = redact_tokens(message)
        if redacted != message or not fits:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # Formatted here, as the handler's formatter would, because an
            # exception's message may hold a URL with ?token=.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_tokens(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_tokens(record.stack_info)
        return True


def install_token_redaction(handlers: Iterable[logging.Handler] | None = None) -> None:
    """Add a :class:`RedactTokens` to each of ``handlers`` (default: the root
    logger's, where every propagating record ends up) that lacks one."""
    for handler in logging.getLogger().handlers if handlers is None else handlers:
        if not any(isinstance(f, RedactTokens) for f in handler.filters):
            handler.addFilter(RedactTokens())
