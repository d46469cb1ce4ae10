"""jobs/evaluate.py end to end on the bundled model through SeaweedFS S3.

Upstream artifacts are real committed folders: the test split and a peft LoRA adapter on the
bundled model laid out as finetune's contract says (tests/lora_fixtures.py). Generation is
capped at a few tokens: the tests check the stage's behaviour, not the answers' quality.
"""

from __future__ import annotations

import json
import re

import pytest

from jobs import evaluate
from shared.store.artifacts import read_manifest, read_verified
from shared.core.config import parse_config
from shared.core.settings import Settings
from shared.store.storage import open_location
from tests.lora_fixtures import QA, commit_data, commit_finetune, records

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bundled_run(bundled_model_dir, seaweedfs, module_tmp):
    """Settings on a fresh S3 bucket with data/ and finetune/ of run 'e2e' committed."""
    bucket = "evaluate-e2e"
    seaweedfs.client().create_bucket(Bucket=bucket)
    scratch = module_tmp("evaluate-e2e")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in seaweedfs.env().items():
            mp.setenv(key, value)
        settings = Settings(artifact_root=f"s3://{bucket}/lawtune", s3_endpoint_url=seaweedfs.endpoint, run_id="e2e",
                            cache_dir=scratch / "cache")
        commit_data(settings, settings.run_uri("data"), records(), scratch)
        commit_finetune(settings, settings.run_uri("finetune"), bundled_model_dir, str(bundled_model_dir), scratch, std=0.2)
        yield settings


def _config(**evaluation):
    defaults = {"generation": {"max_new_tokens": 6}, "batch_size": 2, "backend": "transformers"}
    return parse_config({"evaluation": defaults | evaluation})


def test_report_shows_both_models_and_the_failed_gate(bundled_run, monkeypatch, capsys, tmp_path):
    settings = bundled_run
    config = tmp_path / "eval.yaml"
    config.write_text(json.dumps({"evaluation": {"generation": {"max_new_tokens": 6}, "batch_size": 2, "backend": "transformers",
                                                 "gate": [{"metric": "rouge-l", "min": 101}]}}))
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", settings.artifact_root)
    monkeypatch.setenv("LAWTUNE_S3_ENDPOINT_URL", settings.s3_endpoint_url)
    monkeypatch.setenv("LAWTUNE_RUN_ID", settings.run_id)
    assert evaluate.main(["--config", str(config)]) == 0, "a failed gate is a verdict, not a failure"
    out = capsys.readouterr().out.splitlines()
    uri = settings.run_uri("evaluate")
    assert out[0] == f"report: {uri}/report.html"
    assert out[1] == "gate: FAILED" and out[2] == "  - a rule is shown not to hold: do not promote"
    assert out[3].startswith("  - FAIL rouge-l: candidate ")

    loc = open_location(uri, settings)
    manifest = read_manifest(loc)
    assert manifest.extra["gate"]["passed"] is False
    files = {f.path for f in manifest.files}
    assert {f for f in files if not f.startswith("tensorboard/")} == {"predictions.jsonl", "answers.jsonl", "metrics.json",
                                                                       "report.md", "report.html", "loss_curves.png"}
    assert any(f.startswith("tensorboard/events.out.tfevents.") for f in files), "evaluate's scores go to TensorBoard too"
    metrics = json.loads(read_verified(loc, "metrics.json", manifest))
    assert metrics["gate"] == manifest.extra["gate"] and metrics["examples"] == len(QA) and metrics["backend"] == "transformers"
    assert metrics["production"] is None and metrics["production_version"] is None and "golden" not in metrics
    engine = metrics["engine"]  # what generated the answers: enough to reproduce them
    assert engine["engine"] == "transformers" and engine["dtype"] == "float32" and engine["batch_size"] == 2
    assert engine["seed"] == 42 and engine["version"] and engine["device"] == "cpu"
    assert metrics["serving"]["stop_token_ids"] == [2] and metrics["serving"]["stop_tokens"] == ["<|im_end|>"]
    assert metrics["serving"]["chat_template"]["file"] == "chat_template.jinja" and metrics["serving"]["dtype"] == "float32"
    for side in ("base", "tuned"):
        assert set(metrics[side]) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "answer_chars", "empty_share", "ended_share"}
        assert all(0 <= v <= 100 for k, v in metrics[side].items() if k != "answer_chars")
    rows = [json.loads(line) for line in read_verified(loc, "predictions.jsonl", manifest).decode().splitlines()]
    assert [r["question"] for r in rows] == [q for q, _ in QA] and [r["reference"] for r in rows] == [a for _, a in QA]
    assert all(set(r["scores"]) == {"base", "tuned"} and r["set"] == "test" for r in rows)
    assert any(r["base"] != r["tuned"] for r in rows), "the adapter changes answers"
    md = read_verified(loc, "report.md", manifest).decode()
    assert "| Metric | Base (微调前) | Candidate (微调后) | Δ vs base |" in md and "## Quality gate: FAILED" in md
    assert all(q in md for q, _ in QA) and "![training and dev loss](loss_curves.png)" in md
    html = read_verified(loc, "report.html", manifest).decode()
    assert "<th>Base (微调前)</th><th>Candidate (微调后)</th>" in html and 'src="data:image/png;base64,' in html

    # Same inputs again: skipped, nothing regenerated.
    again = evaluate.run(settings, parse_config(json.loads(config.read_text())))
    assert again.skipped and again.manifest.finished_at == manifest.finished_at


