"""MLflow tracking (shared/train/tracking.py) against a real tracking server on loopback.

The module starts ``mlflow server`` (sqlite backend, local artifact folder) on a free
127.0.0.1 port, runs ``python -m jobs.finetune`` and ``python -m jobs.evaluate`` on the
bundled model the way a user does (MLFLOW_TRACKING_URI in the environment), and reads the
runs back through the MLflow client. Work is tiny: 4 optimizer steps, 2 test questions.
"""

from __future__ import annotations

import http.server
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shared.core.settings import Settings
from shared.store.artifacts import commit_dir, now_iso
from shared.store.storage import open_location
from tests.conftest import FIXTURES, REPO
from tests.jobs.test_finetune import BUNDLED_CONFIG, start_until_checkpoint, write_config

pytestmark = pytest.mark.integration

CONFIG = {**BUNDLED_CONFIG,
          "evaluation": {"generation": {"max_new_tokens": 6}, "batch_size": 2, "backend": "transformers", "max_examples": 2}}


@pytest.fixture(scope="module")
def mlflow_server(module_tmp):
    try:  # mlflow-skinny (the client) has an mlflow.server package too; the server is the full distribution
        importlib.metadata.distribution("mlflow")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the MLflow tracking server (PyPI mlflow) is not installed: lawtune[dev] has it (make venv)")
    from tests.servers import start_mlflow

    server = start_mlflow(module_tmp("mlflow-server"))
    yield server
    server.stop()


def _commit_data(settings: Settings) -> None:
    folder = settings.cache_dir.parent / f"data-{settings.run_id}"
    folder.mkdir(parents=True)
    chat = FIXTURES / "chat"
    (folder / "train.jsonl").write_text("".join((chat / "train.jsonl").read_text(encoding="utf-8").splitlines(True)[:6]),
                                        encoding="utf-8")
    for split in ("dev", "test"):
        shutil.copy(chat / f"{split}.jsonl", folder / f"{split}.jsonl")
    commit_dir(folder, open_location(settings.run_uri("data"), settings), stage="data", inputs={"fixture": 6}, started_at=now_iso())


