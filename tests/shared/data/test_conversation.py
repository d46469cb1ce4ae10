"""shared/data/conversation.py: the data schema, the normalised key and the id."""

import json

import pytest

from shared.data.conversation import SchemaError, dumps, example_id, load_jsonl, normalise_key, question_key, validate

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731


@pytest.mark.parametrize(
    "a, b",
    [
        pytest.param("工伤认定要多久？", "工伤认定要多久", id="punctuation"),
        pytest.param("Ｈｅｌｌｏ 世界", "hello世界", id="full-width-and-case"),
        pytest.param("工伤 认定\n要多久", "工伤认定要多久", id="whitespace"),
        pytest.param("第３条", "第3条", id="full-width-digits"),
    ],
)
def test_normalise_key_folds_surface_differences(a, b):
    assert normalise_key(a) == normalise_key(b)


def test_normalise_key_keeps_different_words_apart():
    assert normalise_key("六十日") != normalise_key("三十日")


def test_example_id_is_16_hex_and_stable():
    key = question_key([U("工伤认定要多久？"), A("六十日。")])
    assert key == question_key([S("sys"), U("工伤认定要多久"), A("不同的回答")])
    assert len(example_id(key)) == 16 and int(example_id(key), 16) >= 0
    assert example_id(key) == example_id(normalise_key("工伤认定要多久"))


@pytest.mark.parametrize(
    "turns, message",
    [
        pytest.param([], "empty", id="empty"),
        pytest.param([A("答")], "'assistant' where 'user'", id="starts-with-assistant"),
        pytest.param([U("问"), U("又问"), A("答")], "'user' where 'assistant'", id="two-users"),
        pytest.param([U("问"), S("系统"), A("答")], "only the first turn", id="late-system"),
        pytest.param([U("问")], "does not end with an assistant", id="no-answer"),
        pytest.param([{"role": "tool", "content": "x"}], "role 'tool'", id="unknown-role"),
        pytest.param([{"role": "user", "content": "x", "name": "n"}], "not {role, content}", id="extra-key"),
    ],
)
def test_validate_names_the_broken_rule(turns, message):
    with pytest.raises(SchemaError, match=message):
        validate(turns)


def test_dumps_is_json_with_utf8_kept():
    record = {"id": "0123456789abcdef", "conversations": [S("系统"), U('引号"和\\反斜杠\n换行'), A("答\t")]}
    line = dumps(record)
    assert "\n" not in line and "系统" in line
    assert json.loads(line) == record
    assert load_jsonl([line, ""]) == [record]
