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
    "names, expected",
    [
        pytest.param(["问题", "回答"], {"prompt": "问题", "response": "回答"}, id="chinese"),
        pytest.param(["id", "Question", "Answer", "system_prompt"], {"prompt": "Question", "response": "Answer", "system": "system_prompt"},
                     id="english-with-system"),
        pytest.param(["col_a", "col_b"], {"prompt": "col_a", "response": "col_b"}, id="unknown-names-first-two"),
    ],
)
def test_the_suggested_mapping_is_valid_yaml_and_a_valid_config(names, expected):
    line = suggest(names)
    parsed = yaml.safe_load(line)
    assert parsed["preprocess"]["columns"] == expected
    assert parse_config(parsed).preprocess.columns.mapping() == expected


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
        pytest.param({"title": "a", "answer": "b"}, "preprocess.columns.answer: unknown key", id="unknown-role"),
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
