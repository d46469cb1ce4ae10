"""jobs/preprocess.py: the stage as charts and the driver run it (subprocess) and in-process on both backends."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.preprocess import run
from shared.store.artifacts import MANIFEST, fetch_dir, read_manifest
from shared.core.config import load_config, parse_config
from shared.data.conversation import load_jsonl
from shared.core.errors import DataError
from shared.core.settings import load_settings
from shared.store.storage import open_location

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "configs" / "data" / "legal_qa_sample.csv"
FIXTURES = REPO / "tests" / "fixtures" / "data"


@pytest.fixture(autouse=True)
def _root_in_tmp(tmp_path, monkeypatch):
    """Stages write only below the artifact root; these tests write to folders of tmp_path."""
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", f"file://{tmp_path}")


def job(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.preprocess", *args],
        cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_subprocess_success_then_skip(tmp_path):
    out = tmp_path / "data"
    first = job("--input", str(SAMPLE), "--output", f"file://{out}")
    assert first.returncode == 0, first.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(f["path"] for f in manifest["files"]) == ["dev.jsonl", "rejected.csv", "rejected.jsonl", "report.json", "test.jsonl", "train.jsonl"]
    assert manifest["inputs"]["input"]["name"] == "legal_qa_sample.csv"
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] >= 40 and report["rejected_by_reason"]["not_best_reply"] >= 3
    assert min(report["splits"].values()) >= 1

    second = job("--input", str(SAMPLE), "--output", f"file://{out}")
    assert second.returncode == 0
    assert "skipping" in second.stderr
    assert json.loads((out / MANIFEST).read_text())["finished_at"] == manifest["finished_at"]


@pytest.mark.parametrize(
    "content, message",
    [
        pytest.param(b"question,answer\nq,a\n", 'preprocess: {columns: {prompt: "question", response: "answer"}}', id="unknown-header"),
        pytest.param(b"", "the file is empty", id="empty"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + bytes(64), "PNG image", id="binary"),
    ],
)
def test_subprocess_not_a_dataset_exits_2_with_one_line_and_no_manifest(tmp_path, content, message):
    bad = tmp_path / "upload.csv"
    bad.write_bytes(content)
    out = tmp_path / "data"
    result = job("--input", str(bad), "--output", f"file://{out}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lawtune preprocess: error: ") and "upload.csv" in lines[0] and message in lines[0]
    assert not (out / MANIFEST).exists()


def test_subprocess_missing_input_and_bad_config_exit_2(tmp_path):
    missing = job("--input", str(tmp_path / "nope.csv"), "--output", f"file://{tmp_path / 'o'}")
    assert missing.returncode == 2 and "nope.csv does not exist" in missing.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("preprocess:\n  dev_ratio: 2\n  min_answer_chars: zero\n")
    bad = job("--input", str(SAMPLE), "--config", str(cfg), "--output", f"file://{tmp_path / 'o'}")
    assert bad.returncode == 2
    assert "preprocess.dev_ratio" in bad.stderr and "preprocess.min_answer_chars" in bad.stderr


def test_run_on_both_backends_commits_verifiable_output_and_skips_reruns(artifact_root, tmp_path):
    settings = load_settings(run_id="r1")
    config = load_config(None)
    first = run(settings, config, str(SAMPLE))
    assert not first.skipped
    loc = open_location(settings.run_uri("data"), settings)
    assert read_manifest(loc).inputs_digest == first.manifest.inputs_digest
    local = tmp_path / "fetched"
    fetch_dir(loc, local)  # verifies every checksum
    train = load_jsonl((local / "train.jsonl").read_text(encoding="utf-8").splitlines())
    assert len(train) == first.report["splits"]["train"]

    assert run(settings, config, str(SAMPLE)).skipped
    changed = parse_config({"preprocess": {"split_seed": "another"}})
    assert not run(settings, changed, str(SAMPLE)).skipped  # the config section is an input
    other = tmp_path / "other.csv"
    other.write_bytes(SAMPLE.read_bytes() + "新增问题,,新增的回答内容,1\n".encode())
    assert not run(settings, changed, str(other)).skipped  # so is the input's content


@pytest.mark.integration
def test_s3_input_uri_and_no_credentials_in_output(s3_env, seaweedfs, s3_bucket, tmp_path):
    seaweedfs.client().upload_file(str(SAMPLE), s3_bucket, "raw/qa.csv")
    result = job("--input", f"s3://{s3_bucket}/raw/qa.csv", env={**s3_env, "LAWTUNE_RUN_ID": "s3run", "LAWTUNE_LOG_LEVEL": "DEBUG"})
    assert result.returncode == 0, result.stderr
    settings = load_settings(run_id="s3run")
    manifest = read_manifest(open_location(settings.run_uri("data"), settings))
    assert manifest.inputs["input"]["name"] == "qa.csv"
    for secret in (seaweedfs.secret_key, seaweedfs.access_key):
        assert secret not in result.stdout + result.stderr
    missing = job("--input", f"s3://{s3_bucket}/raw/none.csv", env=s3_env)
    assert missing.returncode == 2 and "none.csv does not exist" in missing.stderr


def test_failure_inside_the_stage_leaves_no_manifest(tmp_path):
    path = tmp_path / "allbad.csv"
    path.write_text("title,reply\n问题,\n", encoding="utf-8")
    settings = load_settings(artifact_root=f"file://{tmp_path / 'art'}")
    with pytest.raises(DataError, match="no usable rows"):
        run(settings, load_config(None), str(path))
    assert not (tmp_path / "art" / "runs" / "dev" / "data" / MANIFEST).exists()


@pytest.mark.parametrize(
    "name, rows, answer_marker",
    [
        pytest.param("legal_advice_5k.csv", 5000, None, id="legal_advice_5k"),
        pytest.param("lawbench_consultation_500.csv", 500, "法律依据", id="lawbench_500"),
    ],
)
def test_shared_data(shared_data, tmp_path, name, rows, answer_marker):
    settings = load_settings(artifact_root=f"file://{tmp_path / 'art'}")
    result = run(settings, load_config(None), str(shared_data / name))
    report = result.report
    assert report["rows_read"] == rows
    assert report["kept"] + report["rejected"] == rows and report["kept"] >= 0.99 * rows
    assert report["splits"]["dev"] >= 0.03 * rows and report["splits"]["test"] >= 0.03 * rows
    out = tmp_path / "art" / "runs" / "dev" / "data"
    examples = [r for s in ("train", "dev", "test") for r in load_jsonl((out / f"{s}.jsonl").read_text(encoding="utf-8").splitlines())]
    assert len(examples) == report["kept"] and len({e["id"] for e in examples}) == len(examples)
    if answer_marker:
        assert sum(answer_marker in e["conversations"][-1]["content"] for e in examples) >= 0.9 * len(examples)
