"""``make serve`` in adapters mode: one base model in vLLM, each version's adapter loaded at runtime, the canary gateway.

    lawtune serve --model-name legal-assistant --mode adapters        # `--mode auto` picks it for adapter versions

What the serving chart runs with ``serving.mode=adapters``, on this machine and with the same code:
``python -m jobs.fetch_model <root>/bases/<digest>`` (the init container: the base the promoted
version's adapter was published for, verified), vLLM with ``--enable-lora`` and runtime LoRA
updating on loopback, one serving agent with both roles (``python -m shared.serve.agent --role
adapters --role gateway``: loads the adapters the store names, keeps the gateway's routes file and
per-version metrics), and nginx with the chart-rendered gateway config (the canary's njs module
included). ``lawtune models canary`` / ``promote`` / ``rollback`` then reach this server within
the agent's poll interval, without a restart.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from shared.core.errors import ConfigError, LawtuneError
from shared.core.settings import Settings
from shared.serve.gateway import (
    Gateway, local_gateway_values, merge_values, prepare_runtime_dir, render_gateway, start_gateway, stop_process_group,
    write_config_files, write_keys_file, write_ui_files,
)
from shared.store.artifacts import read_manifest
from shared.store.serving import base_uri, read_promoted
from shared.store.storage import open_location

# LoRA on vLLM-CPU: the chart's adapters.* defaults.
LORA_ARGS = ["--enable-lora", "--max-loras", "4", "--max-lora-rank", "16"]
LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def promoted_adapter(settings: Settings, model_name: str) -> dict | None:
    """The promoted version's ``extra.adapter`` (None: nothing promoted, or a merged-only version)."""
    root = open_location(settings.models_uri(model_name), settings)
    version = read_promoted(root)
    if version is None:
        return None
    return read_manifest(root.child(version)).extra.get("adapter")


@dataclass
class AgentProcess:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:<port>: /metrics, /ready
    log_path: Path
    command: list[str]
    env: dict[str, str]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process_group(self.process, signal.SIGTERM, grace=15)

    def restart(self, timeout: float = 120.0) -> "AgentProcess":
        """Stop and start the same agent again (a restarted pod's sidecar); returns once ready."""
        self.stop()
        return _launch(self.command, self.env, self.log_path, self.url, timeout)


def start_agent(settings: Settings, model_name: str, *, roles: list[str], port: int, log_path: Path, api_key: str = "",
                poll_seconds: float = 2.0, settle_seconds: float = 600.0, timeout: float = 120.0, **flags) -> AgentProcess:
    """``python -m shared.serve.agent`` for ``roles``; returns once /ready answers 200 (every adapter loaded, routes written).

    ``flags``: the roles' flags by their Python names (vllm_url, base_dir, adapters_dir, routes_file, syslog_port)."""
    cmd = [sys.executable, "-m", "shared.serve.agent", "--model-name", model_name, *(a for r in roles for a in ("--role", r)),
           "--poll-seconds", str(poll_seconds), "--settle-seconds", str(settle_seconds), "--port", str(port)]
    for key, value in flags.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "LAWTUNE_ARTIFACT_ROOT": settings.artifact_root, "VLLM_API_KEY": api_key}
    return _launch(cmd, env, log_path, f"http://127.0.0.1:{port}", timeout)


def _launch(cmd: list[str], env: dict[str, str], log_path: Path, url: str, timeout: float) -> AgentProcess:
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    agent = AgentProcess(proc, url, log_path, cmd, env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise (ConfigError if proc.returncode == 2 else LawtuneError)(
                f"the serving agent exited with {proc.returncode}; log:\n{agent.log_tail()}")
        if agent.ready():
            return agent
        time.sleep(0.2)
    agent.stop()
    raise LawtuneError(f"the serving agent was not ready after {timeout:.0f}s; log:\n{agent.log_tail()}")


@dataclass
class AdaptersServing:
    server: object  # serve_local.VLLMProcess
    agent: AgentProcess
    gateway: Gateway
    base_digest: str
    runtime_dir: Path

    def stop(self) -> None:
        for part in (self.gateway, self.agent, self.server):
            part.stop()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)  # logs, downloaded adapters, nginx's temp files


def gateway_values(base_digest: str, syslog_port: int) -> dict:
    return {"serving": {"mode": "adapters"}, "adapters": {"baseDigest": base_digest},
            "canary": {"agent": {"syslogPort": syslog_port}}}


def serve_adapters(settings: Settings, model_name: str, port: int, vllm_port: int, api_key: str, *, agent_port: int,
                   syslog_port: int, fetch, start_vllm, vllm_args: list[str], gateway_overrides: dict | None = None,
                   poll_seconds: float = 2.0) -> AdaptersServing:
    """The base in vLLM, the agent, the gateway: the chart's adapters mode on loopback.

    ``fetch`` and ``start_vllm`` are shared/serve/serve_local.py's (the init container's command and
    the vLLM launcher; passed in, as serve_local imports this module); ``vllm_args`` its engine
    settings, to which the LoRA flags are added."""
    root = open_location(settings.models_uri(model_name), settings)
    if read_promoted(root) is None:
        raise ConfigError(f"{root.uri}: nothing is promoted (lawtune models promote {model_name} <version>, or make train)")
    adapter = promoted_adapter(settings, model_name)
    if not adapter:
        raise ConfigError(f"{root.uri}: the promoted version carries no adapter (publish it with publish.artifact: "
                          "adapter or both); serve it with --mode merged")
    digest = adapter["base_model_digest"]
    base_dir = settings.cache_dir / "serving" / "bases" / digest[:16]
    print(fetch(base_uri(settings.artifact_root, digest), base_dir), flush=True)
    workdir = prepare_runtime_dir(Path(tempfile.mkdtemp(prefix="lawtune-serve-")))
    args = [*vllm_args, *LORA_ARGS]
    server = start_vllm(base_dir, vllm_port, api_key, served_model_name=f"{model_name}:base", log_path=workdir / "vllm.log",
                        extra_args=args, env=LORA_ENV)
    agent = gateway = None
    try:
        routes = workdir / "routes" / "routes.json"
        agent = start_agent(settings, model_name, roles=["adapters", "gateway"], port=agent_port, log_path=workdir / "agent.log",
                            api_key=api_key, poll_seconds=poll_seconds, vllm_url=server.url, base_dir=base_dir,
                            adapters_dir=workdir / "adapters", routes_file=routes, syslog_port=syslog_port)
        overrides = merge_values(gateway_values(digest, syslog_port), gateway_overrides or {})
        rendered = render_gateway(local_gateway_values(port=port, upstream=f"127.0.0.1:{vllm_port}", runtime_dir=workdir,
                                                       overrides=overrides))
        write_keys_file(rendered, api_key)
        write_ui_files(rendered)
        write_config_files(rendered, workdir)
        gateway = start_gateway(rendered.nginx_conf, workdir, port)
    except BaseException:
        for part in (gateway, agent, server):
            if part is not None:
                part.stop()
        raise
    return AdaptersServing(server, agent, gateway, digest, workdir)


def routes_of(serving: AdaptersServing) -> dict:
    return json.loads((serving.runtime_dir / "routes" / "routes.json").read_text())
