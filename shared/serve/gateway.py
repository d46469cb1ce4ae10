"""The serving gateway outside the cluster: the chart's own nginx.conf, run by a local nginx.

``render_gateway(values)`` runs the real ``helm template --show-only
templates/gateway-configmap.yaml`` (and the gateway Deployment, for its key-file init
script) on charts/lawtune-serving, so ``make serve`` and the gateway tests run exactly what
the cluster runs; only addresses and paths differ, and those are chart values
(``local_gateway_values``). With ``ui.enabled`` the assistant page's ConfigMap is rendered too
and ``write_ui_files`` lays it out where nginx serves it. ``start_gateway`` runs nginx (Debian's
nginx-light here) in the foreground in its own process group.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shared.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lawtune-serving"
GATEWAY_TEMPLATE = "templates/gateway-configmap.yaml"
GATEWAY_DEPLOYMENT = "templates/gateway-deployment.yaml"
UI_TEMPLATE = "templates/ui-configmap.yaml"


# The chart's init container refuses shorter keys too (lawtune-serving.apiKeyMinLength): a key is
# the only thing between the internet and the model, so it must resist guessing (32 characters of
# `openssl rand -hex 24` or `secrets.token_urlsafe(24)` carry 128-192 bits).
MIN_API_KEY_LENGTH = 32
MAX_API_KEY_LENGTH = 256  # lawtune-serving.apiKeyMaxLength: one nginx map hash bucket holds the key
_KEY_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")


def check_api_key(key: str, source: str = "LAWTUNE_API_KEY") -> str:
    """``key``, or ConfigError (exit 2) naming ``source`` when it is too short or has characters the
    gateway's config cannot hold; the message never repeats the key."""
    if not MIN_API_KEY_LENGTH <= len(key) <= MAX_API_KEY_LENGTH:
        raise ConfigError(f"{source} is {len(key)} characters; {MIN_API_KEY_LENGTH} to {MAX_API_KEY_LENGTH} are accepted "
                          "(e.g. openssl rand -hex 24), or leave it unset for a random one")
    if not _KEY_CHARS.fullmatch(key):
        raise ConfigError(f"{source} has characters outside A-Za-z0-9._~+/=- (the gateway embeds the key in its config)")
    return key


