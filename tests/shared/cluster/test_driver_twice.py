"""`make train` twice in a row (the local driver, two runs): the second run is compared with the first, in production."""

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
    assert v1 and v1.startswith("one-")

    second = _train("two", path, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Compared with production: {root}/models/legal/{v1}" in second.stdout
    evaluate = open_location(load_settings(artifact_root=root, run_id="two").run_uri("evaluate"), settings)
    metrics = json.loads(evaluate.read_text("metrics.json"))
    assert metrics["production_version"] == v1 and set(metrics["production"]) == set(metrics["tuned"])
    assert metrics["golden"]["examples"] == 3 and "production" in metrics["golden"]
    md = evaluate.read_text("report.md")
    assert "| Metric | Base (微调前) | Production (PROMOTED) | Candidate (微调后) | Δ vs base | Δ vs production |" in md
    assert any(c["kind"] == "min_improvement_over_promoted" for c in metrics["gate"]["checks"])
    events = registry.history(models)
    assert events[0]["to"] == v1 and events[0]["run_id"] == "one"
