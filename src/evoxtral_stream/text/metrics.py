"""Evaluation metrics as the Evoxtral authors compute them, and two
normalisations (whitespace, NFC) that leave their scripts' scores as they are.

Per sample (prediction against reference):

- Tags: every ``[...]`` (regex ``\\[([^\\]]+)\\]``), its whole content lower
  cased, so ``[laughs nervously]`` does not match ``[laughs]``. Precision,
  recall and F1 by multiset intersection. No tags on either side: 1, 1, 1;
  predicted tags but none in the reference: P 0, R 1, F1 0; reference tags
  but none predicted: P 1, R 0, F1 0.
- Tag hallucination rate: the share of predicted tags whose name does not
  occur in the reference (0 when nothing was predicted).
- WER: tags removed with ``\\[[^\\]]+\\]\\s*``, words in CAPS
  (``\\b[A-Z]{2,}\\b``) lower cased, ends stripped, then jiwer's WER with no
  other normalisation (punctuation and case count). 0 when the reference
  is empty after stripping. One addition: every run of whitespace (a
  newline, a tab, a no-break space) becomes one space, because jiwer splits
  words at spaces only (``"Hello\\nworld"`` would be one word). The authors'
  scripts are single-spaced, so their scores are the same.
- CER (not the authors'; Chinese and Japanese, written without spaces, are
  one word to WER): WER's text (tags out, CAPS lower cased, case and
  punctuation counting) with its whitespace removed, so a space is no
  character and one put in or left out costs nothing, in any script.
  Characters are the code points of the NFC text; character edits
  (Levenshtein, jiwer's) over reference characters. 0 when the reference
  has no characters, as for WER.
- Emphasis: the CAPS words (``\\b[A-Z]{2,}\\b``) lower cased, multiset
  precision/recall/F1 with the same edge cases as tags.
- Every score reads the text in Unicode NFC, so canonically equal text
  (``é`` as one character or as ``e`` and U+0301) is equal. The authors'
  scripts are NFC, so their scores are the same.

The report averages every per-sample score over the samples (the authors'
numbers); it adds the corpus WER (all word errors over all reference words,
samples with an empty stripped reference left out) and the corpus CER (all
character edits over all reference characters, the same samples left out).

Pure functions; jiwer (the ``eval`` extra) is imported when WER or CER is
computed.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..extras import extra_hint

__all__ = [
    "PRF",
    "Comparison",
    "EvalReport",
    "SampleScore",
    "compare",
    "emphasis_prf",
    "evaluate",
    "extract_emphasis",
    "extract_tags",
    "format_comparison",
    "format_table",
    "score_sample",
    "strip_for_cer",
    "strip_for_wer",
    "tag_hallucination_rate",
    "tag_prf",
    "utterance_cer",
    "utterance_wer",
]

_TAG = re.compile(r"\[([^\]]+)\]")
_TAG_STRIP = re.compile(r"\[[^\]]+\]\s*")
_CAPS = re.compile(r"\b[A-Z]{2,}\b")


def _nfc(text: str) -> str:
    # An NFD "CAFE\u0301" would also match _CAPS as "CAFE": a combining mark
    # is not a word character, so \b falls before it.
    return unicodedata.normalize("NFC", text)


def extract_tags(text: str) -> list[str]:
    """Tag names as the seed reads them: bracket content, lower cased."""
    return [m.group(1).lower() for m in _TAG.finditer(_nfc(text))]


def extract_emphasis(text: str) -> list[str]:
    """CAPS-emphasised words, lower cased."""
    return [m.group(0).lower() for m in _CAPS.finditer(_nfc(text))]


def strip_for_wer(text: str) -> str:
    """The text WER is computed on: tags removed, CAPS words lower cased,
    words separated by single spaces (jiwer's only word separator)."""
    text = _TAG_STRIP.sub("", _nfc(text))
    text = _CAPS.sub(lambda m: m.group(0).lower(), text)
    return " ".join(text.split())


def strip_for_cer(text: str) -> str:
    """The text CER is computed on: WER's text (:func:`strip_for_wer`) with
    no whitespace; each code point left is a character."""
    return _unspaced(strip_for_wer(text))


def _unspaced(text: str) -> str:
    return "".join(text.split())


@dataclass(frozen=True)
class PRF:
    precision: float
    recall: float
    f1: float


def _multiset_prf(pred: Sequence[str], ref: Sequence[str]) -> PRF:
    p, r = Counter(pred), Counter(ref)
    if not r and not p:
        return PRF(1.0, 1.0, 1.0)
    if not r:
        return PRF(0.0, 1.0, 0.0)
    if not p:
        return PRF(1.0, 0.0, 0.0)
    common = sum((p & r).values())
    precision = common / sum(p.values())
    recall = common / sum(r.values())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return PRF(precision, recall, f1)


def tag_prf(prediction: str, reference: str) -> PRF:
    return _multiset_prf(extract_tags(prediction), extract_tags(reference))


def emphasis_prf(prediction: str, reference: str) -> PRF:
    return _multiset_prf(extract_emphasis(prediction), extract_emphasis(reference))


def tag_hallucination_rate(prediction: str, reference: str) -> float:
    pred = extract_tags(prediction)
    if not pred:
        return 0.0
    ref = set(extract_tags(reference))
    return sum(1 for t in pred if t not in ref) / len(pred)


def _jiwer() -> Any:
    try:
        import jiwer
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise RuntimeError(
            f"WER and CER need jiwer: install the eval extra ({extra_hint('eval')})"
        ) from None
    return jiwer


def utterance_wer(prediction: str, reference: str) -> float:
    """The seed's WER of one utterance (0 when the stripped reference is empty)."""
    ref = strip_for_wer(reference)
    if not ref.strip():
        return 0.0
    return float(_jiwer().wer(ref, strip_for_wer(prediction)))


def utterance_cer(prediction: str, reference: str) -> float:
    """Character edits over reference characters, whitespace not counted
    (0 when the reference has no characters, as :func:`utterance_wer`)."""
    ref = strip_for_cer(reference)
    if not ref:
        return 0.0
    return float(_jiwer().cer(ref, strip_for_cer(prediction)))


@dataclass(frozen=True)
class SampleScore:
    """The scores of one (reference, prediction) pair."""

    reference: str
    prediction: str
    wer: float
    cer: float
    tags: PRF
    tag_hallucination_rate: float
    emphasis: PRF

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "prediction": self.prediction,
            "wer": self.wer,
            "cer": self.cer,
            "tag_precision": self.tags.precision,
            "tag_recall": self.tags.recall,
            "tag_f1": self.tags.f1,
            "tag_hallucination_rate": self.tag_hallucination_rate,
            "emphasis_precision": self.emphasis.precision,
            "emphasis_recall": self.emphasis.recall,
            "emphasis_f1": self.emphasis.f1,
        }