def test_single_question_smaller_than_the_batch(bundled_run):
    settings = bundled_run
    out = f"{settings.run_uri()}/evaluate-single"
    result = evaluate.run(settings, _config(max_examples=1, batch_size=8, gate=[]), output_uri=out)
    rows = open_location(out, settings).read_text("predictions.jsonl").splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["question"] == QA[0][0]
    assert result.gate["passed"] is True and result.gate["checks"] == []
    assert result.gate["reasons"] == ["no gate rules configured: passes by default"]


def test_missing_finetune_is_exit_2_and_leaves_no_manifest(bundled_run, monkeypatch, capsys):
    settings = bundled_run
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", settings.artifact_root)
    monkeypatch.setenv("LAWTUNE_S3_ENDPOINT_URL", settings.s3_endpoint_url)
    out = f"{settings.run_uri()}/evaluate-orphan"
    code = evaluate.main(["--finetune", f"{settings.run_uri()}/nope", "--data", settings.run_uri("data"), "--output", out,
                          "--config", "/dev/null"])
    assert code == 2
    assert "nope has no MANIFEST.json" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not open_location(out, settings).exists("MANIFEST.json")


def test_a_finetune_manifest_path_outside_the_scratch_folder_is_exit_2(bundled_run, monkeypatch, capsys):
    """issue 24 item 1: evaluate fetches the adapter files the finetune manifest lists into a scratch folder."""
    settings = bundled_run
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", settings.artifact_root)
    monkeypatch.setenv("LAWTUNE_S3_ENDPOINT_URL", settings.s3_endpoint_url)
    hostile = open_location(f"{settings.run_uri()}/finetune-hostile", settings)
    manifest = json.loads(open_location(settings.run_uri("finetune"), settings).read_text("MANIFEST.json"))
    entry = next(f for f in manifest["files"] if f["path"] == "adapter/adapter_config.json")
    manifest["files"].append({**entry, "path": "adapter/../../../../escaped.json"})
    hostile.write_text("MANIFEST.json", json.dumps(manifest))
    out = f"{settings.run_uri()}/evaluate-hostile"
    code = evaluate.main(["--finetune", hostile.uri, "--data", settings.run_uri("data"), "--output", out, "--config", "/dev/null"])
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("lawtune evaluate: error: ") and "finetune-hostile/MANIFEST.json" in line and "'adapter/../../../../escaped.json'" in line
    assert not open_location(out, settings).exists("MANIFEST.json")


