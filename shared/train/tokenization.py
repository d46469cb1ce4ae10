"""Chat examples → ``input_ids`` + ``labels`` with the base model's own chat template.

Only what the model should learn to say carries loss: every assistant turn's content and the
end-of-turn token that closes it (so the tuned model learns to stop). System and user turns,
the template's role headers and whatever the template puts after the end-of-turn token
(e.g. the ``\\n`` after ``<|im_end|>``) are masked with -100. What a template writes after
the generation prompt but before the content (GLM's ``\\n`` after ``<|assistant|>``) the model
writes itself, so it is trained too. Templates that close an answer with nothing (GLM-4,
ChatGLM3: the next ``<|user|>`` ends it, and generation stops on it) get that token trained
where the next turn begins and appended after the final answer, as GLM-4's own finetune does.

How the template is split into pieces: each turn is rendered twice, once with its content and
once with a placeholder in its place; the text around the placeholder is the template's own
head and tail, so the content's tokens are located exactly even when a template trims or
reformats content. Pieces are tokenized separately (``add_special_tokens=False``: the
template already writes BOS and role markers); the chat templates of our models put special
tokens at every boundary, so this equals tokenizing the whole text (a test checks it).

Truncation keeps an answer trainable: the context (everything before the final answer) gets
``max_input_length`` tokens and the final answer ``max_output_length``. Too much context
first drops the oldest user/assistant exchanges, then cuts the middle of the last question
(its start and its end usually carry the facts and the actual ask), then the system prompt.
A final answer longer than its budget is cut and loses its end-of-turn token, so the model is
never taught to stop mid-sentence. Examples that cannot fit even then are counted in the
report, never silently dropped.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.data.conversation import SchemaError, validate
from shared.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_PLACEHOLDER = "\x00lawtune-placeholder\x00"


@dataclass
class Turn:
    role: str
    head: list[int]  # template text before the content (role header, default system prompt...)
    content: list[int]
    tail: list[int]  # template text after the content (end-of-turn marker, newline...)
    trained_tail: int = 0  # leading tail tokens that carry loss (assistant: through the end-of-turn token)
    trained_head: int = 0  # trailing head tokens that carry loss: what the model writes after the generation prompt

    def __len__(self) -> int:
        return len(self.head) + len(self.content) + len(self.tail)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    flags: tuple[str, ...] = ()

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class TokenizationReport:
    """What truncation did to a split; goes into training_summary.json and the log."""

    examples: int = 0
    kept: int = 0
    counts: Counter = field(default_factory=Counter)
    dropped_ids: list[str] = field(default_factory=list)
    tokens: int = 0
    trained_tokens: int = 0
    max_length: int = 0

    def add(self, example_id: str, encoded: Encoded | None, reason: str | None = None) -> None:
        self.examples += 1
        if encoded is None:
            self.counts[reason or "dropped"] += 1
            self.dropped_ids.append(example_id)
            return
        self.kept += 1
        self.counts.update(encoded.flags)
        self.tokens += len(encoded.input_ids)
        self.trained_tokens += encoded.trained_tokens
        self.max_length = max(self.max_length, len(encoded.input_ids))

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "kept": self.kept,
            "dropped": self.examples - self.kept,
            **{k: self.counts.get(k, 0) for k in ("truncated_input", "truncated_output", "dropped_context_turns", "too_long", "no_target")},
            "dropped_ids": self.dropped_ids[:50],
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "max_length": self.max_length,
        }


class ChatEncoder:
    """Encodes conversations with one tokenizer's chat template under the config's length limits."""

    def __init__(self, tokenizer, max_input_length: int, max_output_length: int):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"base model tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
                "use an instruct/chat model (its tokenizer_config.json or chat_template.jinja defines one)"
            )
        self.tokenizer = tokenizer
        self.max_input_length = max_input_length
        self.max_output_length = max_output_length
        self.end_of_turn = _end_of_turn_ids(tokenizer)
        # GLM-4 and ChatGLM3 templates write nothing after an answer: the next turn's role token
        # (<|user|>) ends it, and generation stops there. That token is then trained as the answer's end.
        self.closing = self._closing_token()
        if self.closing is not None:
            self.end_of_turn.add(self.closing)

    def _closing_token(self) -> int | None:
        """The token that ends an assistant turn when the template itself closes it with nothing."""
        pair = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PLACEHOLDER}]
        try:
            two = self._render(pair)
            three = self._render([*pair, {"role": "user", "content": "q"}])
        except Exception:  # noqa: BLE001 - a template that refuses the probe closes its turns itself
            return None
        if _PLACEHOLDER not in two or not three.startswith(two):
            return None
        if any(t in self.end_of_turn for t in self._ids(two.rpartition(_PLACEHOLDER)[2])):
            return None  # the template writes its own end-of-turn token (ChatML's <|im_end|>, Llama 3's <|eot_id|>)
        following = self._ids(three[len(two):])
        if following and self.tokenizer.convert_ids_to_tokens(following[0]) in self.tokenizer.get_added_vocab():
            return following[0]
        return self.tokenizer.eos_token_id

    # --- rendering -----------------------------------------------------------------------

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def split_turns(self, conversations: list[dict[str, str]]) -> list[Turn]:
        """The rendered conversation as per-turn (head, content, tail) token lists."""
        turns: list[Turn] = []
        before = ""
        for k, message in enumerate(conversations):
            prefix = conversations[:k]
            start = self._render(prefix, generation_prompt=True) if message["role"] == "assistant" else before
            if not start.startswith(before):
                raise ConfigError("the base model's chat template renders a conversation's prefix differently from the whole; it cannot be masked per turn")
            full = self._render(conversations[: k + 1])
            marked = self._render([*prefix, {**message, "content": _PLACEHOLDER}])
            if not full.startswith(start) or _PLACEHOLDER not in marked:
                raise ConfigError("the base model's chat template is not prefix-stable; it cannot be masked per turn")
            body = full[len(start):]
            head_text, _, tail_text = marked[len(start):].partition(_PLACEHOLDER) if marked.startswith(start) else ("", "", "")
            if body.startswith(head_text) and body.endswith(tail_text) and len(head_text) + len(tail_text) <= len(body):
                content_text = body[len(head_text): len(body) - len(tail_text)]
            else:  # content-dependent template logic: keep the whole body as content
                head_text, content_text, tail_text = "", body, ""
            # The generation prompt is given at inference; what the template adds after it (GLM's "\n"
            # after <|assistant|>) the model writes itself, so it is trained with the answer.
            prompt_ids, written_ids = self._ids(start[len(before):]), self._ids(head_text)
            turn = Turn(message["role"], prompt_ids + written_ids, self._ids(content_text), self._ids(tail_text))
            if message["role"] == "assistant":
                turn.trained_head = len(written_ids)
                turn.trained_tail = _through_end_of_turn(turn.tail, self.end_of_turn)
            turns.append(turn)
            before = full
        return turns

    # --- truncation ----------------------------------------------------------------------

    def encode(self, conversations: list[dict[str, str]]) -> tuple[Encoded | None, str | None]:
        """``(encoded, None)``, or ``(None, reason)`` for an example that cannot fit."""
        flags: list[str] = []
        conversations = list(conversations)
        turns = self.split_turns(conversations)
        while _context_len(turns) > self.max_input_length and _droppable_pair(conversations) is not None:
            i = _droppable_pair(conversations)
            del conversations[i: i + 2]
            turns = self.split_turns(conversations)
            if "dropped_context_turns" not in flags:
                flags.append("dropped_context_turns")
        overflow = _context_len(turns) - self.max_input_length
        if overflow > 0:
            flags.append("truncated_input")
            last_user = max(i for i, t in enumerate(turns) if t.role == "user")
            overflow = _cut_middle(turns[last_user], overflow, keep_at_least=1)
            if overflow > 0 and turns[0].role == "system":
                overflow = _cut_middle(turns[0], overflow, keep_at_least=0)
            if overflow > 0:
                return None, "too_long"
        answer = turns[-1]
        if self.closing is not None and not any(t in self.end_of_turn for t in answer.tail):
            answer.tail = [*answer.tail, self.closing]
            answer.trained_tail = len(answer.tail)
        if answer.trained_head + len(answer.content) + len(answer.tail) > self.max_output_length:
            flags.append("truncated_output")
            answer.content = answer.content[: max(0, self.max_output_length - answer.trained_head)]
            answer.tail, answer.trained_tail = [], 0
        encoded = _assemble(turns, tuple(flags), self.end_of_turn)
        if encoded.trained_tokens == 0:
            return None, "no_target"
        return encoded, None

    def encode_all(self, records: list[dict[str, Any]]) -> tuple[list[dict[str, list[int]]], TokenizationReport]:
        report = TokenizationReport()
        rows: list[dict[str, list[int]]] = []
        for record in records:
            encoded, reason = self.encode(record["conversations"])
            report.add(str(record.get("id", "?")), encoded, reason)
            if encoded is not None:
                rows.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
        return rows, report


def _end_of_turn_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token in tokenizer.get_vocab():
            ids.add(token_id)
    return ids


def _through_end_of_turn(tail: list[int], end_of_turn: set[int]) -> int:
    for i, token in enumerate(tail):
        if token in end_of_turn:
            return i + 1
    return len(tail)  # no known marker: the template's whole tail closes the turn


def _context_len(turns: list[Turn]) -> int:
    return sum(len(t) for t in turns[:-1]) + len(turns[-1].head) - turns[-1].trained_head


def _droppable_pair(conversations: list[dict[str, str]]) -> int | None:
    """Index of the oldest user/assistant exchange that is not the last one, if any."""
    first = 1 if conversations and conversations[0]["role"] == "system" else 0
    users = sum(1 for m in conversations if m["role"] == "user")
    return first if users > 1 else None


def _cut_middle(turn: Turn, overflow: int, keep_at_least: int) -> int:
    cut = min(overflow, max(0, len(turn.content) - keep_at_least))
    if cut:
        keep = len(turn.content) - cut
        front = (keep + 1) // 2
        turn.content = turn.content[:front] + turn.content[len(turn.content) - (keep - front):]
    return overflow - cut


def _assemble(turns: list[Turn], flags: tuple[str, ...], end_of_turn: set[int] = frozenset()) -> Encoded:
    input_ids: list[int] = []
    labels: list[int] = []
    open_answer = False  # the previous answer's end-of-turn token is the start of this turn's head
    for turn in turns:
        trained = turn.role == "assistant"
        input_ids += turn.head + turn.content + turn.tail
        head_labels = [IGNORE_INDEX] * (len(turn.head) - turn.trained_head) + turn.head[len(turn.head) - turn.trained_head:]
        if open_answer and turn.head and turn.head[0] in end_of_turn:
            head_labels[0] = turn.head[0]
        labels += head_labels
        labels += list(turn.content) if trained else [IGNORE_INDEX] * len(turn.content)
        labels += turn.tail[: turn.trained_tail] + [IGNORE_INDEX] * (len(turn.tail) - turn.trained_tail)
        open_answer = trained and not any(t in end_of_turn for t in turn.tail)
    return Encoded(input_ids, labels, flags)


def load_split(path: Path) -> list[dict[str, Any]]:
    """Records of one preprocess split (JSONL); DataError naming file and line on a bad one."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                validate(record.get("conversations") if isinstance(record, dict) else None)
            except (ValueError, SchemaError) as exc:
                raise DataError(f"{path.name} line {number}: {exc}") from None
            records.append(record)
    return records


