"""jobs/publish.py: versions, the gate-controlled PROMOTED pointer, --force, idempotence.

The promotion logic runs on a tiny config-initialised model (fast, file and S3); the whole
evaluate → publish → fetch → serve path on the bundled model lives in test_pipeline_e2e.py.
"""

from __future__ import annotations


import pytest

from jobs import publish
from shared.publish.registry import history
from shared.store.artifacts import read_manifest
from shared.core.settings import load_settings
from shared.store.storage import open_location
from tests.lora_fixtures import commit_finetune, commit_verdict, make_tiny_model


@pytest.fixture(scope="module")
def tiny_model(bundled_model_dir, module_tmp):
    return make_tiny_model(bundled_model_dir, module_tmp("tiny") / "model")


@pytest.fixture
def run_artifacts(artifact_root, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LAWTUNE_RUN_ID", "r1")  # main() reads settings from the environment
    settings = load_settings()
    finetune = commit_finetune(settings, settings.run_uri("finetune"), tiny_model, str(tiny_model), tmp_path)
    return settings, tmp_path, finetune


def _promoted(settings, name="legal"):
    loc = open_location(settings.models_uri(name), settings)
    return loc.read_text("PROMOTED") if loc.exists("PROMOTED") else None


def test_failed_gate_publishes_but_keeps_promoted(run_artifacts, caplog):
    settings, tmp, finetune = run_artifacts
    open_location(settings.models_uri("legal"), settings).write_text("PROMOTED", "older-version")
    commit_verdict(settings, settings.run_uri("evaluate"), False, tmp, finetune.digest)
    result = publish.run(settings, "legal", max_shard_size="1MB")
    assert not result.gate_passed and not result.promoted and not result.forced
    assert _promoted(settings) == "older-version"
    manifest = read_manifest(open_location(result.version_uri, settings))
    assert manifest.extra["gate"]["passed"] is False
    assert manifest.extra["merge_check"]["max_abs_logit_diff"] <= 1e-3
    assert any(f.path.endswith(".safetensors") for f in manifest.files)
    assert "gate FAILED" in caplog.text and "PROMOTED stays at older-version" in caplog.text


def test_passed_gate_moves_promoted_and_republishing_is_a_no_op(run_artifacts):
    settings, tmp, finetune = run_artifacts
    open_location(settings.models_uri("legal"), settings).write_text("PROMOTED", "older-version")
    commit_verdict(settings, settings.run_uri("evaluate"), True, tmp, finetune.digest)
    first = publish.run(settings, "legal", max_shard_size="1MB")
    assert first.version.startswith("r1-") and len(first.version) == len("r1-") + 10
    assert first.promoted and not first.skipped
    assert _promoted(settings) == first.version
    [record] = history(open_location(settings.models_uri("legal"), settings))
    assert record["from"] == "older-version" and record["to"] == first.version and record["kind"] == "promote"
    assert record["run_id"] == "r1" and record["gate"]["passed"] is True and record["actor"]

    files_before = open_location(first.version_uri, settings).list_files()
    second = publish.run(settings, "legal", max_shard_size="1MB")
    assert second.skipped and second.version == first.version
    assert second.manifest.finished_at == first.manifest.finished_at, "nothing re-merged or re-uploaded"
    assert open_location(first.version_uri, settings).list_files() == files_before
    assert _promoted(settings) == first.version


def test_force_promotes_a_failed_gate_loudly(run_artifacts, caplog):
    settings, tmp, finetune = run_artifacts
    commit_verdict(settings, settings.run_uri("evaluate"), False, tmp, finetune.digest)
    result = publish.run(settings, "legal", force=True, max_shard_size="1MB")
    assert result.forced and result.promoted and not result.gate_passed
    assert "--force: PROMOTING" in caplog.text and "ALTHOUGH ITS QUALITY GATE FAILED" in caplog.text
    [record] = history(open_location(settings.models_uri("legal"), settings))
    assert record["kind"] == "forced" and record["to"] == result.version == _promoted(settings)


def test_cli_prints_model_gate_and_promotion(run_artifacts, capsys):
    settings, tmp, finetune = run_artifacts
    commit_verdict(settings, settings.run_uri("evaluate"), False, tmp, finetune.digest)
    assert publish.main(["--model-name", "legal", "--force", "--max-shard-size", "1MB"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"model: {settings.models_uri('legal')}/r1-")
    assert out[1:] == ["gate: FAILED", f"PROMOTED: promoted (FORCED): {settings.models_uri('legal')}/PROMOTED"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        pytest.param(["--model-name", "Bad Name"], "--model-name 'Bad Name'", id="bad-name"),
        pytest.param(["--model-name", "legal", "--evaluate", "file:///nonexistent/evaluate"], "has no MANIFEST.json", id="no-evaluate"),
        pytest.param(["--model-name", "legal", "--evaluate", "OTHER"], "evaluated another finetune artifact", id="other-runs-verdict"),
    ],
)
def test_bad_input_exits_2_with_one_line(run_artifacts, capsys, args, needle):
    settings, tmp, _ = run_artifacts
    if "OTHER" in args:  # a passing verdict, but of some other finetune artifact
        other = f"{settings.run_uri()}/other-evaluate"
        commit_verdict(settings, other, True, tmp, "0" * 64)
        args = [other if a == "OTHER" else a for a in args]
    assert publish.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lawtune publish: error: ") and needle in err[-1]
    assert _promoted(settings) is None


def test_a_finetune_manifest_path_outside_the_scratch_folder_is_exit_2(run_artifacts, capsys):
    """issue 24 item 1: publish fetches the adapter files the finetune manifest lists into a scratch folder."""
    import hashlib
    import json

    settings, tmp, finetune = run_artifacts
    loc = open_location(settings.run_uri("finetune"), settings)
    manifest = json.loads(loc.read_text("MANIFEST.json"))
    entry = next(f for f in manifest["files"] if f["path"].startswith("adapter/"))
    manifest["files"].append({**entry, "path": "adapter/../../../../../escaped"})
    text = json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=True) + "\n"  # Manifest.to_json's form
    loc.write_text("MANIFEST.json", text)
    # A passing verdict on exactly this artifact, so only the path check stands between it and the fetch.
    commit_verdict(settings, settings.run_uri("evaluate"), True, tmp, hashlib.sha256(text.encode()).hexdigest())
    assert publish.main(["--model-name", "legal"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("lawtune publish: error: ") and "'adapter/../../../../../escaped'" in line and "climbs out" in line
    assert _promoted(settings) is None
    assert not list(tmp.parent.rglob("escaped"))


def test_two_publishes_racing_end_with_one_winner(artifact_root, tiny_model, tmp_path):
    """Two real `jobs.publish` processes of two runs, both evaluated against "nothing promoted", start together."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    for run in ("r1", "r2"):
        settings = load_settings(run_id=run)
        ft = commit_finetune(settings, settings.run_uri("finetune"), tiny_model, str(tiny_model), tmp_path / run)
        commit_verdict(settings, settings.run_uri("evaluate"), True, tmp_path / run, ft.digest, compared_with=None)
    repo = Path(__file__).resolve().parents[2]
    procs = {run: subprocess.Popen([sys.executable, "-m", "jobs.publish", "--model-name", "legal", "--max-shard-size", "1MB"],
                                   cwd=repo, env={**os.environ, "LAWTUNE_RUN_ID": run}, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for run in ("r1", "r2")}
    outcome = {run: (p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for run, p in procs.items()}
    codes = sorted(code for code, _, _ in outcome.values())
    assert codes == [0, 1], outcome
    winner = next(run for run, (code, _, _) in outcome.items() if code == 0)
    loser_err = next(err for code, _, err in outcome.values() if code == 1).strip().splitlines()[-1]
    promoted = _promoted(load_settings())
    assert promoted.startswith(f"{winner}-")
    assert loser_err.startswith("lawtune publish: error: ") and f"moved to {promoted}" in loser_err and "the other promotion won" in loser_err
    events = history(open_location(load_settings().models_uri("legal"), load_settings()))
    assert [(e["from"], e["to"]) for e in events] == [(None, promoted)]


def test_an_older_run_does_not_move_promoted_backwards_without_force(artifact_root, tiny_model, tmp_path, caplog):
    import time

    runs = {}
    for run in ("r1", "r2"):  # r1's finetune finishes first: it is the older run
        time.sleep(1.1 if runs else 0)  # manifests' times have whole seconds
        settings = load_settings(run_id=run)
        ft = commit_finetune(settings, settings.run_uri("finetune"), tiny_model, str(tiny_model), tmp_path / run)
        commit_verdict(settings, settings.run_uri("evaluate"), True, tmp_path / run, ft.digest)
        runs[run] = settings
    newer = publish.run(runs["r2"], "legal", max_shard_size="1MB")
    older = publish.run(runs["r1"], "legal", max_shard_size="1MB")
    assert newer.promoted and older.gate_passed and not older.promoted
    assert _promoted(runs["r1"]) == newer.version
    assert f"{older.version} was trained before the promoted {newer.version}: PROMOTED stays" in caplog.text
    forced = publish.run(runs["r1"], "legal", force=True, max_shard_size="1MB")
    assert forced.promoted and _promoted(runs["r1"]) == older.version
    events = history(open_location(runs["r1"].models_uri("legal"), runs["r1"]))
    assert [(e["kind"], e["to"]) for e in events] == [("promote", newer.version), ("forced", older.version)]
