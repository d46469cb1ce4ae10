"""shared/evaluate/gate.py: every rule kind, pass and fail, and the config that declares the rules."""

from __future__ import annotations

import json

import pytest

from shared.core.config import GateRule, parse_config
from shared.core.errors import ConfigError
from shared.evaluate.gate import evaluate_gate, gate_passed

BASE = {"rouge-1": 10.0, "rouge-2": 3.0, "rouge-l": 8.0, "bleu-4": 2.0, "answer_chars": 120.0, "empty_share": 0.0}
TUNED = {"rouge-1": 30.0, "rouge-2": 12.0, "rouge-l": 25.0, "bleu-4": 9.0, "answer_chars": 80.0, "empty_share": 0.25}


@pytest.mark.parametrize(
    ("rules", "passed", "failing"),
    [
        pytest.param([{"metric": "rouge-l", "min": 20}], True, [], id="min-met"),
        pytest.param([{"metric": "rouge-l", "min": 25}], True, [], id="min-met-exactly"),
        pytest.param([{"metric": "rouge-l", "min": 26}], False, ["rouge-l"], id="min-missed"),
        pytest.param([{"metric": "bleu-4", "min_improvement": 7}], True, [], id="improvement-met"),
        pytest.param([{"metric": "bleu-4", "min_improvement": 7.5}], False, ["bleu-4"], id="improvement-missed"),
        pytest.param([{"metric": "answer_chars", "min_improvement": -50}], True, [], id="bounded-regression-allowed"),
        pytest.param([{"metric": "empty_share", "max": 0.2}], False, ["empty_share"], id="max-exceeded"),
        pytest.param([{"metric": "rouge-1", "min": 20, "min_improvement": 25}], False, ["rouge-1"], id="one-of-two-checks"),
        pytest.param([{"metric": "rouge-1", "min": 20}, {"metric": "rouge-2", "min": 20}, {"metric": "empty_share", "max": 0.5}],
                     False, ["rouge-2"], id="one-rule-of-three"),
        pytest.param([], True, [], id="no-rules"),
    ],
)
def test_gate_verdicts(rules, passed, failing):
    verdict = evaluate_gate([GateRule(**r) for r in rules], BASE, TUNED)
    assert verdict["passed"] is passed
    assert gate_passed(verdict) is passed
    assert sorted({c["metric"] for c in verdict["checks"] if not c["passed"]}) == failing
    failed_reasons = [r for r in verdict["reasons"] if r.startswith("FAIL")]
    assert len(failed_reasons) == sum(not c["passed"] for c in verdict["checks"])
    assert all(any(m in r for m in failing) for r in failed_reasons)
    assert verdict["reasons"], "a verdict always says why"
    json.dumps(verdict)  # machine-readable: plain JSON


def test_failed_reason_names_values_and_threshold():
    verdict = evaluate_gate([GateRule(metric="bleu-4", min_improvement=10)], BASE, TUNED)
    assert verdict["reasons"] == ["FAIL bleu-4: tuned - base = 9.00 - 2.00 = +7.00 < min_improvement +10.00"]
    assert verdict["checks"] == [{"metric": "bleu-4", "kind": "min_improvement", "threshold": 10.0, "value": 7.0, "passed": False}]


@pytest.mark.parametrize(
    "verdict",
    [None, {}, {"passed": "yes"}, {"passed": 1}, "passed", {"passed": False, "reasons": []}],
    ids=["none", "empty", "string-true", "int-true", "not-a-dict", "false"],
)
def test_anything_but_explicit_true_is_a_failure(verdict):
    assert gate_passed(verdict) is False


def test_default_gate_guards_against_regression_and_empty_answers():
    rules = parse_config({}).evaluation.gate
    assert {(r.metric, r.min_improvement, r.max, r.min_improvement_over) for r in rules} == {
        ("rouge-l", 0.0, None, "base"), ("rouge-l", -2.0, None, "promoted"), ("empty_share", None, 0.2, "base")}


def test_bad_gate_rules_are_all_reported_with_their_keys():
    with pytest.raises(ConfigError) as info:
        parse_config({"evaluation": {"gate": [{"metric": "rouge"}, {"metric": "bleu-4"}, {"metric": "rouge-l", "minimum": 3}]}},
                     "x.yaml")
    text = str(info.value)
    assert "3 invalid settings" in text
    assert "evaluation.gate[0]" in text and "'rouge' is unknown" in text
    assert "evaluation.gate[1]" in text and "sets none of 'min', 'max', 'min_improvement'" in text
    assert "evaluation.gate[2].minimum: not a key lawtune knows" in text


def test_rule_over_promoted_compares_with_production_and_passes_without_one():
    from shared.core.config import GateRule
    from shared.evaluate.gate import evaluate_gate

    rule = GateRule(metric="rouge-l", min_improvement=-2.0, min_improvement_over="promoted")
    base, tuned = {"rouge-l": 5.0}, {"rouge-l": 20.0}
    first = evaluate_gate([rule], base, tuned, None)
    assert first["passed"] and "no promoted model to compare with yet" in first["reasons"][0]
    ok = evaluate_gate([rule], base, tuned, {"rouge-l": 21.5})
    assert ok["passed"] and ok["checks"][0]["kind"] == "min_improvement_over_promoted" and ok["checks"][0]["value"] == -1.5
    worse = evaluate_gate([rule], base, tuned, {"rouge-l": 22.5})
    assert not worse["passed"]
    assert worse["reasons"] == ["FAIL rouge-l: tuned - production = 20.00 - 22.50 = -2.50 < min_improvement -2.00"]
