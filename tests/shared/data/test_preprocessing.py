"""shared/data/preprocessing.py: the whole stream on the project's own odd fixtures."""

import json
import tempfile
from pathlib import Path

import pytest

from shared.core.config import PreprocessConfig
from shared.data.conversation import load_jsonl, validate
from shared.core.errors import DataError
from shared.data.preprocessing import build, compose_user
from shared.data.readers import Source

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "data"
ODD = FIXTURES / "lawzhidao_odd.csv"


def run_build(tmp_path: Path, path: Path, cfg: PreprocessConfig | None = None, size: int | None = None, **kwargs):
    """The report and output folder of one build (a fresh folder per call)."""
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    out = work / "out"
    out.mkdir()
    cfg = cfg or PreprocessConfig(min_answer_chars=4)
    report = build(Source(path), out, work / "spill", cfg, size or path.stat().st_size, **kwargs)
    return report, out


def read_split(out: Path, name: str) -> list[dict]:
    return load_jsonl((out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines())


def all_examples(out: Path) -> list[dict]:
    return [r for s in ("train", "dev", "test") for r in read_split(out, s)]


@pytest.mark.parametrize(
    "title, question, user",
    [
        pytest.param("工伤认定", "", "工伤认定", id="no-question"),
        pytest.param("工伤认定", "工伤认定", "工伤认定", id="repeat"),
        pytest.param("工伤认定多久", "工伤认定", "工伤认定多久", id="question-inside-title"),
        pytest.param("工伤认定", "工伤认定需要多久？", "工伤认定需要多久？", id="question-extends-title"),
        pytest.param("工伤认定", "我在上班路上受伤。", "工伤认定\n我在上班路上受伤。", id="detail-added"),
        pytest.param("", "只有问题", "只有问题", id="no-title"),
    ],
)
def test_compose_user(title, question, user):
    assert compose_user(title, question) == user


def test_odd_csv_rejects_by_reason_with_line_numbers_and_raw_rows(tmp_path):
    report, out = run_build(tmp_path, ODD)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    by_line = {r["line"]: r["reason"] for r in rejected}
    assert by_line == {
        3: "not_best_reply", 4: "answer_too_short", 12: "empty_answer", 13: "empty_answer", 14: "invalid_is_best",
        16: "malformed_row", 17: "answer_too_short", 18: "duplicate_normalised", 19: "duplicate_exact",
        20: "empty_question", 21: "not_best_reply", 24: "not_best_reply",
    }  # fmt: skip
    assert report["rows_read"] == 19 and report["kept"] == 7 and report["rejected"] == 12
    assert report["rejected_by_reason"]["not_best_reply"] == 3
    assert sum(report["splits"].values()) == 7
    assert all(r["source"] == "lawzhidao_odd.csv" for r in rejected)
    empty = next(r for r in rejected if r["line"] == 12)
    assert empty["raw"] == {"title": "网购退货运费谁出", "question": "", "reply": "  \t ", "is_best": "1"}
    loser = next(r for r in rejected if r["line"] == 3)  # rejected in pass 2, from the spill
    assert loser["raw"]["reply"].startswith("有补偿。劳动合同期满终止时") and loser["raw"]["is_best"] == "0"
    cleaned = next(r for r in rejected if r["line"] == 18)  # its reply was changed by cleaning
    assert cleaned["raw"]["reply"] == "社会保险行政部门应当自受理工伤认定申请之日起  六十日内，作出工伤认定的决定"
    malformed = next(r for r in rejected if r["line"] == 16)
    assert malformed["raw"] == ["多了一列", "", "这一行有五个字段", "1", "extra"]


def test_odd_csv_keeps_the_best_reply_cleaned(tmp_path):
    _, out = run_build(tmp_path, ODD)
    examples = {r["conversations"][0]["content"]: r["conversations"][-1]["content"] for r in all_examples(out)}
    assert examples["劳动合同到期公司不续签有补偿吗"].startswith("有。")  # flagged beats the longer one
    assert examples["被公司辞退怎么办"].startswith("先确认")  # both flagged: the longer
    assert examples["欠钱不还怎么办"] == "可以向法院起诉。"  # neither flagged, equal length: the earlier
    assert examples["押金&租金的区别"] == "押金用于担保；\n租金是使用房屋的对价。\n\n押金在合同结束后应退还 。"
    assert "离婚后房子归谁\n房子是婚后买的，登记在男方名下。" in examples
    assert "交通事故赔偿标准是什么，误工费怎么算？" in examples


def test_every_output_line_follows_the_schema_and_ids_are_unique(tmp_path):
    _, out = run_build(tmp_path, ODD)
    examples = all_examples(out)
    for record in examples:
        assert set(record) == {"id", "conversations"} and len(record["id"]) == 16
        validate(record["conversations"])
    assert len({r["id"] for r in examples}) == len(examples)
    assert "\\u" not in (out / "train.jsonl").read_text(encoding="utf-8")  # ensure_ascii=False


def test_report_has_character_length_stats(tmp_path):
    report, out = run_build(tmp_path, ODD)
    answers = sorted(len(r["conversations"][-1]["content"]) for r in all_examples(out))
    stats = report["length_chars"]["answer"]
    assert (stats["count"], stats["min"], stats["max"]) == (len(answers), answers[0], answers[-1])
    assert report["length_chars"]["question"]["min"] >= 1
    assert report["source"] == {"name": "lawzhidao_odd.csv", "format": "csv", "encoding": "utf-8", "bytes": ODD.stat().st_size}


@pytest.mark.parametrize(
    "name, kept, reasons",
    [
        pytest.param("chat_chatglm3.jsonl", 3, {"unparseable_line": 1, "bad_schema": 1, "bad_turn_order": 1, "empty_answer": 1}, id="chatglm3"),
        pytest.param("chat_openai.jsonl", 2, {"bad_schema": 2}, id="openai"),
        pytest.param("chat_sharegpt.jsonl", 2, {"bad_turn_order": 1}, id="sharegpt"),
    ],
)
def test_chat_jsonl(tmp_path, name, kept, reasons):
    report, out = run_build(tmp_path, FIXTURES / name)
    assert report["kept"] == kept and report["rejected_by_reason"] == reasons
    examples = all_examples(out)
    assert all(r["conversations"][-1]["role"] == "assistant" for r in examples)
    assert max(len(r["conversations"]) for r in examples) >= 4 or name == "chat_openai.jsonl"  # multi-turn kept


def test_trailing_user_turn_is_dropped_and_system_kept(tmp_path):
    _, out = run_build(tmp_path, FIXTURES / "chat_chatglm3.jsonl")
    by_first_user = {next(t["content"] for t in r["conversations"] if t["role"] == "user"): r for r in all_examples(out)}
    assert [t["role"] for t in by_first_user["离婚冷静期多久？"]["conversations"]] == ["user", "assistant"]
    assert by_first_user["租房合同没到期能退租吗？"]["conversations"][0] == {"role": "system", "content": "你是一名律师助手。"}


def test_system_prompt_from_config_is_prepended(tmp_path):
    cfg = PreprocessConfig(min_answer_chars=4, system_prompt="你是法律助手。")
    _, out = run_build(tmp_path, ODD, cfg)
    assert all(r["conversations"][0] == {"role": "system", "content": "你是法律助手。"} for r in all_examples(out))


def test_length_limits_come_from_config(tmp_path):
    report, _ = run_build(tmp_path, ODD, PreprocessConfig(min_answer_chars=4, max_answer_chars=30, max_question_chars=12))
    assert report["rejected_by_reason"]["answer_too_long"] >= 3
    assert report["rejected_by_reason"]["question_too_long"] >= 1


def test_workers_and_buckets_do_not_change_the_output(tmp_path):
    _, one = run_build(tmp_path, ODD)
    _, out = run_build(tmp_path, ODD, size=40 << 20, workers=2)  # as if 40 MiB: 10 buckets, two processes
    for name in ("train", "dev", "test"):
        assert sorted(read_split(one, name), key=lambda r: r["id"]) == sorted(read_split(out, name), key=lambda r: r["id"])
    reject_lines = lambda d: sorted((d / "rejected.jsonl").read_text(encoding="utf-8").splitlines())  # noqa: E731
    assert reject_lines(one) == reject_lines(out)


def test_rerun_gives_the_same_split_and_questions_never_straddle(tmp_path):
    cfg = PreprocessConfig(min_answer_chars=4, dev_ratio=0.3, test_ratio=0.3)
    _, a = run_build(tmp_path, ODD, cfg)
    _, b = run_build(tmp_path, ODD, cfg, size=40 << 20)
    ids = {s: {r["id"] for r in read_split(a, s)} for s in ("train", "dev", "test")}
    assert ids == {s: {r["id"] for r in read_split(b, s)} for s in ("train", "dev", "test")}
    assert not (ids["train"] & ids["dev"] or ids["train"] & ids["test"] or ids["dev"] & ids["test"])


def test_tiny_dataset_still_gets_dev_and_test(tmp_path):
    path = tmp_path / "tiny.csv"
    path.write_text("title,reply\n" + "".join(f"问题{i},这是第{i}个回答\n" for i in range(4)), encoding="utf-8")
    report, out = run_build(tmp_path, path, PreprocessConfig(dev_ratio=0.01, test_ratio=0.01))
    assert report["splits"] == {"train": 2, "dev": 1, "test": 1}
    assert [len(read_split(out, s)) for s in ("train", "dev", "test")] == [2, 1, 1]


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param("title,question,reply,is_best\n", "no data rows", id="header-only"),
        pytest.param("title,question,reply,is_best\n问题,,,1\n问题二,,  ,0\n", r"no usable rows; all 2 rejected \(empty_answer: 2\)", id="all-rejected"),
    ],
)
def test_nothing_usable_is_a_data_error(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        run_build(tmp_path, path)


def test_bare_quotes_fall_back_to_serial_parsing_with_the_same_result(tmp_path, monkeypatch, caplog):
    import shared.data.preprocessing as preprocessing

    path = tmp_path / "quotes.csv"
    path.write_text(
        "title,question,reply,is_best\n"
        '问题一,,回答里有一个"引号,1\n'  # a bare quote: counting quotes would misplace the cut
        '问题二,,"跨两行的\n回答内容",1\n'
        "问题三,,普通的回答,1\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(preprocessing, "PIECE_CHARS", 1)  # cut after every record
    report, out = run_build(tmp_path, path, PreprocessConfig(dev_ratio=0.0, test_ratio=0.0, min_dev=0, min_test=0))
    assert "parsing in one process" in caplog.text
    assert report["kept"] == 3 and report["rejected"] == 0
    answers = sorted(r["conversations"][-1]["content"] for r in all_examples(out))
    assert answers == ["回答里有一个\"引号", "普通的回答", "跨两行的\n回答内容"]


def test_well_formed_quotes_are_cut_into_pieces_without_fallback(tmp_path, monkeypatch, caplog):
    import shared.data.preprocessing as preprocessing

    monkeypatch.setattr(preprocessing, "PIECE_CHARS", 1)
    small, _ = run_build(tmp_path, ODD)
    assert "parsing in one process" not in caplog.text
    monkeypatch.setattr(preprocessing, "PIECE_CHARS", 1 << 20)
    whole, _ = run_build(tmp_path, ODD)
    assert small["rejected_by_reason"] == whole["rejected_by_reason"] and small["splits"] == whole["splits"]


@pytest.mark.parametrize("newline", [pytest.param("\r\n", id="crlf"), pytest.param("\r", id="cr-only")])
def test_pieces_keep_line_numbers_for_any_line_ends(tmp_path, monkeypatch, newline):
    import shared.data.preprocessing as preprocessing

    monkeypatch.setattr(preprocessing, "PIECE_CHARS", 7)
    path = tmp_path / "ends.csv"
    rows = ["title,reply", '问题一,"两行的', '回答"', "问题二,", "问题三,第三个回答"]
    path.write_bytes(newline.join(rows).encode() + newline.encode())
    report, out = run_build(tmp_path, path, PreprocessConfig(dev_ratio=0.0, test_ratio=0.0, min_dev=0, min_test=0))
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["reason"]) for r in rejected] == [(4, "empty_answer")]
    assert report["kept"] == 2


@pytest.mark.parametrize(
    "encoding, crlf",
    [
        pytest.param("utf-8-sig", False, id="utf-8-bom"),
        pytest.param("utf-8", True, id="crlf"),
        pytest.param("gb18030", False, id="gb18030"),
        pytest.param("utf-16", True, id="utf-16-crlf"),
    ],
)
def test_every_encoding_gives_the_same_dataset(tmp_path, encoding, crlf):
    text = ODD.read_text(encoding="utf-8")
    if crlf:
        text = text.replace("\r\n", "\n").replace("\n", "\r\n")
    utf8 = tmp_path / "plain.csv"
    utf8.write_text(text.replace("\r\n", "\n"), encoding="utf-8")
    other = tmp_path / f"{encoding}.csv"
    other.write_bytes(text.encode(encoding))
    report_a, a = run_build(tmp_path, utf8)
    report_b, b = run_build(tmp_path, other)
    assert report_b["source"]["encoding"] == encoding
    assert report_a["rejected_by_reason"] == report_b["rejected_by_reason"]
    assert sorted(map(json.dumps, all_examples(a))) == sorted(map(json.dumps, all_examples(b)))
