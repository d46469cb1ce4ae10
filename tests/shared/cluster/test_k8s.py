"""shared/cluster/k8s.py: rendering with the real helm, the input upload to real S3 (SeaweedFS), and the
stage-by-stage drive loop.

The drive loop talks to an API server, and none runs here: ``ReplayCluster`` stands in for
``Cluster`` and answers with the recorded Job/Pod objects of tests/fixtures/k8s (a stand-in, not
a cluster; tests/kind runs the same loop against a real one).
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import pytest
import yaml

from shared.cluster import k8s
from shared.core.errors import EXIT_CONFIG, EXIT_OK, EXIT_RETRY, ConfigError
from shared.cluster.k8s_explain import SPEC_DIGEST
from shared.core.settings import load_settings

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "k8s"
STAGES = ["preprocess", "finetune", "evaluate", "publish"]


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text("base_model: bundled:smollm2-135m-instruct\nseed: 7\n", encoding="utf-8")
    return path


@pytest.fixture
def rendered_jobs(config_file, monkeypatch):
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", "s3://lawtune/artifacts")
    settings = load_settings(run_id="sample")
    objects = k8s.render_chart(settings, config_path=str(config_file), input_uri="s3://lawtune/in.csv", run_id="sample",
                               model_name="legal-assistant", namespace="lawtune")
    return k8s.stage_jobs(objects)


def test_render_uses_this_calls_run_and_lets_values_files_set_the_in_cluster_endpoint(config_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", "s3://lawtune/artifacts")
    monkeypatch.setenv("LAWTUNE_S3_ENDPOINT_URL", "http://localhost:30833")
    values = tmp_path / "cluster.yaml"
    values.write_text(yaml.safe_dump({"runId": "from-file", "s3": {"endpoint": "http://seaweedfs.lawtune-s3:8333"},
                                      "stages": {"finetune": {"gpus": 0}}}))
    objects = k8s.render_chart(load_settings(), config_path=str(config_file), input_uri="s3://lawtune/in.csv",
                               run_id="r1", model_name="m", values_files=[str(values)], namespace="ns")
    jobs = dict(k8s.stage_jobs(objects))
    env = {e["name"]: e.get("value") for e in jobs["finetune"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LAWTUNE_RUN_ID"] == "r1"  # the call's run id beats the values file
    assert env["LAWTUNE_S3_ENDPOINT_URL"] == "http://seaweedfs.lawtune-s3:8333"  # the file beats this machine's view
    assert env["LAWTUNE_ARTIFACT_ROOT"] == "s3://lawtune/artifacts"
    assert all(j["metadata"]["namespace"] == "ns" for j in jobs.values())
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap"]
    assert cm["data"]["config.yaml"] == config_file.read_text().rstrip("\n")
    publish_args = jobs["publish"]["spec"]["template"]["spec"]["containers"][0]["args"]
    # publish.artifact and its checks come from the config; served parity is off in the cluster (the publish
    # image has no vLLM: stages.publish.servedParity)
    assert publish_args == ["--config", "/etc/lawtune/config.yaml", "--model-name", "m", "--set", "publish.served_parity=false"]


def test_stage_jobs_are_in_pipeline_order_and_stamped(rendered_jobs):
    assert [stage for stage, _ in rendered_jobs] == STAGES
    digests = [job["metadata"]["annotations"][SPEC_DIGEST] for _, job in rendered_jobs]
    assert len(set(digests)) == 4 and all(len(d) == 16 for d in digests)


def test_render_error_is_a_config_error_naming_the_key(config_file, monkeypatch):
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", "s3://lawtune/artifacts")
    with pytest.raises(ConfigError, match="input.uri is required"):
        k8s.render_chart(load_settings(), config_path=str(config_file), input_uri="", run_id="r", model_name="m")


@pytest.mark.parametrize(
    ("root", "message"),
    [
        pytest.param("file:///tmp/artifacts", "needs an s3:// artifact root", id="file-root"),
    ],
)
def test_run_pipeline_refuses_a_root_the_cluster_cannot_reach(root, message, config_file, monkeypatch, capsys):
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", root)
    code = k8s.run_pipeline(load_settings(), config_path=str(config_file), input_uri="x.csv", run_id="r", model_name="m")
    assert code == EXIT_CONFIG and message in capsys.readouterr().err


def test_run_pipeline_without_a_cluster_says_so(config_file, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", "s3://lawtune/artifacts")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code = k8s.run_pipeline(load_settings(), config_path=str(config_file), input_uri="s3://b/x.csv", run_id="r", model_name="m")
    assert code == EXIT_CONFIG and "no cluster to talk to" in capsys.readouterr().err


@pytest.mark.integration
def test_stage_input_uploads_a_local_file_to_the_run(s3_env, tmp_path):
    from shared.store.storage import open_location

    settings = load_settings(run_id="up")
    csv = tmp_path / "qa.csv"
    csv.write_text("question,answer\n什么是合同?,双方的协议。\n", encoding="utf-8")
    uri = k8s.stage_input(settings, str(csv))
    assert uri == f"{settings.run_uri('input')}/qa.csv"
    assert open_location(settings.run_uri("input"), settings).read_bytes("qa.csv") == csv.read_bytes()
    assert k8s.stage_input(settings, "s3://elsewhere/x.csv") == "s3://elsewhere/x.csv"
    with pytest.raises(ConfigError, match="does not exist"):
        k8s.stage_input(settings, str(tmp_path / "missing.csv"))


class ReplayCluster:
    """Stands in for ``Cluster`` (no API server here): each Job, once created, answers with the
    status and pods of the fixture scripted for its stage."""

    namespace = "lawtune"

    def __init__(self, outcomes: dict[str, str], existing: dict[str, str] | None = None, jobs=None):
        self.outcomes = outcomes
        self.calls: list[tuple[str, str]] = []
        self.jobs: dict[str, dict] = {}
        self.scripted: dict[str, dict] = {}
        for stage, name in (existing or {}).items():
            job = copy.deepcopy(dict(jobs)[stage])
            self._stamp(job, fixture(name))
            self.jobs[job["metadata"]["name"]] = job

    def _stamp(self, job: dict, fx: dict) -> None:
        job["status"] = fx["job"]["status"]
        self.scripted[job["metadata"]["name"]] = fx

    def get_job(self, name):
        return copy.deepcopy(self.jobs.get(name))

    def create_job(self, job):
        stage = job["metadata"]["labels"]["lawtune.io/stage"]
        self.calls.append(("create", stage))
        job = copy.deepcopy(job)
        self._stamp(job, fixture(self.outcomes[stage]))
        self.jobs[job["metadata"]["name"]] = job

    def delete_job(self, name):
        self.calls.append(("delete", self.jobs[name]["metadata"]["labels"]["lawtune.io/stage"]))
        del self.jobs[name]

    def list_jobs(self, selector):
        wanted = dict(term.split("=", 1) for term in selector.split(","))
        return [copy.deepcopy(j) for j in self.jobs.values()
                if all(j["metadata"]["labels"].get(k) == v for k, v in wanted.items())]

    def job_pods(self, name):
        return self.scripted[name]["pods"]

    def log_tail(self, pod, container, lines=20):
        return next(fx["logs"] for fx in self.scripted.values() if any(p["metadata"]["name"] == pod for p in fx["pods"]))

    def follow_logs(self, pod, container, prefix):
        thread = threading.Thread(target=lambda: None)
        thread.start()
        self.calls.append(("logs", container))
        return thread


def _creates(cluster):
    return [stage for call, stage in cluster.calls if call == "create"]


@pytest.mark.timeout(30)
def test_drive_runs_every_stage_in_order(rendered_jobs):
    cluster = ReplayCluster({s: "succeeded" for s in STAGES})
    assert k8s.drive(cluster, rendered_jobs, poll_s=0) == EXIT_OK
    assert _creates(cluster) == STAGES


@pytest.mark.timeout(30)
def test_drive_resumes_a_run(rendered_jobs):
    """Same run id again: the completed stage is skipped, the failed one re-submitted (it resumes
    from its checkpoint), the one still running followed, nothing deleted but the failed Job."""
    cluster = ReplayCluster({s: "succeeded" for s in STAGES},
                            existing={"preprocess": "succeeded", "finetune": "oomkilled"}, jobs=rendered_jobs)
    assert k8s.drive(cluster, rendered_jobs, poll_s=0) == EXIT_OK
    assert [c for c in cluster.calls if c[0] != "logs"] == [("delete", "finetune"), ("create", "finetune"),
                                                           ("create", "evaluate"), ("create", "publish")]


@pytest.mark.timeout(30)
def test_drive_reruns_a_completed_stage_whose_output_left_the_store(rendered_jobs, caplog):
    """A Job's Complete status outlives its artifacts (a cleaned bucket): the stage runs again."""
    import logging

    caplog.set_level(logging.INFO)
    cluster = ReplayCluster({s: "succeeded" for s in STAGES},
                            existing={"preprocess": "succeeded", "finetune": "succeeded"}, jobs=rendered_jobs)
    committed = {"preprocess": True, "finetune": False, "evaluate": False, "publish": None}
    assert k8s.drive(cluster, rendered_jobs, poll_s=0, committed=committed.get) == EXIT_OK
    assert [c for c in cluster.calls if c[0] != "logs"] == [("delete", "finetune"), ("create", "finetune"),
                                                           ("create", "evaluate"), ("create", "publish")]
    assert "output is no longer in the store" in caplog.text


