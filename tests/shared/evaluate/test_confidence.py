"""shared/evaluate/confidence.py and the gate on synthetic paired scores: how often it promotes by chance,
how often it sees a real gain.

The synthetic scores are shaped like ROUGE-L per question on the sample run (bounded 0-100, a
per-question difficulty shared by both models, and per-question differences of standard deviation
``SPREAD``, measured on the bundled model's base vs candidate answers to the 29 sample questions:
docs/benchmarks.md, "The gate's noise"). Each trial draws its own questions from its own seed.
"""

from __future__ import annotations

import numpy as np
import pytest

from shared.core.config import GateConfig, GateRule
from shared.evaluate.confidence import conclude, paired_interval
from shared.evaluate.gate import evaluate_gate

TRIALS = 500
QUESTIONS = 500
SPREAD = 12.0  # SD of per-question ROUGE-L differences between two models (points)
# Fewer resamples than the gate's 9,999 keep 1,000 intervals to seconds; the bounds move by <0.05 points.
RESAMPLES = 999


def _paired(rng: np.random.Generator, n: int, gain: float) -> tuple[list[dict], list[dict]]:
    difficulty = rng.uniform(5, 40, n)
    reference = np.clip(difficulty + rng.normal(0, SPREAD / np.sqrt(2), n), 0, 100)
    candidate = np.clip(difficulty + gain + rng.normal(0, SPREAD / np.sqrt(2), n), 0, 100)
    return [{"rouge-l": float(v)} for v in reference], [{"rouge-l": float(v)} for v in candidate]


def _promotes(gain: float, trial: int, test: str = "superiority") -> bool:
    rng = np.random.default_rng(trial)
    base, cand = _paired(rng, QUESTIONS, gain)
    cfg = GateConfig(resamples=RESAMPLES, rules=[GateRule(metric="rouge-l", test=test)])
    return evaluate_gate(cfg, base, cand, seed=trial)["passed"]


def test_no_true_difference_promotes_in_at_most_5_percent_of_trials():
    promoted = sum(_promotes(0.0, trial) for trial in range(TRIALS))
    assert promoted / TRIALS <= 0.05, f"promoted {promoted} of {TRIALS} trials without any true difference"


def test_a_true_gain_of_2_points_on_500_questions_is_detected_in_at_least_80_percent():
    detected = sum(_promotes(2.0, 10_000 + trial) for trial in range(TRIALS))
    assert detected / TRIALS >= 0.80, f"detected the +2 gain in {detected} of {TRIALS} trials"


def test_identical_answers_never_pass_superiority_and_say_no_difference():
    scores = [{"rouge-l": float(v), "empty_share": 0.0} for v in np.random.default_rng(1).uniform(0, 60, 29)]
    cfg = GateConfig(inconclusive="block", rules=[GateRule(metric="rouge-l", test="superiority", compare="promoted")])
    verdict = evaluate_gate(cfg, scores, scores, scores)
    assert verdict["verdict"] == "inconclusive" and verdict["passed"] is False
    [check] = verdict["checks"]
    assert check["interval"] == [0.0, 0.0] and check["status"] == "inconclusive"
    assert "no difference found" in verdict["reasons"][1]


def test_interval_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(3)
    a, b = rng.normal(20, 8, 40), rng.normal(18, 8, 40)
    one = paired_interval(a.tolist(), b.tolist(), seed=7)
    assert one == paired_interval(a.tolist(), b.tolist(), seed=7), "same scores, same seed: the same interval"
    assert one.low < one.mean < one.high and one.n == 40
    wider = paired_interval(a.tolist(), b.tolist(), confidence=0.99, seed=7)
    assert wider.low < one.low and wider.high > one.high


@pytest.mark.parametrize(("low", "high", "threshold", "status"), [
    (0.5, 3.0, 0.0, "pass"), (-3.0, -0.5, 0.0, "fail"), (-1.0, 2.0, 0.0, "inconclusive"),
    (-1.5, 1.0, -2.0, "pass"), (-3.5, -2.5, -2.0, "fail"), (0.0, 0.0, 0.0, "inconclusive"),
], ids=["above", "below", "straddles", "non-inferior", "inferior", "degenerate-on-threshold"])
def test_conclusions(low, high, threshold, status):
    from shared.evaluate.confidence import Interval

    assert conclude(Interval(10, (low + high) / 2, low, high, 0.95), threshold) == status


def test_mismatched_or_empty_scores_are_errors():
    with pytest.raises(ValueError, match="differ in length"):
        paired_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="nothing to compare"):
        paired_interval([], [])


@pytest.mark.parametrize("n", [7, 29, 200])
def test_bca_interval_matches_scipy_bootstrap(n):
    """The hand-written BCa of the mean against scipy.stats.bootstrap's BCa on the same differences (Monte
    Carlo noise only: each draws its own resamples)."""
    from scipy.stats import bootstrap

    rng = np.random.default_rng(n)
    cand = np.clip(rng.gamma(2.0, 8.0, n), 0, 100)  # skewed like ROUGE scores
    ref = np.clip(cand - rng.normal(1.0, 10.0, n), 0, 100)
    ours = paired_interval(cand.tolist(), ref.tolist(), resamples=49_999, seed=1)
    theirs = bootstrap((cand - ref,), np.mean, confidence_level=0.95, n_resamples=49_999, method="BCa",
                       random_state=np.random.default_rng(2)).confidence_interval
    width = theirs.high - theirs.low
    assert abs(ours.low - theirs.low) < 0.03 * width and abs(ours.high - theirs.high) < 0.03 * width, (ours, theirs)