def score_sample(reference: str, prediction: str) -> SampleScore:
    return SampleScore(
        reference=reference,
        prediction=prediction,
        wer=utterance_wer(prediction, reference),
        cer=utterance_cer(prediction, reference),
        tags=tag_prf(prediction, reference),
        tag_hallucination_rate=tag_hallucination_rate(prediction, reference),
        emphasis=emphasis_prf(prediction, reference),
    )


#: Report fields in table order, with their labels.
_METRICS: tuple[tuple[str, str], ...] = (
    ("wer", "WER (mean per utterance)"),
    ("corpus_wer", "WER (corpus)"),
    ("cer", "CER (mean per utterance)"),
    ("corpus_cer", "CER (corpus)"),
    ("tag_precision", "Tag precision"),
    ("tag_recall", "Tag recall"),
    ("tag_f1", "Tag F1"),
    ("tag_hallucination_rate", "Tag hallucination rate"),
    ("emphasis_precision", "Emphasis precision"),
    ("emphasis_recall", "Emphasis recall"),
    ("emphasis_f1", "Emphasis F1"),
)
# Metrics where lower is better (the sign of a difference reads the other way).
_LOWER_IS_BETTER = frozenset({"wer", "corpus_wer", "cer", "corpus_cer",
                              "tag_hallucination_rate"})


