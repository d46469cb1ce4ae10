"""jobs/preprocess.py on every accepted input shape (docs/data.md's table), through the whole stage:
reading, column mapping, cleaning, dedup, rejection with reasons, split, report, manifest.

Fixtures: tests/fixtures/data/shapes/ (text shapes); Parquet files and saved dataset folders are
written from the Alpaca fixture by pyarrow / ``datasets`` themselves, so they are real files.
"""

from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.preprocess import run
from shared.core.config import parse_config
from shared.core.errors import ConfigError, DataError
from shared.core.settings import Settings
from shared.data.conversation import load_jsonl
from shared.store.artifacts import MANIFEST

REPO = Path(__file__).resolve().parents[2]
SHAPES = REPO / "tests" / "fixtures" / "data" / "shapes"
SAMPLE = REPO / "configs" / "data" / "legal_qa_sample.csv"
ALPACA = json.loads((SHAPES / "alpaca.json").read_text(encoding="utf-8"))
MAPPED_QA = {"title": "问题", "question": "补充说明", "reply": "律师回答", "is_best": "是否最佳"}


def stage(tmp_path: Path, inputs, columns: dict | None = None, extra: dict | None = None):
    """Run the stage in-process; returns (report, output folder, manifest)."""
    out = tmp_path / "out"
    settings = Settings(artifact_root=f"file://{tmp_path}", cache_dir=tmp_path / "cache")  # the output lies inside the root
    pre = {"min_answer_chars": 2, **({"columns": columns} if columns else {}), **(extra or {})}
    result = run(settings, parse_config({"preprocess": pre}), inputs, f"file://{out}", force=True)
    return result.report, out, json.loads((out / MANIFEST).read_text())


def examples(out: Path) -> list[dict]:
    return [r for s in ("train", "dev", "test") for r in load_jsonl((out / f"{s}.jsonl").read_text(encoding="utf-8").splitlines())]


def rejected(out: Path) -> dict[int, str]:
    return {r["line"]: r["reason"] for r in map(json.loads, (out / "rejected.jsonl").read_text(encoding="utf-8").splitlines())}


def conversation(out: Path, question: str) -> list[dict]:
    (found,) = [e["conversations"] for e in examples(out) if any(question in t["content"] for t in e["conversations"])]
    return found


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # history as JSON text: Arrow needs one type per column, and Alpaca rows mix absent and nested.
    table = pa.Table.from_pylist([{**r, "history": json.dumps(r["history"], ensure_ascii=False) if "history" in r else None}
                                  for r in rows])
    pq.write_table(table, path, row_group_size=2)  # several row groups: read as a stream of batches
    return path


ALPACA_REJECTS = {"empty_answer", "bad_schema", "not_best_reply"}


