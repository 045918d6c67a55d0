"""The sans-I/O core of ``/v1/realtime``: one transcription session.

Turns. The engine's own segmenter decides where speech starts and ends. The
engine does not publish segment boundaries, so the core runs a second
:class:`~evoxtral_stream.audio.vad.Segmenter` with the same configuration
over exactly the audio it pushes to the stream. The segmenter is
deterministic and independent of chunking, so both see the same segments
(segment ``k`` of the mirror is segment ``k`` of the stream's captions); the
adapter checks the count after every push and logs if they ever disagree.

Committing on demand. A segment is ended early (``input_audio_buffer.commit``,
``.clear``, switching turn detection off) by cutting it: the mirror's
segmenter and the engine stream's (:meth:`Stream.cut
<evoxtral_stream.engine.engine.Stream.cut>`) both flush at the same sample,
so the segment ends as at a natural end and the next one cannot reach back
before the cut. A commit says the audio is an utterance: its cut keeps
speech too short yet for a segment (``vad.min_speech_ms``) since the last
segment, under way or already ended, which the segmenter otherwise drops
as a click (``flush(keep_candidate=True)``).
Nothing is added to the stream: its timeline (what ``/v1/captions``
subscribers see) is the client's audio as pushed. Times
reported to the client (``audio_start_ms``, ``audio_end_ms``) are mapped
back to the client's own audio, which differs from the stream's only by
audio held and then cleared in manual mode.

Items. With ``server_vad`` each engine segment is one conversation item:
``speech_started`` when the segment opens (``item_id`` announced there),
``speech_stopped`` and ``committed`` when it ends, ``delta`` events as text
becomes *stable* (partial captions' stable prefix only grows; the unstable
tail is never sent), ``completed`` with the final text. With turn detection
off, audio is held here until ``commit``; then the whole buffer is pushed
and closed as one item, which may span several engine segments (its
transcript joins their finals as ``subtitles --text`` does: with spaces,
but none inside Chinese or Japanese). Speech the segmenters have not
yet confirmed when turn detection goes off is not cut (a cut would discard
it): it stays pending in both, and the next item begins with it.
"""

from __future__ import annotations

import itertools
import logging
from bisect import bisect_right
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ...audio.resample import StreamResampler
from ...audio.vad import Segmenter
from ...config import VadConfig
from ...events import (
    SAMPLE_RATE,
    CaptionEvent,
    EngineEvent,
    Int16Array,
    SegmentEvent,
    SpeechEnded,
    SpeechStarted,
    StreamError,
)
from ...text.chars import shown
from ...text.tags import join_texts
from .protocol import (
    INPUT_RATE,
    MAX_BUFFER_S,
    MIN_COMMIT_MS,
    AudioAppend,
    AudioClear,
    AudioCommit,
    BufferCleared,
    BufferCommitted,
    BufferSpeechStarted,
    BufferSpeechStopped,
    CutSegment,
    Output,
    PushAudio,
    RealtimeError,
    RealtimeProtocolError,
    SessionCreated,
    SessionUpdate,
    SessionUpdated,
    SetLanguage,
    TranscriptionCompleted,
    TranscriptionDelta,
    parse_client_event,
    wire_size,
)

__all__ = [
    "RealtimeTranscription",
]

log = logging.getLogger(__name__)


@dataclass
class _Item:
    """One conversation item: the engine segments whose text it carries."""

    id: str
    segments: list[int] = field(default_factory=list)
    stable: dict[int, str] = field(default_factory=dict)
    finals: dict[int, str] = field(default_factory=dict)
    committed: bool = False
    sent: str = ""
    audio_samples: int = 0

    def view(self) -> str:
        """Final texts of the leading closed segments, then the stable text of
        the first open one: text that will not change. Joined as a
        transcript's finals are (:func:`~evoxtral_stream.text.tags.seam`: no
        space inside Chinese or Japanese); the seam before the open segment
        is decided by its first token, so it holds as the stable text grows."""
        parts: list[str] = []
        for seg in self.segments:
            if seg in self.finals:
                parts.append(self.finals[seg])
            else:
                parts.append(self.stable.get(seg, ""))
                break
        return join_texts(parts)

    @property
    def closed(self) -> bool:
        return self.committed and all(seg in self.finals for seg in self.segments)


_EndReason = Literal["vad", "commit", "clear"]


