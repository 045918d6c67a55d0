"""Re-synthesise final captions as speech: ElevenLabs v3, or offline espeak-ng.

The bridge subscribes to ``/v1/captions`` (see ``docs/protocol.md``), keeps
only ``final`` captions, and writes one audio file per final to
``OUTDIR/{stream}-{segment:05d}.{ext}`` (the stream id percent-encoded, as
in the journal's file names: characters outside ``[A-Za-z0-9._~-]`` and
leading dots become ``%XX``, so ids that differ get names that differ; a
lone surrogate, which JSON carries, as its three bytes ``%ED%A0%80``; an
existing file is replaced). A stream id used again (a client that
reconnected under it) counts its segments from 0 again: the bridge sees a
final whose segment is not past the last one, and names that session's
files ``{stream}+{n}-{segment:05d}.{ext}``, n = 2, 3, ... counted in this
run, so no session's files replace another's.

Two synthesisers (in ``tts_synth.py``; the tags -> prosody mapping, pure, in
``tts_prosody.py``):

- ``elevenlabs``: ``POST {base}/v1/text-to-speech/{voice}?output_format=FMT``
  with the tagged text, tags left inline, and ``model_id`` ``eleven_v3``,
  which performs the tags itself; v3 takes any bracketed text as a
  direction, so bracketed text holding a digit (``[2]``) goes without its
  brackets (``elevenlabs_text``), read out as in espeak mode. The response body is written as is
  (``mp3_44100_128`` -> ``.mp3``; ``pcm_*`` is raw s16le -> ``.pcm``). A
  429 or 5xx answer (or a network error) is retried with exponential backoff
  (``Retry-After`` honoured when it is a finite number of seconds >= 0,
  capped); any other non-2xx answer is logged with
  the API's message and the bridge goes on with the next caption.
- ``espeak``: offline, ``.wav``; the binary and its ``--voice`` are tried
  once before connecting (a bad one is a bad argument). The pure
  ``plan_speech`` maps the tags onto prosody: ``[whispers]`` -> the
  ``+whisper`` voice variant, ``[excited]`` -> faster and higher, ``[sad]``
  -> slower and lower, ``[calm]`` -> slower, ``[angry]``/``[shouts]`` -> louder (emotion and
  delivery tags hold until the sentence ends or a tag of the same kind
  replaces them); ``[pause]`` and its kin -> a break, any non-verbal tag
  (``[laughs]``, ``[sighs]``, ``[clears throat]``, ...) -> a short break
  (after punctuation, on top of the punctuation's own pause; a sentence
  end keeps its pause where the voice changes);
  other tags are dropped; bracketed text holding a digit (``[2]``) is no
  tag but text (the tokenizer's rule, the server's too), read out without
  its brackets; a word in capitals (``YES``) is said in lower case with
  emphasis, not spelled out. ``to_ssml`` writes SSML for ``espeak-ng -m``
  (``<prosody>``, ``<emphasis>``, ``<break>``, ``<voice name="en+whisper">``),
  one espeak-ng run per caption;
  pauses at the very start or end, which espeak-ng trims, are added as
  silence around its WAV.

Speech split for length. The server cuts speech longer than
``vad.max_segment_s`` into finals that follow one another, marks the later
ones ``continues``, and leaves out of them the emotion and delivery tags
that only restate those in effect (the merger's carry-over). A final that
continues the one before it so (:meth:`Final.continues`) is synthesised
with those tags in front (:func:`restated_tags`), in both modes: each file
stands alone. Other finals are spoken with their own tags only, even one
that starts where the one before it ended.

Queue and overflow policy. Between the WebSocket reader and the
synthesiser sits a bounded queue (``--queue``). Finals are never dropped
here: when the queue is full the reader waits, stops reading the socket, and
the server's per-subscriber queue fills instead. If the bridge falls
``server.subscriber_queue`` messages behind, the server disconnects it
(close 1013). The bridge then reconnects with ``since=STREAM:SEQ`` (the last
seq it read of each stream, as many as fit in 4 KB:
:func:`~evoxtral_stream.server.protocol.resume_since`, and ``epoch=`` from
the last hello, so a server restarted without its journal replays its new
numbering from seq 1) and the server replays what it retained, so nothing
is lost unless the bridge fell more than ``server.history`` captions
behind; then the server's ``gap`` message is logged as a warning (the
missing finals cannot be recovered). Captions
at or below a seq already read are ignored, so a replay never synthesises
twice.

Restarts. With ``--state FILE`` the bridge keeps, after every final it
handles, its epoch and each stream's last final (seq, session, segment, and
the emotion and delivery tags in effect at its end) in FILE
(:func:`write_state`, atomic), and a bridge started again resumes from it
(:func:`read_state`): nothing said while it was down is missed, nothing
handled is spoken again, file names go on, and a final continuing the last
one handled gets its tags put back as without the restart.

A server with access tokens gets ``--token`` (default ``$EVOXTRAL_TOKEN``)
as ``Authorization: Bearer``; a refused token stops the bridge with one line.
Logs go to stderr, tokens redacted, a final's text and whatever else they
quote from the server (stream ids, error messages) on one line (control
characters as spaces) and clipped to :data:`LOG_TEXT_COLUMNS`; the line of a
file written shows the final's text and, where it differs (ElevenLabs: a
bracketed number sent without its brackets), the text sent;
``--log-format json`` writes the engine's JSON lines (one object per line,
the refusal included) for a log shipper.

Run ``python clients/tts_bridge.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

from _auth import add_token_option, auth_headers, install_token_redaction, refusal
from _loop import run_client
from _terminal import closed_stderr_dropped, lenient_output
from _url import Role, add_url_option, endpoint, take_query, with_query
from tts_synth import (
    DEFAULT_BASE_URL,
    ELEVENLABS_MODEL,
    ESPEAK_WPM_RANGE,
    ElevenLabsOptions,
    ElevenLabsSynth,
    EspeakOptions,
    EspeakSynth,
    SynthesisError,
    Synthesizer,
    VoiceSettings,
    check_espeak,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from evoxtral_stream.console import clip_columns, printable
from evoxtral_stream.logs import configure_logging, install_json_hooks
from evoxtral_stream.server.auth import redact_tokens
from evoxtral_stream.server.protocol import (
    finite_seconds,
    hello_epoch,
    parse_epoch,
    resume_since,
)
from evoxtral_stream.server.protocol import parse_since as parse_since_values
from evoxtral_stream.text.tags import Carry, TagKind, tokenize

__all__ = [
    "LOG_TEXT_COLUMNS",
    "RECENT_WRITTEN",
    "BridgeConfig",
    "BridgeError",
    "BridgeStats",
    "Final",
    "Mode",
    "SavedState",
    "TtsBridge",
    "build_parser",
    "caption_url",
    "check_output_folder",
    "main",
    "next_state",
    "output_name",
    "parse_since",
    "read_state",
    "restated_tags",
    "resume_since",
    "write_state",
]

log = logging.getLogger("evoxtral_stream.clients.tts_bridge")

DEFAULT_URL = "ws://127.0.0.1:8765/v1/captions"
PROTOCOL_VERSION = 1
CLOSE_POLICY = 1008
#: The columns of a final's text in its "wrote" log line (clipped with "…"),
#: and of the text sent for it, where that differs (ElevenLabs).
LOG_TEXT_COLUMNS = 120
#: How many of the latest files written :attr:`TtsBridge.written` names (all
#: are counted): a bridge beside a 24/7 stream writes one per final for days.
RECENT_WRITTEN = 100


def _shown(value: object) -> str:
    """A value from the server as a log line quotes it: control characters
    as spaces (ESC would reach the terminal), clipped to
    :data:`LOG_TEXT_COLUMNS`."""
    return clip_columns(printable(str(value)), LOG_TEXT_COLUMNS)


class Mode(enum.Enum):
    """Which synthesiser the bridge drives (the ``--mode`` value)."""

    ELEVENLABS = "elevenlabs"
    ESPEAK = "espeak"


class BridgeError(Exception):
    """A problem the bridge cannot go on from (one line, for people)."""


# --- captions, names, URLs (pure) ---------------------------------------------


@dataclass(frozen=True)
class Final:
    """One final caption: what the bridge synthesises."""

    stream: str
    segment: int
    seq: int
    text: str
    session: int = 1
    """Which session of the stream id, counted by the bridge (module doc)."""
    start: float | None = None
    end: float | None = None
    """The segment's span in stream seconds (None: the message had none)."""
    restated: str = ""
    """Tags in effect at the end of the final this one continues, which the
    server left out of ``text`` (:func:`restated_tags`), spoken first."""
    epoch: str | None = None
    """The numbering ``seq`` is of (the hello's before the final was read)."""
    split: bool = False
    """The server marked it as going on with the speech of the final before
    it, cut for length (``continues`` on the wire): its text leaves out the
    tags still in effect there."""

    @property
    def spoken(self) -> str:
        """What the synthesiser is given: ``restated`` and ``text``."""
        return f"{self.restated} {self.text}" if self.restated else self.text

    @property
    def carry(self) -> Carry:
        """The emotion and delivery tags in effect at the end of :attr:`spoken`:
        what a final continuing this one restates (:func:`restated_tags`)."""
        return Carry().advance_all(tokenize(self.spoken))

    def continues(self, prev: Final) -> bool:
        """Whether this final goes on where ``prev`` stopped: the server
        marked it so (:attr:`split`: speech longer than ``vad.max_segment_s``)
        and it is the next segment of ``prev``'s session. Starting where
        ``prev`` ended is not enough: after a pause shorter than the
        segmenter's pre-roll, or a client's commit, the next segment starts
        there too, and its tags are the model's own."""
        return (self.split and self.stream == prev.stream and self.session == prev.session
                and self.segment == prev.segment + 1)

    @classmethod
    def from_message(cls, msg: Mapping[str, object]) -> Final | None:
        """The final in a decoded ``caption`` message, or None (partials,
        other types, malformed fields)."""
        if msg.get("type") != "caption" or msg.get("final") is not True:
            return None
        stream, segment, seq, text = (msg.get(k) for k in ("stream", "segment", "seq", "text"))
        if not (isinstance(stream, str) and isinstance(segment, int)
                and isinstance(seq, int) and isinstance(text, str)):
            return None
        start, end = (finite_seconds(msg.get(k)) for k in ("start", "end"))
        return cls(stream, segment, seq, text, start=start, end=end,
                   split=msg.get("continues") is True)


