"""clients/viewer.py: the pure rendering, and the script against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pty
import re
import socket
import sys
import threading
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from viewer import (
    KIND_COLORS,
    LiveWriter,
    captions_url,
    endpoint,
    parse_since,
    render_event,
    watch,
)
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from evoxtral_stream.config import load_config
from evoxtral_stream.console import format_time
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import CaptionEvent, EngineEvent, Hypothesis, RequestKind
from evoxtral_stream.run import feed_samples
from evoxtral_stream.server.app import CaptionServer
from evoxtral_stream.server.protocol import caption_to_dict
from evoxtral_stream.text.merger import Merger
from tests.clients.conftest import (
    CLIENTS,
    accepted_token_cases,
    client_env,
    publish_finals,
    refused_token_cases,
    scripted_server,
    sends,
)
from tests.fakes import ScriptedBackend
from tests.helpers.audio import buzz, to_int16
from tests.helpers.http import Relay
from tests.helpers.terminal import screen_rows
from tests.speech import have_espeak, speech_with_pauses

ESC = "\x1b"
PARTIAL: dict[str, Any] = {
    "type": "caption", "stream": "mic", "segment": 3, "seq": 17, "final": False,
    "text": "[nervous] So... I was thinking [laughs]",
    "plain_text": "So... I was thinking",
    "stable": "[nervous] So... I was", "unstable": " thinking [laughs]",
    "tags": [{"tag": "nervous", "kind": "emotion", "index": 0, "t": 12.48, "known": True},
             {"tag": "laughs", "kind": "non-verbal", "index": 4, "t": 14.0, "known": True}],
    "start": 12.48, "end": 14.9, "latency": 0.183,
}
FINAL = {**PARTIAL, "seq": 18, "final": True,
         "text": "[nervous] So... I was thinking [laughs] [whispers] yes [beeps]",
         "stable": "[nervous] So... I was thinking [laughs] [whispers] yes [beeps]",
         "unstable": ""}


# --- render_event -----------------------------------------------------------------


def test_partial_stable_plain_unstable_dim_tags_by_kind() -> None:
    assert render_event(PARTIAL) == (
        "\x1b[2mmic [0:12.5 → 0:14.9]\x1b[0m "
        "\x1b[1;33m[nervous]\x1b[0m So... I was"      # stable: plain, emotion tag bold yellow
        "\x1b[2m thinking \x1b[0m\x1b[2;36m[laughs]\x1b[0m"  # unstable: dim, tag dim cyan
    )


def test_final_is_all_stable_and_kinds_fall_back_to_the_tag_set() -> None:
    line = render_event(FINAL, show_stream=False)
    assert line is not None
    assert line.startswith("\x1b[2m[0:12.5 → 0:14.9]\x1b[0m \x1b[1;33m[nervous]")
    assert f"\x1b[1;{KIND_COLORS['non-verbal']}m[laughs]" in line
    # Not in the event's tags: [whispers] is a known delivery tag, [beeps] unknown.
    assert f"\x1b[1;{KIND_COLORS['delivery']}m[whispers]" in line
    assert f"\x1b[1;{KIND_COLORS['unknown']}m[beeps]" in line
    assert "\x1b[2m" not in line.split("]\x1b[0m ", 1)[1]  # nothing dim after the time


def test_brackets_holding_a_digit_are_plain_text_not_a_coloured_tag() -> None:
    """Square brackets holding a digit are text, not a tag (docs/protocol.md):
    the viewer coloured "[1]" and "array[0]" as unknown tags."""
    text = "see [1] array[0] [laughs]"
    line = render_event({**FINAL, "text": text, "stable": text, "plain_text": "see [1] array[0]",
                         "tags": [{"tag": "laughs", "kind": "non-verbal", "index": 3,
                                   "t": 14.0, "known": True}]}, show_stream=False)
    assert line is not None
    assert line.endswith(
        f"\x1b[0m see [1] array[0] \x1b[1;{KIND_COLORS['non-verbal']}m[laughs]\x1b[0m")


def test_no_color_is_plain_text() -> None:
    assert render_event(PARTIAL, color=False) == (
        "mic [0:12.5 → 0:14.9] [nervous] So... I was thinking [laughs]")
    assert render_event(FINAL, color=False, show_stream=False) == (
        "[0:12.5 → 0:14.9] " + FINAL["text"])


def test_width_keeps_the_end_of_a_long_partial() -> None:
    long = {**PARTIAL, "stable": "word " * 40 + PARTIAL["stable"],
            "text": "word " * 40 + PARTIAL["text"]}
    line = render_event(long, color=False, width=60)
    assert line is not None
    assert len(line) == 60
    assert line.startswith("mic [0:12.5 → 0:14.9] …")
    assert line.endswith("I was thinking [laughs]")
    coloured = render_event(long, width=60)
    assert coloured is not None
    assert len(re.sub(r"\x1b\[[0-9;]*m", "", coloured)) == 60


def _columns(text: str) -> int:
    """Terminal columns of ``text``: East Asian wide and fullwidth characters
    take two, combining marks none."""
    return sum(0 if unicodedata.category(c) in ("Mn", "Me") else
               2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


@pytest.mark.parametrize("stream", ["mic", "会議室"])
def test_width_is_counted_in_terminal_columns(stream: str) -> None:
    """A partial clipped to the terminal's width counted characters, not the
    columns they take: a Japanese stream id, or Chinese text, made the row
    wider than the terminal. It wrapped, and the in-place redraw (which
    clears one row) left every earlier partial's first row on the screen."""
    body = "नमस्ते दुनिया " + "我们今天讨论一下这个问题。" * 8 + " "
    long = {**PARTIAL, "stream": stream, "stable": body + PARTIAL["stable"],
            "text": body + PARTIAL["text"]}
    for width in (80, 81):
        line = render_event(long, color=False, width=width)
        assert line is not None
        assert width - 1 <= _columns(line) <= width, line
        assert line.startswith(f"{stream} [0:12.5 → 0:14.9] …")
        assert line.endswith("I was thinking [laughs]")
        coloured = render_event(long, width=width)
        assert coloured is not None
        assert _columns(re.sub(r"\x1b\[[0-9;]*m", "", coloured)) == _columns(line)
    short = render_event({**long, "text": "नमस्ते " * 9, "stable": "नमस्ते " * 9, "unstable": ""},
                         color=False, width=80)
    assert short is not None and "…" not in short  # combining marks take no column


