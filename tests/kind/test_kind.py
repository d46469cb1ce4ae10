"""End to end on a real kind cluster (make kind-test): CPU images, in-cluster S3, the pipeline as Jobs
in the chart's CPU mode, the serving chart with vLLM's CPU image, one chat completion through the
gateway. Fits a 4-core / 16 GB machine; tests/kind/plan.py prints what it builds and pulls and how
long it takes.

Skipped, with the reason, where docker (with a running engine) or kind is missing. Runs as is
where they exist. Set LAWTUNE_KIND_KEEP=1 to keep the cluster afterwards (and to reuse it), and
LAWTUNE_KIND_SKIP_BUILD=1 when the images are already built.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.kind

REPO = Path(__file__).resolve().parent.parent.parent
HERE = Path(__file__).resolve().parent
CLUSTER = os.environ.get("LAWTUNE_KIND_CLUSTER", "lawtune-test")
NS = "lawtune"
from tests.kind.plan import DEVICE, REGISTRY, TAG, built  # the same lists make kind-test prints
S3_HOST = "http://127.0.0.1:30833"
ACCESS, SECRET = "lawtune-test-access", "lawtune-test-secret-0123456789"
API_KEY = "kind-test-key-0123456789abcdefghijkl"  # the gateway takes keys of 32+ characters


def _missing() -> str | None:
    if not shutil.which("kind"):
        return "kind is not installed (https://kind.sigs.k8s.io)"
    if not shutil.which("docker"):
        return "docker is not installed"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        return "docker is installed but its engine is not reachable (docker info failed)"
    return None


def sh(*cmd: str, env: dict | None = None, timeout: float = 1800, check: bool = True, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, timeout=timeout, check=check, text=True, **kw)


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    """A kind cluster with the images loaded, SeaweedFS running and the Secrets in place."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    helm, kubectl = REPO / ".tools" / "helm", REPO / ".tools" / "kubectl"
    if not helm.exists():
        sh("make", "tools", cwd=REPO)
    home = tmp_path_factory.mktemp("kind-home")
    kubeconfig = home / "kubeconfig"
    existing = sh("kind", "get", "clusters", capture_output=True).stdout.split()
    if CLUSTER not in existing:
        sh("kind", "create", "cluster", "--name", CLUSTER, "--config", str(HERE / "cluster.yaml"), "--wait", "5m")
    sh("kind", "export", "kubeconfig", "--name", CLUSTER, "--kubeconfig", str(kubeconfig))
    env = {"KUBECONFIG": str(kubeconfig), "HOME": str(home)}

    if os.environ.get("LAWTUNE_KIND_SKIP_BUILD") != "1":
        sh("make", "images", f"DEVICE={DEVICE}", f"IMAGE_REGISTRY={REGISTRY}", f"IMAGE_TAG={TAG}", cwd=REPO, timeout=7200)
    side_load(built(), CLUSTER, home)

    k = lambda *a, **kw: sh(str(kubectl), *a, env=env, **kw)  # noqa: E731
    k("apply", "-f", str(HERE / "seaweedfs.yaml"))
    k("-n", "lawtune-s3", "rollout", "status", "deploy/seaweedfs", "--timeout=300s")
    k("create", "namespace", NS, check=False)
    for name, literals in {
        "lawtune-s3": [f"AWS_ACCESS_KEY_ID={ACCESS}", f"AWS_SECRET_ACCESS_KEY={SECRET}"],
        "lawtune-api-key": [f"api-key={API_KEY}"],
    }.items():
        manifest = k("-n", NS, "create", "secret", "generic", name, *[f"--from-literal={l}" for l in literals],
                     "--dry-run=client", "-o", "yaml", capture_output=True).stdout
        k("apply", "-f", "-", input=manifest)

    _wait_for_s3()
    yield {"env": env, "helm": str(helm), "kubectl": str(kubectl), "kubeconfig": str(kubeconfig)}
    if os.environ.get("LAWTUNE_KIND_KEEP") != "1":
        sh("kind", "delete", "cluster", "--name", CLUSTER, check=False)


def side_load(images: list[str], cluster: str, scratch: Path) -> None:
    """Put locally built images on the kind node. `kind load docker-image` pipes a plain `docker save`
    into `ctr images import --all-platforms`, which fails under Docker's containerd image store
    (Docker 29's default: the archive names platforms whose blobs were never pulled; kind issue
    3795). What kind's maintainers advise works with either image store: save the host's platform
    only, then `kind load image-archive`."""
    archive = scratch / "images.tar"
    sh(*save_command(images, archive, docker_supports_platform()), timeout=3600)
    sh("kind", "load", "image-archive", str(archive), "--name", cluster, timeout=3600)
    archive.unlink()


