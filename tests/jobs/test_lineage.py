"""jobs/lineage.py: a published version's chain back to its input file, on file:// and SeaweedFS.

The chain is real: preprocess runs on the shipped sample CSV, a LoRA adapter on a tiny
config-initialised model is committed as finetune's contract says (recording the data it
read), a verdict is committed for it, and publish merges and promotes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import lineage, preprocess, publish
from shared.core.config import parse_config
from shared.core.settings import load_settings
from shared.store.artifacts import commit_dir, now_iso, sha256_file
from shared.store.releases import record_release
from shared.store.storage import open_location
from tests.lora_fixtures import commit_verdict, make_adapter, make_tiny_model

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "configs" / "data" / "legal_qa_sample.csv"


@pytest.fixture(scope="module")
def tiny_model(bundled_model_dir, module_tmp):
    return make_tiny_model(bundled_model_dir, module_tmp("tiny") / "model")


@pytest.fixture
def published(artifact_root, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LAWTUNE_RUN_ID", "r1")
    settings = load_settings()
    data = preprocess.run(settings, parse_config({}), str(SAMPLE)).manifest
    folder = tmp_path / "finetune"
    make_adapter(tiny_model, folder / "adapter")
    ft = commit_dir(folder, open_location(settings.run_uri("finetune"), settings),
                    stage="finetune", inputs={"data": data.digest, "config": "c" * 64}, started_at=now_iso(),
                    extra={"base_model": str(tiny_model), "best_step": 4, "base_model_digest": "d" * 64,
                           "data_uri": settings.run_uri("data")})
    commit_verdict(settings, settings.run_uri("evaluate"), True, tmp_path, ft.digest, compared_with=None)
    result = publish.run(settings, "legal", max_shard_size="1MB")
    return settings, result, data, ft


def test_lineage_walks_from_version_to_input_file(published, capsys):
    settings, result, data, ft = published
    assert lineage.main([result.version_uri, "--json"]) == 0
    links = {link["kind"]: link for link in json.loads(capsys.readouterr().out)}
    assert list(links) == ["input", "data", "finetune", "evaluate", "version", "serving"]
    assert links["input"]["uri"] == str(SAMPLE) and links["input"]["digest"] == sha256_file(SAMPLE)
    assert links["data"]["uri"] == settings.run_uri("data") and links["data"]["digest"] == data.digest
    assert links["finetune"]["digest"] == ft.digest and links["finetune"]["facts"]["best_step"] == 4
    assert links["finetune"]["facts"]["base_model_digest"] == "d" * 64 and links["finetune"]["facts"]["config_digest"] == "c" * 64
    assert links["evaluate"]["facts"]["gate"] == "PASSED"
    assert links["version"]["uri"] == result.version_uri and links["version"]["facts"]["promoted_now"] is True
    assert [p["kind"] for p in links["version"]["facts"]["promotions"]] == ["promote"]
    assert all(link["status"] == "ok" for kind, link in links.items() if kind != "serving")
    assert links["serving"]["status"] == "not recorded"  # nothing deployed through `lawtune deploy` yet

    assert lineage.main([result.version_uri]) == 0
    text = capsys.readouterr().out
    assert f"input     {SAMPLE}" in text and f"sha256 {sha256_file(SAMPLE)}" in text and "best_step: 4" in text


def test_a_published_run_refuses_to_be_overwritten_with_other_inputs(published, tmp_path, capsys):
    settings, result, data, _ = published
    other = tmp_path / "other.csv"
    other.write_text(SAMPLE.read_text(encoding="utf-8").replace("押金", "定金"), encoding="utf-8")
    assert preprocess.main(["--input", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "belongs to a published run" in err and "use a new run id" in err
    assert lineage.main([result.version_uri, "--json"]) == 0
    links = {link["kind"]: link for link in json.loads(capsys.readouterr().out)}
    assert links["data"]["digest"] == data.digest and links["data"]["status"] == "ok", "the old link still holds"
    # The same inputs again are still a cheap skip, not a refusal.
    assert preprocess.main(["--input", str(SAMPLE)]) == 0


def test_unknown_version_exits_2_with_the_known_ones(published, capsys):
    settings, result, _, _ = published
    assert lineage.main([f"{settings.models_uri('legal')}/r9-nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lawtune lineage: error: ") and f"known versions of {settings.models_uri('legal')}: {result.version}" in err


def test_lineage_ends_at_the_releases_deploy_recorded(published, capsys):
    settings, result, _, _ = published
    models = open_location(settings.models_uri("legal"), settings)
    version = result.version_uri.rstrip("/").rsplit("/", 1)[1]
    record_release(models, release="assistant", namespace="serving", version=version, deployed_at=now_iso(), helm_revision=3)
    record_release(models, release="canary", namespace="staging", version="older", deployed_at=now_iso())
    assert lineage.main([result.version_uri, "--json"]) == 0
    serving = json.loads(capsys.readouterr().out)[-1]
    assert serving["kind"] == "serving" and serving["status"] == "ok"
    assert [(r["namespace"], r["release"], r["helm_revision"]) for r in serving["facts"]["releases"]] == [("serving", "assistant", 3)]
    assert serving["facts"]["other_releases"] == {"staging/canary": "older"}

    # Once the release moves on, this version is no longer served, and lineage says so.
    record_release(models, release="assistant", namespace="serving", version="newer", deployed_at=now_iso())
    assert lineage.main([result.version_uri, "--json"]) == 0
    serving = json.loads(capsys.readouterr().out)[-1]
    assert serving["status"] == "not deployed" and serving["facts"]["releases"] == []
