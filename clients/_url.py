"""``--url`` of the command-line clients, and the query it may carry.

A URL copied from docs/protocol.md may carry what the server reads from a
query: ``?token=`` (every path), ``?stream=`` and, on ``/v1/captions``,
``?since=`` and ``?epoch=``. Each client takes them as if given by their
options (:func:`take_query`): the parameters of its own (``stream``,
``since``, ``epoch``) it then sets itself on every connection, the token
goes in the ``Authorization`` header as ``--token``'s does, and every other
parameter is sent on as it is (:func:`with_query`). A parameter that says
something else than its option is a bad argument, not a silent choice of one.
So is a ``user:password@``: the server takes no HTTP Basic auth.

The server's page takes its token from the fragment of its link
(``https://host/#token=T``), so a ``#token=`` counts as a ``?token=`` does;
the page reads nothing else there, and neither do the clients. The page's
query names streams with parameters of its own (:data:`PAGE_PARAMETERS`),
which a client takes where they mean what its ``--stream`` does (see
:class:`Role`) and never sends on.

The rest of ``--url`` names the server (:func:`endpoint`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from _auth import TOKEN_ENV

from evoxtral_stream.server.auth import printable_ascii, redact_tokens

__all__ = ["ENDPOINTS", "OWN_PARAMETERS", "PAGE_PARAMETERS", "Role", "UrlQuery",
           "add_url_option", "endpoint", "take_query", "with_query"]

#: The query parameters a client sets itself, from its options.
OWN_PARAMETERS = ("stream", "since", "epoch")
#: The page's own query parameters, which the server does not read:
#: ``streams`` (those it subscribes to) and ``mic`` (its microphone's stream).
PAGE_PARAMETERS = ("streams", "mic")


class Role(Enum):
    """What a client does with ``--stream``, and so which parameters of the
    page's link stand for it, the first one given: a subscriber shows the
    page's ``?stream=`` (the stream the page shows) else its ``?streams=``
    (those it subscribes to); the ingest client streams as ``?mic=`` (the
    page's microphone's stream) else ``?stream=``. Each ignores the other."""

    SUBSCRIBE = ("stream", "streams")
    INGEST = ("mic", "stream")


def add_url_option(parser: argparse.ArgumentParser, default: str, role: Role) -> None:
    """Add ``--url``, whose help lists the forms it takes, the page's link
    as ``role`` reads it among them."""
    if role is Role.INGEST:
        link, query = "https://host/?mic=ID#token=TOKEN", "?stream= (or the page's ?mic=)"
    else:
        link = "https://host/?streams=a,b#token=TOKEN"
        query = "?stream= (or the page's ?streams=), ?since=, ?epoch="
    parser.add_argument(
        "--url", default=default,
        help="the server: HOST:PORT, or a ws://, wss://, http:// or https:// URL, its path a "
             "prefix the server is reached under (https://host/captions-engine/), or the "
             f"page's link ({link}); {query} and ?token= (or #token=) count as the options "
             "(default: %(default)s)")


@dataclass(frozen=True)
class UrlQuery:
    """``--url`` merged with the options: ``url`` holds only the parameters
    no option stands for; the rest are the options' values, or the URL's
    where the option was not given."""

    url: str
    streams: tuple[str, ...]
    since: str | None
    epoch: str | None
    token: str | None


#: The server's WebSocket endpoints: a ``--url`` path ending in one names
#: the server by what comes before it.
ENDPOINTS = ("/v1/captions", "/v1/ingest", "/v1/realtime")


def endpoint(url: str, path: str) -> str:
    """``ws[s]://host:port[/prefix]`` + ``path``; ``http[s]://`` and bare
    ``host:port`` work too.

    The path of ``url`` is a prefix the server is reached under (a reverse
    proxy's ``/captions-engine/``, a slash at its end or not), less an
    endpoint of :data:`ENDPOINTS` it ends with: ``ws://h/p/v1/captions``
    gives ``ws://h/p`` + ``path``. Its query and fragment are dropped.

    Raises ValueError, for people and never quoting a token, for another
    scheme, no host, or a port that is not a number from 1 to 65535.
    """
    def bad(why: str = "") -> ValueError:
        return ValueError(redact_tokens(f"not a ws://HOST:PORT URL: {url!r}{why}"))

    try:
        parts = urlsplit(url if "://" in url else f"ws://{url}")
    except ValueError:  # "Invalid IPv6 URL"
        raise bad() from None
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise bad()
    if not parts.hostname:
        raise bad(": it names no host")
    try:
        port = parts.port
    except ValueError:  # "Port out of range 0-65535", or not a number
        port = 0
    if port is not None and not 0 < port < 65536:
        raise bad(": its port must be a number from 1 to 65535")
    prefix = parts.path.rstrip("/")
    for known in ENDPOINTS:
        if prefix.endswith(known):
            prefix = prefix.removesuffix(known).rstrip("/")
            break
    return urlunsplit((scheme, parts.netloc, prefix + path, "", ""))


def _query(url: str) -> list[tuple[str, str]]:
    try:
        # Strict, as the server decodes it: it refuses a query that is not UTF-8.
        return parse_qsl(urlsplit(url).query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise ValueError("the query of --url is not UTF-8 once percent-decoded") from None


def _fragment(url: str) -> list[tuple[str, str]]:
    # The page reads its fragment as a query (URLSearchParams): so do the clients.
    try:
        return parse_qsl(urlsplit(url).fragment, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise ValueError("the fragment of --url is not UTF-8 once percent-decoded") from None


def _url_token(query: Sequence[tuple[str, str]], fragment: Sequence[tuple[str, str]]
               ) -> tuple[str | None, str]:
    """The token of the URL's ``?token=`` and ``#token=`` (None: none, or
    only blank ones) and how to name where it came from, for messages."""
    carriers = {"?token=": query, "#token=": fragment}
    found = {name: {v.strip() for k, v in pairs if k == "token"} - {""}
             for name, pairs in carriers.items()}
    used = [name for name, tokens in found.items() if tokens]
    where = " and ".join(used) or "?token="
    tokens = set().union(*found.values())
    if len(tokens) > 1:
        # No "=," in it: redact_tokens would take the comma for a token.
        raise ValueError(f"--url gives {where} more than once, each a different token"
                         if len(used) == 1 else f"--url gives different tokens in {where}")
    return next(iter(tokens), None), where


def take_query(url: str, *, streams: Sequence[str], since: str | None, epoch: str | None,
               token: str | None, role: Role) -> UrlQuery:
    """Merge the query of ``url`` with the options given (``streams``: the
    ``--stream`` ids, split on commas; ``token``: ``--token`` or
    ``$EVOXTRAL_TOKEN``), the URL's streams read as ``role`` reads them.

    The token of the URL is that of its ``?token=`` or its ``#token=``
    (the page's link): the same rules hold for both.

    Raises ValueError, for people and never quoting a token, for a URL
    with a ``user:password@``, when the URL and an option disagree
    (``?stream=a`` and ``--stream b``; the same streams in another order
    agree), when the URL gives ``epoch`` twice, or two different tokens
    (in its query, its fragment, or one in each), or a token that is not
    printable ASCII.
    """
    # websockets would send it as HTTP Basic auth, which the server ignores;
    # and with a token, as a second Authorization header, which it refuses.
    if urlsplit(url if "://" in url else f"ws://{url}").netloc.rpartition("@")[1]:
        raise ValueError("--url holds a user name (user:password@): the server takes no "
                         f"HTTP Basic auth; give a token with --token or ${TOKEN_ENV}")
    query = _query(url)
    values: dict[str, list[str]] = {}
    for key, value in query:
        values.setdefault(key, []).append(value)
    named, url_streams = next(
        ((name, found) for name in role.value if (found := _items(values.get(name, [])))),
        ("stream", ()))
    if url_streams and streams and set(url_streams) != set(streams):
        raise ValueError(f"--url asks for ?{named}={','.join(url_streams)!r} and --stream for "
                         f"{','.join(streams)!r}: name the streams in one place")
    url_since = ",".join(v for v in values.get("since", []) if v.strip()) or None
    if url_since is not None and since is not None and url_since != since:
        raise ValueError(f"--url asks for ?since={url_since!r} and --since for {since!r}: "
                         "give it in one place")
    epochs = values.get("epoch", [])
    if len(epochs) > 1:
        raise ValueError("--url gives ?epoch= more than once")
    url_epoch = epochs[0] if epochs else None
    if url_epoch is not None and epoch is not None and url_epoch != epoch:
        raise ValueError(f"--url asks for ?epoch={url_epoch!r} and --epoch for {epoch!r}: "
                         "give it in one place")
    url_token, where = _url_token(query, _fragment(url))
    if url_token is not None and not printable_ascii(url_token):
        raise ValueError(f"the {where} of --url must be printable ASCII: the client sends "
                         "it in an HTTP header")
    mine = (token or "").strip() or None
    if url_token is not None and mine is not None and url_token != mine:
        raise ValueError(f"--url carries a {where} other than --token (or ${TOKEN_ENV}): "
                         "give one token")
    rest = [(k, v) for k, v in query if k not in (*OWN_PARAMETERS, *PAGE_PARAMETERS, "token")]
    return UrlQuery(url=_replace_query(url, rest), streams=tuple(streams) or url_streams,
                    since=since if since is not None else url_since,
                    epoch=epoch if epoch is not None else url_epoch,
                    token=token if mine is not None else url_token)


def _items(values: Sequence[str]) -> tuple[str, ...]:
    # Comma-separated, trimmed, blank ones dropped, as the server reads ?stream=.
    return tuple(dict.fromkeys(
        n for v in values for n in (x.strip() for x in v.split(",")) if n))


def _replace_query(url: str, query: Sequence[tuple[str, str]]) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path,
                       urlencode(query, safe=":,", quote_via=quote), ""))


def with_query(url: str, own: Sequence[tuple[str, str]], *, query_of: str | None = None
               ) -> str:
    """``url`` with the query of ``query_of`` (default: ``url``) less its
    :data:`OWN_PARAMETERS`, then ``own``'s parameters."""
    kept = [(k, v) for k, v in _query(url if query_of is None else query_of)
            if k not in OWN_PARAMETERS]
    return _replace_query(url, [*kept, *own])
