"""The quality gate: rules on per-question scores, decided with confidence.

Each rule of ``evaluation.gate.rules`` is one of:

- ``min`` / ``max``: a bound on the candidate's mean score (e.g. at most 20 % empty answers);
- a comparison (``test``): the paired per-question differences candidate - ``compare`` (the
  base model, or the PROMOTED production model) and their bootstrap interval at
  ``evaluation.gate.confidence`` (shared/evaluate/confidence.py). ``superiority`` passes when
  the lower bound is above ``margin`` (default 0), ``non_inferiority`` when it is above
  ``-margin``; an upper bound below that threshold fails; an interval that holds both
  answers is **inconclusive** (too few questions to tell, or no difference to find).

The verdict is ``passed`` when every check passes, ``failed`` when one fails, and
``inconclusive`` otherwise; ``evaluation.gate.inconclusive`` decides what an inconclusive
verdict does: ``block`` (not promoted) or ``allow_first`` (promoted when nothing is promoted
yet, so a newcomer's first run ends with a model to serve; the reasons say so). A comparison
with a promoted model while nothing is promoted passes and says so.

The verdict is plain JSON, written into ``metrics.json`` and the evaluate manifest's
``extra``, so publish (or anything else) reads it without importing this module:

    {"passed": false, "verdict": "inconclusive", "policy": "block", "first_promotion": false,
     "n": 29, "confidence": 0.95, "questions": "all",
     "reasons": ["INCONCLUSIVE rouge-l superiority over production: n=30, mean +0.41, 95% interval -1.20..+2.05 ..."],
     "checks": [{"metric": "rouge-l", "kind": "superiority", "compare": "promoted", "threshold": 0.0,
                 "value": 0.41, "interval": [-1.2, 2.05], "n": 29, "status": "inconclusive", "passed": false}]}
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean
from typing import Any, Sequence

from shared.core.config import GateConfig, GateRule
from shared.evaluate.confidence import conclude, paired_interval

# Metrics for which a lower score is better: their differences are taken reference - candidate.
LOWER_IS_BETTER = ("empty_share",)
_LABEL = {"base": "base", "promoted": "production"}


@dataclass
class Scores:
    """Per-question scores of one model on the gate's questions, in the same order for every model."""

    rows: list[dict[str, float]]

    def column(self, metric: str) -> list[float]:
        return [row[metric] for row in self.rows]

    def mean(self, metric: str) -> float:
        return fmean(self.column(metric)) if self.rows else 0.0


def _check(rule: GateRule, kind: str, status: str, value: float, text: str, **extra) -> dict[str, Any]:
    return {"metric": rule.metric, "kind": kind, "compare": extra.pop("compare", None), "status": status,
            "passed": status == "pass", "value": round(value, 4), **extra, "text": text}


def _bounds(rule: GateRule, candidate: Scores):
    value = candidate.mean(rule.metric)
    if rule.min is not None:
        ok = value >= rule.min
        yield _check(rule, "min", "pass" if ok else "fail", value,
                     f"{rule.metric}: candidate {value:.2f} {'>=' if ok else '<'} min {rule.min:.2f}", threshold=rule.min)
    if rule.max is not None:
        ok = value <= rule.max
        yield _check(rule, "max", "pass" if ok else "fail", value,
                     f"{rule.metric}: candidate {value:.2f} {'<=' if ok else '>'} max {rule.max:.2f}", threshold=rule.max)


def _comparison(rule: GateRule, cfg: GateConfig, candidate: Scores, reference: Scores | None, seed: int):
    label = _LABEL[rule.compare]
    what = f"{rule.metric} {rule.test.replace('_', '-')} over {label}" + (f" (margin {rule.margin:g})" if rule.margin else "")
    if reference is None:
        yield _check(rule, rule.test, "pass", 0.0, f"{what}: no promoted model to compare with yet", compare=rule.compare,
                     threshold=rule.threshold, n=0)
        return
    cand, ref = candidate.column(rule.metric), reference.column(rule.metric)
    if rule.metric in LOWER_IS_BETTER:
        cand, ref = ref, cand
    interval = paired_interval(cand, ref, confidence=cfg.confidence, resamples=cfg.resamples, seed=seed)
    status = conclude(interval, rule.threshold)
    meaning = {"pass": f"the lower bound is above {rule.threshold:+g}",
               "fail": f"the whole interval is below {rule.threshold:+g}",
               "inconclusive": f"the interval holds {rule.threshold:+g}: "
                               + ("no difference found" if interval.low <= 0 <= interval.high else "not enough questions to decide")}[status]
    yield _check(rule, rule.test, status, interval.mean, f"{what}: {interval.describe()}; {meaning}", compare=rule.compare,
                 threshold=rule.threshold, interval=[round(interval.low, 4), round(interval.high, 4)], n=interval.n)


