"""charts/lawtune-pipeline: real `helm template` output, strict schemas for 1.29 and 1.33, ordering,
failure policy, security and the distributed finetune shapes."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from shared.core.errors import EXIT_CONFIG
from tests.helm_utils import REPO, RenderError, by_kind, render, validate

CHART = "charts/lawtune-pipeline"
STAGES = ["preprocess", "finetune", "evaluate", "publish"]
KIND_VALUES = REPO / "tests" / "kind" / "values-pipeline.yaml"
# Non-ASCII and a block scalar: the ConfigMap must carry the file byte for byte.
CONFIG_TEXT = "# python -m shared.cluster.driver --config this.yaml\nbase_model: bundled:smollm2-135m-instruct\nseed: 42\npreprocess:\n  system_prompt: |\n    你是一名法律助手。\n    Answer briefly.\n"

BASE = {
    "runId": "sample",
    "artifactRoot": "s3://lawtune/artifacts",
    "input": {"uri": "s3://lawtune/inputs/legal_qa_sample.csv"},
}
VALUE_SETS = [
    pytest.param({}, id="defaults"),
    pytest.param({"s3": {"endpoint": "http://seaweedfs.storage:8333", "existingSecret": "lawtune-s3",
                         "accessKeyIdKey": "accesskey", "secretAccessKeyKey": "secretkey"}}, id="s3-existing-secret"),
    pytest.param({"stages": {"finetune": {"gpus": 4, "distributed": {"nprocPerNode": 4}}}}, id="multi-gpu-torchrun"),
    pytest.param({"stages": {"finetune": {"gpus": 8, "distributed": {"nprocPerNode": 8, "nodes": 3}}}}, id="multi-node-indexed"),
    pytest.param({"ttlSecondsAfterFinished": 3600}, id="ttl-on"),
    pytest.param({"hooks": {"enabled": False}}, id="hooks-off"),
    pytest.param({"nodeSelector": {"pool": "cpu"}, "tolerations": [{"key": "x", "operator": "Exists", "effect": "NoSchedule"}],
                  "stages": {"finetune": {"nodeSelector": {"pool": "gpu"},
                                          "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
                  "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}, "automountToken": True},
                  "huggingface": {"offline": False, "tokenSecret": "hf"}, "imagePullSecrets": [{"name": "regcred"}],
                  "extraEnv": [{"name": "NCCL_DEBUG", "value": "INFO"}]}, id="scheduling-and-identity"),
]


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def rendered(config_file):
    def _render(overrides: dict | None = None, base: dict = BASE, **kwargs):
        return render(CHART, _merge(base, overrides or {}), set_files={"config": config_file}, **kwargs)

    return _render


def stage_jobs(objects) -> list[dict]:
    """The stage Jobs (the pre-delete cleanup hook is a Job too)."""
    return [j for j in by_kind(objects, "Job") if "lawtune.io/stage" in j["metadata"]["labels"]]


def _jobs(objects) -> dict[str, dict]:
    return {j["metadata"]["labels"]["lawtune.io/stage"]: j for j in stage_jobs(objects)}


def _container(job) -> dict:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("overrides", VALUE_SETS)
def test_every_manifest_passes_strict_schemas_for_129_and_133(rendered, overrides):
    objects = rendered(overrides)
    assert len(stage_jobs(objects)) == 4
    assert validate(objects) == []


def test_kind_test_values_render_valid(config_file):
    values = yaml.safe_load(KIND_VALUES.read_text())
    objects = render(CHART, _merge(values, {"runId": "kind", "input": {"uri": "s3://lawtune/inputs/sample.csv"}}), set_files={"config": config_file})
    assert validate(objects) == []
    assert all("nvidia.com/gpu" not in str(_container(j)["resources"]) for j in stage_jobs(objects))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        pytest.param(("spec", "template", "spec", "containers", 0, "gpus"), 1, "'gpus' was unexpected", id="unknown-field"),
        pytest.param(("spec", "backoffLimit"), "three", "'three' is not of type 'integer'", id="wrong-type"),
    ],
)
def test_the_validator_rejects_what_it_should(rendered, path, value, message):
    """Guard against a validator that passes everything."""
    job = copy.deepcopy(_jobs(rendered())["finetune"])
    node = job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = validate([job])
    assert len(errors) == 2 and all(message in e for e in errors), errors


@pytest.mark.parametrize("hooks", [pytest.param(True, id="hooks"), pytest.param(False, id="sync-waves-only")])
def test_hook_weights_and_sync_waves_order_the_stages(rendered, hooks):
    objects = rendered({"hooks": {"enabled": hooks}})
    jobs = _jobs(objects)
    waves = [int(jobs[s]["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) for s in STAGES]
    assert waves == sorted(set(waves)), f"sync waves not strictly increasing: {waves}"
    setup_waves = [int(o["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) for o in objects
                   if o["kind"] != "Job" and "helm.sh/hook" not in o["metadata"].get("annotations", {})]
    assert max(setup_waves) < waves[0], "ConfigMap/ServiceAccount must sync before the first stage"
    annotations = [jobs[s]["metadata"]["annotations"] for s in STAGES]
    if hooks:
        weights = [int(a["helm.sh/hook-weight"]) for a in annotations]
        assert weights == sorted(set(weights))
        assert all(a["helm.sh/hook"] == "post-install,post-upgrade" for a in annotations)
        assert all(a["helm.sh/hook-delete-policy"] == "before-hook-creation" for a in annotations)
    else:
        assert not any(k.startswith("helm.sh/hook") for a in annotations for k in a)


def test_failure_policy_fails_at_once_on_the_config_exit_code_and_ignores_disruption(rendered):
    for stage, job in _jobs(rendered()).items():
        rules = job["spec"]["podFailurePolicy"]["rules"]
        fail = [r for r in rules if r["action"] == "FailJob"]
        assert [r["onExitCodes"]["values"] for r in fail] == [[EXIT_CONFIG]], stage
        assert fail[0]["onExitCodes"]["containerName"] == _container(job)["name"] == stage
        ignore = [r for r in rules if r["action"] == "Ignore"]
        assert ignore[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
        # podFailurePolicy requires restartPolicy Never
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param({}, {s: None for s in STAGES}, id="off-by-default"),
        pytest.param({"ttlSecondsAfterFinished": 600}, {s: 600 for s in STAGES}, id="on"),
        pytest.param({"ttlSecondsAfterFinished": 0}, {s: 0 for s in STAGES}, id="zero-is-a-value"),
    ],
)
def test_ttl_after_finished(rendered, overrides, expected):
    assert {s: j["spec"].get("ttlSecondsAfterFinished") for s, j in _jobs(rendered(overrides)).items()} == expected


def test_backoff_and_deadline_defaults_and_per_stage_overrides(rendered):
    jobs = _jobs(rendered({"backoffLimit": 5, "activeDeadlineSeconds": 1000,
                           "stages": {"finetune": {"backoffLimit": 1, "activeDeadlineSeconds": 50}}}))
    assert {s: j["spec"]["backoffLimit"] for s, j in jobs.items()} == {"preprocess": 5, "finetune": 1, "evaluate": 5, "publish": 5}
    assert jobs["finetune"]["spec"]["activeDeadlineSeconds"] == 50
    assert jobs["evaluate"]["spec"]["activeDeadlineSeconds"] == 1000
    assert jobs["preprocess"]["spec"]["activeDeadlineSeconds"] == 3600  # the stage's own default


def test_credentials_come_only_from_the_existing_secret(rendered):
    objects = rendered({"s3": {"existingSecret": "lawtune-s3", "accessKeyIdKey": "ak", "secretAccessKeyKey": "sk"}})
    assert not by_kind(objects, "Secret")
    for job in stage_jobs(objects):
        env = {e["name"]: e for e in _container(job)["env"]}
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "lawtune-s3", "key": "ak"}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "lawtune-s3", "key": "sk"}
        assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
    # Without a secret no credential variable is set at all (IRSA / workload identity).
    for job in stage_jobs(rendered()):
        assert not any(e["name"].startswith("AWS_ACCESS") or e["name"].startswith("AWS_SECRET") for e in _container(job)["env"])


def test_pods_are_non_root_read_only_and_every_writable_path_is_a_mounted_emptydir(rendered):
    for stage, job in _jobs(rendered()).items():
        pod = job["spec"]["template"]["spec"]
        container = _container(job)
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        writable = {p for p, name in mounts.items() if "emptyDir" in volumes[name]}
        env = {e["name"]: e.get("value") for e in container["env"]}
        for var in ("HOME", "TMPDIR", "LAWTUNE_CACHE_DIR", "HF_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
            assert any(env[var] == p or env[var].startswith(p + "/") for p in writable), f"{stage}: {var}={env[var]} not on an emptyDir"
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert mounts["/etc/lawtune"] == "config" and "configMap" in volumes["config"]


def test_config_map_carries_the_config_file_unchanged_and_is_mounted(rendered):
    objects = rendered()
    (cm,) = by_kind(objects, "ConfigMap")
    assert cm["data"]["config.yaml"] == CONFIG_TEXT.rstrip("\n")
    for stage, job in _jobs(objects).items():
        (vol,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
        assert vol["configMap"]["name"] == cm["metadata"]["name"]
        args = _container(job)["args"]  # publish reads publish.artifact from it
        assert args[args.index("--config") + 1] == "/etc/lawtune/config.yaml"


def test_stage_arguments_follow_the_stage_interface(rendered):
    jobs = _jobs(rendered({"modelName": "legal", "stages": {"publish": {"force": True}}}))
    assert _container(jobs["preprocess"])["args"] == ["--input", BASE["input"]["uri"], "--config", "/etc/lawtune/config.yaml"]
    assert _container(jobs["finetune"])["args"] == ["--config", "/etc/lawtune/config.yaml"]
    # Champion/challenger: evaluate scores the PROMOTED version of the model too.
    assert _container(jobs["evaluate"])["args"] == ["--config", "/etc/lawtune/config.yaml", "--model-name", "legal"]
    assert _container(jobs["publish"])["args"] == ["--config", "/etc/lawtune/config.yaml", "--model-name", "legal", "--force",
                                                   "--set", "publish.served_parity=false"]
    # No command: each image's ENTRYPOINT (python -m jobs.<stage>) runs.
    assert not any("command" in _container(j) for j in jobs.values())
    for stage, job in jobs.items():
        env = {e["name"]: e.get("value") for e in _container(job)["env"]}
        assert env["LAWTUNE_RUN_ID"] == "sample" and env["LAWTUNE_ARTIFACT_ROOT"] == "s3://lawtune/artifacts"
        assert _container(job)["image"] == f"ghcr.io/lawtune/{stage}:0.1.0"


def test_publish_turns_only_the_served_parity_off_the_image_cannot_run(rendered, config_file):
    """issue 26: the publish image has no vLLM, so the chart's publish runs the parity check's static part
    only: its --set, read with the shipped config as publish reads it, turns the served part off (and
    servedParity: true leaves the config's default, the served check, on)."""
    from shared.core.config import load_config

    def publish_config(values: dict):
        args = _container(_jobs(rendered({"modelName": "legal", **values}))["publish"])["args"]
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        return load_config(config_file, overrides=sets)

    assert publish_config({}).publish.served_parity is False
    assert publish_config({"stages": {"publish": {"servedParity": True}}}).publish.served_parity is True


def test_publish_runs_model_code_only_when_the_shipped_config_says_so(config_file):
    """issue 24 item 2: publish reads the config's publish section (#27), never its trust_remote_code; that
    (the operator's switch) becomes publish's flag."""
    def publish_args(config_text: str) -> list[str]:
        config_file.write_text(config_text, encoding="utf-8")
        return _container(_jobs(render(CHART, _merge(BASE, {"modelName": "legal"}), set_files={"config": config_file}))["publish"])["args"]

    read = ["--config", "/etc/lawtune/config.yaml", "--model-name", "legal", "--set", "publish.served_parity=false"]
    assert publish_args(CONFIG_TEXT) == read
    assert publish_args(CONFIG_TEXT + "trust_remote_code: false\n") == read
    assert publish_args(CONFIG_TEXT + "trust_remote_code: true\n") == [*read, "--trust-remote-code"]


@pytest.mark.parametrize(
    ("overrides", "gpus"),
    [
        pytest.param({}, {"preprocess": None, "finetune": 1, "evaluate": 1, "publish": None}, id="defaults"),
        pytest.param({"stages": {"finetune": {"gpus": 0}, "evaluate": {"gpus": 0}}}, {s: None for s in STAGES}, id="cpu"),
        pytest.param({"gpuResourceName": "amd.com/gpu", "stages": {"finetune": {"gpus": 2}}},
                     {"preprocess": None, "finetune": 2, "evaluate": 1, "publish": None}, id="other-vendor"),
    ],
)
def test_gpu_requests(rendered, overrides, gpus):
    name = overrides.get("gpuResourceName", "nvidia.com/gpu")
    got = {s: _container(j)["resources"].get("limits", {}).get(name) for s, j in _jobs(rendered(overrides)).items()}
    assert got == gpus


def test_stage_scheduling_overrides_replace_the_global_ones(rendered):
    jobs = _jobs(rendered({"nodeSelector": {"pool": "cpu"}, "stages": {"finetune": {"nodeSelector": {"pool": "gpu"}}}}))
    assert jobs["finetune"]["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert jobs["preprocess"]["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}


def test_multi_gpu_runs_torchrun_standalone_across_the_pods_gpus(rendered):
    objects = rendered({"stages": {"finetune": {"gpus": 4, "distributed": {"nprocPerNode": 4}}}})
    job = _jobs(objects)["finetune"]
    container = _container(job)
    assert container["command"] == ["torchrun"]
    assert container["args"] == ["--nnodes=1", "--nproc-per-node=4", "--max-restarts=3", "--standalone", "-m", "jobs.finetune",
                                 "--config", "/etc/lawtune/config.yaml"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert "completionMode" not in job["spec"] and not by_kind(objects, "Service")


def test_multi_node_is_an_indexed_job_with_a_headless_rendezvous_service(rendered):
    objects = rendered({"stages": {"finetune": {"gpus": 8, "distributed": {"nprocPerNode": 8, "nodes": 3, "port": 29400}}}})
    job = _jobs(objects)["finetune"]
    (svc,) = by_kind(objects, "Service")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == svc["metadata"]["name"]
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in svc["spec"]["selector"].items())
    args = _container(job)["args"]
    # Index 0's stable DNS name: <job>-0.<subdomain>
    assert f"--rdzv-endpoint={job['metadata']['name']}-0.{svc['metadata']['name']}:29400" in args
    assert "--nnodes=3" in args and "--nproc-per-node=8" in args and "--rdzv-backend=c10d" in args
    assert _container(job)["ports"] == [{"name": "rendezvous", "containerPort": 29400}]
    # Only finetune is distributed.
    assert all("completionMode" not in j["spec"] for s, j in _jobs(objects).items() if s != "finetune")


def test_names_fit_dns_labels_for_the_longest_run_id(rendered):
    run_id = "Run_" + "x" * 59  # 63 characters, '_' and upper case are legal in a run id
    objects = rendered({"runId": run_id, "stages": {"finetune": {"gpus": 2, "distributed": {"nprocPerNode": 2, "nodes": 2}}}},
                       release="a-long-release-name")
    for obj in objects:
        name = obj["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
    for job in stage_jobs(objects):
        assert len(job["metadata"]["name"]) + len("-99") <= 63  # indexed pod hostnames
        assert job["metadata"]["labels"]["lawtune.io/run-id"] == run_id
    assert validate(objects, versions=["1.33"]) == []


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param({k: v for k, v in BASE.items() if k != "runId"}, "runId is required", id="no-run-id"),
        pytest.param({k: v for k, v in BASE.items() if k != "artifactRoot"}, "artifactRoot is required", id="no-artifact-root"),
        pytest.param({k: v for k, v in BASE.items() if k != "input"}, "input.uri is required", id="no-input"),
        pytest.param({**BASE, "runId": "bad/run"}, "runId", id="bad-run-id"),
        pytest.param({**BASE, "artifactRoot": "file:///tmp/a"}, "artifactRoot", id="file-root-unreachable-from-pods"),
        pytest.param({**BASE, "stages": {"finetune": {"gpus": 2, "distributed": {"nprocPerNode": 4}}}},
                     "nprocPerNode (4) exceeds stages.finetune.gpus (2)", id="more-procs-than-gpus"),
        pytest.param({**BASE, "stages": {"finetune": {"gpu": 2}}}, "gpu", id="typo-in-key"),
        pytest.param({**BASE, "image": {"tag": "latest"}}, "image.tag", id="latest-tag"),
    ],
)
def test_bad_values_fail_naming_the_key(config_file, values, message):
    with pytest.raises(RenderError, match=re.escape(message)):
        render(CHART, values, set_files={"config": config_file})


