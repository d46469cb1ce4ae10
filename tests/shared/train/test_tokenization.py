"""shared/train/tokenization.py: which tokens carry loss, and what truncation does.

Unit tests use a word-level tokenizer with the ChatML template (the bundled model's format),
one token per word, so expected labels can be written out by hand; the integration test
repeats the token-by-token check with the bundled model's real tokenizer.
"""

from __future__ import annotations

import json

import pytest

from shared.core.errors import ConfigError, DataError
from shared.train.tokenization import IGNORE_INDEX, ChatEncoder, load_split
from tests.tiny import glm_tokenizer, word_tokenizer

def conv(*pairs: str, system: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(pairs):
        turns.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return turns


def table(tokenizer, encoded) -> list[tuple[str, bool]]:
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    return [(t, label != IGNORE_INDEX) for t, label in zip(tokens, encoded.labels)]


def test_two_turn_conversation_trains_exactly_the_assistant_tokens_and_their_end_of_turn():
    tok = word_tokenizer()
    encoded, reason = ChatEncoder(tok, 64, 64).encode(conv("hi there", "hello", "how are you", "fine thanks"))
    assert reason is None
    S, E = "<|im_start|>", "<|im_end|>"
    expected = [
        # default system prompt the template inserts: masked
        (S, False), ("system", False), ("\n", False), ("be", False), ("brief", False), (E, False), ("\n", False),
        # user turn 1: masked
        (S, False), ("user", False), ("\n", False), ("hi", False), ("there", False), (E, False), ("\n", False),
        # assistant turn 1: header masked, content + <|im_end|> trained, trailing newline masked
        (S, False), ("assistant", False), ("\n", False), ("hello", True), (E, True), ("\n", False),
        # user turn 2: masked
        (S, False), ("user", False), ("\n", False), ("how", False), ("are", False), ("you", False), (E, False), ("\n", False),
        # assistant turn 2: trained the same way
        (S, False), ("assistant", False), ("\n", False), ("fine", True), ("thanks", True), (E, True), ("\n", False),
    ]
    assert table(tok, encoded) == expected
    # labels are the input ids themselves where trained (the model shifts them)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(encoded.input_ids, encoded.labels))
    # and the pieces equal tokenizing the whole rendered conversation at once
    whole = tok.apply_chat_template(conv("hi there", "hello", "how are you", "fine thanks"), tokenize=False)
    assert tok(whole, add_special_tokens=False)["input_ids"] == encoded.input_ids


@pytest.mark.parametrize(
    ("kind", "prefix"),
    [pytest.param("glm4", ["[gMASK]", "<sop>"], id="glm-4"), pytest.param("chatglm3", ["[gMASK]", "sop"], id="chatglm3")],
)
def test_glm_templates_train_each_answer_its_newline_and_the_user_token_that_ends_it(kind, prefix):
    """GLM-4 / ChatGLM3 write nothing after an answer: the next <|user|> ends it, and generation
    stops on it (both models' generation configs list it). So that token is trained where the next
    turn begins, and appended (trained) after the final answer, as GLM-4's own finetune script does.
    The "\n" after <|assistant|> is not part of the generation prompt: the model writes it, so it
    is trained too. [gMASK]<sop>, the system and user turns and the role headers are masked."""
    tok = glm_tokenizer(kind)
    conversation = conv("hi there", "hello", "how are you", "fine thanks", system="be brief")
    encoded, reason = ChatEncoder(tok, 64, 64).encode(conversation)
    assert reason is None
    U, A = "<|user|>", "<|assistant|>"
    expected = [
        *[(t, False) for t in prefix],
        ("<|system|>", False), ("\n", False), ("be", False), ("brief", False),
        (U, False), ("\n", False), ("hi", False), ("there", False),
        (A, False), ("\n", True), ("hello", True),
        (U, True), ("\n", False), ("how", False), ("are", False), ("you", False),  # <|user|> ends the first answer
        (A, False), ("\n", True), ("fine", True), ("thanks", True),
        (U, True),  # appended: the final answer's end
    ]
    assert table(tok, encoded) == expected
    whole = tok.apply_chat_template(conversation, tokenize=False)
    assert tok(whole, add_special_tokens=False)["input_ids"] == encoded.input_ids[:-1]
    # the prompt evaluation and serving give the model ends exactly where the trained tokens begin
    prompt = tok.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert encoded.labels[n - 1] == IGNORE_INDEX and encoded.labels[n] != IGNORE_INDEX

    cut, _ = ChatEncoder(tok, 64, 2).encode(conv("hi", "w1 w2 w3 w4"))
    assert _trained_words(tok, cut) == ["\n", "w1"], "a cut answer is not taught to stop"


def _trained_words(tok, encoded) -> list[str]:
    return [t for t, trained in table(tok, encoded) if trained]


@pytest.mark.parametrize(
    ("conversation", "max_in", "max_out", "flags", "trained", "question_left"),
    [
        pytest.param(
            conv("w1 w2 w3 w4 w5 w6 w7 w8 w9", "fine thanks"), 20, 8, ("truncated_input",),
            ["fine", "thanks", "<|im_end|>"], ["w1", "w2", "w3", "w8", "w9"],
            id="long-question-cut-in-the-middle-answer-intact",
        ),
        pytest.param(
            conv("hi", "w1 w2 w3 w4 w5 w6 w7 w8 w9"), 32, 4, ("truncated_output",),
            ["w1", "w2", "w3", "w4"], ["hi"],
            id="long-answer-cut-and-not-taught-to-stop",
        ),
        pytest.param(
            conv("hi", "hello", "how are you", "fine"), 20, 8, ("dropped_context_turns",),
            ["fine", "<|im_end|>"], ["how", "are", "you"],
            id="oldest-exchange-dropped-first",
        ),
        pytest.param(
            conv("hi there", "ok"), 64, 64, (), ["ok", "<|im_end|>"], ["hi", "there"], id="fits",
        ),
    ],
)
def test_truncation_keeps_the_answer(conversation, max_in, max_out, flags, trained, question_left):
    tok = word_tokenizer()
    encoder = ChatEncoder(tok, max_in, max_out)
    encoded, reason = encoder.encode(conversation)
    assert reason is None
    assert encoded.flags == flags
    assert _trained_words(tok, encoded) == trained
    tokens = [t for t, _ in table(tok, encoded)]
    last_user = len(tokens) - tokens[::-1].index("user") - 1
    question = tokens[last_user + 2: tokens.index("<|im_end|>", last_user)]
    assert question == question_left
    # the context (up to the final answer's header) fits its budget, the answer its own
    answer_start = len(tokens) - tokens[::-1].index("assistant") + 1
    assert answer_start <= max_in
    assert len(tokens) - answer_start <= max_out


def test_example_whose_headers_alone_exceed_the_budget_is_counted_not_silently_dropped():
    tok = word_tokenizer()
    encoder = ChatEncoder(tok, 8, 8)
    records = [
        {"id": "a" * 16, "conversations": conv("hi", "ok")},  # 7 system + 6 user + 3 header tokens > 8
        {"id": "b" * 16, "conversations": conv("hi", "ok", system="w1")},
    ]
    rows, report = ChatEncoder(tok, 64, 64).encode_all(records)
    assert len(rows) == 2 and report.kept == 2 and report.as_dict()["dropped"] == 0
    rows, report = encoder.encode_all(records)
    summary = report.as_dict()
    assert rows == [] or all(len(r["input_ids"]) <= 16 for r in rows)
    assert summary["examples"] == 2
    assert summary["too_long"] == 2 - len(rows)
    assert summary["dropped_ids"] == [r["id"] for r in records][: summary["too_long"]]


def test_report_counts_every_kind_of_truncation():
    tok = word_tokenizer()
    records = [
        {"id": "long-q", "conversations": conv("w1 w2 w3 w4 w5 w6 w7 w8 w9", "ok")},
        {"id": "long-a", "conversations": conv("hi", "w1 w2 w3 w4 w5 w6 w7 w8 w9")},
        {"id": "fits", "conversations": conv("hi", "ok")},
    ]
    rows, report = ChatEncoder(tok, 16, 6).encode_all(records)
    summary = report.as_dict()
    assert (summary["examples"], summary["kept"], summary["truncated_input"], summary["truncated_output"]) == (3, 3, 1, 1)
    assert summary["trained_tokens"] == sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows)
    assert summary["max_length"] == max(len(r["input_ids"]) for r in rows)


