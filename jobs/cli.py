"""``lawtune``: one command for every stage and tool, the same code as ``python -m jobs.<stage>``.

    lawtune --help
    lawtune train --config configs/smollm2-135m-cpu.yaml --input configs/data/legal_qa_sample.csv
    lawtune preprocess --input my.csv --config configs/smollm2-135m-cpu.yaml
    lawtune serve --model-name legal-assistant
    lawtune deploy --release assistant -f my-values.yaml

Each subcommand hands the rest of the command line to that module's ``main(argv)``: same flags,
same exit codes (0 ok, 1 retry, 2 bad input or configuration). Modules are imported only when
their subcommand runs, so ``lawtune --help`` starts in a blink.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module whose main(argv) runs it, one line for --help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("shared.cluster.driver", "run the whole pipeline, here (local) or as Kubernetes Jobs (--target k8s)"),
    "preprocess": ("jobs.preprocess", "CSV/JSON/JSONL/Parquet (one or more) -> cleaned, de-duplicated train/dev/test chat JSONL"),
    "finetune": ("jobs.finetune", "LoRA fine-tuning with checkpoints, resume and the best checkpoint"),
    "evaluate": ("jobs.evaluate", "base vs fine-tuned answers, ROUGE/BLEU, report and quality gate"),
    "publish": ("jobs.publish", "merge the adapter, publish a model version, promote it if the gate passed"),
    "fetch-model": ("jobs.fetch_model", "download a published model version, verified, all or nothing"),
    "models": ("jobs.models", "list published versions, promote one, roll back PROMOTED, canary a challenger (models list|promote|rollback|canary)"),
    "lineage": ("jobs.lineage", "input file -> data -> finetune -> evaluate -> published version, with URIs"),
    "serve": ("shared.serve.serve_local", "serve the promoted model here: vLLM-CPU behind the gateway"),
    "deploy": ("shared.serve.deploy", "install/upgrade the serving chart with the promoted version pinned for the release"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lawtune <command> [flags]   (lawtune <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Each command is also `python -m <module>` (jobs.preprocess, shared.cluster.driver, ...)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lawtune: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
