"""`lawtune deploy` in adapters mode and with a merged-mode canary (shared/serve/deploy_modes.py), rendered by real helm."""

from __future__ import annotations

import pytest
import yaml

from shared.core.errors import ConfigError
from shared.core.settings import load_settings
from shared.serve import deploy
from shared.serve.deploy_modes import mode_settings
from shared.store.artifacts import commit_dir, now_iso
from shared.store.serving import Canary, read_canary, write_canary
from shared.store.storage import open_location
from tests.helm_utils import helm_path

BASE = {"apiKey": {"existingSecret": "lawtune-api-key"}, "artifactStore": {"root": "s3://elsewhere/ignored"}}
DIGEST = "ef" * 32


@pytest.fixture
def published(artifact_root, tmp_path):
    """v1: adapter only (PROMOTED); v2: merged and adapter; v3: merged only."""
    settings = load_settings()
    root = settings.models_uri("legal-assistant")
    adapter = {"base_model_digest": DIGEST, "base": f"bases/{DIGEST}", "r": 8}
    for version, extra in (("v1", {"artifact": "adapter", "adapter": adapter}), ("v2", {"artifact": "both", "adapter": adapter}),
                           ("v3", {"artifact": "merged"})):
        src = tmp_path / f"src-{version}"
        src.mkdir()
        (src / "lawtune-model.json").write_text("{}")
        commit_dir(src, open_location(f"{root}/{version}", settings), stage="publish", inputs={}, started_at=now_iso(), extra=extra)
    location = open_location(root, settings)
    location.write_text("PROMOTED", "v1")
    return settings, location, tmp_path


def _values(tmp_path, **extra):
    path = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
    path.write_text(yaml.safe_dump({**BASE, **extra}))
    return path


def test_adapters_mode_deploys_the_promoted_versions_base(published, capfd):
    settings, _, tmp = published
    helm_path()
    values = _values(tmp, serving={"mode": "adapters"})
    assert deploy.main(["--release", "assistant", "-f", str(values), "--dry-run"]) == 0
    objects = [d for d in yaml.safe_load_all(capfd.readouterr().out) if d]
    (vllm,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-vllm")]
    assert vllm["spec"]["template"]["spec"]["initContainers"][0]["args"][0] == f"{settings.artifact_root}/bases/{DIGEST}"
    assert mode_settings(settings, "legal-assistant", "v1", [values])[1] == {"mode": "adapters", "base_model_digest": DIGEST}


def test_adapters_mode_refuses_a_version_without_an_adapter(published, capsys):
    settings, location, tmp = published
    location.write_text("PROMOTED", "v3")
    assert deploy.main(["--release", "assistant", "-f", str(_values(tmp, serving={"mode": "adapters"})), "--dry-run"]) == 2
    assert "v3 carries no adapter (publish.artifact=merged), but serving.mode=adapters" in capsys.readouterr().err


def test_merged_canary_deploys_the_challenger_and_drops_it_when_the_canary_ends(published):
    settings, location, tmp = published
    location.write_text("PROMOTED", "v3")
    values = [_values(tmp, canary={"enabled": True}), _values(tmp, model={"name": "legal-assistant"})]
    write_canary(location, Canary("v2", 10), read_canary(location)[1])
    args, facts = mode_settings(settings, "legal-assistant", "v3", values)
    assert args == ["--set-string", "canary.challengerVersion=v2"] and facts == {"mode": "merged", "challenger": "v2"}
    write_canary(location, None, read_canary(location)[1])
    assert mode_settings(settings, "legal-assistant", "v3", values)[0] == ["--set-string", "canary.challengerVersion="]
    # A challenger with only an adapter cannot run as a merged Deployment.
    write_canary(location, Canary("v1", 10), read_canary(location)[1])
    with pytest.raises(ConfigError, match="challenger v1 carries only an adapter"):
        mode_settings(settings, "legal-assistant", "v3", values)
    # No canary values: nothing added, as before.
    assert mode_settings(settings, "legal-assistant", "v3", [_values(tmp)]) == ([], {"mode": "merged"})


def test_merged_mode_refuses_an_adapter_only_version(published, capsys, tmp_path):
    """Neither deploy nor the init container lets vLLM start on a folder that holds only an adapter."""
    from jobs import fetch_model

    settings, _, tmp = published  # v1, the promoted one, is adapter only
    assert deploy.main(["--release", "assistant", "-f", str(_values(tmp)), "--dry-run"]) == 2
    assert "v1 carries only an adapter (publish.artifact=adapter): deploy it with serving.mode=adapters" in capsys.readouterr().err
    assert fetch_model.main([settings.models_uri("legal-assistant"), str(tmp_path / "model")]) == 2
    assert "carries only an adapter" in capsys.readouterr().err and not (tmp_path / "model").exists()


def test_a_release_kept_in_adapters_mode_stays_there_without_its_values_file(published, tmp_path, monkeypatch, capfd):
    """deploy keeps the release's values (helm --reset-then-reuse-values): an upgrade without the values file that
    chose serving.mode=adapters is still an adapters release, so it must get the base digest, not a merged deploy's
    refusal or a record that says merged. --reset-values drops the kept mode."""
    import json

    from shared.store.releases import releases

    settings, location, tmp = published
    log = tmp_path / "helm-calls.txt"
    helm = tmp_path / "helm"
    status = {"name": "assistant", "namespace": "serving", "version": 3, "info": {"status": "deployed"},
              "config": {"serving": {"mode": "adapters"}, "apiKey": {"existingSecret": "lawtune-api-key"}}}
    helm.write_text(f'#!/bin/sh\necho "$@" >> {log}\nif [ "$1" = status ]; then echo \'{json.dumps(status)}\'; fi\n')
    helm.chmod(0o755)
    monkeypatch.setenv("LAWTUNE_HELM", str(helm))
    monkeypatch.setenv("LAWTUNE_CLUSTER", "staging")
    assert deploy.main(["--release", "assistant", "--namespace", "serving"]) == 0
    upgrade = next(c for c in log.read_text().splitlines() if c.startswith("upgrade"))
    assert f"adapters.baseDigest={DIGEST}" in upgrade
    assert "adapters on base" in capfd.readouterr().out
    (record,) = releases(location)
    assert record["mode"] == "adapters" and record["base_model_digest"] == DIGEST
    # Dropping the kept values: the adapter-only v1 cannot be deployed merged.
    assert deploy.main(["--release", "assistant", "--namespace", "serving", "--reset-values"]) == 2
    assert "v1 carries only an adapter" in capfd.readouterr().err


def test_adapters_mode_with_remote_code_is_refused(published, capsys):
    """The shared base's code is not pinned by digest (sec's rule for remote code): refused, named, before helm runs."""
    _, _, tmp = published
    values = _values(tmp, serving={"mode": "adapters"})
    assert deploy.main(["--release", "assistant", "-f", str(values), "--dry-run", "--trust-remote-code"]) == 2
    assert "serving.mode=adapters with remote code" in capsys.readouterr().err