def training_checks(summary: dict[str, Any] | None, stop_tokens: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """Checks on how the candidate was trained (finetune's training_summary.json), always on: the batches
    must have kept the end-of-turn labels the encoder put in (shared/train/tokenization.py, audit_end_labels)."""
    audit = ((summary or {}).get("tokenization") or {}).get("train", {}).get("end_of_turn_labels")
    if not isinstance(audit, dict) or not audit.get("in_examples"):
        return []
    kept, wanted = audit.get("after_collator", 0), audit["in_examples"]
    names = ", ".join(f"{(stop_tokens or {}).get(i, '?')} (id {i})" for i in audit.get("token_ids", []))
    if kept >= wanted:
        text = f"training: the batches keep all {wanted} end-of-turn labels ({names}) of {audit['examples']} sampled examples"
        return [{"metric": "end_of_turn_labels", "kind": "training", "compare": None, "status": "pass", "passed": True,
                 "value": kept, "threshold": wanted, "text": text}]
    text = (f"training: the batches kept {kept} of {wanted} end-of-turn labels ({names}) in {audit['examples']} sampled "
            "examples: the collator masks them (pad = eos: padding masked by id also masks the end token), "
            "so the tuned model never learns to stop")
    return [{"metric": "end_of_turn_labels", "kind": "training", "compare": None, "status": "fail", "passed": False,
             "value": kept, "threshold": wanted, "text": text}]


def evaluate_gate(cfg: GateConfig, base: Sequence[dict[str, float]], candidate: Sequence[dict[str, float]],
                  production: Sequence[dict[str, float]] | None = None, *, seed: int = 0,
                  training: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The verdict of ``cfg`` on per-question scores (one row of metrics per question, the same
    questions in the same order for every model; ``production`` None: nothing is promoted),
    plus ``training`` checks (``training_checks``)."""
    b, c = Scores(list(base)), Scores(list(candidate))
    p = Scores(list(production)) if production is not None else None
    checks = list(training or [])
    for number, rule in enumerate(cfg.rules):
        checks += list(_bounds(rule, c))
        if rule.test is not None:
            # Each rule its own stream of resamples: reordering rules does not change another rule's interval.
            checks += list(_comparison(rule, cfg, c, b if rule.compare == "base" else p, seed + number))
    head = {"confidence": cfg.confidence, "questions": cfg.questions, "n": len(c.rows), "policy": cfg.inconclusive,
            "first_promotion": production is None}
    if not checks:
        return {**head, "passed": True, "verdict": "passed", "reasons": ["no gate rules configured: passes by default"], "checks": []}
    statuses = {ch["status"] for ch in checks}
    verdict = "failed" if "fail" in statuses else "inconclusive" if "inconclusive" in statuses else "passed"
    passed = verdict == "passed" or (verdict == "inconclusive" and cfg.inconclusive == "allow_first" and production is None)
    order = {"fail": 0, "inconclusive": 1, "pass": 2}  # what a reader of a blocked gate looks for comes first
    tag = {"fail": "FAIL", "inconclusive": "INCONCLUSIVE", "pass": "ok"}
    reasons = [f"{tag[ch['status']]} {ch['text']}" for ch in sorted(checks, key=lambda ch: order[ch["status"]])]
    reasons.insert(0, _summary(verdict, passed, cfg, production is None))
    return {**head, "passed": passed, "verdict": verdict, "reasons": reasons,
            "checks": [{k: v for k, v in ch.items() if k != "text"} for ch in checks]}


def _summary(verdict: str, passed: bool, cfg: GateConfig, first: bool) -> str:
    if verdict == "passed":
        return "every rule holds with the stated confidence: promote"
    if verdict == "failed":
        return "a rule is shown not to hold: do not promote"
    if passed:
        return ("inconclusive: the questions cannot tell the models apart; promoted anyway because the policy "
                "(evaluation.gate.inconclusive: allow_first) allows it while nothing is promoted yet")
    why = ("a model is already promoted, and allow_first allows only a first promotion" if cfg.inconclusive == "allow_first" and not first
           else "the policy (evaluation.gate.inconclusive: block) blocks it")
    return f"inconclusive: the questions cannot tell the models apart; not promoted: {why}"


def gate_passed(verdict: Any) -> bool:
    """Read a verdict defensively: anything but an explicit ``passed: true`` is a failure."""
    return isinstance(verdict, dict) and verdict.get("passed") is True
