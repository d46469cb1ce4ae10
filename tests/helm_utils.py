"""Render a chart with the pinned helm and validate what it renders, for the chart tests.

Shared by every chart's tests: ``render(chart, values, set_files=...)`` runs the real
``.tools/helm template`` (``make tools``) with HOME in a scratch folder, and ``validate`` checks
each object with kubernetes-validate's strict schemas (unknown fields are errors).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
HELM = REPO / ".tools" / "helm"
KUBE_VERSIONS = ("1.29", "1.33")


class RenderError(Exception):
    """helm template failed; the message is helm's stderr."""


def helm_path() -> Path:
    if not os.access(HELM, os.X_OK):
        pytest.skip(f"{HELM} is missing: run `make tools` (make test does)")
    return HELM


def render(
    chart: str | Path,
    values: dict[str, Any] | None = None,
    *,
    set_files: dict[str, str | Path] | None = None,
    release: str = "t",
    namespace: str = "lawtune",
    kube_version: str = "1.33.0",
    extra_args: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """``helm template`` the chart with ``values`` (a values file) and return the objects."""
    chart = REPO / chart if not Path(chart).is_absolute() else Path(chart)
    with tempfile.TemporaryDirectory(prefix="helm-home-") as home:
        values_file = Path(home) / "values.yaml"
        values_file.write_text(yaml.safe_dump(values or {}), encoding="utf-8")
        cmd = [
            str(helm_path()), "template", release, str(chart),
            "--namespace", namespace, "--kube-version", kube_version,
            "-f", str(values_file),
        ]
        for key, path in (set_files or {}).items():
            cmd += ["--set-file", f"{key}={path}"]
        cmd += list(extra_args)
        env = {**os.environ, "HOME": home, "HELM_CACHE_HOME": f"{home}/cache",
               "HELM_CONFIG_HOME": f"{home}/config", "HELM_DATA_HOME": f"{home}/data"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    if proc.returncode != 0:
        raise RenderError(proc.stderr.strip())
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def validate(objects: list[dict[str, Any]], versions: Iterable[str] = KUBE_VERSIONS) -> list[str]:
    """Every strict-schema error of every object for every Kubernetes version (empty = valid)."""
    import kubernetes_validate

    errors = []
    for version in versions:
        for obj in objects:
            # Round-trip through JSON: YAML may yield types (dates) the schemas never see from the API.
            obj = json.loads(json.dumps(obj, default=str))
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                errors.append(f"{version} {obj['kind']}/{obj['metadata']['name']} at {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                errors.append(f"{version} {obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    return errors


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def helm_install_dry_run_server(api_port: int, release: str, chart: Path, *args: str, namespace: str = "lawtune") -> dict[str, Any]:
    """``helm install --dry-run=server`` against an API server on 127.0.0.1:``api_port`` (the
    tests' stand-in, so Helm's ``lookup`` runs for real); the release as ``-o json`` prints it."""
    return helm_dry_run_server(api_port, [str(helm_path()), "install", release, str(chart), *args], namespace=namespace)


def helm_dry_run_server(api_port: int, cmd: list[str], namespace: str = "lawtune") -> dict[str, Any]:
    """Any helm command line (``helm upgrade --install ...`` too) with ``--dry-run=server -o json``
    against the stand-in API server on 127.0.0.1:``api_port``; the release it prints."""
    with tempfile.TemporaryDirectory(prefix="helm-home-") as home:
        kubeconfig = Path(home) / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{api_port}"}}],
            "users": [{"name": "u", "user": {"token": "stand-in"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": namespace}}]}))
        env = {**os.environ, "HOME": home, "HELM_CACHE_HOME": f"{home}/c", "HELM_CONFIG_HOME": f"{home}/g", "HELM_DATA_HOME": f"{home}/d"}
        proc = subprocess.run([*cmd, "--dry-run=server", "--disable-openapi-validation",
                               "--kubeconfig", str(kubeconfig), "-n", namespace, "-o", "json"],
                              capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
