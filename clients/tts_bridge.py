"""Re-synthesise final captions as speech: ElevenLabs v3, or offline espeak-ng.

The bridge subscribes to ``/v1/captions`` (see ``docs/protocol.md``), keeps
only ``final`` captions, and writes one audio file per final to
``OUTDIR/{stream}-{segment:05d}.{ext}`` (characters of the stream id outside
``[A-Za-z0-9._-]`` become ``_``; an existing file is replaced). A stream id
used again (a client that reconnected under it) counts its segments from 0
again: the bridge sees a final whose segment is not past the last one, and
names that session's files ``{stream}+{n}-{segment:05d}.{ext}``, n = 2, 3, ...
counted in this run, so no session's files replace another's.

Two synthesisers:

- ``elevenlabs``: ``POST {base}/v1/text-to-speech/{voice}?output_format=FMT``
  with the tagged text, tags left inline, and ``model_id`` ``eleven_v3``,
  which performs the tags itself. The response body is written as is
  (``mp3_44100_128`` -> ``.mp3``; ``pcm_*`` is raw s16le -> ``.pcm``). A
  429 or 5xx answer (or a network error) is retried with exponential backoff
  (``Retry-After`` honoured, capped); any other non-2xx answer is logged with
  the API's message and the bridge goes on with the next caption.
- ``espeak``: offline, ``.wav``. The pure :func:`plan_speech` maps the tags
  onto prosody: ``[whispers]`` -> the ``+whisper`` voice variant,
  ``[excited]`` -> faster and higher, ``[sad]`` -> slower and lower,
  ``[calm]`` -> slower, ``[angry]``/``[shouts]`` -> louder (emotion and
  delivery tags hold until the sentence ends or a tag of the same kind
  replaces them); ``[pause]`` and its kin -> a break, any non-verbal tag
  (``[laughs]``, ``[sighs]``, ``[clears throat]``, ...) -> a short break;
  other tags are dropped (tables: :data:`EMOTION_PROSODY`,
  :data:`DELIVERY_PROSODY`, :data:`PAUSE_MS`, :data:`NONVERBAL_PAUSE_MS`).
  :func:`to_ssml` writes SSML for ``espeak-ng -m`` (``<prosody>``,
  ``<break>``, ``<voice name="en+whisper">``), one espeak-ng run per caption;
  pauses at the very start or end, which espeak-ng trims, are added as
  silence around its WAV.

Queue and overflow policy. Between the WebSocket reader and the
synthesiser sits a bounded queue (``--queue``). Finals are never dropped
here: when the queue is full the reader waits, stops reading the socket, and
the server's per-subscriber queue fills instead. If the bridge falls
``server.subscriber_queue`` messages behind, the server disconnects it
(close 1013). The bridge then reconnects with ``since=STREAM:SEQ`` (the last
seq it read of each stream) and the server replays what it retained, so
nothing is lost unless the bridge fell more than ``server.history`` captions
behind; then the server's ``gap`` message is logged as a warning (the missing
finals cannot be recovered). Captions at or below a seq already read are
ignored, so a replay never synthesises twice.

A server with access tokens gets ``--token`` (default ``$EVOXTRAL_TOKEN``)
as ``Authorization: Bearer``; a refused token stops the bridge with one line.
Logs go to stderr, tokens redacted; ``--log-format json`` writes the
engine's JSON lines (one object per line, the refusal included) for a log
shipper.

Run ``python clients/tts_bridge.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import http.client
import json
import logging
import os
import re
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
import wave
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit
from xml.sax.saxutils import escape, quoteattr

from _auth import add_token_option, auth_headers, install_token_redaction, refusal
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from evoxtral_stream.logs import configure_logging, install_json_hooks
from evoxtral_stream.server.auth import redact_tokens
from evoxtral_stream.server.protocol import parse_since as parse_since_values
from evoxtral_stream.text.tags import Carry, TagKind, Token, render, tokenize

__all__ = [
    "DELIVERY_PROSODY",
    "EMOTION_PROSODY",
    "NONVERBAL_PAUSE_MS",
    "PAUSE_MS",
    "BridgeConfig",
    "BridgeError",
    "BridgeStats",
    "ElevenLabsOptions",
    "ElevenLabsSynth",
    "EspeakOptions",
    "EspeakSynth",
    "Final",
    "Mode",
    "Pause",
    "Prosody",
    "Speak",
    "SpeechItem",
    "SynthesisError",
    "Synthesizer",
    "TtsBridge",
    "VoiceSettings",
    "build_parser",
    "caption_url",
    "edge_pauses",
    "extension_for",
    "main",
    "output_name",
    "parse_since",
    "plan_speech",
    "to_ssml",
    "whisper_voice",
]

log = logging.getLogger("evoxtral_stream.clients.tts_bridge")

DEFAULT_URL = "ws://127.0.0.1:8765/v1/captions"
DEFAULT_BASE_URL = "https://api.elevenlabs.io"
ELEVENLABS_MODEL = "eleven_v3"
PROTOCOL_VERSION = 1
CLOSE_POLICY = 1008


class Mode(enum.Enum):
    """Which synthesiser the bridge drives (the ``--mode`` value)."""

    ELEVENLABS = "elevenlabs"
    ESPEAK = "espeak"


class BridgeError(Exception):
    """A problem the bridge cannot go on from (one line, for people)."""


class SynthesisError(Exception):
    """One caption could not be synthesised; the bridge goes on with the next."""


# --- tags -> prosody (pure) ---------------------------------------------------


@dataclass(frozen=True)
class Prosody:
    """How a span is spoken: ``rate`` in percent of the voice's rate,
    ``pitch`` and ``volume`` as percent changes, and the whisper variant."""

    rate: int = 100
    pitch: int = 0
    volume: int = 0
    whisper: bool = False

    @property
    def neutral(self) -> bool:
        return self == Prosody()

    def combine(self, other: Prosody) -> Prosody:
        """Both at once: rates multiply, pitch and volume changes add."""
        return Prosody(rate=round(self.rate * other.rate / 100),
                       pitch=self.pitch + other.pitch,
                       volume=self.volume + other.volume,
                       whisper=self.whisper or other.whisper)


@dataclass(frozen=True)
class Speak:
    """Words (tags removed, punctuation kept) spoken with one prosody."""

    text: str
    prosody: Prosody = Prosody()


@dataclass(frozen=True)
class Pause:
    """Silence of ``ms`` milliseconds, standing for tag ``tag``."""

    ms: int
    tag: str


SpeechItem = Speak | Pause

#: Emotion tags that change prosody; other emotions are ignored.
EMOTION_PROSODY: Mapping[str, Prosody] = types.MappingProxyType({
    "excited": Prosody(rate=125, pitch=25),
    "sad": Prosody(rate=80, pitch=-20),
    "angry": Prosody(volume=60),
    "calm": Prosody(rate=85),
})
#: Delivery tags that change prosody; other deliveries are ignored.
DELIVERY_PROSODY: Mapping[str, Prosody] = types.MappingProxyType({
    "whispers": Prosody(whisper=True),
    "shouts": Prosody(volume=80),
})
#: Pause tags and their silence in ms.
PAUSE_MS: Mapping[str, int] = types.MappingProxyType({
    "pause": 500,
    "short pause": 250,
    "long pause": 1000,
    "continues after a beat": 400,
    "hesitates": 300,
})
#: The short pause that stands for any non-verbal sound (laughs, sighs, ...).
NONVERBAL_PAUSE_MS = 200


def _style(carry: Carry) -> Prosody:
    style = Prosody()
    if carry.emotion is not None:
        style = style.combine(EMOTION_PROSODY.get(carry.emotion, Prosody()))
    if carry.delivery is not None:
        style = style.combine(DELIVERY_PROSODY.get(carry.delivery, Prosody()))
    return style


_STRAY_MARKS = frozenset("[]()*")


def plan_speech(tagged: str) -> tuple[SpeechItem, ...]:
    """What espeak-ng should say for ``tagged`` text: spans and pauses. Pure.

    Emotion and delivery tags set the prosody of the words after them until
    a tag of the same kind replaces them or the sentence ends (the
    :class:`~evoxtral_stream.text.tags.Carry` rule); both apply together.
    Pause tags become :data:`PAUSE_MS` silences, non-verbal tags a
    :data:`NONVERBAL_PAUSE_MS` one; unknown and unmapped tags are dropped.
    Consecutive words of one prosody form one :class:`Speak`; a span of
    punctuation alone is dropped. Variants (``(laughs)``, ``[WHISPERING]``)
    count as their canonical tag.
    """
    items: list[SpeechItem] = []
    run: list[Token] = []
    run_style = Prosody()

    def flush() -> None:
        if any(t.is_word for t in run):
            items.append(Speak(render(run), run_style))
        run.clear()

    carry = Carry()
    for tok in tokenize(tagged):
        if tok.is_tag:
            assert tok.tag is not None
            if tok.tag_kind is TagKind.PAUSE:
                flush()
                items.append(Pause(PAUSE_MS.get(tok.tag, PAUSE_MS["pause"]), tok.tag))
            elif tok.tag_kind is TagKind.NONVERBAL:
                flush()
                items.append(Pause(NONVERBAL_PAUSE_MS, tok.tag))
            carry = carry.advance(tok)
            continue
        if tok.text in _STRAY_MARKS:
            # A bracket left over from a malformed tag is not spoken, and
            # re-read later it could open a tag that swallows a word.
            continue
        style = _style(carry)
        if style != run_style:
            flush()
            run_style = style
        run.append(tok)
        carry = carry.advance(tok)
    flush()
    return tuple(items)


def whisper_voice(voice: str) -> str:
    """The whisper variant of an espeak-ng voice (``en-us+f3`` -> ``en-us+whisper``)."""
    return voice.split("+", 1)[0] + "+whisper"


def _prosody_attrs(p: Prosody) -> str:
    attrs: list[str] = []
    if p.rate != 100:
        attrs.append(f'rate="{p.rate}%"')
    if p.pitch:
        attrs.append(f'pitch="{p.pitch:+d}%"')
    if p.volume:
        attrs.append(f'volume="{p.volume:+d}%"')
    return " ".join(attrs)


def to_ssml(items: Sequence[SpeechItem], voice: str = "en") -> str:
    """SSML for ``espeak-ng -m``: ``<prosody rate= pitch= volume=>`` around
    styled spans, ``<voice name="{voice}+whisper">`` around whispered ones,
    and one ``<break time="Nms"/>`` per run of pauses (summed). Text is
    XML-escaped. Pure."""
    parts: list[str] = []
    pending_ms = 0
    for item in items:
        if isinstance(item, Pause):
            pending_ms += item.ms
            continue
        if pending_ms:
            parts.append(f'<break time="{pending_ms}ms"/>')
            pending_ms = 0
        body = escape(item.text)
        attrs = _prosody_attrs(item.prosody)
        if attrs:
            body = f"<prosody {attrs}>{body}</prosody>"
        if item.prosody.whisper:
            body = f"<voice name={quoteattr(whisper_voice(voice))}>{body}</voice>"
        parts.append(body)
    if pending_ms:
        parts.append(f'<break time="{pending_ms}ms"/>')
    return "<speak>" + " ".join(parts) + "</speak>"


def edge_pauses(items: Sequence[SpeechItem]) -> tuple[int, tuple[SpeechItem, ...], int]:
    """``(lead_ms, middle, trail_ms)``: the pauses before the first and after
    the last :class:`Speak`, summed, and the items between. Without any
    :class:`Speak`, every pause counts as lead. Pure."""
    speaks = [i for i, item in enumerate(items) if isinstance(item, Speak)]
    if not speaks:
        return sum(item.ms for item in items if isinstance(item, Pause)), (), 0
    first, last = speaks[0], speaks[-1]
    lead = sum(item.ms for item in items[:first] if isinstance(item, Pause))
    trail = sum(item.ms for item in items[last + 1:] if isinstance(item, Pause))
    return lead, tuple(items[first:last + 1]), trail


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
        return cls(stream, segment, seq, text)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def output_name(stream: str, segment: int, ext: str, session: int = 1) -> str:
    """``{stream}-{segment:05d}.{ext}``, the stream id made safe as a file name;
    ``{stream}+{session}-...`` from a stream id's second session on (``+`` never
    comes from an id, so no id can make the same name)."""
    safe = _UNSAFE.sub("_", stream).lstrip(".") or "_"
    tag = f"+{session}" if session > 1 else ""
    return f"{safe}{tag}-{segment:05d}.{ext}"


def extension_for(output_format: str) -> str:
    """The file extension of an ElevenLabs ``output_format`` (its codec:
    ``mp3_44100_128`` -> ``mp3``, ``pcm_16000`` -> ``pcm``)."""
    codec = output_format.split("_", 1)[0].lower()
    if not codec.isalnum():
        raise ValueError(f"unexpected output format {output_format!r} (e.g. mp3_44100_128)")
    return codec


def parse_since(value: str, streams: Sequence[str]) -> dict[str, int]:
    """``--since``: ``SEQ`` (for every ``--stream``) or ``STREAM:SEQ[,STREAM:SEQ...]``.

    Raises ValueError with a message for people (the server's own parser).
    """
    return parse_since_values([value or ""], streams)


def caption_url(url: str, streams: Sequence[str], since: Mapping[str, int]) -> str:
    """``url`` (path ``/v1/captions`` when it has none) with ``stream=`` and
    ``since=`` set from the arguments; other query parameters are kept."""
    parts = urlsplit(url)
    path = parts.path if parts.path not in ("", "/") else "/v1/captions"
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("stream", "since")]
    if streams:
        query.append(("stream", ",".join(streams)))
    if since:
        query.append(("since", ",".join(f"{s}:{n}" for s, n in sorted(since.items()))))
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode(query, safe=",:"), ""))


# --- synthesisers ---------------------------------------------------------------


class Synthesizer(Protocol):
    """Turns one final's tagged text into an audio file."""

    @property
    def ext(self) -> str:
        """Extension of the files written (no dot)."""
        ...

    def speakable(self, text: str) -> bool:
        """False when there is nothing to synthesise (the final is skipped)."""
        ...

    async def synthesize(self, text: str, dest: Path) -> None:
        """Write the audio for ``text`` to ``dest`` (whole file or nothing);
        raise :class:`SynthesisError` for this caption's failure."""
        ...


def _write_atomic(dest: Path, data: bytes) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)


