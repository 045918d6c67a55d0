"""Stream ids: what may name a stream, wherever it comes from."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest

from evoxtral_stream.cli.streams import _file_stream_id
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.engine.journal import file_name
from evoxtral_stream.events import MAX_STREAM_ID, stream_id_problem
from tests.fakes import ScriptedBackend


@pytest.mark.parametrize("good", ["mic", "studio-1", "salle 2", "x.00000001", "a/b#+",
                                  "é" * 33, "a" * MAX_STREAM_ID,
                                  # ZWNJ and ZWJ only join what is beside them.
                                  "\u0645\u06cc\u200c\u062e\u0648\u0627\u0645",
                                  "\U0001f469\u200d\U0001f4bb"])
def test_usable_ids(good: str) -> None:
    assert stream_id_problem(good) is None
    # The longest journal file name such an id gets stays within 255 bytes.
    assert len(file_name(good, 99_999_999, 253_402_300_799.999).encode()) <= 255


@pytest.mark.parametrize(("bad", "why"), [
    ("", "a stream id has 1 to 128 characters, got 0"),
    ("a" * 129, "a stream id has 1 to 128 characters, got 129"),
    ("tab\there", "a stream id holds no control characters"),
    ("del\x7f", "a stream id holds no control characters"),
    ("c1\x85", "a stream id holds no control characters"),
    # Shown reordered ("studio-1" then "evil" backwards), or the same as
    # another id while being a different one.
    ("studio\u202e1-live", "a stream id holds no invisible format characters (bidi "
                            "controls, zero-width spaces...), got 'studio\\u202e1-live'"),
    ("talk\u200b", "a stream id holds no invisible format characters"),
    ("\ufeffmic", "a stream id holds no invisible format characters"),
    ("soft\u00adhyphen", "a stream id holds no invisible format characters"),
    ("tag\U000e0041", "a stream id holds no invisible format characters"),
    ("a,b", "a stream id holds no comma (stream lists are comma-separated), got 'a,b'"),
    # A list's item is trimmed: " talk" would be subscribed to or resumed as "talk".
    (" talk", "a stream id neither begins nor ends with white space (stream lists trim it)"),
    ("talk\u3000", "a stream id neither begins nor ends with white space"),
    ("\u00a0", "a stream id neither begins nor ends with white space"),
    ("é" * 34, "a stream id is at most 200 bytes percent-encoded"),
    ("/" * 67, "a stream id is at most 200 bytes percent-encoded"),
    # Half a surrogate pair: a file name's byte that is no UTF-8, or JSON's
    # "\ud800". It used to raise UnicodeEncodeError instead of saying so.
    ("caf\udce9", "a stream id is text: it holds no lone surrogate"),
])
def test_unusable_ids_say_why_in_one_line(bad: str, why: str) -> None:
    problem = stream_id_problem(bad)
    assert problem is not None and problem.startswith(why) and "\n" not in problem


async def test_open_stream_refuses_an_unusable_id() -> None:
    async with Engine(load_config(), ScriptedBackend()) as engine:
        with pytest.raises(ValueError, match="no control characters"):
            engine.open_stream("a\nb")
        with pytest.raises(ValueError, match="no invisible format characters"):
            engine.open_stream("a\u2066b")
        assert engine.streams == {}


async def test_a_journaled_id_of_an_older_version_is_restored_but_not_opened_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older version took ids with invisible format characters, and its
    journal names their files. The restart does not fail on them: the finals
    stay resumable and the seq is kept, but the id names no new stream."""
    from evoxtral_stream.engine import engine as engine_module
    from evoxtral_stream.server.broadcast import Broadcaster
    from evoxtral_stream.server.protocol import encode_event
    from tests.engine.test_journal import config, run_stream

    old = "studio\u202e1-live"
    cfg = config(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(engine_module, "stream_id_problem", lambda _: None)  # the older rule
        async with Engine(cfg, ScriptedBackend()) as engine:
            await run_stream(engine, old, 2)
    assert [f.name.split(".")[0] for f in (tmp_path / "j").glob("*.jsonl")] == [
        quote(old, safe="")]
    async with Engine(cfg, ScriptedBackend()) as engine:
        assert engine.journal is not None
        assert engine.last_seq(old) >= 2
        b = Broadcaster(16, encode_event, history=100, source=engine.journal)
        replay = [json.loads(m) for m in b.subscribe([old], since={old: 0}).backlog]
        assert [(m["type"], m["stream"]) for m in replay] == [
            ("caption", old), ("caption", old), ("stream.ended", old)]
        with pytest.raises(ValueError, match="no invisible format characters"):
            engine.open_stream(old)
        assert engine.streams == {}
        await run_stream(engine, "mic", 1)  # the engine serves others


def test_file_names_give_usable_ids() -> None:
    for name in ("talk.wav", "x" * 300 + ".wav", "tab\tname.flac", "é" * 200 + ".wav", ".wav",
                 "take 1, take 2.wav", "caf\udce9.wav", " talk .wav", "\u3000.wav",
                 "a" * 120 + " b.wav", "rtl\u202egnp.wav"):
        sid = _file_stream_id(Path("/audio") / name)
        assert stream_id_problem(sid) is None, sid
        assert stream_id_problem(sid + "-99") is None, sid  # room for a -N suffix
    assert _file_stream_id(Path("talk.wav")) == "talk"
    assert _file_stream_id(Path("take 1, take 2.wav")) == "take 1_ take 2"
    assert _file_stream_id(Path(" talk .wav")) == "talk"
    assert _file_stream_id(Path("tab\tname.flac")) == "tab_name"
    assert _file_stream_id(Path("rtl\u202egnp.wav")) == "rtl_gnp"
    assert len(quote(_file_stream_id(Path("é" * 200 + ".wav")), safe="")) <= 200