@pytest.mark.parametrize("width", range(35, 90))
def test_a_clipped_hindi_partial_starts_with_a_whole_letter(width: int) -> None:
    """The clip dropped a letter and kept its vowel sign when the sign takes
    a column (ि, ी, ो: Unicode's spacing marks), which then began the row
    after the ellipsis, drawn on it or on a dotted circle."""
    hi = "मैं ठीक हूँ। आप कैसे हैं? मैं office जा रहा हूँ क्योंकि मुझे देर हो रही है किताब"
    line = render_event({**PARTIAL, "text": hi, "stable": hi, "unstable": ""},
                        color=False, width=width)
    assert line is not None
    body = line.split("] ", 1)[1].removeprefix("…")
    assert unicodedata.category(body[0])[0] != "M", line
    assert hi.endswith(body) and _columns(line) <= width, line


@pytest.mark.parametrize(("event", "text"), [
    ({"type": "hello", "v": 1, "server": "evoxtral-stream", "version": "0.1.0",
      "backend": "whisper", "capabilities": [], "streams": ["a", "b"]},
     "connected to evoxtral-stream 0.1.0 (backend whisper); open streams: a, b"),
    ({"type": "hello", "v": 1, "server": "evoxtral-stream", "version": "0.1.0",
      "epoch": "3f9c", "backend": "whisper", "capabilities": [], "streams": []},
     "connected to evoxtral-stream 0.1.0 (backend whisper, epoch 3f9c); open streams: none"),
    ({"type": "stream.started", "stream": "mic", "source": "mic"}, "▶ mic started (mic)"),
    ({"type": "stream.ended", "stream": "talk", "duration": 25.24, "segments": 5, "finals": 5},
     "■ talk ended: 5 finals, 25.2 s"),
    ({"type": "gap", "stream": "talk", "from": 42, "to": 57},
     "! talk: captions 42–57 are no longer retained"),
    ({"type": "gap", "stream": "talk", "from": 42, "to": None},
     "! talk: the server cannot place caption 42 (it restarted, or forgot the stream); "
     "showing all it has"),
    ({"type": "error", "code": "decode_failed", "message": "boom", "stream": "mic"},
     "! decode_failed: boom (mic)"),
    ({"type": "ingest.summary", "stream": "x", "duration": 1.25, "segments": 1, "finals": 1,
      "partials": 2, "errors": 0},
     "x: 1.2 s of audio, 1 segments, 1 finals, 2 partials, 0 errors"),
    ({"type": "caption", **{k: v for k, v in PARTIAL.items() if k != "type"}, "text": ""},
     None),
    ({"type": "something.new"}, None),
])
def test_other_messages(event: dict[str, Any], text: str | None) -> None:
    assert render_event(event, color=False) == text
    if text is not None:
        assert render_event(event) == f"{ESC}[{'31' if text[0] == '!' else '2'}m{text}{ESC}[0m"


_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@pytest.mark.parametrize("event", [
    {**FINAL, "stream": "a\x1b[2Jb"},
    {"type": "hello", "v": 1, "server": "\x1b]0;pwned\x07", "version": "1\x08",
     "backend": "\x9b2J", "streams": ["a\x1b[2Jb"]},
    {"type": "stream.started", "stream": "a\x1b[2Jb", "source": "mic\r"},
    {"type": "stream.ended", "stream": "a\nb", "finals": "\x1b[H", "duration": 1.0},
    {"type": "gap", "stream": "t\x07", "from": "\x1b[2J", "to": None},
    {"type": "gap", "stream": "t", "from": 1, "to": "\x1b[2J"},
    {"type": "error", "code": "\x1b[2J", "message": "line\none", "stream": "\x1b"},
    {"type": "ingest.ready", "stream": "\x1b[2J", "sample_rate": 16000, "format": "\x00"},
    {"type": "ingest.summary", "stream": "\x1b[2J", "duration": 1.0, "segments": "\x07",
     "finals": 1, "partials": 1, "errors": 0},
])
def test_no_control_character_of_the_server_reaches_the_terminal(event: dict[str, Any]) -> None:
    """A caption's text went through printable(), but the stream id in front
    of it and every field of a status line were written as the server sent
    them: another server, or a proxy, could clear the screen or retitle the
    window through a stream id or an error message, even with --no-color.
    They are shown as spaces too."""
    for color in (False, True):
        line = render_event(event, color=color)
        assert line is not None
        assert not _CONTROLS.search(re.sub(r"\x1b\[[0-9;]*m", "", line)), repr(line)


_HIDDEN = re.compile("[\u202a-\u202e\u2066-\u2069\u200b\u200e\u200f\ufeff]")


@pytest.mark.parametrize("event", [
    {**FINAL, "stream": "a\u202eb", "text": "[nervous] \u2067so\u2069 x\u202e"},
    {**PARTIAL, "text": "\u202eso \u200bthen\u202c", "stable": "\u202eso",
     "unstable": " \u200bthen\u202c"},
    {"type": "hello", "v": 1, "server": "\u202ex", "version": "1\ufeff", "backend": "b",
     "streams": ["a\u2066b"]},
    {"type": "stream.ended", "stream": "a\u202eb", "finals": 1, "duration": 1.0},
    {"type": "error", "code": "c\u202e", "message": "m\u2068x", "stream": "\u200fs"},
])
def test_no_bidi_control_of_the_server_reaches_the_terminal(event: dict[str, Any]) -> None:
    """As control characters: a right-to-left override or an isolate in a
    caption, a stream id or a status field reordered the rest of the line
    on a terminal that does bidi (the "Trojan Source" class)."""
    for color in (False, True):
        line = render_event(event, color=color)
        assert line is not None and not _HIDDEN.search(line), repr(line)


async def test_status_lines_of_watch_hold_no_control_character_of_the_server() -> None:
    """watch()'s own status lines quote the server too: a stream that ended
    while away, a hello of another protocol version."""
    sessions = [[_hello(["a\x1b[2Jb"]), _final("a\x1b[2Jb", 1, "one")],
                [_hello([])],
                [json.dumps({"type": "hello", "v": "\x1b[2J2"})]]
    paths: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        paths.append("")
        for message in sessions[min(len(paths), len(sessions)) - 1]:
            await ws.send(message)
        while len(paths) == 2 and "ended while disconnected" not in err.getvalue():
            await asyncio.sleep(0.02)  # the viewer waits 1 s for the replay's end
        await ws.close(1001, "going away")

    out, err = io.StringIO(), io.StringIO()
    writer = LiveWriter(out, err, color=False, live=False, show_stream=True)
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        assert await asyncio.wait_for(watch(f"ws://127.0.0.1:{port}", [], {}, writer,
                                            max_retry_s=0.1), 20) == 1
    assert "ended while disconnected" in err.getvalue()
    assert "the server speaks protocol v" in err.getvalue()
    assert not _CONTROLS.search(out.getvalue().replace("\n", "")), out.getvalue()
    assert not _CONTROLS.search(err.getvalue().replace("\n", "")), err.getvalue()


