"""jobs/publish.py with publish.artifact adapter|both: what a version carries, the base in the store, refusals.

A tiny config-initialised Llama stands in for the base (loads in under a second), on both store
backends (file:// and SeaweedFS S3); the bundled model is served from such versions in
tests/shared/serve/test_adapters_serving.py.
"""

from __future__ import annotations

import json

import pytest
import yaml

from jobs import publish
from shared.core.errors import ConfigError
from shared.core.settings import load_settings
from shared.store.artifacts import read_manifest
from shared.store.serving import base_uri
from shared.store.storage import open_location
from shared.train.models import weights_digest
from tests.lora_fixtures import commit_finetune, commit_verdict, make_tiny_model


@pytest.fixture(scope="module")
def tiny_model(bundled_model_dir, module_tmp):
    return make_tiny_model(bundled_model_dir, module_tmp("tiny") / "model")


def _run(settings, tiny_model, tmp_path, run_id="r1", *, passed=True, **finetune):
    settings = settings.model_copy(update={"run_id": run_id})
    ft = commit_finetune(settings, settings.run_uri("finetune"), tiny_model, str(tiny_model), tmp_path / run_id, **finetune)
    commit_verdict(settings, settings.run_uri("evaluate"), passed, tmp_path / run_id, ft.digest)
    return settings


@pytest.fixture
def settings(artifact_root, monkeypatch):
    monkeypatch.setenv("LAWTUNE_RUN_ID", "r1")
    return load_settings()


def test_adapter_version_carries_the_adapter_and_its_base_identity(settings, tiny_model, tmp_path):
    settings = _run(settings, tiny_model, tmp_path)
    result = publish.run(settings, "legal", artifact="adapter")
    manifest = read_manifest(open_location(result.version_uri, settings))
    files = {f.path for f in manifest.files}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "lawtune-model.json"} <= files
    assert not any(f.endswith(".safetensors") and not f.startswith("adapter/") for f in files), "no merged weights"
    digest = weights_digest(tiny_model)
    adapter = manifest.extra["adapter"]
    assert manifest.extra["artifact"] == "adapter" and result.artifact == "adapter"
    assert adapter["base_model_digest"] == digest and adapter["base"] == f"bases/{digest}"
    assert (adapter["r"], adapter["modules"], adapter["max_lora_rank_checked"]) == (8, 4, 16)
    # The base it is served on is committed in the store, verified like any artifact.
    base = read_manifest(open_location(base_uri(settings.artifact_root, digest), settings))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.path for f in base.files}
    assert base.stage == "base" and base.inputs == {"base_model_digest": digest}
    assert result.promoted


def test_both_carries_merged_weights_and_adapter_and_a_second_adapter_reuses_the_base(settings, tiny_model, tmp_path):
    first = publish.run(_run(settings, tiny_model, tmp_path, "r1"), "legal", artifact="both", max_shard_size="1MB")
    files = {f.path for f in first.manifest.files}
    assert "adapter/adapter_model.safetensors" in files and any(f.startswith("model") and f.endswith(".safetensors") for f in files)
    assert first.manifest.extra["merge_check"]["max_abs_logit_diff"] <= 1e-3
    base_loc = open_location(base_uri(settings.artifact_root, weights_digest(tiny_model)), settings)
    uploaded_at = read_manifest(base_loc).finished_at

    second = publish.run(_run(settings, tiny_model, tmp_path, "r2", seed=1), "legal", artifact="adapter")
    assert second.version != first.version
    assert read_manifest(base_loc).finished_at == uploaded_at, "the same base is uploaded once"


def test_the_same_run_published_as_merged_and_as_adapter_is_two_versions(settings, tiny_model, tmp_path):
    settings = _run(settings, tiny_model, tmp_path)
    merged = publish.run(settings, "legal", max_shard_size="1MB")
    adapter = publish.run(settings, "legal", artifact="adapter")
    assert merged.version != adapter.version and not adapter.skipped
    assert publish.run(settings, "legal", artifact="adapter").skipped