@dataclass(frozen=True)
class SavedState:
    """What ``--state`` keeps: the epoch and, per stream, the seq of the last
    final handled (synthesised, failed or skipped) and its session and
    segment, so that a restarted bridge resumes after it, naming its files on;
    and ``tags``: the emotion and delivery tags in effect at that final's end
    (:attr:`Final.carry`; streams with none left out), which the next final
    restates when it continues that one (a restart inside speech split for
    length speaks it as a bridge that ran on would)."""

    epoch: str | None
    since: dict[str, int]
    sessions: dict[str, tuple[int, int]]
    tags: dict[str, Carry] = field(default_factory=dict)


def read_state(path: Path) -> SavedState | None:
    """The state saved in ``path``; None when there is none yet. Raises
    :class:`BridgeError` (one line) for a file that cannot be read or is not
    one this bridge wrote."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BridgeError(f"cannot read the state file {path}: {e.strerror or e}") from None
    try:
        obj = json.loads(raw)
        epoch = obj["epoch"]
        since = {str(k): int(v) for k, v in obj["since"].items() if int(v) >= 0}
        sessions = {str(k): (int(v[0]), int(v[1])) for k, v in obj["sessions"].items()}
        # A state an older bridge wrote has no "tags": none in effect.
        tags = {str(k): _read_carry(v) for k, v in obj.get("tags", {}).items()}
        if epoch is not None:
            epoch = parse_epoch([epoch])
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError):
        raise BridgeError(f"the state file {path} is damaged (not what --state writes); "
                          "move it away to start afresh") from None
    return SavedState(epoch, since, sessions, {k: c for k, c in tags.items() if c != Carry()})


def _carry_text(carry: Carry) -> str:
    """``carry`` as the state file keeps it: its tags as text, ``"[sad] [whispers]"``."""
    return " ".join(f"[{name}]" for name in (carry.emotion, carry.delivery) if name is not None)


def _read_carry(text: object) -> Carry:
    """The tags a state file's ``"[sad] [whispers]"`` holds (other tags are
    ignored); raises TypeError for anything but a string."""
    if not isinstance(text, str):
        raise TypeError("not tags")
    return Carry().advance_all(tok for tok in tokenize(text) if tok.carries)


def next_state(saved: SavedState, final: Final, ended: Collection[str] = ()) -> SavedState:
    """``saved`` once ``final`` is handled. Seqs of another epoch than the
    final's become 0 (a restart resumes under the new one, from the start of
    what the server retains; a state without an epoch, from a first run's
    ``--since``, is taken as of the final's); the streams kept are those a
    resume sends (:func:`resume_since`, 4 KB; ``ended``: the
    streams that ended). Sessions name files whatever the epoch: those of the
    streams kept, and across an epoch change those of the streams before."""
    # Keep 0, not none, for the streams not heard under the new epoch yet
    # (protocol.md "Resume"): a resume without a since for them would get
    # live captions only, and lose those retained.
    since = (dict(saved.since) if saved.epoch in (None, final.epoch)
             else dict.fromkeys(saved.since, 0))
    since.pop(final.stream, None)  # in order of activity (resume_since)
    since[final.stream] = final.seq
    since = {s: since[s] for s in reversed(resume_since(since, ended))}
    sessions = {s: v for s, v in saved.sessions.items() if s in since or s in saved.since}
    sessions[final.stream] = (final.session, final.segment)
    tags = {s: c for s, c in saved.tags.items() if s in sessions and s != final.stream}
    if final.carry != Carry():
        tags[final.stream] = final.carry
    return SavedState(final.epoch, since, sessions, tags)


def write_state(path: Path, state: SavedState) -> None:
    """Save ``state`` in ``path`` atomically (a file beside it, fsynced, renamed)."""
    # A lone surrogate (an id from JSON) can only be inside a JSON string:
    # backslashreplace writes it as JSON's own escape for it, "\ud800".
    data = json.dumps({"epoch": state.epoch, "since": state.since,
                       "sessions": {k: list(v) for k, v in state.sessions.items()},
                       "tags": {k: _carry_text(v) for k, v in state.tags.items()}},
                      ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n"
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def restated_tags(carry: Carry, text: str) -> str:
    """The emotion and delivery tags of ``carry`` (those in effect at the end
    of the final that ``text`` continues) that ``text`` does not set itself
    before its first word, as ``"[sad] [whispers]"``; ``""`` for none.

    Where the server splits long speech, it leaves out of the second part
    the tags that only restate those still in effect (the merger's
    carry-over), so each part spoken alone would lose them."""
    own = set()
    for tok in tokenize(text):
        if tok.is_word:
            break
        if tok.is_tag and tok.carries:
            own.add(tok.tag_kind)
    names = [name for name, kind in ((carry.emotion, TagKind.EMOTION),
                                     (carry.delivery, TagKind.DELIVERY))
             if name is not None and kind not in own]
    return " ".join(f"[{name}]" for name in names)


def output_name(stream: str, segment: int, ext: str, session: int = 1) -> str:
    """``{stream}-{segment:05d}.{ext}``, the stream id percent-encoded as a
    file name (as the journal names its files, and leading dots too, so that
    no file is hidden); ``{stream}+{session}-...`` from a stream id's second
    session on. The encoding is one-to-one and ``+`` never comes from an id,
    so two finals get the same name only when they are the same final. A lone
    surrogate (JSON carries them) is encoded as UTF-8 would encode it if it
    could (``surrogatepass``): still one-to-one, and never a valid id's name."""
    safe = quote(stream, safe="", errors="surrogatepass")
    dots = len(safe) - len(safe.lstrip("."))
    tag = f"+{session}" if session > 1 else ""
    return f"{'%2E' * dots}{safe[dots:]}{tag}-{segment:05d}.{ext}"