def test_a_lone_surrogate_from_the_server_is_shown_not_a_crash() -> None:
    """JSON carries lone surrogates (``"\\ud800"``: a broken decoder's stand-in
    for a bad byte); our server never sends one, another may. Written to a
    UTF-8 terminal, whose encoder is strict, a caption or a stream id holding
    one ended the viewer with a UnicodeEncodeError traceback. It is shown as
    U+FFFD now, the replacement character."""
    raw_out, raw_err = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(raw_out, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(raw_err, encoding="utf-8", errors="strict", write_through=True)
    for color, live in ((False, False), (True, True)):
        writer = LiveWriter(out, err, color=color, live=live, show_stream=True)
        writer.show({**PARTIAL, "stream": "s\udcff", "text": "caf\ud800", "stable": "caf",
                     "unstable": "\ud800"})
        writer.show({**FINAL, "stream": "s\udcff", "text": "caf\ud800e", "stable": "caf\ud800e"})
        writer.show({"type": "stream.ended", "stream": "s\udcff", "finals": 1, "duration": 1.0})
        writer.status("! not JSON: \udfff")
    assert "s\ufffd [0:12.5 → 0:14.9] caf\ufffde" in raw_out.getvalue().decode()
    assert "■ s\ufffd ended" in raw_err.getvalue().decode()


@pytest.mark.parametrize("bad", ["1.5", None, [], float("nan"), float("inf"), -float("inf"),
                                 10**400, 1.7976931348623157e308])
def test_times_and_durations_that_are_no_finite_number_are_shown_as_a_question_mark(
        bad: object) -> None:
    """Another server's caption with a start that is no number (a string,
    null), not finite (JSON's NaN and Infinity, as Python writes them) or
    past a float (10**400) ended the viewer, and mic_client, with a
    traceback (ValueError, TypeError, OverflowError); so did such a
    duration. They are shown as ``?``."""
    caption = render_event({**FINAL, "start": bad, "end": 2.5}, color=False)
    assert caption is not None and caption.startswith("mic [? → 0:02.5] [nervous]")
    for kind in ("stream.ended", "ingest.summary"):
        line = render_event({"type": kind, "stream": "x", "duration": bad}, color=False)
        assert line is not None and "? s" in line, line


@pytest.mark.parametrize("streams", [5, "ab", {"a": 1}, [["a"], None], True])
async def test_a_hello_whose_streams_are_no_list_of_ids(streams: object) -> None:
    """A hello whose ``streams`` was a number ended the viewer with a
    traceback ('int' object is not iterable), in the status line and in
    watch() itself; other values showed as the server sent them. Streams
    that are no list are taken as none; items that are no string are left out."""
    line = render_event({"type": "hello", "v": 1, "server": "s", "streams": streams},
                        color=False)
    assert line is not None and line.endswith("open streams: none")
    script = [json.dumps({**json.loads(_hello([])), "streams": streams}),
              _final("talk", 1, "one"), _msg("stream.ended", "talk")]

    assert await _watch_to_the_end(sends(script), ["talk"]) == ["one"]


# --- LiveWriter ---------------------------------------------------------------------


def _terminal() -> tuple[io.StringIO, Callable[[], list[str]]]:
    """One terminal for a writer's ``out`` and ``err``, and the rows with
    text it shows now."""
    term = io.StringIO()
    return term, lambda: [row for row in screen_rows(term.getvalue(), 200) if row]


def test_live_writer_redraws_the_partial_in_place_then_the_final_replaces_it() -> None:
    term, screen = _terminal()
    w = LiveWriter(term, term, color=False, live=True, show_stream=False)
    p = render_event(PARTIAL, color=False, show_stream=False)
    f = render_event(FINAL, color=False, show_stream=False)
    w.show(PARTIAL)
    w.show({**PARTIAL, "seq": 18})
    assert screen() == [p]
    # Above the partial: it is another stream's, drawn again below the line.
    w.show({"type": "stream.started", "stream": "other", "source": "x"})
    assert screen() == ["▶ other started (x)", p]
    w.show(FINAL)
    assert screen() == ["▶ other started (x)", f]
    assert term.getvalue().endswith(f"{f}\n")


def test_only_its_own_streams_events_take_a_partial_off_the_screen() -> None:
    """Another stream's start, final or end goes above the partial rows,
    which are drawn again under it; its own stream's end (no final came) or
    error takes its row away."""
    term, screen = _terminal()
    w = LiveWriter(term, term, color=False, live=True, show_stream=True)
    other = {**FINAL, "stream": "other", "text": "elsewhere", "stable": "elsewhere", "tags": []}
    w.show(PARTIAL)
    w.show({"type": "stream.started", "stream": "other", "source": "x"})
    w.show(other)
    w.show({"type": "stream.ended", "stream": "other", "duration": 1.0, "segments": 1,
            "finals": 1})
    p = render_event(PARTIAL, color=False, show_stream=True)
    o = render_event(other, color=False, show_stream=True)
    shown = ["▶ other started (x)", o, "■ other ended: 1 finals, 1.0 s"]
    assert screen() == [*shown, p]
    for own, line in (({"type": "stream.ended", "stream": "mic", "duration": 15.0,
                        "segments": 4, "finals": 3}, "■ mic ended: 3 finals, 15.0 s"),
                      ({"type": "error", "code": "decode_failed", "message": "boom",
                        "stream": "mic", "segment": 3}, "! decode_failed: boom (mic)")):
        w.show(PARTIAL)
        w.show(own)
        shown.append(line)
        assert screen() == shown, own


def test_each_stream_s_partial_has_a_row_of_its_own() -> None:
    """Two streams speaking at once (a viewer of every stream on a server)
    took turns on one row, each partial overwriting the other's. Now each
    has a row of its own, and a final replaces only its stream's."""
    term, screen = _terminal()
    w = LiveWriter(term, term, color=False, live=True, show_stream=True)
    b = {**PARTIAL, "stream": "desk", "text": "and you", "stable": "", "unstable": "and you",
         "tags": []}
    w.show(PARTIAL)
    w.show(b)
    w.show({**PARTIAL, "seq": 19})
    p = render_event(PARTIAL, color=False, show_stream=True)
    q = render_event(b, color=False, show_stream=True)
    assert screen() == [p, q]
    w.show(FINAL)
    assert screen() == [render_event(FINAL, color=False, show_stream=True), q]
    w.clear()
    assert screen() == [render_event(FINAL, color=False, show_stream=True)]


def test_a_partial_that_loses_its_text_takes_the_row_off_the_screen() -> None:
    """Whisper rates a segment no speech once it has heard more of it: its
    partial "You" is followed by a partial with no text, then an empty
    final. The "You" stayed on the row as if the segment said it, until the
    empty final (a long noise: seconds); another stream's is left alone."""
    merger = Merger("mic", final_replaces_stable=True)
    hyps = [Hypothesis("mic", 0, rev, kind, text, 0, end, 0.0, 0.1) for rev, kind, text, end in
            ((1, RequestKind.PARTIAL, "You", 16000), (2, RequestKind.PARTIAL, "", 32000),
             (3, RequestKind.FINAL, "", 40000))]
    you, gone, empty = [caption_to_dict(e) for h in hyps for e in merger.feed(h)]
    assert (you["text"], gone["text"], gone["final"], empty["text"], empty["final"]) == \
        ("You", "", False, "", True)
    term, screen = _terminal()
    w = LiveWriter(term, term, color=False, live=True, show_stream=False)
    w.show(you)
    assert screen() == [render_event(you, color=False, show_stream=False)]
    w.show(gone)
    assert screen() == []
    w.show(empty)
    assert screen() == []
    w.show(PARTIAL)
    w.show({**gone, "stream": "other"})
    assert screen() == [render_event(PARTIAL, color=False, show_stream=False)]


def test_writer_off_a_terminal_prints_only_finals() -> None:
    out, err = io.StringIO(), io.StringIO()
    w = LiveWriter(out, err, color=False, live=False, show_stream=True)
    for event in (PARTIAL, FINAL, {**FINAL, "text": "", "seq": 19}):
        w.show(event)
    assert out.getvalue() == f"{render_event(FINAL, color=False)}\n"


# --- URLs ----------------------------------------------------------------------------


def test_urls_and_since() -> None:
    # The path is a prefix, less an endpoint it ends with.
    assert endpoint("ws://h:1/anything?x=1#f", "/v1/captions") == \
        "ws://h:1/anything/v1/captions"
    assert endpoint("ws://h:1/p/v1/ingest/", "/v1/captions") == "ws://h:1/p/v1/captions"
    assert endpoint("ws://h:1/v1/captions", "/v1/ingest") == "ws://h:1/v1/ingest"
    assert endpoint("ws://h:1//", "/v1/ingest") == "ws://h:1/v1/ingest"
    assert endpoint("https://h", "/v1/ingest") == "wss://h/v1/ingest"
    assert endpoint("127.0.0.1:8765", "/") == "ws://127.0.0.1:8765/"
    assert endpoint("ws://[::1]:8765", "/") == "ws://[::1]:8765/"
    with pytest.raises(ValueError, match="ws://"):
        endpoint("ftp://h", "/")
    with pytest.raises(ValueError, match=r"^not a ws://HOST:PORT URL: 'ws://\[::1'$"):
        endpoint("ws://[::1", "/")
    with pytest.raises(ValueError, match="port must be a number from 1 to 65535"):
        endpoint("ws://h:0/?token=t-secret", "/")
    assert parse_since("41", ["a", "b"]) == {"a": 41, "b": 41}
    assert parse_since("a:4,b:7", []) == {"a": 4, "b": 7}
    for bad in ("x", "a:", ":3", "a:\u00b2", "a:" + "9" * 19):
        with pytest.raises(ValueError, match="SEQ"):
            parse_since(bad, ["a"])
    # Only the streams subscribed to can be resumed.
    with pytest.raises(ValueError, match=r"not among the streams subscribed to \(--stream\)"):
        parse_since("b:3", ["a"])
    with pytest.raises(ValueError, match="--stream"):
        parse_since("41", [])
    assert captions_url("ws://h:1", [], {}) == "ws://h:1/v1/captions"
    assert captions_url("ws://h:1", ["a b", "c"], {"a b": 3}) == \
        "ws://h:1/v1/captions?stream=a%20b,c&since=a%20b:3"
    # The epoch goes with the seqs, and only with them.
    assert captions_url("ws://h:1", [], {"a": 3}, "e1") == \
        "ws://h:1/v1/captions?since=a:3&epoch=e1"
    assert captions_url("ws://h:1", ["a"], {}, "e1") == "ws://h:1/v1/captions?stream=a"
    # The URL's other parameters go along; its own ones are the arguments'.
    assert captions_url("ws://h:1/?token=t&x=a%20b&stream=old&since=old:1", ["a"], {}) == \
        "ws://h:1/v1/captions?token=t&x=a%20b&stream=a"
    assert captions_url("https://h/p/?token=t", ["a"], {}) == \
        "wss://h/p/v1/captions?token=t&stream=a"


# --- the script against a real server -------------------------------------------------

SENTENCES = ["Good evening and welcome to the live captioning demo.",
             "Thank you for listening, and have a wonderful night."]


def tagged(audio: npt.NDArray[np.float32]) -> str:
    """A stand-in model: a word per half second, with two tags."""
    words = [f"w{i}" for i in range(len(audio) // 8000)]
    return " ".join(["[nervous]", *words[:2], "[laughs]", *words[2:]])


@pytest.fixture
async def served() -> AsyncIterator[tuple[Engine, CaptionServer]]:
    cfg = load_config(overrides={"server.port": 0})
    async with Engine(cfg, ScriptedBackend(tagged)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        yield engine, server


async def expected_lines(port: int, run: Any) -> list[str]:
    """Run ``run()``; the finals of stream talk as the viewer prints them (no colour)."""
    finals = []
    async with connect(f"ws://127.0.0.1:{port}/v1/captions?stream=talk") as ws:
        await ws.recv()  # hello
        task = asyncio.ensure_future(run())
        while (msg := json.loads(await asyncio.wait_for(ws.recv(), 30)))["type"] != \
                "stream.ended":
            if msg["type"] == "caption" and msg["final"]:
                finals.append(f"[{format_time(msg['start'])} → {format_time(msg['end'])}] "
                              f"{msg['text']}")
        await task
    return finals


async def start_viewer(*args: str, stdout: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENTS / "viewer.py"), *args,
        stdout=stdout, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    hello = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
    assert "connected to evoxtral-stream" in hello, hello
    return proc


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
async def test_viewer_prints_finals_and_resumes_after_a_drop(
    served: tuple[Engine, CaptionServer],
) -> None:
    engine, server = served
    audio, spans = speech_with_pauses(SENTENCES, pause_s=1.2)
    async with Relay(server.port) as proxy:
        proc = await start_viewer("--url", f"ws://127.0.0.1:{proxy.port}", "--stream", "talk",
                                  "--exit-on-end", stdout=asyncio.subprocess.PIPE)
        stdout = proc.stdout
        assert stdout is not None

        async def speak_with_a_drop() -> None:
            stream = engine.open_stream("talk", source="test")
            for i in range(0, spans[1][0], 1600):  # the first sentence, its final
                stream.push(audio[i:i + 1600])
                await stream.wait_idle()
            first = await asyncio.wait_for(stdout.readline(), 20)
            lines.append(first.decode().rstrip("\n"))
            proxy.drop()  # the viewer loses the link while the second sentence comes
            await feed_samples(stream, audio[spans[1][0]:], 1600, realtime=False)

        lines: list[str] = []
        expected = await expected_lines(server.port, speak_with_a_drop)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    lines += out.decode().splitlines()
    assert proc.returncode == 0, err.decode()
    assert lines == expected
    assert len(expected) == 2
    assert ESC not in "".join(lines)  # not a terminal: no colour
    status = err.decode()
    assert "connection lost" in status
    assert "no longer retained" not in status
    # The stream ended while the viewer was away: resume replays stream.ended.
    assert "■ talk ended: 2 finals" in status


async def test_viewer_says_it_cannot_reconnect_while_the_server_is_down(
    served: tuple[Engine, CaptionServer],
) -> None:
    _, server = served
    proc = await start_viewer("--url", f"ws://127.0.0.1:{server.port}",
                              stdout=asyncio.subprocess.DEVNULL)
    assert proc.stderr is not None
    try:
        await server.aclose()
        lines: list[str] = []
        while len(lines) < 3:
            lines.append((await asyncio.wait_for(proc.stderr.readline(), 20)).decode())
    finally:
        proc.kill()
        await proc.wait()
    # Once: the close the server sent; then why each attempt failed.
    assert "connection lost (close code 1001); reconnecting in" in lines[0], lines
    assert all("cannot reconnect: " in line and "; retrying in" in line
               for line in lines[1:]), lines


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
async def test_viewer_on_a_terminal_redraws_partials_with_colour(
    served: tuple[Engine, CaptionServer],
) -> None:
    engine, server = served
    audio, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.2)
    primary, secondary = pty.openpty()
    chunks: list[bytes] = []

    def read_terminal() -> None:
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:  # EIO: the viewer closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        proc = await start_viewer("--url", f"ws://127.0.0.1:{server.port}", "--stream", "talk",
                                  "--exit-on-end", "--color", stdout=secondary)
        os.close(secondary)
        expected = await expected_lines(server.port, lambda: feed_samples(
            engine.open_stream("talk", source="test"), audio, 1600, realtime=False))
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        await asyncio.to_thread(reader.join, 5)
    finally:
        os.close(primary)
    screen = b"".join(chunks).decode()
    *partials, final = [row for row in re.findall(r"\r\x1b\[J([^\r\n]*)", screen) if row]
    assert len(partials) >= 2, screen
    # Stable text plain (its tag bold yellow), unstable text dim.
    assert any("\x1b[1;33m[nervous]\x1b[0m w0" in p and "\x1b[2m w" in p for p in partials)
    assert screen.endswith(final + "\r\n")
    assert re.sub(r"\x1b\[[0-9;]*m", "", final) == expected[0]
    assert f"\x1b[1;{KIND_COLORS['non-verbal']}m[laughs]\x1b[0m" in final
    assert "\x1b[2m" not in final.split("]\x1b[0m ", 1)[1]


# --- after a restart: the journal -------------------------------------------------------


def buzzes(segments: int) -> npt.NDArray[np.int16]:
    """``segments`` seconds of voiced buzz, each followed by a second of silence."""
    one = np.concatenate([to_int16(buzz(1.0)), np.zeros(16_000, np.int16)])
    return np.concatenate([one] * segments)


async def test_exit_on_end_after_a_restart_replays_the_journal_and_exits(
        tmp_path: Path) -> None:
    """The README's resume: viewer.py --since STREAM:SEQ --exit-on-end, after
    the server restarted. The stream ended before the restart: the replay
    from the journal ends with its stream.ended and the viewer exits. The id
    opened again after the restart is live: its resume must not end with the
    old end, and the viewer goes on until its new one."""
    cfg = load_config(env={}, overrides={
        "server.port": 0, "journal.enabled": True, "journal.dir": str(tmp_path / "j"),
        "stream.partial_interval_ms": 0})
    printed: list[str] = []

    def record(event: EngineEvent) -> None:
        if isinstance(event, CaptionEvent) and event.final:
            printed.append(f"[{format_time(event.start)} → {format_time(event.end)}] "
                           f"{event.text}")

    async def viewer(port: int, since: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, str(CLIENTS / "viewer.py"), "--url", f"ws://127.0.0.1:{port}",
            "--stream", "talk", "--since", since, "--exit-on-end",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=client_env())

    async def finish(proc: asyncio.subprocess.Process) -> tuple[list[str], str]:
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:   # it never saw the end: the bug
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()
        return out.decode().splitlines(), err.decode()

    async with Engine(cfg, ScriptedBackend(tagged)) as engine, \
            CaptionServer(engine, cfg.server):
        engine.add_listener(record)
        await feed_samples(engine.open_stream("talk", source="test"), buzzes(3), 1600,
                           realtime=False)
    assert len(printed) == 3
    before = list(printed)
    # The server restarts over the same journal.
    async with Engine(cfg, ScriptedBackend(tagged)) as engine, \
            CaptionServer(engine, cfg.server) as server:
        engine.add_listener(record)
        lines, err = await finish(await viewer(server.port, "1"))
        assert lines == before[1:]
        assert [x for x in err.splitlines() if "ended" in x] == ["■ talk ended: 3 finals, 6.0 s"]
        # The id opened again: live, no caption yet. The resume replays the
        # old finals, then waits for this run's end.
        stream = engine.open_stream("talk", source="test")
        proc = await viewer(server.port, "talk:2")
        assert proc.stdout is not None
        replayed = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert replayed.decode().rstrip("\n") == before[2]
        await feed_samples(stream, buzzes(2), 1600, realtime=False)
        lines, err = await finish(proc)
    assert lines == printed[3:] and len(lines) == 2
    assert [x for x in err.splitlines() if "ended" in x] == ["■ talk ended: 2 finals, 4.0 s"]


async def test_a_restart_without_the_journal_that_passed_the_held_seq_loses_nothing(
        ) -> None:
    """The viewer held seq 1 of talk when the server restarted without its
    journal; by the time it reconnects the new run has numbered 1 to 3 and
    ended. Its resume carries the first run's epoch, so the server replays
    the new run from seq 1; a bare since=talk:1 would skip the new seq 1."""
    cfg = load_config(env={}, overrides={"server.port": 0, "stream.partial_interval_ms": 0})
    out, err = io.StringIO(), io.StringIO()
    writer = LiveWriter(out, err, color=False, live=False, show_stream=False)
    second: list[str] = []
    with socket.socket() as s:  # a port nobody listens on, while neither run is up
        s.bind(("127.0.0.1", 0))
        nowhere = s.getsockname()[1]
    async with Engine(cfg, ScriptedBackend(tagged)) as engine, \
            CaptionServer(engine, cfg.server) as server, Relay(server.port) as relay:
        viewing = asyncio.ensure_future(watch(
            f"ws://127.0.0.1:{relay.port}", ["talk"], {}, writer, exit_on_end=True,
            max_retry_s=0.2))
        # Subscribed before the first final: a subscriber without since gets
        # only what comes after it (a loaded CI run's viewer connected later
        # than the final and waited for it 20 s).
        async with asyncio.timeout(20):
            while server.broadcaster.subscribers == 0:
                assert not viewing.done(), (viewing.result(), err.getvalue())
                await asyncio.sleep(0.02)
        stream = engine.open_stream("talk", source="test")  # open until after the drop
        audio = buzzes(1)
        for i in range(0, len(audio), 1600):
            stream.push(audio[i:i + 1600])
            await stream.wait_idle()
        async with asyncio.timeout(20):
            while not out.getvalue():
                # A viewer that gave up says why.
                assert not viewing.done(), (viewing.result(), err.getvalue())
                await asyncio.sleep(0.02)
        relay.target = nowhere
        relay.drop()  # the viewer is away before this run closes its stream
        async with Engine(cfg, ScriptedBackend(tagged)) as engine2, \
                CaptionServer(engine2, cfg.server) as server2:
            engine2.add_listener(lambda e: second.append(e.text) if isinstance(
                e, CaptionEvent) and e.final else None)
            await feed_samples(engine2.open_stream("talk", source="test"), buzzes(3), 1600,
                               realtime=False)
            relay.target = server2.port
            assert await asyncio.wait_for(viewing, 20) == 0, err.getvalue()
    assert len(second) == 3
    assert _texts(out)[1:] == second, err.getvalue()
    assert "the server cannot place caption 2 (it restarted" in err.getvalue()


async def test_since_with_the_epoch_of_another_run_replays_this_runs_captions(
        served: tuple[Engine, CaptionServer]) -> None:
    """viewer.py --since talk:2 --epoch E, restarted after the server was:
    with the epoch its hello line showed before, the server knows seq 2 is
    of another numbering and replays this run's from 1; without one, or with
    this run's, it is the plain resume after 2."""
    _, server = served
    texts = ["one", "two", "three", "four"]
    publish_finals(server, "talk", texts)

    async def viewer(*args: str) -> tuple[list[str], str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(CLIENTS / "viewer.py"), "--url",
            f"ws://127.0.0.1:{server.port}", "--stream", "talk", "--since", "2",
            "--exit-on-end", *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=client_env())
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        return [line.split("] ", 1)[1] for line in out.decode().splitlines()], err.decode()

    lines, err = await viewer("--epoch", "an-earlier-run")
    assert lines == texts
    assert "cannot place caption 3" in err
    now = served[0].epoch
    assert f"epoch {now})" in err  # what to pass next time
    assert (await viewer("--epoch", now))[0] == texts[2:]
    assert (await viewer())[0] == texts[2:]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENTS / "viewer.py"), "--epoch", "not one!",
        stderr=asyncio.subprocess.PIPE, env=client_env())
    _, bad = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and "epoch takes" in bad.decode()


