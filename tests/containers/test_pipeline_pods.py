"""The pipeline chart in CPU mode, its four stage Jobs run as containers of the images `make images
DEVICE=cpu` built: preprocess -> finetune -> evaluate -> publish against SeaweedFS, ending with
PROMOTED set, as a cluster would run them (non-root, read-only root filesystem, only the chart's
volumes writable, no network but the S3 Service)."""

from __future__ import annotations

import json

import pytest

from tests.containers.conftest import BUCKET, MODEL_NAME, NS, stage_jobs
from tests.helm_utils import validate

pytestmark = pytest.mark.containers

STAGES = ["preprocess", "finetune", "evaluate", "publish"]


def test_the_chart_renders_valid_cpu_jobs_for_the_built_images(pipeline, images):
    jobs = stage_jobs(pipeline.objects)
    assert list(jobs) == STAGES
    assert not validate(pipeline.objects)
    for stage, job in jobs.items():
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["image"] == images[stage]


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_exits_0_in_its_container(pipeline, stage):
    run = pipeline.runs.get(stage)
    assert run is not None, f"{stage} never ran: an earlier stage failed ({ {s: r.exit_code for s, r in pipeline.runs.items()} })"
    assert run.exit_code == 0, f"{stage} exited {run.exit_code}:\n{run.logs[-4000:]}"


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_ran_as_a_cluster_runs_it(pipeline, stage):
    """What the chart asks for reached the container: uid, read-only root, no capabilities, the
    memory limit, and a network with no way out but the cluster's own Services."""
    run = pipeline.runs[stage]
    host = run.container["HostConfig"]
    assert run.container["Config"]["User"] == "10001:10001"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
    (container,) = stage_jobs(pipeline.objects)[stage]["spec"]["template"]["spec"]["containers"]
    from tests.containers.podrun import quantity

    assert host["Memory"] == int(quantity(container["resources"]["limits"]["memory"]))
    assert host["NetworkMode"].startswith("container:")


def test_the_run_ends_with_the_promoted_model_in_the_store(pipeline, s3):
    client = s3.client()
    promoted = client.get_object(Bucket=BUCKET, Key=f"artifacts/models/{MODEL_NAME}/PROMOTED")["Body"].read().decode().strip()
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=f"artifacts/models/{MODEL_NAME}/{promoted}/MANIFEST.json")["Body"].read())
    assert manifest["status"] == "complete" and manifest["stage"] == "publish"
    names = {entry["path"] for entry in manifest["files"]}
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names)
    for stage in ("data", "finetune", "evaluate"):
        client.head_object(Bucket=BUCKET, Key=f"artifacts/runs/{pipeline.run_id}/{stage}/MANIFEST.json")


def test_evaluate_scored_the_golden_set_shipped_in_its_image(pipeline, s3):
    """The golden set lives in the image, outside the emptyDir the chart mounts over HOME."""
    metrics = json.loads(s3.client().get_object(Bucket=BUCKET, Key=f"artifacts/runs/{pipeline.run_id}/evaluate/metrics.json")["Body"].read())
    assert metrics["golden"]["examples"] == 22, metrics.get("golden")


def test_stages_reach_nothing_but_the_cluster(cluster, pipeline, images):
    """The pods' network has no route out: a stage image cannot reach PyPI (or anything outside)."""
    from tests.containers.podrun import pod_template

    job = stage_jobs(pipeline.objects)["preprocess"]
    template = pod_template(job)
    spec = dict(template["spec"])
    probe = dict(spec["containers"][0])
    probe["command"] = ["python", "-c", "import socket, sys\n"
                        "try:\n    socket.create_connection(('pypi.org', 443), timeout=5)\nexcept OSError as e:\n"
                        "    print('blocked:', e); sys.exit(0)\nsys.exit('pypi.org answered')"]
    probe.pop("args", None)
    spec["containers"] = [probe]
    pod = cluster.create_pod({"metadata": template["metadata"], "spec": spec}, "net-probe", NS)
    try:
        assert cluster.wait(pod, timeout=60) == 0, cluster.pod_logs(pod)
    finally:
        cluster._remove(pod)
