"""The kind test's own files, checked here where no cluster runs: the SeaweedFS manifests and both
charts rendered with the kind values pass the strict schemas, and the ports line up."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helm_utils import by_kind, render, validate
from tests.kind import plan

HERE = Path(__file__).resolve().parent


def test_seaweedfs_manifests_are_valid_and_exposed_where_the_test_looks():
    objects = [o for o in yaml.safe_load_all((HERE / "seaweedfs.yaml").read_text()) if o]
    assert validate(objects) == []
    (svc,) = by_kind(objects, "Service")
    (port,) = svc["spec"]["ports"]
    cluster = yaml.safe_load((HERE / "cluster.yaml").read_text())
    host_ports = {m["containerPort"] for n in cluster["nodes"] for m in n.get("extraPortMappings", [])}
    assert port["nodePort"] in host_ports
    endpoint = f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{port['port']}"
    assert yaml.safe_load((HERE / "values-pipeline.yaml").read_text())["s3"]["endpoint"] == endpoint
    assert yaml.safe_load((HERE / "values-serving.yaml").read_text())["artifactStore"]["endpointUrl"] == endpoint


@pytest.mark.parametrize("chart", ["lawtune-pipeline", "lawtune-serving"])
def test_kind_values_render_valid_manifests_without_gpus(chart, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("seed: 1\n")
    if chart == "lawtune-pipeline":
        values = yaml.safe_load((HERE / "values-pipeline.yaml").read_text()) | {
            "runId": "kind", "input": {"uri": "s3://lawtune/artifacts/runs/kind/input/sample.csv"}}
        objects = render(f"charts/{chart}", values, set_files={"config": config})
    else:
        objects = render(f"charts/{chart}", yaml.safe_load((HERE / "values-serving.yaml").read_text()))
    assert validate(objects) == []
    pods = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Job", "Deployment")]
    assert pods
    for pod in pods:
        for container in pod.get("initContainers", []) + pod["containers"]:
            assert "nvidia.com/gpu" not in str(container.get("resources", {})), container["name"]
            if container["image"].startswith("localhost/lawtune/"):
                assert container["image"] in plan.built() and container["imagePullPolicy"] == "Never"


# ---------------------------------------------------------------- CPU mode, a laptop's size, what it pulls

PIPELINE_VALUES = yaml.safe_load((HERE / "values-pipeline.yaml").read_text())


def _pipeline_objects(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("seed: 1\n")
    values = PIPELINE_VALUES | {"runId": "kind", "input": {"uri": "s3://lawtune/artifacts/runs/kind/input/sample.csv"}}
    return render("charts/lawtune-pipeline", values, set_files={"config": config})


def _gpu_only_keys(values: dict) -> list[str]:
    """Keys that only mean something with GPUs: the GPU count and resource name, GPU tolerations,
    and finetune/evaluate `resources` (CPU mode reads `cpuResources` instead)."""
    found = [k for k in ("gpuResourceName", "gpuTolerations") if k in values]
    for stage, spec in (values.get("stages") or {}).items():
        found += [f"stages.{stage}.gpus" for k in spec if k == "gpus"]
        if stage in ("finetune", "evaluate") and "resources" in spec:
            found.append(f"stages.{stage}.resources")
        found += [f"stages.{stage}.distributed.nprocPerNode" for k in (spec.get("distributed") or {}) if k == "nprocPerNode"]
    return found


def test_the_kind_pipeline_runs_in_cpu_mode_with_no_gpu_only_key():
    assert PIPELINE_VALUES["device"] == "cpu"
    assert _gpu_only_keys(PIPELINE_VALUES) == []
    assert _gpu_only_keys({"stages": {"finetune": {"gpus": 0, "resources": {}}}}) == ["stages.finetune.gpus", "stages.finetune.resources"]


def _quantity(value: str) -> float:
    units = {"m": 1e-3, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if str(value).endswith(suffix):
            return float(str(value)[: -len(suffix)]) * factor
    return float(value)


def test_the_kind_pipeline_fits_a_4_core_16_gb_machine(tmp_path):
    """One stage runs at a time: the largest, plus SeaweedFS, must leave a core and 4 GB for the
    control plane, Docker and the system."""
    jobs = [o for o in _pipeline_objects(tmp_path) if o["kind"] == "Job" and "lawtune.io/stage" in o["metadata"]["labels"]]
    seaweed = [c["resources"] for o in yaml.safe_load_all((HERE / "seaweedfs.yaml").read_text()) if o and o["kind"] == "Deployment"
               for c in o["spec"]["template"]["spec"]["containers"]]
    stages = [job["spec"]["template"]["spec"]["containers"][0]["resources"] for job in jobs]
    cpu = max(_quantity(r["requests"]["cpu"]) for r in stages) + sum(_quantity(r["requests"]["cpu"]) for r in seaweed)
    memory = max(_quantity(r["limits"]["memory"]) for r in stages) + sum(_quantity(r["limits"]["memory"]) for r in seaweed)
    assert cpu <= 3 and memory <= 12 * 2**30, (cpu, memory / 2**30)
    assert all(j["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":kind-cpu") for j in jobs)


def test_make_kind_test_says_what_it_builds_and_pulls_first(tmp_path):
    """The plan names every image the test loads and every image the kind manifests run."""
    import subprocess
    import sys

    from tests.kind import plan

    recipe = subprocess.run(["make", "-n", "kind-test"], cwd=HERE.parent.parent, capture_output=True, text=True, check=True).stdout
    lines = [line for line in recipe.splitlines() if "plan.py" in line or "pytest" in line]
    assert "tests/kind/plan.py" in lines[0] and "-m kind" in lines[1]
    printed = subprocess.run([sys.executable, str(HERE / "plan.py")], capture_output=True, text=True, check=True).stdout
    used = {c["image"] for o in _pipeline_objects(tmp_path) if o["kind"] == "Job" and "lawtune.io/stage" in o["metadata"]["labels"]
            for c in o["spec"]["template"]["spec"]["containers"]}
    used |= {c["image"] for o in yaml.safe_load_all((HERE / "seaweedfs.yaml").read_text()) if o and o["kind"] == "Deployment"
             for c in o["spec"]["template"]["spec"]["containers"]}
    for image in used | set(plan.built()) | set(plan.pulled()):
        assert image in printed, image
    assert "minutes" in printed and plan.bases() == ["python:3.11.14-slim-bookworm"]



def test_kind_serving_values_use_cpu_mode_without_gpu_only_keys():
    """The kind serving values run vLLM in CPU mode and set none of the keys the chart's schema
    calls GPU-only (the list comes from the schema itself, so a new GPU-only key is checked too)."""
    from tests.charts.test_lawtune_serving import gpu_only_paths

    values = yaml.safe_load((HERE / "values-serving.yaml").read_text())
    assert values["vllm"]["device"] == "cpu"

    def paths(node, prefix=""):
        for key, value in node.items():
            yield prefix + key
            if isinstance(value, dict):
                yield from paths(value, f"{prefix}{key}.")

    set_keys = set(paths(values))
    gpu_only = gpu_only_paths() | {"vllm.gpu", "vllm.resources"}  # vllm.resources is the GPU mode's; CPU mode reads vllm.cpu.resources
    assert set_keys & gpu_only == set()
    assert "nvidia" not in yaml.safe_dump(values)


def test_cpu_serving_asks_for_the_images_make_images_builds():
    """vllm.device=cpu asks for the fetch-model tag `make images DEVICE=cpu` gives (`<tag>-cpu`) and
    the vLLM-CPU image it builds: the kind test side-loads exactly those, with no re-tagging; the
    metrics sidecar beside vLLM runs the gateway's nginx, which the node pulls."""
    from tests.kind import plan

    objects = render("charts/lawtune-serving", yaml.safe_load((HERE / "values-serving.yaml").read_text()))
    (vllm,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("vllm")]
    pod = vllm["spec"]["template"]["spec"]
    images = {c["image"] for c in pod["initContainers"] + pod["containers"]}
    assert images == {f"{plan.REGISTRY}/fetch-model:{plan.TAG}-cpu", f"{plan.REGISTRY}/vllm-openai-cpu:v{plan.vllm_version()}",
                      plan.pulled()[-1]}
    assert images <= set(plan.built()) | set(plan.pulled())


@pytest.mark.parametrize("with_platform", [True, False])
def test_side_loading_saves_the_host_platform_only_where_docker_can(with_platform, tmp_path):
    """kind issue 3795: under Docker's containerd image store a plain `docker save` names platforms
    whose blobs are missing; `--platform` (Docker 28+) saves the host's only."""
    import platform

    from tests.kind.test_kind import save_command

    argv = save_command(["a:1", "b:2"], tmp_path / "x.tar", with_platform)
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    expected = ["docker", "save", *(["--platform", f"linux/{arch}"] if with_platform else []), "-o", str(tmp_path / "x.tar"), "a:1", "b:2"]
    assert argv == expected
