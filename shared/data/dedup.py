"""Duplicates and the best-reply rule: one example per normalised question.

Rows are grouped by their question's identity (``conversation.question_key``: every user turn,
normalised), whatever shape they came from; a Q&A-table row's user turn is its title plus its
detail (``preprocessing.compose_user``), so the replies to one question, which repeat its title
and detail, form one group, and the same question in an Alpaca, prompt/response or chat input
joins it too. Each group keeps exactly one row, chosen by this rule, in order:

  1. a row flagged best (``is_best`` reads as true: ``1``, ``1.0``, ``true``, ``yes``, ``y``,
     ``t``, ``是``; case and surrounding space ignored) beats an unflagged one (``0``,
     ``0.0``, ``false``, ``no``, ``n``, ``f``, ``否`` or empty); any other value rejects the
     row as ``invalid_is_best``, because it usually means shifted columns;
  2. among rows equal on 1 (several flagged, or none), the longest answer in characters
     after cleaning wins — in Zhidao data the longer reply is the one that explains;
  3. among rows equal on 1 and 2, the one earliest in the file wins (with several inputs, the
     earlier input's row: ``--input`` order).

Every other row of the group is rejected with the reason that says how it relates to the
kept one: ``duplicate_exact`` (the same conversation after cleaning),
``duplicate_normalised`` (the same once case, width, spacing and punctuation are folded),
or ``not_best_reply`` (the same question with a different answer that lost by the rule).
Rows rejected for length or emptiness never take part, so a flagged but empty reply does
not hide a good unflagged one.

Grouping 1,000,000 rows must not hold them all in memory: candidates are spilled to bucket
files by a hash of the key (``spill_record``/``bucket_of``) and each bucket is grouped on its
own (``read_groups``).
"""

from __future__ import annotations

import json
import marshal
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from shared.data.conversation import normalise_key

TRUE = frozenset({"1", "1.0", "true", "yes", "y", "t", "是"})
FALSE = frozenset({"0", "0.0", "false", "no", "n", "f", "否", ""})


def parse_flag(value: str) -> bool | None:
    """``is_best`` as a bool; None when the value is not a recognised spelling."""
    folded = value.strip().lower()
    if folded in TRUE:
        return True
    if folded in FALSE:
        return False
    return None


class Candidate(NamedTuple):
    """A cleaned row that passed every check, with what grouping and splitting need.

    ``record`` is the finished JSONL line (UTF-8, no newline) and ``raw`` the source row
    (marshalled): both are built in pass 1, in parallel, and stay bytes, so pass 2 only
    compares, picks and copies them and decodes a row only when it reports it.
    """

    key: str
    digest: bytes  # blake2b-8 of key: the id, the bucket
    flag: bool
    answer_chars: int
    question_chars: int
    line: int
    split_u: float
    record: bytes
    raw: bytes
    source: int = 0  # which input (several --input), for the tie-break and per-input counts

    @property
    def conversations(self) -> list[dict[str, str]]:
        return json.loads(self.record)["conversations"]

    @property
    def raw_row(self) -> Any:
        raw = marshal.loads(self.raw)
        if isinstance(raw, list) and None in raw:  # the reply, left out of the spill (unchanged by cleaning)
            raw[raw.index(None)] = self.conversations[-1]["content"]
        return raw


def resolve(group: list[Candidate]) -> tuple[Candidate, list[tuple[Candidate, str]]]:
    """The kept row of one question's group and the others with their rejection reasons."""
    if len(group) == 1:
        return group[0], []
    winner = min(group, key=lambda c: (not c.flag, -c.answer_chars, c.source, c.line))
    kept: _Folded | None = None
    losers = []
    for cand in group:
        if cand is winner:
            continue
        if cand.record == winner.record:  # same key → same id, so equal lines mean equal conversations
            reason = "duplicate_exact"
        else:
            kept = kept or _Folded(winner)
            reason = "duplicate_normalised" if kept.same_as(_Folded(cand)) else "not_best_reply"
        losers.append((cand, reason))
    return winner, losers


class _Folded:
    """A conversation's turns, folded lazily: first a cheap fold of each turn's beginning,
    which tells most different answers apart, then the full fold only when those agree."""

    _HEAD = 48

    def __init__(self, cand: Candidate):
        self.turns = [t for t in cand.conversations if t["role"] != "system"]
        # The last characters of a folded prefix may change once the text goes on (NFKC).
        self.heads = [(t["role"], normalise_key(t["content"][: self._HEAD])[:-2]) for t in self.turns]
        self._full: list[tuple[str, str]] | None = None

    @property
    def full(self) -> list[tuple[str, str]]:
        if self._full is None:
            self._full = [(t["role"], normalise_key(t["content"])) for t in self.turns]
        return self._full

    def same_as(self, other: "_Folded") -> bool:
        if len(self.heads) != len(other.heads):
            return False
        for (role_a, a), (role_b, b) in zip(self.heads, other.heads):
            if role_a != role_b or not (a.startswith(b) or b.startswith(a)):
                return False
        return self.full == other.full


def spill_record(cand: Candidate) -> bytes:
    """One candidate as a length-prefixed marshal record (a private, same-process-version format)."""
    data = marshal.dumps(tuple(cand))  # marshal takes plain tuples only
    return len(data).to_bytes(4, "little") + data


def bucket_of(cand: Candidate, buckets: int) -> int:
    return int.from_bytes(cand.digest[:4], "big") % buckets


def read_groups(paths: list[Path]) -> Iterator[list[Candidate]]:
    """The groups of one bucket (its spill files in write order), in order of first row.

    A bucket is sized to fit in memory many times over; reading it whole and slicing is
    far faster than ``marshal.load`` on a file object, which reads in tiny pieces.
    """
    groups: dict[str, list[Candidate]] = {}
    for path in paths:
        blob = memoryview(Path(path).read_bytes())
        pos, end = 0, len(blob)
        while pos < end:
            size = int.from_bytes(blob[pos : pos + 4], "little")
            cand = Candidate._make(marshal.loads(blob[pos + 4 : pos + 4 + size]))
            pos += 4 + size
            group = groups.get(cand.key)
            if group is None:
                groups[cand.key] = [cand]
            else:
                group.append(cand)
    return iter(groups.values())


def buckets_for(input_bytes: int, target_bytes: int = 4 << 20, most: int = 256) -> int:
    """How many spill buckets keep each near ``target_bytes``."""
    return max(1, min(most, -(-input_bytes // target_bytes)))