def test_committed_outputs_reads_the_stage_manifests(tmp_path):
    from shared.store.artifacts import commit_dir
    from shared.core.settings import Settings
    from shared.store.storage import open_location

    settings = Settings(artifact_root=f"file://{tmp_path}", run_id="r1")
    committed = k8s.committed_outputs(settings)
    assert committed("preprocess") is False and committed("publish") is None
    out = tmp_path / "staged"
    out.mkdir()
    (out / "train.jsonl").write_text("{}\n")
    commit_dir(out, open_location(settings.run_uri("data"), settings), stage="preprocess", inputs={},
               started_at="2026-11-28T00:00:00Z")
    assert committed("preprocess") is True and committed("finetune") is False


@pytest.mark.timeout(30)
def test_drive_follows_a_running_job_instead_of_resubmitting(rendered_jobs, capsys):
    cluster = ReplayCluster({s: "succeeded" for s in STAGES}, existing={"preprocess": "succeeded", "finetune": "running"},
                            jobs=rendered_jobs)
    # The running fixture never finishes: make the third look at it a completion.
    name = rendered_jobs[1][1]["metadata"]["name"]
    original = cluster.get_job
    seen = {"n": 0}

    def get_job(n):
        job = original(n)
        if n == name and job is not None:
            seen["n"] += 1
            if seen["n"] > 2:
                job["status"] = fixture("succeeded")["job"]["status"]
        return job

    cluster.get_job = get_job
    assert k8s.drive(cluster, rendered_jobs, poll_s=0) == EXIT_OK
    assert _creates(cluster) == ["evaluate", "publish"] and ("logs", "finetune") in cluster.calls
    # One progress line while it ran (not one per poll).
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lawtune k8s [2/4] finetune:")]
    assert len(progress) == 1 and "lawtune-sample-finetune-q9w8e running" in progress[0]


