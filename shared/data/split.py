"""The deterministic train/dev/test split.

Each example's split follows from a hash of its question's identity (``conversation.question_key``,
the same for every input shape) salted with
``split_seed``: a point ``u`` in [0, 1); ``u < test_ratio`` → test, ``u < test_ratio +
dev_ratio`` → dev, else train. The same question therefore never lands in two splits, and
a rerun (or a run on a superset of the data) puts every question where it was before.

Tiny datasets: when the ratios give dev fewer than ``min_dev`` (or test fewer than
``min_test``) examples, the train examples with the smallest ``u`` — the ones nearest the
dev band, so the rule stays a pure function of the data — move over, as long as train keeps
at least one example.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "dev", "test")


def split_point(key: str, seed: str) -> float:
    """Where a normalised question falls in [0, 1) for this seed."""
    return split_point_bytes(key.encode("utf-8"), seed)


def split_point_bytes(key: bytes, seed: str) -> float:
    digest = hashlib.blake2b(key, digest_size=8, key=seed.encode("utf-8")[:64]).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign(u: float, dev_ratio: float, test_ratio: float) -> str:
    if u < test_ratio:
        return "test"
    if u < test_ratio + dev_ratio:
        return "dev"
    return "train"


def top_up(counts: dict[str, int], minimum: dict[str, int], reserve: list[tuple[float, str, bytes]]) -> dict[str, set[bytes]]:
    """Train lines to move so dev and test reach their minimum; ``counts`` is updated.

    ``reserve`` holds ``(u, key, line)`` of the train examples with the smallest ``u`` (at
    least ``sum(minimum.values())`` of them when train has that many).
    """
    nearest = sorted(reserve)
    moved: dict[str, set[bytes]] = {"dev": set(), "test": set()}
    for split in ("dev", "test"):
        while counts[split] < minimum.get(split, 0) and nearest and counts["train"] > 1:
            moved[split].add(nearest.pop(0)[2])
            counts[split] += 1
            counts["train"] -= 1
    return moved