async def test_control_characters_in_captions_do_not_reach_the_terminal(
        served: tuple[Engine, CaptionServer]) -> None:
    """A caption's control characters (a model's byte tokens: the merger and
    the wire keep them) were written to the terminal as they came: an escape
    sequence in the text cleared the screen or retitled the window, a
    backspace ate the character before it, even with --no-color, which
    promises no escape sequences at all. They are shown as spaces."""
    _, server = served
    publish_finals(server, "talk", ["wipe \x1b[2J\x1b[Hthe screen", "bell\x07 and\x08 back",
                                    "\x1b]0;pwned\x07title"])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENTS / "viewer.py"), "--url", f"ws://127.0.0.1:{server.port}",
        "--stream", "talk", "--since", "0", "--exit-on-end", "--no-color",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=client_env())
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    lines = [line.split("] ", 1)[1] for line in out.decode().splitlines()]
    assert lines == ["wipe  [2J [Hthe screen", "bell  and  back", " ]0;pwned title"]
    coloured = render_event({**FINAL, "text": "a\x1b[2Jb", "stable": "a\x1b[2Jb"})
    assert coloured is not None
    assert "\x1b[2J" not in coloured


async def test_a_client_started_without_stderr_runs_without_its_status_lines(
        served: tuple[Engine, CaptionServer], tmp_path: Path) -> None:
    """Started with descriptor 2 closed (``2>&-``), Python's stderr is None:
    viewer.py and mic_client.py ended (AttributeError, status 1, nothing
    said) at their first status line, the server's hello and the file's
    error; and tts_bridge.py's error line and argparse's usage, print()ing
    to a None stderr, went to stdout. Their status and error lines are
    dropped, as the caller asked; stdout holds only what it is for."""
    _, server = served
    publish_finals(server, "talk", ["hello there", "goodbye"])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENTS / "viewer.py"), "--url", f"ws://127.0.0.1:{server.port}",
        "--stream", "talk", "--since", "0", "--exit-on-end", "--no-color",
        stdout=asyncio.subprocess.PIPE, env=client_env(), preexec_fn=lambda: os.close(2))
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, [line.split("] ", 1)[1] for line in out.decode().splitlines()]) \
        == (0, ["hello there", "goodbye"])
    for client, *args in (("mic_client.py", "--file", str(tmp_path / "gone.wav")),
                          ("tts_bridge.py", "--out", str(tmp_path), "--max-captions", "0"),
                          ("tts_bridge.py", "--max-captions", "1")):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(CLIENTS / client), *args, stdout=asyncio.subprocess.PIPE,
            env=client_env(), preexec_fn=lambda: os.close(2))
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert (proc.returncode, out.decode()) == (2, ""), (client, args)


