"""The serving agent: a sidecar that follows the store so promotions and canaries need no restart.

    # beside vLLM (serving.mode=adapters): load/unload the versions' adapters at runtime
    python -m shared.serve.agent --model-name legal-assistant --role adapters \\
        --vllm-url http://127.0.0.1:8000 --base-dir /models/base --adapters-dir /models/adapters --port 9146
    # beside the gateway: the routes nginx splits by, and per-version metrics for Prometheus
    python -m shared.serve.agent --model-name legal-assistant --role gateway \\
        --routes-file /var/run/lawtune/routes.json --syslog-port 5514 --port 9145

Environment: ``LAWTUNE_ARTIFACT_ROOT`` and ``LAWTUNE_S3_*`` (the store the models are published
in; AWS credentials the standard way), ``VLLM_API_KEY`` (role adapters: the key vLLM requires).

Every ``--poll-seconds`` each role reads the model's serving state from the store
(``models/<name>/PROMOTED`` and ``CANARY``: shared/store/serving.py) and applies it: role
``adapters`` through shared/serve/adapter_sync.py, role ``gateway`` through
shared/serve/canary_gateway.py. Both roles can run in one process (``make serve``). The agent
serves ``/metrics`` (Prometheus), ``/ready`` (200 once every role has applied the state:
the pod's readiness probe) and ``/healthz`` on ``--port``. A failed poll (store or vLLM
unreachable) is logged and retried at the next one; what was applied stays applied.

Exit codes: 0 on SIGTERM/SIGINT; 2 bad flags or a base folder that is not a published base.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from shared.core.errors import ConfigError, LawtuneError
from shared.core.job import run_main
from shared.core.log import configure_logging
from shared.core.settings import Settings, load_settings
from shared.serve.adapter_sync import AdapterSync, VLLMAdmin, base_digest_of
from shared.serve.canary_gateway import GatewayMetrics, RoutesWriter, SyslogReceiver
from shared.serve.state_tracker import StateTracker
from shared.store.storage import open_location

log = logging.getLogger("lawtune.serve.agent")
ROLES = ("adapters", "gateway")


class GatewayRole:
    def __init__(self, settings: Settings, model: str, routes_file: Path, metrics: GatewayMetrics, settle_seconds: float):
        self.tracker = StateTracker(model, open_location(settings.models_uri(model), settings), settle_seconds)
        self.writer, self.metrics = RoutesWriter(routes_file), metrics
        self.ready = False

    def sync(self) -> None:
        state = self.tracker.poll()
        self.writer.write(state)
        self.metrics.set_weights(state)
        self.ready = True


class Agent:
    def __init__(self, roles: list, poll_seconds: float, registry: CollectorRegistry):
        self.roles, self.poll_seconds, self.registry = roles, poll_seconds, registry
        self.stopping = threading.Event()
        self.synced = Gauge("lawtune_agent_last_sync_timestamp_seconds", "When each role last applied the store's state",
                            ("role",), registry=registry)
        self.failures = Gauge("lawtune_agent_failed_polls", "Polls in a row that failed, by role", ("role",), registry=registry)

    @property
    def ready(self) -> bool:
        return all(role.ready for role in self.roles)

    def poll_once(self) -> None:
        for role in self.roles:
            name = type(role).__name__
            try:
                role.sync()
                self.synced.labels(name).set(time.time())
                self.failures.labels(name).set(0)
            except (LawtuneError, OSError, ValueError) as exc:  # the store or vLLM is away: keep what is applied
                self.failures.labels(name).inc()
                log.warning("%s: poll failed (%s); retrying in %.0f s", name, exc, self.poll_seconds)

    def run(self) -> None:
        while not self.stopping.is_set():
            self.poll_once()
            self.stopping.wait(self.poll_seconds)


def serve_http(agent: Agent, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/metrics":
                body, status, kind = generate_latest(agent.registry), 200, CONTENT_TYPE_LATEST
            elif self.path in ("/ready", "/healthz"):
                ok = agent.ready if self.path == "/ready" else True
                body, status, kind = (b"ok\n" if ok else b"not ready\n"), (200 if ok else 503), "text/plain"
            else:
                body, status, kind = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="agent-http", daemon=True).start()
    return server


def build(settings: Settings, args: argparse.Namespace) -> tuple[Agent, list]:
    """The agent for ``args.role`` and what must be closed with it."""
    registry = CollectorRegistry()
    roles, closing = [], []
    if "adapters" in args.role:
        for flag in ("vllm_url", "base_dir", "adapters_dir"):
            if not getattr(args, flag):
                raise ConfigError(f"--role adapters needs --{flag.replace('_', '-')}")
        try:
            digest = base_digest_of(args.base_dir)
        except (OSError, ValueError, LawtuneError) as exc:
            raise ConfigError(f"--base-dir {args.base_dir}: not a published base fetched by fetch_model ({exc})") from None
        admin = VLLMAdmin(args.vllm_url.rstrip("/"), os.environ.get("VLLM_API_KEY", ""))
        roles.append(AdapterSync(settings, args.model_name, admin, args.adapters_dir, digest, settle_seconds=args.settle_seconds))
    if "gateway" in args.role:
        if not args.routes_file:
            raise ConfigError("--role gateway needs --routes-file")
        metrics = GatewayMetrics(registry)
        closing.append(SyslogReceiver(metrics, port=args.syslog_port).start())
        roles.append(GatewayRole(settings, args.model_name, args.routes_file, metrics, args.settle_seconds))
    return Agent(roles, args.poll_seconds, registry), closing


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shared.serve.agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-name", required=True, help="published model (models/<name>/PROMOTED and CANARY)")
    p.add_argument("--role", action="append", choices=ROLES, required=True, help="adapters (beside vLLM), gateway, or both")
    p.add_argument("--poll-seconds", type=float, default=2.0, help="how often the store is read")
    p.add_argument("--settle-seconds", type=float, default=600.0,
                   help="how long a replaced champion stays loaded (and is where requests go that reach a replica "
                        "which has not loaded the new one yet)")
    p.add_argument("--host", default="127.0.0.1", help="address of /metrics, /ready, /healthz")
    p.add_argument("--port", type=int, default=9145, help="port of /metrics, /ready, /healthz (0: any free port)")
    p.add_argument("--vllm-url", help="role adapters: vLLM's address, e.g. http://127.0.0.1:8000")
    p.add_argument("--base-dir", type=Path, help="role adapters: the base model folder fetch_model wrote (bases/<digest>)")
    p.add_argument("--adapters-dir", type=Path, help="role adapters: where adapters are downloaded (vLLM must read it)")
    p.add_argument("--routes-file", type=Path, help="role gateway: the JSON file the gateway's canary.js reads")
    p.add_argument("--syslog-port", type=int, default=5514, help="role gateway: loopback UDP port nginx logs requests to")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> None:
        settings = load_settings()
        configure_logging(settings.log_level)
        agent, closing = build(settings, args)
        server = serve_http(agent, args.host, args.port)
        log.info("agent (%s) for %s: polling %s every %.1f s; /metrics and /ready on %s:%d", "+".join(args.role),
                 args.model_name, settings.models_uri(args.model_name), args.poll_seconds, args.host, server.server_port)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: agent.stopping.set())
        try:
            agent.run()
        finally:
            server.shutdown()
            for item in closing:
                item.close()

    return run_main("agent", body)


if __name__ == "__main__":
    raise SystemExit(main())
