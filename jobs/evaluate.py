"""Evaluate: base vs fine-tuned answers on the test split, scores, report and quality gate.

    python -m jobs.evaluate --config configs/smollm2-135m-cpu.yaml [--model-name legal-assistant]
    python -m jobs.evaluate --data s3://b/runs/r1/data --finetune s3://b/runs/r1/finetune \\
        --output s3://b/runs/r1/evaluate --config configs/x.yaml

Environment: ``LAWTUNE_ARTIFACT_ROOT``, ``LAWTUNE_RUN_ID``, ``LAWTUNE_S3_ENDPOINT_URL``,
``LAWTUNE_CACHE_DIR`` (shared/core/settings.py); AWS credentials the standard way.

Inputs: the committed ``data/`` (its test split, ``data_config.test_file``) and
``finetune/`` (``adapter/``, ``training_summary.json``; the base model is the one its
manifest names). Both are verified against their manifests. The model's own code
(ChatGLM3) runs only when this config sets ``trust_remote_code: true`` (never because the
finetune manifest says so), and then only the code files finetune recorded by sha256.

With ``--model-name``, the model's PROMOTED version (production) answers the same prompts
too (champion/challenger; gate rules with ``compare: promoted`` compare with it).
``evaluation.questions`` names a golden set (CSV/JSONL) scored besides the test split. An
answer an earlier evaluation already gave (same model weights, decoding, engine and prompt ids:
this run's earlier evaluation, or the one that published production) is reused, not generated
(shared/evaluate/answers.py). The gate decides on the per-question scores of the questions
``evaluation.gate.questions`` names, with paired bootstrap intervals (shared/evaluate/gate.py).

Output (default ``<artifact_root>/runs/<run_id>/evaluate/``): ``answers.jsonl`` (every
model's answer to every question, with its reuse keys), ``predictions.jsonl`` (one row per
question, test split then golden set: the answers side by side, whether each ended on its own,
per-question scores), ``metrics.json`` (``{"base", "tuned", "production", "production_version",
"delta", "delta_vs_production", "golden", "gate", "engine", "answers", "serving", "parity", ...}``:
the gate's intervals, the engine/version/dtype/batch size/seed, the serving profile publish builds
the serving contract from), ``report.md``, ``report.html`` (loss plot embedded),
``loss_curves.png``, ``tensorboard/`` (the scores), and ``MANIFEST.json`` last with
``extra = {"gate": {...}, "metrics": {...}}``. With ``MLFLOW_TRACKING_URI`` set, the params,
scores and report files also go to an MLflow run ``<run_id>-evaluate`` (shared/train/tracking.py). Skipped when data, finetune, the
evaluation-relevant config, the production version, the golden set and the code version are
unchanged.

Exit codes: 0 whatever the gate says (its verdict is data for publish); 1 storage/runtime
failure (retry); 2 bad config, missing/corrupt inputs or an empty test split. The last
stdout lines name the report and the verdict: ``report: <uri>`` and ``gate: PASSED|FAILED``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.core.cli import MODEL_ENV, STAGE_ENV, command_parser
from shared.core.config import TrainConfig, add_config_arguments, config_from_args
from shared.core.errors import DataError
from shared.core.job import run_main
from shared.core.log import configure_logging
from shared.core.settings import Settings, load_settings
from shared.data.conversation import SchemaError, load_jsonl
from shared.data.split_files import split_file
from shared.evaluate import answers as answer_book
from shared.evaluate.answering import Model, add_earlier, collect, production_key, questions_of
from shared.evaluate.gate import evaluate_gate, training_checks
from shared.evaluate.golden import load_golden
from shared.evaluate.metrics import METRICS
from shared.evaluate.report import ReportInput, write_report
from shared.evaluate.scoring import score, user_question, write_predictions
from shared.publish.registry import check_name, read_pointer
from shared.store.artifacts import Manifest, digest_inputs, find_manifest, read_manifest, sha256_file
from shared.store.model_code import RECORD, check_folder
from shared.store.paths import check_version
from shared.store.stage import StageOutput, fetch_stage
from shared.store.storage import open_location
from shared.train.tracking import log_evaluation_to_mlflow, log_scores

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


def run(settings: Settings, config: TrainConfig, data_uri: str | None = None, finetune_uri: str | None = None,
        output_uri: str | None = None, *, force: bool = False, model_name: str | None = None) -> Result:
    from transformers import AutoTokenizer

    from shared.train.models import resolve_base_model

    data_uri = data_uri or settings.run_uri("data")
    finetune_uri = finetune_uri or settings.run_uri("finetune")
    output_uri = output_uri or settings.run_uri(STAGE)
    data_manifest = read_manifest(open_location(data_uri, settings))
    ft_manifest = read_manifest(open_location(finetune_uri, settings))
    base_ref = ft_manifest.extra.get("base_model") or config.base_model
    config.expect_base_model(ft_manifest.extra.get("base_model"), finetune_uri)
    ev = config.evaluation
    champion = _champion(settings, model_name, ft_manifest.digest, output_uri)
    golden = _golden_source(settings, ev.questions)
    inputs = {
        "data": data_manifest.digest,
        "finetune": ft_manifest.digest,
        "config": config.section_digest("evaluation", "data_config", "max_input_length", "seed"),
        # A new production model or an edited golden set is a new comparison.
        "promoted": champion.version if champion else None,
        "golden": golden[1] if golden else None,
    }
    with StageOutput(settings, STAGE, output_uri, inputs, force=force) as out:
        if out.skipped:
            return Result(out.skipped, True, output_uri, out.skipped.extra.get("gate", {}))
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
            golden_records = load_golden(golden[0], ev.questions, config.preprocess) if golden else []
            # The operator's config decides whether model code runs, never the artifact; and only the code finetune ran.
            trust = config.trust_remote_code
            base_dir = resolve_base_model(base_ref, settings, trust)
            if trust:
                check_folder(base_dir, ft_manifest.extra.get(RECORD), record=f"{finetune_uri}/MANIFEST.json")
            tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust)
            questions = questions_of(tokenizer, [("test", records), ("golden", golden_records)], config.max_input_length)
            log.info("answering %d test and %d golden question(s) with %s (+ adapter)", len(records), len(golden_records), base_ref)
            base_digest = ft_manifest.extra.get("base_model_digest") or f"ref:{base_ref}"
            models = [Model("base", answer_book.base_key(base_digest), base_dir),
                      Model("candidate", answer_book.adapter_key(base_digest, {f.path: f.sha256 for f in ft_manifest.files
                                                                               if f.path.startswith("adapter/")}, adapter),
                            base_dir, adapter)]
            book = answer_book.Book()
            add_earlier(book, settings, output_uri)  # an earlier evaluation of this run (e.g. before a new golden set)
            if champion:
                models.append(Model("production", production_key(settings, champion.uri, book), None))

            def fetch_production() -> tuple[Path, Path | None]:
                champion_manifest = fetch_stage(settings, champion.uri, scratch / "production")
                record = f"{champion.uri}/MANIFEST.json"
                if champion_manifest.extra.get("artifact") == "adapter":  # an adapter on its base (serving.mode=adapters)
                    prod_base = resolve_base_model(champion_manifest.extra["adapter"]["base_model"], settings, trust)
                    if trust:  # the base runs the code, and only the code the champion's finetune ran
                        check_folder(prod_base, champion_manifest.extra.get(RECORD), record=record)
                    return prod_base, scratch / "production" / "adapter"
                if trust:
                    check_folder(scratch / "production", champion_manifest.extra.get(RECORD), record=record)
                return scratch / "production", None

            rows, engine = collect(models, questions, book, ev, max_input_length=config.max_input_length, seed=config.seed,
                                   trust_remote_code=trust, tokenizer=tokenizer, production_weights=fetch_production)
        metrics, scored = score(questions, rows)
        gate_rows = {role: [r for q, r in zip(questions, per) if ev.gate.questions in ("all", q.set)] for role, per in scored.items()}
        stops = {i: tokenizer.convert_ids_to_tokens(i) for i in
                 ((summary.get("tokenization") or {}).get("train", {}).get("end_of_turn_labels") or {}).get("token_ids", [])}
        gate = evaluate_gate(ev.gate, gate_rows["base"], gate_rows["candidate"], gate_rows.get("production"), seed=config.seed,
                             training=training_checks(summary, stops))
        if model_name:  # publish checks that PROMOTED still names the model this verdict compared with
            gate["promoted"] = champion.version if champion else None
        answer_book.write(out.workdir / answer_book.ANSWERS, [r for per in rows.values() for r in per])
        write_predictions(out.workdir / "predictions.jsonl", questions, rows, scored)
        n = len(records)
        reused = {role: sum(r.reused_from is not None for r in per) for role, per in rows.items()}
        metrics.update({
            "production_version": champion.version if champion else None,
            "gate": gate, "examples": n, "backend": engine.name, "engine": engine.as_dict(), "base_model": base_ref,
            "best_step": ft_manifest.extra.get("best_step", summary.get("best_step")),
            "generation": ev.generation.model_dump(), "max_input_length": config.max_input_length,
            "answers": {"keys": {m.role: m.key for m in models}, "reused": reused, "questions": len(questions)},
            "metric_definitions": {m: "mean per-question score, 0-100" for m in METRICS},
            "parity": ev.parity.model_dump(),
            "serving": _serving_profile(base_dir, tokenizer, ev, engine, config.max_input_length),
        })
        if golden_records:
            metrics["golden"].update({"source": ev.questions, "sha256": golden[1], "examples": len(golden_records)})
        (out.workdir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        write_report(_report_input(settings, ev, metrics, questions, rows, summary, finetune_uri, champion, base_ref, engine),
                     out.workdir)
        log_scores(out.workdir / "tensorboard", metrics)
        manifest = out.commit(extra={"gate": gate, "metrics": metrics["tuned"], "production_version": metrics["production_version"]})
        log_evaluation_to_mlflow(settings.run_id, digest_inputs(out.inputs)[:12], out.workdir, metrics, output_uri)
        return Result(manifest, False, output_uri, gate)


def _serving_profile(base_dir: Path, tokenizer, ev, engine, max_input_length: int) -> dict[str, Any]:
    """What the candidate was evaluated with, for publish's serving contract and parity check: the base folder's
    template, tokenizer files and stop ids (the adapter changes none of them), the decoding, dtype and engine."""
    from shared.store.serving_contract import describe

    described = describe(base_dir)
    stops = sorted({*described["eos_token_ids"], *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
    return {**described, "stop_token_ids": stops, "stop_tokens": tokenizer.convert_ids_to_tokens(stops),
            "generation": ev.generation.model_dump(), "dtype": engine.dtype, "engine": engine.as_dict(),
            "max_input_length": max_input_length}


def _report_input(settings, ev, metrics, questions, rows, summary, finetune_uri, champion, base_ref, engine) -> ReportInput:
    texts = {role: [r.text for r in per] for role, per in rows.items()}
    test = [i for i, q in enumerate(questions) if q.set == "test"]
    samples = [{"question": user_question(questions[i].turns), "reference": questions[i].reference, "base": texts["base"][i],
                "tuned": texts["candidate"][i], **({"production": texts["production"][i]} if "production" in texts else {})}
               for i in test][: ev.report_samples]
    reused = metrics["answers"]["reused"]
    facts = {"run": settings.run_id, "base model": base_ref, "adapter": f"{finetune_uri}/adapter",
             "production model": champion.uri if champion else "none promoted yet",
             "test examples": len(test),
             "golden questions": f"{len(questions) - len(test)} ({ev.questions})" if len(questions) > len(test) else "none",
             "engine": f"{engine.name} {engine.version}, {engine.dtype} on {engine.device}"
                       + (f", batch {engine.batch_size}" if engine.batch_size else "") + f", seed {engine.seed}",
             "decoding": ("sampling" if ev.generation.do_sample else "greedy")
                         + f", repetition_penalty {ev.generation.repetition_penalty:g}",
             "max new tokens": ev.generation.max_new_tokens,
             "answers reused": ", ".join(f"{role} {count}/{len(questions)}" for role, count in reused.items()) or "none"}
    return ReportInput(metrics["base"], metrics["tuned"], metrics["gate"], samples, summary, facts,
                       production=metrics["production"], golden=metrics.get("golden"))


@dataclass(frozen=True)
class _Champion:
    version: str
    uri: str


def _champion(settings: Settings, model_name: str | None, finetune_digest: str, output_uri: str) -> _Champion | None:
    """The PROMOTED version of ``model_name``: the model the candidate must not fall behind.

    When PROMOTED was published from this very finetune artifact (the same run again, after
    its publish), the candidate would be compared with itself: keep the production model the
    committed evaluation compared with, so the re-run is the usual skip.
    """
    if not model_name:
        return None
    root = open_location(settings.models_uri(check_name(model_name)), settings)
    version = read_pointer(root).version
    if version is None:
        return None
    published = find_manifest(root.child(version))
    if published is not None and published.inputs.get("finetune") == finetune_digest:
        earlier = find_manifest(open_location(output_uri, settings))
        version = earlier.inputs.get("promoted") if earlier else None
        if version is None:
            return None
        # Read from the store like PROMOTED itself, and joined to the model's folder the same way (issue 24 item 1).
        version = check_version(str(version), f"{output_uri}/MANIFEST.json inputs.promoted")
    return _Champion(version, f"{root.uri}/{version}")


def _golden_source(settings: Settings, questions: str | None) -> tuple[Path, str] | None:
    """(a local copy of the golden set, its sha256), or None when the config names none."""
    if not questions:
        return None
    if "://" not in questions:
        path = Path(questions)
        if not path.is_file():
            raise DataError(f"evaluation.questions: {questions} does not exist (relative paths resolve against {Path.cwd()})")
    else:
        parent, name = questions.rstrip("/").rsplit("/", 1)
        path = settings.cache_dir / "golden" / name
        open_location(parent, settings).download_file(name, path)
    return path, sha256_file(path)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("evaluate", __doc__, module="jobs.evaluate", image=True, env=(*STAGE_ENV, *MODEL_ENV, "MLFLOW_TRACKING_URI"))
    parser.add_argument("--data", metavar="URI", help="data artifact URI (default <artifact_root>/runs/<run_id>/data)")
    parser.add_argument("--finetune", metavar="URI", help="finetune artifact URI (default <artifact_root>/runs/<run_id>/finetune)")
    parser.add_argument("--output", metavar="URI", help="output URI (default <artifact_root>/runs/<run_id>/evaluate)")
    add_config_arguments(parser, required=True, reads="its evaluation, data_config and preprocess sections, "
                         "max_input_length and seed", base_model="expect")
    parser.add_argument("--force", action="store_true", help="run even when the same inputs are committed")
    parser.add_argument("--model-name", metavar="NAME",
                        help="also score the PROMOTED version of this model (production) on the same questions")
    args = parser.parse_args(argv)

    def body() -> None:
        settings = load_settings()
        configure_logging(settings.log_level)
        result = run(settings, config_from_args(args), args.data, args.finetune, args.output, force=args.force,
                     model_name=args.model_name)
        print(f"report: {result.report_uri}")
        print(f"gate: {'PASSED' if result.gate.get('passed') else 'FAILED'}")
        for reason in result.gate.get("reasons", []):
            print(f"  - {reason}")

    return run_main("evaluate", body)


if __name__ == "__main__":
    raise SystemExit(main())
