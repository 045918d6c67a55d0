"""A stateful model of the ``/v1/realtime`` core, driven at random.

Hypothesis drives :class:`RealtimeTranscription` as the WebSocket adapter
does (connection.py): client messages in (appends of voiced buzz, noise and
silence cut at odd byte offsets, base64 as on the wire; commits; clears;
``session.update`` and its beta form switching turn detection between
``server_vad`` and ``null`` mid-utterance, and the transcription language
to the default, one offered, one not, or ``null``/``""``, also
mid-utterance; push-to-talk runs; a short "Yes" then a switch off), on a
server whose default language is a code or None and that offers none, some
or the default again; and the engine events of the segments the core pushed,
in orders the engine produces them (partials whose stable text only grows,
finals in segment order after the segment's end, some revising the stable
text, failed decodes with or without text shown, a stall, the stream
closed under the session at the server's shutdown). Each example ends with
the engine's last finals (after a shutdown) or the client leaving. The
engine is modelled by a second, reference segmenter fed exactly the audio
and cuts the core asks the stream for, as the engine stream's own would
be. After every step the client's events so far are held against
docs/protocol.md:

- ``segments_opened`` is the reference's count; with ``server_vad`` every
  segment is one item, announced by ``speech_started``, ended by
  ``speech_stopped`` (a natural or forced end only) and ``committed``, or
  dropped by a ``clear`` (no ``committed``, nothing after ``cleared``); with
  turn detection off a commit is one item of the segments its buffer made
  (none: ``completed`` with ``""`` at once); a commit gets exactly one
  ``committed`` or ``input_audio_buffer_commit_empty`` (under 100 ms held,
  or no speech nor candidate with ``server_vad``); an append is refused
  (``input_audio_buffer_full``) only past the cap;
- ``committed`` events chain by ``previous_item_id``, in the order the items
  were made; every committed item whose segments all closed has completed
  exactly once, its transcript the segments' finals joined by
  ``tags.join_texts`` (a segment closed by an error counts as ``""``); no
  delta or completed after completed; ``audio_start_ms`` never goes back
  nor past the client's audio, ``audio_end_ms`` is between them;
- while every final of an item extends its stable text, the item's deltas
  concatenate to exactly its stable view (finals of the leading closed
  segments, then the stable text of the first open one), and so to the
  transcript at the end;
- speech kept at a switch to manual (a candidate not yet a turn) is a
  segment of the next committed item, when it began less than
  ``vad.max_segment_s`` before the commit's cut, or with turn detection
  back on a turn that starts where it began;
- languages: an update asking for one the server does not offer gets one
  ``invalid_value`` error (its ``param`` the language's field, its
  ``event_id`` the update's) and changes nothing; one offered (``null`` or
  ``""``: the default) is reported in ``session.updated``, and the stream
  gets a ``SetLanguage`` (None for the default) exactly when the session's
  language changes, before the audio and cut its own turn detection switch
  moves (turns not ended at the update are in its language); the session
  always reports the last one accepted;
- audio: the stream gets every sample of live and committed audio, once
  (held audio cleared, or refused as over the buffer, never), within the
  resampler's held-back tail; at the client's exit with ``server_vad``,
  all of it.

The core is pure, so no loop, thread or socket is involved.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import HealthCheck, settings
from hypothesis import event as note
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from evoxtral_stream.audio.resample import resample
from evoxtral_stream.audio.vad import Segmenter
from evoxtral_stream.config import load_config
from evoxtral_stream.events import (
    SAMPLE_RATE,
    CaptionEvent,
    EngineEvent,
    SegmentEvent,
    SpeechEnded,
    SpeechStarted,
    StreamError,
)
from evoxtral_stream.server import realtime
from evoxtral_stream.server.realtime import (
    INPUT_RATE,
    BufferCleared,
    BufferCommitted,
    BufferSpeechStarted,
    BufferSpeechStopped,
    CutSegment,
    Output,
    PushAudio,
    RealtimeError,
    RealtimeTranscription,
    SessionCreated,
    SessionUpdated,
    SetLanguage,
    TranscriptionCompleted,
    TranscriptionDelta,
)
from evoxtral_stream.text.tags import join_texts
from tests.helpers.audio import buzz, noise

# Small limits, so forced splits and a full manual buffer come within 30 steps.
VAD = load_config(env={}, overrides={"vad.max_segment_s": 2.0,
                                     "vad.split_search_s": 0.5}).vad
MAX_BUFFER_S = 3.0
# Resampling holds back ~30 ms at 24 kHz in; 50 ms of 16 kHz samples is slack.
SLACK = SAMPLE_RATE // 20


def _wire(audio16: npt.NDArray[np.float64]) -> bytes:
    pcm = np.clip(np.rint(audio16 * 32767), -32768, 32767).astype(np.int16)
    return resample(pcm, SAMPLE_RATE, INPUT_RATE).astype("<i2").tobytes()


# 24 kHz PCM16 as a client sends it. 2.5 s of speech passes max_segment_s
# (a forced split); 0.22 s is speech detected but under min_speech_ms (a
# candidate, not yet a turn), 0.15 s not even detected.
CHUNKS: dict[str, bytes] = {
    "say-1.0": _wire(np.concatenate((buzz(1.0), np.zeros(9_600)))),
    "speech-1.0": _wire(buzz(1.0)),
    "speech-0.22": _wire(buzz(0.22)),
    "speech-0.15": _wire(buzz(0.15)),
    "speech-0.4": _wire(buzz(0.4)),
    "speech-2.5": _wire(buzz(2.5)),
    "silence-0.1": _wire(np.zeros(1_600)),
    "silence-0.6": _wire(np.zeros(9_600)),
    "silence-1.2": _wire(np.zeros(19_200)),
    "quiet-0.5": _wire(noise(0.5)),
}
# Pieces of a segment's text: Latin, CJK (no spaces) and tags, so the seams
# of a manual item's segments take every rule of tags.join_texts.
PIECES = ("hi", " there", " ok.", "你", "好", "。", " [laughs]", "[sighs]", "我很好。", " Yes")
plans = st.lists(st.sampled_from(PIECES), min_size=1, max_size=5).map(
    lambda ps: [ps[0].lstrip(), *ps[1:]])


# A session.update's transcription language: left out (no transcription
# object), or a transcription object without one (only its ignored model).
NO_TRANSCRIPTION = "<no transcription>"
NO_LANGUAGE = "<no language>"
# The languages a server offers besides its default ("en" or None): none (a
# backend of one language), others, or "en" too (Engine.languages may list
# the default); and codes a client may ask for, some never offered.
OFFERED = (("fr", "es"), ("en", "fr"), ("es",), ())
# " fr" and "FR" are no code (protocol.md's Languages: matched exactly).
ASKED = ("en", "fr", "es", "de", "auto", "xx", " fr", "FR")


def _update(vad: bool | None, beta: bool, language: str | None = NO_TRANSCRIPTION) -> str:
    transcription: dict[str, Any] = {"model": "whatever"}
    if language != NO_LANGUAGE:
        transcription["language"] = language
    if beta:
        td: Any = {} if vad else None  # a beta turn_detection without type is server_vad
        session: dict[str, Any] = {"input_audio_format": "pcm16"}
        if vad is not None:
            session["turn_detection"] = td
        if language != NO_TRANSCRIPTION:
            session["input_audio_transcription"] = transcription
        return json.dumps({"type": "transcription_session.update", "event_id": "c-update",
                           "session": session})
    audio_in: dict[str, Any] = {"format": {"type": "audio/pcm", "rate": INPUT_RATE}}
    if vad is not None:
        audio_in["turn_detection"] = {"type": "server_vad"} if vad else None
    if language != NO_TRANSCRIPTION:
        audio_in["transcription"] = transcription
    return json.dumps({"type": "session.update", "event_id": "c-update",
                       "session": {"type": "transcription", "audio": {"input": audio_in}}})


def _language_of(session: Any, beta: bool) -> Any:
    """The transcription language a session object reports."""
    if beta:
        return session["input_audio_transcription"]["language"]
    return session["audio"]["input"]["transcription"]["language"]


@dataclass
class Seg:
    """One segment of the stream, as the reference segmenter opened it."""

    index: int
    item: Item | None = None
    ended: bool = False
    closed: bool = False
    closing: str = ""        # the text it closed with ("" for an error)
    plan: list[str] | None = None
    stable_n: int = 0        # pieces of the plan in its latest stable text
    last_text: str | None = None  # its latest partial's text (None: none shown)
    consistent: bool = True  # its final extends its latest stable text

    @property
    def stable(self) -> str:
        return "".join((self.plan or [])[:self.stable_n]).rstrip()


@dataclass
class Item:
    id: str
    manual: bool
    segments: list[Seg] = field(default_factory=list)
    started_ms: int | None = None
    committed: bool = False
    cleared: bool = False
    completed: str | None = None
    deltas: list[str] = field(default_factory=list)

    def view(self) -> str:
        """The docs' stable view: finals of the leading closed segments, then
        the stable text of the first open one."""
        parts: list[str] = []
        for seg in self.segments:
            if not seg.closed:
                parts.append(seg.stable)
                break
            parts.append(seg.closing)
        return join_texts(parts)

    @property
    def consistent(self) -> bool:
        return all(s.consistent for s in self.segments)


class RealtimeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # The cap, lowered while the example runs (teardown puts it back).
        # (Not in the core's __all__: mypy --strict refuses the attribute.)
        self._saved_max = getattr(realtime.core, "MAX_BUFFER_S")  # noqa: B009
        setattr(realtime.core, "MAX_BUFFER_S", MAX_BUFFER_S)  # noqa: B010
        self.core = RealtimeTranscription(VAD, model="test-model", prefix="t_")  # see setup
        self.started = False
        self.ref = Segmenter(VAD, SAMPLE_RATE)
        self.vad = True
        self.closed = False   # the stream closed under the session (shutdown)
        self.left = False     # the client left
        self.segs: list[Seg] = []
        self.open_seg: Seg | None = None
        self.items: dict[str, Item] = {}
        self.last_committed: str | None = None
        self.event_ids: set[str] = set()
        self.last_start_ms = 0
        # Audio, in client (24 kHz) bytes and stream (16 kHz) samples.
        self.client_bytes = 0
        self.live_bytes = 0      # into the stream as it came (server_vad)
        self.held_bytes = 0      # held for a manual commit
        self.streamed_held = 0   # held, then committed or made live
        self.refusals = 0
        self.steps = 0  # client messages sent
        self.pushed = 0
        self.kept_start: int | None = None  # a candidate kept at a switch off
        self.kept_ms = 0                    # the client's time at that switch
        # Languages: the server's default, the others allowed, the session's
        # (as reported) and the stream's (None: the default), as SetLanguage set it.
        self.default: str | None = None
        self.allowed: frozenset[str] = frozenset()
        self.language: str | None = None
        self.stream_language: str | None = None
        self.set_language: list[SetLanguage] = []  # those of the last client message

    @initialize(default=st.sampled_from([None, "en"]),
                languages=st.sampled_from(OFFERED))
    def setup(self, default: str | None, languages: tuple[str, ...]) -> None:
        """The session starts on a server whose default language is
        ``default`` (None as a core may be given; the server's is a code),
        that offers ``languages`` too (the default among them or not, as
        Engine.languages may list it)."""
        self.core = RealtimeTranscription(VAD, model="test-model", language=default,
                                          languages=languages, prefix="t_")
        self.default, self.allowed = default, frozenset(languages)
        self.language = default
        self.started = True
        self._add(self.core.start(), "start")

    def teardown(self) -> None:
        """Ends the example as a session ends: at a shutdown, the engine
        closes every segment it owes (and every committed item completes);
        else the client leaves."""
        try:
            if not self.started:
                return
            if self.closed:
                while (seg := self._next_to_close()) is not None:
                    if seg.plan is None:
                        seg.plan = ["end"]
                    self._close(seg, "".join(seg.plan))
                assert not self._live()
                self.items_complete_with_their_text()
            else:
                self._leave()
        finally:
            setattr(realtime.core, "MAX_BUFFER_S", self._saved_max)  # noqa: B010

    # --- the client ------------------------------------------------------------

    def _client(self, msg: str, kind: str) -> list[Output]:
        self.steps += 1
        out = self.core.receive(msg)
        self._add(out, kind)
        return out

    @precondition(lambda self: not self.closed)
    @rule(name=st.sampled_from(list(CHUNKS)),
          cuts=st.lists(st.integers(0, 200_000), max_size=2))
    def append(self, name: str, cuts: list[int]) -> None:
        data = CHUNKS[name]
        bounds = [0, *sorted(c % len(data) for c in cuts), len(data)]
        for a, b in itertools.pairwise(bounds):
            piece = data[a:b]
            if not piece:
                continue
            held16 = self._held16()
            self.client_bytes += len(piece)
            out = self._client(json.dumps({"type": "input_audio_buffer.append",
                                           "audio": base64.b64encode(piece).decode()}),
                               "append")
            refused = [o for o in out if isinstance(o, RealtimeError)]
            if self.vad:
                assert not refused, refused
                self.live_bytes += len(piece)
                continue
            limit = MAX_BUFFER_S * SAMPLE_RATE
            grown = held16 + len(piece) // 3
            if refused:
                assert [e.code for e in refused] == ["input_audio_buffer_full"], refused
                assert grown > limit - SLACK, (grown, limit)
                self.refusals += 1
                note("buffer full")
            else:
                assert grown <= limit + SLACK, (grown, limit)
                self.held_bytes += len(piece)

    def _held16(self) -> int:
        kept = 0 if self.kept_start is None else self.ref.position - self.kept_start
        return self.held_bytes // 3 + kept

    @precondition(lambda self: not self.closed)
    @rule()
    def commit(self) -> None:
        held_ms = self._held16() * 1000 // SAMPLE_RATE
        out = self._client(json.dumps({"type": "input_audio_buffer.commit",
                                       "event_id": "c-commit"}), "commit")
        errors = [o for o in out if isinstance(o, RealtimeError)]
        commits = [o for o in out if isinstance(o, BufferCommitted)]
        assert len(errors) + len(commits) == 1, out
        for e in errors:
            assert (e.code, e.client_event_id) == ("input_audio_buffer_commit_empty",
                                                   "c-commit"), e
        if self.vad:
            return
        if held_ms >= 105:
            assert commits, (held_ms, out)
        elif held_ms <= 95:
            assert errors, (held_ms, out)
        if commits:
            self.streamed_held += self.held_bytes
            self.held_bytes = 0
            self.kept_start = None

    @precondition(lambda self: not self.closed)
    @rule()
    def clear(self) -> None:
        out = self._client('{"type": "input_audio_buffer.clear"}', "clear")
        assert isinstance(out[-1], BufferCleared), out
        self.held_bytes = 0
        self.kept_start = None

    @precondition(lambda self: not self.closed)
    @rule(vad=st.sampled_from([True, False, None]), beta=st.booleans())
    def update(self, vad: bool | None, beta: bool) -> None:
        self._update_session(vad, beta, NO_TRANSCRIPTION)

    @precondition(lambda self: not self.closed)
    @rule(vad=st.sampled_from([None, None, True, False]), beta=st.booleans(),
          language=st.sampled_from([NO_LANGUAGE, None, "", *ASKED]))
    def switch_language(self, vad: bool | None, beta: bool, language: str | None) -> None:
        """An update naming a transcription language (the default, one
        allowed, one not; null or "" for the default), mid-utterance or
        not, with a switch of turn detection or not."""
        self._update_session(vad, beta, language)

    @precondition(lambda self: not self.closed and self.allowed)
    @rule(data=st.data(), beta=st.booleans(), after=st.sampled_from(["speech-0.4", "say-1.0"]))
    def switch_mid_utterance(self, data: st.DataObject, beta: bool, after: str) -> None:
        """Speech, a switch to another offered language (the default as
        null), more speech: the turn goes on across the switch. Or the same
        update switches turn detection too, which moves the speech (off:
        its turn ends; on: the held speech goes to server VAD) in the new
        language (else too rare a draw for switch_language)."""
        self.append("speech-0.4", [])
        offered = [None, *sorted(self.allowed - {self.language or ""})]
        vad = data.draw(st.sampled_from([None, not self.vad]))
        self._update_session(vad, beta, data.draw(st.sampled_from(offered)))
        self.append(after, [])

    def _update_session(self, vad: bool | None, beta: bool, language: str | None) -> None:
        was = self.vad
        self.set_language = []
        out = self._client(_update(vad, beta, language),
                           "update" if vad is None or vad == was
                           else ("vad_on" if vad else "vad_off"))
        given = language not in (NO_TRANSCRIPTION, NO_LANGUAGE)
        # protocol.md: null or "" is model.language (the core's default).
        wanted = (language or self.default) if given else self.language
        if wanted != self.default and wanted not in self.allowed:
            # "An update with an unsupported value gets an error and changes
            # nothing": invalid_value, "a transcription language the engine
            # does not offer", param naming the field as for every other.
            assert len(out) == 1 and isinstance(out[0], RealtimeError), out
            err = out[0]
            assert (err.code, err.error_type, err.client_event_id) == (
                "invalid_value", "invalid_request_error", "c-update"), err
            assert err.param == ("session.input_audio_transcription.language" if beta
                                 else "session.audio.input.transcription.language"), err
            assert self.core.server_vad is self.vad
            note("unsupported language refused")
            return
        (updated,) = [o for o in out if isinstance(o, SessionUpdated)]
        assert out[-1] is updated
        # SetLanguage only when the session's language changes, None for the default.
        expected = [] if wanted == self.language else [
            SetLanguage(None if wanted == self.default else wanted)]
        assert self.set_language == expected, (self.set_language, expected, self.language)
        if expected:
            note("language switched" + (" mid-utterance" if self.open_seg else ""))
            self.stream_language = expected[0].language
        self.language = wanted
        assert _language_of(updated.session, beta) == self.language, updated
        if vad is not None:
            self.vad = vad
        assert self.core.server_vad is self.vad
        td = (updated.session["turn_detection"] if beta
              else updated.session["audio"]["input"]["turn_detection"])
        assert (td is not None and td["type"] == "server_vad") is self.vad, td
        if was and not self.vad:
            # Speech not yet a turn stays, for the next manual item.
            self.kept_start = self.ref.candidate_start
            self.kept_ms = self.client_bytes // 2 * 1000 // INPUT_RATE
            if self.kept_start is not None:
                note("candidate kept at a switch off")
        elif not was and self.vad:
            if self.kept_start is not None:
                # Back on: the kept speech goes on as a turn from where it began.
                for o in out:
                    if isinstance(o, BufferSpeechStarted):
                        note("kept candidate made a turn")
                        assert o.audio_start_ms <= self.kept_ms, (o, self.kept_ms)
                        break
            self.streamed_held += self.held_bytes
            self.held_bytes = 0
            self.kept_start = None

    @precondition(lambda self: not self.closed)
    @rule(names=st.lists(st.sampled_from(list(CHUNKS)), min_size=1, max_size=4),
          beta=st.booleans())
    def push_to_talk(self, names: list[str], beta: bool) -> None:
        """Turn detection off, a few appends, a commit: a manual item."""
        if self.vad:
            self.update(False, beta)
        for name in names:
            self.append(name, [])
        self.commit()

    @precondition(lambda self: not self.closed and self.vad)
    @rule(pause=st.booleans(), beta=st.booleans())
    def yes_then_switch_off(self, pause: bool, beta: bool) -> None:
        """A short "Yes" (not yet a turn, or ended as a click), then turn
        detection off: the speech stays for the next item."""
        self.append("speech-0.22", [])
        if pause:
            self.append("silence-0.6", [])
        self.update(False, beta)

    def _leave(self) -> None:
        """The client goes (at the end of an example): its tail, with
        server_vad, goes into the stream; the adapter takes no engine event
        from here on."""
        for o in self.core.end():
            if isinstance(o, PushAudio):
                self._push(o, [])
        self.left = True
        if self.vad:
            expected = (self.live_bytes + self.streamed_held) // 3
            assert abs(self.pushed - expected) <= 8, (self.pushed, expected)

    # --- the engine ------------------------------------------------------------

    def _engine(self, ev: EngineEvent) -> list[Output]:
        out = self.core.on_engine_event(ev)
        self._add(out, "engine")
        return out

    def _live(self) -> list[Seg]:
        return [s for s in self.segs if not s.closed]

    def _next_to_close(self) -> Seg | None:
        live = self._live()
        return live[0] if live and live[0].ended else None

    @precondition(lambda self: self._live())
    @rule(data=st.data())
    def partial(self, data: st.DataObject) -> None:
        seg = data.draw(st.sampled_from(self._live()))
        if seg.plan is None:
            seg.plan = data.draw(plans)
        n_stable = data.draw(st.integers(seg.stable_n, len(seg.plan)))
        n_text = data.draw(st.integers(n_stable, len(seg.plan)))
        seg.stable_n = n_stable
        text = "".join(seg.plan[:n_text])
        seg.last_text = text
        self._engine(CaptionEvent(
            stream="rt", segment=seg.index, seq=1, final=False, text=text, plain_text=text,
            stable=seg.stable, unstable=text[len(seg.stable):], tags=(), start=0.0, end=1.0,
            latency=0.1))

    @precondition(lambda self: self._live())
    @rule(data=st.data())
    def partial_failed(self, data: st.DataObject) -> None:
        seg = data.draw(st.sampled_from(self._live()))
        out = self._engine(StreamError("rt", "decode_failed", "boom", seg.index))
        assert [type(o) for o in out] == [RealtimeError], out

    @rule()
    def stalled(self) -> None:
        out = self._engine(StreamError("rt", "model_stalled", "slow"))
        assert [type(o) for o in out] == [RealtimeError], out

    @precondition(lambda self: self._next_to_close() is not None)
    @rule(how=st.sampled_from(["final", "revised", "empty", "failed"]), data=st.data())
    def close_segment(self, how: str, data: st.DataObject) -> None:
        """The engine closes the earliest ended segment: finals come in
        segment order, after the segment's end."""
        seg = self._next_to_close()
        assert seg is not None
        if seg.plan is None:
            seg.plan = data.draw(plans)
        item = seg.item
        owed_commit = item is not None and not item.committed and not item.cleared
        if how == "failed" and seg.last_text is None:
            # Nothing shown: the error closes it (decode_failed, or at a
            # shutdown that gave up, final_lost).
            code = "final_lost" if self.closed and data.draw(st.booleans()) else "decode_failed"
            seg.closed, seg.closing = True, ""
            out = self._engine(StreamError("rt", code, "gone", seg.index, closes_segment=True))
            assert isinstance(out[0], RealtimeError) and out[0].code == code, out
        else:
            if how == "failed":
                assert seg.last_text is not None
                self._engine(StreamError("rt", "decode_failed", "boom", seg.index))
                text = seg.last_text
            elif how == "final":
                text = "".join(seg.plan)
            elif how == "revised":
                text = "".join(data.draw(plans))
            else:
                text = ""
            out = self._close(seg, text)
        if owed_commit:
            note("turn open at the shutdown committed")
            # Only the stream's close ends a turn so: committed, no speech_stopped.
            assert self.closed
            assert item is not None and item.committed, out
            assert not any(isinstance(o, BufferSpeechStopped) for o in out), out

    def _close(self, seg: Seg, text: str) -> list[Output]:
        seg.closed, seg.closing = True, text
        seg.consistent = text.startswith(seg.stable)
        return self._engine(CaptionEvent(
            stream="rt", segment=seg.index, seq=1, final=True, text=text, plain_text=text,
            stable=text, unstable="", tags=(), start=0.0, end=1.0, latency=0.1))

    @precondition(lambda self: not self.closed and self.steps >= 10)
    @rule()
    def shutdown(self) -> None:
        """The server's shutdown closes the stream under the session: the
        engine flushes the open segment (its final follows), and the adapter
        takes no client message from here on."""
        self.closed = True
        self._ref_events(self.ref.flush(), collect=None, expect=[], cause="close")

    # --- bookkeeping -----------------------------------------------------------

    def _push(self, o: PushAudio, expect: list[tuple[str, Seg]],
              collect: list[Seg] | None = None) -> None:
        assert not self.closed
        self.pushed += len(o.samples)
        self._ref_events(self.ref.feed(o.samples), collect=collect, expect=expect,
                         cause="push")

    def _ref_events(self, events: Sequence[SegmentEvent], *, collect: list[Seg] | None,
                    expect: list[tuple[str, Seg]], cause: str) -> None:
        for ev in events:
            if isinstance(ev, SpeechStarted):
                assert self.open_seg is None
                seg = Seg(len(self.segs))
                self.segs.append(seg)
                self.open_seg = seg
                if collect is not None:
                    collect.append(seg)
                elif cause != "close":
                    expect.append(("started", seg))
            elif isinstance(ev, SpeechEnded):
                ended, self.open_seg = self.open_seg, None
                assert ended is not None
                ended.ended = True
                if collect is not None or cause == "close":
                    continue
                if cause == "clear":
                    expect.append(("cleared", ended))
                    continue
                if cause == "push":
                    expect.append(("stopped", ended))
                expect.append(("committed", ended))

    def _add(self, out: Sequence[Output], kind: str) -> None:
        """Walk one call's outputs in order, as the adapter executes them."""
        manual_commit = kind == "commit" and not self.vad
        collect: list[Seg] | None = [] if manual_commit else None
        expect: list[tuple[str, Seg]] = []
        got: list[tuple[str, Any]] = []
        moved = False  # audio or a cut went to the stream in this call
        for o in out:
            if isinstance(o, PushAudio | CutSegment):
                moved = True
            if isinstance(o, PushAudio):
                assert kind not in ("engine", "start"), o
                self._push(o, expect, collect)
            elif isinstance(o, CutSegment):
                assert kind in ("commit", "clear", "vad_off"), (kind, o)
                assert o.keep_candidate is (kind == "commit"), (kind, o)
                self._ref_events(self.ref.flush(keep_candidate=o.keep_candidate),
                                 collect=collect, expect=expect,
                                 cause="clear" if kind == "clear" else "cut")
            elif isinstance(o, SetLanguage):
                assert kind in ("update", "vad_on", "vad_off"), (kind, o)
                # protocol.md: the turn a switch off ends and the held audio a
                # switch on pushes are not ended at the update: its language.
                assert not moved, out
                self.set_language.append(o)
            else:
                assert o.event_id not in self.event_ids, o
                self.event_ids.add(o.event_id)
                got.append(self._server_event(o, expect, collect, kind))
        # Every segment event the reference saw was told the client, in order.
        for what, seg in expect:
            if what == "cleared":
                assert seg.item is not None
                seg.item.cleared = True
                note("item cleared")
        turn = [(w, s.index) for w, s in expect if w != "cleared"]
        told = [(w, x) for w, x in got if w in ("started", "stopped", "committed")
                and x is not None]
        if kind != "engine" and not manual_commit:
            assert told == turn, (told, turn)

    def _server_event(self, o: Output, expect: list[tuple[str, Seg]],
                      collect: list[Seg] | None, kind: str) -> tuple[str, Any]:
        client_ms = self.client_bytes // 2 * 1000 // INPUT_RATE
        if isinstance(o, BufferSpeechStarted):
            # (The mode changes once the update's outputs are walked.)
            assert kind != "engine" and (self.vad or kind == "vad_on"), o
            assert o.item_id not in self.items, o
            pending = [s for w, s in expect if w == "started" and s.item is None]
            assert pending, (o, expect)
            seg = pending[0]
            item = Item(o.item_id, manual=False, segments=[seg], started_ms=o.audio_start_ms)
            seg.item = item
            self.items[o.item_id] = item
            assert self.last_start_ms <= o.audio_start_ms <= client_ms + 1, (o, client_ms)
            self.last_start_ms = o.audio_start_ms
            return ("started", seg.index)
        if isinstance(o, BufferSpeechStopped):
            item = self.items[o.item_id]
            assert item.started_ms is not None
            assert item.started_ms <= o.audio_end_ms <= client_ms + 1, (o, item, client_ms)
            return ("stopped", item.segments[0].index)
        if isinstance(o, BufferCommitted):
            assert o.previous_item_id == self.last_committed, (o, self.last_committed)
            # Items are committed in the order they were made (ids count up).
            assert self.last_committed is None or (
                int(o.item_id.rsplit("_", 1)[1]) > int(self.last_committed.rsplit("_", 1)[1])), o
            self.last_committed = o.item_id
            if collect is not None:
                assert o.item_id not in self.items, o
                item = Item(o.item_id, manual=True, segments=list(collect))
                for seg in collect:
                    seg.item = item
                self.items[o.item_id] = item
                self._check_kept(item)
            item = self.items[o.item_id]
            assert not item.committed and not item.cleared, (o, item)
            item.committed = True
            return ("committed", None if item.manual else item.segments[0].index)
        if isinstance(o, TranscriptionDelta):
            item = self.items[o.item_id]
            assert item.completed is None and not item.cleared, (o, item)
            assert o.delta, o
            item.deltas.append(o.delta)
            return ("delta", o.item_id)
        if isinstance(o, TranscriptionCompleted):
            item = self.items[o.item_id]
            assert item.committed and item.completed is None and not item.cleared, (o, item)
            assert all(s.closed for s in item.segments), (o, item)
            assert o.transcript == join_texts(s.closing for s in item.segments), (o, item)
            assert o.audio_s >= 0, o
            item.completed = o.transcript
            note(f"completed {'consistent' if item.consistent else 'revised'}, "
                 f"{'with' if item.deltas else 'without'} deltas")
            note(f"completed {'manual' if item.manual else 'vad'} item of "
                 f"{min(len(item.segments), 2)}+ segments")
            return ("completed", o.item_id)
        if isinstance(o, SessionCreated):
            assert kind == "start", o
            assert _language_of(o.session, False) == self.default, o
        elif isinstance(o, BufferCleared):
            assert kind == "clear", o
        elif isinstance(o, SessionUpdated):
            assert kind in ("update", "vad_on", "vad_off"), o
        elif isinstance(o, RealtimeError) and kind == "engine":
            assert o.error_type == "server_error", o
        return (type(o).__name__, None)

    def _check_kept(self, item: Item) -> None:
        """Speech kept at the switch to manual is a segment of this item."""
        if self.kept_start is None:
            return
        span = self.ref.position - self.kept_start
        note("kept candidate committed")
        if span < VAD.max_segment_s * SAMPLE_RATE - 2 * VAD.frame_ms * SAMPLE_RATE // 1000:
            assert item.segments, (item, span)

    # --- invariants ------------------------------------------------------------

    @invariant()
    def language_agrees(self) -> None:
        """The session reports the last accepted language, in either shape;
        the stream was told it (None while it is the default)."""
        assert _language_of(self.core.session_config(), False) == self.language
        assert _language_of(self.core.session_config(beta=True), True) == self.language
        assert self.stream_language == (
            None if self.language == self.default else self.language), (
            self.stream_language, self.language)

    @invariant()
    def mirror_agrees(self) -> None:
        assert self.core.segments_opened == len(self.segs)

    @invariant()
    def items_complete_with_their_text(self) -> None:
        if self.left:
            return
        for item in self.items.values():
            if item.cleared:
                continue
            if item.committed and all(s.closed for s in item.segments):
                assert item.completed is not None, item
            sent = "".join(item.deltas)
            if not item.consistent:
                continue
            if item.completed is not None:
                assert sent == item.completed, item
            else:
                assert sent == item.view(), (sent, item.view(), item)

    @invariant()
    def audio_is_accounted(self) -> None:
        received = self.client_bytes // 3
        assert abs(self.core.received_samples - received) <= SLACK, (
            self.core.received_samples, received)
        expected = (self.live_bytes + self.streamed_held) // 3
        assert abs(self.pushed - expected) <= SLACK, (self.pushed, expected)


RealtimeMachine.TestCase.settings = settings(
    # STATEFUL_EXAMPLES raises the count for a long hunt by hand.
    max_examples=int(os.environ.get("STATEFUL_EXAMPLES", "60")), stateful_step_count=30,
    deadline=None, suppress_health_check=[HealthCheck.too_slow])
test_realtime_stateful = RealtimeMachine.TestCase