@dataclass(frozen=True)
class EvalReport:
    """Averages over samples (the seed's way) plus the corpus WER and CER."""

    n: int
    wer: float
    corpus_wer: float
    cer: float
    corpus_cer: float
    tag_precision: float
    tag_recall: float
    tag_f1: float
    tag_hallucination_rate: float
    emphasis_precision: float
    emphasis_recall: float
    emphasis_f1: float
    samples: tuple[SampleScore, ...] = ()

    def metrics(self) -> dict[str, float]:
        return {key: float(getattr(self, key)) for key, _ in _METRICS}

    def to_dict(self, *, samples: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "metrics": self.metrics()}
        if samples:
            out["samples"] = [s.to_dict() for s in self.samples]
        return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def evaluate(pairs: Sequence[tuple[str, str]]) -> EvalReport:
    """Score ``(reference, prediction)`` pairs of tagged text."""
    samples = tuple(score_sample(ref, pred) for ref, pred in pairs)
    refs: list[str] = []
    hyps: list[str] = []
    for s in samples:
        ref = strip_for_wer(s.reference)
        if ref.strip():
            refs.append(ref)
            hyps.append(strip_for_wer(s.prediction))
    if refs:
        # The same samples for both: a reference with words has characters,
        # and one with characters has words (only whitespace is dropped).
        jiwer = _jiwer()
        corpus_wer = float(jiwer.wer(refs, hyps))
        corpus_cer = float(jiwer.cer([_unspaced(r) for r in refs],
                                     [_unspaced(h) for h in hyps]))
    else:
        corpus_wer = corpus_cer = 0.0
    return EvalReport(
        n=len(samples),
        wer=_mean([s.wer for s in samples]),
        corpus_wer=corpus_wer,
        cer=_mean([s.cer for s in samples]),
        corpus_cer=corpus_cer,
        tag_precision=_mean([s.tags.precision for s in samples]),
        tag_recall=_mean([s.tags.recall for s in samples]),
        tag_f1=_mean([s.tags.f1 for s in samples]),
        tag_hallucination_rate=_mean([s.tag_hallucination_rate for s in samples]),
        emphasis_precision=_mean([s.emphasis.precision for s in samples]),
        emphasis_recall=_mean([s.emphasis.recall for s in samples]),
        emphasis_f1=_mean([s.emphasis.f1 for s in samples]),
        samples=samples,
    )


@dataclass(frozen=True)
class Comparison:
    """The same samples decoded whole (offline) and through the streaming
    pipeline; ``delta`` is streaming minus offline (the merger's cost shows
    as a higher WER or a lower F1)."""

    offline: EvalReport
    streaming: EvalReport

    def delta(self) -> dict[str, float]:
        off, on = self.offline.metrics(), self.streaming.metrics()
        return {key: on[key] - off[key] for key in off}

    def to_dict(self, *, samples: bool = True) -> dict[str, Any]:
        return {
            "offline": self.offline.to_dict(samples=samples),
            "streaming": self.streaming.to_dict(samples=samples),
            "delta": self.delta(),
        }


def compare(offline: EvalReport, streaming: EvalReport) -> Comparison:
    if offline.n != streaming.n:
        raise ValueError(f"the reports cover different samples ({offline.n} offline, "
                         f"{streaming.n} streaming)")
    return Comparison(offline, streaming)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)]) + "\n"


def format_table(report: EvalReport, *, title: str = "value") -> str:
    """A terminal table of a report's metrics."""
    m = report.metrics()
    rows = [[label, f"{m[key]:.4f}"] for key, label in _METRICS]
    rows.append(["Samples", str(report.n)])
    return _table(["Metric", title], rows)


def format_comparison(comparison: Comparison | Mapping[str, EvalReport]) -> str:
    """Offline and streaming side by side, with the difference (streaming -
    offline; ``*`` marks a difference that is a loss)."""
    if not isinstance(comparison, Comparison):
        comparison = compare(comparison["offline"], comparison["streaming"])
    off, on = comparison.offline.metrics(), comparison.streaming.metrics()
    delta = comparison.delta()
    rows = []
    for key, label in _METRICS:
        d = delta[key]
        worse = d > 1e-12 if key in _LOWER_IS_BETTER else d < -1e-12
        rows.append([label, f"{off[key]:.4f}", f"{on[key]:.4f}",
                     f"{d:+.4f}" + ("*" if worse else " ")])
    rows.append(["Samples", str(comparison.offline.n), str(comparison.streaming.n), ""])
    return _table(["Metric", "offline", "streaming", "streaming - offline"], rows)
