"""``--url`` read as the clients read it (clients/_url.py): the page's own
link (``https://host/p/?stream=a#token=T``) among the forms it takes."""

from __future__ import annotations

import re

import pytest
from _url import UrlQuery, take_query


def _take(url: str, *, streams: tuple[str, ...] = (), token: str | None = None) -> UrlQuery:
    return take_query(url, streams=streams, since=None, epoch=None, token=token)


def test_the_token_of_the_pages_fragment_counts_as_one_of_the_query() -> None:
    given = take_query("https://h/p/#token=frag-1", streams=(), since=None, epoch=None,
                       token=None)
    assert given.token == "frag-1"
    assert given.url == "https://h/p/"  # the fragment is no part of what is sent
    # The same token by option, or in the query too, is that token.
    assert take_query("h:1/?token=t-1#token=t-1", streams=(), since=None, epoch=None,
                      token=" t-1 ").token == " t-1 "
    # Blanks around it go, as the server drops them; `#token=` alone (the
    # page's "forget the token") is no token, and the option's stands.
    assert take_query("ws://h/#token=%20t-2+", streams=(), since=None, epoch=None,
                      token=None).token == "t-2"
    assert take_query("ws://h/#token=", streams=(), since=None, epoch=None,
                      token="opt-3").token == "opt-3"
    # What else the fragment holds, the page does not read: nor do the clients.
    given = take_query("ws://h/#stream=x&since=9&token=t-4&finals", streams=(), since=None,
                       epoch=None, token=None)
    assert (given.token, given.streams, given.since, given.url) == ("t-4", (), None, "ws://h/")


@pytest.mark.parametrize(("url", "token", "message"), [
    ("ws://h/#token=frag-secret-1", "option-secret-2",
     "--url carries a #token= other than --token (or $EVOXTRAL_TOKEN): give one token"),
    ("ws://h/?token=query-secret-1#token=frag-secret-2", None,
     "--url gives different tokens in ?token= and #token="),
    ("ws://h/#token=frag-secret-1&token=frag-secret-2", None,
     "--url gives #token= more than once, each a different token"),
    ("ws://h/#token=frag-secret-%E2%98%83", None,
     "the #token= of --url must be printable ASCII: the client sends it in an HTTP header"),
    ("ws://h/#token=frag-secret-%FF", None,
     "the fragment of --url is not UTF-8 once percent-decoded"),
], ids=["option", "query-and-fragment", "twice", "not-ascii", "not-utf8"])
def test_a_token_of_the_fragment_that_cannot_be_the_one_sent_is_a_bad_argument(
        url: str, token: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _take(url, token=token)
