"""Word error rate for recognition tests: lower case, no punctuation."""

from __future__ import annotations

import re

import jiwer

__all__ = ["loose_wer"]


def _norm(text: str) -> str:
    text = re.sub(r"\[[^\]]*\]|\([^)]*\)", " ", text.lower())
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text).split())


def loose_wer(reference: str, hypothesis: str) -> float:
    return float(jiwer.wer(_norm(reference), _norm(hypothesis)))
