"""shared/evaluate/metrics.py against values computed by hand (jieba segmentation shown per case)."""

from __future__ import annotations

import math

import pytest

from shared.evaluate.metrics import EXTRAS, METRICS, aggregate, evaluate, score, tokenize


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        pytest.param("我爱北京天安门", ["我", "爱", "北京", "天安门"], id="chinese"),
        pytest.param("我爱Python编程", ["我", "爱", "python", "编程"], id="mixed-lowercased"),
        pytest.param("Hello  World 你好", ["hello", "world", "你好"], id="whitespace-dropped"),
        pytest.param("合同无效。", ["合同", "无效", "。"], id="punctuation-kept"),
        pytest.param("", [], id="empty"),
        pytest.param(" \n\t", [], id="whitespace-only"),
    ],
)
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens


# Hand computation, hypothesis H against reference R (tokens as in test_tokenize):
# chinese: H=[我,爱,北京] R=[我,爱,北京,天安门]. ROUGE-1/L: P=3/3 R=3/4, F1=6/7. ROUGE-2: 2 of R's 3
#   bigrams, P=1 R=2/3, F1=0.8. BLEU-4: p1=p2=p3=1, p4=0/1 -> method3 1/2; BP=exp(1-4/3);
#   BLEU=(1*1*1*0.5)^(1/4)*exp(-1/3).
# mixed: H=[python,编程,我,爱] R=[我,爱,python,编程]. ROUGE-1: 4/4 both ways = 1. ROUGE-2: H has
#   (python编程)(编程我)(我爱), 2 shared of 3 -> 2/3. ROUGE-L: LCS=2 -> 1/2. BLEU-4: p1=1, p2=2/3,
#   p3=0/2 -> 1/(2*2), p4=0/1 -> 1/(4*1); BP=1; BLEU=(2/3*1/4*1/4)^(1/4).
HAND = [
    pytest.param("我爱北京", "我爱北京天安门",
                 {"rouge-1": 600 / 7, "rouge-2": 80.0, "rouge-l": 600 / 7, "bleu-4": 100 * 0.5 ** 0.25 * math.exp(-1 / 3)},
                 id="chinese"),
    pytest.param("Python编程 我爱", "我爱Python编程",
                 {"rouge-1": 100.0, "rouge-2": 200 / 3, "rouge-l": 50.0, "bleu-4": 100 * (2 / 3 / 16) ** 0.25},
                 id="mixed"),
    # An exact 2-token answer has no 3-/4-grams: method3 counts them 1/2 and 1/4, so BLEU-4 is
    # (1*1*1/2*1/4)^(1/4) = 59.46, not 100 (sentence BLEU's known penalty on very short answers).
    pytest.param("劳动合同到期", "劳动合同到期", {m: 100.0 for m in METRICS} | {"bleu-4": 100 * (1 / 8) ** 0.25},
                 id="identical-2-tokens"),
    pytest.param("我爱北京天安门", "我爱北京天安门", {m: 100.0 for m in METRICS}, id="identical-4-tokens"),
    pytest.param("今天", "我爱北京", {m: 0.0 for m in METRICS}, id="no-overlap"),
    pytest.param("", "我爱北京", {m: 0.0 for m in METRICS}, id="empty-answer"),
    pytest.param("   ", "我爱北京", {m: 0.0 for m in METRICS}, id="blank-answer"),
    pytest.param("我爱北京", "", {m: 0.0 for m in METRICS}, id="empty-reference"),
]


@pytest.mark.parametrize(("prediction", "reference", "expected"), HAND)
def test_score_matches_hand_computation(prediction, reference, expected):
    got = score(prediction, reference)
    assert set(got) == set(METRICS)
    for name in METRICS:
        assert got[name] == pytest.approx(expected[name], abs=1e-9), name


def test_aggregate_means_lengths_and_empty_share():
    predictions = ["我爱北京", "", "Python编程 我爱", "  "]
    references = ["我爱北京天安门", "我爱北京", "我爱Python编程", "合同"]
    corpus, rows = evaluate(predictions, references)
    assert len(rows) == 4
    assert corpus["rouge-1"] == pytest.approx((600 / 7 + 0 + 100 + 0) / 4)
    assert corpus["rouge-l"] == pytest.approx((600 / 7 + 50) / 4)
    assert corpus["answer_chars"] == pytest.approx((4 + 0 + 11 + 0) / 4)
    assert corpus["empty_share"] == 0.5


def test_aggregate_of_nothing_is_zero_and_mismatch_is_an_error():
    assert aggregate([], []) == {name: 0.0 for name in (*METRICS, *EXTRAS)}
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        evaluate(["a", "b"], ["a"])


def test_rows_carry_the_extras_question_by_question_and_ended_counts_stops():
    corpus, rows = evaluate(["我爱北京", "", "合同"], ["我爱北京", "合同", "合同"], ended=[True, False, False])
    assert [r["empty_share"] for r in rows] == [0.0, 1.0, 0.0] and [r["answer_chars"] for r in rows] == [4.0, 0.0, 2.0]
    assert [r["ended_share"] for r in rows] == [1.0, 0.0, 0.0] and corpus["ended_share"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 ended flags for 3 predictions"):
        evaluate(["a", "b", "c"], ["a", "b", "c"], ended=[True, False])
