"""Every benchmark target builds its input from the clone itself: no ../shared/data needed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHES = sorted((REPO / "tests" / "benchmarks").glob("bench_*.py")) + [REPO / "tests" / "benchmarks" / "train_speed.py"]


@pytest.mark.parametrize("script", BENCHES, ids=lambda p: p.name)
def test_no_benchmark_requires_the_development_data(script):
    tree = ast.parse(script.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            required = {k.arg: k.value for k in node.keywords}.get("required")
            assert not (isinstance(required, ast.Constant) and required.value), \
                f"{script.name}: {ast.unparse(node)} must have a default a fresh clone can use"
    assert '"shared" / "data"' not in script.read_text(encoding="utf-8")


def test_bench_preprocess_runs_on_the_sample_alone(tmp_path):
    """The script `make bench-preprocess` runs, at a small size, from a clone without ../shared."""
    result = subprocess.run(
        [sys.executable, "tests/benchmarks/bench_preprocess.py", "--rows", "3000", "--no-baseline", "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3,000 rows" in result.stdout and "built from the sample" in result.stdout
    assert "| lawtune (python -m jobs.preprocess) |" in result.stdout