def test_missing_config_fails_naming_the_key():
    with pytest.raises(RenderError, match="config is required"):
        render(CHART, BASE)


def test_input_not_required_when_preprocess_is_disabled(config_file):
    values = {k: v for k, v in BASE.items() if k != "input"} | {"stages": {"preprocess": {"enabled": False}}}
    assert sorted(_jobs(render(CHART, values, set_files={"config": config_file}))) == ["evaluate", "finetune", "publish"]


def test_every_values_key_is_documented():
    """helm-docs style: every leaf key has a `# --` comment, on itself or on an ancestor."""
    keys = []  # (indent, name, documented by its own comment)
    comment = False
    for line in (REPO / CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = True
        elif match := re.match(r"^(\s*)([A-Za-z][\w.-]*):", line):
            keys.append((len(match.group(1)), match.group(2), comment))
            comment = False
    undocumented, stack = [], []
    for i, (indent, name, documented) in enumerate(keys):
        while stack and stack[-1][0] >= indent:
            stack.pop()
        is_parent = i + 1 < len(keys) and keys[i + 1][0] > indent
        if not is_parent and not documented and not any(doc for _, doc in stack):
            undocumented.append(name)
        stack.append((indent, documented))
    assert len(keys) > 60 and undocumented == []


@pytest.mark.parametrize(
    ("config_text", "exit_code"),
    [
        pytest.param(None, 0, id="embedded-default-config"),
        pytest.param("base_model: bundled:smollm2-135m-instruct\ntraining_args:\n  max_stepz: 3\n", EXIT_CONFIG, id="typo-in-key"),
    ],
)
def test_torchrun_checks_the_config_first_and_fails_at_once_on_exit_2(rendered, tmp_path, config_text, exit_code):
    """Under torchrun a worker's exit 2 reaches the pod as 1, so an init container checks the config;
    its command is run here for real against a good and a bad config."""
    import subprocess
    import sys

    job = _jobs(rendered({"stages": {"finetune": {"gpus": 2, "distributed": {"nprocPerNode": 2}}}}))["finetune"]
    pod = job["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == _container(job)["image"] and init["securityContext"]["readOnlyRootFilesystem"] is True
    fail_on = {r["onExitCodes"]["containerName"] for r in job["spec"]["podFailurePolicy"]["rules"] if r["action"] == "FailJob"}
    assert fail_on == {"finetune", "check-config"}
    config = REPO / "configs" / "smollm2-135m-cpu.yaml"
    if config_text is not None:
        config = tmp_path / "bad.yaml"
        config.write_text(config_text)
    code = [a.replace("/etc/lawtune/config.yaml", str(config)) for a in init["args"]]
    proc = subprocess.run([sys.executable, *init["command"][1:], *code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == exit_code, proc.stderr
    if exit_code:
        assert "max_stepz" in proc.stderr and proc.stderr.startswith("lawtune finetune: error:")


def test_helm_lint_strict_passes(config_file, tmp_path):
    import subprocess

    from tests.helm_utils import helm_path

    sets = [f"runId={BASE['runId']}", f"artifactRoot={BASE['artifactRoot']}", f"input.uri={BASE['input']['uri']}"]
    cmd = [str(helm_path()), "lint", "--strict", str(REPO / CHART), "--set-file", f"config={config_file}"]
    for item in sets:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 0 and "0 chart(s) failed" in proc.stdout, proc.stdout + proc.stderr


# ---------------------------------------------------------------- cluster-readiness (issue 12) and CPU mode (issue 19)


def _names(objects) -> dict[str, str]:
    return {s: j["metadata"]["name"] for s, j in _jobs(objects).items()}


def test_plain_mode_takes_a_config_change_under_the_same_run_id(rendered, tmp_path):
    """A Job's pod template is immutable: without hooks a new config must make new Jobs (new names),
    which Helm and Argo CD then create while pruning the old ones; the same config keeps the names."""
    other = tmp_path / "other.yaml"
    other.write_text(CONFIG_TEXT + "training_args:\n  max_steps: 7\n", encoding="utf-8")
    plain = {"hooks": {"enabled": False}}
    before, again = _names(rendered(plain)), _names(rendered(plain))
    after = _names(render(CHART, _merge(BASE, plain), set_files={"config": other}))
    assert before == again
    assert all(before[s] != after[s] for s in STAGES)
    assert all(re.fullmatch(rf"t-sample-{s}-[0-9a-f]{{8}}", before[s]) for s in STAGES), before
    # A change to one stage's values re-creates that stage only.
    tuned = _names(rendered(_merge(plain, {"stages": {"publish": {"force": True}}})))
    assert [s for s in STAGES if tuned[s] != before[s]] == ["publish"]


def test_hook_mode_keeps_the_names_and_records_the_spec(rendered, tmp_path):
    """With hooks Helm deletes the Job before re-creating it (before-hook-creation), so the name
    stays; the spec hash annotation is what an upgrade compares to skip a completed stage."""
    other = tmp_path / "other.yaml"
    other.write_text(CONFIG_TEXT + "seed: 1\n", encoding="utf-8")
    one, two = _jobs(rendered()), _jobs(render(CHART, BASE, set_files={"config": other}))
    for stage in STAGES:
        assert one[stage]["metadata"]["name"] == two[stage]["metadata"]["name"] == f"t-sample-{stage}"
        h1, h2 = (j[stage]["metadata"]["annotations"]["lawtune.io/spec-hash"] for j in (one, two))
        assert len(h1) == 16 and h1 != h2


@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "plain"])
def test_names_fit_indexed_pod_hostnames_in_both_modes(rendered, hooks):
    objects = rendered({"runId": "R" * 63, "hooks": {"enabled": hooks},
                        "stages": {"finetune": {"gpus": 2, "distributed": {"nprocPerNode": 2, "nodes": 12}}}},
                       release="a-long-release-name-of-forty-characters")
    for name in _names(objects).values():
        assert len(name) + len("-11") <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name


def _multinode(rendered, **dist):
    values = {"stages": {"finetune": {"gpus": 8, "distributed": {"nprocPerNode": 8, "nodes": 3, **dist}}}}
    return _jobs(rendered(values))["finetune"]


@pytest.mark.parametrize("index", ["0", "1", "2"])
def test_multi_node_rendezvous_host_is_index_0_by_its_completion_index(rendered, tmp_path, index):
    """The container's command runs for real in sh, with a stand-in `torchrun` on PATH that prints
    its arguments: index 0 hosts the c10d store, every other index joins it."""
    import os
    import subprocess

    container = _container(_multinode(rendered))
    fake = tmp_path / "torchrun"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "JOB_COMPLETION_INDEX": index}
    proc = subprocess.run([*container["command"], *container["args"]], env=env, capture_output=True, text=True, timeout=10)
    argv = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stderr
    assert argv[0] == f"--rdzv-conf=is_host={1 if index == '0' else 0},join_timeout=2400"
    assert argv[1:] == container["args"]


def test_multi_node_restarts_workers_waits_for_gpu_scheduling_and_budgets_whole_attempts(rendered):
    from shared.cluster.k8s_explain import DEFAULT_UNSCHEDULABLE_GRACE_S

    job = _multinode(rendered)
    args = _container(job)["args"]
    assert "--max-restarts=3" in args
    join = int(re.search(r"join_timeout=(\d+)", _container(job)["command"][2]).group(1))
    assert join > DEFAULT_UNSCHEDULABLE_GRACE_S  # a node still being provisioned can still join
    # Losing the rendezvous host fails every node's pod once: the budget counts attempts, not pods.
    assert job["spec"]["backoffLimit"] == 3 * 3
    assert _jobs(rendered())["finetune"]["spec"]["backoffLimit"] == 3


def test_scratch_space_is_requested_and_gpu_stages_request_their_memory_limit(rendered):
    jobs = _jobs(rendered({"cache": {"sizeLimit": "20Gi"}, "tmp": {"sizeLimit": "512Mi"}}))
    for stage, job in jobs.items():
        resources = _container(job)["resources"]
        cache = 2 * 1024 if stage == "preprocess" else 20 * 1024  # preprocess has its own, smaller cache
        assert resources["requests"]["ephemeral-storage"] == f"{cache + 512 + 1024}Mi", stage
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        assert volumes["cache"]["emptyDir"]["sizeLimit"] == f"{cache // 1024}Gi"
        if "nvidia.com/gpu" in resources.get("limits", {}):
            assert resources["requests"]["memory"] == resources["limits"]["memory"], stage
    assert {s for s, j in jobs.items() if "nvidia.com/gpu" in _container(j)["resources"].get("limits", {})} == {"finetune", "evaluate"}


def test_disruptions_can_be_counted(rendered):
    """podFailurePolicy matches a condition's type, never its reason: ignoring DisruptionTarget also
    ignores kubelet evictions, so an operator can choose to count them all."""
    for job in _jobs(rendered({"countDisruptions": True})).values():
        assert not [r for r in job["spec"]["podFailurePolicy"]["rules"] if r["action"] == "Ignore"]


@pytest.mark.parametrize("run_id", ["run-", "run.", "run_", "-run", "_run", "a" * 64])
def test_run_ids_a_label_cannot_hold_are_rejected(config_file, run_id):
    with pytest.raises(RenderError, match="runId"):
        render(CHART, {**BASE, "runId": run_id}, set_files={"config": config_file})


@pytest.mark.parametrize("run_id", ["a", "Run_2026.11-28", "a" * 63])
def test_run_ids_a_label_can_hold_render(rendered, run_id):
    assert all(j["metadata"]["labels"]["lawtune.io/run-id"] == run_id for j in stage_jobs(rendered({"runId": run_id})))


def _selector_matches(selector: str, labels: dict) -> bool:
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if key not in labels or (value and labels[key] != value):
            return False
    return True


def test_uninstall_cleans_up_the_hook_jobs(rendered):
    objects = rendered()
    hooks = [o for o in objects if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-delete"]
    assert sorted(o["kind"] for o in hooks) == ["Job", "Role", "RoleBinding", "ServiceAccount"]
    assert all(o["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "PreDelete" for o in hooks)
    (role,) = [o for o in hooks if o["kind"] == "Role"]
    assert role["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["deletecollection"]}]
    (job,) = [o for o in hooks if o["kind"] == "Job"]
    selector = re.search(r'labelSelector="\s*\+ urllib.parse.quote\("([^"]+)"\)', _container(job)["args"][0]).group(1)
    assert all(_selector_matches(selector, j["metadata"]["labels"]) for j in stage_jobs(objects))
    assert not _selector_matches(selector, job["metadata"]["labels"])  # it does not delete itself mid-run
    assert validate(hooks) == []
    assert not [o for o in rendered({"hooks": {"enabled": False}}) if "helm.sh/hook" in o["metadata"].get("annotations", {})]


def test_the_cleanup_script_compiles():
    import ast

    objects = render(CHART, BASE, set_files={"config": REPO / "configs" / "smollm2-135m-cpu.yaml"})
    (job,) = [j for j in by_kind(objects, "Job") if j not in stage_jobs(objects)]
    ast.parse(_container(job)["args"][0])


def test_gpu_stages_tolerate_the_gpu_taint_and_cpu_stages_do_not(rendered):
    taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    jobs = _jobs(rendered({"tolerations": [{"key": "pool", "operator": "Exists"}]}))
    for stage, job in jobs.items():
        tolerations = job["spec"]["template"]["spec"].get("tolerations", [])
        assert (taint in tolerations) == (stage in ("finetune", "evaluate")), stage
        assert {"key": "pool", "operator": "Exists"} in tolerations


def test_images_can_be_pinned_by_digest(rendered):
    digest = "sha256:" + "ab" * 32
    objects = rendered({"image": {"digests": {"gpu": {"finetune": digest}}},
                        "stages": {"finetune": {"gpus": 2, "distributed": {"nprocPerNode": 2}}}})
    jobs = _jobs(objects)
    assert _container(jobs["finetune"])["image"] == f"ghcr.io/lawtune/finetune@{digest}"
    assert jobs["finetune"]["spec"]["template"]["spec"]["initContainers"][0]["image"] == f"ghcr.io/lawtune/finetune@{digest}"
    assert _container(jobs["evaluate"])["image"] == "ghcr.io/lawtune/evaluate:0.1.0"
    assert validate(objects) == []


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_digests_are_pinned_per_device(rendered, device):
    """The CUDA build and the `-cpu` build are different images: a digest pinned for one device
    must never run in the other mode."""
    cuda, cpu = "sha256:" + "ab" * 32, "sha256:" + "cd" * 32
    jobs = _jobs(rendered({"device": device, "image": {"digests": {"gpu": {"finetune": cuda, "evaluate": cuda},
                                                                   "cpu": {"finetune": cpu}}}}))
    want = {"gpu": {"finetune": f"ghcr.io/lawtune/finetune@{cuda}", "evaluate": f"ghcr.io/lawtune/evaluate@{cuda}"},
            "cpu": {"finetune": f"ghcr.io/lawtune/finetune@{cpu}", "evaluate": "ghcr.io/lawtune/evaluate:0.1.0-cpu"}}[device]
    assert {s: _container(jobs[s])["image"] for s in want} == want


def test_digests_not_keyed_by_device_are_refused_naming_the_key(config_file):
    with pytest.raises(RenderError, match="image.digests: Additional property finetune is not allowed"):
        render(CHART, {**BASE, "image": {"digests": {"finetune": "sha256:" + "ab" * 32}}}, set_files={"config": config_file})


def test_a_digest_that_is_not_one_is_rejected(config_file):
    with pytest.raises(RenderError, match="digests"):
        render(CHART, {**BASE, "image": {"digests": {"gpu": {"finetune": "latest"}}}}, set_files={"config": config_file})


def test_cpu_mode_requests_no_gpu_and_runs_the_cpu_images(rendered):
    objects = rendered({"device": "cpu"})
    assert validate(objects) == []
    for stage, job in _jobs(objects).items():
        pod = job["spec"]["template"]["spec"]
        container = _container(job)
        assert "gpu" not in json.dumps(container["resources"]) and "gpu" not in json.dumps(pod.get("tolerations", [])), stage
        assert container["image"] == f"ghcr.io/lawtune/{stage}:0.1.0-cpu"
    jobs = _jobs(objects)
    values = yaml.safe_load((REPO / CHART / "values.yaml").read_text())
    for stage in ("finetune", "evaluate"):
        want = values["stages"][stage]["cpuResources"]
        got = _container(jobs[stage])["resources"]
        assert got["limits"] == want["limits"] and got["requests"]["memory"] == want["requests"]["memory"]


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_helm_lint_strict_passes_in_both_modes(config_file, tmp_path, device):
    import subprocess

    from tests.helm_utils import helm_path

    cmd = [str(helm_path()), "lint", "--strict", str(REPO / CHART), "--set-file", f"config={config_file}",
           "--set", f"runId=r,artifactRoot=s3://b/a,input.uri=s3://b/x.csv,device={device}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 0 and "0 chart(s) failed" in proc.stdout, proc.stdout + proc.stderr


def test_driver_rbac_is_optional_and_binds_the_driver_service_account(rendered):
    assert not by_kind(rendered(), "Role") or all("cleanup" in r["metadata"]["name"] for r in by_kind(rendered(), "Role"))
    objects = rendered({"driverRbac": {"create": True, "serviceAccountName": "ci-runner"}})
    (binding,) = [b for b in by_kind(objects, "RoleBinding") if b["metadata"]["name"].endswith("-driver")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ci-runner", "namespace": "lawtune"}]
    assert validate(objects) == []


# ---------------------------------------------------------------- second review (issue 25)


def _hashes(objects) -> dict[str, str]:
    return {s: j["metadata"]["annotations"]["lawtune.io/spec-hash"] for s, j in _jobs(objects).items()}


@pytest.mark.parametrize(
    "toggle",
    [
        pytest.param({"rerunCompleted": True}, id="rerunCompleted"),
        pytest.param({"driverRbac": {"create": True}}, id="driverRbac.create"),
        pytest.param({"cleanup": {"enabled": False}}, id="cleanup.enabled"),
        pytest.param({"logLevel": "DEBUG"}, id="logLevel"),
    ],
)
@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "plain"])
def test_values_no_pod_runs_leave_the_spec_hash_and_names_alone(rendered, toggle, hooks):
    """The hash covers what a stage's pod runs. Toggling a value that changes no pod must neither
    re-run a completed GPU stage (hook mode) nor rename and re-create its Job (plain mode)."""
    mode = {"hooks": {"enabled": hooks}}
    before, after = rendered(mode), rendered(_merge(mode, toggle))
    assert _hashes(after) == _hashes(before) and _names(after) == _names(before)
    if "logLevel" in toggle:  # the level reaches the pods through the run's ConfigMap
        (cm,) = by_kind(after, "ConfigMap")
        assert cm["data"]["logLevel"] == "DEBUG"
        env = {e["name"]: e for e in _container(_jobs(after)["finetune"])["env"]}
        assert env["LAWTUNE_LOG_LEVEL"]["valueFrom"]["configMapKeyRef"] == {"name": cm["metadata"]["name"], "key": "logLevel"}


def test_the_spec_hash_follows_the_rendered_spec_not_the_values(rendered, tmp_path):
    """Two value sets that render the same pod give the same hash; a config change moves every hash."""
    auto = rendered()
    volumes = {v["name"]: v for v in _jobs(auto)["finetune"]["spec"]["template"]["spec"]["volumes"]}
    explicit = rendered({"stages": {"finetune": {"cacheSizeLimit": volumes["cache"]["emptyDir"]["sizeLimit"]}}})
    assert _jobs(explicit)["finetune"]["spec"] == _jobs(auto)["finetune"]["spec"]
    assert _hashes(explicit) == _hashes(auto)
    other = tmp_path / "other.yaml"
    other.write_text(CONFIG_TEXT + "seed: 43\n", encoding="utf-8")
    moved = _hashes(render(CHART, BASE, set_files={"config": other}))
    assert all(moved[s] != h for s, h in _hashes(rendered()).items())


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_every_container_requests_the_memory_it_may_use(rendered, device):
    """The kubelet evicts pods above their memory request first: CPU stages (preprocess, publish,
    every stage with device=cpu) and init containers request their limit, as GPU stages do."""
    for obj in by_kind(rendered({"device": device}), "Job"):
        spec = obj["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            resources = container["resources"]
            assert resources["requests"]["memory"] == resources["limits"]["memory"], (obj["metadata"]["name"], container["name"])


CONFIG_FOR = {
    "bundled": "base_model: bundled:smollm2-135m-instruct\n",
    "7b": "base_model: Qwen/Qwen2.5-7B-Instruct\n",
    "6b": "base_model: THUDM/chatglm3-6b\n",
    "no-size-in-name": "base_model: s3://models/house-model\n",
}


def _scratch(objects) -> dict[str, tuple[str, str]]:
    out = {}
    for stage, job in _jobs(objects).items():
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        out[stage] = (volumes["cache"]["emptyDir"]["sizeLimit"], _container(job)["resources"]["requests"]["ephemeral-storage"])
    return out


@pytest.mark.parametrize(
    ("model", "caches"),
    [
        pytest.param("bundled", {"preprocess": "2Gi", "finetune": "3Gi", "evaluate": "4Gi", "publish": "4Gi"}, id="bundled"),
        pytest.param("7b", {"preprocess": "2Gi", "finetune": "17Gi", "evaluate": "32Gi", "publish": "32Gi"}, id="qwen2.5-7b"),
        pytest.param("6b", {"preprocess": "2Gi", "finetune": "15Gi", "evaluate": "28Gi", "publish": "28Gi"}, id="chatglm3-6b"),
        pytest.param("no-size-in-name", {"preprocess": "2Gi", "finetune": "10Gi", "evaluate": "10Gi", "publish": "10Gi"},
                     id="unknown-size"),
    ],
)
def test_scratch_space_is_sized_from_the_model(tmp_path, model, caches):
    """A stock EKS node has a 20 GiB disk: the bundled model's stages (and a model whose size the
    name does not give) must fit it; a 7B gets the room its weights need, per stage."""
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG_FOR[model], encoding="utf-8")
    scratch = _scratch(render(CHART, BASE, set_files={"config": config}))
    assert {s: cache for s, (cache, _) in scratch.items()} == caches
    for stage, (cache, request) in scratch.items():
        assert request == f"{int(cache.removesuffix('Gi')) * 1024 + 5 * 1024 + 1024}Mi", stage  # + tmp 5Gi + HOME 1Gi
    if model in ("bundled", "no-size-in-name"):
        assert max(int(r.removesuffix("Mi")) for _, r in scratch.values()) <= 16 * 1024  # fits a 20 GiB node's allocatable


def test_an_explicit_cache_size_wins_over_the_model(rendered):
    scratch = _scratch(rendered({"cache": {"sizeLimit": "40Gi"}, "stages": {"publish": {"cacheSizeLimit": "60Gi"}}}))
    assert {s: c for s, (c, _) in scratch.items()} == {"preprocess": "2Gi", "finetune": "40Gi", "evaluate": "40Gi", "publish": "60Gi"}


def test_driver_rbac_installs_alone_without_run_values_or_a_run(tmp_path):
    """`--set driverRbac.only=true`: the Role and its binding and nothing else, with no runId, config
    or artifact root, and (hooks on by default) no hook that would start a run."""
    objects = render(CHART, {"driverRbac": {"only": True, "serviceAccountName": "ci-runner"}})
    assert sorted(o["kind"] for o in objects) == ["Role", "RoleBinding"]
    assert validate(objects) == []
    (binding,) = by_kind(objects, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ci-runner", "namespace": "lawtune"}]
    assert all("lawtune.io/run-id" not in o["metadata"]["labels"] for o in objects)
    with pytest.raises(RenderError, match="driverRbac.serviceAccountName is required with driverRbac.only"):
        render(CHART, {"driverRbac": {"only": True}})


@pytest.mark.integration
def test_driver_rbac_alone_through_helm_install_creates_no_hooks():
    """The real `helm install --dry-run=server` (Helm's install path, hooks included) against the
    stand-in API server of test_lawtune_pipeline_upgrade: the release holds the two RBAC objects, no hook."""
    from tests.charts.test_lawtune_pipeline_upgrade import StandInApiServer
    from tests.helm_utils import helm_install_dry_run_server

    api = StandInApiServer({})
    try:
        release = helm_install_dry_run_server(api.server.server_address[1], "driver-rbac", REPO / CHART,
                                              "--set", "driverRbac.only=true,driverRbac.serviceAccountName=ci-runner")
    finally:
        api.close()
    assert release.get("hooks") in (None, [])
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(release["manifest"]) if d)
    assert kinds == ["Role", "RoleBinding"]
    assert "no run was started" in release["info"]["notes"]
