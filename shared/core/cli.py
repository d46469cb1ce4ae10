"""What every ``lawtune`` command says the same way: its name, the environment it reads, its errors.

``command_parser("finetune", __doc__, module="jobs.finetune", env=STAGE_ENV)`` is the parser of
``lawtune finetune`` and of ``python -m jobs.finetune`` alike (one parser, so their --help is the
same text): the usage line and argparse's own errors name ``lawtune finetune``, the description is
the docstring's first paragraph without its markup, and the help ends with the environment the
command reads and the exit codes. ``shared.core.job.run_main`` ends a failure with
``lawtune finetune: error: ...`` (``error_line``). The config flags every stage shares
(``--config``, ``--base-model``, ``--set``) are ``shared.core.config.add_config_arguments``.
"""

from __future__ import annotations

import argparse
import re
import textwrap
from typing import Sequence

# Every variable a command may read, with one line of help; each command names the ones it reads.
ENVIRONMENT: dict[str, str] = {
    "LAWTUNE_ARTIFACT_ROOT": "where artifacts live: s3://bucket/prefix or file:///path (default file://./artifacts)",
    "LAWTUNE_RUN_ID": "the run, <artifact_root>/runs/<run_id>/ (default dev)",
    "LAWTUNE_S3_ENDPOINT_URL": "S3 endpoint of MinIO, SeaweedFS or Ceph (default AWS); LAWTUNE_S3_* tune retries and timeouts",
    "LAWTUNE_CACHE_DIR": "converted and downloaded models, work folders (default ~/.cache/lawtune)",
    "LAWTUNE_BASE_MODEL": "overrides the config's base_model; --base-model overrides it",
    "LAWTUNE_LOG_LEVEL": "DEBUG, INFO (default), WARNING or ERROR",
    "LAWTUNE_ACTOR": "who promotions and deployments are recorded as (default the host user)",
    "LAWTUNE_API_KEY": "the API key clients send (empty or unset: a random key, printed at start)",
    "LAWTUNE_GPU": "1 serves on the GPU, 0 on the CPU (default: a GPU when nvidia-smi answers)",
    "LAWTUNE_K8S_*": "--target k8s patience: LAWTUNE_K8S_UNSCHEDULABLE_GRACE_S (1800 s), LAWTUNE_K8S_PULL_GRACE_S (300 s)",
    "HF_HUB_OFFLINE": "1: Hugging Face base models come from the local cache only",
    "MLFLOW_TRACKING_URI": "log parameters, curves and reports to this MLflow server",
    "KUBECONFIG": "the cluster helm and kubectl talk to",
}
_AWS = "AWS credentials come the standard way (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a web identity)."
# What the pipeline stages read.
STAGE_ENV = ("LAWTUNE_ARTIFACT_ROOT", "LAWTUNE_RUN_ID", "LAWTUNE_S3_ENDPOINT_URL", "LAWTUNE_CACHE_DIR", "LAWTUNE_LOG_LEVEL")
MODEL_ENV = ("LAWTUNE_BASE_MODEL", "HF_HUB_OFFLINE")
EXIT_CODES = "exit codes: 0 done, 1 a failure worth retrying (storage, preemption), 2 bad input or configuration"
_WIDTH = 100


def error_line(command: str, message: object) -> str:
    """The one failure line every command ends with."""
    return f"lawtune {command}: error: {message}"


def plain(text: str) -> str:
    """Docstring text as help text: reStructuredText literals and emphasis without their markup."""
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`", r"\1", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"\1", text)


def summary(doc: str | None) -> str:
    """The first paragraph of a module docstring, as one plain sentence or two."""
    first = (doc or "").strip().split("\n\n", 1)[0]
    return plain(" ".join(line.strip() for line in first.splitlines()))


def environment_help(env: Sequence[str], *, aws: bool = True) -> str:
    width = max(map(len, env), default=0)
    lines = ["environment:"]
    for name in env:
        lines.append(textwrap.fill(ENVIRONMENT[name], _WIDTH, initial_indent=f"  {name:<{width}}  ",
                                   subsequent_indent=" " * (width + 4)))
    if aws:
        lines.append(textwrap.fill(_AWS, _WIDTH, initial_indent="  ", subsequent_indent="  "))
    return "\n".join(lines)


def _formatter(prog: str) -> argparse.HelpFormatter:
    # One width whatever the terminal: the same help text in every shell, image and test.
    return argparse.RawDescriptionHelpFormatter(prog, width=_WIDTH, max_help_position=30)


def command_parser(command: str, doc: str | None, *, module: str, env: Sequence[str], image: bool = False,
                   aws: bool = True) -> argparse.ArgumentParser:
    """The parser of ``lawtune <command>``: usage and errors in that name, description from ``doc``
    (with the ``python -m`` spelling: ``image`` when it is a stage image's entrypoint), then the
    environment ``env`` and the exit codes after the options."""
    also = "the stage image's entrypoint, with the same flags" if image else "the same flags"
    description = f"{summary(doc)} Also python -m {module} ({also})."
    return argparse.ArgumentParser(
        prog=f"lawtune {command}",
        description=textwrap.fill(description, _WIDTH),
        epilog=environment_help(env, aws=aws) + "\n\n" + textwrap.fill(EXIT_CODES, _WIDTH),
        formatter_class=_formatter,
    )
