"""Run tracking: TensorBoard event files inside the artifacts, and MLflow when the user has a server.

TensorBoard: finetune writes ``finetune/tensorboard/`` from the Trainer's log history (training
loss, learning rate, grad norm, tokens/s, dev loss, by step); evaluate writes its scores into
``evaluate/tensorboard/``. Written from the history after training, so a run resumed after
preemption still gets one complete, ordered set of curves (the history travels in checkpoints).

MLflow: only when ``MLFLOW_TRACKING_URI`` is set and the ``mlflow`` client is installed; one
MLflow run per stage, named ``<run_id>-<stage>``, tagged with the lawtune run id. Its failures
are logged and never fail a stage: tracking is a view, the artifact store is the record.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Trainer log keys -> TensorBoard tags
_TRAIN_TAGS = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
               "tokens_per_s": "train/tokens_per_s", "eval_loss": "dev/loss"}


def _writer(folder: Path):
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(folder))


def log_training(folder: Path, log_history: list[dict[str, Any]]) -> None:
    """TensorBoard scalars of every step the Trainer logged."""
    writer = _writer(folder)
    try:
        for record in log_history:
            step = record.get("step")
            if step is None:
                continue
            for key, tag in _TRAIN_TAGS.items():
                if isinstance(record.get(key), (int, float)):
                    writer.add_scalar(tag, record[key], step)
    finally:
        writer.close()


def _flat_scores(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for model in ("base", "production", "tuned"):
        for name, value in (metrics.get(model) or {}).items():
            out[f"test/{model}/{name}"] = value
        for name, value in ((metrics.get("golden") or {}).get(model) or {}).items():
            out[f"golden/{model}/{name}"] = value
    out["gate/passed"] = 1.0 if (metrics.get("gate") or {}).get("passed") else 0.0
    return out


def log_scores(folder: Path, metrics: dict[str, Any], step: int = 0) -> None:
    """Evaluate's scores (test split and golden set, each model) as TensorBoard scalars."""
    writer = _writer(folder)
    try:
        for tag, value in _flat_scores(metrics).items():
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()


def _mlflow():
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    try:
        import mlflow
    except ImportError:
        log.warning("MLFLOW_TRACKING_URI is set but the mlflow client is not installed; not logging to MLflow")
        return None
    return mlflow


def log_training_to_mlflow(run_id: str, params: dict[str, Any], log_history: list[dict[str, Any]], folder: Path) -> None:
    mlflow = _mlflow()
    if mlflow is None:
        return
    try:
        with mlflow.start_run(run_name=f"{run_id}-finetune", tags={"lawtune.run_id": run_id, "lawtune.stage": "finetune"}):
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            for record in log_history:
                step = record.get("step")
                values = {k: float(record[k]) for k in _TRAIN_TAGS if isinstance(record.get(k), (int, float))}
                if step is not None and values:
                    mlflow.log_metrics(values, step=int(step))
            for name in ("training_summary.json", "config.yaml"):
                if (folder / name).is_file():
                    mlflow.log_artifact(str(folder / name))
    except Exception as exc:  # tracking is a view; the stage's artifact is the record
        log.warning("logging to MLflow failed (%s: %s); the artifact store has everything", type(exc).__name__, exc)


def log_evaluation_to_mlflow(run_id: str, folder: Path, metrics: dict[str, Any]) -> None:
    mlflow = _mlflow()
    if mlflow is None:
        return
    try:
        with mlflow.start_run(run_name=f"{run_id}-evaluate", tags={"lawtune.run_id": run_id, "lawtune.stage": "evaluate"}):
            mlflow.log_params({"base_model": metrics.get("base_model"), "production_version": metrics.get("production_version"),
                               "examples": metrics.get("examples")})
            mlflow.log_metrics({k.replace("/", "."): float(v) for k, v in _flat_scores(metrics).items()})
            for name in ("report.html", "report.md", "metrics.json"):
                if (folder / name).is_file():
                    mlflow.log_artifact(str(folder / name))
    except Exception as exc:
        log.warning("logging to MLflow failed (%s: %s); the artifact store has everything", type(exc).__name__, exc)