def parse_since(value: str, streams: Sequence[str]) -> dict[str, int]:
    """``--since``: ``SEQ`` (for every ``--stream``) or ``STREAM:SEQ[,STREAM:SEQ...]``.

    Raises ValueError with a message for people (the server's own parser).
    """
    return parse_since_values([value or ""], streams, streams_by="--stream")


def caption_url(url: str, streams: Sequence[str], since: Mapping[str, int],
                epoch: str | None = None) -> str:
    """The ``/v1/captions`` URL of the server ``url`` names (its path a
    prefix, less an endpoint it ends with: :func:`_url.endpoint`) with
    ``stream=``, ``since=`` and, with a ``since``, ``epoch=`` (the numbering
    its seqs are of; None: unknown) set from the arguments; the other
    parameters of ``url``'s query are kept.

    Raises ValueError for a URL that names no server."""
    query: list[tuple[str, str]] = []
    if streams:
        query.append(("stream", ",".join(streams)))
    if since:
        query.append(("since", ",".join(f"{s}:{n}" for s, n in sorted(since.items()))))
        if epoch is not None:
            query.append(("epoch", epoch))
    return with_query(endpoint(url, "/v1/captions"), query, query_of=url)


# --- the bridge -------------------------------------------------------------------


def check_output_folder(out: Path) -> None:
    """Raise :class:`BridgeError` (one line) unless ``out`` can hold the audio
    files: a folder this process may write in, or a path whose nearest
    existing ancestor is one (so that it can be made). Creates nothing."""
    probe = out
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    where = "it" if probe == out else repr(str(probe))
    problem = None
    if not probe.is_dir():  # a file, or a symbolic link to nothing or to a file
        problem = f"{where} is not a folder"
    elif not os.access(probe, os.W_OK | os.X_OK):
        problem = f"{where} is not writable"
    if problem is not None:
        raise BridgeError(f"cannot use {str(out)!r} as the output folder: {problem}")