async def test_a_viewer_started_without_stdout_says_so_and_exits_2(
        served: tuple[Engine, CaptionServer]) -> None:
    """Started with descriptor 1 closed (``>&-``), Python's stdout is None:
    the viewer ended with a traceback (AttributeError, status 1). Its
    captions are all it is for: one error line and status 2, as a command
    that cannot write what it was asked to (``evoxtral-stream config >&-``)."""
    _, server = served
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENTS / "viewer.py"), "--url", f"ws://127.0.0.1:{server.port}",
        "--stream", "talk", "--exit-on-end", stderr=asyncio.subprocess.PIPE,
        env=client_env(), preexec_fn=lambda: os.close(1))
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, err.decode().splitlines()) == (2, [
        "viewer.py: error: standard output is closed: the captions have nowhere to go "
        "(>/dev/null drops them)"])


# --- access tokens ---------------------------------------------------------------------


async def run_viewer(port: int, *args: str, env_token: str | None) -> tuple[int, str, str]:
    """viewer.py on stream talk from seq 0 until the stream's end, with
    ``$EVOXTRAL_TOKEN`` = ``env_token`` (None: unset); exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENTS / "viewer.py"), "--url", f"ws://127.0.0.1:{port}",
        "--stream", "talk", "--since", "0", "--exit-on-end", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=client_env(env_token))
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(("args", "env_token"), accepted_token_cases("subscribe"))
async def test_viewer_sends_its_token(
    guarded: tuple[Engine, CaptionServer], args: list[str], env_token: str | None,
) -> None:
    _, server = guarded
    publish_finals(server, "talk", ["[laughs] hello there", "goodbye"])
    code, out, err = await run_viewer(server.port, *args, env_token=env_token)
    assert code == 0, err
    assert out.splitlines() == ["[0:00.0 → 0:00.5] [laughs] hello there",
                                "[0:01.0 → 0:01.5] goodbye"]
    assert "connected to evoxtral-stream" in err


@pytest.mark.parametrize(("args", "env_token", "line"),
                         refused_token_cases("subscribe"))
async def test_a_refused_token_is_one_line_and_status_1(
    guarded: tuple[Engine, CaptionServer], args: list[str], env_token: str | None,
    line: str,
) -> None:
    _, server = guarded
    publish_finals(server, "talk", ["not shown"])
    code, out, err = await run_viewer(server.port, *args, env_token=env_token)
    assert code == 1
    assert err == line + "\n"
    assert out == ""


# --- resume and stream ends, against a scripted server ----------------------------------


def _hello(streams: list[str]) -> str:
    return json.dumps({"type": "hello", "v": 1, "server": "evoxtral-stream",
                       "version": "test", "backend": "scripted", "streams": streams})


def _final(stream: str, seq: int, text: str) -> str:
    return json.dumps({"type": "caption", "stream": stream, "segment": 0, "seq": seq,
                       "final": True, "text": text, "plain_text": text, "stable": text,
                       "unstable": "", "tags": [], "start": 0.0, "end": 1.0,
                       "latency": 0.1})


def _msg(kind: str, stream: str, **fields: object) -> str:
    if kind == "stream.ended":
        fields = {"duration": 1.0, "segments": 1, "finals": 1, **fields}
    return json.dumps({"type": kind, "stream": stream, **fields})


def _texts(out: io.StringIO) -> list[str]:
    return [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]


async def _watch_to_the_end(handler: Callable[[ServerConnection], Awaitable[None]],
                            streams: list[str], *, show_stream: bool = False) -> list[str]:
    """watch() with --exit-on-end against the scripted server ``handler``:
    it must exit 0; the caption texts it printed."""
    out, err = io.StringIO(), io.StringIO()
    writer = LiveWriter(out, err, color=False, live=False, show_stream=show_stream)
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        assert await asyncio.wait_for(watch(f"ws://127.0.0.1:{port}", streams, {}, writer,
                                            exit_on_end=True), 20) == 0, err.getvalue()
    return _texts(out)


async def test_after_a_gap_with_no_end_the_viewer_resumes_from_the_new_numbering() -> None:
    """A server restarted without its journal numbers the stream from 1 again
    and says so with a gap whose ``to`` is null: the next resume must ask
    from the new numbering, or the server would replay it all again."""
    sessions = [[_hello(["talk"]), _final("talk", 5, "before")],
                [_hello(["talk"]), _msg("gap", "talk", **{"from": 6}, to=None),
                 _final("talk", 1, "after")],
                [_hello(["talk"]), _msg("stream.ended", "talk")]]
    paths: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        for message in sessions[min(len(paths), len(sessions)) - 1]:
            await ws.send(message)
        await ws.close(1001, "going away")

    texts = await _watch_to_the_end(handler, ["talk"])
    assert paths == ["/v1/captions?stream=talk", "/v1/captions?stream=talk&since=talk:5",
                     "/v1/captions?stream=talk&since=talk:1"]
    assert texts == ["before", "after"]


async def test_a_link_lost_right_after_a_gap_with_no_end_resumes_from_0() -> None:
    """The gap with no end comes first, then every retained caption of the
    stream, numbered anew. If the link drops in between, the next resume
    must still ask for them (since=talk:0); without a resume point the
    server sends live events only, and they are lost."""
    retained = [_final("talk", 1, "after")]
    paths: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        if len(paths) == 1:
            await ws.send(_hello(["talk"]))
            await ws.send(_final("talk", 5, "before"))
        elif len(paths) == 2:  # the server restarted without its journal
            await ws.send(_hello(["talk"]))
            await ws.send(_msg("gap", "talk", **{"from": 6}, to=None))
        else:  # as the server answers: a resume replays, then the stream ends
            await ws.send(_hello(["talk"]))
            if "since=talk:" in ws.request.path:
                since = int(ws.request.path.rsplit(":", 1)[1])
                for message in retained:
                    if json.loads(message)["seq"] > since:
                        await ws.send(message)
            await ws.send(_msg("stream.ended", "talk"))
            await ws.wait_closed()
            return
        await ws.close(1001, "going away")

    texts = await _watch_to_the_end(handler, ["talk"])
    assert paths[2] == "/v1/captions?stream=talk&since=talk:0"
    assert texts == ["before", "after"]


async def test_exit_on_end_waits_for_a_stream_id_used_again_to_end_again() -> None:
    """--stream a --stream b --exit-on-end: a ends, a client reconnects under
    a's id (a new stream.started), then b ends. a is live again: the viewer
    goes on until a's second end."""
    script = [_hello(["a", "b"]), _final("a", 1, "a one"), _msg("stream.ended", "a"),
              _msg("stream.started", "a", source="ingest"), _msg("stream.ended", "b"),
              _final("a", 2, "a two"), _msg("stream.ended", "a")]

    texts = await _watch_to_the_end(sends(script), ["a", "b"], show_stream=True)
    assert texts == ["a one", "a two"]


