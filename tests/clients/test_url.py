"""``--url`` read as the clients read it (clients/_url.py): the page's own
link (``https://host/p/?stream=a#token=T``) among the forms it takes."""

from __future__ import annotations

import re

import pytest
from _url import Role, UrlQuery, endpoint, take_query


def _take(url: str, *, streams: tuple[str, ...] = (), token: str | None = None) -> UrlQuery:
    return take_query(url, streams=streams, since=None, epoch=None, token=token,
                      role=Role.SUBSCRIBE)


def test_the_token_of_the_pages_fragment_counts_as_one_of_the_query() -> None:
    given = _take("https://h/p/#token=frag-1")
    assert given.token == "frag-1"
    assert given.url == "https://h/p/"  # the fragment is no part of what is sent
    # The same token by option, or in the query too, is that token.
    assert _take("h:1/?token=t-1#token=t-1", token=" t-1 ").token == " t-1 "
    # Blanks around it go, as the server drops them; `#token=` alone (the
    # page's "forget the token") is no token, and the option's stands.
    assert _take("ws://h/#token=%20t-2+").token == "t-2"
    assert _take("ws://h/#token=", token="opt-3").token == "opt-3"
    # What else the fragment holds, the page does not read: nor do the clients.
    given = _take("ws://h/#stream=x&since=9&token=t-4&finals")
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


def _streams(url: str, role: Role, streams: tuple[str, ...] = ()) -> tuple[tuple[str, ...], str]:
    given = take_query(url, streams=streams, since=None, epoch=None, token=None, role=role)
    return given.streams, given.url


@pytest.mark.parametrize(("url", "subscribed", "ingested"), [
    # The page's ?streams= (its subscription) is what a subscriber takes;
    # ?stream= (the one it shows) narrows it, as it narrows what the page shows.
    ("https://h/?streams=a,b", ("a", "b"), ()),
    ("https://h/?streams=a,b&stream=a", ("a",), ("a",)),
    # ?mic= (the page's microphone's stream) is the mic client's, before ?stream=.
    ("https://h/?streams=a,b&mic=b&stream=a", ("a",), ("b",)),
    ("https://h/?mic=b", (), ("b",)),
    ("https://h/?mic=&streams=", (), ()),
], ids=["streams", "shown", "mic-and-shown", "mic", "blank"])
def test_the_pages_stream_parameters_stand_for_stream(
        url: str, subscribed: tuple[str, ...], ingested: tuple[str, ...]) -> None:
    assert _streams(url, Role.SUBSCRIBE) == (subscribed, "https://h/")
    assert _streams(url, Role.INGEST) == (ingested, "https://h/")
    # Other parameters go on to the server as they are.
    assert _streams("ws://h/?x=1&streams=a&y=2", Role.SUBSCRIBE) == (("a",), "ws://h/?x=1&y=2")


def test_a_page_stream_parameter_and_stream_that_disagree_are_a_bad_argument() -> None:
    with pytest.raises(ValueError, match=re.escape(
            "--url asks for ?streams='a,b' and --stream for 'c': name the streams in one "
            "place")):
        _streams("ws://h/?streams=a,b", Role.SUBSCRIBE, ("c",))
    with pytest.raises(ValueError, match=re.escape(
            "--url asks for ?mic='a' and --stream for 'c': name the streams in one place")):
        _streams("ws://h/?mic=a&stream=c", Role.INGEST, ("c",))
    # The same streams agree, whichever parameter names them.
    assert _streams("ws://h/?streams=b,a", Role.SUBSCRIBE, ("a", "b"))[0] == ("a", "b")


def test_the_pages_link_names_the_server_it_is_served_by() -> None:
    """The page lives at the server's ``/``, or at a proxy's prefix with a
    slash at its end: the endpoints are beside it."""
    assert endpoint("https://h/#token=t", "/v1/captions") == "wss://h/v1/captions"
    assert endpoint("http://h:8765/?stream=a#token=t", "/v1/ingest") == "ws://h:8765/v1/ingest"
    assert endpoint("https://h/captions-engine/?streams=a,b&mic=b#token=t", "/v1/ingest") == \
        "wss://h/captions-engine/v1/ingest"