@dataclass(frozen=True)
class BridgeConfig:
    """What to subscribe to and where to write.

    ``since``: resume points (stream, seq) for the first connection, and
    ``epoch`` the numbering they are of (``--epoch``; None: unknown).
    ``queue_size``: finals waiting for the synthesiser (the reader waits
    when it is full, see the module doc). ``max_captions``: stop after that
    many finals were handled (written, failed or skipped). ``exit_on_end``:
    stop after ``stream.ended`` of every ``streams`` entry (without
    ``streams``: of every stream seen) and the queue is drained.
    ``reconnect``: reconnect after a lost connection, with ``since=``.
    ``token``: the access token, sent as ``Authorization: Bearer`` (None:
    none); left out of the repr so that it stays out of logs. ``state``: a
    file (``--state``) where the bridge keeps where it is after every final
    it handles, and resumes from when it starts (``since`` and ``epoch``
    must then be empty, unless the file does not exist yet).
    """

    out: Path
    url: str = DEFAULT_URL
    streams: tuple[str, ...] = ()
    since: tuple[tuple[str, int], ...] = ()
    epoch: str | None = None
    queue_size: int = 32
    max_captions: int | None = None
    exit_on_end: bool = False
    reconnect: bool = True
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 10.0
    token: str | None = field(default=None, repr=False)
    state: Path | None = None


@dataclass(frozen=True)
class BridgeStats:
    """Counts at the end of a run: files written, captions that failed,
    captions skipped (nothing to say), gaps the server announced,
    reconnections."""

    written: int
    failed: int
    skipped: int
    gaps: int
    reconnects: int


