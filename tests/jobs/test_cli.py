"""jobs/cli.py: the `lawtune` console script runs the same code as `python -m jobs.<stage>`, and every
command speaks with one voice (shared/core/cli.py): usage and errors as `lawtune <command>`, the
environment it reads in its --help, help text for every option, no markup."""

import argparse
import importlib
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


# What each command reads from the environment (its --help must name them).
READS = {
    "train": ("LAWTUNE_ARTIFACT_ROOT", "LAWTUNE_RUN_ID", "LAWTUNE_BASE_MODEL", "LAWTUNE_CACHE_DIR"),
    "preprocess": ("LAWTUNE_ARTIFACT_ROOT", "LAWTUNE_RUN_ID", "LAWTUNE_S3_ENDPOINT_URL"),
    "finetune": ("LAWTUNE_ARTIFACT_ROOT", "LAWTUNE_RUN_ID", "LAWTUNE_BASE_MODEL", "LAWTUNE_CACHE_DIR", "HF_HUB_OFFLINE"),
    "evaluate": ("LAWTUNE_ARTIFACT_ROOT", "LAWTUNE_RUN_ID", "LAWTUNE_BASE_MODEL", "LAWTUNE_CACHE_DIR"),
    "publish": ("LAWTUNE_ARTIFACT_ROOT", "LAWTUNE_RUN_ID", "LAWTUNE_BASE_MODEL", "LAWTUNE_ACTOR"),
    "fetch-model": ("LAWTUNE_S3_ENDPOINT_URL", "LAWTUNE_BASE_MODEL"),
    "models": ("LAWTUNE_ARTIFACT_ROOT", "LAWTUNE_ACTOR"),
    "lineage": ("LAWTUNE_S3_ENDPOINT_URL",),
    "serve": ("LAWTUNE_ARTIFACT_ROOT", "LAWTUNE_API_KEY", "LAWTUNE_GPU", "LAWTUNE_CACHE_DIR"),
    "deploy": ("LAWTUNE_ARTIFACT_ROOT", "KUBECONFIG"),
}


class _Parsed(Exception):
    pass


def _parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    seen = {}

    def capture(self, *args, **kwargs):
        seen["parser"] = self
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed):
        importlib.import_module(COMMANDS[name][0]).main([])
    return seen["parser"]


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield parser.prog, action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)


def test_every_command_is_in_the_voice_table():
    assert set(READS) == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_help_names_its_command_its_environment_and_every_options_purpose(name, monkeypatch, capsys):
    module = importlib.import_module(COMMANDS[name][0])
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: lawtune {name} ")
    environment = text.split("\nenvironment:\n", 1)[1]
    for variable in READS[name]:
        assert f"  {variable} " in environment, f"lawtune {name} --help does not name {variable}"
    assert "exit codes: 0 done, 1 a failure worth retrying" in text
    for markup in ("``", "`", "**", ":class:", ":func:"):
        assert markup not in text, f"raw markup {markup!r} in lawtune {name} --help"
    for prog, action in _all_actions(_parser(name, monkeypatch)):
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        assert action.help and len(action.help) > 10, f"{prog}: {action.option_strings or action.dest} has no help text"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_wrong_flag_gets_the_usage_and_error_of_lawtune_command(name, capsys):
    with pytest.raises(SystemExit) as done:
        importlib.import_module(COMMANDS[name][0]).main(["--no-such-flag"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"usage: lawtune {name} ")
    assert err[-1].startswith(f"lawtune {name}: error: ")


@pytest.mark.parametrize(("name", "args"), [
    pytest.param("train", ["--config", "/nonexistent.yaml"], id="train"),
    pytest.param("preprocess", ["--config", "/nonexistent.yaml"], id="preprocess"),
    pytest.param("finetune", ["--config", "/nonexistent.yaml"], id="finetune"),
    pytest.param("evaluate", ["--config", "/nonexistent.yaml"], id="evaluate"),
    pytest.param("publish", ["--model-name", "m", "--config", "/nonexistent.yaml"], id="publish"),
    pytest.param("fetch-model", ["file:///nowhere/models/m", "/tmp/never-made", "--config", "/nonexistent.yaml"], id="fetch-model"),
])
def test_a_failure_ends_with_one_line_in_the_same_voice(name, args, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", f"file://{tmp_path}")
    monkeypatch.setenv("LAWTUNE_CACHE_DIR", str(tmp_path / "cache"))
    assert importlib.import_module(COMMANDS[name][0]).main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"lawtune {name}: error: config file /nonexistent.yaml does not exist"
