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

import importlib.util
import logging
import os
import socket
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


# -- MLflow: a view for users who run a tracking server (the artifact store stays the record)

EXPERIMENT = "lawtune"  # when neither MLFLOW_EXPERIMENT_NAME nor MLFLOW_EXPERIMENT_ID names one
PROBE_TIMEOUT_S = 5.0
# mlflow's own patience is 7 retries at backoff factor 2 and a 120 s timeout: about 4 minutes a
# call. A tracking server that died mid-run held a finished, committed finetune for over 10
# minutes (each later call waits again). A view is not worth that: about 7 s of retries and 10 s
# a request, unless the user set these variables.
HTTP_PATIENCE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
FINETUNE_ARTIFACTS = ("training_summary.json", "config.yaml", "metrics.jsonl")
EVALUATE_ARTIFACTS = ("report.md", "report.html", "metrics.json")


def _unreachable(uri: str) -> str | None:
    """Why an http(s) tracking URI cannot be reached (one TCP connect), or None.

    mlflow retries a refused connection with backoff for minutes; one quick connect decides
    before any of that. Other URIs (a local folder, ``databricks``) are left to mlflow.
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):  # requests (so mlflow) goes through it
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def _connect():
    """The mlflow module, pointed at MLFLOW_TRACKING_URI and the experiment; None (with one warning) when off."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    try:
        import mlflow
    except ImportError:
        log.warning("MLFLOW_TRACKING_URI is set but the mlflow client is not installed (pip install 'lawtune[mlflow]'); "
                    "not logging to MLflow")
        return None
    for key, value in HTTP_PATIENCE.items():
        os.environ.setdefault(key, value)
    problem = _unreachable(uri)
    if problem:
        log.warning("MLflow at %s is unreachable (%s); not logging to it, the artifact store has everything", uri, problem)
        return None
    try:
        mlflow.set_tracking_uri(uri)  # explicitly: transformers' callback keeps a URI it set once
        if not os.environ.get("MLFLOW_EXPERIMENT_ID"):
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
    except Exception as exc:  # reachable but refusing (auth, not an MLflow server, ...)
        _warn_failed(exc)
        return None
    return mlflow


def _tags(run_id: str, stage: str, key: str, artifact_uri: str) -> dict[str, str]:
    return {"lawtune.run_id": run_id, "lawtune.stage": stage, "lawtune.inputs": key, "lawtune.artifact": artifact_uri}


def _warn_failed(exc: BaseException) -> None:
    log.warning("logging to MLflow failed (%s: %s); the artifact store has everything", type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "")