class TtsBridge:
    """Reads finals from the caption server and writes one audio file each.

    One reader task (WebSocket) and one synthesiser task joined by a bounded
    queue; finals are synthesised one at a time, in arrival order.
    """

    def __init__(self, cfg: BridgeConfig, synth: Synthesizer) -> None:
        if cfg.queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.cfg = cfg
        self.synth = synth
        self.written: deque[Path] = deque(maxlen=RECENT_WRITTEN)
        """The latest files written, at most :data:`RECENT_WRITTEN`."""
        self._written = 0
        self._queue: asyncio.Queue[Final | None] = asyncio.Queue(cfg.queue_size)
        self._last_seq: dict[str, int] = dict(cfg.since)
        self._epoch = cfg.epoch  # the numbering of those seqs (the last hello's)
        # Per stream: the segment of its last final and its session (module doc).
        self._last_segment: dict[str, int] = {}
        self._session: dict[str, int] = {}
        # What --state keeps (SavedState), as of the last final handled.
        self._saved = SavedState(cfg.epoch, dict(cfg.since), {})
        if cfg.state is not None and (saved := read_state(cfg.state)) is not None:
            if cfg.since or cfg.epoch:
                raise BridgeError(f"--since/--epoch and --state {cfg.state}, which holds "
                                  "where to resume already: give one")
            self._saved = saved
            self._epoch = saved.epoch
            # Only the streams this run takes: a since for another is refused
            # (bad_query); the state keeps theirs for a run that takes them.
            self._last_seq = {s: n for s, n in saved.since.items()
                              if not cfg.streams or s in cfg.streams}
            self._session = {k: v[0] for k, v in saved.sessions.items()}
            self._last_segment = {k: v[1] for k, v in saved.sessions.items()}
        # Per stream: its last final, and the tags in effect at its end. After
        # a restart, the last final handled (what Final.continues compares)
        # and its saved tags: the next final may continue it.
        self._tail: dict[str, tuple[Final, Carry]] = {
            s: (Final(s, segment, self._saved.since.get(s, 0), "", session=session),
                self._saved.tags.get(s, Carry()))
            for s, (session, segment) in self._saved.sessions.items()}
        self._seen: set[str] = set(cfg.streams)
        self._ended: set[str] = set()
        self._handled = 0
        self._failed = 0
        self._skipped = 0
        self._gaps = 0
        self._reconnects = 0
        self._out_made = False

    @property
    def stats(self) -> BridgeStats:
        return BridgeStats(self._written, self._failed, self._skipped, self._gaps,
                           self._reconnects)

    @property
    def resume_points(self) -> dict[str, int]:
        """The last seq read of each stream (what a reconnect sends as ``since``)."""
        return dict(self._last_seq)

    async def run(self) -> BridgeStats:
        """Run until ``max_captions``, ``exit_on_end``, or (without
        ``reconnect``) the connection's end; raise :class:`BridgeError` when
        the server cannot be reached at first, refuses the subscription, or
        ``out`` is not a usable folder (checked before connecting, see
        :func:`check_output_folder`; the folder itself is made before the
        first file is written). Finals already read are synthesised before a
        refusal is raised."""
        check_output_folder(self.cfg.out)
        reader = asyncio.ensure_future(self._read())
        writer = asyncio.ensure_future(self._synthesize_all())
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and not reader.cancelled():
                # The reader queued its end marker, on an error too: the writer
                # speaks the finals already read, then the error is raised.
                await writer
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
        for task in (reader, writer):
            exc = None if task.cancelled() else task.exception()
            if exc is not None:
                raise exc
        return self.stats

    # reader side

    async def _read(self) -> None:
        try:
            await self._read_connections()
        except Exception:
            await self._queue.put(None)  # the finals read so far are still spoken
            raise
        await self._queue.put(None)  # no more finals: the writer drains and stops

    async def _read_connections(self) -> None:
        delay = self.cfg.reconnect_min_s
        connected = False
        while True:
            since = resume_since(self._last_seq, self._ended)
            left_out = [s for s in self._last_seq if s not in since and s not in self._ended]
            if left_out:
                log.warning("resuming %d streams; %d live ones (%s, ...) get live captions "
                            "only: the URL would be too long, or cannot name them", len(since),
                            len(left_out), _shown(left_out[0]))
            url = caption_url(self.cfg.url, self.cfg.streams, since, self._epoch)
            conn: ClientConnection | None = None
            try:
                # The hello lists every open stream: past websockets' 1 MiB
                # default on a busy server. The viewer's and mic_client's limit.
                async with connect(url, open_timeout=10, close_timeout=2, max_size=2**24,
                                   additional_headers=auth_headers(self.cfg.token)) as ws:
                    conn = ws
                    await self._expect_hello(ws)
                    connected = True
                    delay = self.cfg.reconnect_min_s
                    log.info("subscribed to %s (epoch %s)", url, self._epoch or "-")
                    async for raw in ws:
                        if await self._on_message(raw):
                            return
            except ConnectionClosed:
                pass
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as e:
                refused = refusal(e, self.cfg.token)
                if refused is not None:
                    # On a reconnect too: the same token would be refused again.
                    raise BridgeError(refused) from e
                if not connected:
                    raise BridgeError(f"cannot subscribe to {url}: {e} "
                                      "(is `evoxtral-stream serve` running there?)") from e
                log.warning("connection to %s failed: %s", url, e)
            close_code = conn.close_code if conn is not None else None
            if not connected:
                raise BridgeError(f"{url} closed the connection before its hello "
                                  f"(code {close_code})")
            if close_code == CLOSE_POLICY:
                raise BridgeError(f"the server refused the subscription {url} (close 1008)")
            if not self.cfg.reconnect:
                log.info("connection closed (code %s); not reconnecting", close_code)
                return
            self._reconnects += 1
            reason = "too slow, dropped by the server" if close_code == 1013 else "lost"
            log.warning("connection %s (code %s); reconnecting in %.1f s with since=%s",
                        reason, close_code, delay, self._last_seq or "-")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.cfg.reconnect_max_s)

    async def _expect_hello(self, ws: ClientConnection) -> None:
        raw = await asyncio.wait_for(ws.recv(), 10)
        try:
            hello = json.loads(raw)
        except (ValueError, RecursionError):  # nested too deep for Python
            hello = raw  # not JSON: said below
        if isinstance(hello, dict) and hello.get("type") == "error":
            raise BridgeError(f"the server refused the subscription: {hello.get('code')}: "
                              f"{hello.get('message')}")
        if not isinstance(hello, dict) or hello.get("type") != "hello":
            raise BridgeError(f"expected a hello from the server, got {str(hello)[:80]}")
        if hello.get("v") != PROTOCOL_VERSION:
            raise BridgeError(f"server speaks protocol v{hello.get('v')}, "
                              f"this bridge v{PROTOCOL_VERSION}")
        streams = hello.get("streams")
        open_now = ({s for s in streams if isinstance(s, str)} if isinstance(streams, list)
                    else set())
        if not self.cfg.streams:
            self._seen.update(open_now)
        self._ended -= open_now  # an id used again while away is live again
        epoch = hello_epoch(hello.get("epoch"))
        if epoch is not None:
            if self._epoch is not None and epoch != self._epoch:
                # A new numbering (a restart without the journal): no seq
                # read means anything now, those left out of the URL included.
                log.warning("the server numbers captions anew (epoch %s, was %s): taking "
                            "every stream's captions from seq 0", _shown(epoch),
                            _shown(self._epoch))
                self._last_seq = dict.fromkeys(self._last_seq, 0)
            self._epoch = epoch

    async def _on_message(self, raw: str | bytes) -> bool:
        """Handle one server message; True when the bridge should stop reading."""
        try:
            msg = json.loads(raw)
        except (ValueError, RecursionError):  # nested too deep for Python
            log.warning("ignoring a message that is not JSON: %.60r", raw)
            return False
        if not isinstance(msg, dict):
            return False
        kind = msg.get("type")
        if kind == "caption":
            stream, seq = msg.get("stream"), msg.get("seq")
            if not isinstance(stream, str) or not isinstance(seq, int):
                return False
            if seq <= self._last_seq.get(stream, 0):
                return False  # replayed after a reconnect: already read
            self._last_seq.pop(stream, None)  # kept in order of activity (resume_since)
            self._last_seq[stream] = seq
            self._seen.add(stream)
            self._ended.discard(stream)  # a caption after its end: the id's next run
            final = Final.from_message(msg)
            if final is not None:
                last = self._last_segment.get(stream)
                if last is not None and final.segment <= last:
                    self._session[stream] = self._session.get(stream, 1) + 1
                self._last_segment[stream] = final.segment
                final = replace(final, session=self._session.get(stream, 1), epoch=self._epoch)
                tail = self._tail.get(stream)
                if tail is not None and final.continues(tail[0]):
                    final = replace(final, restated=restated_tags(tail[1], final.text))
                self._tail[stream] = (final, final.carry)
                await self._queue.put(final)  # backpressure, never a drop
        elif kind == "stream.started" and isinstance(msg.get("stream"), str):
            self._seen.add(msg["stream"])
            self._ended.discard(msg["stream"])  # an id used again is live again
        elif kind == "stream.ended" and isinstance(msg.get("stream"), str):
            self._seen.add(msg["stream"])
            self._ended.add(msg["stream"])
            log.info("stream %s ended", _shown(msg["stream"]))
            return self.cfg.exit_on_end and self._seen <= self._ended
        elif kind == "gap":
            self._gaps += 1
            if msg.get("to") is None:
                log.warning("server cannot place caption %s of stream %s (it restarted, "
                            "or forgot the stream): taking all it has from the start; "
                            "finals between may be lost", _shown(msg.get("from")),
                            _shown(msg.get("stream")))
            else:
                log.warning("server no longer has captions %s..%s of stream %s: "
                            "those finals are lost", _shown(msg.get("from")),
                            _shown(msg.get("to")), _shown(msg.get("stream")))
            if msg.get("to") is None and isinstance(msg.get("stream"), str):
                # The server cannot place our seq (a restart without its
                # journal): what follows may be numbered anew. Resume from 0,
                # not without since=, in case the link drops before it comes.
                self._last_seq[msg["stream"]] = 0
        elif kind == "error":
            log.warning("server error %s: %s", _shown(msg.get("code")),
                        _shown(msg.get("message")))
        return False

    # writer side

    async def _synthesize_all(self) -> None:
        while True:
            final = await self._queue.get()
            if final is None:
                return
            await self._synthesize(final)
            self._handled += 1
            if self.cfg.state is not None:
                self._save(final)
            if self.cfg.max_captions is not None and self._handled >= self.cfg.max_captions:
                return

    def _save(self, final: Final) -> None:
        """Keep ``final`` as handled in the state file (:func:`next_state`)."""
        self._saved = next_state(self._saved, final, self._ended)
        assert self.cfg.state is not None
        try:
            write_state(self.cfg.state, self._saved)
        except OSError as e:
            raise BridgeError(f"cannot write the state file {self.cfg.state}: "
                              f"{e.strerror or e}") from e

    async def _synthesize(self, final: Final) -> None:
        dest = self.cfg.out / output_name(final.stream, final.segment, self.synth.ext,
                                          final.session)
        if not self.synth.speakable(final.text):
            self._skipped += 1
            log.info("%s segment %d: nothing to say, skipped", _shown(final.stream),
                     final.segment)
            return
        if not self._out_made:
            # Only now: a run that never writes (refused, unreachable) leaves no folder.
            try:
                self.cfg.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise BridgeError(f"cannot use {str(self.cfg.out)!r} as the output folder: "
                                  f"{e.strerror or e}") from None
            self._out_made = True
        t0 = time.monotonic()
        try:
            await self.synth.synthesize(final.spoken, dest)
        except SynthesisError as e:
            self._failed += 1
            log.error("%s segment %d (seq %d): %s", _shown(final.stream), final.segment,
                      final.seq, e)
            return
        except OSError as e:
            raise BridgeError(f"cannot write {dest}: {e}") from e
        self.written.append(dest)
        self._written += 1
        shown, sent = _shown(final.spoken), _shown(self.synth.sent_text(final.spoken))
        # What ElevenLabs was given ([2] as 2), where the line shows a difference.
        log.info("wrote %s (synthesised in %.2f s): %s%s", dest, time.monotonic() - t0,
                 shown, "" if sent == shown else f" (sent as: {sent})")


