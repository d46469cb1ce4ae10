"""Beside each gateway replica: the routes nginx splits traffic by, and per-version metrics for Prometheus.

``RoutesWriter`` writes the serving state (champion, challenger, weight, sticky key, previous
champion: shared/store/serving.py ``ServingState.routes``) as the JSON file the gateway's njs
module reads on every request (charts/lawtune-serving/files/canary.js), atomically (write, then
rename), so a request sees the old routes or the new ones, never half a file. nginx needs no
reload: a weight change or a promotion takes effect on the next request after the next poll.

``GatewayMetrics`` receives nginx's per-request log lines over syslog on loopback UDP (the
``access_log syslog:`` line the chart renders: version picked, version that answered, arm,
status, request time) and exports them per version:

    lawtune_gateway_requests_total{model, version, arm, code}
    lawtune_gateway_request_duration_seconds{model, version, arm}     (histogram)
    lawtune_canary_weight_percent{model, version}                      (the split now)

UDP on loopback so that a stopped or slow exporter can never hold a request up: a lost line
costs a count, not an answer.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.store.serving import ServingState

log = logging.getLogger("lawtune.serve.canary")
SYSLOG_TAG = "lawtune_canary"
# Answers from a small CPU model take ~0.1 s, long streams from a large one minutes.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class RoutesWriter:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._last: dict | None = None

    def write(self, state: ServingState) -> bool:
        """Replace the routes file when the state changed; True when it did."""
        routes = state.routes()
        if routes == self._last and self.path.is_file():
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(routes, fh)
        os.chmod(tmp, 0o644)  # nginx's workers run as another user
        os.replace(tmp, self.path)
        log.info("routes: %s", ", ".join(f"{v} {w}%" for v, w in state.weights().items()) or "nothing promoted")
        self._last = routes
        return True


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        labels = ("model", "version", "arm")
        self.requests = Counter("lawtune_gateway_requests", "API requests through the gateway, by the version that answered "
                                "(or was picked, for requests refused before it: 401, 429)", (*labels, "code"),
                                registry=self.registry)
        self.duration = Histogram("lawtune_gateway_request_duration_seconds", "Time from the request's first byte to the "
                                  "response's last (whole streams)", labels, buckets=DURATION_BUCKETS, registry=self.registry)
        self.weight = Gauge("lawtune_canary_weight_percent", "Percent of clients each version answers now",
                            ("model", "version"), registry=self.registry)
        self.lines = Counter("lawtune_gateway_log_lines", "Log lines received from nginx, by whether they parsed", ("result",),
                             registry=self.registry)
        self._weights: set[tuple[str, str]] = set()

    def observe_line(self, line: str) -> None:
        """One nginx log line (the JSON after the syslog header)."""
        try:
            doc = json.loads(line[line.index("{"):])
            version = doc.get("served") or doc.get("picked") or "none"
            labels = (doc.get("model") or "none", version, doc.get("arm") or "none")
            self.requests.labels(*labels, str(doc["status"])).inc()
            self.duration.labels(*labels).observe(float(doc["request_time"]))
        except (ValueError, KeyError, TypeError):
            self.lines.labels("unparsed").inc()
            return
        self.lines.labels("ok").inc()

    def set_weights(self, state: ServingState) -> None:
        current = {(state.model, v): w for v, w in state.weights().items()}
        for gone in self._weights - set(current):
            self.weight.remove(*gone)
        for key, w in current.items():
            self.weight.labels(*key).set(w)
        self._weights = set(current)


class SyslogReceiver:
    """Receives nginx's ``access_log syslog:server=127.0.0.1:<port>`` datagrams in a daemon thread."""

    def __init__(self, metrics: GatewayMetrics, host: str = "127.0.0.1", port: int = 5514):
        self.metrics = metrics
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="syslog", daemon=True)

    def start(self) -> "SyslogReceiver":
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return  # closed
            self.metrics.observe_line(data.decode("utf-8", errors="replace"))

    def close(self) -> None:
        self.sock.close()
