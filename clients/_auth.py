"""Access tokens for the command-line clients (docs/protocol.md, "Access control").

Each client takes ``--token TOKEN``, by default ``$EVOXTRAL_TOKEN``, and
sends it as ``Authorization: Bearer TOKEN``: of the server's three carriers
it is the one that stays out of URLs (and so out of proxy logs). The
environment variable is the better way to pass it, because other users can
read a process's options in ``ps`` but not its environment. A server that
does not accept the token answers the handshake with HTTP 401 or 403;
:func:`refusal` turns that answer into one line for people.

A token that is not printable ASCII (the rule of ``hash-token``) is a bad
argument: refused before connecting, and never quoted, as no error line
may quote a token (:func:`redact_tokens` for those that quote a URL or an
exception).

A client that configures logging calls :func:`install_token_redaction`
after ``logging.basicConfig``: with ``--debug``, ``websockets`` logs every
handshake header, ``Authorization`` included.
"""

from __future__ import annotations

import argparse
import os

from websockets.exceptions import InvalidStatus

# The server's own rule and filters: the clients depend on the package already.
from evoxtral_stream.server.auth import install_token_redaction, printable_ascii, redact_tokens

__all__ = ["NOT_PRINTABLE", "TOKEN_ENV", "add_token_option", "auth_headers",
           "install_token_redaction", "redact_tokens", "refusal"]

TOKEN_ENV = "EVOXTRAL_TOKEN"
#: The longest part of the server's refusal body that is shown.
_MAX_REASON = 200
#: Why a token is refused; it must not quote the token.
NOT_PRINTABLE = (f"the token (--token, else ${TOKEN_ENV}) must be printable ASCII: it "
                 "travels in an HTTP header")


def add_token_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--token TOKEN``, defaulting to ``$EVOXTRAL_TOKEN`` (None when unset or empty)."""
    parser.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV) or None, metavar="TOKEN", type=_token,
        help=f"access token for a server with [[auth.tokens]] (default: ${TOKEN_ENV}, "
             "which other users cannot see in the process list, unlike this option)")


def _token(value: str) -> str:
    # argparse applies this to a default given as text too: $EVOXTRAL_TOKEN.
    # An ArgumentTypeError's message is shown as it is; any other error would
    # have argparse quote the value.
    if not printable_ascii(value.strip()):
        raise argparse.ArgumentTypeError(NOT_PRINTABLE)
    return value


def _clean(token: str | None) -> str | None:
    # A token read from a file with $(cat ...) or pasted may carry blanks; the
    # server strips them too, and an all-blank token is no token.
    return (token.strip() or None) if token else None


def auth_headers(token: str | None) -> dict[str, str]:
    """The handshake headers that carry ``token``: none without one.

    Raises ValueError, not quoting it, for a token that is not printable ASCII.
    """
    clean = _clean(token)
    if clean is not None and not printable_ascii(clean):
        raise ValueError(NOT_PRINTABLE)
    return {"Authorization": f"Bearer {clean}"} if clean else {}


def refusal(error: BaseException, token: str | None) -> str | None:
    """One line saying why the server refused the handshake, when ``error`` is
    its HTTP 401 or 403 answer; None for any other error.

    ``token`` is what the client sent (as given to :func:`auth_headers`): with
    none, a 401 means that the server wants one, and the line says how to
    give it. Otherwise the line names the status and the server's reason.
    """
    if not isinstance(error, InvalidStatus) or error.response.status_code not in (401, 403):
        return None
    status = error.response.status_code
    if status == 401 and _clean(token) is None:
        return (f"the server requires a token (HTTP 401): pass --token TOKEN "
                f"or set {TOKEN_ENV}")
    body = bytes(error.response.body).decode("utf-8", "replace").strip()
    # One line, bounded: a proxy in front may answer with a whole HTML page.
    reason = body.splitlines()[0][:_MAX_REASON] if body else error.response.reason_phrase
    what = "the token" if _clean(token) else "the connection"
    return f"the server refused {what} (HTTP {status}): {reason}"
