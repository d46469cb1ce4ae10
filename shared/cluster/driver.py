"""``make train``: run the pipeline's stages in order, here as processes or on a cluster as Jobs.

    python -m shared.cluster.driver --target local --config configs/smollm2-135m-cpu.yaml \
        --input configs/data/legal_qa_sample.csv --run-id sample --model-name legal-assistant
    make train INPUT="a.csv b.jsonl:0.5"        # several inputs (PATH:WEIGHT samples one)
    python -m shared.cluster.driver --config lora.yaml --base-model ./chatglm3-6b --set training_args.max_steps=200 ...

Locally each stage is the same ``python -m jobs.<stage>`` its image runs, with the same
environment (``LAWTUNE_*``), so what works here works as a Job. Stages whose inputs are
unchanged skip themselves, so re-running is cheap and resumes where a run stopped.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shared.core.cli import MODEL_ENV, STAGE_ENV, command_parser, error_line
from shared.core.config import add_config_arguments, config_from_args
from shared.core.errors import EXIT_CONFIG, EXIT_OK, ConfigError
from shared.data.inputs import parse_input
from shared.core.log import configure_logging
from shared.cluster.summary import summarize
from shared.core.settings import Settings, load_settings

log = logging.getLogger("lawtune.driver")


@dataclass(frozen=True)
class Step:
    stage: str
    args: tuple[str, ...]


def plan(config: str, input_uri: str | list[str], model_name: str, base_model: str | None = None,
         sets: tuple[str, ...] = (), trust_remote_code: bool = False) -> list[Step]:
    """The stages of one run, in order, with the flags each takes (design.md's stage interface).

    ``base_model`` and ``sets`` (``KEY=VALUE``) override the config in every stage that reads it.
    No input: preprocess reads the config's ``preprocess.inputs``. ``trust_remote_code`` (the
    config's, as loaded) is handed to publish as its flag: publish reads only base_model of the
    config, and its remote code is the operator's explicit switch."""
    inputs = [input_uri] if isinstance(input_uri, str) else input_uri
    overrides = (*(("--base-model", base_model) if base_model else ()), *(a for s in sets for a in ("--set", s)))
    return [
        Step("preprocess", (*(a for i in inputs for a in ("--input", i)), "--config", config, *overrides)),
        Step("finetune", ("--config", config, *overrides)),
        Step("evaluate", ("--config", config, *overrides, "--model-name", model_name)),
        Step("publish", ("--config", config, *overrides, "--model-name", model_name,
                         *(("--trust-remote-code",) if trust_remote_code else ()))),
    ]


def _absolute(path_or_uri: str) -> str:
    """A local input as an absolute path (stages may run elsewhere), its ``:WEIGHT`` kept."""
    if "://" in path_or_uri:
        return path_or_uri
    spec = parse_input(path_or_uri)
    return str(Path(spec.uri).resolve()) + (f":{spec.weight:g}" if spec.weight != 1.0 else "")


def run_local(settings: Settings, steps: list[Step]) -> int:
    env = {**os.environ, "LAWTUNE_RUN_ID": settings.run_id, "LAWTUNE_ARTIFACT_ROOT": settings.artifact_root}
    for number, step in enumerate(steps, 1):
        cmd = [sys.executable, "-m", f"jobs.{step.stage}", *step.args]
        log.info("[%d/%d] %s: %s", number, len(steps), step.stage, " ".join(cmd[1:]))
        started = time.monotonic()
        code = subprocess.call(cmd, env=env)
        elapsed = time.monotonic() - started
        if code != EXIT_OK:
            kind = "bad input or configuration (fix it, then re-run)" if code == EXIT_CONFIG else "a runtime failure (re-run to resume)"
            log.error("%s failed after %.0fs with exit code %d: %s; the line above says why", step.stage, elapsed, code, kind)
            return code
        log.info("[%d/%d] %s finished in %.0fs", number, len(steps), step.stage, elapsed)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("train", __doc__, module="shared.cluster.driver",
                            env=(*STAGE_ENV, *MODEL_ENV, "MLFLOW_TRACKING_URI", "LAWTUNE_K8S_*", "KUBECONFIG"))
    parser.add_argument("--target", choices=("local", "k8s"), default="local",
                        help="local: each stage as a process here (default); k8s: each stage as a Job on the cluster")
    add_config_arguments(parser, required=True, base_model="override")
    parser.add_argument("--input", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="CSV, JSON(L), Parquet, saved dataset folder, or URI; repeat for several "
                             "(default: the config's preprocess.inputs)")
    parser.add_argument("--run-id", default=None, help="the run's folder name (default: LAWTUNE_RUN_ID, else dev)")
    parser.add_argument("--model-name", metavar="NAME", default="legal-assistant",
                        help="publish as models/<name>/ and compare with its PROMOTED version (default legal-assistant)")
    parser.add_argument("--values", metavar="FILE", action="append", default=[],
                        help="pipeline chart values file, repeatable (--target k8s)")
    parser.add_argument("--namespace", default=None, help="Kubernetes namespace (--target k8s; default: the kube context's)")
    args = parser.parse_args(argv)

    overrides = {"run_id": args.run_id} if args.run_id else {}
    try:
        settings = load_settings(**overrides)
    except ConfigError as exc:  # e.g. a --run-id that cannot be a path segment and a label
        print(error_line("train", exc), file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level)
    log.info("run %s → %s", settings.run_id, settings.run_uri())

    if args.target == "k8s":
        if args.base_model or args.set:
            # The pipeline chart ships the config file as it is; an override would be lost on the way.
            print(error_line("train", f"--base-model/--set (BASE_MODEL/SET) apply to --target local only; write them into "
                                      f"{args.config} for k8s"), file=sys.stderr)
            return EXIT_CONFIG
        from shared.cluster.k8s import run_pipeline

        if len(args.input) != 1:
            print(error_line("train", f"--target k8s takes one --input (got {len(args.input)}); list several as s3:// URIs "
                                      "in the config's preprocess.inputs"), file=sys.stderr)
            return EXIT_CONFIG
        return run_pipeline(
            settings,
            config_path=args.config,
            input_uri=args.input[0],
            run_id=settings.run_id,
            model_name=args.model_name,
            values_files=args.values,
            namespace=args.namespace,
        )

    try:
        config = config_from_args(args)  # a bad config or override fails here, before any stage starts
    except ConfigError as exc:
        print(error_line("train", exc), file=sys.stderr)
        return EXIT_CONFIG
    log.info("base model %s (from %s)", config.base_model, config.origin("base_model"))
    steps = plan(_absolute(args.config), [_absolute(i) for i in args.input], args.model_name, args.base_model,
                 tuple(args.set), config.trust_remote_code)
    code = run_local(settings, steps)
    if code == EXIT_OK:
        summarize(settings, args.model_name)
    return code


if __name__ == "__main__":
    sys.exit(main())
