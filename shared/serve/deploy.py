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
records.

Remote code (a model that runs its repository's own Python, ChatGLM3) is the operator's switch,
``--trust-remote-code`` or ``vllm.trustRemoteCode: true`` in a values file, never the version's
config, and never a value the release kept from an earlier deploy: every deploy sets
``vllm.trustRemoteCode`` to this switch, true or false. A version that needs it without the
switch is refused naming it, and with it only the code files the version's manifest records
pass (checked here and again by the init container). A ``--set`` or ``--set-string`` of
``vllm.trustRemoteCode`` among the helm flags after ``--`` is the switch too, read as helm reads
it: it comes after deploy's own ``--set``, so the last one wins, ``--trust-remote-code`` and the
values files included (``--trust-remote-code -- --set vllm.trustRemoteCode=false`` is off, and a
version that needs remote code is then refused naming the switch). Any other passthrough flag that
sets it (``--set-json``, ``--set-literal``, ``--set-file``) is refused: deploy must know what helm
will run. A values file after ``--`` cannot turn it on (helm's ``--set`` wins over every file).

Exit codes: 0 deployed (or rendered), 1 storage or helm failure or a rollout not ready in time,
2 nothing promoted, an uncommitted version, remote code off or not recorded, no cluster to name,
or bad flags.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from shared.core.errors import ConfigError, LawtuneError
from shared.core.cli import command_parser
from shared.core.job import run_main
from shared.core.log import configure_logging
from shared.core.settings import Settings, load_settings
from shared.core.uri import join
from shared.serve.gateway import CHART, helm_binary
from shared.store.artifacts import now_iso, read_manifest
from shared.store.model_code import RECORD, check_code, manifest_code
from shared.store.paths import check_version
from shared.store.releases import DEFAULT_NAMESPACE, record_release, release_name
from shared.store.storage import open_location

PROMOTED = "PROMOTED"
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
    check_version(version, source)
    read_manifest(open_location(join(models_uri, version), settings))  # raises unless committed
    return version


def remote_code(settings: Settings, model_name: str, version: str) -> str | None:
    """The repository code the version's config asks for (ChatGLM3's ``auto_map``), None when it needs none."""
    from shared.train.models import remote_code_in

    location = open_location(join(settings.models_uri(model_name), version), settings)
    if not location.exists("config.json"):
        return None
    return remote_code_in(json.loads(location.read_text("config.json")))


def values_trust_remote_code(values: list[Path]) -> bool:
    """``vllm.trustRemoteCode`` as the values files set it (the last file that names it wins, as in helm)."""
    trusted = False
    for path in values:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"--values {path}: {exc}") from exc
        vllm = data.get("vllm") if isinstance(data, dict) else None
        if isinstance(vllm, dict) and "trustRemoteCode" in vllm:
            trusted = vllm["trustRemoteCode"] is True
    return trusted


_SET_FLAGS = ("--set", "--set-string")
_OTHER_SET_FLAGS = ("--set-json", "--set-literal", "--set-file")
_TRUST_KEY = "vllm.trustRemoteCode"


def _flag_values(extra: list[str], flags: tuple[str, ...]) -> list[tuple[str, str]]:
    """(flag, value) of every ``flag value`` or ``flag=value`` in ``extra``, in order."""
    found = []
    for i, arg in enumerate(extra):
        for flag in flags:
            if arg == flag and i + 1 < len(extra):
                found.append((flag, extra[i + 1]))
            elif arg.startswith(f"{flag}="):
                found.append((flag, arg.split("=", 1)[1]))
    return found


def passthrough_trust_remote_code(extra: list[str]) -> bool | None:
    """``vllm.trustRemoteCode`` as the helm flags after ``--`` set it (None: they do not): helm applies
    them after deploy's own ``--set``, so the last ``--set``/``--set-string`` naming it decides.
    Anything but ``false`` counts as on, so the code check runs (helm's schema refuses a non-boolean)."""
    for flag, value in _flag_values(extra, _OTHER_SET_FLAGS):
        if "trustRemoteCode" in value:
            raise ConfigError(f"{flag} {value}: set remote code with --trust-remote-code, a values file or "
                              f"--set {_TRUST_KEY}=true|false, so deploy checks the code helm will let vLLM run")
    trusted = None
    for _, value in _flag_values(extra, _SET_FLAGS):
        for item in re.split(r"(?<!\\),", value):  # helm's list: a=b,c=d (\, is a comma inside a value)
            key, sep, setting = item.partition("=")
            if sep and key.strip() == _TRUST_KEY:
                trusted = setting.strip().lower() != "false"
    return trusted


def check_remote_code(settings: Settings, model_name: str, version: str, trusted: bool) -> None:
    """Remote code is the operator's switch: a version that needs it without the switch is refused,
    naming it; with the switch, only the code files its manifest records (the code finetune ran)."""
    uri = join(settings.models_uri(model_name), version)
    if not trusted:
        if code := remote_code(settings, model_name, version):
            raise ConfigError(f"version {version} needs its repository's own code ({code}) and remote code is off: "
                              "deploy with --trust-remote-code (make deploy TRUST_REMOTE_CODE=1) or set "
                              "vllm.trustRemoteCode: true in your values to let vLLM run it")
        return
    manifest = read_manifest(open_location(uri, settings))
    check_code(manifest_code(manifest), manifest.extra.get(RECORD), where=uri, record=f"{uri}/MANIFEST.json")


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
    # Both ways: with --reset-then-reuse-values a trustRemoteCode=true of an earlier deploy would
    # otherwise carry over to a version nobody switched it on for.
    cmd += ["--set", f"vllm.trustRemoteCode={'true' if trust_remote_code else 'false'}"]
    return cmd + list(extra)


_KUBE_FLAGS = ("--kube-context", "--kubeconfig")


def _flag_value(extra: list[str], flag: str) -> str | None:
    """The value of ``flag`` among helm flags (``--flag value`` or ``--flag=value``), the last one winning."""
    found = _flag_values(extra, (flag,))
    return found[-1][1] if found else None


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


def release_status(release: str, namespace: str | None, extra: list[str] = (), *, quiet: bool = False) -> dict:
    """What helm says the release is now (namespace, revision, status, values); {} when helm cannot say
    (``quiet``: without a warning, e.g. before the first install)."""
    cmd = [helm_binary(), "status", release, "--output", "json"] + (["--namespace", namespace] if namespace else []) + kube_flags(list(extra))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if quiet:
            return {}
        log.warning("helm status %s failed (%s); recording the release without its revision", release, proc.stderr.strip()[:200])
        return {}
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        log.warning("helm status %s printed no JSON; recording the release without its revision", release)
        return {}


def record(settings: Settings, *, release: str, namespace: str | None, model_name: str, version: str, chart: Path,
           cluster: str, status: dict, outcome: str = "deployed", **facts) -> dict:
    """Write models/<name>/releases/<cluster>/<namespace>/<release>.json so lineage can name the
    release serving a version; ``outcome`` "failed" for a rollout that helm applied but that did
    not get ready; ``facts``: the serving mode and its base or challenger (deploy_modes)."""
    chart_meta = yaml.safe_load((chart / "Chart.yaml").read_text()) if (chart / "Chart.yaml").is_file() else {}
    return record_release(
        open_location(settings.models_uri(model_name), settings), release=release, cluster=cluster,
        namespace=status.get("namespace") or namespace or DEFAULT_NAMESPACE, version=version, deployed_at=now_iso(),
        status=outcome, helm_revision=status.get("version"), chart=f"{chart_meta.get('name')}-{chart_meta.get('version')}",
        artifact_root=settings.artifact_root, **facts)


def _applied(status: dict, version: str) -> bool:
    """helm's last revision of the release sets this version (a failed rollout still applied it)."""
    return ((status.get("config") or {}).get("model") or {}).get("version") == version


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = command_parser("deploy", __doc__, module="shared.serve.deploy",
                            env=("LAWTUNE_ARTIFACT_ROOT", "LAWTUNE_S3_ENDPOINT_URL", "LAWTUNE_ACTOR", "KUBECONFIG", "LAWTUNE_LOG_LEVEL"))
    parser.add_argument("--release", required=True, help="Helm release name")
    parser.add_argument("--model-name", default="legal-assistant", help="published model (models/<name>/PROMOTED)")
    parser.add_argument("--version", help="serve this version instead of the promoted one (still checked)")
    parser.add_argument("-f", "--values", type=Path, action="append", default=[], help="chart values file (repeatable)")
    parser.add_argument("--namespace", help="Kubernetes namespace (default: the kube context's)")
    parser.add_argument("--chart", type=Path, default=CHART, help="the serving chart (default: charts/lawtune-serving)")
    parser.add_argument("--dry-run", action="store_true", help="render with helm template and print, change nothing")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let vLLM run the model's own code (ChatGLM3): sets vllm.trustRemoteCode=true (without it, and "
                             "without vllm.trustRemoteCode: true in a values file, every deploy sets it false, whatever the "
                             "release had; a --set vllm.trustRemoteCode=... after -- wins, as in helm); only the code files "
                             "the version's manifest records are served")
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
        trusted = args.trust_remote_code or values_trust_remote_code(args.values)
        # helm flags after `--` come after deploy's own --set and win (issue 24 item 2's switch must be what helm runs).
        if (passed := passthrough_trust_remote_code(extra)) is not None:
            trusted = passed
        check_remote_code(settings, args.model_name, version, trusted)
        from shared.serve.deploy_modes import mode_settings

        # The mode the release will run: the values files over the values kept from the release (unless --reset-values).
        kept = {} if args.dry_run or args.reset_values else \
            (release_status(args.release, args.namespace, extra, quiet=True).get("config") or {})
        mode_args, mode_facts = mode_settings(settings, args.model_name, version, args.values, kept=kept)  # adapters, canary
        if trusted and mode_facts.get("mode") == "adapters":
            raise ConfigError("serving.mode=adapters with remote code (--trust-remote-code / vllm.trustRemoteCode) is not "
                              "supported: the shared base's code is not pinned by digest; serve this model merged")
        cmd = helm_command(release=args.release, model_name=args.model_name, version=version, artifact_root=settings.artifact_root,
                           values=args.values, namespace=args.namespace, chart=args.chart, dry_run=args.dry_run,
                           extra=[*mode_args, *extra], trust_remote_code=trusted, reset_values=args.reset_values,
                           timeout=args.timeout)
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
                   chart=args.chart, cluster=cluster, status=status, outcome=outcome, **mode_facts)
        except (LawtuneError, ValueError) as exc:  # the release is changed; only lineage's last link is missing
            log.warning("the release record for lineage was not written: %s", exc)
        if proc.returncode != 0:
            raise LawtuneError(f"the rollout of {args.model_name} version {version} to {where} did not get ready within "
                               f"{args.timeout} (helm's message is above); recorded as failed. Kubernetes keeps trying: "
                               f"kubectl get pods -l app.kubernetes.io/instance={args.release}; deploy again, or helm rollback")
        if mode_facts.get("mode") == "adapters":
            print(f"{where}: {args.model_name} adapters on base {mode_facts['base_model_digest'][:12]}… are ready (promote, "
                  f"rollback and canary reach every pod at runtime; a deploy is needed only for another base)")
        else:
            print(f"{where}: {args.model_name} version {version} is ready (every pod serves it; the next promotion needs the next deploy)")

    return run_main("deploy", body)


if __name__ == "__main__":
    raise SystemExit(main())