# --- command line -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tts_bridge.py",
        description="Re-synthesise final captions from an evoxtral-stream server as speech.")
    p.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.ESPEAK.value,
                   help="elevenlabs (v3, tags performed) or espeak (offline; default)")
    p.add_argument("--out", type=Path, required=True, help="folder for the audio files")
    add_url_option(p, DEFAULT_URL, Role.SUBSCRIBE)
    p.add_argument("--stream", action="append", default=[],
                   help="stream id to follow (repeat or comma-separate; default: all)")
    p.add_argument("--since", help="resume after SEQ (with --stream) or STREAM:SEQ[,...]")
    p.add_argument("--epoch", metavar="E",
                   help="the epoch the --since seqs are of (logged as 'subscribed to ... "
                        "(epoch E)'): a server that numbers anew since then replays from "
                        "the start")
    p.add_argument("--state", type=Path, metavar="FILE",
                   help="keep where the bridge is in FILE after every final, and resume "
                        "from it when started again (no final spoken twice or missed, "
                        "file names going on)")
    p.add_argument("--voice", help="ElevenLabs voice id (required for elevenlabs) or "
                                   "espeak-ng voice (default en)")
    p.add_argument("--queue", type=int, default=32, help="finals waiting for synthesis")
    p.add_argument("--max-captions", type=int, help="exit after N finals")
    p.add_argument("--exit-on-end", action="store_true",
                   help="exit when the followed streams have ended")
    p.add_argument("--no-reconnect", action="store_true",
                   help="exit when the connection is lost instead of resuming")
    add_token_option(p)
    p.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log lines on stderr: text, or json (one object per line) for log "
                        "shippers (default: %(default)s)")
    el = p.add_argument_group("elevenlabs")
    el.add_argument("--api-key", help="API key (default $ELEVENLABS_API_KEY; an option "
                                      "is visible to other users in the process list)")
    el.add_argument("--format", default="mp3_44100_128", help="output_format (default %(default)s)")
    el.add_argument("--base-url", default=DEFAULT_BASE_URL, help="API base (default %(default)s)")
    el.add_argument("--model", default=ELEVENLABS_MODEL, help="model_id (default %(default)s)")
    el.add_argument("--stability", type=float, help="voice_settings.stability (v3: 0, 0.5, 1)")
    el.add_argument("--similarity-boost", type=float, help="voice_settings.similarity_boost")
    el.add_argument("--style", type=float, help="voice_settings.style")
    el.add_argument("--speed", type=float, help="voice_settings.speed")
    el.add_argument("--speaker-boost", action=argparse.BooleanOptionalAction, default=None,
                    help="voice_settings.use_speaker_boost")
    el.add_argument("--retries", type=int, default=3, help="retries on 429/5xx (default 3)")
    el.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    es = p.add_argument_group("espeak")
    es.add_argument("--wpm", type=int, default=175,
                    help="words per minute, {} to {} (default 175)".format(*ESPEAK_WPM_RANGE))
    es.add_argument("--espeak", default="espeak-ng", help="espeak-ng binary")
    return p