@pytest.mark.parametrize("name", ["alpaca.json", "alpaca.jsonl"])
def test_alpaca_json_array_and_jsonl_keep_history_as_turns(tmp_path, name):
    report, out, manifest = stage(tmp_path, str(SHAPES / name))
    assert report["kept"] == 3 and report["rows_read"] == 7
    assert set(report["rejected_by_reason"]) == ALPACA_REJECTS and report["rejected"] == 4
    assert report["sources"][0]["layout"].startswith("alpaca:")
    # history → earlier turns, system → a system turn, input → the prompt's second line
    assert [t["role"] for t in conversation(out, "没休的年假")] == ["user", "assistant", "user", "assistant"]
    assert conversation(out, "没休的年假")[0]["content"] == "公司拖欠加班费怎么办？"
    assert conversation(out, "诉讼时效")[:2] == [
        {"role": "system", "content": "你是一名中国执业律师。"}, {"role": "user", "content": "解释下面的法律术语。\n诉讼时效"}]
    # the flagless duplicate loses to the longer answer; rejected rows keep where they were and why
    reasons = rejected(out)
    assert "not_best_reply" in reasons.values() and "bad_schema" in reasons.values()
    bad = [json.loads(line) for line in (out / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any("history" in r["detail"] for r in bad) and all(r["source"] == name for r in bad)
    assert manifest["inputs"]["input"]["name"] == name


def test_csv_with_the_users_own_headers_through_the_mapping(tmp_path):
    report, out, _ = stage(tmp_path, str(SHAPES / "mapped_qa.csv"), MAPPED_QA)
    # the Q&A rules apply to mapped columns: is_best picks, detail joins the title, bad flags are rejected
    assert report["kept"] == 2
    assert rejected(out) == {3: "not_best_reply", 5: "invalid_is_best", 6: "empty_answer"}
    assert conversation(out, "试用期被辞退")[0]["content"] == "试用期被辞退有补偿吗？\n入职两个月，公司说我不符合录用条件。"
    raw = json.loads((out / "rejected.jsonl").read_text(encoding="utf-8").splitlines()[0])["raw"]
    assert set(raw) == set(MAPPED_QA.values())  # the row under the user's own column names


def test_prompt_response_mapping_and_the_error_that_suggests_it(tmp_path):
    with pytest.raises(DataError) as err:
        stage(tmp_path, str(SHAPES / "question_answer.csv"))
    message = str(err.value)
    assert "\n" not in message and "question_answer.csv: unknown CSV header (question, answer)" in message
    suggested = message.rsplit("in the config: ", 1)[1]
    # the suggested mapping, pasted into a config, works
    import yaml

    report, out, _ = stage(tmp_path, str(SHAPES / "question_answer.csv"), yaml.safe_load(suggested)["preprocess"]["columns"])
    assert report["kept"] == 3 and conversation(out, "第二行")[0]["content"] == "多行的问题\n第二行"


def _qa_table_in_own_names(path: Path) -> Path:
    """30 questions, 2 replies each (the second flagged best); 7 questions carry a detail."""
    rows = ["问题,补充说明,回答,是否最佳"]
    for i in range(30):
        detail = f"第{i}号问题的补充说明：签了合同。" if i < 7 else ""
        rows += [f"第{i}号问题：公司不发工资怎么办？,{detail},去仲裁。,否", f"第{i}号问题：公司不发工资怎么办？,{detail},第{i}号最佳回答：可以申请劳动仲裁。,是"]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_the_suggested_mapping_for_a_qa_table_in_own_names_loses_nothing(tmp_path, caplog):
    path = _qa_table_in_own_names(tmp_path / "own.csv")
    with pytest.raises(DataError) as err:
        stage(tmp_path, str(path))
    import yaml

    columns = yaml.safe_load(str(err.value).rsplit("in the config: ", 1)[1])["preprocess"]["columns"]
    assert columns == {"title": "问题", "question": "补充说明", "reply": "回答", "is_best": "是否最佳"}
    with caplog.at_level("WARNING"):
        report, out, _ = stage(tmp_path, str(path), columns)
    users = [e["conversations"][0]["content"] for e in examples(out)]
    assert len(users) == 30 and sum("补充说明" in u for u in users) == 7  # every detail joined its title
    assert all("最佳回答" in e["conversations"][-1]["content"] for e in examples(out))  # is_best picked
    assert report["sources"][0]["unused_columns"] == [] and "read by no role" not in caplog.text


def test_a_mapping_that_leaves_columns_unused_says_which_in_the_report_and_a_warning(tmp_path, caplog):
    path = _qa_table_in_own_names(tmp_path / "own.csv")
    with caplog.at_level("WARNING"):
        report, _, _ = stage(tmp_path, str(path), {"prompt": "问题", "response": "回答"})
    assert report["sources"][0]["unused_columns"] == ["补充说明", "是否最佳"]
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "read by no role" in r.getMessage()]
    assert line.startswith("own.csv: columns 补充说明, 是否最佳 are read by no role of preprocess.columns: prompt=问题, response=回答")


def test_a_mapping_that_names_absent_columns_is_refused_with_the_headers_found(tmp_path):
    with pytest.raises(DataError, match=r"unknown CSV header \(问题, 补充说明, 律师回答, 是否最佳\); preprocess.columns names 答案, not in"):
        stage(tmp_path, str(SHAPES / "mapped_qa.csv"), {"title": "问题", "reply": "答案"})


def test_parquet_file_is_read_through_datasets_in_batches(tmp_path):
    path = write_parquet(tmp_path / "alpaca.parquet", ALPACA)
    report, out, _ = stage(tmp_path, str(path))
    assert report["source"]["format"] == "parquet" and report["rows_read"] == 7 and report["kept"] == 3
    assert set(report["rejected_by_reason"]) == ALPACA_REJECTS
    assert [t["role"] for t in conversation(out, "没休的年假")] == ["user", "assistant", "user", "assistant"]


def test_saved_hugging_face_dataset_folder_every_split(tmp_path):
    import datasets

    rows = [{"instruction": r["instruction"], "output": r.get("output", "")} for r in ALPACA]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]), "test": datasets.Dataset.from_list(rows[4:])}
                         ).save_to_disk(str(tmp_path / "saved"))
    report, out, manifest = stage(tmp_path, str(tmp_path / "saved"))
    assert report["source"]["format"] == "hf-dataset" and report["rows_read"] == 7
    assert report["kept"] == 4 and report["rejected_by_reason"] == {"empty_answer": 2, "not_best_reply": 1}
    assert len(manifest["inputs"]["input"]["sha256"]) == 64