def docker_supports_platform() -> bool:
    """`docker save --platform` exists from Docker 28 (API 1.48); older clients and engines store one platform anyway."""
    return "--platform" in subprocess.run(["docker", "save", "--help"], capture_output=True, text=True).stdout


def save_command(images: list[str], archive: Path, with_platform: bool) -> list[str]:
    import platform

    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return ["docker", "save", *(["--platform", f"linux/{arch}"] if with_platform else []), "-o", str(archive), *images]


def _s3_env() -> dict[str, str]:
    return {"LAWTUNE_ARTIFACT_ROOT": "s3://lawtune/artifacts", "LAWTUNE_S3_ENDPOINT_URL": S3_HOST,
            "AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


def _wait_for_s3(timeout: float = 180) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=S3_HOST, aws_access_key_id=ACCESS, aws_secret_access_key=SECRET,
                          region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))
    deadline = time.monotonic() + timeout
    while True:
        try:
            if "lawtune" not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
                client.create_bucket(Bucket="lawtune")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def _train(kube, run_id: str, *extra: str, capture: bool = False) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "shared.cluster.driver", "--target", "k8s", "--config", "configs/smollm2-135m-cpu.yaml",
              "--input", "configs/data/legal_qa_sample.csv", "--run-id", run_id, "--model-name", "legal-assistant",
              "--values", str(HERE / "values-pipeline.yaml"), "--namespace", NS, *extra,
              env={**kube["env"], **_s3_env(), "LAWTUNE_K8S_POLL_S": "3"}, cwd=REPO, timeout=5400, check=False,
              capture_output=capture)


RUN_ID = f"kind-{uuid.uuid4().hex[:6]}"


def test_pipeline_runs_as_jobs_and_publishes(kube, monkeypatch):
    proc = _train(kube, RUN_ID)
    assert proc.returncode == 0
    from shared.core.settings import load_settings
    from shared.store.storage import open_location

    for key, value in _s3_env().items():
        monkeypatch.setenv(key, value)
    settings = load_settings(run_id=RUN_ID)
    for stage in ("data", "finetune", "evaluate"):
        assert open_location(settings.run_uri(stage), settings).exists("MANIFEST.json"), stage
    assert open_location(settings.models_uri("legal-assistant"), settings).exists("PROMOTED")


def test_rerunning_the_same_run_id_resumes_without_new_jobs(kube):
    proc = _train(kube, RUN_ID, capture=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("already completed in this run") == 4


def test_a_missing_image_fails_fast_and_says_why(kube, tmp_path):
    values = tmp_path / "bad-image.yaml"
    values.write_text("image:\n  tag: not-loaded\n")
    proc = _train(kube, f"{RUN_ID}-bad", "--values", str(values), capture=True)
    assert proc.returncode != 0
    assert "Stage preprocess failed (ImagePullBackOff)" in proc.stderr and "ErrImageNeverPull" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serving_chart_answers_a_chat_completion_through_the_gateway(kube):
    sh(kube["helm"], "upgrade", "--install", "assistant", str(REPO / "charts" / "lawtune-serving"), "--namespace", NS,
       "-f", str(HERE / "values-serving.yaml"), "--wait", "--timeout", "30m", env=kube["env"], timeout=2000)
    services = json.loads(sh(kube["kubectl"], "-n", NS, "get", "svc", "-l", "app.kubernetes.io/instance=assistant", "-o", "json",
                             env=kube["env"], capture_output=True).stdout)["items"]
    (gateway,) = [s for s in services if s["metadata"]["name"].endswith("gateway")]
    port = _free_port()
    forward = subprocess.Popen([kube["kubectl"], "-n", NS, "port-forward", f"svc/{gateway['metadata']['name']}",
                                f"{port}:{gateway['spec']['ports'][0]['port']}"], env={**os.environ, **kube["env"]})
    try:
        body = json.dumps({"model": "legal-assistant", "max_tokens": 32,
                           "messages": [{"role": "user", "content": "What is a contract?"}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(request, timeout=120) as resp:
                    answer = json.loads(resp.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        assert answer["choices"][0]["message"]["content"].strip()
    finally:
        forward.kill()
        forward.wait()
