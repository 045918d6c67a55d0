"""Terminal caption viewer for an evoxtral-stream server.

    python clients/viewer.py --url ws://127.0.0.1:8765 [--stream ID] [--since SEQ]

Subscribes to ``/v1/captions`` (docs/protocol.md) and prints the captions:
each final as a line on stdout, each stream's live partial redrawn in place
on a row of its own on a terminal (stable text plain, unstable text dim,
tags coloured by kind).
Status lines (hello, stream started/ended, gaps, errors) go to stderr. When
the connection drops, the viewer reconnects with ``since=STREAM:SEQ`` for
every stream it has seen, so no final is lost (or a ``gap`` says which were):
the live ones first, then those that ended, the latest first, as many as fit
in a URL a server takes (:func:`~evoxtral_stream.server.protocol.resume_since`),
and ``epoch=`` from the last hello, so a server restarted without its journal
replays its new numbering from the start instead of after the old seq.
A server with access tokens gets ``--token`` (default ``$EVOXTRAL_TOKEN``) as
``Authorization: Bearer``; a refused token ends the viewer with one line.

The rendering is pure: :func:`render_event` turns one protocol message into
the text to show; :class:`LiveWriter` decides where and how it is written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from _auth import add_token_option, auth_headers, redact_tokens, refusal
from _loop import run_client
from _terminal import closed_stderr_dropped, closed_stdout_refused, lenient_output
from _url import Role, add_url_option, endpoint, take_query, with_query
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from evoxtral_stream.console import LiveRows, format_time, printable, redraws, text_columns
from evoxtral_stream.server.protocol import (
    finite_seconds,
    hello_epoch,
    parse_epoch,
    resume_since,
)
from evoxtral_stream.server.protocol import parse_since as parse_since_values
from evoxtral_stream.text.chars import graphemes
from evoxtral_stream.text.tags import holds_digit, lookup_tag, normalize_tag_name

__all__ = [
    "KIND_COLORS",
    "LiveWriter",
    "build_parser",
    "captions_url",
    "endpoint",
    "main",
    "open_streams",
    "parse_since",
    "render_event",
    "use_color",
    "watch",
]

PROTOCOL_VERSION = 1
#: SGR colour per tag kind (docs/protocol.md): stable tags bold, unstable dim.
KIND_COLORS = {"emotion": "33", "non-verbal": "36", "delivery": "35", "pause": "34",
               "unknown": "31"}
_DIM = "2"
_RESET = "\x1b[0m"
_TAG = re.compile(r"\[([^\[\]]*)\]")
_CLOSE_POLICY = 1008

# A piece of output: its text and its SGR parameters ("" for plain).
_Piece = tuple[str, str]


# --- rendering (pure) ---------------------------------------------------------


def _tag_kinds(event: Mapping[str, Any]) -> dict[str, str]:
    tags = event.get("tags")
    return {normalize_tag_name(str(t.get("tag", ""))): str(t.get("kind", "unknown"))
            for t in (tags if isinstance(tags, list) else []) if isinstance(t, dict)}


def _seconds(value: object) -> float | None:
    """``value`` as seconds a clock shows (:func:`finite_seconds`, under 10⁹), else None."""
    seconds = finite_seconds(value)
    return seconds if seconds is not None and abs(seconds) < 1e9 else None


def _time(value: object) -> str:
    seconds = _seconds(value)
    return "?" if seconds is None else format_time(seconds)


def _duration(value: object) -> str:
    seconds = _seconds(value)
    return "?" if seconds is None else f"{seconds:.1f}"


def open_streams(hello: Mapping[str, Any]) -> list[str]:
    """The stream ids a ``hello`` lists (none when ``streams`` is no list;
    items that are no string are left out)."""
    streams = hello.get("streams")
    return [s for s in streams if isinstance(s, str)] if isinstance(streams, list) else []


def _kind(inner: str, kinds: Mapping[str, str]) -> str:
    """The server's kind for a tag, else the known tag set's, else ``unknown``."""
    found = kinds.get(normalize_tag_name(inner))
    if found is not None:
        return found
    spec = lookup_tag(inner)
    return spec.kind.value if spec is not None else "unknown"


def _pieces(text: str, kinds: Mapping[str, str], unstable: bool) -> list[_Piece]:
    plain = _DIM if unstable else ""
    out: list[_Piece] = []
    pos = 0
    for m in _TAG.finditer(text):
        if not m.group(1).strip() or holds_digit(m.group(1)):
            continue  # no tag: blank, or a number ("[1]", "array[0]") that is text
        if m.start() > pos:
            out.append((text[pos:m.start()], plain))
        colour = KIND_COLORS.get(_kind(m.group(1), kinds), KIND_COLORS["unknown"])
        out.append((m.group(), f"{_DIM if unstable else '1'};{colour}"))
        pos = m.end()
    if pos < len(text):
        out.append((text[pos:], plain))
    return out


def _clip(pieces: list[_Piece], room: int) -> list[_Piece]:
    """Drop text from the start so that it takes at most ``room`` terminal
    columns (``…`` first): a row wider than the terminal wraps, and clearing
    the row to redraw a partial would leave its first part on the screen."""
    excess = sum(text_columns(t) for t, _ in pieces) - room
    if excess <= 0:
        return pieces
    drop = excess + 1
    out: list[_Piece] = [("…", "")]
    for text, style in pieces:
        # Whole user-perceived characters: a letter's marks go with it, those
        # that take a column too (Hindi's ि, ी, ो), or they would begin the row.
        chars = graphemes(text)
        i = 0
        while i < len(chars) and (drop > 0 or text_columns(chars[i]) == 0):
            drop -= text_columns(chars[i])
            i += 1
        if i < len(chars):
            out.append(("".join(chars[i:]), style))
            drop = 0  # a wide character may have taken one column more
    return out


def _paint(pieces: Sequence[_Piece], color: bool) -> str:
    return "".join(f"\x1b[{style}m{text}{_RESET}" if color and style else text
                   for text, style in pieces)


def _caption(event: Mapping[str, Any], color: bool, show_stream: bool,
             width: int | None) -> str | None:
    final = bool(event.get("final"))
    text = printable(str(event.get("text", "")))
    if not text:
        return None
    kinds = _tag_kinds(event)
    stable, unstable = (printable(v) if isinstance(v, str) else v
                        for v in (event.get("stable"), event.get("unstable")))
    if final or not isinstance(stable, str) or not isinstance(unstable, str) \
            or stable + unstable != text:
        body = _pieces(text, kinds, unstable=not final)
    else:
        body = _pieces(stable, kinds, False) + _pieces(unstable, kinds, True)
    span = f"[{_time(event.get('start', 0))} → {_time(event.get('end', 0))}]"
    prefix = f"{printable(str(event.get('stream')))} {span}" if show_stream else span
    if width is not None:
        body = _clip(body, max(10, width - text_columns(prefix) - 1))
    return _paint([(prefix, _DIM), (" ", ""), *body], color)


def render_event(event: Mapping[str, Any], *, color: bool = True, show_stream: bool = True,
                 width: int | None = None) -> str | None:
    """The text to show for one protocol message, without a trailing newline.

    - ``caption``: ``[stream ][m:ss.s → m:ss.s] text``. Tags are highlighted
      with :data:`KIND_COLORS` by the kind the server gave them (else the
      known tag set's, else ``unknown``); a final is all stable text; a
      partial shows ``stable`` plain and ``unstable`` dim. ``width`` (terminal
      columns: a wide character takes two, a combining mark none) keeps the
      end of the text and elides the start, so a partial fits one terminal
      row. None for a caption with no text. A start or end that is no
      finite number is shown as ``?``.
    - ``hello``, ``stream.started``/``ended``, ``gap``, ``error``,
      ``ingest.ready``/``summary``: a one-line status.
    - anything else: None.

    ``color=False`` gives plain text with no escape sequences at all: the
    control characters of a caption, a stream id or any other field are shown
    as spaces, with colour too.
    """
    kind = event.get("type")
    if kind == "caption":
        return _caption(event, color, show_stream, width)
    line: str | None
    style = _DIM
    if kind == "hello":
        streams = ", ".join(open_streams(event)) or "none"
        epoch = f", epoch {event['epoch']}" if isinstance(event.get("epoch"), str) else ""
        line = (f"connected to {event.get('server')} {event.get('version')} "
                f"(backend {event.get('backend')}{epoch}); open streams: {streams}")
    elif kind == "stream.started":
        line = f"▶ {event.get('stream')} started ({event.get('source')})"
    elif kind == "stream.ended":
        line = (f"■ {event.get('stream')} ended: {event.get('finals')} finals, "
                f"{_duration(event.get('duration', 0))} s")
    elif kind == "gap":
        last = event.get("to")
        if last is None:
            # Not a loss for sure: most often the server restarted without
            # its journal and numbers the stream anew; its captions follow.
            line = (f"! {event.get('stream')}: the server cannot place caption "
                    f"{event.get('from')} (it restarted, or forgot the stream); "
                    "showing all it has")
        else:
            line = (f"! {event.get('stream')}: captions {event.get('from')}–{last} "
                    "are no longer retained")
        style = KIND_COLORS["unknown"]
    elif kind == "error":
        where = f" ({event['stream']})" if event.get("stream") else ""
        line = f"! {event.get('code')}: {event.get('message')}{where}"
        style = KIND_COLORS["unknown"]
    elif kind == "ingest.ready":
        line = (f"streaming to {event.get('stream')} "
                f"({event.get('sample_rate')} Hz, {event.get('format')})")
    elif kind == "ingest.summary":
        line = (f"{event.get('stream')}: {_duration(event.get('duration', 0))} s of audio, "
                f"{event.get('segments')} segments, {event.get('finals')} finals, "
                f"{event.get('partials')} partials, {event.get('errors')} errors")
    else:
        line = None
    # Every field is the server's: its control characters are spaces too.
    return None if line is None else _paint([(printable(line), style)], color)


# --- output -------------------------------------------------------------------


class LiveWriter:
    """Writes protocol messages as :func:`render_event` renders them.

    Captions go to ``out``: finals as lines; with ``live`` each stream's
    partial is redrawn in place on a row of its own, below the finals
    (:class:`~evoxtral_stream.console.LiveRows`: at most 8, fewer on a short
    terminal), until the next partial or a final of that stream replaces it
    (one with no text just clears it); without ``live`` partials are not
    written. Every other message, and :meth:`status` lines, go to ``err``
    after clearing the partial rows shown on the same terminal, which are
    drawn again below the line; a stream's own end, error or new run takes
    its row away.
    """

    def __init__(self, out: TextIO, err: TextIO, *, color: bool, live: bool,
                 show_stream: bool) -> None:
        self.out = out
        self.err = err
        self.color = color
        self.live = live
        self.show_stream = show_stream
        self._rows = LiveRows()

    def show(self, event: Mapping[str, Any]) -> None:
        # Keyed by repr: the field is the server's, maybe no string at all.
        stream = repr(event.get("stream"))
        if event.get("type") != "caption":
            line = render_event(event, color=self.color)
            if line is not None:
                self._rows.set(stream, None)
                self.status(line, styled=True)
            return
        if event.get("final"):
            self._rows.set(stream, None)
            self._erase()
            line = render_event(event, color=self.color, show_stream=self.show_stream)
            if line is not None:
                self.out.write(line + "\n")
            self._draw()
        elif self.live:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            line = render_event(event, color=self.color, show_stream=self.show_stream,
                                width=width)
            if line is None and stream not in self._rows:
                return
            # A partial with no text (a segment rated no speech): what its
            # row shows is no longer the segment's.
            self._rows.set(stream, line)
            self._erase()
            self._draw()

    def status(self, text: str, *, styled: bool = False) -> None:
        """A line on ``err`` (dim on a colour terminal unless already ``styled``,
        as :func:`render_event` styles it), above the partial rows. Control
        characters in ``text`` that is not ``styled`` (it may quote the
        server) are written as spaces."""
        self._erase()
        if not styled:
            text = printable(text)
        self.err.write((text if styled or not self.color else _paint([(text, _DIM)], True))
                       + "\n")
        self.err.flush()
        self._draw()

    def clear(self) -> None:
        """Remove the partials shown in place, if any, for good."""
        self._erase()
        self._rows.clear()
        self.out.flush()

    def _erase(self) -> None:
        if self._rows.shown:
            self.out.write(self._rows.erase())

    def _draw(self) -> None:
        if self._rows:
            self.out.write(self._rows.erase() + self._rows.draw(
                shutil.get_terminal_size((100, 24)).lines))
        self.out.flush()


# --- the subscription ------------------------------------------------------------


def parse_since(value: str | None, streams: Sequence[str]) -> dict[str, int]:
    """``--since``: ``SEQ`` (for every ``--stream``) or ``STREAM:SEQ[,STREAM:SEQ...]``.

    Raises ValueError with a message for people (the server's own parser).
    """
    return parse_since_values([value or ""], streams, streams_by="--stream")


def captions_url(base: str, streams: Sequence[str], since: Mapping[str, int],
                 epoch: str | None = None) -> str:
    """The ``/v1/captions`` URL for ``streams`` (all when empty), resuming after
    ``since``, seqs of the numbering ``epoch`` names (None: unknown); the
    other parameters of ``base``'s query (``token`` among them) are kept."""
    query: list[tuple[str, str]] = []
    if streams:
        query.append(("stream", ",".join(streams)))
    if since:
        query.append(("since", ",".join(f"{name}:{seq}" for name, seq in since.items())))
        if epoch is not None:
            query.append(("epoch", epoch))
    return with_query(endpoint(base, "/v1/captions"), query, query_of=base)


async def watch(base: str, streams: Sequence[str], since: Mapping[str, int],
                writer: LiveWriter, *, exit_on_end: bool = False,
                max_retry_s: float = 5.0, token: str | None = None,
                epoch: str | None = None) -> int:
    """Show captions until cancelled; reconnect (with resume) when the link drops.

    ``token`` is sent as ``Authorization: Bearer`` (None: no token);
    ``epoch`` is the numbering ``since``'s seqs are of (``--epoch``; None:
    unknown, and the server can tell only a seq past all it gave).
    ``max_retry_s`` is the longest wait between two tries to reconnect (the
    first wait is 0.25 s, or ``max_retry_s`` when less; each next one twice
    the last).
    Returns 0 after the ``stream.ended`` of every ``streams`` (any stream when
    empty) if ``exit_on_end``; 1 when the first connection fails, the server
    refuses the token (HTTP 401/403, on any connection) or the request
    (close 1008), or speaks another protocol version.

    A stream seen before a drop that the reconnect ``hello`` no longer lists
    ended meanwhile. The resume's replay ends with its ``stream.ended`` while
    the server retains the stream; else it is reported as ended once the
    replay is over (no message for a second). A reconnect sends the last
    hello's ``epoch`` with its seqs (one of the protocol's form only:
    :func:`~evoxtral_stream.server.protocol.hello_epoch`); a hello of another
    epoch (a restart without the journal) sets every seq held to 0.
    """
    seen = dict(since)        # stream -> last seq, for since=, the latest active last
    # ``epoch``: the numbering those seqs are of (the last hello's)
    known: set[str] = set()   # streams seen started or captioned
    ended: set[str] = set()
    connects = 0
    first_delay = min(0.25, max_retry_s)
    delay = first_delay

    def finished() -> bool:
        return exit_on_end and bool(ended) and (not streams or ended >= set(streams))

    while True:
        # Not every stream ever seen: a URL past about 8 KB is refused (HTTP 414).
        resume = resume_since(seen, ended)
        if connects and (left := [s for s in seen if s not in resume and s not in ended]):
            writer.status(f"resuming {len(resume)} streams; {len(left)} live ones "
                          f"({left[0]}, ...) get live captions only: the URL would be "
                          "too long, or cannot name them")
        url = captions_url(base, streams, resume, epoch)
        try:
            async with connect(url, open_timeout=10, max_size=2**24,
                               additional_headers=auth_headers(token)) as ws:
                connects, delay = connects + 1, first_delay
                away: set[str] = set()
                while True:
                    try:
                        raw = await asyncio.wait_for(ws.recv(), 1.0 if away else None)
                    except TimeoutError:
                        for name in sorted(away):
                            writer.status(f"■ {name} ended while disconnected")
                        ended.update(away)
                        away = set()
                        if finished():
                            return 0
                        continue
                    try:
                        event = json.loads(raw)
                    except (ValueError, RecursionError):  # nested too deep for Python
                        writer.status(f"! not JSON: {raw!r:.80}")
                        continue
                    if not isinstance(event, dict):
                        continue
                    kind = event.get("type")
                    name = str(event.get("stream"))
                    if kind == "hello":
                        if event.get("v") != PROTOCOL_VERSION:
                            writer.status(f"the server speaks protocol v{event.get('v')}; "
                                          f"this viewer knows v{PROTOCOL_VERSION}")
                            return 1
                        open_now = set(open_streams(event))
                        ended -= open_now  # an id used again while away is live again
                        if connects > 1:
                            away = known - ended - open_now
                        if (their_epoch := hello_epoch(event.get("epoch"))) is not None:
                            if epoch is not None and their_epoch != epoch:
                                # A new numbering (a restart without the
                                # journal): no seq held means anything now,
                                # those left out of the URL included.
                                seen = dict.fromkeys(seen, 0)
                            epoch = their_epoch
                    elif kind == "caption" and isinstance(event.get("seq"), int):
                        seen[name] = max(seen.pop(name, 0), event["seq"])
                        known.add(name)
                        ended.discard(name)  # a caption after its end: the id's next run
                    elif kind == "gap" and event.get("to") is None:
                        # The server cannot place our seq (a restart without
                        # its journal): what follows may be numbered anew.
                        # Resume from 0, not without since=, in case the link
                        # drops before it comes.
                        seen[name] = 0
                    elif kind == "stream.started":
                        known.add(name)
                        ended.discard(name)  # an id used again is live again
                        away.discard(name)
                    elif kind == "stream.ended" and name in ended:
                        # A resume replays the end of each ended stream it
                        # names, at every reconnect: shown once.
                        continue
                    writer.show(event)
                    if kind == "stream.ended":
                        ended.add(name)
                        away.discard(name)  # the replay said so: not again
                        if finished():
                            return 0
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd is not None else None
            why = f"connection lost (close code {code}); reconnecting"
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as e:
            refused = refusal(e, token)
            if refused is not None:
                # Retrying cannot help: the same token would be refused again.
                writer.status(refused)
                return 1
            if not connects:
                writer.status(redact_tokens(f"cannot connect to {url}: {e} "
                                            "(is the server running?)"))
                return 1
            code = None
            why = redact_tokens(f"cannot reconnect: {e}; retrying")
        if code == _CLOSE_POLICY:
            return 1  # the server said why in an error event
        writer.status(f"{why} in {delay:.2g} s")
        await asyncio.sleep(delay)
        delay = min(max_retry_s, delay * 2)


def use_color(flag: bool | None, out: TextIO) -> bool:
    """``--color``/``--no-color`` when given, else: ``out`` is a terminal, NO_COLOR unset."""
    if flag is not None:
        return flag
    return out.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="viewer.py", description="Show live captions from an evoxtral-stream server.")
    add_url_option(p, "ws://127.0.0.1:8765", Role.SUBSCRIBE)
    p.add_argument("--stream", action="append", default=[], metavar="ID",
                   help="show only this stream (repeat, or a,b); default: every stream")
    p.add_argument("--since", metavar="SEQ",
                   help="resume: first the retained captions after SEQ (with --stream) or "
                        "STREAM:SEQ[,STREAM:SEQ...]")
    p.add_argument("--epoch", metavar="E",
                   help="the epoch the --since seqs are of (a viewer's hello line shows "
                        "it): a server that numbers anew since then replays from the start")
    p.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                   help="ANSI colours (default: on a terminal unless NO_COLOR is set)")
    p.add_argument("--exit-on-end", action="store_true",
                   help="exit when the chosen streams (any stream without --stream) end")
    add_token_option(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the viewer; the process exit status."""
    closed_stderr_dropped()
    parser = build_parser()
    lenient_output()
    args = parser.parse_args(argv)
    try:
        endpoint(args.url, "/")
        # ?stream= (the page's ?streams=), ?since=, ?epoch= and ?token= (or
        # #token=) of --url count as the options.
        given = take_query(args.url, streams=[n for v in args.stream for n in v.split(",") if n],
                           since=args.since, epoch=args.epoch, token=args.token,
                           role=Role.SUBSCRIBE)
        streams = list(given.streams)
        since = parse_since(given.since, streams)
        epoch = parse_epoch([given.epoch] if given.epoch is not None else [])
    except ValueError as e:
        parser.error(str(e))
    closed_stdout_refused(parser, "the captions have nowhere to go")
    color = use_color(args.color, sys.stdout)
    writer = LiveWriter(sys.stdout, sys.stderr, color=color, live=redraws(sys.stdout),
                        show_stream=len(streams) != 1)
    try:
        return run_client(watch(given.url, streams, since, writer,
                                 exit_on_end=args.exit_on_end, token=given.token,
                                 epoch=epoch))
    except KeyboardInterrupt:
        return 0
    finally:
        with contextlib.suppress(Exception):
            writer.clear()


if __name__ == "__main__":
    sys.exit(main())