@pytest.mark.parametrize(
    "name, content, message",
    [
        pytest.param("empty.json", b"", "the file is empty", id="json-empty"),
        pytest.param("empty-array.json", b"[]\n", "no data rows", id="json-empty-array"),
        pytest.param("header-only.csv", "问题,律师回答\n".encode(), "no data rows", id="mapped-csv-header-only"),
        pytest.param("all-bad.jsonl", b'{"instruction": "q", "output": ""}\n{"instruction": "r"}\n', "all 2 rejected", id="alpaca-all-bad"),
        pytest.param("notparquet.parquet", b"PAR1 this is no parquet", "not readable as a Parquet file", id="broken-parquet"),
        pytest.param("cut.json", b'[{"instruction": "q", "output": "a"},', "not closed", id="json-cut-short"),
    ],
)
def test_empty_and_broken_inputs_of_each_shape_exit_with_one_reason_and_no_manifest(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        stage(tmp_path, str(path), {"title": "问题", "reply": "律师回答"} if name.endswith(".csv") else None)
    assert not (tmp_path / "out" / MANIFEST).exists()


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "gb18030"])
def test_encodings_of_the_new_shapes_read_the_same(tmp_path, encoding):
    for name, columns in (("alpaca.jsonl", None), ("alpaca.json", None), ("mapped_qa.csv", MAPPED_QA)):
        text = (SHAPES / name).read_text(encoding="utf-8")
        converted = tmp_path / encoding / name
        converted.parent.mkdir(exist_ok=True)
        converted.write_bytes(text.encode(encoding))
        utf8_report, utf8_out, _ = stage(tmp_path / "a" / name, str(SHAPES / name), columns)
        report, out, _ = stage(tmp_path / encoding / "run" / name, str(converted), columns)
        assert report["source"]["encoding"] == (codecs.lookup(encoding).name if encoding != "utf-16" else "utf-16")
        assert examples(out) == examples(utf8_out) and rejected(out) == rejected(utf8_out)


