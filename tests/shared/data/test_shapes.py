"""shared/data/shapes.py: which layout an input's names fit, the suggested mapping, rows → turns."""

import pytest
import yaml

from shared.core.config import ColumnsConfig, parse_config
from shared.core.errors import ConfigError, DataError
from shared.data.conversation import SchemaError
from shared.data.shapes import match, prompt_turns, suggest


@pytest.mark.parametrize(
    "names, origin, fields",
    [
        pytest.param(["Title", "Reply"], "lawzhidao", {"title": "Title", "reply": "Reply"}, id="lawzhidao-any-case"),
        pytest.param(["instruction", "input", "output"], "alpaca", {"prompt": "instruction", "query": "input", "response": "output"},
                     id="alpaca"),
        pytest.param(["prompt", "response", "system"], "prompt/response", {"prompt": "prompt", "response": "response", "system": "system"},
                     id="prompt-response"),
        pytest.param(["query", "response"], "query/response", {"prompt": "query", "response": "response"}, id="query-response"),
    ],
)
def test_known_layouts_in_a_csv_header(names, origin, fields):
    layout = match(names, None, where="x.csv")
    assert layout.origin == origin and dict(layout.fields) == fields


def test_json_objects_fit_chat_and_keep_optional_keys_the_first_object_lacked():
    assert match(["messages"], None, where="x", chat=True).kind == "chat"
    alpaca = match(["instruction", "output"], None, where="x", chat=True)
    assert alpaca.get("history") == "history" and alpaca.get("system") == "system"


def test_the_mapping_wins_when_its_names_are_present_else_the_defaults():
    columns = ColumnsConfig(prompt="问题", response="回答")
    assert match(["问题", "回答"], columns, where="x").origin == "preprocess.columns"
    # another input of the same run in a known layout still reads with its own names
    assert match(["title", "reply"], columns, where="y").origin == "lawzhidao"


@pytest.mark.parametrize(
    "names, expected, unused",
    [
        pytest.param(["问题", "回答"], {"prompt": "问题", "response": "回答"}, [], id="chinese"),
        pytest.param(["id", "Question", "Answer", "system_prompt"], {"prompt": "Question", "response": "Answer", "system": "system_prompt"},
                     ["id"], id="english-with-system"),
        pytest.param(["col_a", "col_b"], {"prompt": "col_a", "response": "col_b"}, [], id="unknown-names-first-two"),
        # a flag-like or a detail-like column makes it a Q&A table: every column finds its role
        pytest.param(["问题", "补充说明", "回答", "是否最佳"], {"title": "问题", "question": "补充说明", "reply": "回答", "is_best": "是否最佳"},
                     [], id="qa-detail-and-flag"),
        pytest.param(["question", "answer", "Is Best"], {"title": "question", "reply": "answer", "is_best": "Is Best"}, [], id="qa-flag-only"),
        pytest.param(["标题", "问题描述", "律师回答"], {"title": "标题", "question": "问题描述", "reply": "律师回答"}, [], id="qa-detail-only"),
        pytest.param(["subject", "question", "reply_text", "accepted", "votes"],
                     {"title": "subject", "question": "question", "reply": "reply_text", "is_best": "accepted"}, ["votes"],
                     id="qa-title-and-question-unused-votes"),
        pytest.param(["指令", "输入", "输出", "系统", "历史"],
                     {"prompt": "指令", "query": "输入", "response": "输出", "system": "系统", "history": "历史"}, [],
                     id="alpaca-in-chinese-every-role"),
        pytest.param(["instruction", "context", "response"], {"prompt": "instruction", "query": "context", "response": "response"}, [],
                     id="dolly"),
    ],
)
def test_the_suggested_mapping_uses_every_column_that_fits_a_role(names, expected, unused):
    line = suggest(names)
    parsed = yaml.safe_load(line)
    assert parsed["preprocess"]["columns"] == expected
    assert parse_config(parsed).preprocess.columns.mapping() == expected
    layout = match(names, parse_config(parsed).preprocess.columns, where="x.csv")
    assert list(layout.unused) == unused


def test_the_unknown_header_error_names_the_columns_its_suggestion_leaves_unused():
    with pytest.raises(DataError) as err:
        match(["id", "问题", "回答", "分类"], None, where="qa.csv", what="CSV header")
    message = str(err.value)
    assert "(id and 分类 fit no role and would stay unused)" in message
    assert yaml.safe_load(message.rsplit("in the config", 1)[1].split(": ", 1)[1])["preprocess"]["columns"] == {
        "prompt": "问题", "response": "回答"}


@pytest.mark.parametrize(
    "names, columns, chat, unused",
    [
        pytest.param(["title", "question", "reply", "is_best", "category"], None, False, ["category"], id="lawzhidao-plus-a-column"),
        pytest.param(["问题", "补充说明", "回答", "是否最佳"], {"prompt": "问题", "response": "回答"}, False, ["补充说明", "是否最佳"],
                     id="mapping-drops-detail-and-flag"),
        pytest.param(["conversations", "system", "id"], None, True, ["system", "id"], id="chat-with-a-top-level-system"),
        pytest.param(["instruction", "output"], None, True, [], id="alpaca-optional-keys-absent"),
    ],
)
def test_a_layout_names_the_columns_it_leaves_unused(names, columns, chat, unused):
    layout = match(names, ColumnsConfig(**columns) if columns else None, where="x", chat=chat)
    assert list(layout.unused) == unused


def test_unknown_names_exit_2_with_the_names_found_and_a_mapping():
    with pytest.raises(DataError) as err:
        match(["问题", "回答"], None, where="qa.csv", what="CSV header")
    assert err.value.exit_code == 2
    assert str(err.value).startswith("qa.csv: unknown CSV header (问题, 回答); expected title,reply")


@pytest.mark.parametrize(
    "columns, message",
    [
        pytest.param({"title": "a", "response": "b"}, "mixes Q&A roles (title) with prompt/response roles", id="mixed"),
        pytest.param({"prompt": "a"}, "maps no column to response", id="no-response"),
        pytest.param({"title": "a", "answer": "b"}, "preprocess.columns.answer: not a key lawtune knows", id="unknown-role"),
    ],
)
def test_bad_mappings_are_config_errors_naming_the_key(columns, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config({"preprocess": {"columns": columns}})


def test_alpaca_row_to_turns_with_history_and_system():
    layout = match(["instruction", "input", "output", "system", "history"], None, where="x", chat=True)
    row = {"instruction": "翻译", "input": "合同", "output": "contract", "system": "你是翻译。", "history": [["你好", "您好"]]}
    assert [(t["role"], t["content"]) for t in prompt_turns(row, layout)] == [
        ("system", "你是翻译。"), ("user", "你好"), ("assistant", "您好"), ("user", "翻译\n合同"), ("assistant", "contract")]
    with pytest.raises(SchemaError, match="history item 0"):
        prompt_turns({**row, "history": [["only one"]]}, layout)
    with pytest.raises(SchemaError, match="holds a dict"):
        prompt_turns({**row, "output": {"text": "x"}}, layout)