def test_tokenizer_without_chat_template_is_a_config_error():
    with pytest.raises(ConfigError, match="no chat template"):
        ChatEncoder(word_tokenizer(template=None), 16, 16)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        pytest.param("{not json", "line 2", id="bad-json"),
        pytest.param(json.dumps({"id": "x", "conversations": [{"role": "user", "content": "q"}]}), "line 2: conversation does not end", id="no-answer"),
        pytest.param(json.dumps(["a list"]), "line 2", id="not-an-object"),
    ],
)
def test_bad_split_lines_name_file_and_line(tmp_path, line, needle):
    path = tmp_path / "train.jsonl"
    good = json.dumps({"id": "y", "conversations": conv("hi", "ok")})
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=needle) as info:
        load_split(path)
    assert "train.jsonl" in str(info.value)


@pytest.mark.integration
def test_bundled_template_two_turns_token_by_token(bundled_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    conversation = conv("What is a contract?", "An agreement.", "劳动合同到期不续签有补偿吗?", "有，按工作年限支付。")
    encoded, _ = ChatEncoder(tok, 512, 512).encode(conversation)
    whole = tok.apply_chat_template(conversation, tokenize=False)
    assert tok(whole, add_special_tokens=False)["input_ids"] == encoded.input_ids
    # contiguous trained spans: exactly the two answers, each closed by <|im_end|>
    spans, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    assert [tok.decode(s) for s in spans] == ["An agreement.<|im_end|>", "有，按工作年限支付。<|im_end|>"]
    # every position before the first answer (system prompt, question, assistant header) is masked
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    first = encoded.labels.index(next(label for label in encoded.labels if label != IGNORE_INDEX))
    assert encoded.input_ids[first - len(header): first] == header
    assert tok.decode(encoded.input_ids[:first]).endswith("What is a contract?<|im_end|>\n<|im_start|>assistant\n")


def _end_rows():
    # Two examples whose last label is the end-of-turn token 2 (pad is 2 as well: pad = eos).
    return [{"input_ids": [5, 6, 7, 2], "labels": [-100, 6, 7, 2]}, {"input_ids": [8, 9, 2], "labels": [-100, 9, 2]}]


def test_end_label_audit_counts_the_end_tokens_a_collator_keeps_and_one_that_masks_pad_by_id_drops():
    from transformers import DataCollatorForLanguageModeling

    from shared.train.tokenization import audit_end_labels

    class Tok:  # what DataCollatorForLanguageModeling needs of a tokenizer: pad by id
        pad_token_id, pad_token, padding_side = 2, "<eos>", "right"

        def pad(self, features, return_tensors=None, **kwargs):
            import torch
            width = max(len(f["input_ids"]) for f in features)
            ids = [f["input_ids"] + [2] * (width - len(f["input_ids"])) for f in features]
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features])}

    def keeps(items):
        import torch
        width = max(len(f["labels"]) for f in items)
        return {"labels": torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in items])}

    assert audit_end_labels(keeps, _end_rows(), {2}) == {"token_ids": [2], "examples": 2, "in_examples": 2, "after_collator": 2}
    masked = audit_end_labels(DataCollatorForLanguageModeling(Tok(), mlm=False), _end_rows(), {2})
    assert masked["in_examples"] == 2 and masked["after_collator"] == 0  # the classic: labels = input_ids, pad id -> -100


def test_end_label_audit_reads_the_fast_paths_packed_rows():
    """The fast path trains on PackedRows (rows of examples, no slicing): the audit must read them too."""
    from shared.train.packing import PackedCollator, PackedRows
    from shared.train.tokenization import audit_end_labels

    packed = PackedRows.build(_end_rows(), max_tokens=16)
    assert audit_end_labels(PackedCollator(), packed, {2}) == {"token_ids": [2], "examples": 1, "in_examples": 2,
                                                               "after_collator": 2}
