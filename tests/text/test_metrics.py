"""The seed's metrics on hand-computed examples."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

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
    score_sample,
    strip_for_cer,
    strip_for_wer,
    tag_hallucination_rate,
    tag_prf,
    utterance_cer,
    utterance_wer,
)
from tests.speech import have_espeak, speak
from tests.text.samples import SCRIPTS


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


def test_cer_on_hand_computed_examples() -> None:
    """Character edits over reference characters, on WER's text (tags out,
    CAPS lower cased, case and punctuation counting) without its whitespace."""
    # Latin: "Helloworld" (10) against "Helloword": one deletion.
    assert utterance_cer("Hello word", "Hello world") == pytest.approx(1 / 10)
    # Case counts, as for WER: "hello" against "Hello", one substitution.
    assert utterance_cer("hello", "Hello") == pytest.approx(1 / 5)
    # Spaces do not count: a space lost is no error (WER: 2 edits of 2 words).
    assert utterance_cer("Helloworld", "Hello world") == 0.0
    assert utterance_wer("Helloworld", "Hello world") == 1.0
    # Chinese: 你好。我很好。 is 7 characters; the last 。 deleted.
    assert utterance_cer("你好。我很好", "你好。我很好。") == pytest.approx(1 / 7)
    # 我很好 read as 我很高兴 (one substitution, one insertion).
    assert utterance_cer("你好。我很高兴。", "你好。我很好。") == pytest.approx(2 / 7)
    # One "word" to WER, substituted and another inserted: WER 2.0; CER 0.
    assert utterance_cer("你好。 我很好。", "你好。我很好。") == 0.0
    assert utterance_wer("你好。 我很好。", "你好。我很好。") == 2.0
    # Japanese, kanji and kana mixed: 今日は良い天気ですね。 (11); 良 as い
    # (kana for the kanji) and 。 dropped.
    assert utterance_cer("今日はいい天気ですね", "今日は良い天気ですね。") == pytest.approx(2 / 11)
    assert utterance_wer("今日はいい天気ですね", "今日は良い天気ですね。") == 1.0


def test_cer_ignores_tags_and_scores_empty_references_as_wer_does() -> None:
    assert strip_for_cer("[excited] Can you BELIEVE it? [laughs]") == "Canyoubelieveit?"
    assert strip_for_cer("你好。\u3000[laughs] 我很好。\n") == "你好。我很好。"
    assert utterance_cer("Can you believe it?", "[excited] Can you BELIEVE it?") == 0.0
    assert utterance_cer("[laughs] hi [sighs]", "hi") == 0.0
    assert utterance_cer("hi", "[laughs] hi [gasps]") == 0.0
    # Nothing to score against: 0, as WER (and left out of the corpus CER).
    assert utterance_cer("anything", "[laughs]") == utterance_wer("anything", "[laughs]") == 0.0
    assert utterance_cer("", "") == 0.0
    # Nothing said: every reference character deleted.
    assert utterance_cer("", "two words") == 1.0
    assert utterance_cer("[laughs]", "两个字") == 1.0
    # More said than the reference: above 1, as WER can be.
    assert utterance_cer("abcd", "a") == 3.0


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
    # "HelloWORLD." (11) against "helloworld.": one edit ("world" is CAPS
    # lower cased in both); "IamHERE" against "Iamhere": none.
    assert r.cer == pytest.approx((1 / 11 + 0 + 0) / 3)
    assert r.corpus_cer == pytest.approx(1 / (11 + 7))
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
    assert d["samples"][0]["cer"] == pytest.approx(1 / 11)
    # CER next to WER; the fields before it in their order.
    assert list(d["metrics"]) == [
        "wer", "corpus_wer", "cer", "corpus_cer", "tag_precision", "tag_recall", "tag_f1",
        "tag_hallucination_rate", "emphasis_precision", "emphasis_recall", "emphasis_f1"]
    assert list(d["samples"][0])[:4] == ["reference", "prediction", "wer", "cer"]
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
    # "Hellothere." (11) against "Hellotherethere.": 5 insertions, a loss.
    assert cmp.delta()["cer"] == pytest.approx(5 / 11)
    rows = [line.split("  ")[0] for line in table.splitlines()[2:]]
    assert rows[:4] == ["WER (mean per utterance)", "WER (corpus)", "CER (mean per utterance)",
                        "CER (corpus)"]
    cer_line = next(line for line in table.splitlines() if line.startswith("CER (corpus)"))
    assert cer_line.endswith(f"{5 / 11:+.4f}*")
    assert "Tag F1" in format_table(offline)
    assert "CER (corpus)" in format_table(offline)
    json.dumps(cmp.to_dict())
    with pytest.raises(ValueError, match="different samples"):
        compare(offline, evaluate([]))


def test_empty_evaluation() -> None:
    r = evaluate([])
    assert (r.n, r.wer, r.corpus_wer, r.cer, r.corpus_cer) == (0, 0.0, 0.0, 0.0, 0.0)


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
    # Read as a caption (as eval scores it), this is nothing: controls and
    # invisible format characters are dropped.
    ('{"audio": "a.wav", "text": "\\u200e\\u00ad\\u001b"}\n', 'line 1: "text" is empty'),
    ("\n\n", "no entries"),
    # JSON escapes a lone surrogate, which is no text: eval used to decode the
    # whole manifest, then die writing the --json report (UnicodeEncodeError).
    ('{"audio": "a.wav", "text": "hi \\ud800"}\n', 'line 1: "text" holds .*ud800'),
    # Nested past what Python's json reads: RecursionError, not ValueError.
    ("[" * 100_000 + "]" * 100_000 + "\n", "line 1: not valid JSON"),
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


def test_the_offline_pass_joins_chinese_windows_without_a_space() -> None:
    """A file longer than a window is decoded in 30 s windows, their texts
    joined: with a space, Chinese read "你好。 你好。", two words for WER
    where the reference, written without spaces, has one."""
    import numpy as np

    from evoxtral_stream.evaluation import offline_predictions
    from tests.fakes import ScriptedBackend

    two_windows = np.zeros(16_000 * 30 * 2, np.int16)
    texts, _ = offline_predictions(ScriptedBackend(lambda a: "你好。"), [two_windows])
    assert texts == ["你好。你好。"]
    latin, _ = offline_predictions(ScriptedBackend(lambda a: "Hello."), [two_windows])
    assert latin == ["Hello. Hello."]


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
async def test_streaming_eval_joins_chinese_finals_as_chinese_is_written() -> None:
    """Two sentences, two finals: eval joined them with a space, so a
    Chinese transcript equal to its reference scored WER 2.0 (one word
    substituted, one inserted), not 0."""
    import numpy as np

    from evoxtral_stream.config import load_config
    from evoxtral_stream.evaluation import streaming_predictions
    from tests.fakes import ScriptedBackend
    from tests.speech import speech_with_pauses

    loud, spans = speech_with_pauses(["Good evening.", "Thank you."], pause_s=1.5)
    audio = loud.copy()
    start, end = spans[1]
    audio[start:end] //= 4  # the second sentence, quieter: its own text
    backend = ScriptedBackend(
        lambda a: "你好。" if np.abs(a).max() > 0.4 else "我很好。")
    cfg = load_config(env={})
    (text,), failed = await streaming_predictions(cfg, backend, [audio])
    assert failed == []
    assert text == "你好。我很好。"
    assert utterance_wer(text, "你好。我很好。") == 0.0


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


def _word_edits(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance of words (or of the characters of a string),
    written out here so WER and CER are checked against a count that does
    not come from jiwer."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


# Words, tags, CAPS and punctuation, joined by any whitespace: a reference
# typed in an editor can hold newlines, tabs or no-break spaces between words.
_WORDS = st.sampled_from(["Hello", "hello", "WORLD", "world", "it?", "don't", "—", "[laughs]",
                          "[clears throat]", "[Pause]", "OK", "café", "x"])
_SPACES = [" ", "  ", "\n", "\t", "\r\n", "\u00a0", "\u2009", "\u3000"]
_SPACE = st.sampled_from(_SPACES)
_TEXT = st.lists(st.tuples(_SPACE, _WORDS), max_size=8).map(
    lambda pieces: "".join(s + w for s, w in pieces))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_TEXT, _TEXT), max_size=5))
@example([("Hello\nworld", "Hello world")])
def test_wer_counts_words_between_any_whitespace(pairs: list[tuple[str, str]]) -> None:
    """A word is what whitespace separates, as for any WER. jiwer splits at
    spaces only: "Hello\\nworld" was one reference word, so the transcript
    "Hello world" scored WER 2.0 (a substitution and an insertion). The
    utterance WER is word edits over reference words, and the corpus WER all
    edits over all reference words (references without words left out)."""
    edits = words = 0
    for ref, hyp in pairs:
        r, h = strip_for_wer(ref).split(), strip_for_wer(hyp).split()
        wer = utterance_wer(hyp, ref)
        if r:
            assert wer == pytest.approx(_word_edits(r, h) / len(r))
            edits, words = edits + _word_edits(r, h), words + len(r)
        else:
            assert wer == 0.0
    assert evaluate(pairs).corpus_wer == pytest.approx(edits / words if words else 0.0)


# The same, with Chinese and Japanese runs written without spaces.
_CJK_TEXT = st.lists(st.tuples(st.sampled_from(["", *_SPACES]),
                               st.sampled_from(["你好", "。", "今日は", "良い", "いい", "天気",
                                                "[laughs]", "Hello", "hello", "OK", "。Hi"])),
                     max_size=8).map(lambda pieces: "".join(s + w for s, w in pieces))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.one_of(_TEXT, _CJK_TEXT), st.one_of(_TEXT, _CJK_TEXT)),
                max_size=5))
@example([("你好。我很好。", "你好。 我很好。"), ("Hello\nworld", "Helloworld")])
def test_cer_is_character_edits_over_reference_characters(
        pairs: list[tuple[str, str]]) -> None:
    """The utterance CER is character edits (whitespace not counted) over
    reference characters: 0 exactly when the two texts are equal but for
    whitespace (a space put in or left out costs nothing), at least the
    length difference and at most the longer length over the reference's.
    The corpus CER is all edits over all
    reference characters, from the samples whose reference the WER counts."""
    edits = chars = 0
    for ref, hyp in pairs:
        r, h = strip_for_cer(ref), strip_for_cer(hyp)
        assert r == "".join(strip_for_wer(ref).split())
        assert not any(c.isspace() for c in r + h)
        cer = utterance_cer(hyp, ref)
        if r:
            assert cer == pytest.approx(_word_edits(r, h) / len(r))
            assert (cer == 0.0) == (r == h)
            assert abs(len(h) - len(r)) / len(r) - 1e-9 <= cer <= max(len(r), len(h)) / len(r)
            edits, chars = edits + _word_edits(r, h), chars + len(r)
        else:
            assert not strip_for_wer(ref)  # the samples the corpus WER leaves out
            assert cer == 0.0
        # Other whitespace, and a space between every two CJK characters
        # (other words to WER): the same characters.
        spaced = re.sub(r"(?<=[\u3000-\u9fff])(?=[\u3000-\u9fff])", " ",
                        re.sub(r"\s+", "\n", ref))
        assert utterance_cer(spaced, ref) == utterance_cer(ref, spaced) == 0.0
    assert evaluate(pairs).corpus_cer == pytest.approx(edits / chars if chars else 0.0)


def test_wer_text_of_single_spaced_scripts_is_the_seeds() -> None:
    """The authors' scripts are single-spaced: on them the WER text is the
    seed's formula, so the scores match the authors' numbers."""
    def seed(text: str) -> str:
        text = re.sub(r"\[[^\]]+\]\s*", "", text)
        return re.sub(r"\b[A-Z]{2,}\b", lambda m: m.group(0).lower(), text).strip()

    for script in SCRIPTS:
        assert strip_for_wer(script) == seed(script)


def test_canonically_equal_text_scores_as_equal() -> None:
    """"café" typed as e + U+0301 (macOS, some editors) is the same text as
    the precomposed é a model writes: it cost a word of WER, a tag and an
    emphasis word. Every score reads NFC; the authors' scripts are NFC."""
    nfd = unicodedata.normalize("NFD", "[Café] Un CAFÉ au lait, VRAIMENT.")
    nfc = unicodedata.normalize("NFC", nfd)
    assert nfd != nfc
    for ref, hyp in ((nfd, nfc), (nfc, nfd)):
        s = score_sample(ref, hyp)
        assert s.wer == s.cer == 0.0
        assert s.tags == s.emphasis == PRF(1.0, 1.0, 1.0)
        assert s.tag_hallucination_rate == 0.0
    assert extract_tags(nfd) == ["café"]
    # NFD "CAFE\u0301" matched as the CAPS word "cafe"; the seed's CAPS are
    # A-Z only, so "CAFÉ" is none.
    assert extract_emphasis(nfd) == ["vraiment"]
    assert all(unicodedata.is_normalized("NFC", s) for s in SCRIPTS)


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
def test_the_offline_text_is_scored_with_the_captions_tags() -> None:
    """A caption's tags are canonical ([LAUGHTER], (laughs), [Laughing] are
    [laughs]); the offline pass scored the model's raw text, so
    --compare-offline credited streaming with the tag F1 and WER of that
    normalisation, not of streaming. The same model text now scores the same
    both ways, and the files count as identical."""
    from evoxtral_stream.config import load_config
    from evoxtral_stream.evaluation import run_eval
    from evoxtral_stream.text.manifest import ManifestEntry
    from tests.fakes import ScriptedBackend

    said = "(laughs) Hello [LAUGHTER]  there, *sighs* how are you [Laughing]"
    ref = "[laughs] Hello [laughs] there, [sighs] how are you [laughs]"
    run = run_eval(load_config(), ScriptedBackend(lambda a: said),
                   [ManifestEntry(Path("hello.wav"), ref, 1)], [speak("Hello there, how are you")],
                   compare_offline=True)
    assert run.offline is not None and run.offline_texts is not None
    assert run.streaming_texts == run.offline_texts == (ref,)
    assert run.offline.metrics() == run.streaming.metrics()
    assert run.streaming.tag_f1 == 1.0 and run.streaming.wer == 0.0
    assert run.identical == 1


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
def test_a_model_that_says_the_reference_scores_perfectly_whatever_its_tag_spelling() -> None:
    """A reference written with [Laughing], (laughs) or *sighs* could never be
    matched: the captions always say [laughs] and [sighs], so a model saying
    the reference word for word scored tag F1 0 and WER above 0. The
    reference is read as a caption is; the seed's scripts are already in
    that form (see test_wer_text_of_single_spaced_scripts_is_the_seeds)."""
    from evoxtral_stream.config import load_config
    from evoxtral_stream.evaluation import run_eval
    from evoxtral_stream.text.manifest import ManifestEntry
    from evoxtral_stream.text.tags import normalize
    from tests.fakes import ScriptedBackend

    ref = "[Laughing] Hello  there, *sighs* how are you (laughs)"
    run = run_eval(load_config(), ScriptedBackend(lambda a: ref),
                   [ManifestEntry(Path("hello.wav"), ref, 1)], [speak("Hello there, how are you")],
                   compare_offline=True)
    assert run.offline is not None
    for report in (run.streaming, run.offline):
        assert report.metrics() == pytest.approx(
            {**{k: 1.0 for k in report.metrics()}, "wer": 0.0, "corpus_wer": 0.0,
             "cer": 0.0, "corpus_cer": 0.0, "tag_hallucination_rate": 0.0})
    assert run.references == (ref,)  # as the manifest says it
    assert all(normalize(s) == s for s in SCRIPTS)
