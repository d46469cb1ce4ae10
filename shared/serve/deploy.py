"""Install or upgrade the serving chart with the model version resolved once per release.

    make deploy RELEASE=assistant SERVE_VALUES=my-values.yaml NAMESPACE=serving
    lawtune deploy --release assistant --model-name legal-assistant -f my-values.yaml [--namespace serving]
    lawtune deploy --release assistant -f my-values.yaml --dry-run      # print the manifests instead
    lawtune deploy --release assistant -f my-values.yaml -- --wait --timeout 30m   # more helm flags

Environment: ``LAWTUNE_ARTIFACT_ROOT`` (and ``LAWTUNE_S3_*``; AWS credentials the standard way),
the same artifact root the chart's init container reads.

Reads ``<artifact_root>/models/<name>/PROMOTED`` (or takes ``--version``), checks that the version
is committed (its ``MANIFEST.json`` is there), and runs ``helm upgrade --install`` on
charts/lawtune-serving with ``model.name``, ``model.version`` and ``artifactStore.root`` set
after the values files. Every pod of the release then serves that one version, whenever it
starts (an HPA scale-up included), and the next promotion reaches the cluster only through the
next deploy, which rolls every pod. After helm succeeds it records the release (namespace, helm
revision, version) in ``models/<name>/releases/<namespace>/<release>.json``, the last link of
``lawtune lineage``. Exit codes: 0 deployed (or rendered), 1 storage or helm
failure, 2 nothing promoted, an uncommitted version, or bad flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import yaml

from shared.core.errors import ConfigError, LawtuneError
from shared.core.job import run_main
from shared.core.log import configure_logging
from shared.core.settings import Settings, load_settings
from shared.core.uri import join
from shared.serve.gateway import CHART, helm_binary
from shared.store.artifacts import now_iso, read_manifest
from shared.store.releases import DEFAULT_NAMESPACE, record_release
from shared.store.storage import open_location

PROMOTED = "PROMOTED"
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # the chart schema's model.version pattern
log = logging.getLogger("lawtune.deploy")


def resolve_version(settings: Settings, model_name: str, version: str | None = None) -> str:
    """The version to serve: ``version`` or what PROMOTED names, checked to be committed."""
    models_uri = settings.models_uri(model_name)
    if version is None:
        models = open_location(models_uri, settings)
        if not models.exists(PROMOTED):
            raise ConfigError(f"{models_uri}/{PROMOTED} is missing: no version of {model_name!r} has been promoted "
                              f"(publish one whose gate passed) — or name one with --version")
        version = models.read_text(PROMOTED).strip()
        source = f"{models_uri}/{PROMOTED}"
    else:
        source = "--version"
    if not _VERSION.match(version):
        raise ConfigError(f"{source} holds {version!r}; expected a version name (letters, digits, '._-')")
    read_manifest(open_location(join(models_uri, version), settings))  # raises unless committed
    return version


def remote_code(settings: Settings, model_name: str, version: str) -> str | None:
    """The repository code the version's config asks for (ChatGLM3's ``auto_map``), None when it needs none.

    vLLM refuses such a model without ``--trust-remote-code``; publish copies the code beside the
    weights only for a run trained with ``trust_remote_code: true``, so the version says it itself."""
    from shared.train.models import remote_code_in

    location = open_location(join(settings.models_uri(model_name), version), settings)
    if not location.exists("config.json"):
        return None
    return remote_code_in(json.loads(location.read_text("config.json")))


def helm_command(*, release: str, model_name: str, version: str, artifact_root: str, values: list[Path],
                 namespace: str | None, chart: Path = CHART, dry_run: bool = False, extra: list[str] = (),
                 trust_remote_code: bool = False) -> list[str]:
    """``helm upgrade --install`` (or ``helm template`` for a dry run) with the resolved version set last."""
    cmd = [helm_binary(), "template", release, str(chart)] if dry_run else [helm_binary(), "upgrade", "--install", release, str(chart)]
    if namespace:
        cmd += ["--namespace", namespace]
    for path in values:
        cmd += ["--values", str(path)]
    # --set-string: a version such as 20261128 must stay a string for the chart's schema.
    cmd += ["--set-string", f"model.name={model_name}", "--set-string", f"model.version={version}",
            "--set-string", f"artifactStore.root={artifact_root}"]
    if trust_remote_code:
        cmd += ["--set", "vllm.trustRemoteCode=true"]
    return cmd + list(extra)


def release_status(release: str, namespace: str | None) -> dict:
    """What helm says the release is now (its namespace and revision); {} when helm cannot say."""
    cmd = [helm_binary(), "status", release, "--output", "json"] + (["--namespace", namespace] if namespace else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log.warning("helm status %s failed (%s); recording the release without its revision", release, proc.stderr.strip()[:200])
        return {}
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        log.warning("helm status %s printed no JSON; recording the release without its revision", release)
        return {}


def record(settings: Settings, *, release: str, namespace: str | None, model_name: str, version: str, chart: Path,
           **facts) -> dict:
    """Write models/<name>/releases/<namespace>/<release>.json so lineage can name the release serving a version."""
    status = release_status(release, namespace)
    chart_meta = yaml.safe_load((chart / "Chart.yaml").read_text()) if (chart / "Chart.yaml").is_file() else {}
    return record_release(
        open_location(settings.models_uri(model_name), settings), release=release,
        namespace=status.get("namespace") or namespace or DEFAULT_NAMESPACE, version=version, deployed_at=now_iso(),
        helm_revision=status.get("version"), chart=f"{chart_meta.get('name')}-{chart_meta.get('version')}",
        artifact_root=settings.artifact_root, **facts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="lawtune deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", required=True, help="Helm release name")
    parser.add_argument("--model-name", default="legal-assistant", help="published model (models/<name>/PROMOTED)")
    parser.add_argument("--version", help="serve this version instead of the promoted one (still checked)")
    parser.add_argument("-f", "--values", type=Path, action="append", default=[], help="chart values file (repeatable)")
    parser.add_argument("--namespace", help="Kubernetes namespace (default: the kube context's)")
    parser.add_argument("--chart", type=Path, default=CHART, help="the serving chart (default: charts/lawtune-serving)")
    parser.add_argument("--dry-run", action="store_true", help="render with helm template and print, change nothing")
    args = parser.parse_args(argv)

    def body() -> None:
        settings = load_settings()
        configure_logging(settings.log_level)
        for path in args.values:
            if not path.is_file():
                raise ConfigError(f"--values {path}: no such file")
        version = resolve_version(settings, args.model_name, args.version)
        log.info("serving %s version %s from %s", args.model_name, version, settings.artifact_root)
        code = remote_code(settings, args.model_name, version)
        if code:
            log.info("version %s runs its repository's code (%s): vllm.trustRemoteCode=true", version, code)
        from shared.serve.deploy_modes import mode_settings

        mode_args, mode_facts = mode_settings(settings, args.model_name, version, args.values)  # adapters mode, canary
        cmd = helm_command(release=args.release, model_name=args.model_name, version=version, artifact_root=settings.artifact_root,
                           values=args.values, namespace=args.namespace, chart=args.chart, dry_run=args.dry_run,
                           extra=[*mode_args, *extra], trust_remote_code=bool(code))
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise LawtuneError(f"helm {cmd[1]} exited with {proc.returncode} (its message is above)")
        if not args.dry_run:
            try:
                record(settings, release=args.release, namespace=args.namespace, model_name=args.model_name,
                       version=version, chart=args.chart, **mode_facts)
            except (LawtuneError, ValueError) as exc:  # the release is live; only lineage's last link is missing
                log.warning("deployed, but the release record for lineage was not written: %s", exc)
            print(f"{args.release}: {args.model_name} version {version} (every pod serves it; the next promotion needs the next deploy)")

    return run_main("deploy", body)


if __name__ == "__main__":
    raise SystemExit(main())