@pytest.mark.parametrize(
    ("failing", "outcome", "code", "words"),
    [
        pytest.param("finetune", "oomkilled", EXIT_RETRY, ["Stage finetune failed (OOMKilled)", "resuming from checkpoints/step-200"], id="oom"),
        pytest.param("preprocess", "config_error", EXIT_CONFIG, ["Stage preprocess failed (ConfigError)", "no column named"], id="exit-2"),
        pytest.param("finetune", "unschedulable", EXIT_RETRY, ["(Unschedulable)", "Insufficient nvidia.com/gpu"], id="unschedulable"),
        pytest.param("finetune", "image_pull_backoff", EXIT_RETRY, ["(ImagePullBackOff)", "not found"], id="image-pull"),
        pytest.param("evaluate", "deadline_exceeded", EXIT_RETRY, ["(DeadlineExceeded)"], id="deadline"),
        pytest.param("finetune", "multinode_index_unschedulable", EXIT_RETRY, ["(Unschedulable)", "index 0 of 2"], id="multinode-index"),
        pytest.param("finetune", "kubelet_evicted", EXIT_RETRY, ["(Evicted)", "raise cache.sizeLimit"], id="emptydir-eviction"),
    ],
)
@pytest.mark.timeout(30)
def test_drive_stops_at_the_first_failure_and_says_why(rendered_jobs, failing, outcome, code, words, capsys):
    outcomes = {s: "succeeded" for s in STAGES} | {failing: outcome}
    cluster = ReplayCluster(outcomes)
    assert k8s.drive(cluster, rendered_jobs, poll_s=0) == code
    assert _creates(cluster) == STAGES[: STAGES.index(failing) + 1]
    err = capsys.readouterr().err
    for word in words:
        assert word in err


@pytest.mark.parametrize(
    ("delete", "fate"),
    [
        pytest.param(True, "The driver deleted the Job", id="deletes"),
        pytest.param(False, "delete it with `kubectl -n lawtune delete job/lawtune-sample-finetune`", id="says-how"),
    ],
)
@pytest.mark.timeout(30)
def test_drive_removes_a_job_it_gave_up_on(rendered_jobs, delete, fate, capsys):
    """An unschedulable pod never fails its Job: left alone it would take a GPU hours later."""
    cluster = ReplayCluster({s: "succeeded" for s in STAGES} | {"finetune": "unschedulable"})
    driver = k8s.DriverSettings(delete_abandoned=delete)
    assert k8s.drive(cluster, rendered_jobs, poll_s=0, driver=driver) == EXIT_RETRY
    assert (("delete", "finetune") in cluster.calls) is delete
    err = capsys.readouterr().err
    assert fate in err and ("left in place" in err) is False