def _examples(item: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return item if isinstance(item, list) else [item]


def audit_end_labels(collator, rows: list[dict[str, Any]], end_ids: set[int], sample: int = 32) -> dict[str, Any] | None:
    """Do the batches the model trains on still teach it to stop?

    Counts end-of-turn tokens among the labels of the first ``sample`` training rows as encoded,
    and again after ``collator`` made a batch of them. The classic bug masks padding in the
    labels by id; with ``pad_token_id == eos_token_id`` (SmolLM2, Llama 3, Qwen...) that masks
    every end-of-turn label too, and the tuned model never learns to stop. evaluate's gate
    blocks a run whose collator dropped them (shared/evaluate/gate.py, ``training_checks``).
    None when the collator cannot batch the rows outside the Trainer."""
    import torch

    # By index, not a slice: the fast path's packed rows (shared/train/packing.PackedRows) are a
    # list-like of rows, each a list of examples, and slice like no list.
    picked = [rows[i] for i in range(min(sample, len(rows)))]
    if not picked or not end_ids:
        return None
    before = sum(1 for item in picked for example in _examples(item) for label in example["labels"] if label in end_ids)
    try:
        batch = collator([[dict(e) for e in item] if isinstance(item, list) else dict(item) for item in picked])
    except Exception as exc:  # noqa: BLE001 - an audit, never a reason to stop training
        log.debug("end-of-turn label audit skipped: %s", exc)
        return None
    labels = torch.as_tensor(batch["labels"])
    after = int(sum(int((labels == token).sum()) for token in end_ids))
    return {"token_ids": sorted(end_ids), "examples": len(picked), "in_examples": before, "after_collator": after}
