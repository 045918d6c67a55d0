"""The synthesisers of ``tts_bridge.py``: one final's tagged text -> one audio file.

- :class:`ElevenLabsSynth`: ElevenLabs v3 over HTTP, tags left inline (the
  model performs them), bracketed text holding a digit without its brackets
  (:func:`tts_prosody.elevenlabs_text`); 429, 5xx and network errors retried
  with backoff.
- :class:`EspeakSynth`: offline espeak-ng, tags mapped onto prosody by
  :mod:`tts_prosody`.

A failure of one caption raises :class:`SynthesisError`; the bridge logs it
and goes on with the next.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import logging
import math
import subprocess
import tempfile
import urllib.error
import urllib.request
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlencode, urlsplit

from tts_prosody import edge_pauses, elevenlabs_text, plan_speech, to_ssml

from evoxtral_stream.console import printable
from evoxtral_stream.detached import off_the_loop

__all__ = [
    "DEFAULT_BASE_URL",
    "ELEVENLABS_MODEL",
    "ESPEAK_WPM_RANGE",
    "ElevenLabsOptions",
    "ElevenLabsSynth",
    "EspeakOptions",
    "EspeakSynth",
    "SynthesisError",
    "Synthesizer",
    "VoiceSettings",
    "check_espeak",
    "extension_for",
]

# The bridge's logger: its lines read as the bridge's, as before the split.
log = logging.getLogger("evoxtral_stream.clients.tts_bridge")

DEFAULT_BASE_URL = "https://api.elevenlabs.io"
ELEVENLABS_MODEL = "eleven_v3"


class SynthesisError(Exception):
    """One caption could not be synthesised; the bridge goes on with the next."""


def extension_for(output_format: str) -> str:
    """The file extension of an ElevenLabs ``output_format`` (its codec:
    ``mp3_44100_128`` -> ``mp3``, ``pcm_16000`` -> ``pcm``)."""
    codec = output_format.split("_", 1)[0].lower()
    if not codec.isalnum():
        raise ValueError(f"unexpected output format {output_format!r} (e.g. mp3_44100_128)")
    return codec


class Synthesizer(Protocol):
    """Turns one final's tagged text into an audio file."""

    @property
    def ext(self) -> str:
        """Extension of the files written (no dot)."""
        ...

    def speakable(self, text: str) -> bool:
        """False when there is nothing to synthesise (the final is skipped)."""
        ...

    def sent_text(self, text: str) -> str:
        """The text the synthesiser is given for ``text``, as the bridge's
        log shows it beside the caption where it differs (markup, which is
        not the words, left out: ``text`` itself)."""
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
    (or ``Retry-After``, when it is a finite number of seconds >= 0), at most
    ``max_backoff_s``."""

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
    ``{"detail": "..."}``, a validation list), else the body's start (a
    proxy's HTML page), on one line: control characters and line breaks as
    single spaces."""
    return " ".join(printable(_api_detail(body)).split()) or "(empty body)"


def _api_detail(body: bytes) -> str:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # the latter: nested past json's reach
        return body[:200].decode("utf-8", "replace")
    detail = data.get("detail", data) if isinstance(data, dict) else data
    if isinstance(detail, dict):
        status, message = detail.get("status"), detail.get("message") or detail.get("msg")
        if message is not None:
            return f"{status}: {message}" if status else str(message)
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        return "; ".join(str(d.get("msg", d)) for d in detail)
    return str(detail)[:200]


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header's seconds, or None (the backoff applies) for
    anything but a finite number >= 0: an HTTP date, ``nan`` (which would
    retry at once), ``inf``, a negative number."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class ElevenLabsSynth:
    """ElevenLabs v3 text to speech over HTTPS (urllib, in a daemon thread per request)."""

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

    def sent_text(self, text: str) -> str:
        """The request's text (:func:`~tts_prosody.elevenlabs_text`)."""
        return elevenlabs_text(text)

    def request_body(self, text: str) -> dict[str, object]:
        """The JSON body: the tagged text (:func:`~tts_prosody.elevenlabs_text`:
        tags inline, ``[2]`` as ``2``), ``model_id``, and ``voice_settings``
        when any is set."""
        body: dict[str, object] = {"text": elevenlabs_text(text),
                                   "model_id": self.opts.model_id}
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
                return _Answer(int(e.code), e.read(), _retry_after(retry))

    async def synthesize(self, text: str, dest: Path) -> None:
        o = self.opts
        for attempt in range(o.max_retries + 1):
            last = attempt == o.max_retries
            try:
                # Not in asyncio's default executor, which the bridge's exit
                # waits for: a request can hang for good (urllib's timeout
                # does not bound the API's name lookup). RuntimeError: no
                # thread to be had for it, a failed attempt too.
                answer = await off_the_loop(functools.partial(self._post, self.request(text)),
                                            "tts-request")
            except (urllib.error.URLError, OSError, http.client.HTTPException,
                    RuntimeError) as e:
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


#: The rates espeak-ng documents, in words per minute (speak_lib.h,
#: espeakRATE: "Values 80 to 450"): it takes a rate below as 80 (0 or less
#: as 175), and far above writes empty WAVs.
ESPEAK_WPM_RANGE = (80, 450)


@dataclass(frozen=True)
class EspeakOptions:
    """The espeak-ng voice (``-v``), its rate in words per minute (``-s``),
    the binary, and a time limit per caption."""

    voice: str = "en"
    wpm: int = 175
    binary: str = "espeak-ng"
    timeout_s: float = 60.0


def check_espeak(opts: EspeakOptions) -> None:
    """Raise ValueError (one line) unless ``opts.binary`` runs and knows
    ``opts.voice``: a bad ``--espeak`` or ``--voice`` is found at the start,
    not at the first final (each of which would fail)."""
    cmd = [opts.binary, "-q", "-v", opts.voice, "x"]  # -q: no audio anywhere
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=opts.timeout_s, check=False)
    except OSError as e:
        raise ValueError(f"cannot run {opts.binary}: {e.strerror or e} "
                         "(install espeak-ng, or pass --espeak PATH)") from None
    except subprocess.TimeoutExpired:
        raise ValueError(f"{opts.binary} did not answer within {opts.timeout_s} s") from None
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip().splitlines()
        raise ValueError(f"{opts.binary} refused --voice {opts.voice!r}: "
                         f"{why[-1] if why else f'exit status {proc.returncode}'}")


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
    # The file opened first: a wave.open(path) that cannot open it leaves a
    # half-built writer whose __del__ prints "Exception ignored" to stderr.
    with open(tmp, "wb") as f, wave.open(f, "wb") as out:
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

    def sent_text(self, text: str) -> str:
        """``text``: its SSML is markup around the same words."""
        return text

    async def synthesize(self, text: str, dest: Path) -> None:
        """Also speaks a caption holding lone surrogates, which
        :func:`plan_speech` leaves out, with a warning."""
        if any("\ud800" <= c <= "\udfff" for c in text):
            log.warning("a caption holds a lone surrogate (a broken decoder's stand-in "
                        "for a bad byte, not text): spoken without it")
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