@contextlib.asynccontextmanager
async def _watching(handler: Callable[[ServerConnection], Awaitable[None]], *,
                    max_retry_s: float) -> AsyncIterator[
                        tuple[asyncio.Future[int], io.StringIO, io.StringIO]]:
    """``watch`` of stream "talk" (plain, off a terminal) on a server running
    ``handler``: its task, stdout and stderr; cancelled at the end."""
    out, err = io.StringIO(), io.StringIO()
    writer = LiveWriter(out, err, color=False, live=False, show_stream=False)
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        task = asyncio.ensure_future(watch(f"ws://127.0.0.1:{port}", ["talk"], {}, writer,
                                           max_retry_s=max_retry_s))
        try:
            yield task, out, err
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_stream_that_ended_while_away_is_reported_once() -> None:
    """The resume replays the captions missed and the stream's stream.ended
    (docs/protocol.md, Resume): the viewer shows that end, and must not
    announce it again as 'ended while disconnected' once the replay is over."""
    sessions = [[_hello(["talk"]), _final("talk", 1, "one")],
                [_hello([]), _final("talk", 2, "two"), _msg("stream.ended", "talk")]]
    paths: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        for message in sessions[min(len(paths), len(sessions)) - 1]:
            await ws.send(message)
        if len(paths) == 1:
            await ws.close(1001, "going away")
        else:
            await ws.wait_closed()

    async with _watching(handler, max_retry_s=0.1) as (task, out, err):
        while len(paths) < 2 or "talk ended" not in err.getvalue():
            assert not task.done(), err.getvalue()
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.5)  # past the viewer's 1 s wait for the replay's end
    assert paths == ["/v1/captions?stream=talk", "/v1/captions?stream=talk&since=talk:1"]
    assert _texts(out) == ["one", "two"]
    ends = [line for line in err.getvalue().splitlines() if "talk ended" in line]
    assert len(ends) == 1, err.getvalue()