@dataclass(frozen=True)
class VoiceSettings:
    """ElevenLabs ``voice_settings``; unset fields are left out of the body."""

    stability: float | None = None
    similarity_boost: float | None = None
    style: float | None = None
    speed: float | None = None
    use_speaker_boost: bool | None = None

    def as_json(self) -> dict[str, float | bool]:
        return {k: v for k, v in (
            ("stability", self.stability), ("similarity_boost", self.similarity_boost),
            ("style", self.style), ("speed", self.speed),
            ("use_speaker_boost", self.use_speaker_boost),
        ) if v is not None}


@dataclass(frozen=True)
class ElevenLabsOptions:
    """Where and how to call ElevenLabs. ``max_retries`` bounds the retries
    of 429/5xx/network failures; the n-th waits ``backoff_s * 2**n`` seconds
    (or ``Retry-After``), at most ``max_backoff_s``."""

    voice_id: str
    api_key: str
    output_format: str = "mp3_44100_128"
    base_url: str = DEFAULT_BASE_URL
    model_id: str = ELEVENLABS_MODEL
    voice_settings: VoiceSettings = VoiceSettings()
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    retry_after: float | None


def _api_message(body: bytes) -> str:
    """The message of an ElevenLabs error body (``{"detail": {"message": ...}}``,
    ``{"detail": "..."}``, a validation list), else the body's start."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace").strip() or "(empty body)"
    detail = data.get("detail", data) if isinstance(data, dict) else data
    if isinstance(detail, dict):
        status, message = detail.get("status"), detail.get("message") or detail.get("msg")
        if message is not None:
            return f"{status}: {message}" if status else str(message)
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        return "; ".join(str(d.get("msg", d)) for d in detail)
    return str(detail)[:200]


class ElevenLabsSynth:
    """ElevenLabs v3 text to speech over HTTPS (urllib, in a thread)."""

    def __init__(self, opts: ElevenLabsOptions) -> None:
        """Raises ValueError for a base URL that is not http(s) or an odd format."""
        if urlsplit(opts.base_url).scheme not in ("http", "https"):
            raise ValueError(f"--base-url must start with https:// (got {opts.base_url!r})")
        self.opts = opts
        self._ext = extension_for(opts.output_format)

    @property
    def ext(self) -> str:
        return self._ext

    def speakable(self, text: str) -> bool:
        return bool(text.strip())

    def request_body(self, text: str) -> dict[str, object]:
        """The JSON body: the tagged text unchanged, ``model_id``, and
        ``voice_settings`` when any is set."""
        body: dict[str, object] = {"text": text, "model_id": self.opts.model_id}
        settings = self.opts.voice_settings.as_json()
        if settings:
            body["voice_settings"] = settings
        return body

    def request(self, text: str) -> urllib.request.Request:
        o = self.opts
        url = (f"{o.base_url.rstrip('/')}/v1/text-to-speech/{quote(o.voice_id, safe='')}"
               f"?{urlencode({'output_format': o.output_format})}")
        return urllib.request.Request(
            url, method="POST", data=json.dumps(self.request_body(text)).encode(),
            headers={"xi-api-key": o.api_key, "Content-Type": "application/json",
                     "Accept": "audio/*, application/json"})

    def _post(self, req: urllib.request.Request) -> _Answer:
        try:
            with urllib.request.urlopen(req, timeout=self.opts.timeout_s) as r:
                return _Answer(int(r.status), r.read(), None)
        except urllib.error.HTTPError as e:
            with e:
                retry = e.headers.get("Retry-After") if e.headers else None
                try:
                    after = float(retry) if retry is not None else None
                except ValueError:
                    after = None
                return _Answer(int(e.code), e.read(), after)

    async def synthesize(self, text: str, dest: Path) -> None:
        o = self.opts
        for attempt in range(o.max_retries + 1):
            last = attempt == o.max_retries
            try:
                answer = await asyncio.to_thread(self._post, self.request(text))
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                if last:
                    raise SynthesisError(f"ElevenLabs unreachable at {o.base_url}: {reason}") from e
                delay = min(o.backoff_s * 2 ** attempt, o.max_backoff_s)
                log.warning("ElevenLabs unreachable (%s); retry %d/%d in %.1f s",
                            reason, attempt + 1, o.max_retries, delay)
                await asyncio.sleep(delay)
                continue
            if 200 <= answer.status < 300:
                await asyncio.to_thread(_write_atomic, dest, answer.body)
                return
            message = _api_message(answer.body)
            retryable = answer.status == 429 or answer.status >= 500
            if not retryable or last:
                hint = " (check --api-key / $ELEVENLABS_API_KEY)" if answer.status == 401 else ""
                raise SynthesisError(f"ElevenLabs answered HTTP {answer.status}: {message}{hint}")
            delay = min(answer.retry_after if answer.retry_after is not None
                        else o.backoff_s * 2 ** attempt, o.max_backoff_s)
            log.warning("ElevenLabs answered HTTP %d (%s); retry %d/%d in %.1f s",
                        answer.status, message, attempt + 1, o.max_retries, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class EspeakOptions:
    """The espeak-ng voice (``-v``), its rate in words per minute (``-s``),
    the binary, and a time limit per caption."""

    voice: str = "en"
    wpm: int = 175
    binary: str = "espeak-ng"
    timeout_s: float = 60.0


_SILENCE_RATE = 22050  # espeak-ng's own output rate, for captions with no words


def _pad_wav(src: Path | None, dest: Path, lead_ms: int, trail_ms: int) -> None:
    """Copy WAV ``src`` to ``dest`` with silence around it (``src`` None:
    silence only, mono 16-bit at espeak-ng's rate)."""
    if src is None:
        channels, width, rate, frames = 1, 2, _SILENCE_RATE, b""
    else:
        with wave.open(str(src), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            frames = w.readframes(w.getnframes())

    def silence(ms: int) -> bytes:
        return b"\x00" * (rate * ms // 1000) * channels * width
    tmp = dest.with_name(f".{dest.name}.tmp")
    with wave.open(str(tmp), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(silence(lead_ms) + frames + silence(trail_ms))
    tmp.replace(dest)


class EspeakSynth:
    """Offline synthesis with espeak-ng: SSML from :func:`plan_speech`."""

    ext = "wav"

    def __init__(self, opts: EspeakOptions = EspeakOptions()) -> None:
        self.opts = opts

    def speakable(self, text: str) -> bool:
        return bool(plan_speech(text))

    async def synthesize(self, text: str, dest: Path) -> None:
        lead, middle, trail = edge_pauses(plan_speech(text))
        if not middle:
            await asyncio.to_thread(_pad_wav, None, dest, lead, trail)
            return
        ssml = to_ssml(middle, self.opts.voice)
        with tempfile.TemporaryDirectory(prefix="tts-bridge-") as tmpdir:
            raw = Path(tmpdir) / "espeak.wav"
            cmd = [self.opts.binary, "-m", "-v", self.opts.voice, "-s", str(self.opts.wpm),
                   "-w", str(raw), "--stdin"]
            try:
                proc = await asyncio.create_subprocess_exec(
                    *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE)
            except OSError as e:
                raise SynthesisError(f"cannot run {self.opts.binary}: {e} "
                                     "(install espeak-ng, or pass --espeak PATH)") from e
            try:
                _, err = await asyncio.wait_for(proc.communicate(ssml.encode()),
                                                self.opts.timeout_s)
            except TimeoutError:
                raise SynthesisError(f"espeak-ng took over {self.opts.timeout_s} s") from None
            finally:
                if proc.returncode is None:  # timed out or cancelled: don't leave it running
                    proc.kill()
                    await asyncio.shield(proc.wait())
            if proc.returncode != 0 or not raw.exists():
                raise SynthesisError(f"espeak-ng failed ({proc.returncode}): "
                                     f"{err.decode(errors='replace').strip()[:200]}")
            try:
                await asyncio.to_thread(_pad_wav, raw, dest, lead, trail)
            except (wave.Error, EOFError) as e:
                raise SynthesisError(f"espeak-ng wrote an unreadable WAV: {e}") from e


# --- the bridge -------------------------------------------------------------------


@dataclass(frozen=True)
class BridgeConfig:
    """What to subscribe to and where to write.

    ``since``: resume points (stream, seq) for the first connection.
    ``queue_size``: finals waiting for the synthesiser (the reader waits
    when it is full, see the module doc). ``max_captions``: stop after that
    many finals were handled (written, failed or skipped). ``exit_on_end``:
    stop after ``stream.ended`` of every ``streams`` entry (without
    ``streams``: of every stream seen) and the queue is drained.
    ``reconnect``: reconnect after a lost connection, with ``since=``.
    ``token``: the access token, sent as ``Authorization: Bearer`` (None:
    none); left out of the repr so that it stays out of logs.
    """

    out: Path
    url: str = DEFAULT_URL
    streams: tuple[str, ...] = ()
    since: tuple[tuple[str, int], ...] = ()
    queue_size: int = 32
    max_captions: int | None = None
    exit_on_end: bool = False
    reconnect: bool = True
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 10.0
    token: str | None = field(default=None, repr=False)


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
        self.written: list[Path] = []
        self._queue: asyncio.Queue[Final | None] = asyncio.Queue(cfg.queue_size)
        self._last_seq: dict[str, int] = dict(cfg.since)
        # Per stream: the segment of its last final and its session (module doc).
        self._last_segment: dict[str, int] = {}
        self._session: dict[str, int] = {}
        self._seen: set[str] = set(cfg.streams)
        self._ended: set[str] = set()
        self._handled = 0
        self._failed = 0
        self._skipped = 0
        self._gaps = 0
        self._reconnects = 0

    @property
    def stats(self) -> BridgeStats:
        return BridgeStats(len(self.written), self._failed, self._skipped, self._gaps,
                           self._reconnects)

    @property
    def resume_points(self) -> dict[str, int]:
        """The last seq read of each stream (what a reconnect sends as ``since``)."""
        return dict(self._last_seq)

    async def run(self) -> BridgeStats:
        """Run until ``max_captions``, ``exit_on_end``, or (without
        ``reconnect``) the connection's end; raise :class:`BridgeError` when
        the server cannot be reached at first, refuses the subscription, or
        ``out`` cannot be made a folder. Finals already read are synthesised
        before a refusal is raised."""
        try:
            self.cfg.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BridgeError(f"cannot use {str(self.cfg.out)!r} as the output folder: "
                              f"{e.strerror or e}") from None
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
            url = caption_url(self.cfg.url, self.cfg.streams, self._last_seq)
            conn: ClientConnection | None = None
            try:
                async with connect(url, open_timeout=10, close_timeout=2,
                                   additional_headers=auth_headers(self.cfg.token)) as ws:
                    conn = ws
                    await self._expect_hello(ws)
                    connected = True
                    delay = self.cfg.reconnect_min_s
                    log.info("subscribed to %s", url)
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
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if isinstance(hello, dict) and hello.get("type") == "error":
            raise BridgeError(f"the server refused the subscription: {hello.get('code')}: "
                              f"{hello.get('message')}")
        if not isinstance(hello, dict) or hello.get("type") != "hello":
            raise BridgeError(f"expected a hello from the server, got {str(hello)[:80]}")
        if hello.get("v") != PROTOCOL_VERSION:
            raise BridgeError(f"server speaks protocol v{hello.get('v')}, "
                              f"this bridge v{PROTOCOL_VERSION}")
        if not self.cfg.streams:
            self._seen.update(s for s in hello.get("streams", ()) if isinstance(s, str))

    async def _on_message(self, raw: str | bytes) -> bool:
        """Handle one server message; True when the bridge should stop reading."""
        try:
            msg = json.loads(raw)
        except ValueError:
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
            self._last_seq[stream] = seq
            self._seen.add(stream)
            final = Final.from_message(msg)
            if final is not None:
                last = self._last_segment.get(stream)
                if last is not None and final.segment <= last:
                    self._session[stream] = self._session.get(stream, 1) + 1
                self._last_segment[stream] = final.segment
                final = replace(final, session=self._session.get(stream, 1))
                await self._queue.put(final)  # backpressure, never a drop
        elif kind == "stream.started" and isinstance(msg.get("stream"), str):
            self._seen.add(msg["stream"])
            self._ended.discard(msg["stream"])  # an id used again is live again
        elif kind == "stream.ended" and isinstance(msg.get("stream"), str):
            self._seen.add(msg["stream"])
            self._ended.add(msg["stream"])
            log.info("stream %s ended", msg["stream"])
            return self.cfg.exit_on_end and self._seen <= self._ended
        elif kind == "gap":
            self._gaps += 1
            log.warning("server no longer has captions %s..%s of stream %s: "
                        "those finals are lost", msg.get("from"), msg.get("to") or "?",
                        msg.get("stream"))
            if msg.get("to") is None and isinstance(msg.get("stream"), str):
                # The server cannot place our seq (a restart without its
                # journal): what follows may be numbered anew. Resume from 0,
                # not without since=, in case the link drops before it comes.
                self._last_seq[msg["stream"]] = 0
        elif kind == "error":
            log.warning("server error %s: %s", msg.get("code"), msg.get("message"))
        return False

    # writer side

    async def _synthesize_all(self) -> None:
        while True:
            final = await self._queue.get()
            if final is None:
                return
            await self._synthesize(final)
            self._handled += 1
            if self.cfg.max_captions is not None and self._handled >= self.cfg.max_captions:
                return

    async def _synthesize(self, final: Final) -> None:
        dest = self.cfg.out / output_name(final.stream, final.segment, self.synth.ext,
                                          final.session)
        if not self.synth.speakable(final.text):
            self._skipped += 1
            log.info("%s segment %d: nothing to say, skipped", final.stream, final.segment)
            return
        t0 = time.monotonic()
        try:
            await self.synth.synthesize(final.text, dest)
        except SynthesisError as e:
            self._failed += 1
            log.error("%s segment %d (seq %d): %s", final.stream, final.segment, final.seq, e)
            return
        except OSError as e:
            raise BridgeError(f"cannot write {dest}: {e}") from e
        self.written.append(dest)
        log.info("wrote %s (%.2f s): %s", dest, time.monotonic() - t0, final.text)


# --- command line -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tts_bridge.py",
        description="Re-synthesise final captions from an evoxtral-stream server as speech.")
    p.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.ESPEAK.value,
                   help="elevenlabs (v3, tags performed) or espeak (offline; default)")
    p.add_argument("--out", type=Path, required=True, help="folder for the audio files")
    p.add_argument("--url", default=DEFAULT_URL, help=f"caption server (default {DEFAULT_URL})")
    p.add_argument("--stream", action="append", default=[],
                   help="stream id to follow (repeat or comma-separate; default: all)")
    p.add_argument("--since", help="resume after SEQ (with --stream) or STREAM:SEQ[,...]")
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
    es.add_argument("--wpm", type=int, default=175, help="words per minute (default 175)")
    es.add_argument("--espeak", default="espeak-ng", help="espeak-ng binary")
    return p


def _synth_from_args(args: argparse.Namespace) -> Synthesizer:
    if Mode(args.mode) is Mode.ESPEAK:
        return EspeakSynth(EspeakOptions(voice=args.voice or "en", wpm=args.wpm,
                                         binary=args.espeak))
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
            timeout_s=args.timeout, max_retries=max(0, args.retries)))
    except ValueError as e:
        raise BridgeError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 1 error, 130 Ctrl-C)."""
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
    streams = tuple(s for v in args.stream for s in v.split(",") if s)
    try:
        since = parse_since(args.since, streams) if args.since else {}
        synth = _synth_from_args(args)
        cfg = BridgeConfig(out=args.out, url=args.url, streams=streams,
                           since=tuple(since.items()), queue_size=max(1, args.queue),
                           max_captions=args.max_captions, exit_on_end=args.exit_on_end,
                           reconnect=not args.no_reconnect, token=args.token)
        stats = asyncio.run(TtsBridge(cfg, synth).run())
    except KeyboardInterrupt:
        return 130
    except (BridgeError, ValueError) as e:
        if args.debug:
            raise
        if args.log_format == "json":
            log.error("%s", e)
        else:
            print(f"tts_bridge: {e}", file=sys.stderr)
        return 1
    log.info("done: %d written, %d failed, %d skipped, %d gaps, %d reconnects",
             stats.written, stats.failed, stats.skipped, stats.gaps, stats.reconnects)
    return 0 if stats.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
