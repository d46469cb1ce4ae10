"""``make train TARGET=k8s``: run one pipeline run as Kubernetes Jobs, in order, and follow them.

    LAWTUNE_ARTIFACT_ROOT=s3://lawtune/artifacts LAWTUNE_S3_ENDPOINT_URL=http://localhost:30833 \\
    python -m shared.cluster.driver --target k8s --config configs/smollm2-135m-cpu.yaml \\
        --input configs/data/legal_qa_sample.csv --run-id sample --values my-cluster.yaml

1. Uploads a local input file to ``<run>/input/`` (pods cannot read this machine's disk).
2. Renders ``charts/lawtune-pipeline`` with ``helm template`` (the same manifests ``helm install``
   and Argo CD apply), then applies its ConfigMap/ServiceAccount/Service.
3. Submits each stage's Job after the previous one completed, streaming its pod's logs and a
   progress line; stops at the first failure with one paragraph saying why
   (``shared.cluster.k8s_explain``).

Re-running the same run id resumes: a Job that completed with the same spec is skipped, a failed
one is submitted again (its stage skips committed work and finetune resumes from its checkpoint).
Artifacts are never deleted here.

A Job Kubernetes would keep forever (a pod nobody can schedule, an image nobody can pull) is
deleted once the driver gives up on it, so it does not take a GPU when one frees up later.

Environment: the kube config (or in-cluster service account; the pipeline chart's
``driverRbac.only`` / ``driverRbac.create`` Role grants exactly the calls ``Cluster`` makes); ``LAWTUNE_HELM`` (default ``.tools/helm``,
then ``helm`` on PATH); ``LAWTUNE_K8S_*`` (``DriverSettings``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.core.cli import error_line
from shared.core.errors import EXIT_OK, EXIT_RETRY, ConfigError, LawtuneError
from shared.cluster.k8s_explain import (
    DEFAULT_PULL_GRACE_S,
    DEFAULT_UNSCHEDULABLE_GRACE_S,
    SPEC_DIGEST,
    Action,
    Verdict,
    assess,
    explain,
    plan,
    spec_digest,
)
from shared.core.settings import Settings

log = logging.getLogger("lawtune.cluster")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lawtune-pipeline"
STAGES = ("preprocess", "finetune", "evaluate", "publish")
RELEASE = "lawtune"
FIELD_MANAGER = "lawtune-driver"
PROGRESS_EVERY_S = 30.0
LOG_TAIL_LINES = 20
# What the driver applies besides the Jobs; RBAC objects and Helm hooks are an installer's business.
APPLIED_KINDS = ("ConfigMap", "ServiceAccount", "Service")


class DriverSettings(BaseSettings):
    """How patient the driver is (``LAWTUNE_K8S_<NAME>``)."""

    model_config = SettingsConfigDict(env_prefix="LAWTUNE_K8S_", extra="ignore")

    poll_s: float = Field(default=5.0, gt=0, description="Seconds between looks at a Job.")
    unschedulable_grace_s: float = Field(
        default=DEFAULT_UNSCHEDULABLE_GRACE_S, gt=0,
        description="Seconds a pod may stay unschedulable (GPU node scale-up) before the stage fails.")
    pull_grace_s: float = Field(default=DEFAULT_PULL_GRACE_S, gt=0, description="Seconds an image pull may keep failing.")
    delete_abandoned: bool = Field(default=True, description="Delete a Job the driver gave up on (false: print how).")


# ---------------------------------------------------------------- rendering (no cluster needed)


def helm_binary() -> str:
    for candidate in (os.environ.get("LAWTUNE_HELM"), str(REPO / ".tools" / "helm"), shutil.which("helm")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError("helm not found: run `make tools` (puts it in .tools/helm) or set LAWTUNE_HELM")


def render_chart(
    settings: Settings,
    *,
    config_path: str,
    input_uri: str,
    run_id: str,
    model_name: str,
    values_files: Iterable[str] = (),
    namespace: str = "default",
    chart: Path = CHART,
) -> list[dict[str, Any]]:
    """The pipeline chart's objects for this run.

    The store as this machine sees it is a default the values files may override (pods often
    reach S3 by an in-cluster name); run id, artifact root, input, model name and config are
    this call's and win over any file.
    """
    if not Path(config_path).is_file():
        raise ConfigError(f"config {config_path} does not exist")
    defaults = {"s3": {"region": settings.s3_region, "addressingStyle": settings.s3_addressing_style}}
    if settings.s3_endpoint_url:
        defaults["s3"]["endpoint"] = settings.s3_endpoint_url
    with tempfile.TemporaryDirectory(prefix="lawtune-helm-") as home:
        generated = Path(home) / "driver-values.yaml"
        generated.write_text(yaml.safe_dump(defaults), encoding="utf-8")
        cmd = [helm_binary(), "template", RELEASE, str(chart), "--namespace", namespace, "-f", str(generated)]
        for values in values_files:
            cmd += ["-f", str(values)]
        cmd += [
            "--set-string", f"runId={run_id}",
            "--set-string", f"artifactRoot={settings.artifact_root}",
            "--set-string", f"input.uri={input_uri}",
            "--set-string", f"modelName={model_name}",
            "--set-file", f"config={config_path}",
        ]
        env = {**os.environ, "HOME": home, "HELM_CACHE_HOME": f"{home}/c", "HELM_CONFIG_HOME": f"{home}/g", "HELM_DATA_HOME": f"{home}/d"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0:
        raise ConfigError(f"rendering {chart.name} failed: {proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def stage_jobs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(stage, Job) in pipeline order, each stamped with the digest of its spec."""
    jobs = {o["metadata"]["labels"]["lawtune.io/stage"]: o for o in objects
            if o["kind"] == "Job" and "lawtune.io/stage" in o["metadata"].get("labels", {})}
    ordered = []
    for stage in STAGES:
        if stage in jobs:
            job = jobs[stage]
            job["metadata"].setdefault("annotations", {})[SPEC_DIGEST] = spec_digest(job)
            ordered.append((stage, job))
    return ordered