def _check_synth_options(args: argparse.Namespace) -> None:
    """Raise ValueError (one line) for an option no synthesis can use: the
    synthesisers would take it and fail, or worse, write every final
    wrong (espeak-ng writes empty WAVs far above its range, and takes a
    rate below it as another rate)."""
    low, high = ESPEAK_WPM_RANGE
    if not low <= args.wpm <= high:
        raise ValueError(f"--wpm must be from {low} to {high} (got {args.wpm})")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ValueError(f"--timeout must be a number of seconds above 0 (got {args.timeout})")
    if args.retries < 0:
        raise ValueError(f"--retries must be at least 0 (got {args.retries})")
    for option, value in (("--stability", args.stability),
                          ("--similarity-boost", args.similarity_boost),
                          ("--style", args.style), ("--speed", args.speed)):
        # NaN and infinity are no JSON: the API would refuse every request.
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{option} must be a finite number (got {value})")


def _synth_from_args(args: argparse.Namespace) -> Synthesizer:
    if Mode(args.mode) is Mode.ESPEAK:
        opts = EspeakOptions(voice=args.voice or "en", wpm=args.wpm, binary=args.espeak)
        try:
            check_espeak(opts)
        except ValueError as e:
            raise BridgeError(str(e)) from None
        return EspeakSynth(opts)
    if not args.voice:
        raise BridgeError("--mode elevenlabs needs --voice VOICE_ID")
    key = args.api_key or os.environ.get("ELEVENLABS_API_KEY", "")
    if not key:
        raise BridgeError("no ElevenLabs API key: set $ELEVENLABS_API_KEY or pass --api-key")
    settings = VoiceSettings(args.stability, args.similarity_boost, args.style, args.speed,
                             args.speaker_boost)
    try:
        return ElevenLabsSynth(ElevenLabsOptions(
            voice_id=args.voice, api_key=key, output_format=args.format,
            base_url=args.base_url, model_id=args.model, voice_settings=settings,
            timeout_s=args.timeout, max_retries=args.retries))
    except ValueError as e:
        raise BridgeError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 1 error, 2 a bad or missing
    argument or an unusable ``--out``, 130 Ctrl-C)."""
    closed_stderr_dropped()
    lenient_output()
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO
    if args.log_format == "json":
        # The engine's JSON lines (ts, level, logger, msg, exc); its formatter
        # also redacts extra= fields, which the filter below does not see.
        configure_logging("json", level, redact=redact_tokens)
        install_json_hooks()  # uncaught errors and warnings as JSON lines too
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S")
    # Tokens out of the log: --debug shows websockets' handshake lines (the
    # Authorization header among them), and a --url may carry ?token=.
    install_token_redaction()
    try:
        for option, value in (("--max-captions", args.max_captions), ("--queue", args.queue)):
            if value is not None and value < 1:
                raise ValueError(f"{option} must be at least 1 (got {value})")
        _check_synth_options(args)
        endpoint(args.url, "/")
        # ?stream= (the page's ?streams=), ?since=, ?epoch= and ?token= (or
        # #token=) of --url count as the options.
        given = take_query(args.url, streams=[s for v in args.stream for s in v.split(",") if s],
                           since=args.since, epoch=args.epoch, token=args.token,
                           role=Role.SUBSCRIBE)
        check_output_folder(args.out)
        since = parse_since(given.since, given.streams) if given.since else {}
        epoch = parse_epoch([given.epoch] if given.epoch is not None else [])
        synth = _synth_from_args(args)
        cfg = BridgeConfig(out=args.out, url=given.url, streams=given.streams,
                           since=tuple(since.items()), epoch=epoch, queue_size=args.queue,
                           max_captions=args.max_captions, exit_on_end=args.exit_on_end,
                           reconnect=not args.no_reconnect, token=given.token,
                           state=args.state)
        bridge = TtsBridge(cfg, synth)  # reads --state: a damaged one is a bad argument
    except (BridgeError, ValueError) as e:
        _report(e, args.log_format)
        return 2
    except KeyboardInterrupt:  # during the espeak-ng check, say
        return 130
    try:
        stats = run_client(bridge.run())
    except KeyboardInterrupt:
        return 130
    except (BridgeError, ValueError) as e:
        if args.debug:
            raise
        _report(e, args.log_format)
        return 1
    log.info("done: %d written, %d failed, %d skipped, %d gaps, %d reconnects",
             stats.written, stats.failed, stats.skipped, stats.gaps, stats.reconnects)
    return 0 if stats.failed == 0 else 1


def _report(e: Exception, log_format: str) -> None:
    """One line on stderr: a log line in JSON mode, else prefixed with the
    program; a token it quotes (a URL's ``?token=``) redacted, as in the log."""
    if log_format == "json":
        log.error("%s", e)
    else:
        print(f"tts_bridge: {redact_tokens(str(e))}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
