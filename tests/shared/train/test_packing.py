"""shared/train/packing.py: rows respect the token budget and examples never bleed into each other."""

from __future__ import annotations

import pytest
import torch

from shared.train.packing import IGNORE_INDEX, PackedCollator, PackedRows, plan_rows, segments_from_position_ids


@pytest.mark.parametrize(
    ("lengths", "budget", "seed"),
    [
        pytest.param([5, 3, 8, 2, 7, 1, 4], 10, None, id="in-order"),
        pytest.param([5, 3, 8, 2, 7, 1, 4], 10, 7, id="shuffled"),
        pytest.param([12, 3, 3], 10, None, id="oversize-example-gets-own-row"),
        pytest.param([1] * 50, 8, 3, id="many-small"),
    ],
)
def test_rows_hold_every_example_once_within_budget(lengths, budget, seed):
    rows = plan_rows(lengths, budget, seed)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        total = sum(lengths[i] for i in row)
        assert total <= budget or len(row) == 1, (row, total)


def test_row_plan_is_deterministic_per_seed_and_fills_rows():
    lengths = [((i * 37) % 900) + 120 for i in range(400)]
    assert plan_rows(lengths, 8192, 1) == plan_rows(lengths, 8192, 1)
    assert plan_rows(lengths, 8192, 1) != plan_rows(lengths, 8192, 2)
    rows = PackedRows.build([{"input_ids": [0] * n} for n in lengths], 8192, seed=1)
    assert rows.fill_ratio(8192) > 0.95


def test_collator_restarts_positions_and_never_trains_across_a_boundary():
    examples = [
        {"input_ids": [11, 12, 13], "labels": [IGNORE_INDEX, 12, 13]},
        {"input_ids": [21, 22], "labels": [21, 22]},  # first label set: must not become a target of ex. 1
        {"input_ids": [31, 32, 33, 34], "labels": [IGNORE_INDEX, IGNORE_INDEX, 33, 34]},
    ]
    batch = PackedCollator()([examples[:2], [examples[2]]])
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9]
    assert batch["max_length_q"] == 4
    # target of position t is the next token of the SAME example; each example's last position has none
    assert batch["shift_labels"].tolist() == [[12, 13, IGNORE_INDEX, 22, IGNORE_INDEX, IGNORE_INDEX, 33, 34, IGNORE_INDEX]]
    # unshifted labels drop each example's first label, so Trainer's labels[..., 1:] count matches
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 12, 13, IGNORE_INDEX, 22, IGNORE_INDEX, IGNORE_INDEX, 33, 34]]
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == int((batch["shift_labels"] != IGNORE_INDEX).sum())


def test_tail_padding_is_a_separate_fully_masked_segment():
    batch = PackedCollator(pad_to_multiple_of=8)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    assert batch["input_ids"].shape == (1, 8)
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 8]
    assert batch["shift_labels"][0, 3:].eq(IGNORE_INDEX).all()
    assert batch["position_ids"][0, 3:].tolist() == [0, 1, 2, 3, 4]


def test_mismatched_labels_are_rejected():
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        PackedCollator()([{"input_ids": [1, 2, 3], "labels": [1, 2]}])


def test_segments_from_position_ids():
    cu, longest = segments_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert cu.tolist() == [0, 3, 5, 9] and longest == 4