def test_the_config_says_what_to_publish(settings, tiny_model, tmp_path, capsys):
    _run(settings, tiny_model, tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"publish": {"artifact": "adapter"}}))
    assert publish.main(["--model-name", "legal", "--config", str(config)]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("(adapter)")
    # --artifact wins over the config; --set reaches it like every stage's config.
    assert publish.main(["--model-name", "legal", "--config", str(config), "--set", "publish.artifact=both",
                         "--max-shard-size", "1MB"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("(both)")


@pytest.mark.parametrize(("finetune", "flags", "needle"), [
    pytest.param({"r": 32}, ["--set", "publish.max_lora_rank=16"], "rank 32 is above the server's max_lora_rank 16", id="rank"),
    pytest.param({"extra": {"base_model_digest": "0" * 64}}, [], "base mismatch: finetune trained the adapter on base weights "
                 "sha256 000000000000", id="base-changed-since-training"),
])
def test_a_refused_adapter_exits_2_naming_why_and_writes_nothing(settings, tiny_model, tmp_path, capsys, finetune, flags, needle):
    _run(settings, tiny_model, tmp_path, **finetune)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"publish": {"artifact": "both"}}))
    assert publish.main(["--model-name", "legal", "--config", str(config), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lawtune publish: error: ") and needle in err[-1], err[-1]
    models = open_location(settings.models_uri("legal"), settings)
    assert not [f for f in models.list_files() if f.endswith("MANIFEST.json")] and not models.exists("PROMOTED")
    assert not open_location(f"{settings.artifact_root}/bases", settings).list_files()


def test_an_adapter_on_another_base_than_the_promoted_ones_is_refused(settings, tiny_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    publish.run(_run(settings, tiny_model, tmp_path, "r1"), "legal", artifact="adapter")
    other = shutil.copytree(tiny_model, tmp_path / "other-base")  # same shapes, other weights: another base
    weights = load_file(other / "model.safetensors")
    save_file({k: v + 0.01 if k.endswith("q_proj.weight") else v for k, v in weights.items()}, other / "model.safetensors",
              metadata={"format": "pt"})
    s2 = settings.model_copy(update={"run_id": "r2"})
    ft = commit_finetune(s2, s2.run_uri("finetune"), other, str(other), tmp_path / "r2")
    commit_verdict(s2, s2.run_uri("evaluate"), True, tmp_path / "r2", ft.digest)
    with pytest.raises(ConfigError, match=r"base mismatch: .*/legal/r1-\w+ \(PROMOTED\) serves adapters on base sha256"):
        publish.run(s2, "legal", artifact="adapter")
    # The same run merged is fine: a merged model carries its own base.
    assert publish.run(s2, "legal", max_shard_size="1MB").version


def test_provenance_file_says_what_the_version_carries(settings, tiny_model, tmp_path):
    result = publish.run(_run(settings, tiny_model, tmp_path), "legal", artifact="adapter")
    provenance = json.loads(open_location(result.version_uri, settings).read_text("lawtune-model.json"))
    assert provenance["artifact"] == "adapter" and provenance["merge_check"] is None
    assert provenance["adapter"]["base_model_digest"] == weights_digest(tiny_model)


def test_publish_promote_false_publishes_without_moving_promoted(settings, tiny_model, tmp_path, capsys, monkeypatch):
    """For a version to be canaried first: the gate passed, PROMOTED stays."""
    publish.run(_run(settings, tiny_model, tmp_path, "r1"), "legal", artifact="adapter")
    before = open_location(settings.models_uri("legal"), settings).read_text("PROMOTED")
    _run(settings, tiny_model, tmp_path, "r2", seed=1)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"publish": {"artifact": "adapter", "promote": False}}))
    monkeypatch.setenv("LAWTUNE_RUN_ID", "r2")
    assert publish.main(["--model-name", "legal", "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == ["gate: PASSED", f"PROMOTED: not promoted: {settings.models_uri('legal')}/PROMOTED"]
    assert open_location(settings.models_uri("legal"), settings).read_text("PROMOTED") == before