@pytest.mark.timeout(30)
def test_drive_leaves_a_job_kubernetes_failed_for_inspection(rendered_jobs, capsys):
    cluster = ReplayCluster({s: "succeeded" for s in STAGES} | {"finetune": "oomkilled"})
    assert k8s.drive(cluster, rendered_jobs, poll_s=0) == EXIT_RETRY
    assert ("delete", "finetune") not in cluster.calls and "left in place" in capsys.readouterr().err


def test_the_unschedulable_grace_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("LAWTUNE_K8S_UNSCHEDULABLE_GRACE_S", "3600")
    monkeypatch.setenv("LAWTUNE_K8S_POLL_S", "2")
    settings = k8s.DriverSettings()
    assert (settings.unschedulable_grace_s, settings.poll_s, settings.delete_abandoned) == (3600, 2, True)


@pytest.mark.timeout(30)
def test_drive_fails_at_once_on_an_init_container_exit_2_and_shows_its_log(rendered_jobs, capsys):
    cluster = ReplayCluster({s: "succeeded" for s in STAGES} | {"finetune": "indexed_init_config_error"})
    seen = []
    cluster.log_tail = lambda pod, container, lines=20: seen.append((pod, container)) or ["bad key"]
    assert k8s.drive(cluster, rendered_jobs, poll_s=0) == EXIT_CONFIG
    assert seen == [("lawtune-sample-finetune-1-x7rk2", "check-config")]
    assert "init container check-config" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_drive_deletes_the_jobs_of_an_older_spec_of_the_same_run(config_file, monkeypatch):
    """Plain mode names Jobs by their spec: a config change under the same run id makes new names,
    and the Job made for the old config must not keep running beside the new one."""
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", "s3://lawtune/artifacts")
    settings = load_settings(run_id="sample")
    plain = config_file.parent / "plain.yaml"
    plain.write_text("hooks:\n  enabled: false\n")
    old = k8s.stage_jobs(k8s.render_chart(settings, config_path=str(config_file), input_uri="s3://l/in.csv", run_id="sample",
                                          model_name="m", values_files=[str(plain)], namespace="lawtune"))
    config_file.write_text(config_file.read_text() + "seed: 8\n")
    new = k8s.stage_jobs(k8s.render_chart(settings, config_path=str(config_file), input_uri="s3://l/in.csv", run_id="sample",
                                          model_name="m", values_files=[str(plain)], namespace="lawtune"))
    assert all(o["metadata"]["name"] != n["metadata"]["name"] for (_, o), (_, n) in zip(old, new))
    cluster = ReplayCluster({s: "succeeded" for s in STAGES}, existing={"preprocess": "succeeded", "finetune": "running"}, jobs=old)
    assert k8s.drive(cluster, new, poll_s=0) == EXIT_OK
    assert [c for c in cluster.calls if c[0] != "logs"] == [("delete", "preprocess"), ("create", "preprocess"),
                                                           ("delete", "finetune"), ("create", "finetune"),
                                                           ("create", "evaluate"), ("create", "publish")]
    assert sorted(cluster.jobs) == sorted(j["metadata"]["name"] for _, j in new)


