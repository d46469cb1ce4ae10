"""The data schema every stage after preprocess reads: one chat example per JSONL line.

    {"id": "<16 hex>", "conversations": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

An optional system turn comes first, then user and assistant turns alternate, starting with
a user turn and ending with an assistant turn. ``id`` is a hash of the question's identity,
``question_key``: the user turns with case, width, whitespace and punctuation folded away. It is
the one identity of a question in every input shape (a Q&A-table row's is that of the user turn
its title and detail make), so the same question, from any shape and with any punctuation, gets
the same id and the same split, and is kept once.
"""

from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring as _encode
import re
import unicodedata
from typing import Any, Iterable

ROLES = ("system", "user", "assistant")
# \W is Unicode-aware: CJK characters are word characters, Chinese punctuation is not.
_NOT_WORD = re.compile(r"[\W_]+")


class SchemaError(ValueError):
    """A conversation that breaks the schema; the message says which rule."""


def normalise_key(text: str) -> str:
    """Text folded for duplicate detection: no punctuation, symbols or space; NFKC (full-width → ASCII); casefold.

    Punctuation goes first: NFKC of CJK text full of full-width punctuation is several
    times slower than of the letters alone, and this runs on every row.
    """
    folded = unicodedata.normalize("NFKC", _NOT_WORD.sub("", text)).casefold()
    return folded if folded.isalnum() else _NOT_WORD.sub("", folded)


def question_key(conversations: list[dict[str, str]]) -> str:
    """A question's identity, the same for every input shape: every user turn, normalised, in order.

    Dedup groups on it and the split hashes it (shared/data/dedup.py, split.py)."""
    return "\n".join(normalise_key(t["content"]) for t in conversations if t["role"] == "user")


def example_id(key: str) -> str:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=8).hexdigest()


def validate(conversations: Any) -> list[dict[str, str]]:
    """The conversation if it follows the schema, else SchemaError naming the broken rule."""
    if not isinstance(conversations, list) or not conversations:
        raise SchemaError("conversation is empty")
    expected = "user"
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
            raise SchemaError(f"turn {index} is not {{role, content}}")
        role, content = turn["role"], turn["content"]
        if role not in ROLES or not isinstance(content, str):
            raise SchemaError(f"turn {index} has role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "system":
            if index != 0:
                raise SchemaError(f"turn {index} is a system turn; only the first turn may be one")
            continue
        if role != expected:
            raise SchemaError(f"turn {index} is {role!r} where {expected!r} was expected (turns must alternate)")
        expected = "assistant" if role == "user" else "user"
    if conversations[-1]["role"] != "assistant":
        raise SchemaError("conversation does not end with an assistant turn")
    return conversations


def to_record(conversations: list[dict[str, str]], key: str | None = None) -> dict[str, Any]:
    key = question_key(conversations) if key is None else key
    return {"id": example_id(key), "conversations": conversations}


def dumps(record: dict[str, Any]) -> str:
    """One JSONL line (no newline), UTF-8 kept as is; hand-assembled because it is the hot path."""
    turns = ",".join(
        '{"role":"%s","content":%s}' % (t["role"], _encode(t["content"])) for t in record["conversations"]
    )
    return '{"id":"%s","conversations":[%s]}' % (record["id"], turns)


def load_jsonl(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Records of a split file, each validated (for readers downstream and tests)."""
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = json.loads(line)
        try:
            validate(record.get("conversations"))
        except SchemaError as exc:
            raise SchemaError(f"line {number}: {exc}") from None
        out.append(record)
    return out