def _stage(stage: str, config: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"jobs.{stage}", "--config", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def _run_env(tmp_path: Path, model_cache_dir: Path, run_id: str, tracking_uri: str) -> tuple[Settings, dict[str, str]]:
    root = f"file://{tmp_path / 'artifacts'}"
    settings = Settings(artifact_root=root, run_id=run_id, cache_dir=tmp_path / "cache")
    env = {**os.environ, "LAWTUNE_ARTIFACT_ROOT": root, "LAWTUNE_RUN_ID": run_id, "LAWTUNE_CACHE_DIR": str(model_cache_dir),
           "MLFLOW_TRACKING_URI": tracking_uri}
    _commit_data(settings)
    return settings, env


def test_finetune_and_evaluate_log_params_curves_scores_and_report_once_per_step(
        mlflow_server, bundled_model_dir, model_cache_dir, tmp_path):
    from mlflow import MlflowClient

    settings, env = _run_env(tmp_path, model_cache_dir, "tracked", mlflow_server.uri)
    config = write_config(tmp_path / "c.yaml", CONFIG)
    first = _stage("finetune", config, env)
    assert first.returncode == 0, first.stderr[-3000:]

    # A crash after step 4's checkpoint but before the stage's manifest: the retry resumes from
    # step-2, replays steps 3 and 4, and continues the same MLflow run without logging them twice.
    finetune_dir = tmp_path / "artifacts" / "runs" / "tracked" / "finetune"
    (finetune_dir / "MANIFEST.json").unlink()
    shutil.rmtree(finetune_dir / "checkpoints" / "step-4")
    retry = _stage("finetune", config, env)
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert "resuming from committed checkpoint step-2" in retry.stderr
    assert "MLflow: continuing run tracked-finetune" in retry.stderr

    evaluated = _stage("evaluate", config, env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("lawtune")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id], "tags.\"lawtune.run_id\" = 'tracked'")}
    assert set(runs) == {"tracked-finetune", "tracked-evaluate"}, "one MLflow run per stage, the retry included"
    ft, ev = runs["tracked-finetune"], runs["tracked-evaluate"]
    assert ft.info.status == ev.info.status == "FINISHED"
    assert ft.data.tags["lawtune.stage"] == "finetune" and ev.data.tags["lawtune.stage"] == "evaluate"
    assert ft.data.tags["lawtune.artifact"] == settings.run_uri("finetune")

    # Params: lawtune's own, and TrainingArguments through transformers' MLflowCallback.
    p = ft.data.params
    assert p["base_model"] == "bundled:smollm2-135m-instruct" and p["lora_r"] == "4" and p["lora_alpha"] == "8"
    assert p["learning_rate"] == "0.003" and p["max_steps"] == "4" and p["per_device_train_batch_size"] == "2"

    # Curves by step, each step once, equal to the artifact's metrics.jsonl.
    records = [json.loads(line) for line in (finetune_dir / "metrics.jsonl").read_text().splitlines()]
    for key, steps in (("loss", [1, 2, 3, 4]), ("learning_rate", [1, 2, 3, 4]), ("grad_norm", [1, 2, 3, 4]),
                       ("eval_loss", [2, 4])):
        history = sorted(client.get_metric_history(ft.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == steps, f"{key}: {[(m.step, m.value) for m in history]}"
        expected = {r["step"]: r[key] for r in records if key in r}
        assert [m.value for m in history] == pytest.approx([expected[s] for s in steps], abs=1e-4), key
    summary = json.loads((finetune_dir / "training_summary.json").read_text())
    assert ft.data.metrics["best_dev_loss"] == pytest.approx(summary["best_dev_loss"])
    assert len(client.get_metric_history(ft.info.run_id, "best_dev_loss")) == 1
    assert {a.path for a in client.list_artifacts(ft.info.run_id)} == {"training_summary.json", "config.yaml", "metrics.jsonl"}

    # Evaluate: its scores, the gate and the report as artifacts.
    evaluate_dir = tmp_path / "artifacts" / "runs" / "tracked" / "evaluate"
    metrics = json.loads((evaluate_dir / "metrics.json").read_text())
    m = ev.data.metrics
    for side in ("base", "tuned"):
        for name, value in metrics[side].items():
            assert m[f"test/{side}/{name}"] == pytest.approx(value), (side, name)
    assert m["delta_vs_base/rouge-l"] == pytest.approx(metrics["delta"]["rouge-l"])
    assert m["gate/passed"] == (1.0 if metrics["gate"]["passed"] else 0.0)
    assert ev.data.params["base_model"] == "bundled:smollm2-135m-instruct" and ev.data.params["examples"] == "2"
    assert {a.path for a in client.list_artifacts(ev.info.run_id)} == {"report.md", "report.html", "metrics.json"}
    downloaded = Path(client.download_artifacts(ev.info.run_id, "metrics.json", str(tmp_path / "dl")))
    assert downloaded.read_bytes() == (evaluate_dir / "metrics.json").read_bytes()


def test_unreachable_server_leaves_both_stages_succeeding_with_one_warning_each(bundled_model_dir, model_cache_dir, tmp_path):
    from tests.servers import free_port

    nobody = f"http://127.0.0.1:{free_port()}"
    settings, env = _run_env(tmp_path, model_cache_dir, "untracked", nobody)
    small = {**CONFIG, "training_args": {**CONFIG["training_args"], "max_steps": 2},
             "evaluation": {**CONFIG["evaluation"], "max_examples": 1, "generation": {"max_new_tokens": 2}}}
    config = write_config(tmp_path / "c.yaml", small)
    for stage in ("finetune", "evaluate"):
        done = _stage(stage, config, env)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = [line for line in done.stderr.splitlines() if re.search("mlflow", line, re.I)]  # no retries, no mlflow noise
        assert len(lines) == 1 and " WARNING " in lines[0] and f"MLflow at {nobody} is unreachable" in lines[0], lines
        assert open_location(settings.run_uri(stage), settings).exists("MANIFEST.json")


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers every request 403, as a tracking server behind auth the stage has no credentials for."""

    def _refuse(self):
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error_code": "PERMISSION_DENIED", "message": "no credentials"}')

    do_GET = do_POST = do_PATCH = do_PUT = _refuse

    def log_message(self, *args):
        pass


def test_a_server_that_refuses_gives_one_warning_and_no_exception(tmp_path, monkeypatch, caplog):
    from shared.train.tracking import log_evaluation_to_mlflow

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
        (tmp_path / "metrics.json").write_text("{}")
        with caplog.at_level(logging.WARNING, logger="shared.train.tracking"):
            log_evaluation_to_mlflow("r1", "0123456789ab", tmp_path, {"tuned": {"rouge-l": 1.0}, "gate": {"passed": True}}, "file:///x")
    finally:
        server.shutdown()
        server.server_close()
    ours = [r for r in caplog.records if r.name == "shared.train.tracking"]
    assert len(ours) == 1 and "logging to MLflow failed" in ours[0].getMessage() and "PERMISSION_DENIED" in ours[0].getMessage(), ours


def _runs(client, run_id: str) -> list:
    experiment = client.get_experiment_by_name("lawtune")
    return client.search_runs([experiment.experiment_id], f"tags.\"lawtune.run_id\" = '{run_id}'")


def _steps(client, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def test_under_torchrun_only_rank_0_opens_and_feeds_the_run(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from tests.tiny import tiny_data_dir, tiny_model_dir

    model = tiny_model_dir(tmp_path / "model")
    root = f"file://{tmp_path / 'artifacts'}"
    settings = Settings(artifact_root=root, run_id="ddp-tracked", cache_dir=tmp_path / "cache")
    commit_dir(tiny_data_dir(tmp_path / "data", 8, 3), open_location(settings.run_uri("data"), settings), stage="data", inputs={},
               started_at=now_iso())
    config = write_config(tmp_path / "c.yaml", {
        "base_model": str(model), "max_input_length": 32, "max_output_length": 16,
        "training_args": {"max_steps": 4, "save_steps": 2, "eval_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 2},
        "peft_config": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    })
    env = {**os.environ, "LAWTUNE_ARTIFACT_ROOT": root, "LAWTUNE_RUN_ID": "ddp-tracked", "LAWTUNE_CACHE_DIR": str(tmp_path / "cache"),
           "MLFLOW_TRACKING_URI": mlflow_server.uri}
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "jobs.finetune", "--config", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not re.search("mlflow.*(warn|fail|error)", proc.stderr, re.I), proc.stderr[-3000:]

    client = MlflowClient(mlflow_server.uri)
    runs = _runs(client, "ddp-tracked")
    assert [r.info.run_name for r in runs] == ["ddp-tracked-finetune"], "rank 1 opens no run of its own"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert _steps(client, run, "loss") == [1, 2, 3, 4], "each step logged once, not once per rank"
    assert _steps(client, run, "eval_loss") == [2, 4]
    assert run.data.params["max_steps"] == "4"


def test_sigterm_marks_the_run_killed_and_the_retry_finishes_the_same_run(mlflow_server, bundled_model_dir, model_cache_dir,
                                                                           tmp_path):
    import signal

    from mlflow import MlflowClient

    settings, env = _run_env(tmp_path, model_cache_dir, "preempted", mlflow_server.uri)
    config = write_config(tmp_path / "c.yaml", {**CONFIG, "training_args": {**CONFIG["training_args"], "save_steps": 1}})
    proc, out = start_until_checkpoint(config, env, settings)
    proc.send_signal(signal.SIGTERM)  # what Kubernetes sends on eviction or preemption
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "SIGTERM" in stderr.strip().splitlines()[-1], stderr[-2000:]

    client = MlflowClient(mlflow_server.uri)
    [killed] = _runs(client, "preempted")
    assert killed.info.status == "KILLED", "a preempted run is not FAILED: its retry continues it"
    logged = _steps(client, killed, "loss")
    assert logged and logged[-1] < 4

    retry = _stage("finetune", config, env)
    assert retry.returncode == 0, retry.stderr[-3000:]
    [finished] = _runs(client, "preempted")
    assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
    assert _steps(client, finished, "loss") == [1, 2, 3, 4], "the retry adds the steps after the last one logged, once each"


def test_a_server_that_dies_mid_run_does_not_hold_the_finished_stage(bundled_model_dir, model_cache_dir, tmp_path):
    """mlflow's default patience (7 retries, backoff factor 2, 120 s a request) held a finetune that
    had committed its artifact for over 11 minutes after the server died, call after call: a Job
    that never ends. Bounded, it ends ~30 s after the death on 2 cores (5 more steps included)."""
    import signal

    from shared.store.artifacts import MANIFEST
    from tests.servers import start_mlflow

    server = start_mlflow(tmp_path / "mlflow-server")
    try:
        settings, env = _run_env(tmp_path, model_cache_dir, "orphaned", server.uri)
        config = write_config(tmp_path / "c.yaml", {**CONFIG, "training_args": {**CONFIG["training_args"], "save_steps": 1,
                                                                                 "max_steps": 6}})
        proc, out = start_until_checkpoint(config, env, settings)
    finally:
        server.stop()
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        pytest.fail("the stage was still running 180 s after its tracking server died")
    assert proc.returncode == 0, stderr[-3000:]
    assert out.exists(MANIFEST)
    assert "WARNING shared.train.tracking: logging to MLflow failed" in stderr, stderr[-3000:]