def applied_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the driver applies before the Jobs: the run's ConfigMap, ServiceAccount and Service.
    Hooks (uninstall cleanup) and RBAC are left to whoever installs the chart."""
    return [o for o in objects if o["kind"] in APPLIED_KINDS and "helm.sh/hook" not in o["metadata"].get("annotations", {})]


def stage_input(settings: Settings, input_uri: str) -> str:
    """A URI the pods can read: a local file is uploaded to ``<run>/input/<name>`` first."""
    from shared.store.storage import open_location

    if input_uri.startswith("s3://"):
        return input_uri
    path = Path(input_uri.removeprefix("file://"))
    if not path.is_file():
        raise ConfigError(f"input {input_uri} does not exist (a local file, or an s3:// URI the cluster can read)")
    dest = open_location(settings.run_uri("input"), settings)
    dest.upload_file(path, path.name)
    uri = f"{settings.run_uri('input')}/{path.name}"
    log.info("uploaded %s to %s", path, uri)
    return uri


# ---------------------------------------------------------------- the cluster


class Cluster:
    """The few API calls the driver makes; objects go in and out as plain JSON dicts."""

    def __init__(self, namespace: str | None):
        from kubernetes import client, config
        from kubernetes.dynamic import DynamicClient

        try:
            config.load_kube_config()
            _, active = config.list_kube_config_contexts()
            default_ns = (active or {}).get("context", {}).get("namespace", "default")
        except config.ConfigException as exc:
            if "KUBERNETES_SERVICE_HOST" not in os.environ:
                raise config.ConfigException(f"no kube config ({exc}; set KUBECONFIG) and not running in a pod") from exc
            config.load_incluster_config()
            default_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
        self.namespace = namespace or default_ns
        self.api = client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.dynamic = DynamicClient(self.api)
        self._api_exception = client.ApiException

    def _dict(self, obj) -> dict[str, Any]:
        return self.api.sanitize_for_serialization(obj)

    def apply(self, obj: dict[str, Any]) -> None:
        resource = self.dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        self.dynamic.server_side_apply(resource, body=obj, namespace=self.namespace, field_manager=FIELD_MANAGER, force_conflicts=True)

    def get_job(self, name: str) -> dict[str, Any] | None:
        try:
            return self._dict(self.batch.read_namespaced_job(name, self.namespace))
        except self._api_exception as exc:
            if exc.status == 404:
                return None
            raise

    def list_jobs(self, selector: str) -> list[dict[str, Any]]:
        return [self._dict(j) for j in self.batch.list_namespaced_job(self.namespace, label_selector=selector).items]

    def create_job(self, job: dict[str, Any]) -> None:
        self.batch.create_namespaced_job(self.namespace, quantities_as_strings(job))

    def delete_job(self, name: str, timeout_s: float = 300) -> None:
        """Delete the Job and its pods (not its artifacts) and wait until the name is free."""
        self.batch.delete_namespaced_job(name, self.namespace, propagation_policy="Foreground")
        deadline = time.monotonic() + timeout_s
        while self.get_job(name) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {name} still exists {timeout_s:.0f} s after deletion")
            time.sleep(1)

    def job_pods(self, job_name: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"job-name={job_name}")
        return [self._dict(p) for p in pods.items]

    def log_tail(self, pod: str, container: str, lines: int = LOG_TAIL_LINES) -> list[str]:
        try:
            text = self.core.read_namespaced_pod_log(pod, self.namespace, container=container, tail_lines=lines)
        except self._api_exception:
            return []
        return text.splitlines()[-lines:]

    def follow_logs(self, pod: str, container: str, prefix: str) -> threading.Thread:
        """Stream a pod's log lines to stdout, prefixed with the stage, until the container ends."""

        def _run() -> None:
            try:
                resp = self.core.read_namespaced_pod_log(
                    pod, self.namespace, container=container, follow=True, _preload_content=False
                )
                buffer = b""
                for chunk in resp.stream(4096):
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        print(f"{prefix} {line.decode(errors='replace')}", flush=True)
                if buffer:
                    print(f"{prefix} {buffer.decode(errors='replace')}", flush=True)
            except Exception as exc:  # a log stream that breaks must not stop the driver
                log.debug("log stream of %s ended: %s", pod, exc)

        thread = threading.Thread(target=_run, name=f"logs-{pod}", daemon=True)
        thread.start()
        return thread


