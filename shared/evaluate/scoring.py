"""Scores of every model's answers, per question and per set, and the predictions file that shows them side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from shared.evaluate.answering import Question
from shared.evaluate.answers import Row
from shared.evaluate.metrics import aggregate
from shared.evaluate.metrics import evaluate as score_all

# metrics.json and predictions.jsonl name the candidate "tuned", as they did before production joined.
LABEL = {"base": "base", "candidate": "tuned", "production": "production"}


def user_question(turns: list[dict[str, str]]) -> str:
    return next(t["content"] for t in reversed(turns) if t["role"] == "user")


def score(questions: Sequence[Question], rows: dict[str, list[Row]]) -> tuple[dict[str, Any], dict[str, list[dict[str, float]]]]:
    """(metrics.json's score blocks: the test split at the top level, the golden set under "golden"; the
    per-question rows of every model, in question order)."""
    refs = [q.reference for q in questions]
    scored = {role: score_all([r.text for r in per], refs, [r.ended for r in per])[1] for role, per in rows.items()}
    metrics: dict[str, Any] = {}
    for name in ("test", "golden"):
        chosen = [i for i, q in enumerate(questions) if q.set == name]
        if not chosen:
            continue
        block: dict[str, Any] = {LABEL[role]: aggregate([per[i] for i in chosen]) for role, per in scored.items()}
        block.setdefault("production", None)
        block["delta"] = delta(block["tuned"], block["base"])
        block["delta_vs_production"] = delta(block["tuned"], block["production"])
        if name == "test":
            metrics.update(block)
        else:
            metrics["golden"] = block
    return metrics, scored


def delta(a: dict[str, float], b: dict[str, float] | None) -> dict[str, float] | None:
    return None if b is None else {k: a[k] - b[k] for k in a}


def write_predictions(path: Path, questions: Sequence[Question], rows: dict[str, list[Row]],
                      scored: dict[str, list[dict[str, float]]]) -> None:
    """One row per question (the test split first, then the golden set): the answers side by side, whether each
    ended on its own, each model's scores, and the prompt as the parity check needs it."""
    with open(path, "w", encoding="utf-8") as fh:
        for i, q in enumerate(questions):
            row = {"set": q.set, "id": q.id, "question": user_question(q.turns), "prompt": q.turns, "reference": q.reference,
                   "prompt_key": q.key, "prompt_truncated": q.truncated,
                   **{LABEL[role]: per[i].text for role, per in rows.items()},
                   "ended": {LABEL[role]: per[i].ended for role, per in rows.items()},
                   "scores": {LABEL[role]: per[i] for role, per in scored.items()}}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
