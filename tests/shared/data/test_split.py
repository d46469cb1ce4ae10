"""shared/data/split.py: deterministic, salted, ratio-respecting split; minimum sizes for tiny sets."""

import pytest

from shared.data.split import assign, split_point, top_up


def test_split_point_is_deterministic_and_salted():
    assert split_point("工资拖欠", "lawtune") == split_point("工资拖欠", "lawtune")
    assert split_point("工资拖欠", "lawtune") != split_point("工资拖欠", "other-seed")
    assert 0.0 <= split_point("工资拖欠", "lawtune") < 1.0


@pytest.mark.parametrize(
    "u, split",
    [pytest.param(0.0, "test", id="0"), pytest.param(0.099, "test", id="below-test"), pytest.param(0.1, "dev", id="dev-edge"),
     pytest.param(0.249, "dev", id="below-dev"), pytest.param(0.25, "train", id="train-edge"), pytest.param(0.99, "train", id="top")],
)
def test_assign_bands(u, split):
    assert assign(u, dev_ratio=0.15, test_ratio=0.1) == split


def test_ratios_hold_on_many_keys():
    splits = [assign(split_point(f"问题{i}", "s"), 0.1, 0.2) for i in range(20000)]
    assert abs(splits.count("test") / 20000 - 0.2) < 0.015
    assert abs(splits.count("dev") / 20000 - 0.1) < 0.015


@pytest.mark.parametrize(
    "counts, minimum, moved_dev, moved_test, after",
    [
        pytest.param({"train": 5, "dev": 0, "test": 0}, {"dev": 1, "test": 1}, 1, 1, {"train": 3, "dev": 1, "test": 1}, id="tiny"),
        pytest.param({"train": 1, "dev": 0, "test": 0}, {"dev": 1, "test": 1}, 0, 0, {"train": 1, "dev": 0, "test": 0}, id="train-keeps-one"),
        pytest.param({"train": 2, "dev": 0, "test": 0}, {"dev": 2, "test": 1}, 1, 0, {"train": 1, "dev": 1, "test": 0}, id="partial"),
        pytest.param({"train": 9, "dev": 3, "test": 2}, {"dev": 1, "test": 1}, 0, 0, {"train": 9, "dev": 3, "test": 2}, id="enough"),
    ],
)
def test_top_up_moves_the_nearest_train_examples(counts, minimum, moved_dev, moved_test, after):
    reserve = sorted((0.3 + i / 100, f"k{i}", f"line{i}".encode()) for i in range(min(counts["train"], 3)))
    moved = top_up(counts, minimum, reserve)
    assert (len(moved["dev"]), len(moved["test"])) == (moved_dev, moved_test)
    assert counts == after
    if moved_dev:
        assert b"line0" in moved["dev"]  # the smallest u goes first, to dev (nearest its band)