def quantities_as_strings(node: Any) -> Any:
    """Resource quantities as strings: the chart renders ``nvidia.com/gpu: 1`` (YAML int), which the
    API server takes, but the client (kubernetes 37) validates ``requests``/``limits`` as strings and
    refuses the number before sending anything."""
    if isinstance(node, dict):
        return {k: ({q: str(v) for q, v in value.items()} if k in ("requests", "limits") and isinstance(value, dict)
                    else quantities_as_strings(value)) for k, value in node.items()}
    if isinstance(node, list):
        return [quantities_as_strings(item) for item in node]
    return node


def _started(pod: dict[str, Any], container: str) -> bool:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status.get("name") == container and ("running" in (status.get("state") or {}) or "terminated" in (status.get("state") or {})):
            return True
    return False


def _fmt(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def follow_stage(cluster: Cluster, stage: str, job_name: str, label: str, *, poll_s: float,
                 driver: DriverSettings | None = None) -> tuple[Verdict, dict[str, Any]]:
    """Wait for one stage's Job to finish, streaming logs and a progress line; the final verdict."""
    driver = driver or DriverSettings()
    followed: dict[str, threading.Thread] = {}
    started = time.monotonic()
    last_line, last_print = "", 0.0
    while True:
        job = cluster.get_job(job_name)
        if job is None:
            return Verdict("failed", "job vanished", "Deleted", f"Job {job_name} was deleted while the driver followed it", EXIT_RETRY), {"metadata": {"name": job_name}}
        pods = cluster.job_pods(job_name)
        for pod in pods:
            name = pod["metadata"]["name"]
            if name not in followed and _started(pod, stage):
                followed[name] = cluster.follow_logs(name, stage, f"[{stage}]")
        verdict = assess(job, pods, now=datetime.now(timezone.utc), container=stage,
                         pull_grace_s=driver.pull_grace_s, unschedulable_grace_s=driver.unschedulable_grace_s)
        if verdict.state in ("succeeded", "failed"):
            for thread in followed.values():
                thread.join(timeout=10)
            return verdict, job
        now = time.monotonic()
        shape = re.sub(r"\d+", "#", verdict.summary)  # a ticking "(42 s)" is not news
        if shape != last_line or now - last_print >= PROGRESS_EVERY_S:
            print(f"lawtune k8s {label} {stage}: {verdict.summary} · {_fmt(now - started)}", file=sys.stderr, flush=True)
            last_line, last_print = shape, now
        time.sleep(poll_s)


def run_pipeline(
    settings: Settings,
    *,
    config_path: str,
    input_uri: str,
    run_id: str,
    model_name: str,
    values_files: list[str] = (),
    namespace: str | None = None,
) -> int:
    """Run (or resume) one run's stages as Jobs; the exit code follows the stage interface."""
    from kubernetes.client import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return _run(settings, config_path=config_path, input_uri=input_uri, run_id=run_id, model_name=model_name,
                    values_files=values_files, namespace=namespace)
    except LawtuneError as exc:  # bad config/values (2), the store unreachable (1)
        print(error_line("train", exc), file=sys.stderr)
        return exc.exit_code
    except (ApiException, HTTPError, OSError) as exc:
        reason = f"{exc.status} {exc.reason}" if isinstance(exc, ApiException) else str(exc)
        print(error_line("train", f"the Kubernetes API call failed ({reason}); re-run to resume"), file=sys.stderr)
        return EXIT_RETRY


def _run(settings: Settings, *, config_path, input_uri, run_id, model_name, values_files, namespace) -> int:
    from kubernetes.config import ConfigException

    driver = DriverSettings()
    if not settings.artifact_root.startswith("s3://"):
        raise ConfigError(
            f"TARGET=k8s needs an s3:// artifact root the cluster can reach; LAWTUNE_ARTIFACT_ROOT is {settings.artifact_root}"
        )
    if settings.run_id != run_id:
        settings = settings.model_copy(update={"run_id": run_id})
    try:
        cluster = Cluster(namespace)
    except ConfigException as exc:
        raise ConfigError(f"no cluster to talk to: {exc}") from exc
    objects = render_chart(settings, config_path=config_path, input_uri=stage_input(settings, input_uri), run_id=run_id,
                           model_name=model_name, values_files=values_files, namespace=cluster.namespace)

    for obj in applied_objects(objects):
        cluster.apply(obj)
    code = drive(cluster, stage_jobs(objects), poll_s=driver.poll_s, committed=committed_outputs(settings), driver=driver)
    if code == EXIT_OK:
        log.info("run %s finished: artifacts under %s", run_id, settings.run_uri())
        from shared.cluster.summary import summarize

        try:  # the same summary as a local run; the store is reachable from here (the input went up)
            summarize(settings, model_name, target="k8s")
        except LawtuneError as exc:
            log.warning("could not read the run's summary: %s", exc)
    return code


def committed_outputs(settings: Settings) -> Callable[[str], bool | None]:
    """Whether a stage's output of this run is committed in the store (None: not known here)."""
    from shared.store.artifacts import find_manifest
    from shared.store.storage import open_location

    where = {"preprocess": "data", "finetune": "finetune", "evaluate": "evaluate"}

    def committed(stage: str) -> bool | None:
        if stage not in where:  # publish writes under models/<name>/, versioned by its inputs
            return None
        return find_manifest(open_location(settings.run_uri(where[stage]), settings)) is not None

    return committed


def _stage_selector(job: dict[str, Any]) -> str:
    labels = job["metadata"]["labels"]
    return ",".join(f"{k}={labels[k]}" for k in ("app.kubernetes.io/instance", "lawtune.io/run-id", "lawtune.io/stage"))


def _give_up(cluster: Cluster, name: str, driver: DriverSettings) -> str:
    """Remove a Job Kubernetes would keep trying (it holds a GPU request); say what became of it."""
    how = f"kubectl -n {cluster.namespace} delete job/{name}"
    if not driver.delete_abandoned:
        return f"The Job still waits for a node or an image: delete it with `{how}` (LAWTUNE_K8S_DELETE_ABANDONED=false)"
    try:
        cluster.delete_job(name)
    except Exception as exc:  # the API refused or timed out: the person reading this can finish the job
        return f"Deleting the Job failed ({exc}): delete it with `{how}`"
    return "The driver deleted the Job (it would have waited forever, holding its GPU request)"


def drive(cluster: Cluster, jobs: list[tuple[str, dict[str, Any]]], *, poll_s: float,
          committed: Callable[[str], bool | None] | None = None, driver: DriverSettings | None = None) -> int:
    """Submit (or resume) each stage's Job after the previous one completed; stop at a failure.

    A Job that completed is trusted only while its stage's output is still committed
    (``committed``): one whose artifacts were deleted from the store since runs again. Jobs of the
    same run and stage under another name (the chart's plain mode names them by their spec) are
    deleted first: two finetunes of one run must never write the same checkpoints.
    """
    driver = driver or DriverSettings()
    for number, (stage, job) in enumerate(jobs, 1):
        label = f"[{number}/{len(jobs)}]"
        name = job["metadata"]["name"]
        for other in cluster.list_jobs(_stage_selector(job)):
            if other["metadata"]["name"] != name:
                log.info("%s %s: deleting job %s, made for another spec of this run", label, stage, other["metadata"]["name"])
                cluster.delete_job(other["metadata"]["name"])
        action, why = plan(cluster.get_job(name), job["metadata"]["annotations"][SPEC_DIGEST])
        if action is Action.SKIP and committed is not None and committed(stage) is False:
            action, why = Action.REPLACE, "completed before, but its output is no longer in the store: running it again"
        log.info("%s %s (job %s): %s", label, stage, name, why)
        if action is Action.SKIP:
            continue
        if action is Action.REPLACE:
            cluster.delete_job(name)
        if action in (Action.CREATE, Action.REPLACE):
            cluster.create_job(job)
        verdict, final = follow_stage(cluster, stage, name, label, poll_s=poll_s, driver=driver)
        if verdict.state == "failed":
            tail = cluster.log_tail(verdict.pod, verdict.container or stage) if verdict.pod else []
            fate = _give_up(cluster, name, driver) if verdict.abandoned else None
            print(explain(stage, final, verdict, tail, namespace=cluster.namespace, job_fate=fate), file=sys.stderr, flush=True)
            return verdict.exit_code or EXIT_RETRY
        log.info("%s %s completed", label, stage)
    return EXIT_OK