async def test_an_end_replayed_at_every_reconnect_is_shown_once() -> None:
    """A resume's replay ends with the stream.ended of each ended stream it
    names, seen before or not (docs/protocol.md, Resume): three connections
    showed the end three times."""
    script = [_hello([]), _final("talk", 1, "one"), _msg("stream.ended", "talk")]
    paths: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        for message in script if len(paths) == 1 else script[:1] + script[2:]:
            await ws.send(message)
        await ws.close(1001, "going away")

    async with _watching(handler, max_retry_s=0.05) as (task, out, err):
        while len(paths) < 4:
            assert not task.done(), err.getvalue()
            await asyncio.sleep(0.02)
    assert paths[1:3] == ["/v1/captions?stream=talk&since=talk:1"] * 2
    assert _texts(out) == ["one"]
    ends = [line for line in err.getvalue().splitlines() if "talk ended" in line]
    assert len(ends) == 1, err.getvalue()


async def test_a_viewer_that_saw_many_streams_resumes_the_live_one_in_a_url_a_server_takes(
) -> None:
    """A viewer of every stream resumes with since= for the streams it saw.
    With all of them there (a browser's microphone is a new id each time), a
    few hundred made the URL too long for the server (HTTP 414 on every
    reconnect, the viewer retrying for ever). The live stream goes first;
    ended ones follow while they fit."""
    ids = [f"browser-{i:03d}-" + "x" * 100 for i in range(120)]
    paths: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        if len(paths) == 1:
            await ws.send(_hello(["live", *ids]))
            await ws.send(_final("live", 1, "first"))
            for stream in ids:
                await ws.send(_final(stream, 1, "hello"))
                await ws.send(_msg("stream.ended", stream))
            await ws.close(1001, "going away")
            return
        await ws.send(_hello(["live"]))
        await ws.send(_final("live", 2, "after the restart"))
        await ws.wait_closed()

    out, err = io.StringIO(), io.StringIO()
    writer = LiveWriter(out, err, color=False, live=False, show_stream=True)
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        viewer = asyncio.ensure_future(watch(f"ws://127.0.0.1:{port}", [], {}, writer))
        for _ in range(500):
            if "after the restart" in out.getvalue():
                break
            assert not viewer.done(), err.getvalue()
            await asyncio.sleep(0.02)
        viewer.cancel()
        await asyncio.gather(viewer, return_exceptions=True)
    assert "after the restart" in out.getvalue(), err.getvalue()
    assert len(paths) == 2 and len(paths[1]) <= 4200, len(paths[1])
    assert paths[1].startswith("/v1/captions?since=live:1,")