def test_the_driver_applies_no_hooks_and_no_rbac(config_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", "s3://lawtune/artifacts")
    values = tmp_path / "v.yaml"
    values.write_text("driverRbac:\n  create: true\nstages:\n  finetune:\n    distributed: {nodes: 2}\n")
    objects = k8s.render_chart(load_settings(run_id="r"), config_path=str(config_file), input_uri="s3://l/in.csv", run_id="r",
                               model_name="m", values_files=[str(values)], namespace="lawtune")
    assert {o["kind"] for o in objects} >= {"Role", "RoleBinding", "Job"}
    assert sorted(o["kind"] for o in k8s.applied_objects(objects)) == ["ConfigMap", "Service", "ServiceAccount"]


# ---------------------------------------------------------------- the driver's RBAC


_VERBS = {"read": "get", "list": "list", "create": "create", "delete": "delete", "patch": "patch", "replace": "update"}
_KIND_RESOURCES = {"ConfigMap": "configmaps", "ServiceAccount": "serviceaccounts", "Service": "services"}


def _driver_api_calls() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every API call in shared/cluster/k8s.py, read from its source:
    ``self.batch.<verb>_namespaced_<kind>`` / ``self.core...`` calls, and server-side apply (a
    PATCH that creates a missing object) of each kind in APPLIED_KINDS."""
    import ast
    import re

    tree = ast.parse(Path(k8s.__file__).read_text())
    calls = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name) and owner.value.id == "self":
            group = {"batch": "batch", "core": ""}.get(owner.attr)
            if owner.attr == "dynamic" and node.func.attr == "server_side_apply":
                calls |= {("", _KIND_RESOURCES[kind], verb) for kind in k8s.APPLIED_KINDS for verb in ("create", "patch")}
            elif group is not None:
                match = re.fullmatch(r"(read|list|create|delete|patch|replace)_namespaced_([a-z_]+?)(_log)?", node.func.attr)
                assert match, f"unmapped API call {owner.attr}.{node.func.attr}"
                resource = match.group(2) + "s" + ("/log" if match.group(3) else "")
                calls.add((group, resource, _VERBS[match.group(1)]))
    return calls


def test_the_driver_role_grants_exactly_the_calls_the_driver_makes(config_file):
    from tests.helm_utils import by_kind, render

    assert ("batch", "jobs", "create") in _driver_api_calls()  # the reader works
    objects = render("charts/lawtune-pipeline", {"runId": "r", "artifactRoot": "s3://b/a", "input": {"uri": "s3://b/x.csv"},
                                                 "driverRbac": {"create": True}}, set_files={"config": config_file})
    (role,) = [r for r in by_kind(objects, "Role") if r["metadata"]["name"].endswith("-driver")]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted == _driver_api_calls()


@pytest.mark.timeout(120)
def test_the_driver_role_grants_exactly_the_calls_the_driver_sent(config_file, tmp_path, monkeypatch):
    """The real ``Cluster`` (the kubernetes client, over HTTP) drives a run against a stand-in API
    server that logs every request: the apply of the run's objects, a failed Job of an earlier
    attempt deleted and re-submitted, logs followed, a failure's log tail read. The verbs the
    server saw, resolved as the API server does for RBAC, are exactly what the chart's Role grants."""
    import tempfile

    from tests.helm_utils import by_kind, render
    from tests.shared.cluster.stand_in_api import RecordingApiServer

    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", "s3://lawtune/artifacts")
    values = tmp_path / "v.yaml"
    values.write_text("stages:\n  finetune:\n    distributed: {nodes: 2}\n")  # the rendezvous Service too
    objects = k8s.render_chart(load_settings(run_id="sample"), config_path=str(config_file), input_uri="s3://l/in.csv",
                               run_id="sample", model_name="legal-assistant", values_files=[str(values)], namespace="lawtune")
    jobs = k8s.stage_jobs(objects)
    outcomes = {"preprocess": "succeeded", "finetune": "succeeded", "evaluate": "deadline_exceeded", "publish": "succeeded"}

    def stamp(job: dict, outcome: str | None = None) -> None:
        fx = fixture(outcome or outcomes[job["metadata"]["labels"]["lawtune.io/stage"]])
        job["status"] = fx["job"]["status"]
        api.pods[job["metadata"]["name"]] = fx["pods"]
        api.logs[job["metadata"]["name"]] = fx["logs"]

    api = RecordingApiServer(on_create=stamp)
    try:
        earlier = copy.deepcopy(dict(jobs)["finetune"])  # an attempt that failed: replaced, its artifacts kept
        stamp(earlier, "oomkilled")
        api.objects[("jobs", earlier["metadata"]["name"])] = earlier
        from kubernetes.config import kube_config

        # The client reads KUBECONFIG once, when first imported: point its default at the stand-in.
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(api.kubeconfig(tmp_path, "lawtune")))
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the dynamic client's discovery cache
        cluster = k8s.Cluster(None)
        for obj in k8s.applied_objects(objects):
            cluster.apply(obj)
        assert k8s.drive(cluster, jobs, poll_s=0) == EXIT_RETRY  # evaluate ran past its deadline
    finally:
        api.close()
    sent = api.rbac_calls()
    assert {("batch", "jobs", "delete"), ("", "pods/log", "get"), ("", "configmaps", "create")} <= sent  # every path ran
    role_objects = render("charts/lawtune-pipeline", {"driverRbac": {"only": True, "serviceAccountName": "ci"}})
    (role,) = by_kind(role_objects, "Role")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert sent == granted