class TrainingTracker:
    """One MLflow run for one finetune (``<run_id>-finetune``), fed live by transformers' MLflowCallback.

    The run is opened on rank 0 when training starts. A retry of the same inputs (preemption,
    a crash) re-attaches to the run the earlier attempt opened (tags ``lawtune.run_id``,
    ``lawtune.stage``, ``lawtune.inputs``) and logs only steps after the last one it holds:
    the steps replayed from the checkpoint keep their first values in MLflow (metrics.jsonl
    has the replayed ones). Any MLflow failure logs one warning and turns tracking off for the
    rest of the stage.
    """

    def __init__(self, run_id: str, key: str, params: dict[str, Any], artifact_uri: str):
        self.name = f"{run_id}-finetune"
        self.tags = _tags(run_id, "finetune", key, artifact_uri)
        self.params = params
        self.mlflow = None  # set while a run is open
        self.logged_through = 0  # the last step an earlier attempt logged
        self.logged_keys: set[str] = set()  # the metrics it logged
        self.callbacks = [self._callback()]

    @classmethod
    def from_env(cls, run_id: str, key: str, params: dict[str, Any], artifact_uri: str) -> "TrainingTracker | None":
        """A tracker when MLFLOW_TRACKING_URI is set and the client is installed, else None."""
        if not os.environ.get("MLFLOW_TRACKING_URI") or os.environ.get("DISABLE_MLFLOW_INTEGRATION", "").upper() == "TRUE":
            return None
        if importlib.util.find_spec("mlflow") is None:
            _connect()  # says why once
            return None
        return cls(run_id, key, params, artifact_uri)

    def start(self) -> bool:
        """Open (or re-attach to) the run; True when it is open and the caller should log params."""
        mlflow = _connect()
        if mlflow is None:
            return False
        try:
            filters = " and ".join(f"tags.\"{k}\" = '{v}'" for k, v in self.tags.items() if k != "lawtune.artifact")
            earlier = mlflow.search_runs(filter_string=filters, max_results=1, order_by=["attributes.start_time DESC"],
                                         output_format="list")
            if earlier:
                run = mlflow.start_run(run_id=earlier[0].info.run_id)
                client = mlflow.MlflowClient()
                self.logged_keys = set(run.data.metrics)
                self.logged_through = max((m.step for key in self.logged_keys for m in client.get_metric_history(run.info.run_id, key)),
                                          default=0)
                log.info("MLflow: continuing run %s (%s) after step %d", self.name, run.info.run_id, self.logged_through)
            else:
                mlflow.start_run(run_name=self.name, tags=self.tags)
                mlflow.log_params({k: str(v)[:6000] for k, v in self.params.items()})
        except Exception as exc:
            _warn_failed(exc)
            return False
        self.mlflow = mlflow
        return not earlier

    def fail(self, exc: BaseException) -> None:
        _warn_failed(exc)
        self._end("FAILED")

    def _end(self, status: str) -> None:
        mlflow, self.mlflow = self.mlflow, None
        if mlflow is not None:
            try:
                mlflow.end_run(status)
            except Exception:  # the warning was given; an unreachable server must not fail the stage here either
                pass

    @contextmanager
    def training(self):
        """Marks the MLflow run KILLED (preempted: a retry continues it) or FAILED when training raises."""
        from shared.train.training import Preempted

        try:
            yield
        except BaseException as exc:
            self._end("KILLED" if isinstance(exc, (Preempted, KeyboardInterrupt)) else "FAILED")
            raise

    def finish(self, folder: Path, metrics: dict[str, float]) -> None:
        """The run's summary metrics (once: a retry's run may hold them) and files, then FINISHED.

        Called after the stage committed its artifact: the view follows the record."""
        mlflow = self.mlflow
        if mlflow is None:
            return
        try:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k not in self.logged_keys})
            for name in FINETUNE_ARTIFACTS:
                if (folder / name).is_file():
                    mlflow.log_artifact(str(folder / name))
            mlflow.end_run()  # waits for the callback's asynchronous batches
            self.mlflow = None
        except Exception as exc:
            self.fail(exc)

    def _callback(self):
        from transformers.integrations import MLflowCallback

        tracker = self

        class LawtuneMLflowCallback(MLflowCallback):
            """transformers' MLflowCallback on the run the tracker opened, never failing training."""

            def setup(self, args, state, model):
                self._initialized = True  # one attempt, whatever happens
                if not state.is_world_process_zero:
                    return
                fresh = tracker.start()
                if tracker.mlflow is None:
                    return
                if not fresh:  # the earlier attempt logged the parameters; mlflow refuses a changed value
                    self._async_log = True
                    return
                try:
                    super().setup(args, state, model)  # TrainingArguments and the model's config as params
                except Exception as exc:
                    tracker.fail(exc)

            def on_log(self, args, state, control, logs, model=None, **kwargs):
                if not self._initialized:
                    self.setup(args, state, model)
                if tracker.mlflow is None or state.global_step <= tracker.logged_through:
                    return
                try:
                    super().on_log(args, state, control, logs, model=model, **kwargs)
                except Exception as exc:
                    tracker.fail(exc)

            def on_train_end(self, args, state, control, **kwargs):
                pass  # the stage ends the run after its artifact is committed (TrainingTracker.finish)

        return LawtuneMLflowCallback()


def log_evaluation_to_mlflow(run_id: str, key: str, folder: Path, metrics: dict[str, Any], artifact_uri: str) -> None:
    """One MLflow run ``<run_id>-evaluate`` per evaluation: its params, scores (test split, golden set, deltas,
    gate) and report files. A forced re-evaluation is a new MLflow run."""
    mlflow = _connect()
    if mlflow is None:
        return
    scores = _flat_scores(metrics)
    for name, delta in (("vs_base", metrics.get("delta")), ("vs_production", metrics.get("delta_vs_production"))):
        scores.update({f"delta_{name}/{k}": v for k, v in (delta or {}).items()})
    gate = metrics.get("gate") or {}
    params = {"base_model": metrics.get("base_model"), "production_version": metrics.get("production_version"),
              "examples": metrics.get("examples"), "backend": metrics.get("backend"), "best_step": metrics.get("best_step"),
              **{f"generation.{k}": v for k, v in (metrics.get("generation") or {}).items()}}
    try:
        with mlflow.start_run(run_name=f"{run_id}-evaluate",
                              tags={**_tags(run_id, "evaluate", key, artifact_uri),
                                    "lawtune.gate": "PASSED" if gate.get("passed") else "FAILED"}):
            mlflow.log_params({k: str(v) for k, v in params.items()})
            mlflow.log_metrics({k: float(v) for k, v in scores.items() if isinstance(v, (int, float))})
            for name in EVALUATE_ARTIFACTS:
                if (folder / name).is_file():
                    mlflow.log_artifact(str(folder / name))
    except Exception as exc:
        _warn_failed(exc)