def test_several_inputs_weighted_and_counted_per_source(tmp_path):
    inputs = [str(SAMPLE), f"{SHAPES / 'alpaca.jsonl'}:3", f"{SHAPES / 'question_answer.csv'}:0.0001"]
    with pytest.raises(DataError, match="question_answer.csv"):  # each input is checked before anything runs
        stage(tmp_path, inputs)
    report, out, manifest = stage(tmp_path, inputs, {"prompt": "question", "response": "answer"},
                                  {"dev_ratio": 0.0, "test_ratio": 0.0, "min_dev": 0, "min_test": 0})
    sample, alpaca, qa = report["sources"]
    assert (sample["name"], alpaca["name"], qa["name"]) == ("legal_qa_sample.csv", "alpaca.jsonl", "question_answer.csv")
    # 49: the sample's "公司拖欠工资三个月了怎么办" reply with its own detail is a question of its own
    assert sample["kept"] == 49 and sample["rejected"] == 12 and sample["train_lines"] == 49
    assert alpaca["kept"] == 3 and alpaca["weight"] == 3.0 and alpaca["train_lines"] == 9  # repeated 3 times
    assert qa["kept"] == 0 and qa["sampled_out"] == 3  # a weight of 1/10,000 keeps none of 3
    assert report["kept"] == 52 and report["rows_read"] == 61 + 7 + 3
    train = (out / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(train) == report["train_lines"] == 49 + 9
    assert sum("没休的年假" in line for line in train) == 3
    assert {r["source"] for r in map(json.loads, (out / "rejected.jsonl").read_text(encoding="utf-8").splitlines())} == {
        "legal_qa_sample.csv", "alpaca.jsonl"}
    assert [i["name"] for i in manifest["inputs"]["inputs"]] == ["legal_qa_sample.csv", "alpaca.jsonl", "question_answer.csv"]


def test_inputs_listed_in_the_config_with_their_own_columns(tmp_path):
    cfg = {"inputs": [{"path": str(SHAPES / "mapped_qa.csv"), "columns": MAPPED_QA},
                      {"path": str(SHAPES / "alpaca.json"), "weight": 0.5}]}
    report, _, _ = stage(tmp_path, None, extra=cfg)
    assert [s["name"] for s in report["sources"]] == ["mapped_qa.csv", "alpaca.json"]
    assert report["sources"][0]["kept"] == 2 and report["sources"][1]["weight"] == 0.5
    alpaca = report["sources"][1]
    # half the questions by hash (a question's duplicates go with it); every row accounted for
    assert 0 < alpaca["sampled_out"] and alpaca["kept"] < 3
    assert alpaca["kept"] + alpaca["rejected"] + alpaca["sampled_out"] == alpaca["rows_read"] == 7
    with pytest.raises(ConfigError, match="no input"):
        stage(tmp_path, None)


def test_cli_takes_several_inputs_and_config_columns(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preprocess:\n  columns: {prompt: question, response: answer}\n", encoding="utf-8")
    out = tmp_path / "o"
    result = subprocess.run(
        [sys.executable, "-m", "jobs.preprocess", "--input", str(SHAPES / "alpaca.json"), "--input", str(SHAPES / "question_answer.csv"),
         "--config", str(cfg), "--output", f"file://{out}"],
        cwd=REPO, env={**os.environ, "LAWTUNE_CACHE_DIR": str(tmp_path / "cache"), "LAWTUNE_ARTIFACT_ROOT": f"file://{tmp_path}"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert [s["kept"] for s in report["sources"]] == [3, 3]


def test_worker_processes_read_the_new_shapes_as_one_process_does(tmp_path):
    """Pieces parsed in spawned workers (the path for large files) carry the layout with them."""
    from shared.core.config import PreprocessConfig
    from shared.data.inputs import open_source
    from shared.data.preprocessing import build

    columns = parse_config({"preprocess": {"columns": {"prompt": "question", "response": "answer"}}}).preprocess.columns
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        out.mkdir()
        sources = [open_source(SHAPES / "alpaca.jsonl"), open_source(SHAPES / "question_answer.csv", columns=columns),
                   open_source(SHAPES / "mapped_qa.csv", columns=parse_config({"preprocess": {"columns": MAPPED_QA}}).preprocess.columns)]
        build(sources, out, tmp_path / f"spill{workers}", PreprocessConfig(), [40 << 20, 1, 1], workers=workers)
        outputs.append({name: (out / name).read_bytes() for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "rejected.jsonl")})
    assert outputs[0] == outputs[1] and outputs[0]["train.jsonl"]
