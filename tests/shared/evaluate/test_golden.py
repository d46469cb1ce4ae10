"""shared/evaluate/golden.py and the shipped golden set configs/data/legal_golden.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from shared.core.config import PreprocessConfig
from shared.core.errors import DataError
from shared.evaluate.golden import load_golden

REPO = Path(__file__).resolve().parents[3]
GOLDEN = REPO / "configs" / "data" / "legal_golden.csv"


def test_shipped_golden_set_loads_whole_with_license_and_no_overlap_with_the_sample():
    records = load_golden(GOLDEN, GOLDEN.name, PreprocessConfig())
    assert len(records) >= 20, "the issue asks for at least 20 golden questions"
    assert all(r["conversations"][-1]["role"] == "assistant" and r["conversations"][-1]["content"] for r in records)
    assert "License: CC0 1.0" in (GOLDEN.parent / "legal_golden.LICENSE").read_text(encoding="utf-8")
    with open(REPO / "configs" / "data" / "legal_qa_sample.csv", encoding="utf-8") as fh:
        sample = {row["title"] for row in csv.DictReader(fh)}
    with open(GOLDEN, encoding="utf-8") as fh:
        assert not sample & {row["title"] for row in csv.DictReader(fh)}, "golden questions must not be training questions"


def test_jsonl_goes_through_the_same_readers(tmp_path):
    path = tmp_path / "g.jsonl"
    rows = [{"conversations": [{"role": "user", "content": "合同违约怎么办？"}, {"role": "assistant", "content": "可以要求继续履行或者赔偿损失。"}]}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    [record] = load_golden(path, "g.jsonl", PreprocessConfig())
    assert record["conversations"][-1]["content"] == "可以要求继续履行或者赔偿损失。"


def test_a_row_preprocess_would_reject_names_file_and_line(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("title,question,reply,is_best\n合同违约怎么办？,,可以要求继续履行或者赔偿损失。,1\n没有答案的问题？,,,1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"golden question set g.csv: 1 unusable row\(s\): line 3: "):
        load_golden(path, "g.csv", PreprocessConfig())
