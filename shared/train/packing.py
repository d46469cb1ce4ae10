"""Padding-free packing: several tokenised examples share one row, none sees another.

Dynamic padding (the tutorial's DataCollatorForSeq2Seq) spends about a third of a batch's
compute on pad tokens when lengths spread from ~100 to ~1,000 tokens. Here examples are
concatenated into rows of at most ``max_tokens`` tokens with no padding at all, and each
row carries what the attention kernel needs to keep examples apart:

- ``position_ids`` restart at 0 for every example (RoPE sees each one as if alone, and
  transformers' own mask builders detect the boundaries from them);
- ``cu_seq_lens_q/k`` and ``max_length_q/k`` (the varlen attention arguments, the names
  transformers' flash-attention path uses) mark where each example starts;
- ``shift_labels`` holds each position's target already shifted *within its example*, so the
  last token of one example is never trained to predict the first token of the next.

``labels`` (unshifted, first label of every example set to -100) stays in the batch so
Trainer counts the loss-carrying tokens exactly as it does for padded batches.

Only torch is imported here (the GPU image has no `datasets`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

IGNORE_INDEX = -100


def plan_rows(lengths: Sequence[int], max_tokens: int, seed: int | None = None) -> list[list[int]]:
    """Group example indices into rows of at most ``max_tokens`` tokens.

    Examples are visited in a seeded random order (or in the given order when ``seed`` is
    None) and each goes into the first open row it fits (first-fit), so rows come out nearly
    full without sorting by length, which would put all long examples in the same steps.
    An example longer than ``max_tokens`` gets a row of its own rather than being cut.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    order = list(range(len(lengths)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    room: list[int] = []
    # Only the last few rows can still have room worth scanning; bounding the scan keeps this
    # linear for large datasets and keeps data order roughly the shuffled order.
    window = 64
    for idx in order:
        n = int(lengths[idx])
        placed = False
        for r in range(max(0, len(rows) - window), len(rows)):
            if room[r] >= n:
                rows[r].append(idx)
                room[r] -= n
                placed = True
                break
        if not placed:
            rows.append([idx])
            room.append(max_tokens - n)
    return rows


def shift_within(labels: Sequence[int]) -> list[int]:
    """Targets for each position of ONE example: the next token's label, -100 at its end."""
    return list(labels[1:]) + [IGNORE_INDEX]


@dataclass
class PackedRows:
    """A list-like dataset whose items are rows: lists of examples ({"input_ids", "labels"})."""

    examples: Sequence[dict[str, Any]]
    rows: list[list[int]]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        return [self.examples[j] for j in self.rows[i]]

    @classmethod
    def build(cls, examples: Sequence[dict[str, Any]], max_tokens: int, seed: int | None = None) -> "PackedRows":
        return cls(examples, plan_rows([len(e["input_ids"]) for e in examples], max_tokens, seed))

    def fill_ratio(self, max_tokens: int) -> float:
        used = sum(len(self.examples[j]["input_ids"]) for row in self.rows for j in row)
        return used / (max_tokens * max(1, len(self.rows)))


class PackedCollator:
    """Flattens a batch of rows (or of plain examples) into ONE padding-free sequence.

    Trainer hands this a list of dataset items; an item may be a row (a list of examples,
    from :class:`PackedRows`) or a single example dict. All examples of the batch become one
    (1, total_tokens) sequence: the varlen kernel needs no batch dimension, and one long
    sequence makes the largest matrix products.
    """

    def __init__(self, pad_to_multiple_of: int | None = None):
        # Optional tail padding (a separate "example" of pad tokens, fully masked) for kernels
        # or compilers that prefer round shapes; off by default because it is wasted work.
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[Any]) -> dict[str, Any]:
        import torch

        examples: list[dict[str, Any]] = []
        for item in items:
            examples.extend(item if isinstance(item, (list, tuple)) else [item])
        if not examples:
            raise ValueError("PackedCollator got an empty batch")
        input_ids: list[int] = []
        labels: list[int] = []
        shift_labels: list[int] = []
        position_ids: list[int] = []
        cu = [0]
        for ex in examples:
            ids = list(ex["input_ids"])
            lab = list(ex.get("labels", ids))
            if len(ids) != len(lab):
                raise ValueError(f"example has {len(ids)} input_ids but {len(lab)} labels")
            if not ids:
                continue
            input_ids += ids
            labels += [IGNORE_INDEX] + lab[1:]
            shift_labels += shift_within(lab)
            position_ids += range(len(ids))
            cu.append(cu[-1] + len(ids))
        if self.pad_to_multiple_of:
            pad = -len(input_ids) % self.pad_to_multiple_of
            if pad:
                input_ids += [0] * pad
                labels += [IGNORE_INDEX] * pad
                shift_labels += [IGNORE_INDEX] * pad
                position_ids += range(pad)
                cu.append(cu[-1] + pad)
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        cu_t = torch.tensor(cu, dtype=torch.int32)
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "shift_labels": torch.tensor([shift_labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
            "cu_seq_lens_q": cu_t,
            "cu_seq_lens_k": cu_t,
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
        }


def segments_from_position_ids(position_ids) -> tuple[Any, int]:
    """(cu_seqlens int32, max_len) from position_ids that restart at 0 per example (batch 1)."""
    import torch

    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype, device=starts.device), starts])
    cu = torch.cat([starts, torch.tensor([pos.numel()], device=pos.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())