@pytest.mark.parametrize("promoted", ["../../../elsewhere", "v1/../..", "/abs"])
def test_the_production_version_an_earlier_evaluation_recorded_is_checked_like_promoted(artifact_root, promoted):
    """issue 24 item 1: PROMOTED's content is checked before it names a folder, and so is the copy of it
    an earlier evaluation recorded (its MANIFEST.json inputs.promoted), which a re-run of the run whose
    version is promoted compares with: before, `../../../elsewhere` became models/m/../../../elsewhere,
    a folder outside the model's (outside the artifact root on file://) fetched as production."""
    from shared.core.errors import ConfigError
    from shared.core.settings import load_settings
    from shared.store.artifacts import commit_dir, now_iso

    settings = load_settings()
    root = settings.models_uri("m")
    models = open_location(root, settings)
    models.child("v1").write_text("config.json", "{}")
    models.child("v1").write_text("MANIFEST.json", json.dumps({
        "schema": "lawtune.manifest/v1", "stage": "publish", "inputs": {"finetune": "ft-digest"}, "inputs_digest": "x",
        "started_at": "t", "finished_at": "t", "files": []}))
    models.write_text("PROMOTED", "v1")
    output = f"{settings.artifact_root}/runs/r/evaluate"
    earlier = open_location(output, settings)
    earlier.write_text("MANIFEST.json", json.dumps({
        "schema": "lawtune.manifest/v1", "stage": "evaluate", "inputs": {"promoted": promoted}, "inputs_digest": "x",
        "started_at": "t", "finished_at": "t", "files": []}))
    with pytest.raises(ConfigError, match=rf"evaluate/MANIFEST.json inputs.promoted holds {re.escape(repr(promoted))}; expected a version name"):
        evaluate._champion(settings, "m", "ft-digest", output)
    earlier.write_text("MANIFEST.json", earlier.read_text("MANIFEST.json").replace(json.dumps(promoted), '"v0"'))
    assert evaluate._champion(settings, "m", "ft-digest", output).uri == f"{root}/v0"


GOLDEN_CSV = """title,question,reply,is_best
试用期内公司可以随时辞退员工吗？,,不可以随时辞退。用人单位在试用期内解除劳动合同，须证明劳动者不符合录用条件并说明理由。,1
劳动仲裁的时效是多久？,,劳动争议申请仲裁的时效期间为一年，从当事人知道或者应当知道其权利被侵害之日起计算。,1
"""


def test_production_model_and_golden_set_are_scored_beside_base_and_candidate(bundled_model_dir, tmp_path, monkeypatch):
    """A PROMOTED version of the model (here the base model itself, published as v0) gets its own column and gate rule."""
    from shared.publish.registry import read_pointer
    from shared.store.artifacts import commit_dir, now_iso

    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", f"file://{tmp_path / 'artifacts'}")
    monkeypatch.setenv("LAWTUNE_RUN_ID", "r2")
    from shared.core.settings import load_settings

    settings = load_settings()
    commit_data(settings, settings.run_uri("data"), records(), tmp_path)
    commit_finetune(settings, settings.run_uri("finetune"), bundled_model_dir, str(bundled_model_dir), tmp_path, std=0.2)
    models = open_location(settings.models_uri("legal"), settings)
    commit_dir(bundled_model_dir, models.child("v0"), stage="publish", inputs={}, started_at=now_iso(), extra={"gate": {"passed": True}})
    models.write_text("PROMOTED", "v0")
    golden = tmp_path / "golden.csv"
    golden.write_text(GOLDEN_CSV, encoding="utf-8")
    config = _config(questions=str(golden), max_examples=2,
                     gate=[{"metric": "rouge-l", "min_improvement": -100, "min_improvement_over": "promoted"}])

    result = evaluate.run(settings, config, model_name="legal")
    loc = open_location(result.output_uri, settings)
    metrics = json.loads(loc.read_text("metrics.json"))
    assert metrics["production_version"] == "v0" and result.gate["promoted"] == "v0"
    # The production model is the base model, greedy decoding: the same answers, so the same scores.
    assert metrics["production"] == metrics["base"]
    assert metrics["delta_vs_production"] == metrics["delta"]
    check = result.gate["checks"][0]
    assert check["kind"] == "non_inferiority" and check["compare"] == "promoted" and result.gate["passed"]
    assert check["n"] == 4, "the gate pairs the test split's and the golden set's questions"
    assert metrics["golden"]["examples"] == 2 and set(metrics["golden"]) >= {"base", "tuned", "production", "sha256"}
    rows = [json.loads(line) for line in loc.read_text("predictions.jsonl").splitlines()]
    assert [r["set"] for r in rows] == ["test", "test", "golden", "golden"]
    assert all(r["production"] == r["base"] for r in rows)
    md = loc.read_text("report.md")
    assert "| Metric | Base (微调前) | Production (PROMOTED) | Candidate (微调后) | Δ vs base | Δ vs production |" in md
    assert "## Metrics (golden set: 2 questions" in md
    assert read_pointer(models).version == "v0"
    # The production version is an input: once another version is promoted, evaluate runs again instead of skipping.
    assert result.manifest.inputs["promoted"] == "v0" and result.manifest.inputs["golden"] == metrics["golden"]["sha256"]


