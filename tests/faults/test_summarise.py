"""docs/reliability.md's counts: the rows tests/conftest.py writes for ``fault("<class>")`` tests, and
tests/faults/summarise.py's table from them, computed from each case's outcome (failures included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

CASES = '''
import pytest

@pytest.mark.fault("class a")
def test_passes():
    pass

@pytest.mark.fault("class a")
def test_fails():
    assert False, "what the fault broke"

@pytest.mark.fault("class b")
def test_measures_what_it_lost(record_property):
    record_property("lost_files", 3)
    assert False, "lost three"

@pytest.mark.fault("class b")
def test_skipped():
    pytest.skip("not on this machine")

@pytest.fixture
def breaks_after():
    yield
    raise RuntimeError("the fixture's cleanup found what the fault left")

@pytest.fixture
def breaks_before():
    raise RuntimeError("the fault's setup failed")

@pytest.mark.fault("class c")
def test_passes_then_its_teardown_fails(breaks_after):
    pass

@pytest.mark.fault("class c")
def test_setup_fails(breaks_before):
    pass
'''

# What the kill trials and the serving soak write themselves (tests/faults/test_kill_anywhere.py, test_serving_faults.py).
OWN_ROWS = [
    {"fault": "SIGKILL mid-stage", "backend": "file", "stage": "preprocess", "marker": "reading ", "reference_s": 1.0,
     "survived": True, "lost_files": 0, "killed_at": "'reading ' +0.1s", "after_kill": "refused"},
    {"fault": "SIGKILL mid-stage", "backend": "file", "stage": "preprocess", "marker": "reading ", "reference_s": 1.0,
     "survived": False, "lost_files": None, "error": "preprocess ended (0) before its kill marker"},
    {"backend": "serve", "test": "soak", "requests": 10, "ok": 6, "rate_limited": 3, "transport_failures": 1},
]


def test_fault_rows_and_the_table_are_computed_from_the_outcomes(tmp_path):
    (tmp_path / "test_cases.py").write_text(CASES, encoding="utf-8")
    report = tmp_path / "report.jsonl"
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-c", str(REPO / "pyproject.toml"),
                          "--rootdir", str(tmp_path), "-p", "no:cacheprovider", "-q", str(tmp_path / "test_cases.py")],
                         cwd=REPO, env={**os.environ, "FAULTS_REPORT": str(report)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-2000:]
    written = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    rows = {row["case"]: row for row in written}
    assert len(rows) == len(written), f"a case written twice: {written}"
    # A skipped case was not tried: counted, it read as a fault the pipeline did not survive.
    assert sorted(rows) == ["test_fails", "test_measures_what_it_lost", "test_passes", "test_passes_then_its_teardown_fails",
                            "test_setup_fails"], rows
    assert [rows[c]["survived"] for c in ("test_passes_then_its_teardown_fails", "test_setup_fails")] == [False, False]
    assert (rows["test_passes"]["survived"], rows["test_passes"]["lost_files"]) == (True, 0)
    assert (rows["test_fails"]["survived"], rows["test_fails"]["lost_files"]) == (False, None), "a failure cannot tell"
    assert (rows["test_measures_what_it_lost"]["survived"], rows["test_measures_what_it_lost"]["lost_files"]) == (False, 3)

    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps(row) + "\n" for row in OWN_ROWS), encoding="utf-8")
    table = subprocess.run([sys.executable, "tests/faults/summarise.py", str(report), str(tmp_path / "absent.jsonl"), str(own)],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    for expected in ["| class a | 2 | 1 | ? |", "| class b | 1 | 0 | 3 |", "| class c | 2 | 0 | ? |",
                     "| SIGKILL mid-stage, then the same command (file) | 2 | 1 | ? |",
                     "| serving soak: requests answered 200, or 429 with Retry-After (not reset, timed out or 5xx) | 10 | 9 | 1 |"]:
        assert expected in lines, f"{expected!r} not in:\n{table.stdout}"
    assert any(line.startswith("| preprocess | file | 2 | 1 | ? |") for line in lines), table.stdout
