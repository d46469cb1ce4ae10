"""The cluster driver's decisions, as pure functions of Job and Pod objects.

Inputs are the API's JSON (camelCase, as ``kubectl get -o json`` prints it and as
``ApiClient.sanitize_for_serialization`` turns the Python client's models into), so the same
functions run on live objects and on the recorded ones in ``tests/fixtures/k8s/``:

- ``plan(existing_job, digest)``: what to do with a stage whose Job may already exist (resume).
- ``assess(job, pods, now=...)``: is the stage waiting, running, done or failed — including the
  failures a Job never reports itself (an image that cannot be pulled, a pod nobody can schedule).
- ``explain(...)``: the one paragraph a person reads when a stage failed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from typing import Any

from shared.core.errors import EXIT_CONFIG, EXIT_RETRY

SPEC_DIGEST = "lawtune.io/spec-digest"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# GPU node pools scale from zero in 10-25 minutes on some clouds; the chart's multi-node join
# timeout is longer than this.
DEFAULT_UNSCHEDULABLE_GRACE_S = 1800.0
DEFAULT_PULL_GRACE_S = 300.0
PULL_ERRORS = {"ErrImagePull", "ImagePullBackOff"}
# Waiting reasons that no amount of waiting fixes.
FATAL_WAITING = {"InvalidImageName", "ErrImageNeverPull"}
# Waiting reasons that a late Secret/ConfigMap could still fix: given the pull grace.
CONFIG_WAITING = {"CreateContainerConfigError", "CreateContainerError"}

Obj = dict[str, Any]


class Action(str, Enum):
    CREATE = "create"  # no Job yet
    SKIP = "skip"  # completed with this very spec
    ATTACH = "attach"  # running with this spec: follow it
    REPLACE = "replace"  # failed, or its spec changed: delete the Job (never the artifacts) and submit again


@dataclass(frozen=True)
class Verdict:
    state: str  # "waiting" | "running" | "succeeded" | "failed"
    summary: str  # the progress line's text
    reason: str | None = None  # failure kind: OOMKilled, ImagePullBackOff, Unschedulable, ConfigError, ...
    detail: str = ""  # the cause, in words, for explain()
    exit_code: int | None = None  # what the driver returns on failure
    pod: str | None = None  # the pod whose logs tell the story
    container: str | None = None  # the container whose logs tell it (an init container's, say)
    # The driver gave up on a Job Kubernetes still runs (it never fails by itself when its pod
    # cannot be scheduled or pulled): the driver deletes it, or says how to.
    abandoned: bool = False


def spec_digest(job: Obj) -> str:
    """Identity of what a Job would run: its spec and the config it mounts (via the pod's checksum)."""
    return hashlib.sha256(json.dumps(job.get("spec", {}), sort_keys=True).encode()).hexdigest()[:16]


def _conditions(obj: Obj) -> dict[str, Obj]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions") or [] if c.get("status") == "True"}


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def job_outcome(job: Obj) -> str | None:
    """"Complete", "Failed" or None while the Job still runs (FailureTarget: pods still terminating)."""
    conds = _conditions(job)
    if "Complete" in conds:
        return "Complete"
    if "Failed" in conds or "FailureTarget" in conds:
        return "Failed"
    return None


def plan(existing: Obj | None, digest: str) -> tuple[Action, str]:
    """What to do with one stage's Job on (re-)running a run id."""
    if existing is None:
        return Action.CREATE, "submitting"
    outcome = job_outcome(existing)
    same = existing.get("metadata", {}).get("annotations", {}).get(SPEC_DIGEST) == digest
    if not same:
        what = "is running" if outcome is None else f"ran ({outcome.lower()})"
        return Action.REPLACE, f"its Job {what} with another spec (config, image or values changed): replacing it; committed artifacts are kept"
    if outcome == "Complete":
        return Action.SKIP, "already completed in this run"
    if outcome == "Failed":
        return Action.REPLACE, "failed before: submitting again; it resumes from its committed outputs and checkpoints"
    return Action.ATTACH, "already running: following it"


def _pod_time(pod: Obj) -> str:
    return pod.get("metadata", {}).get("creationTimestamp") or ""


def _container_status(pod: Obj, container: str | None) -> Obj | None:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    for status in statuses:
        if container is None or status.get("name") == container:
            return status
    return None


def _init_blocker(pod: Obj) -> Obj | None:
    """The init container that keeps the pod from starting: failed, or stuck waiting."""
    for status in pod.get("status", {}).get("initContainerStatuses") or []:
        state = status.get("state") or {}
        term = state.get("terminated") or (status.get("lastState") or {}).get("terminated")
        if term and term.get("exitCode", 0) != 0:
            return status
        if "waiting" in state and state["waiting"].get("reason") not in (None, "PodInitializing"):
            return status
    return None


def _kubelet_evicted(pod: Obj) -> bool:
    """The kubelet evicted the pod: it writes phase Failed and reason "Evicted" in every case. Only
    node-pressure evictions also get a DisruptionTarget condition; an emptyDir over its sizeLimit or
    a container over its ephemeral-storage limit gets none (eviction_manager.go localStorageEviction)."""
    status = pod.get("status", {})
    return status.get("phase") == "Failed" and status.get("reason") == "Evicted"


def _ignored_by_the_job(job: Obj, pod: Obj) -> bool:
    """A kubelet eviction the Job does not count: it carries DisruptionTarget and the Job's
    podFailurePolicy ignores that condition (the chart's default, countDisruptions=false)."""
    if not (_kubelet_evicted(pod) and "DisruptionTarget" in _conditions(pod)):
        return False
    rules = (job.get("spec", {}).get("podFailurePolicy") or {}).get("rules") or []
    return any(r.get("action") == "Ignore" and any(c.get("type") == "DisruptionTarget" for c in r.get("onPodConditions") or [])
               for r in rules)


# What to change for each kind of kubelet eviction, by the kubelet's own message (pkg/kubelet/eviction/helpers.go).
_EMPTYDIR_ADVICE = {
    "cache": "raise cache.sizeLimit (or stages.<stage>.cacheSizeLimit): the stage's models and work files outgrew its cache",
    "tmp": "raise tmp.sizeLimit",
    "dshm": "raise shm.sizeLimit (/dev/shm is memory-backed and counts against the memory limit)",
    "home": "HOME is a 1Gi scratch folder: the stage wrote more there than it should (set HF_HOME/XDG_CACHE_HOME to the cache)",
}


def _eviction_advice(message: str) -> str:
    emptydir = re.search(r'EmptyDir volume "([^"]+)" exceeds the limit', message)
    if emptydir:
        return _EMPTYDIR_ADVICE.get(emptydir.group(1), f"raise the sizeLimit of volume {emptydir.group(1)}")
    if "local ephemeral storage" in message:
        return "raise the stage's resources.limits.ephemeral-storage, or drop that limit (the emptyDirs have their own)"
    if "low on resource: memory" in message:
        return ("the node ran out of memory and the kubelet evicts pods above their memory request first: "
                "request the memory the stage uses (stages.<stage>.resources.limits.memory, which the chart also requests)")
    if "low on resource: ephemeral-storage" in message or "low on resource: inodes" in message:
        return ("the node's disk filled up: give the nodes more disk, or keep other pods' logs and images off the node "
                "(the stage requests its scratch space, so it is not the kubelet's first pick)")
    return "move the stage to a node with room"


def _terminated(pod: Obj, container: str | None) -> Obj | None:
    status = _container_status(pod, container) or {}
    return (status.get("state") or {}).get("terminated") or (status.get("lastState") or {}).get("terminated")


def _limit(job: Obj, container: str | None, resource: str) -> str | None:
    for spec in job.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
        if container is None or spec.get("name") == container:
            return (spec.get("resources", {}).get("limits") or {}).get(resource)
    return None


def _image(pod: Obj, container: str | None) -> str:
    statuses = (pod.get("status", {}).get("containerStatuses") or []) + (pod.get("status", {}).get("initContainerStatuses") or [])
    status = next((s for s in statuses if container is None or s.get("name") == container), {})
    if status.get("image"):
        return status["image"]
    for spec in pod.get("spec", {}).get("containers", []) + pod.get("spec", {}).get("initContainers", []):
        if container is None or spec.get("name") == container:
            return spec.get("image", "?")
    return "?"


def _failed_pod_story(job: Obj, pod: Obj, container: str | None) -> tuple[str, str, int]:
    """(reason, detail, driver exit code) of a pod that ended in failure."""
    term = _terminated(pod, container)
    name = pod["metadata"]["name"]
    if _kubelet_evicted(pod):
        message = pod["status"].get("message", "").strip()
        return "Evicted", f"pod {name} was evicted by the kubelet: {message} ({_eviction_advice(message)})", EXIT_RETRY
    init = _init_blocker(pod)
    if term is None and init is not None:
        init_term = (init.get("state") or {}).get("terminated") or (init.get("lastState") or {}).get("terminated") or {}
        code = init_term.get("exitCode")
        if code == EXIT_CONFIG:
            return (
                "ConfigError",
                f"init container {init['name']} in pod {name} exited with code {code}, a configuration or input error "
                f"(the podFailurePolicy failed the Job at once: retrying cannot help; fix the config and re-run)",
                EXIT_CONFIG,
            )
        return "InitFailed", f"init container {init['name']} in pod {name} exited with code {code} ({init_term.get('reason', 'Error')})", EXIT_RETRY
    if term is None:
        message = pod.get("status", {}).get("message") or pod.get("status", {}).get("reason") or "no container status"
        return "PodFailed", f"pod {name} failed before its container ran: {message}", EXIT_RETRY
    code = term.get("exitCode")
    if term.get("reason") == "OOMKilled":
        limit = _limit(job, container, "memory")
        return (
            "OOMKilled",
            f"container {container} in pod {name} was OOMKilled (exit code {code}) at its memory limit {limit or '(none set)'}: "
            f"raise stages.<stage>.resources.limits.memory, or lower per_device_train_batch_size / max_input_length in the config",
            EXIT_RETRY,
        )
    if code == EXIT_CONFIG:
        return (
            "ConfigError",
            f"container {container} in pod {name} exited with code {code}, a configuration or input error "
            f"(the podFailurePolicy failed the Job at once: retrying cannot help; fix the input or config and re-run)",
            EXIT_CONFIG,
        )
    return "ExitCode", f"container {container} in pod {name} exited with code {code} ({term.get('reason', 'Error')})", EXIT_RETRY


def _failed_job(job: Obj, pods: list[Obj], container: str | None) -> Verdict:
    conds = _conditions(job)
    cond = conds.get("Failed") or conds.get("FailureTarget") or {}
    job_reason = cond.get("reason", "Failed")
    failed_pods = sorted(
        (p for p in pods if p.get("status", {}).get("phase") == "Failed" or _terminated(p, container)),
        key=_pod_time,
    )
    spec = job.get("spec", {})
    attempts = job.get("status", {}).get("failed", len(failed_pods))
    if job_reason == "DeadlineExceeded":
        reason, detail, code = (
            "DeadlineExceeded",
            f"the Job ran past its activeDeadlineSeconds ({spec.get('activeDeadlineSeconds')} s) and was stopped: "
            f"raise stages.<stage>.activeDeadlineSeconds, or shorten the run (training_args.max_steps)",
            EXIT_RETRY,
        )
        pod = failed_pods[-1]["metadata"]["name"] if failed_pods else None
        return Verdict("failed", "failed: deadline exceeded", reason, detail, code, pod)
    message = cond.get("message", "")
    # The Job controller's own words, when the pods are gone (garbage-collected, TTL) or tell nothing.
    policy_config_error = job_reason == "PodFailurePolicy" and re.search(rf"failed with exit code {EXIT_CONFIG} matching FailJob", message)
    if not failed_pods:
        code = EXIT_CONFIG if policy_config_error else EXIT_RETRY
        return Verdict("failed", f"failed: {job_reason}", "ConfigError" if policy_config_error else job_reason,
                       f"the Job failed ({job_reason}: {message})", code)
    last = failed_pods[-1]
    reason, detail, code = _failed_pod_story(job, last, container)
    if reason == "PodFailed" and message:
        reason, detail = job_reason, f"{detail}; the Job says: {message}"
        if policy_config_error:
            reason, code = "ConfigError", EXIT_CONFIG
    if job_reason == "BackoffLimitExceeded":
        detail += f"; the Job gave up after {attempts} failed attempt(s) (backoffLimit {spec.get('backoffLimit')})"
    init = _init_blocker(last)
    log_container = init["name"] if init is not None and _terminated(last, container) is None else container
    return Verdict("failed", f"failed: {reason}", reason, detail, code, last["metadata"]["name"], log_container)


def _elapsed(now: datetime, since: str | None) -> float:
    start = _time(since)
    return (now - start).total_seconds() if start else 0.0


def assess(
    job: Obj,
    pods: list[Obj],
    *,
    now: datetime,
    container: str | None = None,
    pull_grace_s: float = DEFAULT_PULL_GRACE_S,
    unschedulable_grace_s: float = DEFAULT_UNSCHEDULABLE_GRACE_S,
) -> Verdict:
    """The state of one stage's Job, judged from it and its pods at ``now``.

    A Job never fails on its own when its pod cannot pull its image or cannot be scheduled: it
    waits forever. The driver gives those a grace period (a cluster autoscaler may add a GPU node,
    a registry hiccup may pass) and then calls them failures, with the kubelet's or the
    scheduler's own message.
    """
    outcome = job_outcome(job)
    if outcome == "Complete":
        return Verdict("succeeded", "completed")
    if outcome == "Failed":
        return _failed_job(job, pods, container)

    status = job.get("status", {})
    retries = status.get("failed", 0)
    attempt = f" (attempt {retries + 1}; {retries} failed before)" if retries else ""
    live = sorted((p for p in pods if p.get("status", {}).get("phase") in (None, "Pending", "Running")), key=_pod_time)
    disrupted = [p for p in pods if "DisruptionTarget" in _conditions(p)]
    # The Job's podFailurePolicy cannot tell a node-pressure eviction (DisruptionTarget, reason
    # TerminationByKubelet) from a drain and ignores both; the driver counts those against backoffLimit.
    # (Evictions without the condition, such as an emptyDir over its sizeLimit, the Job counts itself.)
    evicted = sorted((p for p in pods if _ignored_by_the_job(job, p)), key=_pod_time)
    limit = job.get("spec", {}).get("backoffLimit", 6)
    if len(evicted) + retries > limit:
        reason, detail, code = _failed_pod_story(job, evicted[-1], container)
        return Verdict("failed", "failed: Evicted", reason,
                       f"{detail}; {len(evicted)} kubelet eviction(s) and {retries} failure(s) exceed backoffLimit {limit}",
                       code, evicted[-1]["metadata"]["name"], container, abandoned=True)
    if not live:
        if disrupted:
            cond = _conditions(disrupted[-1])["DisruptionTarget"]
            return Verdict("waiting", f"pod {disrupted[-1]['metadata']['name']} was disrupted ({cond.get('reason')}: "
                           f"{cond.get('message', '')}); the Job retries it without counting a failure")
        return Verdict("waiting", f"waiting for the Job to create a pod{attempt}")

    # Every index of an Indexed (multi-node) Job has its own pod, and the Job runs only when all do:
    # one index that cannot be scheduled holds the others at torchrun's rendezvous. Judge each
    # index's newest pod; the first that failed (or waits) speaks for the Job.
    current: dict[str | None, Obj] = {}
    for pod in live:
        current[_completion_index(pod)] = pod
    verdicts = [_judge_pod(job, pod, now=now, container=container, attempt=attempt, pull_grace_s=pull_grace_s,
                           unschedulable_grace_s=unschedulable_grace_s) for _, pod in sorted(current.items(), key=_index_order)]
    expected = max(int(job.get("spec", {}).get("parallelism") or 1), len(current))
    for index, verdict in zip((i for i, _ in sorted(current.items(), key=_index_order)), verdicts):
        if verdict.state == "failed":
            if len(current) > 1 or expected > 1:
                verdict = replace(verdict, detail=f"{verdict.detail}. That is index {index} of {expected}: the other pods "
                                                  f"wait for it at torchrun's rendezvous, so the whole stage waits")
            return verdict
    if len(verdicts) == 1 and expected <= 1:
        return verdicts[0]
    indexes = [index for index, _ in sorted(current.items(), key=_index_order)]
    running = sum(v.state == "running" for v in verdicts)
    if running == len(verdicts) and len(verdicts) >= expected:
        return Verdict("running", f"{running} pods running ({', '.join(v.pod for v in verdicts)}){attempt}", pod=verdicts[0].pod)
    first = next(((i, v) for i, v in zip(indexes, verdicts) if v.state != "running"), None)
    if first is None:  # every live pod runs, but an index has no pod yet
        return Verdict("waiting", f"{running} of {expected} pods running; waiting for the Job to create the others{attempt}",
                       pod=verdicts[0].pod)
    index, verdict = first
    return Verdict("waiting", f"index {index}: {verdict.summary}; {running} of {expected} pods running", pod=verdict.pod)


def _completion_index(pod: Obj) -> str | None:
    """The pod's index in an Indexed Job (None for other Jobs: every pod then stands for the one index)."""
    meta = pod.get("metadata", {})
    return (meta.get("annotations") or {}).get(COMPLETION_INDEX) or (meta.get("labels") or {}).get(COMPLETION_INDEX)


def _index_order(item: tuple[str | None, Obj]) -> tuple[int, str]:
    index = item[0]
    return (int(index), "") if index is not None and index.isdigit() else (-1, index or "")


def _judge_pod(job: Obj, pod: Obj, *, now: datetime, container: str | None, attempt: str, pull_grace_s: float,
               unschedulable_grace_s: float) -> Verdict:
    """One live pod: running, waiting (pulling, being scheduled, creating) or failed past a grace period."""
    name = pod["metadata"]["name"]
    phase = pod.get("status", {}).get("phase", "Pending")
    cstatus = _container_status(pod, container) or {}
    init = _init_blocker(pod)
    if init is not None and (init.get("state") or {}).get("waiting"):
        cstatus, container = init, init["name"]  # the init container's pull or config trouble is the pod's
    waiting = (cstatus.get("state") or {}).get("waiting") or {}
    wreason = waiting.get("reason")
    age = _elapsed(now, _pod_time(pod))

    if wreason in FATAL_WAITING:
        return Verdict("failed", f"failed: {wreason}", "ImagePullBackOff" if wreason != "InvalidImageName" else wreason,
                       f"pod {name} cannot start image {_image(pod, container)}: {wreason}: {waiting.get('message', '')}",
                       EXIT_CONFIG, name, abandoned=True)
    if wreason in PULL_ERRORS:
        if age >= pull_grace_s:
            return Verdict(
                "failed", "failed: ImagePullBackOff", "ImagePullBackOff",
                f"pod {name} could not pull image {_image(pod, container)} for {age:.0f} s ({wreason}: {waiting.get('message', '')}); "
                f"build and push it (make images IMAGE_REGISTRY=... IMAGE_TAG=...), fix image.registry/image.tag, "
                f"or set imagePullSecrets for a private registry",
                EXIT_RETRY, name, abandoned=True)
        return Verdict("waiting", f"pulling image {_image(pod, container)}: {wreason}, retrying ({age:.0f} s)", pod=name)
    if wreason in CONFIG_WAITING:
        if age >= pull_grace_s:
            return Verdict(
                "failed", f"failed: {wreason}", "CreateContainerConfigError",
                f"pod {name} cannot create its container ({wreason}: {waiting.get('message', '')}); "
                f"a Secret or ConfigMap it names is missing (s3.existingSecret?)",
                EXIT_CONFIG, name, abandoned=True)
        return Verdict("waiting", f"{wreason}: {waiting.get('message', '')} ({age:.0f} s)", pod=name)

    scheduled = next((c for c in pod.get("status", {}).get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        waited = _elapsed(now, _pod_time(pod))
        message = scheduled.get("message", "")
        if waited >= unschedulable_grace_s:
            return Verdict(
                "failed", "failed: Unschedulable", "Unschedulable",
                f"pod {name} could not be scheduled for {waited:.0f} s; the scheduler says: {message} "
                f"{_unschedulable_advice(job, pod, message)}, "
                f"or wait longer (LAWTUNE_K8S_UNSCHEDULABLE_GRACE_S, now {unschedulable_grace_s:.0f})",
                EXIT_RETRY, name, abandoned=True)
        return Verdict("waiting", f"unschedulable for {waited:.0f} s: {message}", pod=name)

    if phase == "Running":
        return Verdict("running", f"pod {name} running{attempt}", pod=name)
    return Verdict("waiting", f"pod {name} {wreason or phase}{attempt}", pod=name)


def _requested(job: Obj, pod: Obj, resource: str) -> str | None:
    containers = pod.get("spec", {}).get("containers") or job.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    for spec in containers:
        value = (spec.get("resources", {}).get("requests") or {}).get(resource)
        if value:
            return str(value)
    return None


def _unschedulable_advice(job: Obj, pod: Obj, message: str) -> str:
    """What to change, by the resource the scheduler says no node has."""
    if "Insufficient ephemeral-storage" in message:
        return (f"No node has {_requested(job, pod, 'ephemeral-storage') or 'the requested'} of free ephemeral storage (node disk) "
                f"for the pod's scratch emptyDirs, which it requests so that the kubelet does not evict it: give the nodes "
                f"bigger disks, or set a smaller cache.sizeLimit (or stages.<stage>.cacheSizeLimit) / tmp.sizeLimit "
                f"if the model needs less")
    return "Check the stage's resources (gpus, memory), nodeSelector and tolerations against the cluster's nodes"


def explain(stage: str, job: Obj, verdict: Verdict, log_tail: list[str], *, namespace: str, job_fate: str | None = None) -> str:
    """One paragraph: which stage, what happened, what to do, and the last lines it logged.

    ``job_fate`` replaces "the Job is left in place" when the driver deleted it (or could not).
    """
    name = job["metadata"]["name"]
    fate = job_fate or f"The Job is left in place for inspection (kubectl -n {namespace} describe job/{name})"
    text = (
        f"Stage {stage} failed ({verdict.reason}): {verdict.detail}. "
        f"{fate}; "
        f"re-running the same run id resumes: committed stages skip themselves and finetune restarts from its last checkpoint."
    )
    if log_tail:
        where = f"pod {verdict.pod}" + (f" (container {verdict.container})" if verdict.container and verdict.container != stage else "")
        text += f" Last {len(log_tail)} log line(s) of {where}:\n" + "\n".join(f"    {line}" for line in log_tail)
    elif verdict.pod:
        text += f" Pod {verdict.pod} logged nothing."
    return text
