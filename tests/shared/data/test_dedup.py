"""shared/data/dedup.py: is_best spellings, the best-reply rule, duplicate reasons, spill round-trip."""

import pytest

from shared.data.conversation import dumps, normalise_key
from shared.data.dedup import Candidate, bucket_of, buckets_for, parse_flag, read_groups, resolve, spill_record


@pytest.mark.parametrize(
    "value, flag",
    [
        *[pytest.param(v, True, id=f"true-{v}") for v in ("1", "1.0", "true", "True", "TRUE", " yes ", "y", "t", "是")],
        *[pytest.param(v, False, id=f"false-{v or 'empty'}") for v in ("0", "0.0", "false", "No", "n", "f", "否", "", "  ")],
        *[pytest.param(v, None, id=f"unknown-{v}") for v in ("best", "2", "-1", "1.5", "maybe")],
    ],
)
def test_parse_flag(value, flag):
    assert parse_flag(value) is flag


def cand(line: int, answer: str, flag: bool = False, question: str = "工资拖欠怎么办") -> Candidate:
    key = normalise_key(question)
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    record = dumps({"id": "0" * 16, "conversations": turns}).encode()
    return Candidate(key, b"\x00" * 8, flag, len(answer), len(question), line, 0.5, record, b"")


@pytest.mark.parametrize(
    "group, winner_line, reasons",
    [
        pytest.param([cand(2, "长一些的回答内容"), cand(3, "短回答", flag=True)], 3, {2: "not_best_reply"}, id="flag-beats-length"),
        pytest.param([cand(2, "短回答", True), cand(3, "长一些的回答内容", True)], 3, {2: "not_best_reply"}, id="flag-tie-longest"),
        pytest.param([cand(2, "回答甲"), cand(3, "回答乙")], 2, {3: "not_best_reply"}, id="full-tie-earliest"),
        pytest.param([cand(2, "同一个回答"), cand(3, "同一个回答")], 2, {3: "duplicate_exact"}, id="exact"),
        pytest.param(
            [cand(2, "同一个回答。", True), cand(3, "同一个 回答", question="工资拖欠怎么办？")],
            2, {3: "duplicate_normalised"}, id="normalised",
        ),
        pytest.param([cand(5, "唯一回答")], 5, {}, id="single"),
    ],
)
def test_resolve_keeps_one_by_the_documented_rule(group, winner_line, reasons):
    winner, losers = resolve(group)
    assert winner.line == winner_line
    assert {c.line: r for c, r in losers} == reasons


def test_spill_round_trip_groups_in_first_row_order(tmp_path):
    rows = [cand(2, "答一", question="问甲"), cand(3, "答二", question="问乙"), cand(4, "答三", question="问甲")]
    path = tmp_path / "bucket.bin"
    path.write_bytes(b"".join(spill_record(c) for c in rows))
    groups = list(read_groups([path]))
    assert [[c.line for c in g] for g in groups] == [[2, 4], [3]]
    assert groups[0][1].conversations[1]["content"] == "答三"


@pytest.mark.parametrize(
    "size, buckets",
    [pytest.param(0, 1, id="empty"), pytest.param(1, 1, id="tiny"), pytest.param(9 << 20, 3, id="9MiB"), pytest.param(10 << 30, 256, id="capped")],
)
def test_buckets_for(size, buckets):
    assert buckets_for(size) == buckets


def test_bucket_of_is_stable_and_in_range():
    c = cand(2, "答")
    assert all(0 <= bucket_of(c, n) < n for n in (1, 7, 256))
