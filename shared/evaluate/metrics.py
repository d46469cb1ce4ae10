"""Answer quality scores on jieba word segmentation, as the ChatGLM3 tutorial reports them.

- Tokens: ``jieba.lcut`` (precise mode) of the text; whitespace tokens are dropped and Latin
  letters are lower-cased, so "Hello World" and "hello  world" score alike. Punctuation
  tokens are kept (the tutorial keeps them too).
- ROUGE-1, ROUGE-2, ROUGE-L: F1 ×100 from Google's ``rouge-score`` fed those tokens
  (ROUGE-L is the sentence-level longest common subsequence).
- BLEU-4: ×100, NLTK ``sentence_bleu`` with uniform 1–4-gram weights and smoothing
  ``method3`` (NIST geometric: a zero n-gram count k counts as 1/2^k), the tutorial's choice.
- An empty (or whitespace-only) answer scores 0 on every metric; an empty reference too.

Corpus figures are means of the per-question scores (the tutorial averages the same way), plus
the mean answer length in characters, the share of empty answers and the share of answers that
ended on their own (end-of-turn token) before the cap on new tokens.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from statistics import fmean
from typing import Sequence

# The names live with the config schema, which checks gate rules against them.
from shared.core.config import EXTRAS, METRICS

_ROUGE_KEYS = {"rouge-1": "rouge1", "rouge-2": "rouge2", "rouge-l": "rougeL"}


@lru_cache(maxsize=1)
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def tokenize(text: str) -> list[str]:
    """Words of ``text`` as the scores see them."""
    return [tok for tok in (t.strip().lower() for t in _jieba().lcut(text or "")) if tok]


class _Tokens:
    """rouge-score asks for an object with ``tokenize``; we hand it pre-split tokens joined by \\x00."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return text.split("\x00") if text else []


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(list(_ROUGE_KEYS.values()), tokenizer=_Tokens())


def _bleu4(hyp: list[str], ref: list[str]) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method3)


def score(prediction: str, reference: str) -> dict[str, float]:
    """Every metric of one answer against its reference, each 0–100."""
    hyp, ref = tokenize(prediction), tokenize(reference)
    if not hyp or not ref:
        return {name: 0.0 for name in METRICS}
    rouge = _rouge().score("\x00".join(ref), "\x00".join(hyp))
    out = {name: 100.0 * rouge[key].fmeasure for name, key in _ROUGE_KEYS.items()}
    out["bleu-4"] = 100.0 * _bleu4(hyp, ref)
    return out


def aggregate(per_example: Sequence[dict[str, float]], predictions: Sequence[str] | None = None) -> dict[str, float]:
    """Corpus figures: the mean of each per-question column (metrics, answer length, empty, ended)."""
    if predictions is not None and len(per_example) != len(predictions):
        raise ValueError(f"{len(per_example)} score rows for {len(predictions)} predictions")
    if not per_example:
        return {name: 0.0 for name in (*METRICS, *EXTRAS)}
    return {name: fmean(row[name] for row in per_example) for name in per_example[0]}


def evaluate(predictions: Sequence[str], references: Sequence[str],
             ended: Sequence[bool] | None = None) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(corpus figures, per-question rows) of aligned predictions and references.

    Each row holds every metric plus ``answer_chars``, ``empty_share`` (1 for an empty answer)
    and ``ended_share`` (1 when the answer ended with the end-of-turn token before the cap on
    new tokens; ``ended`` None counts every non-empty answer as ended), so the gate can pair
    any of them question by question."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if ended is not None and len(ended) != len(predictions):
        raise ValueError(f"{len(ended)} ended flags for {len(predictions)} predictions")
    rows = []
    for i, (p, r) in enumerate(zip(predictions, references)):
        row = score(p, r)
        row["answer_chars"] = float(len(p.strip()))
        row["empty_share"] = 0.0 if p.strip() else 1.0
        row["ended_share"] = float(ended[i]) if ended is not None else (1.0 if p.strip() else 0.0)
        rows.append(row)
    return aggregate(rows), rows
