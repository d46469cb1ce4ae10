"""Faults with containers, on the pod specs the pipeline chart renders:

- the finetune container SIGKILLed after its first committed checkpoint; the same pod spec run again
  (a new pod, fresh emptyDirs, as a Job's retry gets) resumes, and its adapter equals the adapter of
  the uninterrupted run (`pipeline`) within the bound the process-level kill tests use;
- a bad input: the preprocess container exits 2 (the podFailurePolicy's FailJob code), naming it;
- the S3 endpoint killed: a stage exits 1 (worth a retry), naming the endpoint.
"""

from __future__ import annotations

import re
import time
import uuid

import pytest

from tests.containers.conftest import (
    BUCKET, NS, pipeline_values, render_pipeline, run_job, run_job_with_retries, stage_jobs, start_s3,
)
from tests.containers.podrun import pod_template

pytestmark = pytest.mark.containers

from tests.lora_fixtures import RESUME_TOLERANCE as ADAPTER_ATOL  # the process-level kill tests' bound


def _objects(cluster, tmp_path, run_id: str, extra_env: dict[str, str] | None = None, **values) -> dict[str, dict]:
    objects = render_pipeline(tmp_path, pipeline_values(run_id, extra_env, **values))
    cluster.apply(objects, NS)
    return stage_jobs(objects)


def _adapter(s3, run_id: str, dest):
    from safetensors.torch import load_file

    key = f"artifacts/runs/{run_id}/finetune/adapter/adapter_model.safetensors"
    s3.client().download_file(BUCKET, key, str(dest))
    return load_file(dest)


@pytest.mark.fault("container: finetune SIGKILLed after a checkpoint, its pod replaced as the Job would")
def test_finetune_killed_after_a_checkpoint_resumes_to_the_uninterrupted_adapter(cluster, s3, pipeline, tmp_path):
    assert pipeline.runs["finetune"].exit_code == 0, "premise: the uninterrupted run finished"
    run_id = f"kill-{uuid.uuid4().hex[:6]}"
    # The killed pod's S3 lease outlives it by its TTL (the default, 60 s, shortened here): the Job's
    # next pods exit 1 until it expires, and the one after takes the folder over.
    jobs = _objects(cluster, tmp_path, run_id, {"LAWTUNE_LEASE_TTL_S": "20"})
    assert run_job(cluster, jobs["preprocess"]).exit_code == 0

    template = pod_template(jobs["finetune"])
    pod = cluster.create_pod(template, f"finetune-{run_id}", NS)
    client = s3.client()
    marker = f"artifacts/runs/{run_id}/finetune/checkpoints/step-1/MANIFEST.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and cluster.running(pod):
        if client.list_objects_v2(Bucket=BUCKET, Prefix=marker).get("KeyCount"):
            break
        time.sleep(0.5)
    assert client.list_objects_v2(Bucket=BUCKET, Prefix=marker).get("KeyCount"), (
        "no checkpoint committed before the container ended:\n" + cluster.pod_logs(pod)[-3000:])
    cluster.kill(pod, signal="KILL")
    killed = cluster.wait(pod, timeout=60)
    state = cluster.docker("inspect", "--format", "{{.State.OOMKilled}} {{.State.ExitCode}}", pod.containers["finetune"]).stdout.split()
    cluster._remove(pod)
    assert killed == 137 and state == ["false", "137"], f"the container was not killed by SIGKILL: exit {killed}"
    assert not client.list_objects_v2(Bucket=BUCKET, Prefix=f"artifacts/runs/{run_id}/finetune/MANIFEST.json").get("KeyCount")

    runs = run_job_with_retries(cluster, jobs["finetune"])
    again = runs[-1]
    assert again.exit_code == 0, again.logs[-4000:]
    for refused in runs[:-1]:  # refused while the dead pod's lease was still live
        assert refused.exit_code == 1 and "being written by" in refused.logs, refused.logs[-2000:]
    resumed = re.search(r"resuming from committed checkpoint step-(\d+)", again.logs)
    assert resumed and int(resumed.group(1)) >= 1, "the re-run did not resume:\n" + again.logs[-3000:]
    final = _adapter(s3, run_id, tmp_path / "resumed.safetensors")
    reference = _adapter(s3, pipeline.run_id, tmp_path / "reference.safetensors")
    assert final.keys() == reference.keys()
    worst = max(float((final[k] - reference[k]).abs().max()) for k in reference)
    assert worst <= ADAPTER_ATOL, f"resumed adapter differs from the uninterrupted one by {worst:.2e}"


@pytest.mark.fault("container: a bad input file (exit 2, FailJob)")
def test_a_bad_input_exits_2_naming_it(cluster, s3, tmp_path):
    s3.client().put_object(Bucket=BUCKET, Key="inputs/bad.csv", Body="名字,内容\n张三,你好\n".encode())
    jobs = _objects(cluster, tmp_path, f"bad-{uuid.uuid4().hex[:6]}", input={"uri": f"s3://{BUCKET}/inputs/bad.csv"})
    run = run_job(cluster, jobs["preprocess"], timeout=300)
    assert run.exit_code == 2, run.logs[-3000:]
    last = run.logs.strip().splitlines()[-1]
    assert "bad.csv" in last and "error" in last, last


@pytest.mark.fault("container: the S3 endpoint dead (exit 1, retried)")
def test_a_dead_s3_endpoint_exits_1_naming_it(cluster, tmp_path):
    """A SeaweedFS of its own, killed before the stage starts: the stage gives up within its bounded
    retries (the chart's extraEnv here) with exit 1, which the Job retries, not 2."""
    dead = start_s3(cluster, behind_service=False)
    cluster.kill(dead.pod, signal="KILL")  # SeaweedFS dies; its pod (and so its address) stays
    endpoint = f"http://{dead.pod.hostname}:8333"
    jobs = _objects(cluster, tmp_path, f"dead-{uuid.uuid4().hex[:6]}", s3={"endpoint": endpoint, "existingSecret": "lawtune-s3"})
    started = time.monotonic()
    run = run_job(cluster, jobs["preprocess"], timeout=600)
    assert run.exit_code == 1, run.logs[-3000:]
    last = run.logs.strip().splitlines()[-1]
    assert dead.pod.hostname in last, last
    print(f"dead S3: exit 1 after {time.monotonic() - started:.0f} s")
