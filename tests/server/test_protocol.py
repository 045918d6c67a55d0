"""Protocol codecs: every message the server sends matches docs/protocol.md."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from evoxtral_stream.events import (
    CaptionEvent,
    EngineEvent,
    StreamEnded,
    StreamError,
    StreamStarted,
    TagMark,
)
from evoxtral_stream.server.broadcast import ENDS_REMEMBERED, Broadcaster, ResumeWindow
from evoxtral_stream.server.protocol import (
    MAX_LOST_S,
    EndOfStream,
    IngestFormat,
    IngestProgress,
    LostAudio,
    ProtocolError,
    SampleFormat,
    caption_from_dict,
    caption_to_dict,
    decode_caption,
    encode_error,
    encode_event,
    encode_hello,
    encode_message,
    new_epoch,
    parse_epoch,
    parse_ingest_message,
)
from evoxtral_stream.text.tags import TagKind
from tests.docs_schema import validate_message

CAPTION = CaptionEvent(
    stream="mic", segment=3, seq=17, final=False,
    text="[nervous] So... I was thinking", plain_text="So... I was thinking",
    stable="[nervous] So... I was", unstable=" thinking",
    tags=(TagMark("nervous", "emotion", 0, 12.48),),
    start=12.48, end=14.9, latency=0.183,
)

EVENTS: list[EngineEvent] = [
    CAPTION,
    StreamStarted("mic", "mic"),
    StreamEnded("talk", 25.2, 5, 5),
    StreamError("mic", "decode_failed", "RuntimeError: boom", 4),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_events_match_the_documented_schema(event: EngineEvent) -> None:
    validate_message(encode_event(event))


def test_hello_and_errors_match_the_schema() -> None:
    hello = validate_message(encode_hello("whisper", ["mic"], ["captions"], ["en"],
                                          epoch=new_epoch()))
    assert hello["v"] == 1
    assert (hello["languages"], hello["adapters"]) == (["en"], [])
    hello = validate_message(encode_hello("voxtral", [], [], ["en", "auto", "fr"], ["default"],
                                          epoch="e"))
    assert (hello["languages"], hello["adapters"]) == (["en", "auto", "fr"], ["default"])
    validate_message(encode_error("unexpected_message", "no", None))


def test_epochs_are_fresh_and_a_query_names_at_most_one_well_formed() -> None:
    assert len({new_epoch() for _ in range(100)}) == 100
    assert parse_epoch([]) is None
    assert parse_epoch(["3f9c0a51d2e87b46"]) == "3f9c0a51d2e87b46"
    assert parse_epoch(["A_b-9"]) == "A_b-9"
    for values, why in ((["a", "b"], "more than once"), ([""], "got ''"),
                        (["x" * 65], "1 to 64"), (["ab:c"], "'ab:c'"), (["é"], "'é'")):
        with pytest.raises(ProtocolError, match=why) as err:
            parse_epoch(values)
        assert err.value.code == "bad_query"


def test_a_resume_of_another_numbering_replays_all_there_is_after_a_gap() -> None:
    """Seqs of another epoch are not compared with this one's: a since the new
    numbering has passed (7 < 9) would otherwise skip captions 1 to 7."""
    b = Broadcaster(8, encode_event, history=20)
    for seq in range(1, 10):
        b.publish(CaptionEvent(**{**CAPTION.__dict__, "seq": seq, "final": True}))

    def replay(since: dict[str, int], renumbered: bool) -> list[Any]:
        backlog = b.subscribe(None, since, renumbered=renumbered).backlog
        return [m["seq"] if m["type"] == "caption" else (m["stream"], m["from"], m["to"])
                for m in map(validate_message, backlog)]

    assert replay({"mic": 7}, renumbered=False) == [8, 9]
    assert replay({"mic": 7}, renumbered=True) == [("mic", 8, None), *range(1, 10)]
    # Seq 0 had seen nothing to forget; an unknown stream has nothing to replay.
    assert replay({"mic": 0}, renumbered=True) == list(range(1, 10))
    assert replay({"other": 3}, renumbered=True) == [("other", 4, None)]


def test_resume_history_is_kept_for_history_streams_streams_least_recently_active_first_out(
        ) -> None:
    """The broadcaster's resume history is bounded by ``history`` captions
    for at most ``history_streams`` streams (docs/protocol.md), whatever the
    number of streams that come and go: the least recently active is
    forgotten first, and a resume of it gets a gap whose ``to`` is None (no
    ``last_seq`` here), then its ``stream.ended``: the ends are kept apart,
    for the :data:`ENDS_REMEMBERED` streams that ended last."""

    def say(b: Broadcaster, stream: str, seq: int) -> None:
        b.publish(CaptionEvent(**{**CAPTION.__dict__, "stream": stream, "seq": seq,
                                  "final": True}))

    def replay(b: Broadcaster, stream: str, since: int) -> list[Any]:
        return [m["seq"] if m["type"] == "caption" else (m["type"], m.get("to"))
                for m in map(validate_message, b.subscribe([stream], {stream: since}).backlog)]

    many = Broadcaster(8, encode_event, history=2, history_streams=3)
    for i in range(1000):
        for seq in (1, 2, 3):
            say(many, f"s{i}", seq)
        many.publish(StreamEnded(f"s{i}", 1.0, 3, 3))
    assert many.retained_captions == 3 * 2
    assert replay(many, "s0", 1) == [("gap", None), ("stream.ended", None)]
    assert replay(many, "s999", 1) == [2, 3, ("stream.ended", None)]
    for i in range(1000, ENDS_REMEMBERED + 1):
        many.publish(StreamEnded(f"s{i}", 1.0, 0, 0))
    assert len(many._ended) == ENDS_REMEMBERED
    assert replay(many, "s0", 1) == [("gap", None)]
    assert replay(many, "s1", 1) == [("gap", None), ("stream.ended", None)]

    two = Broadcaster(8, encode_event, history=2, history_streams=2)
    say(two, "a", 1)
    say(two, "b", 1)
    say(two, "a", 2)                          # a is now the more recently active,
    say(two, "c", 1)                          # so b goes, not a
    assert replay(two, "a", 0) == [1, 2]
    assert replay(two, "b", 1) == [("gap", None)]


def test_gap_messages_match_the_schema() -> None:
    b = Broadcaster(8, encode_event, history=2)
    for seq in range(1, 5):
        b.publish(CaptionEvent(**{**CAPTION.__dict__, "seq": seq, "final": True}))
    missing, *_ = b.subscribe(["mic"], {"mic": 0}).backlog
    assert validate_message(missing) == {"type": "gap", "stream": "mic", "from": 1, "to": 2}
    renumbered, *_ = b.subscribe(["mic"], {"mic": 99}).backlog
    assert validate_message(renumbered)["to"] is None


def test_caption_round_trip_keeps_unicode() -> None:
    ev = CaptionEvent(**{**CAPTION.__dict__, "text": "[whispers] café — ¿sí?"})
    obj = decode_caption(encode_event(ev))
    assert obj["text"] == "[whispers] café — ¿sí?"
    assert obj["seq"] == 17



def test_continues_is_sent_only_where_true_and_read_back() -> None:
    plain = json.loads(encode_event(CAPTION))
    assert "continues" not in plain
    split = CaptionEvent(**{**CAPTION.__dict__, "continues": True})
    obj = validate_message(encode_event(split))
    assert obj["continues"] is True
    assert caption_from_dict(obj) == split
    assert caption_from_dict(plain) == CAPTION
    with pytest.raises(ProtocolError, match="continues"):
        caption_from_dict({**obj, "continues": "yes"})

@pytest.mark.parametrize("bad", ["{", "[]", '{"type":"caption"}', b"\xff\xfe"])
def test_decode_caption_rejects_malformed(bad: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_caption(bad)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("where", ["start", "end", "latency", "tag t"])
def test_a_caption_number_that_is_not_finite_is_refused(where: str, literal: str) -> None:
    """JSON has no NaN or Infinity, but json.loads takes those literals (and
    1e999 as infinity) from another server or a recording. caption_from_dict
    refused them in start and end only, letting a NaN latency or tag time
    into the event (and out as ``NaN``, which no other JSON parser reads,
    wherever it is encoded again); decode_caption took any."""
    obj = caption_to_dict(CAPTION)
    if where == "tag t":
        obj["tags"] = [{**obj["tags"][0], "t": "@"}]
    else:
        obj[where] = "@"
    text = json.dumps(obj).replace('"@"', literal)
    with pytest.raises(ProtocolError, match="not a finite number") as err:
        caption_from_dict(json.loads(text))
    assert err.value.code == "bad_message"
    with pytest.raises(ProtocolError, match="not a finite number"):
        decode_caption(text)
    # The same caption with a number in its place decodes.
    assert caption_from_dict(json.loads(text.replace(literal, "1.5"))).final is False


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e999"])
def test_ingest_messages_refuse_numbers_that_are_not_finite(literal: str) -> None:
    """Every number of an ingest message is an integer: NaN and the
    infinities are refused like any other non-integer."""
    for text in (f'{{"type": "config", "sample_rate": {literal}}}',
                 f'{{"type": "config", "sample_rate": 16000, "channels": {literal}}}',
                 f'{{"type": "lost", "samples": {literal}}}'):
        with pytest.raises(ProtocolError, match="must be an integer"):
            parse_ingest_message(text)


def test_text_that_is_no_json_object_gets_the_documented_codes() -> None:
    """docs/protocol.md's ingest table: text that is not JSON is bad_json, JSON
    that is not an object bad_message. Bytes that are not UTF-8 used to be
    bad_utf8, a code the server never sends (websockets closes such a text
    frame with 1007 before the codec sees it) that the table listed anyway."""
    cases: list[tuple[str | bytes, str]] = [
        ("{", "bad_json"), (b'{"type": "\xff"}', "bad_json"), ("[1]", "bad_message"),
        ("7", "bad_message")]
    for text, code in cases:
        with pytest.raises(ProtocolError) as err:
            parse_ingest_message(text)
        assert err.value.code == code, text


def test_lost_is_bounded_by_the_stream_rate() -> None:
    most = 48000 * MAX_LOST_S
    assert parse_ingest_message(f'{{"type": "lost", "samples": {most}}}', 48000) \
        == LostAudio(most)
    assert parse_ingest_message('{"type": "lost", "samples": 0}', 8000) == LostAudio(0)
    assert parse_ingest_message('{"type": "end"}', 8000) == EndOfStream()
    for bad in (most + 1, -1, 0.5, '"7"', "null", "true"):
        with pytest.raises(ProtocolError) as err:
            parse_ingest_message(f'{{"type": "lost", "samples": {bad}}}', 48000)
        assert err.value.code == "bad_message"
        assert str(err.value).startswith(f"samples must be an integer 0..{most}, got ")


def test_ingest_summary_matches_the_schema() -> None:
    validate_message(encode_message("ingest.summary", stream="mic", duration=12.3, segments=3,
                                    finals=3, partials=9, errors=0, lost=0.5))
    with pytest.raises(jsonschema.ValidationError):  # lost is required
        validate_message(encode_message("ingest.summary", stream="mic", duration=12.3,
                                        segments=3, finals=3, partials=9, errors=0))


def test_progress_is_an_optional_boolean_of_the_config() -> None:
    base = {"type": "config", "sample_rate": 48000}
    assert parse_ingest_message(json.dumps(base)) \
        == IngestFormat(48000, 1, SampleFormat.PCM16, progress=False)
    for value in (True, False):
        parsed = parse_ingest_message(json.dumps({**base, "progress": value}))
        assert isinstance(parsed, IngestFormat) and parsed.progress is value
    bad_values: list[object] = ["yes", "true", 1, 0, None, [], {}]
    for bad in bad_values:
        with pytest.raises(ProtocolError) as err:
            parse_ingest_message(json.dumps({**base, "progress": bad}))
        assert err.value.code == "bad_config"
        assert str(err.value) == f"progress must be true or false, got {bad!r}"


def test_progress_is_reported_per_half_second_of_frames_and_flushed_at_end() -> None:
    """Driven by the frames counted only: a report once at least half a second
    of them (at the config's rate, rounded up) came since the last one; at
    end the rest, once."""
    progress = IngestProgress(48000)
    assert progress.add(10_000) is None
    assert progress.flush() == '{"type":"ingest.progress","frames":10000}'
    assert progress.flush() is None
    assert progress.add(23_999) is None
    assert validate_message(progress.add(1) or "") == {"type": "ingest.progress",
                                                      "frames": 34_000}
    assert progress.add(50_000) == '{"type":"ingest.progress","frames":84000}'
    assert progress.add(0) is None and progress.flush() is None
    assert progress.frames == 84_000
    odd = IngestProgress(8001)  # half a second is 4000.5 frames: 4001
    assert odd.add(4000) is None
    assert odd.add(1) == '{"type":"ingest.progress","frames":4001}'


def test_ingest_ready_and_progress_match_the_schema() -> None:
    ready = {"stream": "mic", "sample_rate": 48000, "channels": 1, "format": "pcm16",
             "language": "en", "epoch": "3f9c0a51d2e87b46"}
    for value in (True, False):
        validate_message(encode_message("ingest.ready", **ready, progress=value))
    with pytest.raises(jsonschema.ValidationError):  # progress is required
        validate_message(encode_message("ingest.ready", **ready))
    validate_message(encode_message("ingest.progress", frames=24000))
    for bad in (0, 1.5, None):
        with pytest.raises(jsonschema.ValidationError):
            validate_message(encode_message("ingest.progress", frames=bad))


@pytest.mark.parametrize(("change", "why"), [
    ({"known": "no"}, "caption tag 'known' is not true or false: 'no'"),
    ({"known": 0}, "caption tag 'known' is not true or false: 0"),
    ({"known": None}, "caption tag 'known' is not true or false: None"),
    ({"known": []}, "caption tag 'known' is not true or false: []"),
    ({"kind": "mood"}, "caption tag kind 'mood' is none of emotion, non-verbal, delivery, "
                       "pause, unknown"),
    ({"kind": "Emotion"}, "caption tag kind 'Emotion' is none of"),
    ({"index": -1}, "caption tag {"),
    ({"index": True}, "caption tag {"),
    ({"t": False}, "caption tag {"),
])
def test_a_tag_field_of_the_wrong_type_or_value_is_refused(change: dict[str, object],
                                                            why: str) -> None:
    """A tag's ``known`` went through bool(): "no" read as true, [] as
    false; any ``kind`` was taken, which the schema limits to TagKind's
    values; an index below 0 or a bool for a number passed too."""
    obj = caption_to_dict(CAPTION)
    obj["tags"] = [{**obj["tags"][0], **change}]
    with pytest.raises(ProtocolError) as err:
        caption_from_dict(obj)
    assert err.value.code == "bad_message"
    assert str(err.value).startswith(why), str(err.value)
    with pytest.raises(ProtocolError):
        decode_caption(json.dumps(obj))


@pytest.mark.parametrize(("change", "why"), [
    ({"seq": 0}, "caption field 'seq' must be at least 1, got 0"),
    ({"seq": -1}, "caption field 'seq' must be at least 1, got -1"),
    ({"segment": -1}, "caption field 'segment' must be at least 0, got -1"),
    ({"start": -0.001}, "caption field 'start' must be at least 0, got -0.001"),
    ({"end": -5}, "caption field 'end' must be at least 0, got -5"),
    ({"start": -(10 ** 30)}, "caption field 'start' must be at least 0, got -1e+30"),
])
def test_a_caption_field_below_its_schema_minimum_is_refused(change: dict[str, object],
                                                             why: str) -> None:
    """The schema in docs/protocol.md numbers seqs from 1 and segments and
    stream times from 0; caption_from_dict took a negative seq, segment,
    start or end as it refuses a negative tag index."""
    obj = {**caption_to_dict(CAPTION), **change}
    with pytest.raises(jsonschema.ValidationError):
        validate_message(obj)
    with pytest.raises(ProtocolError) as err:
        caption_from_dict(obj)
    assert err.value.code == "bad_message"
    assert str(err.value).startswith(why), str(err.value)
    with pytest.raises(ProtocolError):
        decode_caption(json.dumps(obj))


def test_a_caption_at_its_schema_minimums_decodes() -> None:
    obj = {**caption_to_dict(CAPTION), "seq": 1, "segment": 0, "start": -0.0, "end": 0,
           "tags": []}
    validate_message(obj)
    event = caption_from_dict(obj)
    assert (event.seq, event.segment, event.start, event.end) == (1, 0, 0.0, 0.0)


def test_a_tag_without_known_is_known_and_every_kind_decodes() -> None:
    obj = caption_to_dict(CAPTION)
    for kind in TagKind:
        for known in (True, False):
            obj["tags"] = [{**obj["tags"][0], "kind": kind.value, "known": known}]
            assert caption_from_dict(obj).tags[0].known is known
            assert caption_from_dict(obj).tags[0].kind == kind.value
    del obj["tags"][0]["known"]
    assert caption_from_dict(obj).tags[0].known is True


def test_an_error_message_holding_a_lone_surrogate_is_sent_as_text() -> None:
    """A backend's exception naming a path whose bytes are no UTF-8 holds a
    lone surrogate, which no UTF-8 frame or file takes: encoding the
    event raised. It is U+FFFD in the message."""
    event = StreamError("mic", "decode_failed", "OSError: /models/caf\udce9", 3)
    line = encode_event(event)
    line.encode("utf-8")
    assert json.loads(line)["message"] == "OSError: /models/caf\ufffd"


def test_a_resume_window_coalesces_partials_in_publish_order_and_refuses_past_its_limit(
        ) -> None:
    """While a resume reads the journal its live events wait in a window: a
    later partial of a segment, or its final, replaces the earlier and takes
    its place at the end (order and each stream's seqs kept); a reused id's
    new run does not replace the old run's partial; the event past the limit
    is refused, and every one after it."""

    def cap(stream: str, segment: int, seq: int, final: bool = False) -> CaptionEvent:
        return CaptionEvent(**{**CAPTION.__dict__, "stream": stream, "segment": segment,
                               "seq": seq, "final": final})

    window = ResumeWindow(5)
    for event in (cap("a", 0, 1), cap("b", 0, 1), cap("a", 0, 2), StreamEnded("b", 1.0, 1, 1),
                  StreamStarted("b", "b"), cap("b", 0, 3), cap("a", 0, 3, final=True)):
        assert window.add(event, encode_event(event))
    assert [(m["type"], m.get("stream"), m.get("seq")) for m in map(
        json.loads, window.messages())] == [
        ("caption", "b", 1), ("stream.ended", "b", None), ("stream.started", "b", None),
        ("caption", "b", 3), ("caption", "a", 3)]
    # Full: a partial replacing another still fits, a new event does not.
    assert window.add(cap("b", 0, 4), "b4") and len(window) == 5
    assert not window.add(cap("a", 1, 4), "a4") and window.full
    assert not window.add(cap("b", 0, 5), "b5")
    assert window.messages()[-1] == "b4"
