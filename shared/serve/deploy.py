"""Install or upgrade the serving chart with the model version resolved once per release.

    make deploy RELEASE=assistant SERVE_VALUES=my-values.yaml NAMESPACE=serving
    lawtune deploy --release assistant --model-name legal-assistant -f my-values.yaml [--namespace serving] [--cluster prod-eu]
    lawtune deploy --release assistant -f my-values.yaml --dry-run      # print the manifests instead
    lawtune deploy --release assistant -f my-values.yaml --timeout 1h -- --kube-context prod   # more helm flags

Environment: ``LAWTUNE_ARTIFACT_ROOT`` (and ``LAWTUNE_S3_*``; AWS credentials the standard way),
the same artifact root the chart's init container reads.

Reads ``<artifact_root>/models/<name>/PROMOTED`` (or takes ``--version``), checks that the version
is committed (its ``MANIFEST.json`` is there), and runs ``helm upgrade --install`` on
charts/lawtune-serving with ``model.name``, ``model.version`` and ``artifactStore.root`` set
after the values files. Every pod of the release then serves that one version, whenever it
starts (an HPA scale-up included), and the next promotion reaches the cluster only through the
next deploy, which rolls every pod.

The upgrade keeps what operators set on the release before (``helm upgrade --reuse-values
--set maintenance.enabled=true``, ``ui.*``): it runs with ``--reset-then-reuse-values`` (the
chart's new defaults, then the release's last values, then the values files and the pinned
version). ``--reset-values`` starts from the chart's defaults and the values files only. It
waits (``--wait --timeout``, 30m by default) until the rollout is ready, and only then records
the release as deployed in ``models/<name>/releases/<cluster>/<namespace>/<release>.json``, the
last link of ``lawtune lineage``; a rollout that does not get ready is recorded as failed (helm
applied the version, Kubernetes keeps trying). The cluster is ``--cluster`` (or
``LAWTUNE_CLUSTER``), else the kube context's cluster name, so staging and prod keep their own
records. Exit codes: 0 deployed (or rendered), 1 storage or helm failure or a rollout not
ready in time, 2 nothing promoted, an uncommitted version, no cluster to name, or bad flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
from shared.store.releases import DEFAULT_NAMESPACE, record_release, release_name
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


DEFAULT_TIMEOUT = "30m"  # a GPU node to scale up, the model to download and load (startupProbe: 15 min)


def helm_command(*, release: str, model_name: str, version: str, artifact_root: str, values: list[Path],
                 namespace: str | None, chart: Path = CHART, dry_run: bool = False, extra: list[str] = (),
                 trust_remote_code: bool = False, reset_values: bool = False, timeout: str = DEFAULT_TIMEOUT) -> list[str]:
    """``helm upgrade --install`` (or ``helm template`` for a dry run) with the resolved version set last.

    The upgrade keeps the release's earlier values (``--reset-then-reuse-values``; ``reset_values``
    drops them) and waits for the rollout (``--wait --timeout``), so success means ready pods."""
    cmd = [helm_binary(), "template", release, str(chart)] if dry_run else [helm_binary(), "upgrade", "--install", release, str(chart)]
    if namespace:
        cmd += ["--namespace", namespace]
    if not dry_run:
        cmd += ["--reset-values" if reset_values else "--reset-then-reuse-values", "--wait", "--timeout", timeout]
    for path in values:
        cmd += ["--values", str(path)]
    # --set-string: a version such as 20261128 must stay a string for the chart's schema.
    cmd += ["--set-string", f"model.name={model_name}", "--set-string", f"model.version={version}",
            "--set-string", f"artifactStore.root={artifact_root}"]
    if trust_remote_code:
        cmd += ["--set", "vllm.trustRemoteCode=true"]
    return cmd + list(extra)


_KUBE_FLAGS = ("--kube-context", "--kubeconfig")


def _flag_value(extra: list[str], flag: str) -> str | None:
    """The value of ``flag`` among helm flags (``--flag value`` or ``--flag=value``), the last one winning."""
    value = None
    for i, arg in enumerate(extra):
        if arg == flag and i + 1 < len(extra):
            value = extra[i + 1]
        elif arg.startswith(f"{flag}="):
            value = arg.split("=", 1)[1]
    return value


def kube_flags(extra: list[str]) -> list[str]:
    """The extra helm flags that pick the cluster, for the other helm calls of this deploy."""
    return [part for flag in _KUBE_FLAGS if (value := _flag_value(extra, flag)) is not None for part in (flag, value)]


def cluster_name(explicit: str | None, extra: list[str]) -> str:
    """Which cluster this deploy goes to: ``--cluster``, ``LAWTUNE_CLUSTER``, else the cluster of the
    kube context helm uses (``--kube-context``, else the kube config's current one)."""
    if explicit or os.environ.get("LAWTUNE_CLUSTER"):
        return explicit or os.environ["LAWTUNE_CLUSTER"]
    from kubernetes.config import ConfigException, list_kube_config_contexts

    config_file = _flag_value(extra, "--kubeconfig") or os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        contexts, current = list_kube_config_contexts(config_file=config_file)
    except (ConfigException, OSError) as exc:
        raise ConfigError(f"cannot tell which cluster this deploy goes to ({exc}): name it with --cluster or LAWTUNE_CLUSTER, "
                          f"so its release record does not overwrite another cluster's") from exc
    wanted = _flag_value(extra, "--kube-context")
    context = next((c for c in contexts if c["name"] == wanted), None) if wanted else current
    cluster = (context or {}).get("context", {}).get("cluster")
    if not cluster:
        raise ConfigError(f"kube context {wanted or '(current)'} names no cluster in {config_file}: name it with --cluster")
    return cluster


def release_status(release: str, namespace: str | None, extra: list[str] = ()) -> dict:
    """What helm says the release is now (namespace, revision, status, values); {} when helm cannot say."""
    cmd = [helm_binary(), "status", release, "--output", "json"] + (["--namespace", namespace] if namespace else []) + kube_flags(list(extra))
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
           cluster: str, status: dict, outcome: str = "deployed") -> dict:
    """Write models/<name>/releases/<cluster>/<namespace>/<release>.json so lineage can name the
    release serving a version; ``outcome`` "failed" for a rollout that helm applied but that did
    not get ready."""
    chart_meta = yaml.safe_load((chart / "Chart.yaml").read_text()) if (chart / "Chart.yaml").is_file() else {}
    return record_release(
        open_location(settings.models_uri(model_name), settings), release=release, cluster=cluster,
        namespace=status.get("namespace") or namespace or DEFAULT_NAMESPACE, version=version, deployed_at=now_iso(),
        status=outcome, helm_revision=status.get("version"), chart=f"{chart_meta.get('name')}-{chart_meta.get('version')}",
        artifact_root=settings.artifact_root)


