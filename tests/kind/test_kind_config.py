"""The kind test's own files, checked here where no cluster runs: the SeaweedFS manifests and both
charts rendered with the kind values pass the strict schemas, and the ports line up."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helm_utils import by_kind, render, validate

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
                assert container["image"].endswith(":kind") and container["imagePullPolicy"] == "Never"


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


def test_the_vllm_image_the_kind_test_preloads_is_the_one_the_chart_runs():
    from tests.kind.test_kind import VLLM_IMAGE

    objects = render("charts/lawtune-serving", yaml.safe_load((HERE / "values-serving.yaml").read_text()))
    (vllm,) = [d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-vllm")]
    assert vllm["spec"]["template"]["spec"]["containers"][0]["image"] == VLLM_IMAGE
