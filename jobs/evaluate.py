"""Evaluate: base vs fine-tuned answers on the test split, scores, report and quality gate.

    python -m jobs.evaluate --config configs/smollm2-135m-cpu.yaml
    python -m jobs.evaluate --data s3://b/runs/r1/data --finetune s3://b/runs/r1/finetune \\
        --output s3://b/runs/r1/evaluate --config configs/x.yaml

Environment: ``LAWTUNE_ARTIFACT_ROOT``, ``LAWTUNE_RUN_ID``, ``LAWTUNE_S3_ENDPOINT_URL``,
``LAWTUNE_CACHE_DIR`` (shared/core/settings.py); AWS credentials the standard way.

Inputs: the committed ``data/`` (its test split, ``data_config.test_file``) and
``finetune/`` (``adapter/``, ``training_summary.json``; the base model is the one its
manifest names). Both are verified against their manifests.

Output (default ``<artifact_root>/runs/<run_id>/evaluate/``): ``predictions.jsonl`` (id,
question, reference, base and tuned answers, per-example scores), ``metrics.json``
(``{"base", "tuned", "delta", "gate", ...}``), ``report.md``, ``report.html``,
``loss_curves.png``, and ``MANIFEST.json`` last with ``extra = {"gate": {...}}``. Skipped
when data, finetune, the evaluation-relevant config and the code version are unchanged.

Exit codes: 0 whatever the gate says (its verdict is data for publish); 1 storage/runtime
failure (retry); 2 bad config, missing/corrupt inputs or an empty test split. The last
stdout lines name the report and the verdict: ``report: <uri>`` and ``gate: PASSED|FAILED``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.store.artifacts import Manifest, read_manifest
from shared.core.config import TrainConfig, add_config_arguments, config_from_args
from shared.data.conversation import SchemaError, load_jsonl
from shared.data.split_files import split_file
from shared.core.errors import DataError
from shared.evaluate.gate import evaluate_gate
from shared.evaluate.generation import generate_answers, prompt_turns
from shared.core.job import run_main
from shared.core.log import configure_logging
from shared.evaluate.metrics import METRICS
from shared.evaluate.metrics import evaluate as score_all
from shared.evaluate.report import ReportInput, write_report
from shared.core.settings import Settings, load_settings
from shared.store.stage import StageOutput, fetch_stage
from shared.store.storage import open_location

STAGE = "evaluate"
log = logging.getLogger("lawtune.evaluate")


@dataclass
class Result:
    manifest: Manifest
    skipped: bool
    output_uri: str
    gate: dict[str, Any]

    @property
    def report_uri(self) -> str:
        return f"{self.output_uri}/report.html"


def _load_test(path: Path, name: str, limit: int | None) -> list[dict[str, Any]]:
    try:
        records = load_jsonl(path.read_text(encoding="utf-8").splitlines())
    except (SchemaError, ValueError) as exc:
        raise DataError(f"test split {name}: {exc}") from None
    if not records:
        raise DataError(f"test split {name} has no examples; nothing to evaluate (raise preprocess.min_test)")
    return records[:limit] if limit else records


def _question(turns: list[dict[str, str]]) -> str:
    return next(t["content"] for t in reversed(turns) if t["role"] == "user")


def run(settings: Settings, config: TrainConfig, data_uri: str | None = None, finetune_uri: str | None = None,
        output_uri: str | None = None, *, force: bool = False) -> Result:
    from shared.train.models import resolve_base_model

    data_uri = data_uri or settings.run_uri("data")
    finetune_uri = finetune_uri or settings.run_uri("finetune")
    output_uri = output_uri or settings.run_uri(STAGE)
    data_manifest = read_manifest(open_location(data_uri, settings))
    ft_manifest = read_manifest(open_location(finetune_uri, settings))
    base_ref = ft_manifest.extra.get("base_model") or config.base_model
    inputs = {
        "data": data_manifest.digest,
        "finetune": ft_manifest.digest,
        "config": config.section_digest("evaluation", "data_config", "max_input_length", "seed"),
    }
    with StageOutput(settings, STAGE, output_uri, inputs, force=force) as out:
        if out.skipped:
            return Result(out.skipped, True, output_uri, out.skipped.extra.get("gate", {}))
        ev = config.evaluation
        with tempfile.TemporaryDirectory(prefix="evaluate-in-", dir=out.workdir.parent) as scratch:
            scratch = Path(scratch)
            test_name = split_file(data_manifest.extra, config.data_config, "test", data_uri)
            fetch_stage(settings, data_uri, scratch / "data", only=[test_name])
            wanted = [f.path for f in ft_manifest.files if f.path.startswith("adapter/") or f.path == "training_summary.json"]
            fetch_stage(settings, finetune_uri, scratch / "finetune", only=wanted)
            adapter = scratch / "finetune" / "adapter"
            if not (adapter / "adapter_config.json").is_file():
                raise DataError(f"{finetune_uri} has no adapter/adapter_config.json; not a finetune artifact")
            summary_path = scratch / "finetune" / "training_summary.json"
            summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}

            records = _load_test(scratch / "data" / test_name, f"{data_uri}/{test_name}", ev.max_examples)
            turns, refs = zip(*(prompt_turns(r["conversations"]) for r in records))
            trust = bool(ft_manifest.extra.get("trust_remote_code", config.trust_remote_code))  # as finetune ran it
            base_dir = resolve_base_model(base_ref, settings, trust)
            log.info("generating answers to %d test question(s) with %s (+ adapter)", len(records), base_ref)
            answers = generate_answers(
                base_dir, adapter, list(turns), ev.generation, backend=ev.backend, batch_size=ev.batch_size,
                max_input_length=config.max_input_length, seed=config.seed, trust_remote_code=trust,
            )
        base_metrics, base_rows = score_all(answers.base, refs)
        tuned_metrics, tuned_rows = score_all(answers.tuned, refs)
        gate = evaluate_gate(ev.gate, base_metrics, tuned_metrics)
        _write_outputs(out.workdir, records, turns, refs, answers, base_rows, tuned_rows)
        metrics = {
            "base": base_metrics, "tuned": tuned_metrics,
            "delta": {k: tuned_metrics[k] - base_metrics[k] for k in tuned_metrics},
            "gate": gate, "examples": len(records), "backend": answers.backend, "base_model": base_ref,
            "best_step": ft_manifest.extra.get("best_step", summary.get("best_step")),
            "generation": ev.generation.model_dump(), "metric_definitions": {m: "mean per-example score, 0-100" for m in METRICS},
        }
        (out.workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        samples = [{"question": _question(t), "reference": r, "base": b, "tuned": u}
                   for t, r, b, u in zip(turns, refs, answers.base, answers.tuned)][: ev.report_samples]
        facts = {"run": settings.run_id, "base model": base_ref, "adapter": f"{finetune_uri}/adapter",
                 "test examples": len(records), "backend": answers.backend,
                 "decoding": "sampling" if ev.generation.do_sample else "greedy",
                 "max new tokens": ev.generation.max_new_tokens}
        write_report(ReportInput(base_metrics, tuned_metrics, gate, samples, summary, facts), out.workdir)
        manifest = out.commit(extra={"gate": gate})
        return Result(manifest, False, output_uri, gate)


def _write_outputs(workdir: Path, records, turns, refs, answers, base_rows, tuned_rows) -> None:
    with open(workdir / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for rec, t, ref, base, tuned, bs, ts in zip(records, turns, refs, answers.base, answers.tuned, base_rows, tuned_rows):
            row = {"id": rec["id"], "question": _question(t), "prompt": t, "reference": ref, "base": base, "tuned": tuned,
                   "scores": {"base": bs, "tuned": ts}}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="data artifact URI (default <artifact_root>/runs/<run_id>/data)")
    parser.add_argument("--finetune", help="finetune artifact URI (default <artifact_root>/runs/<run_id>/finetune)")
    parser.add_argument("--output", help="output URI (default <artifact_root>/runs/<run_id>/evaluate)")
    add_config_arguments(parser, required=True)  # its evaluation section applies
    parser.add_argument("--force", action="store_true", help="run even when the same inputs are committed")
    args = parser.parse_args(argv)

    def body() -> None:
        settings = load_settings()
        configure_logging(settings.log_level)
        result = run(settings, config_from_args(args), args.data, args.finetune, args.output, force=args.force)
        print(f"report: {result.report_uri}")
        print(f"gate: {'PASSED' if result.gate.get('passed') else 'FAILED'}")
        for reason in result.gate.get("reasons", []):
            print(f"  - {reason}")

    return run_main("evaluate", body)


if __name__ == "__main__":
    raise SystemExit(main())
