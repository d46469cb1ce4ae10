"""shared/data/readers.py: formats, encodings, line numbers, and files that are not datasets."""

import codecs
from pathlib import Path

import pytest

from shared.data.conversation import SchemaError
from shared.core.errors import DataError
from shared.data.readers import BadRow, ChatRow, CsvRow, Source, chat_turns

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "data"
SAMPLE = "title,question,reply,is_best\n租房押金,,\"押金应当退还，\n除非有损坏。\",1\n工资,,按时发放,0\n"


def _rows(path: Path) -> list:
    return list(Source(path).rows())


@pytest.mark.parametrize(
    "encode, encoding",
    [
        pytest.param(lambda s: s.encode("utf-8"), "utf-8", id="utf-8"),
        pytest.param(lambda s: codecs.BOM_UTF8 + s.encode("utf-8"), "utf-8-sig", id="utf-8-bom"),
        pytest.param(lambda s: s.replace("\n", "\r\n").encode("utf-8"), "utf-8", id="crlf"),
        pytest.param(lambda s: s.encode("gb18030"), "gb18030", id="gb18030"),
        pytest.param(lambda s: s.encode("utf-16"), "utf-16", id="utf-16-bom"),
    ],
)
def test_every_encoding_reads_the_same_rows(tmp_path, encode, encoding):
    path = tmp_path / "qa.csv"
    path.write_bytes(encode(SAMPLE))
    source = Source(path)
    rows = list(source.rows())
    assert source.encoding == encoding
    assert source.header == ["title", "question", "reply", "is_best"]
    assert [(r.line, r.title, r.is_best) for r in rows] == [(2, "租房押金", "1"), (4, "工资", "0")]
    # The quoted newline survives (CRLF inside quotes is kept verbatim; cleaning folds it).
    assert rows[0].reply.replace("\r\n", "\n") == "押金应当退还，\n除非有损坏。"


def test_header_is_case_and_order_free_and_question_optional(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text(" Reply ,IS_BEST,Title\n答复内容,1,标题\n", encoding="utf-8")
    (row,) = _rows(path)
    assert (row.title, row.question, row.reply, row.is_best) == ("标题", "", "答复内容", "1")


def test_fixture_line_numbers_follow_quoted_newlines_and_blank_lines():
    rows = _rows(FIXTURES / "lawzhidao_odd.csv")
    by_line = {r.line: r for r in rows}
    assert by_line[5].title == "押金&amp;租金的区别"  # a 4-line quoted reply starts on line 5
    assert by_line[9].title == "工伤认定需要多长时间"
    assert 15 not in by_line  # the blank line is not a row
    bad = by_line[16]
    assert isinstance(bad, BadRow) and bad.reason == "malformed_row" and "5 field(s)" in bad.detail
    assert max(by_line) == 24 and len(rows) == 19


@pytest.mark.parametrize(
    "name, kept, bad",
    [
        pytest.param("chat_chatglm3.jsonl", [1, 2, 3, 7, 8], {4: "unparseable_line", 6: "bad_schema"}, id="chatglm3"),
        pytest.param("chat_openai.jsonl", [1, 2], {3: "bad_schema", 4: "bad_schema"}, id="openai"),
        pytest.param("chat_sharegpt.jsonl", [1, 2, 3], {}, id="sharegpt"),
    ],
)
def test_chat_formats(name, kept, bad):
    source = Source(FIXTURES / name)
    rows = list(source.rows())
    assert source.format == "jsonl"
    assert [r.line for r in rows if isinstance(r, ChatRow)] == kept
    assert {r.line: r.reason for r in rows if isinstance(r, BadRow)} == bad
    assert all(t["role"] in ("system", "user", "assistant") for r in rows if isinstance(r, ChatRow) for t in r.turns)


def test_sharegpt_multi_turn_is_kept_with_roles_mapped():
    rows = _rows(FIXTURES / "chat_sharegpt.jsonl")
    assert [t["role"] for t in rows[1].turns] == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize(
    "obj, message",
    [
        pytest.param([1], "a JSON list", id="not-an-object"),
        pytest.param({"text": "x"}, "no 'conversations' or 'messages'", id="no-turns"),
        pytest.param({"messages": ["x"]}, "turn 0 is not an object", id="turn-not-object"),
        pytest.param({"messages": [{"role": "tool", "content": "x"}]}, "speaker 'tool'", id="tool-role"),
        pytest.param({"messages": [{"role": "user", "content": None}]}, "type NoneType", id="null-content"),
        pytest.param({"conversations": [{"from": "bot", "value": "x"}]}, "speaker 'bot'", id="sharegpt-unknown"),
    ],
)
def test_chat_turns_rejects_what_it_cannot_map(obj, message):
    with pytest.raises(SchemaError, match=message):
        chat_turns(obj)


def test_openai_text_parts_are_joined():
    turns = chat_turns({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert turns == [{"role": "user", "content": "a\nb"}]


@pytest.mark.parametrize(
    "name, data, message",
    [
        pytest.param("empty.csv", b"", "the file is empty", id="empty"),
        pytest.param("blank.csv", b"\n\n  \r\n", "the file is empty", id="only-whitespace"),
        pytest.param("cols.csv", "question,answer\n问,答\n".encode(),
                     r"unknown CSV header \(question, answer\).*columns: \{prompt: \"question\", response: \"answer\"\}",
                     id="unknown-header"),
        pytest.param("x.jsonl", '{"问题": "问", "回答": "答"}\n'.encode(),
                     r"unknown keys of the first object \(问题, 回答\).*columns: \{prompt: \"问题\", response: \"回答\"\}",
                     id="unknown-keys"),
        pytest.param("x.csv", b"PK\x03\x04" + bytes(200), "zip archive", id="xlsx"),
        pytest.param("x.csv", b"\x89PNG\r\n\x1a\n" + bytes(100), "PNG image", id="png"),
        pytest.param("x.csv", bytes(range(256)) * 8, "binary content", id="random-bytes"),
        pytest.param("x.json", b'[{"messages": [{"role": "user", "content": "q"}]},\n{"messages": ', "not closed",
                     id="json-array-cut-short"),
        pytest.param("x.csv", b"\x80\x81\xfd\xfe\xff" * 50, "binary content", id="not-text"),
        pytest.param("x.csv", b"\xff\xfe" + b"\x01\x00\x02\x00" * 100, "binary content", id="chance-utf16-bom"),
    ],
)
def test_not_a_dataset_names_the_file_and_problem(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError, match=message) as info:
        list(Source(path).rows())
    assert str(info.value).startswith(f"{path.name}:") or str(path) in str(info.value)


def test_mixed_encodings_are_refused_with_the_encoding_and_line(tmp_path):
    path = tmp_path / "mixed.csv"
    head = "title,question,reply,is_best\n" + "".join(f"问题{i},,回答内容{i},1\n" for i in range(4000))
    path.write_bytes(head.encode("utf-8") + "后面是GBK,,乱码,1\n".encode("gbk"))
    with pytest.raises(DataError, match=r"not valid utf-8 at line 4002 .*mixes encodings"):
        list(Source(path).rows())


def test_format_is_sniffed_without_an_extension(tmp_path):
    (tmp_path / "a").write_text('{"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}\n')
    (tmp_path / "b").write_text("title,reply\n问,答\n")
    assert Source(tmp_path / "a").format == "jsonl"
    assert Source(tmp_path / "b").format == "csv"
    assert isinstance(next(Source(tmp_path / "b").rows()), CsvRow)