async def test_a_locale_whose_encoding_lacks_the_arrow_gets_question_marks_not_a_crash(
    served: tuple[Engine, CaptionServer],
) -> None:
    """Under a non-UTF-8 locale (here ASCII) the final's ``→`` and the end
    line's ``■`` raised UnicodeEncodeError, which ended the viewer; they are
    written as ``?`` now, as the engine's own terminal output does."""
    engine, server = served
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENTS / "viewer.py"), "--url",
        f"ws://127.0.0.1:{server.port}", "--stream", "talk", "--exit-on-end",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert proc.stderr is not None
    hello = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
    assert "connected to evoxtral-stream" in hello, hello
    await feed_samples(engine.open_stream("talk", source="test"), buzzes(1), 1600,
                       realtime=False)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert re.fullmatch(r"\[0:00\.\d \? 0:0\d\.\d\] .+\n", out.decode()), out
    assert "? talk ended: 1 finals" in err.decode(), err


async def test_a_dumb_terminal_gets_finals_as_plain_lines() -> None:
    """``TERM=dumb`` (Emacs' shell buffer, some CI consoles) moves no cursor:
    the viewer redrew its partial rows there all the same, which showed as
    escape codes and stacked rows, as ``evoxtral-stream``'s own console no
    longer does. There only finals are printed, as plain lines."""
    partial = {**json.loads(_final("talk", 1, "so I was")), "final": False, "stable": "",
               "unstable": "so I was"}
    script = [_hello(["talk"]), json.dumps(partial), _final("talk", 2, "so I was thinking."),
              _msg("stream.ended", "talk")]
    primary, secondary = pty.openpty()
    try:
        async with scripted_server(script) as url:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(CLIENTS / "viewer.py"), "--url", url, "--stream", "talk",
                "--exit-on-end", stdout=secondary, stderr=asyncio.subprocess.PIPE,
                env={**client_env(), "TERM": "dumb"})
            os.close(secondary)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        shown = b""
        with contextlib.suppress(OSError):   # EIO: the viewer closed the terminal
            while chunk := os.read(primary, 65536):
                shown += chunk
    finally:
        os.close(primary)
    assert shown.decode() == "[0:00.0 → 0:01.0] so I was thinking.\r\n", shown