def _answers(settings, uri) -> dict[tuple[str, str], str]:
    from shared.evaluate.answers import read

    return {(r.role, r.prompt): r.text for r in read(open_location(uri, settings).read_text("answers.jsonl"))}


def test_evaluation_reproduces_byte_for_byte_across_runs_and_batch_sizes(bundled_run):
    """Greedy on CPU: the same evaluation twice, and again one prompt at a time, gives the same answers."""
    settings = bundled_run
    runs = {}
    for name, batch in (("first", 3), ("again", 3), ("one-at-a-time", 1)):
        uri = f"{settings.run_uri()}/evaluate-repro-{name}"
        evaluate.run(settings, _config(generation={"max_new_tokens": 24, "repetition_penalty": 1.1}, batch_size=batch, gate=[]),
                     output_uri=uri)
        runs[name] = _answers(settings, uri)
    assert len(runs["first"]) == 2 * len(QA)
    assert runs["again"] == runs["first"], "the same evaluation twice"
    assert runs["one-at-a-time"] == runs["first"], "batch 3 (left padding) and batch 1 (none)"


def test_production_evaluated_against_itself_never_passes_superiority(bundled_model_dir, tmp_path, monkeypatch):
    """Run 'a' is published and promoted; run 'b' trains the same adapter (same seed): the candidate is the
    production model. A superiority rule over production must not pass, whether production's answers are
    reused from run a's evaluation or generated from the published folder."""
    from jobs import publish
    from shared.core.settings import load_settings

    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", f"file://{tmp_path / 'artifacts'}")
    config = _config(gate={"inconclusive": "allow_first", "rules": [
        {"metric": "rouge-l", "test": "superiority", "compare": "promoted"}]}, generation={"max_new_tokens": 12})
    for run_id in ("a", "b", "c"):
        settings = load_settings(run_id=run_id)
        commit_data(settings, settings.run_uri("data"), records(), tmp_path / run_id)
        commit_finetune(settings, settings.run_uri("finetune"), bundled_model_dir, str(bundled_model_dir), tmp_path / run_id,
                        std=0.2, seed=0)
    first = evaluate.run(load_settings(run_id="a"), config, model_name="legal")
    assert first.gate["passed"] and first.gate["first_promotion"], "nothing promoted yet: allowed as a first promotion"
    published = publish.run(load_settings(run_id="a"), "legal", max_shard_size="300MB")
    assert published.promoted

    reused = evaluate.run(load_settings(run_id="b"), config, model_name="legal")
    metrics = json.loads(open_location(reused.output_uri, load_settings(run_id="b")).read_text("metrics.json"))
    assert metrics["answers"]["reused"] == {"base": len(QA), "candidate": len(QA), "production": len(QA)}, \
        "the same adapter bit for bit: every answer comes from run a's evaluation"
    # Production's evaluation gone: its answers are generated from the published folder instead.
    import shutil

    shutil.rmtree(tmp_path / "artifacts" / "runs" / "a" / "evaluate")
    generated = evaluate.run(load_settings(run_id="c"), config, model_name="legal")
    metrics_c = json.loads(open_location(generated.output_uri, load_settings(run_id="c")).read_text("metrics.json"))
    assert metrics_c["answers"]["reused"] == {"base": 0, "candidate": 0, "production": 0}
    for result in (reused, generated):
        [check] = result.gate["checks"]
        assert check["kind"] == "superiority" and check["status"] != "pass", check
        assert result.gate["verdict"] == "inconclusive" and result.gate["passed"] is False
        assert "a model is already promoted" in result.gate["reasons"][0]
