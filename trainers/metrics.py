"""Exact match and token F1 between a generated answer and its reference.

Normalisation follows the SQuAD v1.1 evaluation script: lower-case, drop punctuation, drop the
articles "a", "an" and "the", fold whitespace. Two additions make it right for Chinese, Japanese
and Korean text, which has no spaces between words (as CMRC 2018's evaluation does):
- every CJK character is a token of its own;
- punctuation means every Unicode punctuation character (category P*), so "，" and "。" go too.
A whitespace split would otherwise make a whole Chinese sentence one token, and F1 all or nothing.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# CJK unified ideographs (+ extension A, compatibility), kana, Hangul syllables: one token each
_CJK = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af])")


def normalize(text: str) -> str:
    """SQuAD's normalisation with Unicode punctuation: 'The Cat, sat!' -> 'cat sat'."""
    text = text.lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """The normalised answer as tokens: words split on whitespace, CJK characters one by one."""
    return _CJK.sub(r" \1 ", normalize(text)).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised token sequences are equal (so '北京 大学' matches '北京大学')."""
    return float(answer_tokens(prediction) == answer_tokens(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over the multiset of shared tokens; two empty
    answers agree (1.0), an empty one against a non-empty one scores 0.0."""
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_references(metric, prediction: str, references: list[str]) -> float:
    """SQuAD's rule for several acceptable answers: the best score against any of them."""
    return max(metric(prediction, reference) for reference in references)
