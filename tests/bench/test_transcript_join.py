"""bench/transcript_join.py: the reference and the library's join agree, and the table prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evoxtral_stream.text.tags import join_texts
from tests.helpers.bench import load_bench

transcript_join = load_bench("transcript_join")


@pytest.mark.parametrize("texts", [
    ["你好。", "[laughs]", "[sighs]", "我很好。"],
    ["Hi.", "[laughs]", "", "[sighs] [cough]", "There."],
    ["[laughs]", " ", "[sighs]", "你好", "[music]", "Hi"],
])
def test_the_reference_joins_as_join_texts_does(texts: list[str]) -> None:
    assert transcript_join.reference_join(texts) == join_texts(texts)


def test_the_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.json"
    assert transcript_join.main(["--runs", "3,30", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 30 |" in printed
    rows = json.loads(out.read_text())
    assert [r["tag_only_finals"] for r in rows] == [3, 30]
