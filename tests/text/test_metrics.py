"""The seed's metrics on hand-computed examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evoxtral_stream.text.manifest import ManifestError, parse_manifest, read_manifest
from evoxtral_stream.text.metrics import (
    PRF,
    compare,
    emphasis_prf,
    evaluate,
    extract_emphasis,
    extract_tags,
    format_comparison,
    format_table,
    strip_for_wer,
    tag_hallucination_rate,
    tag_prf,
    utterance_wer,
)


def approx(prf: PRF) -> tuple[float, float, float]:
    return (prf.precision, prf.recall, prf.f1)


def test_tags_are_whole_lower_cased_bracket_contents() -> None:
    assert extract_tags("[Laughs] a [laughs nervously] b [CLEARS THROAT] (sighs) *gasps*") == [
        "laughs", "laughs nervously", "clears throat"]


def test_tag_prf_edge_cases() -> None:
    assert tag_prf("no tags", "none here") == PRF(1.0, 1.0, 1.0)
    assert tag_prf("[laughs] hi", "hi") == PRF(0.0, 1.0, 0.0)
    assert tag_prf("hi", "[laughs] hi") == PRF(1.0, 0.0, 0.0)
    # [laughs nervously] is not [laughs].
    assert tag_prf("[laughs nervously] hi", "[laughs] hi") == PRF(0.0, 0.0, 0.0)


def test_tag_prf_is_a_multiset_intersection() -> None:
    # pred {laughs: 2, sighs: 1}, ref {laughs: 1, pause: 1}: 1 in common.
    got = tag_prf("[laughs] a [laughs] b [sighs]", "[LAUGHS] a [pause] b")
    assert approx(got) == pytest.approx((1 / 3, 1 / 2, 0.4))


def test_hallucination_rate() -> None:
    assert tag_hallucination_rate("[laughs] [gasps] a [gasps]", "[laughs] a") == (
        pytest.approx(2 / 3))
    assert tag_hallucination_rate("a", "[laughs] a") == 0.0
    # Counted by name: a second [laughs] is not a hallucination.
    assert tag_hallucination_rate("[laughs] [laughs]", "[laughs]") == 0.0


def test_wer_strips_tags_and_lowers_caps_only() -> None:
    assert strip_for_wer("[excited] Can you BELIEVE it? [laughs]") == "Can you believe it?"
    assert strip_for_wer("[laughs]Hello [sighs]  world") == "Hello world"
    assert utterance_wer("Can you believe it?", "[excited] Can you BELIEVE it?") == 0.0
    # Punctuation and case count: "it" != "it?", "can" != "Can".
    assert utterance_wer("can you believe it", "Can you BELIEVE it?") == pytest.approx(0.5)
    assert utterance_wer("anything", "[laughs]") == 0.0
    assert utterance_wer("", "two words") == 1.0


def test_emphasis() -> None:
    assert extract_emphasis("I am SO TIRED of HR's A-B rules, OK?") == ["so", "tired", "hr", "ok"]
    got = approx(emphasis_prf("I am so TIRED", "I am SO TIRED"))
    assert got == pytest.approx((1.0, 0.5, 2 / 3))
    assert emphasis_prf("plain", "plain") == PRF(1.0, 1.0, 1.0)
    assert emphasis_prf("LOUD", "quiet") == PRF(0.0, 1.0, 0.0)
    assert emphasis_prf("quiet", "LOUD") == PRF(1.0, 0.0, 0.0)


def test_evaluate_averages_per_sample_and_reports_corpus_wer() -> None:
    pairs = [
        # reference, prediction
        ("[laughs] Hello WORLD.", "[laughs] hello world."),  # WER 1/2
        ("[sighs] I am HERE [pause]", "I am here [gasps]"),  # WER 0
        ("[pause]", ""),  # empty reference: WER 0, left out of the corpus WER
    ]
    r = evaluate(pairs)
    assert r.n == 3
    assert r.wer == pytest.approx((0.5 + 0 + 0) / 3)
    assert r.corpus_wer == pytest.approx(1 / 5)
    # Tags: (1,1,1), (0,0,0), (P 1, R 0, F 0).
    assert (r.tag_precision, r.tag_recall, r.tag_f1) == pytest.approx((2 / 3, 1 / 3, 1 / 3))
    assert r.tag_hallucination_rate == pytest.approx(1 / 3)
    # Emphasis: ref {world} vs none; ref {here} vs none; neither side.
    assert (r.emphasis_precision, r.emphasis_recall, r.emphasis_f1) == pytest.approx(
        (1.0, 1 / 3, 1 / 3))
    d = r.to_dict()
    assert d["n"] == 3
    assert len(d["samples"]) == 3
    assert d["samples"][0]["wer"] == 0.5
    json.dumps(d)


def test_comparison_table_marks_losses() -> None:
    offline = evaluate([("[laughs] Hello there.", "[laughs] Hello there.")])
    streaming = evaluate([("[laughs] Hello there.", "Hello there there.")])
    cmp = compare(offline, streaming)
    assert cmp.delta()["wer"] == pytest.approx(0.5)
    assert cmp.delta()["tag_f1"] == pytest.approx(-1.0)
    table = format_comparison(cmp)
    assert "streaming - offline" in table
    wer_line = next(line for line in table.splitlines() if line.startswith("WER (mean"))
    assert wer_line.endswith("+0.5000*")
    assert "Tag F1" in format_table(offline)
    json.dumps(cmp.to_dict())
    with pytest.raises(ValueError, match="different samples"):
        compare(offline, evaluate([]))


def test_empty_evaluation() -> None:
    r = evaluate([])
    assert (r.n, r.wer, r.corpus_wer) == (0, 0.0, 0.0)


def test_manifest_parsing(tmp_path: Path) -> None:
    text = ('{"audio": "a.wav", "text": "[laughs] hi"}\n\n'
            '{"audio": "/abs/b.wav", "tagged_text": "there"}\n')
    entries = parse_manifest(text, base_dir=Path("/data"))
    assert [(str(e.audio), e.text, e.line) for e in entries] == [
        ("/data/a.wav", "[laughs] hi", 1), ("/abs/b.wav", "there", 3)]
    path = tmp_path / "m.jsonl"
    path.write_text(text, encoding="utf-8")
    assert read_manifest(path)[0].audio == tmp_path / "a.wav"
    path.write_text(text, encoding="utf-8-sig")  # with a BOM, as Windows editors save it
    assert [e.text for e in read_manifest(path)] == ["[laughs] hi", "there"]


@pytest.mark.parametrize(("text", "message"), [
    ("not json\n", "line 1: not valid JSON"),
    ('["a"]\n', "line 1: expected an object"),
    ('{"text": "x"}\n', '"audio" must be'),
    ('{"audio": "a.wav"}\n', '"text" must be'),
    ('{"audio": "a.wav", "text": " "}\n', 'line 1: "text" is empty'),
    ("\n\n", "no entries"),
    # JSON escapes a lone surrogate, which is no text: eval used to decode the
    # whole manifest, then die writing the --json report (UnicodeEncodeError).
    ('{"audio": "a.wav", "text": "hi \\ud800"}\n', 'line 1: "text" holds .*ud800'),
])
def test_manifest_errors(text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(text)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.jsonl")


def test_the_offline_pass_decodes_a_long_file_a_batch_of_windows_at_a_time() -> None:
    """eval --compare-offline sent all of a file's 30 s windows to the backend
    in one call (an hour: 120 windows' activations at once on a GPU), past
    worker.max_batch. The text is the same, made in calls of at most that."""
    import numpy as np

    from evoxtral_stream.evaluation import offline_predictions
    from tests.fakes import ScriptedBackend

    backend = ScriptedBackend()
    ten_windows = np.zeros(16_000 * 30 * 10 - 5, np.int16)
    texts, failed = offline_predictions(backend, [ten_windows], max_batch=3)
    assert [len(b) for b in backend.batches] == [3, 3, 3, 1]
    assert failed == []
    whole, _ = offline_predictions(ScriptedBackend(), [ten_windows], max_batch=10)
    assert texts == whole


def test_manifest_lines_are_split_at_newlines_only() -> None:
    """A JSON-lines manifest whose reference holds U+2028 (or U+0085, U+2029)
    raw, as json.dumps(..., ensure_ascii=False) writes it, is valid: str.splitlines
    cut the line in two ("not valid JSON")."""
    refs = ["one\u2028two", "three\x85four", "five"]
    text = "".join(json.dumps({"audio": f"{i}.wav", "text": r}, ensure_ascii=False) + "\n"
                   for i, r in enumerate(refs))
    entries = parse_manifest(text)
    assert [e.text for e in entries] == refs
    assert [e.line for e in entries] == [1, 2, 3]
