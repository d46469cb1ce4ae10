"""shared/evaluate/gate.py: bounds, comparisons with confidence, the inconclusive policy, the training check,
and the config that declares them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.core.config import GateConfig, GateRule, parse_config
from shared.core.errors import ConfigError
from shared.evaluate.gate import evaluate_gate, gate_passed, training_checks


def _rows(values, **fixed) -> list[dict[str, float]]:
    return [{"rouge-l": float(v), "bleu-4": float(v) / 2, "empty_share": 0.0, "answer_chars": 50.0, **fixed} for v in values]


RNG = np.random.default_rng(0)
BASE = _rows(RNG.uniform(5, 25, 60))
BETTER = _rows([r["rouge-l"] + 8 + d for r, d in zip(BASE, RNG.normal(0, 3, 60))])  # clearly better, question by question
NOISY = _rows([r["rouge-l"] + d for r, d in zip(BASE, RNG.normal(0, 6, 60))])  # no true difference


def _gate(*rules, **settings) -> GateConfig:
    return GateConfig(rules=[GateRule(**r) for r in rules], **settings)


@pytest.mark.parametrize(
    ("rules", "candidate", "verdict"),
    [
        pytest.param([{"metric": "rouge-l", "min": 10}], BETTER, "passed", id="min-met"),
        pytest.param([{"metric": "rouge-l", "min": 40}], BETTER, "failed", id="min-missed"),
        pytest.param([{"metric": "empty_share", "max": 0.2}], _rows(range(60), empty_share=1.0), "failed", id="max-exceeded"),
        pytest.param([{"metric": "rouge-l", "test": "superiority"}], BETTER, "passed", id="superior"),
        pytest.param([{"metric": "rouge-l", "test": "superiority"}], NOISY, "inconclusive", id="no-difference"),
        pytest.param([{"metric": "rouge-l", "test": "superiority", "margin": 20}], BETTER, "failed", id="not-superior-by-margin"),
        pytest.param([{"metric": "rouge-l", "test": "non_inferiority", "margin": 1}], NOISY, "inconclusive",
                     id="noise-straddles-margin"),
        pytest.param([{"metric": "rouge-l", "test": "non_inferiority", "margin": 20}], NOISY, "passed", id="non-inferior"),
        pytest.param([{"metric": "rouge-l", "test": "superiority"}, {"metric": "rouge-l", "min": 40}], BETTER, "failed",
                     id="one-rule-of-two"),
        pytest.param([], NOISY, "passed", id="no-rules"),
    ],
)
def test_verdicts(rules, candidate, verdict):
    result = evaluate_gate(_gate(*rules), BASE, candidate)
    assert result["verdict"] == verdict
    assert gate_passed(result) is (verdict == "passed")
    assert result["reasons"], "a verdict always says why"
    json.dumps(result)  # machine-readable: plain JSON


def test_a_comparison_names_n_the_interval_and_the_rule():
    result = evaluate_gate(_gate({"metric": "rouge-l", "test": "superiority"}), BASE, BETTER)
    [check] = result["checks"]
    assert check["kind"] == "superiority" and check["compare"] == "base" and check["n"] == 60 and check["status"] == "pass"
    low, high = check["interval"]
    assert 0 < low < check["value"] < high
    assert f"n=60, mean {check['value']:+.2f}, 95% interval {low:+.2f}..{high:+.2f}" in result["reasons"][1]
    assert "rouge-l superiority over base" in result["reasons"][1] and "the lower bound is above +0" in result["reasons"][1]


def test_lower_is_better_metrics_compare_the_other_way_round():
    fewer_empty = _rows([r["rouge-l"] for r in BASE], empty_share=0.0)
    more_empty = [dict(r, empty_share=1.0 if i % 2 else 0.0) for i, r in enumerate(BASE)]
    assert evaluate_gate(_gate({"metric": "empty_share", "test": "superiority"}), more_empty, fewer_empty)["passed"]
    assert evaluate_gate(_gate({"metric": "empty_share", "test": "superiority"}), fewer_empty, more_empty)["verdict"] == "failed"


@pytest.mark.parametrize(("policy", "production", "passed"), [
    ("block", None, False), ("allow_first", None, True), ("allow_first", "present", False), ("block", "present", False),
], ids=["block-first", "allow-first", "allow-first-but-promoted", "block-promoted"])
def test_inconclusive_policy(policy, production, passed):
    cfg = _gate({"metric": "rouge-l", "test": "superiority"}, {"metric": "rouge-l", "test": "superiority", "compare": "promoted"},
                inconclusive=policy)
    result = evaluate_gate(cfg, BASE, NOISY, NOISY if production else None)
    assert result["verdict"] == "inconclusive" and result["passed"] is passed and result["policy"] == policy
    summary = result["reasons"][0]
    if passed:
        assert "promoted anyway" in summary and "allow_first" in summary
    elif production and policy == "allow_first":
        assert "a model is already promoted" in summary
    else:
        assert "not promoted" in summary


def test_comparison_with_production_passes_while_nothing_is_promoted():
    result = evaluate_gate(_gate({"metric": "rouge-l", "test": "non_inferiority", "margin": 2, "compare": "promoted"}), BASE, NOISY)
    assert result["passed"] and "no promoted model to compare with yet" in result["reasons"][1]


def test_older_spelling_reads_as_a_comparison():
    over = GateRule(metric="rouge-l", min_improvement=-2.0, min_improvement_over="promoted")
    assert (over.test, over.margin, over.compare, over.threshold) == ("non_inferiority", 2.0, "promoted", -2.0)
    gain = GateRule(metric="bleu-4", min_improvement=1.5)
    assert (gain.test, gain.margin, gain.compare, gain.threshold) == ("superiority", 1.5, "base", 1.5)
    cfg = parse_config({"evaluation": {"gate": [{"metric": "rouge-l", "min": 3}]}}).evaluation.gate
    assert cfg.rules[0].min == 3 and cfg.confidence == 0.95, "a plain list is the rules"


def test_default_gate_and_its_policy():
    cfg = parse_config({}).evaluation.gate
    assert cfg.inconclusive == "block" and cfg.confidence == 0.95 and cfg.questions == "all"
    assert {(r.metric, r.test, r.margin, r.compare, r.max) for r in cfg.rules} == {
        ("rouge-l", "superiority", 0.0, "base", None), ("rouge-l", "non_inferiority", 2.0, "promoted", None),
        ("empty_share", None, 0.0, "base", 0.2)}


def test_bad_gate_settings_are_all_reported_with_their_keys():
    with pytest.raises(ConfigError) as info:
        parse_config({"evaluation": {"gate": {"confidence": 1.5, "rules": [
            {"metric": "rouge"}, {"metric": "bleu-4"}, {"metric": "rouge-l", "minimum": 3},
            {"metric": "answer_chars", "test": "superiority"}]}}}, "x.yaml")
    text = str(info.value)
    assert "5 invalid settings" in text
    assert "evaluation.gate.confidence" in text
    assert "evaluation.gate.rules[0]" in text and "'rouge' is unknown" in text
    assert "evaluation.gate.rules[1]" in text and "sets none of 'min', 'max', 'test'" in text
    assert "evaluation.gate.rules[2].minimum: not a key lawtune knows" in text
    assert "evaluation.gate.rules[3]" in text and "no better direction to test" in text


@pytest.mark.parametrize(
    "verdict",
    [None, {}, {"passed": "yes"}, {"passed": 1}, "passed", {"passed": False, "reasons": []}],
    ids=["none", "empty", "string-true", "int-true", "not-a-dict", "false"],
)
def test_anything_but_explicit_true_is_a_failure(verdict):
    assert gate_passed(verdict) is False


def _summary(in_examples, after):
    return {"tokenization": {"train": {"end_of_turn_labels": {"token_ids": [2], "examples": 32, "in_examples": in_examples,
                                                              "after_collator": after}}}}


def test_training_that_masked_the_end_token_blocks_whatever_the_scores():
    [check] = training_checks(_summary(32, 0), {2: "<|im_end|>"})
    assert check["status"] == "fail" and "pad = eos" in check["text"] and "<|im_end|> (id 2)" in check["text"]
    result = evaluate_gate(_gate({"metric": "rouge-l", "test": "superiority"}), BASE, BETTER, training=[check])
    assert result["verdict"] == "failed" and "never learns to stop" in result["reasons"][1]
    [ok] = training_checks(_summary(32, 32))
    assert ok["status"] == "pass"
    assert training_checks({}) == [] and training_checks(_summary(0, 0)) == [], "nothing to audit: no check"


def test_bad_rules_in_the_older_list_form_are_reported_as_written():
    with pytest.raises(ConfigError) as info:
        parse_config({"evaluation": {"gate": [{"metric": "rouge"}, {"metric": "bleu-4"}, {"metric": "rouge-l", "minimum": 3}]}},
                     "x.yaml")
    text = str(info.value)
    assert "3 invalid settings" in text, "the older form: a plain list of rules is read as gate.rules"
    assert "evaluation.gate.rules[0]" in text and "'rouge' is unknown" in text
    assert "evaluation.gate.rules[1]" in text and "sets none of 'min', 'max', 'test'" in text
    assert "evaluation.gate.rules[2].minimum: not a key lawtune knows" in text
