"""jobs/cli.py: the `lawtune` console script runs the same code as `python -m jobs.<stage>`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "configs" / "data" / "legal_qa_sample.csv"
LAWTUNE = Path(sys.executable).with_name("lawtune")  # installed by `make venv` ([project.scripts])


def run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LAWTUNE_CACHE_DIR": str(tmp_path / "cache"), "LAWTUNE_ARTIFACT_ROOT": f"file://{tmp_path}"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_the_console_script_is_installed_and_lists_every_command_with_one_line(tmp_path):
    assert LAWTUNE.exists(), "make venv installs the `lawtune` console script (pyproject [project.scripts])"
    result = run([str(LAWTUNE), "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("preprocess", "finetune", "evaluate", "publish", "fetch-model", "train", "serve"):
        line = next(l for l in result.stdout.splitlines() if l.strip().startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 20, line


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_reaches_its_modules_own_flags(name, tmp_path):
    module = COMMANDS[name][0]
    via_cli = run([str(LAWTUNE), name, "--help"], tmp_path)
    via_module = run([sys.executable, "-m", module, "--help"], tmp_path)
    assert via_cli.returncode == via_module.returncode == 0, via_cli.stderr
    assert via_cli.stdout == via_module.stdout


def test_unknown_command_exits_2_naming_the_choices(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err and "fetch-model" in err
    assert main([]) == 2


def test_same_exit_code_and_last_line_as_the_module_on_bad_input(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"")
    flags = ["--input", str(bad), "--output", f"file://{tmp_path / 'out'}"]
    via_cli = run([str(LAWTUNE), "preprocess", *flags], tmp_path)
    via_module = run([sys.executable, "-m", "jobs.preprocess", *flags], tmp_path)
    assert via_cli.returncode == via_module.returncode == 2
    assert via_cli.stderr.strip().splitlines()[-1] == via_module.stderr.strip().splitlines()[-1]


def test_preprocess_through_the_command_writes_what_the_module_writes(tmp_path):
    outputs = {}
    for how, cmd in {"cli": [str(LAWTUNE), "preprocess"], "module": [sys.executable, "-m", "jobs.preprocess"]}.items():
        out = tmp_path / how
        result = run([*cmd, "--input", str(SAMPLE), "--output", f"file://{out}"], tmp_path)
        assert result.returncode == 0, result.stderr
        manifest = json.loads((out / "MANIFEST.json").read_text())
        outputs[how] = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert outputs["cli"] == outputs["module"] and "train.jsonl" in outputs["cli"]
