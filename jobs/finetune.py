"""Finetune: LoRA SFT of the config's base model on the preprocessed chat data.

    python -m jobs.finetune --config configs/smollm2-135m-cpu.yaml
    python -m jobs.finetune --data s3://bucket/runs/r1/data --output s3://bucket/runs/r1/finetune --config configs/x.yaml
    torchrun --nproc-per-node 2 -m jobs.finetune --config configs/qwen2.5-7b-instruct-lora.yaml   # DDP; rank 0 writes

Environment: ``LAWTUNE_ARTIFACT_ROOT``, ``LAWTUNE_RUN_ID``, ``LAWTUNE_CACHE_DIR`` (the bundled
model and downloaded base models are cached there), ``LAWTUNE_S3_ENDPOINT_URL``; AWS
credentials the standard way; ``HF_HUB_OFFLINE=1`` where no model hub is reachable.

Input (default ``<artifact_root>/runs/<run_id>/data/``): ``train.jsonl`` and ``dev.jsonl``
(names from ``data_config``), verified against the data manifest.

Output (default ``<artifact_root>/runs/<run_id>/finetune/``): ``adapter/`` (the checkpoint
with the lowest dev loss, peft format), ``training_summary.json``, ``metrics.jsonl`` (one
JSON per logging/eval event), ``tensorboard/`` (the same curves as TensorBoard events),
``config.yaml`` (the config used), ``checkpoints/step-<N>/`` (each committed with its own
manifest), and ``MANIFEST.json`` last, whose ``extra`` holds ``base_model`` (and
``base_model_from``: ``--base-model``, ``LAWTUNE_BASE_MODEL``, ``config`` or ``default``,
whichever won), ``base_model_digest`` (sha256 over its weight files), ``config_digest``,
``data_uri``, ``trust_remote_code``, ``remote_code`` (with trust_remote_code: every ``*.py`` of
the base model's folder -> sha256, the only code later stages run; shared/store/model_code.py)
and ``best_step``. With ``MLFLOW_TRACKING_URI`` set and
the MLflow client installed (``lawtune[mlflow]``), params, the curves (live, by step) and the
summary files also go to one MLflow run ``<run_id>-finetune`` (shared/train/tracking.py). The stage
is skipped when the data manifest, the training config sections and the code version match the
committed manifest; otherwise it resumes from the newest committed checkpoint of the same inputs.

Exit codes: 0 done or skipped; 1 preempted (SIGTERM: checkpoint committed, retry resumes) or
storage failure; 2 bad config, data or base model (one line on stderr names it).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import yaml

from shared.core.cli import MODEL_ENV, STAGE_ENV, command_parser
from shared.core.config import TrainConfig, add_config_arguments, config_from_args
from shared.core.errors import LawtuneError
from shared.core.job import run_main
from shared.core.log import configure_logging
from shared.core.settings import Settings, load_settings

STAGE = "finetune"
# Sections that change what training produces; editing evaluation/preprocess keys does not re-train.
CONFIG_SECTIONS = ("base_model", "trust_remote_code", "seed", "max_input_length", "max_output_length", "data_config", "training_args", "peft_config")
log = logging.getLogger("lawtune.finetune")


@dataclass
class Result:
    output_uri: str
    skipped: bool
    best_step: int | None = None
    best_dev_loss: float | None = None
    steps_completed: int | None = None
    resumed_from: int | None = None


def run(settings: Settings, config: TrainConfig, data_uri: str | None = None, output_uri: str | None = None,
        hooks=None) -> Result:
    from shared.store.artifacts import digest_inputs, read_manifest
    from shared.data.split_files import split_file
    from shared.train.models import needs_remote_code, resolve_base_model, weights_digest
    from shared.store.model_code import RECORD, code_files
    from shared.store.stage import StageOutput, fetch_stage
    from shared.store.storage import open_location

    data_uri = data_uri or settings.run_uri("data")
    output_uri = output_uri or settings.run_uri(STAGE)
    data_manifest = read_manifest(open_location(data_uri, settings))  # metadata only: enough to decide a skip
    inputs = {"data": data_manifest.digest, "config": config.section_digest(*CONFIG_SECTIONS)}

    with StageOutput(settings, STAGE, output_uri, inputs) as out:
        if out.skipped:
            return Result(output_uri, True, out.skipped.extra.get("best_step"))
        base_from = config.origin("base_model")
        log.info("base model %s (from %s)", config.base_model, base_from)
        splits = [split_file(data_manifest.extra, config.data_config, role, data_uri) for role in ("train", "dev")]
        model_dir = resolve_base_model(config.base_model, settings, config.trust_remote_code)  # fails before the data is read

        from shared.train.fast.speedups import training_hooks
        from shared.train.tracking import TrainingTracker, log_training
        from shared.train.training import CheckpointStore, Hooks, export_best, precision, train

        # The GPU fast path unless training_args.fast_path says otherwise; plain on CPU. It patches
        # transformers' own model classes, so a model running its repository's code (ChatGLM3) trains plain.
        device = precision(config).device
        if hooks is None and needs_remote_code(model_dir) and config.training_args.fast_path == "auto":
            log.info("fast path off: %s runs its repository's own modeling code", config.base_model)
            hooks = Hooks()
        hooks = hooks or training_hooks(config, device, settings.cache_dir)

        # Same path on every rank of a node (the Trainer's checkpoints); per inputs, so runs never mix.
        local = settings.cache_dir / "work" / f"{STAGE}-{settings.run_id}-{digest_inputs(out.inputs)[:12]}"
        with tempfile.TemporaryDirectory(prefix="finetune-data-", dir=out.workdir.parent) as scratch:
            data_dir = Path(scratch) / "data"
            fetch_stage(settings, data_uri, data_dir, only=splits)
            store = CheckpointStore.of(out)
            tracker = TrainingTracker.from_env(settings.run_id, digest_inputs(out.inputs)[:12], _params(config, inputs),
                                               output_uri)
            with tracker.training() if tracker else nullcontext():
                result = train(config, model_dir, data_dir, local, store, hooks, callbacks=tracker.callbacks if tracker else None)
        if not result.is_main:
            return Result(output_uri, False, steps_completed=result.steps_completed)

        if result.best_step is None:
            raise LawtuneError(f"no committed checkpoint under {store.root.uri} after training")
        export_best(store, result.best_step, out.workdir / "adapter")
        summary = result.summary(config.base_model)
        summary["base_model_from"] = config.origin("base_model")
        if device == "cuda":
            import torch

            # What a smaller card must hold: the peak of this process's training on its GPU.
            summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
            summary["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 1024**3, 2)
            log.info("peak GPU memory: %.2f GiB allocated, %.2f GiB reserved", summary["peak_gpu_memory_gib"],
                     summary["peak_gpu_reserved_gib"])
        (out.workdir / "training_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        with open(out.workdir / "metrics.jsonl", "w", encoding="utf-8") as fh:
            for record in result.log_history:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        (out.workdir / "config.yaml").write_text(
            yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True), encoding="utf-8"
        )
        log_training(out.workdir / "tensorboard", result.log_history)
        out.commit(extra={"base_model": config.base_model, "base_model_from": base_from,
                          "trust_remote_code": config.trust_remote_code, "best_step": result.best_step,
                          # The code that ran, by digest: evaluate, publish and serving run only these files.
                          RECORD: code_files(model_dir) if config.trust_remote_code else None,
                          "base_model_digest": weights_digest(model_dir), "config_digest": inputs["config"],
                          "data_uri": data_uri})
        if tracker:  # the view after the record
            tracker.finish(out.workdir, {k: summary.get(k) for k in ("best_dev_loss", "best_step", "steps_completed", "tokens_seen")})
        shutil.rmtree(local, ignore_errors=True)
        log.info(
            "best checkpoint step-%s (dev loss %s) exported as %s/adapter after %d steps",
            result.best_step, "n/a" if result.best_dev_loss is None else f"{result.best_dev_loss:.4f}", output_uri,
            result.steps_completed,
        )
        return Result(output_uri, False, result.best_step, result.best_dev_loss, result.steps_completed, result.resumed_from)


def _params(config: TrainConfig, inputs: dict[str, str]) -> dict[str, object]:
    """lawtune's own MLflow params; transformers' callback adds TrainingArguments (learning_rate, max_steps, ...)
    and the model's config under their own names."""
    p = config.peft_config
    return {"base_model": config.base_model, "lora_r": p.r, "lora_alpha": p.lora_alpha,
            "lora_dropout": p.lora_dropout, "lora_target_modules": p.target_modules, "packing": config.training_args.packing,
            "max_input_length": config.max_input_length, "max_output_length": config.max_output_length,
            "data_digest": inputs["data"], "config_digest": inputs["config"]}


def _leave_process_group() -> None:
    # torchrun workers that exit with NCCL still up leak its resources (and torch says so).
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("finetune", __doc__, module="jobs.finetune", image=True, env=(*STAGE_ENV, *MODEL_ENV, "MLFLOW_TRACKING_URI"))
    parser.add_argument("--data", metavar="URI", help="data artifact URI (default <artifact_root>/runs/<run_id>/data)")
    parser.add_argument("--output", metavar="URI", help="output URI (default <artifact_root>/runs/<run_id>/finetune)")
    add_config_arguments(parser, required=True, reads="every section but evaluation", base_model="override")
    args = parser.parse_args(argv)

    def body() -> None:
        settings = load_settings()
        configure_logging(settings.log_level)
        try:
            result = run(settings, config_from_args(args), args.data, args.output)
        finally:
            _leave_process_group()
        if result.skipped:
            log.info("skipped: %s already holds the output of these inputs", result.output_uri)

    return run_main(STAGE, body)


if __name__ == "__main__":
    raise SystemExit(main())