class RealtimeTranscription:
    """One transcription session: the sans-I/O core of ``/v1/realtime``.

    Calling contract: call :meth:`start` once and send what it returns; pass
    every client message to :meth:`receive` and every engine event *of this
    session's stream* to :meth:`on_engine_event`, and :meth:`end` once when
    the client leaves, before the stream closes. Execute the returned outputs
    in order: :class:`PushAudio` and :class:`CutSegment` go to the engine
    stream (which must get nothing else), :class:`SetLanguage` to the
    stream's language, server events go to the client.

    ``vad`` must be the engine's segmenter configuration; ``model`` is only
    reported. ``language`` is the server's default language and
    ``languages`` the others a client may ask for (``session.update``'s
    transcription language); asking for any other is an ``invalid_value``
    error. ``prefix`` makes the ids of this session unique across sessions.
    """

    def __init__(self, vad: VadConfig, *, model: str, language: str | None = None,
                 languages: Collection[str] = (), prefix: str = "",
                 max_message_bytes: int | None = None) -> None:
        self._vad = vad
        self._model = model
        self._default_language = language
        self._language = language
        self._languages = frozenset(languages)
        self._prefix = prefix
        self._max_message = max_message_bytes
        self._event_ids: Iterator[int] = itertools.count(1)
        self._item_ids: Iterator[int] = itertools.count(1)
        self._server_vad = True
        self._segmenter = Segmenter(vad, SAMPLE_RATE)
        self._resampler = StreamResampler(INPUT_RATE, SAMPLE_RATE)
        self._carry = b""
        # Manual mode: resampled audio waiting for a commit.
        self._pending: list[tuple[int, Int16Array]] = []
        self._pending_len = 0
        # Manual mode: an unconfirmed speech candidate of server VAD, already in
        # the stream (its segmenter still pending), that opens the next item.
        self._candidate_len = 0
        # Positions: audio received from the client, audio pushed to the stream,
        # and runs of client audio in the stream (stream start, client start, length).
        self._client_pos = 0
        self._stream_pos = 0
        self._run_stream: list[int] = []
        self._run_client: list[int] = []
        self._run_len: list[int] = []
        self._dirty = False
        # Segments and items.
        self._next_segment = 0
        self._open_start = 0
        self._open_item: _Item | None = None
        self._collect: _Item | None = None
        self._end_reason: _EndReason = "vad"
        self._items: dict[int, _Item] = {}
        self._previous_item: str | None = None
        self.session_id = f"sess_{prefix.rstrip('_') or 'local'}"

    # --- public ------------------------------------------------------------------

    @property
    def server_vad(self) -> bool:
        return self._server_vad

    @property
    def segments_opened(self) -> int:
        """Segments the mirrored segmenter has opened (the stream's count too)."""
        return self._next_segment

    @property
    def received_samples(self) -> int:
        """Client audio received so far, at 16 kHz (held, pushed or dropped as
        over the buffer: what the client sent)."""
        return self._client_pos

    @property
    def buffered_ms(self) -> int:
        """Audio held for a manual commit (a kept speech candidate included)."""
        return self._held_len * 1000 // SAMPLE_RATE

    @property
    def _held_len(self) -> int:
        return self._pending_len + self._candidate_len

    def start(self) -> list[Output]:
        return [SessionCreated(self._event_id(), self.session_config())]

    def error(self, code: str, message: str, param: str | None = None,
              client_event_id: str | None = None,
              error_type: str = "invalid_request_error") -> RealtimeError:
        return RealtimeError(self._event_id(), code, message, param, client_event_id,
                             error_type)

    def session_config(self, *, beta: bool = False) -> dict[str, Any]:
        """The effective configuration, in GA (or beta) shape."""
        td: dict[str, Any] | None = None
        if self._server_vad:
            td = {"type": "server_vad", "prefix_padding_ms": self._vad.pre_roll_ms,
                  "silence_duration_ms": self._vad.end_silence_ms}
        transcription = {"model": self._model, "language": self._language}
        if beta:
            return {"id": self.session_id, "object": "realtime.transcription_session",
                    "input_audio_format": "pcm16", "input_audio_transcription": transcription,
                    "turn_detection": td, "input_audio_noise_reduction": None,
                    "include": None}
        return {
            "type": "transcription", "id": self.session_id,
            "object": "realtime.transcription_session",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": INPUT_RATE},
                                "transcription": transcription, "noise_reduction": None,
                                "turn_detection": td}},
            "include": None,
        }

    def receive(self, message: str | bytes) -> list[Output]:
        """One client message in; the outputs it causes (errors included)."""
        if self._max_message is not None and wire_size(message) > self._max_message:
            return [self.error("message_too_large",
                               f"message of {wire_size(message)} bytes exceeds the server limit "
                               f"of {self._max_message} (server.max_message_bytes): send "
                               f"audio in smaller appends")]
        try:
            event = parse_client_event(message)
            if isinstance(event, AudioAppend):
                return self._append(event)
            if isinstance(event, AudioCommit):
                return self._commit(event)
            if isinstance(event, AudioClear):
                return self._clear()
            return self._update(event)
        except RealtimeProtocolError as e:
            return [self.error(e.code, str(e), e.param, e.event_id)]

    def end(self) -> list[Output]:
        """The client left: with server_vad, the resampler's held-back tail
        (live audio, ~10-35 ms) goes into the stream, so all the client's
        audio becomes finals and the stream lasts as long as it; with turn
        detection off it is dropped with the held buffer. Call once, last;
        only the :class:`PushAudio` outputs matter (nobody hears the events).
        """
        tail = self._resampler.flush()
        if not self._server_vad:
            return []
        return self._take(tail)

    def on_engine_event(self, ev: EngineEvent) -> list[Output]:
        """An event of this session's engine stream in; the server events out."""
        out: list[Output] = []
        if isinstance(ev, StreamError):
            out.append(self.error(ev.code, ev.message, client_event_id=None,
                                  error_type="server_error"))
            item = None if ev.segment is None else self._items.get(ev.segment)
            if ev.closes_segment and item is not None and ev.segment is not None:
                # No caption of the segment will come: its part of the item
                # is empty, and a client waiting on the item's completed
                # (a manual commit) gets it now, not at a later item's final.
                out += self._commit_if_open(item)
                item.finals.setdefault(ev.segment, "")
                out += self._progress(item)
            return out
        if not isinstance(ev, CaptionEvent):
            return []
        if ev.final:
            # Finals come in segment order: every earlier segment is closed,
            # even one whose final never came (a failed decode).
            for seg in sorted(s for s in self._items if s < ev.segment):
                earlier = self._items.get(seg)
                if earlier is not None and earlier.committed:
                    earlier.finals.setdefault(seg, earlier.stable.get(seg, ""))
                    out += self._progress(earlier)
        item = self._items.get(ev.segment)
        if item is None:
            return out
        if ev.final:
            out += self._commit_if_open(item)
            item.finals[ev.segment] = ev.text
        else:
            item.stable[ev.segment] = ev.stable
        return out + self._progress(item)

    # --- client events -------------------------------------------------------------

    def _update(self, ev: SessionUpdate) -> list[Output]:
        out: list[Output] = []
        if ev.language_given:
            # Checked before anything changes: a refused update changes nothing.
            wanted = ev.language or self._default_language
            if wanted != self._default_language and wanted not in self._languages:
                param = ("session.input_audio_transcription.language" if ev.beta
                         else "session.audio.input.transcription.language")
                known = ", ".join(sorted({*self._languages, self._default_language or ""} - {""}))
                # No server builds one without a default today, but an empty
                # list would read as a cut-off message.
                offer = (f"this server transcribes {known}" if known else
                         'no language can be set on this server (only null or "", its default)')
                return [self.error("invalid_value", f"unsupported language {shown(wanted)}: "
                                   f"{offer}", param, ev.event_id)]
            # Before the turn detection switch below: the turn it ends and
            # the held audio it pushes are not ended yet, so they are in
            # the new language, as every such turn is (docs/protocol.md).
            if wanted != self._language:
                self._language = wanted
                out.append(SetLanguage(None if wanted == self._default_language else wanted))
        want_vad = None if ev.turn_detection is None else ev.turn_detection == "server_vad"
        if want_vad is not None and want_vad != self._server_vad:
            if want_vad:
                # Held audio becomes live audio, as if appended now; a kept
                # candidate goes on where it stood.
                self._server_vad = True
                self._candidate_len = 0
                out += self._push_pending(collect=None)
            else:
                # The resampler's held-back tail is this turn's audio, as at a commit.
                out += self._take(self._resampler.flush())
                candidate = self._segmenter.candidate_start
                if candidate is not None:
                    # Speech not yet confirmed is no turn to commit, and cutting
                    # would discard it: it stays in the buffer (and the stream's
                    # segmenter), so the next manual item starts with it.
                    self._candidate_len = self._stream_pos - candidate
                elif self._dirty:
                    self._end_reason = "commit"
                    out += self._cut()
                self._server_vad = False
        out.append(SessionUpdated(self._event_id(), self.session_config(beta=ev.beta),
                                  beta=ev.beta))
        return out

    def _append(self, ev: AudioAppend) -> list[Output]:
        data = self._carry + ev.data
        whole = len(data) - len(data) % 2
        self._carry = data[whole:]
        if not whole:
            return []
        pcm = np.frombuffer(data[:whole], dtype="<i2").astype(np.int16)
        if (not self._server_vad and self._held_len + len(pcm) * SAMPLE_RATE // INPUT_RATE
                > MAX_BUFFER_S * SAMPLE_RATE):
            # Decided on the append itself, not on the resampler's output
            # (which holds back the last ~30 ms of the audio before it): the
            # audio before is held whole, its tail included even past the
            # cap, and this append is dropped whole, a hole in client time.
            tail, hole = self._resampler.gap(len(pcm))
            out = self._take(tail)
            self._client_pos += hole
            return [*out, self.error("input_audio_buffer_full",
                                     f"the input audio buffer holds at most {MAX_BUFFER_S:g} "
                                     f"s; commit or clear it (this audio was dropped)",
                                     "audio", ev.event_id)]
        return self._take(self._resampler.process(pcm))

    def _take(self, samples: Int16Array) -> list[Output]:
        """Resampled client audio: live in server-VAD mode, held otherwise
        (the cap is checked per append, :meth:`_append`: a commit's or a
        refusal's resampler tail of accepted audio is held past it)."""
        if not len(samples):
            return []
        start = self._client_pos
        self._client_pos += len(samples)
        if self._server_vad:
            return self._push_client(samples, start)
        self._pending.append((start, samples))
        self._pending_len += len(samples)
        return []

    def _commit(self, ev: AudioCommit) -> list[Output]:
        out = self._take(self._resampler.flush())
        if self._server_vad:
            if any(isinstance(o, BufferCommitted) for o in out):
                # The held-back tail completed the pause that ends the turn:
                # it was this commit's speech, committed (no error for it).
                return out
            if not self._segmenter.in_segment and self._segmenter.candidate_start is None:
                return [*out, self.error(
                    "input_audio_buffer_commit_empty",
                    "no speech to commit: with server_vad, turns are committed when "
                    "speech ends", None, ev.event_id)]
            # Speech not yet a turn (under vad.min_speech_ms, under way or
            # ended since the last turn) becomes one: the client says it is
            # an utterance (speech_started, then committed).
            self._end_reason = "commit"
            return out + self._cut(keep_candidate=True)
        if self._held_len < MIN_COMMIT_MS * SAMPLE_RATE // 1000:
            have = self._held_len * 1000 / SAMPLE_RATE
            return [*out, self.error(
                "input_audio_buffer_commit_empty",
                f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, "
                f"the buffer has {have:.2f} ms", None, ev.event_id)]
        item = _Item(self._item_id(), audio_samples=self._held_len)
        self._candidate_len = 0
        out += self._push_pending(collect=item)
        # The client says the buffer is an utterance: a short "Yes" at its
        # end is the answer, not a click (vad.min_speech_ms).
        out += self._cut(keep_candidate=True)
        self._collect = None
        item.committed = True
        out.append(BufferCommitted(self._event_id(), item.id, self._previous_item))
        self._previous_item = item.id
        # No speech in the buffer: the empty transcript comes at once.
        out += self._progress(item)
        return out

    def _clear(self) -> list[Output]:
        self._carry = b""
        tail = self._resampler.flush()
        out: list[Output] = []
        if self._server_vad:
            # Live audio, as everything appended before it: into the stream,
            # or its timeline would fall behind the client's by the tail (up
            # to ~20 ms) at every clear.
            out += self._take(tail)
            if self._dirty:
                self._end_reason = "clear"
                out += self._cut()
        else:
            # Held, uncommitted audio, as the buffer: dropped, client time counted.
            self._client_pos += len(tail)
            self._pending, self._pending_len = [], 0
            if self._dirty:
                # A kept speech candidate (see _update) is dropped too.
                self._candidate_len = 0
                self._end_reason = "clear"
                out += self._cut()
        out.append(BufferCleared(self._event_id()))
        return out

    # --- audio into the stream ---------------------------------------------------------

    def _push_pending(self, collect: _Item | None) -> list[Output]:
        # Set even with nothing pending: a commit's cut may still open a
        # segment (speech kept at the switch off), which is this item's.
        self._collect = collect
        if not self._pending:
            return []
        chunks, self._pending, self._pending_len = self._pending, [], 0
        # One push per contiguous run of client audio (a refused append leaves a hole).
        out: list[Output] = []
        run_start = run_end = chunks[0][0]
        run: list[Int16Array] = []
        for start, samples in chunks:
            if start != run_end:
                out += self._push_client(np.concatenate(run), run_start)
                run_start, run = start, []
            run.append(samples)
            run_end = start + len(samples)
        return out + self._push_client(np.concatenate(run), run_start)

    def _push_client(self, samples: Int16Array, client_start: int) -> list[Output]:
        """Client audio into the stream (and the mirrored segmenter)."""
        s = self._stream_pos
        if (self._run_len and self._run_stream[-1] + self._run_len[-1] == s
                and self._run_client[-1] + self._run_len[-1] == client_start):
            self._run_len[-1] += len(samples)
        else:
            self._run_stream.append(s)
            self._run_client.append(client_start)
            self._run_len.append(len(samples))
        self._stream_pos += len(samples)
        self._dirty = True
        self._end_reason = "vad"
        out = [PushAudio(samples), *self._segments(self._segmenter.feed(samples))]
        self._forget_runs()
        return out

    def _cut(self, *, keep_candidate: bool = False) -> list[Output]:
        """End the open segment (if any) here, in the mirror and the stream
        alike; ``keep_candidate`` for a commit (the segmenter's **Flush**)."""
        events = self._segmenter.flush(keep_candidate=keep_candidate)
        self._dirty = False
        out: list[Output] = [CutSegment(keep_candidate), *self._segments(events)]
        self._end_reason = "vad"
        self._forget_runs()
        return out

    def _forget_runs(self) -> None:
        """Drop the runs before the one holding the segmenter's horizon: no
        later event names a sample in them. Each hole in client time (a
        manual clear) starts a run; kept, they grew with the session."""
        n = bisect_right(self._run_stream, self._segmenter.horizon) - 1
        if n > 0:
            del self._run_stream[:n], self._run_client[:n], self._run_len[:n]

    def _client_ms(self, stream_sample: int) -> int:
        i = bisect_right(self._run_stream, stream_sample) - 1
        if i < 0:
            return 0
        offset = min(stream_sample - self._run_stream[i], self._run_len[i])
        return (self._run_client[i] + offset) * 1000 // SAMPLE_RATE

    def _segments(self, events: list[SegmentEvent]) -> list[Output]:
        out: list[Output] = []
        for ev in events:
            if isinstance(ev, SpeechStarted):
                seg = self._next_segment
                self._next_segment += 1
                self._open_start = ev.sample
                if self._collect is not None:
                    self._collect.segments.append(seg)
                    self._items[seg] = self._collect
                    continue
                item = _Item(self._item_id(), [seg])
                self._items[seg] = item
                self._open_item = item
                out.append(BufferSpeechStarted(self._event_id(), item.id,
                                               self._client_ms(ev.sample)))
            elif isinstance(ev, SpeechEnded):
                item_or_none, self._open_item = self._open_item, None
                if self._collect is not None or item_or_none is None:
                    continue
                item = item_or_none
                if self._end_reason == "clear":
                    for seg in item.segments:
                        self._items.pop(seg, None)
                    continue
                item.audio_samples = ev.sample - self._open_start
                if self._end_reason == "vad":
                    out.append(BufferSpeechStopped(self._event_id(), item.id,
                                                   self._client_ms(ev.sample)))
                item.committed = True
                out.append(BufferCommitted(self._event_id(), item.id, self._previous_item))
                self._previous_item = item.id
                out += self._progress(item)
        return out

    # --- text -------------------------------------------------------------------------

    def _commit_if_open(self, item: _Item) -> list[Output]:
        """The engine ended ``item``'s open segment on its own (the stream was
        closed under the session: the server's shutdown flushes open segments
        as finals): the turn ends there, as at a commit."""
        if item is not self._open_item or item.committed:
            return []
        self._open_item = None
        item.audio_samples = self._stream_pos - self._open_start
        item.committed = True
        committed = BufferCommitted(self._event_id(), item.id, self._previous_item)
        self._previous_item = item.id
        return [committed]

    def _progress(self, item: _Item) -> list[Output]:
        """The delta of newly stable text, and ``completed`` once the item closes."""
        out: list[Output] = []
        view = item.view()
        if view.startswith(item.sent):
            if len(view) > len(item.sent):
                out.append(TranscriptionDelta(self._event_id(), item.id, view[len(item.sent):]))
                item.sent = view
        else:
            log.debug("item %s: text %r does not extend what was sent (%r)",
                      item.id, view, item.sent)
        if item.closed:
            out.append(TranscriptionCompleted(self._event_id(), item.id, view,
                                              item.audio_samples / SAMPLE_RATE))
            for seg in item.segments:
                self._items.pop(seg, None)
        return out

    def _event_id(self) -> str:
        return f"event_{self._prefix}{next(self._event_ids)}"

    def _item_id(self) -> str:
        return f"item_{self._prefix}{next(self._item_ids)}"


