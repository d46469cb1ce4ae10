"""shared/cluster/k8s_explain.py on Job/Pod status objects in tests/fixtures/k8s/ (one per state and failure kind).

The fixtures are the API's JSON for the chart's own Jobs (spec rendered by the chart, status and
pod fields and messages as the Job controller, kubelet and scheduler of 1.31-1.33 write them).
No cluster runs here, so they were assembled, not captured: tests/kind exercises the same code
against a live cluster where Docker and kind exist.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from shared.core.errors import EXIT_CONFIG, EXIT_RETRY
from shared.cluster.k8s_explain import SPEC_DIGEST, Action, Verdict, assess, explain, job_outcome, plan, spec_digest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "k8s"


def load(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _now(fx: dict, shift_s: float = 0) -> datetime:
    return datetime.fromisoformat(fx["now"].replace("Z", "+00:00")) + timedelta(seconds=shift_s)


def _stage(fx: dict) -> str:
    return fx["job"]["metadata"]["labels"]["lawtune.io/stage"]


@pytest.mark.parametrize(
    ("fixture", "shift_s", "state", "reason", "exit_code", "words"),
    [
        pytest.param("succeeded", 0, "succeeded", None, None, ["completed"], id="succeeded"),
        pytest.param("running", 0, "running", None, None, ["q9w8e running"], id="running"),
        pytest.param("container_creating", 0, "waiting", None, None, ["ContainerCreating"], id="container-creating"),
        pytest.param("retrying_after_oom", 0, "running", None, None, ["attempt 2", "1 failed before"], id="retrying-after-oom"),
        pytest.param("disrupted_retrying", 0, "waiting", None, None, ["c3x4z ContainerCreating"], id="disrupted-new-pod"),
        pytest.param("evicted_no_pod_yet", 0, "waiting", None, None, ["disrupted", "EvictionByEvictionAPI", "without counting"],
                     id="evicted-waits-for-retry"),
        pytest.param("oomkilled", 0, "failed", "OOMKilled", EXIT_RETRY,
                     ["OOMKilled (exit code 137)", "memory limit 64Gi", "4 failed attempt(s)", "backoffLimit 3", "j7k8l"], id="oomkilled"),
        pytest.param("config_error", 0, "failed", "ConfigError", EXIT_CONFIG, ["exited with code 2", "retrying cannot help"], id="exit-2"),
        pytest.param("exit_code_1", 0, "failed", "ExitCode", EXIT_RETRY, ["exited with code 1", "4 failed attempt(s)", "a7b8c"], id="exit-1"),
        pytest.param("deadline_exceeded", 0, "failed", "DeadlineExceeded", EXIT_RETRY, ["activeDeadlineSeconds", "86400"], id="deadline"),
        pytest.param("image_pull_backoff", 0, "failed", "ImagePullBackOff", EXIT_RETRY,
                     ["ghcr.io/lawtune/finetune:0.1.0", "not found", "for 600 s", "make images"], id="image-pull-backoff"),
        pytest.param("image_pull_backoff", -590, "waiting", None, None, ["pulling image", "ImagePullBackOff"], id="image-pull-within-grace"),
        pytest.param("image_never_pull", 0, "failed", "ImagePullBackOff", EXIT_CONFIG, ["ErrImageNeverPull", "not present"], id="image-never-pull"),
        pytest.param("unschedulable", 0, "failed", "Unschedulable", EXIT_RETRY,
                     ["for 1920 s", "2 Insufficient nvidia.com/gpu", "tolerations", "LAWTUNE_K8S_UNSCHEDULABLE_GRACE_S"], id="unschedulable"),
        pytest.param("unschedulable", -1000, "waiting", None, None, ["unschedulable for 920 s", "Insufficient nvidia.com/gpu"],
                     id="unschedulable-within-grace"),
        pytest.param("missing_secret", 0, "failed", "CreateContainerConfigError", EXIT_CONFIG, ['secret "lawtune-s3" not found'],
                     id="missing-secret"),
        pytest.param("indexed_init_config_error", 0, "failed", "ConfigError", EXIT_CONFIG,
                     ["init container check-config", "finetune-1-x7rk2", "exited with code 2"], id="indexed-init-exit-2"),
        pytest.param("init_image_pull", 0, "failed", "ImagePullBackOff", EXIT_RETRY, ["could not pull image", "not found", "for 629 s"],
                     id="init-container-image-pull"),
        pytest.param("init_image_pull", -400, "waiting", None, None, ["pulling image", "ImagePullBackOff"], id="init-image-pull-within-grace"),
        pytest.param("kubelet_evicted", 0, "failed", "Evicted", EXIT_RETRY,
                     ["evicted by the kubelet", 'EmptyDir volume "cache" exceeds the limit "50Gi"', "raise cache.sizeLimit",
                      "4 failed attempt(s)", "backoffLimit 3"], id="emptydir-over-its-size-limit"),
        pytest.param("node_pressure_evicted", 0, "failed", "Evicted", EXIT_RETRY,
                     ["evicted by the kubelet", "low on resource: ephemeral-storage", "more disk", "4 kubelet eviction(s)",
                      "backoffLimit 3"], id="node-pressure-evictions-count"),
        pytest.param("unschedulable_ephemeral_storage", 0, "failed", "Unschedulable", EXIT_RETRY,
                     ["Insufficient ephemeral-storage", "No node has 57344Mi of free ephemeral storage", "bigger disks",
                      "cache.sizeLimit"], id="unschedulable-for-disk"),
        pytest.param("multinode_index_unschedulable", 0, "failed", "Unschedulable", EXIT_RETRY,
                     ["finetune-0-w9zn4 could not be scheduled for 1919 s", "3 Insufficient nvidia.com/gpu", "index 0 of 2"],
                     id="multinode-one-index-unschedulable"),
        pytest.param("multinode_index_unschedulable", -1000, "waiting", None, None,
                     ["index 0: unschedulable for 919 s", "1 of 2 pods running"], id="multinode-one-index-within-grace"),
    ],
)
def test_assess(fixture, shift_s, state, reason, exit_code, words):
    fx = load(fixture)
    verdict = assess(fx["job"], fx["pods"], now=_now(fx, shift_s), container=_stage(fx))
    assert (verdict.state, verdict.reason, verdict.exit_code) == (state, reason, exit_code)
    text = verdict.detail if state == "failed" else verdict.summary
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    if state == "failed" and fixture != "deadline_exceeded":
        assert verdict.pod and verdict.pod.startswith(fx["job"]["metadata"]["name"])


@pytest.mark.parametrize(
    ("fixture", "digest_changed", "action"),
    [
        pytest.param(None, False, Action.CREATE, id="first-run"),
        pytest.param("succeeded", False, Action.SKIP, id="resume-skips-completed"),
        pytest.param("running", False, Action.ATTACH, id="resume-follows-running"),
        pytest.param("container_creating", False, Action.ATTACH, id="resume-follows-pending"),
        pytest.param("oomkilled", False, Action.REPLACE, id="resume-resubmits-failed"),
        pytest.param("config_error", False, Action.REPLACE, id="resubmits-after-a-fix"),
        pytest.param("succeeded", True, Action.REPLACE, id="config-changed-after-success"),
        pytest.param("running", True, Action.REPLACE, id="config-changed-while-running"),
    ],
)
def test_plan_decides_resume(fixture, digest_changed, action):
    existing = load(fixture)["job"] if fixture else None
    desired = existing["metadata"]["annotations"][SPEC_DIGEST] if existing else "x"
    if digest_changed:
        desired = "0" * 16
    got, why = plan(existing, desired)
    assert got is action and why


def test_spec_digest_follows_the_config_checksum():
    job = load("running")["job"]
    other = copy.deepcopy(job)
    other["spec"]["template"]["metadata"]["annotations"]["checksum/config"] = "changed"
    status_only = copy.deepcopy(job)
    status_only["status"] = {}
    assert spec_digest(job) != spec_digest(other)
    assert spec_digest(job) == spec_digest(status_only)


@pytest.mark.parametrize(
    ("fixture", "outcome"),
    [
        pytest.param("succeeded", "Complete", id="complete"),
        pytest.param("oomkilled", "Failed", id="failed"),
        pytest.param("running", None, id="running"),
    ],
)
def test_job_outcome(fixture, outcome):
    assert job_outcome(load(fixture)["job"]) == outcome


def test_failure_target_alone_counts_as_failed():
    """1.31+ sets FailureTarget before the pods finished terminating; the driver need not wait for Failed."""
    job = load("config_error")["job"]
    job["status"]["conditions"] = [c for c in job["status"]["conditions"] if c["type"] == "FailureTarget"]
    assert job_outcome(job) == "Failed"


@pytest.mark.parametrize(
    ("fixture", "must_contain"),
    [
        pytest.param("oomkilled", ["Stage finetune failed (OOMKilled)", "resources.limits.memory", "resuming from checkpoints/step-200"], id="oom"),
        pytest.param("config_error", ["Stage preprocess failed (ConfigError)", "exited with code 2", "no column named 'question'"], id="exit-2"),
        pytest.param("unschedulable", ["Stage finetune failed (Unschedulable)", "0/3 nodes are available", "Pod lawtune-sample-finetune-s7d8f logged nothing"],
                     id="unschedulable"),
        pytest.param("image_pull_backoff", ["(ImagePullBackOff)", "finetune:0.1.0", "imagePullSecrets"], id="image-pull"),
        pytest.param("exit_code_1", ["Could not connect to the endpoint URL", "kubectl -n lawtune describe job/lawtune-sample-publish"], id="exit-1"),
    ],
)
def test_explain_is_one_paragraph_with_the_log_tail(fixture, must_contain):
    fx = load(fixture)
    verdict = assess(fx["job"], fx["pods"], now=_now(fx), container=_stage(fx))
    text = explain(_stage(fx), fx["job"], verdict, fx["logs"], namespace="lawtune")
    paragraph, *tail = text.split("\n")
    assert all(line.startswith("    ") for line in tail) and len(tail) == len(fx["logs"])
    assert "re-running the same run id resumes" in paragraph
    for words in must_contain:
        assert words in text, f"{words!r} not in {text!r}"


@pytest.mark.parametrize(
    ("fixture", "abandoned"),
    [
        pytest.param("unschedulable", True, id="unschedulable"),
        pytest.param("image_pull_backoff", True, id="image-pull"),
        pytest.param("init_image_pull", True, id="init-image-pull"),
        pytest.param("node_pressure_evicted", True, id="node-pressure-evicted"),
        pytest.param("kubelet_evicted", False, id="evicted-and-failed-by-kubernetes"),
        pytest.param("multinode_index_unschedulable", True, id="multinode-index-unschedulable"),
        pytest.param("oomkilled", False, id="failed-by-kubernetes"),
        pytest.param("indexed_init_config_error", False, id="failed-by-policy"),
    ],
)
def test_a_job_the_driver_gives_up_on_is_marked_abandoned(fixture, abandoned):
    """Kubernetes never fails these Jobs itself: the driver must remove what it gave up on."""
    fx = load(fixture)
    assert assess(fx["job"], fx["pods"], now=_now(fx), container=_stage(fx)).abandoned is abandoned


def _swap_creation_order(pods: list[dict]) -> list[dict]:
    """The same pods, listed and created the other way round."""
    pods = copy.deepcopy(pods)
    first, second = pods[0]["metadata"], pods[1]["metadata"]
    first["creationTimestamp"], second["creationTimestamp"] = second["creationTimestamp"], first["creationTimestamp"]
    return pods[::-1]


@pytest.mark.parametrize("shift_s", [0, -1000], ids=["past-grace", "within-grace"])
def test_every_index_of_a_multi_node_job_is_judged_whatever_the_pod_order(shift_s):
    """Index 0 unschedulable while index 1 runs: the Job does not run, in whichever order the API
    lists or created the pods (judging only the newest pod read one order as "running")."""
    fx = load("multinode_index_unschedulable")
    one = assess(fx["job"], fx["pods"], now=_now(fx, shift_s), container="finetune")
    other = assess(fx["job"], _swap_creation_order(fx["pods"]), now=_now(fx, shift_s), container="finetune")
    for verdict in (one, other):
        assert (verdict.state, verdict.reason, verdict.pod) == (("failed", "Unschedulable", "lawtune-sample-finetune-0-w9zn4")
                                                                if shift_s == 0 else ("waiting", None, "lawtune-sample-finetune-0-w9zn4"))
        assert "index 0" in (verdict.detail or verdict.summary)


def test_a_multi_node_job_runs_when_every_index_runs():
    fx = load("multinode_index_unschedulable")
    pods = copy.deepcopy(fx["pods"])
    pods[0]["status"] = copy.deepcopy(pods[1]["status"])
    verdict = assess(fx["job"], pods, now=_now(fx), container="finetune")
    assert verdict.state == "running" and "2 pods running" in verdict.summary
    verdict = assess(fx["job"], pods[1:], now=_now(fx), container="finetune")  # index 0's pod not created yet
    assert verdict.state == "waiting" and "1 of 2 pods running" in verdict.summary


def test_the_driver_counts_only_the_evictions_the_job_ignores():
    """With countDisruptions the Job's podFailurePolicy has no Ignore rule: it counts node-pressure
    evictions itself (status.failed), and the driver must not count them a second time."""
    fx = load("node_pressure_evicted")
    job = copy.deepcopy(fx["job"])
    job["spec"]["podFailurePolicy"]["rules"] = [r for r in job["spec"]["podFailurePolicy"]["rules"] if r["action"] != "Ignore"]
    assert assess(fx["job"], fx["pods"], now=_now(fx), container="finetune").state == "failed"
    assert assess(job, fx["pods"], now=_now(fx), container="finetune").state == "running"


def test_the_unschedulable_grace_is_a_setting():
    fx = load("unschedulable")
    assert assess(fx["job"], fx["pods"], now=_now(fx), container="finetune", unschedulable_grace_s=3600).state == "waiting"


def test_the_job_condition_speaks_when_the_pods_are_gone():
    """Pods garbage-collected (or never listed): the PodFailurePolicy message still says exit code 2."""
    fx = load("indexed_init_config_error")
    verdict = assess(fx["job"], [], now=_now(fx), container="finetune")
    assert (verdict.reason, verdict.exit_code) == ("ConfigError", EXIT_CONFIG)
    assert "check-config for pod lawtune/lawtune-sample-finetune-1-x7rk2 failed with exit code 2" in verdict.detail


def test_explain_names_the_init_container_whose_log_it_shows():
    fx = load("indexed_init_config_error")
    verdict = assess(fx["job"], fx["pods"], now=_now(fx), container="finetune")
    assert verdict.container == "check-config"
    text = explain("finetune", fx["job"], verdict, fx["logs"], namespace="lawtune", job_fate="The Job was deleted")
    assert "(container check-config)" in text and "The Job was deleted;" in text and "left in place" not in text


def _patterned(hexid: str) -> bool:
    """'a1b2c3'-style runs: two interleaved ascending sequences, the mark of a typed-in id."""
    h = hexid.replace("-", "")
    step = lambda a, b: int(b, 16) - int(a, 16) == 1  # noqa: E731
    return any(step(h[i], h[i + 2]) and step(h[i + 2], h[i + 4]) and step(h[i + 1], h[i + 3]) and step(h[i + 3], h[i + 5])
               for i in range(len(h) - 5))


def test_fixtures_look_like_what_the_api_server_returns():
    """What the control plane writes: UUIDs for uids, real container names in condition messages,
    the scheduler's name first in a preemption message, a deletionTimestamp on pods the scheduler or
    the eviction API deleted and none on pods the kubelet evicted (it only marks them Failed)."""
    import re

    for path in sorted(FIXTURES.glob("*.json")):
        text = path.read_text()
        fx = json.loads(text)
        for uid in re.findall(r'"uid": "([^"]+)"', text):
            assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", uid), (path.name, uid)
        for hexid in re.findall(r"(?:containerd://|sha256:)([0-9a-f]{64})", text) + re.findall(r'"uid": "([^"]+)"', text):
            assert not _patterned(hexid), (path.name, hexid)
        for pod in fx["pods"]:
            names = {c["name"] for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", [])}
            for cond in pod["status"].get("conditions", []):
                listed = re.search(r"status: \[([^\]]*)\]", cond.get("message", ""))
                if listed:
                    assert set(listed.group(1).split()) <= names, (path.name, cond)
                if cond["type"] == "DisruptionTarget":
                    if cond["reason"] == "PreemptionByScheduler":
                        assert cond["message"].startswith("default-scheduler: "), path.name
                    deleted = cond["reason"] in ("PreemptionByScheduler", "EvictionByEvictionAPI", "DeletionByTaintManager")
                    assert ("deletionTimestamp" in pod["metadata"]) is deleted, (path.name, pod["metadata"]["name"])


def test_every_fixture_is_used_and_well_formed():
    names = {p.stem for p in FIXTURES.glob("*.json")}
    assert len(names) >= 12
    for name in names:
        fx = load(name)
        assert fx["job"]["kind"] == "Job" and all(p["kind"] == "Pod" for p in fx["pods"])
        assert isinstance(assess(fx["job"], fx["pods"], now=_now(fx), container=_stage(fx)), Verdict)