def helm_binary() -> str:
    """``$LAWTUNE_HELM``, else the pinned ``.tools/helm`` (``make tools``), else helm on PATH."""
    for candidate in (os.environ.get("LAWTUNE_HELM"), str(REPO / ".tools" / "helm"), shutil.which("helm")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError("helm not found: run `make tools` (it unpacks the pinned helm into .tools/) or set LAWTUNE_HELM")


def nginx_binary() -> str:
    for candidate in (os.environ.get("LAWTUNE_NGINX"), shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError("nginx not found: install it (make system-deps: apt-get install nginx-light) or set LAWTUNE_NGINX")


def merge_values(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge_values(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def local_gateway_values(*, port: int, upstream: str, runtime_dir: Path, overrides: dict | None = None) -> dict[str, Any]:
    """Chart values that move the gateway onto loopback; everything else stays the chart's."""
    values = {
        # Required by the chart's other templates; the gateway config does not use them.
        "apiKey": {"existingSecret": "local"},
        "artifactStore": {"root": "file:///local"},
        "gateway": {
            "listenAddress": "127.0.0.1",
            "containerPort": port,
            "upstream": upstream,
            "runtimeDir": str(runtime_dir),
            "apiKeysFile": str(runtime_dir / "api-keys.map"),
        },
        # The assistant page's files (when ui.enabled), written there by write_ui_files.
        "ui": {"filesDir": str(runtime_dir / "ui")},
        # The canary's njs module (beside nginx.conf, as in the pod) and the routes file the agent writes.
        "canary": {"scriptDir": str(runtime_dir), "routesDir": str(runtime_dir / "routes")},
    }
    return merge_values(values, overrides or {})


@dataclass(frozen=True)
class RenderedGateway:
    nginx_conf: str  # the ConfigMap's nginx.conf
    keys_script: str  # the init container's script: API key (env) -> the map file nginx includes
    ui_files: dict[str, str] = field(default_factory=dict)  # the assistant page's ConfigMap (ui.enabled)
    ui_dir: Path | None = None  # where nginx serves them from (ui.filesDir)
    config_files: dict[str, str] = field(default_factory=dict)  # the gateway ConfigMap's other files (canary.js)


def render_gateway(values: dict[str, Any], chart: Path = CHART) -> RenderedGateway:
    """The gateway's nginx.conf and key-file script as the chart renders them for ``values``."""
    with tempfile.TemporaryDirectory(prefix="lawtune-helm-") as home:
        values_file = Path(home) / "values.yaml"
        values_file.write_text(yaml.safe_dump(values), encoding="utf-8")
        ui = (values.get("ui") or {}).get("enabled", False)
        cmd = [helm_binary(), "template", "lawtune", str(chart), "-f", str(values_file),
               "--show-only", GATEWAY_TEMPLATE, "--show-only", GATEWAY_DEPLOYMENT, *(["--show-only", UI_TEMPLATE] if ui else [])]
        # helm writes caches under HOME; a scratch HOME keeps the user's untouched.
        env = {**os.environ, "HOME": home, "HELM_CACHE_HOME": f"{home}/cache",
               "HELM_CONFIG_HOME": f"{home}/config", "HELM_DATA_HOME": f"{home}/data"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    if proc.returncode != 0:
        raise ConfigError(f"helm template {chart.name} failed: {proc.stderr.strip()}")
    docs = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    init = next(c for c in deployment["spec"]["template"]["spec"]["initContainers"] if c["name"] == "api-keys")
    conf = next(d for d in docs if d["kind"] == "ConfigMap" and "nginx.conf" in d["data"])
    ui_map = next((d for d in docs if d["kind"] == "ConfigMap" and "index.html" in d["data"]), None)
    ui_dir = Path(values["ui"].get("filesDir", "/etc/nginx/lawtune-ui")) if ui_map else None
    return RenderedGateway(nginx_conf=conf["data"]["nginx.conf"], keys_script=init["command"][-1],
                           ui_files=dict(ui_map["data"]) if ui_map else {}, ui_dir=ui_dir,
                           config_files={k: v for k, v in conf["data"].items() if k != "nginx.conf"})


def write_config_files(rendered: RenderedGateway, runtime_dir: Path) -> None:
    """The gateway ConfigMap's files beside nginx.conf, as the pod mounts them (canary.js: canary.scriptDir)."""
    for name, text in rendered.config_files.items():
        path = runtime_dir / name
        path.write_text(text, encoding="utf-8")
        path.chmod(0o644)


def write_ui_files(rendered: RenderedGateway) -> None:
    """The assistant page's ConfigMap as the pod mounts it: one file per key, readable by nginx's workers."""
    if rendered.ui_dir is None:
        return
    prepare_runtime_dir(rendered.ui_dir)
    for name, text in rendered.ui_files.items():
        path = rendered.ui_dir / name
        path.write_text(text, encoding="utf-8")
        path.chmod(0o644)


def write_keys_file(rendered: RenderedGateway, api_key: str, previous_key: str | None = None) -> None:
    """Run the chart's own init-container script, so the key file is written exactly as in the pod
    (``previous_key``: the Secret's previous key during a rotation, accepted as well)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LAWTUNE_API_KEY": api_key}
    if previous_key is not None:
        env["LAWTUNE_PREVIOUS_API_KEY"] = previous_key
    proc = subprocess.run(["sh", "-c", rendered.keys_script], env=env, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise ConfigError(proc.stderr.strip() or f"the gateway's key script failed with {proc.returncode}")


@dataclass
class Gateway:
    url: str  # http://127.0.0.1:<port>
    process: subprocess.Popen
    conf_path: Path
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        # SIGQUIT: nginx's graceful shutdown (open streams finish), as in the pod's preStop.
        stop_process_group(self.process, signal.SIGQUIT, grace=15)


def stop_process_group(process: subprocess.Popen, sig: int, grace: float) -> None:
    """Send ``sig`` to the process's group (it was started in its own session), SIGKILL after ``grace`` s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def prepare_runtime_dir(path: Path) -> Path:
    """nginx's pid/temp folder; run as root, nginx's workers (nobody) must be able to enter it."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path


def start_gateway(conf_text: str, runtime_dir: Path, port: int, timeout: float = 20.0) -> Gateway:
    """Check the config with ``nginx -t``, start nginx in the foreground, wait for /healthz."""
    conf_path = runtime_dir / "nginx.conf"
    conf_path.write_text(conf_text, encoding="utf-8")
    nginx = nginx_binary()
    base = [nginx, "-e", "stderr", "-c", str(conf_path)]
    check = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise ConfigError(f"nginx rejects the rendered config {conf_path}: {check.stderr.strip()}")
    log_path = runtime_dir / "nginx.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*base, "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    gateway = Gateway(f"http://127.0.0.1:{port}", proc, conf_path, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}; log:\n{gateway.log_tail()}")
        try:
            gateway.health()
            return gateway
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.1)
    gateway.stop()
    raise RuntimeError(f"nginx not answering /healthz after {timeout}s; log:\n{gateway.log_tail()}")