def _applied(status: dict, version: str) -> bool:
    """helm's last revision of the release sets this version (a failed rollout still applied it)."""
    return ((status.get("config") or {}).get("model") or {}).get("version") == version


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
    parser.add_argument("--cluster", help="the cluster's name in the release record (default: LAWTUNE_CLUSTER, else the "
                                          "kube context's cluster); staging and prod keep separate records")
    parser.add_argument("--timeout", default=DEFAULT_TIMEOUT,
                        help=f"how long helm waits for the rollout to be ready (default {DEFAULT_TIMEOUT}); later it is a failure")
    parser.add_argument("--reset-values", action="store_true",
                        help="start from the chart's defaults and the values files only, dropping values set on the release "
                             "before (by default they are kept: helm --reset-then-reuse-values)")
    args = parser.parse_args(argv)

    def body() -> None:
        settings = load_settings()
        configure_logging(settings.log_level)
        for path in args.values:
            if not path.is_file():
                raise ConfigError(f"--values {path}: no such file")
        cluster = None if args.dry_run else cluster_name(args.cluster, extra)
        version = resolve_version(settings, args.model_name, args.version)
        log.info("serving %s version %s from %s", args.model_name, version, settings.artifact_root)
        code = remote_code(settings, args.model_name, version)
        if code:
            log.info("version %s runs its repository's code (%s): vllm.trustRemoteCode=true", version, code)
        cmd = helm_command(release=args.release, model_name=args.model_name, version=version, artifact_root=settings.artifact_root,
                           values=args.values, namespace=args.namespace, chart=args.chart, dry_run=args.dry_run, extra=extra,
                           trust_remote_code=bool(code), reset_values=args.reset_values, timeout=args.timeout)
        proc = subprocess.run(cmd)
        if args.dry_run:
            if proc.returncode != 0:
                raise LawtuneError(f"helm {cmd[1]} exited with {proc.returncode} (its message is above)")
            return
        status = release_status(args.release, args.namespace, extra)
        outcome = "deployed" if proc.returncode == 0 else "failed"
        where = release_name({"cluster": cluster, "namespace": status.get("namespace") or args.namespace or DEFAULT_NAMESPACE,
                              "release": args.release})
        if proc.returncode != 0 and not _applied(status, version):
            raise LawtuneError(f"helm upgrade exited with {proc.returncode} before applying version {version} to {where} "
                               f"(its message is above); the release and its record are unchanged")
        try:
            record(settings, release=args.release, namespace=args.namespace, model_name=args.model_name, version=version,
                   chart=args.chart, cluster=cluster, status=status, outcome=outcome)
        except (LawtuneError, ValueError) as exc:  # the release is changed; only lineage's last link is missing
            log.warning("the release record for lineage was not written: %s", exc)
        if proc.returncode != 0:
            raise LawtuneError(f"the rollout of {args.model_name} version {version} to {where} did not get ready within "
                               f"{args.timeout} (helm's message is above); recorded as failed. Kubernetes keeps trying: "
                               f"kubectl get pods -l app.kubernetes.io/instance={args.release}; deploy again, or helm rollback")
        print(f"{where}: {args.model_name} version {version} is ready (every pod serves it; the next promotion needs the next deploy)")

    return run_main("deploy", body)


if __name__ == "__main__":
    raise SystemExit(main())
