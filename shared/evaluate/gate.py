"""The quality gate: may the tuned model be promoted to serving?

Rules come from the config's ``evaluation.gate`` list; each names a metric of
``shared.evaluate.metrics`` and any of ``min`` (tuned score at least this), ``max`` (tuned score at
most this, e.g. for ``empty_share``) and ``min_improvement`` (tuned minus base at least this;
negative allows a bounded regression; with ``min_improvement_over: promoted`` tuned minus the
production model's score, a check that passes while nothing is promoted yet). The gate passes when every check passes; no rules
pass by default, and the reasons say so.

The verdict is plain JSON, written into ``metrics.json`` and the evaluate manifest's
``extra``, so publish (or anything else) reads it without importing this module:

    {"passed": false,
     "reasons": ["rouge-l: tuned 3.10 < min 10.00", ...],
     "checks": [{"metric": "rouge-l", "kind": "min", "threshold": 10.0, "value": 3.1, "passed": false}, ...]}
"""

from __future__ import annotations

from typing import Any, Iterable

from shared.core.config import GateRule


def _check(metric: str, kind: str, threshold: float, value: float, passed: bool, text: str) -> dict[str, Any]:
    return {"metric": metric, "kind": kind, "threshold": threshold, "value": round(value, 4), "passed": passed, "text": text}


def _checks(rule: GateRule, base: dict[str, float], tuned: dict[str, float],
            production: dict[str, float] | None) -> Iterable[dict[str, Any]]:
    name, value = rule.metric, tuned[rule.metric]
    if rule.min is not None:
        ok = value >= rule.min
        yield _check(name, "min", rule.min, value, ok, f"{name}: tuned {value:.2f} {'>=' if ok else '<'} min {rule.min:.2f}")
    if rule.max is not None:
        ok = value <= rule.max
        yield _check(name, "max", rule.max, value, ok, f"{name}: tuned {value:.2f} {'<=' if ok else '>'} max {rule.max:.2f}")
    if rule.min_improvement is not None and rule.min_improvement_over == "promoted":
        if production is None:
            yield _check(name, "min_improvement_over_promoted", rule.min_improvement, 0.0, True,
                         f"{name}: no promoted model to compare with yet")
        else:
            yield _improvement(rule, value, "min_improvement_over_promoted", "production", production[name])
    elif rule.min_improvement is not None:
        yield _improvement(rule, value, "min_improvement", "base", base[name])


def _improvement(rule: GateRule, value: float, kind: str, label: str, reference: float) -> dict[str, Any]:
    delta = value - reference
    ok = delta >= rule.min_improvement
    return _check(
        rule.metric, kind, rule.min_improvement, delta, ok,
        f"{rule.metric}: tuned - {label} = {value:.2f} - {reference:.2f} = {delta:+.2f} "
        f"{'>=' if ok else '<'} min_improvement {rule.min_improvement:+.2f}",
    )


def evaluate_gate(rules: list[GateRule], base: dict[str, float], tuned: dict[str, float],
                  production: dict[str, float] | None = None) -> dict[str, Any]:
    """The verdict of ``rules`` on corpus metrics of the base, the tuned and the production (PROMOTED) model."""
    checks = [c for rule in rules for c in _checks(rule, base, tuned, production)]
    if not checks:
        return {"passed": True, "reasons": ["no gate rules configured: passes by default"], "checks": []}
    failed = [c for c in checks if not c["passed"]]
    # Failures first: they are what a reader of a failed gate looks for.
    reasons = [f"FAIL {c['text']}" for c in failed] + [f"ok {c['text']}" for c in checks if c["passed"]]
    return {"passed": not failed, "reasons": reasons, "checks": [{k: v for k, v in c.items() if k != "text"} for c in checks]}


def gate_passed(verdict: Any) -> bool:
    """Read a verdict defensively: anything but an explicit ``passed: true`` is a failure."""
    return isinstance(verdict, dict) and verdict.get("passed") is True
