"""Draining a vLLM pod under load: the chart's nginx.conf (real nginx) in front of two upstream
servers through a stand-in for the vLLM Service, and the chart's own preStop (files/drain.py).

What cannot run here, and stands in for it (each says so):
- kube-proxy: ``ClusterIP`` below is a loopback TCP proxy with kube-proxy's behaviour for a
  terminating endpoint: new connections go only to endpoints that are not terminating, while an
  established connection stays on its pod (conntrack). That is what pins nginx's keep-alive
  connections to a draining pod.
- vLLM: ``Upstream`` answers every request after a short pause and serves vLLM's two queue
  gauges on /metrics (``vllm:num_requests_running`` / ``_waiting``), which is all drain.py and
  the gateway see of vLLM. Two real vLLM-CPU servers do not fit on a 2-core CI machine.

The drain is correct when, with requests arriving all the time, drain.py returns before its
deadline saying nothing is in flight, and no request reaches the draining pod after that:
SIGTERM then cuts nothing.
"""

from __future__ import annotations

import http.client
import socket
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.serve.gateway import local_gateway_values, prepare_runtime_dir, render_gateway, start_gateway, write_keys_file
from tests.helm_utils import by_kind, helm_path, render
from tests.servers import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DRAIN = REPO / "charts" / "lawtune-serving" / "files" / "drain.py"
KEY = "sk-drain-test-0123456789abcdefghijk"
REQUEST_S = 0.05


class Upstream:
    """A vLLM stand-in: /v1/* answers after REQUEST_S; /metrics carries the running count."""

    def __init__(self, name: str):
        self.name, self.running, self.starts = name, 0, []
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as vLLM's uvicorn

            def log_message(self, *args):
                pass

            def _send(self, body: bytes, ctype: str = "application/json"):
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/metrics":
                    with upstream.lock:
                        running = upstream.running
                    self._send(f'vllm:num_requests_running{{model_name="m"}} {running:.1f}\n'
                               f'vllm:num_requests_waiting{{model_name="m"}} 0.0\n'.encode(), "text/plain")
                    return
                with upstream.lock:
                    upstream.running += 1
                    upstream.starts.append(time.monotonic())
                try:
                    time.sleep(REQUEST_S)
                    self._send(f'{{"served_by":"{upstream.name}"}}'.encode())
                finally:
                    with upstream.lock:
                        upstream.running -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def starts_after(self, t: float) -> int:
        with self.lock:
            return sum(1 for s in self.starts if s > t)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class ClusterIP:
    """kube-proxy stand-in (see the module docstring): round-robin over endpoints that are not
    terminating for each new connection; established connections are never moved."""

    def __init__(self, endpoints: dict[str, int]):
        self.endpoints, self.terminating, self.next = dict(endpoints), set(), 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.open = []
        threading.Thread(target=self._accept, daemon=True).start()

    def terminate(self, name: str):
        self.terminating.add(name)

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            ready = [n for n in sorted(self.endpoints) if n not in self.terminating]
            name = ready[self.next % len(ready)]
            self.next += 1
            backend = socket.create_connection(("127.0.0.1", self.endpoints[name]))
            self.open += [client, backend]
            for a, b in ((client, backend), (backend, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self):
        self.sock.close()
        for s in self.open:
            s.close()


def _load(gateway_port: int, stop: threading.Event, errors: list):
    conn = http.client.HTTPConnection("127.0.0.1", gateway_port, timeout=10)
    while not stop.is_set():
        try:
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(resp.status)
        except (OSError, http.client.HTTPException) as exc:
            errors.append(repr(exc))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", gateway_port, timeout=10)
    conn.close()


def test_a_draining_pod_stops_getting_requests_and_drain_sees_it_idle():
    helm_path()
    overrides = {"gateway": {"upstreamKeepaliveSeconds": 2, "rateLimit": {"enabled": False}},
                 "vllm": {"preStopDelaySeconds": 1, "terminationGracePeriodSeconds": 20}}
    # The vLLM pod's own preStop, as the chart renders it for these values.
    objects = render("charts/lawtune-serving", local_gateway_values(port=1, upstream="127.0.0.1:2", runtime_dir=Path("/tmp"),
                                                                   overrides=overrides))
    (vllm,) = [d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-vllm")]
    prestop = vllm["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[:2] == ["python3", "/etc/lawtune/drain.py"]
    settle, deadline = float(prestop[3]), float(prestop[4])

    a, b = Upstream("a"), Upstream("b")
    service = ClusterIP({"a": a.port, "b": b.port})
    runtime = prepare_runtime_dir(Path(tempfile.mkdtemp(prefix="lawtune-drain-")))
    port = free_port()
    rendered = render_gateway(local_gateway_values(port=port, upstream=f"127.0.0.1:{service.port}", runtime_dir=runtime,
                                                   overrides=overrides))
    write_keys_file(rendered, KEY)
    gateway = start_gateway(rendered.nginx_conf, runtime, port)
    stop, errors = threading.Event(), []
    clients = [threading.Thread(target=_load, args=(port, stop, errors), daemon=True) for _ in range(6)]
    try:
        for c in clients:
            c.start()
        time.sleep(1.5)
        assert a.starts_after(0) > 0 and b.starts_after(0) > 0, "the load should reach both pods first"

        # Pod b terminates: it leaves the Service's endpoints and its preStop starts.
        t0 = time.monotonic()
        service.terminate("b")
        drain = subprocess.run([sys.executable, str(DRAIN), str(b.port), *prestop[3:]], capture_output=True, text=True,
                               timeout=deadline + 30)
        t_drained = time.monotonic()
        time.sleep(1.5)  # the load goes on: SIGTERM would come now
        stop.set()
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=15)
        gateway.stop()
        service.stop()
        a.stop()
        b.stop()
        shutil.rmtree(runtime, ignore_errors=True)

    assert "no requests in flight" in drain.stderr, drain.stderr
    assert t_drained - t0 < deadline, f"drain took {t_drained - t0:.1f}s (deadline {deadline}s)"
    assert t_drained - t0 >= settle
    assert b.starts_after(t_drained) == 0, f"{b.starts_after(t_drained)} request(s) reached the draining pod after its drain"
    assert a.starts_after(t_drained) > 0, "the load should have gone on on the other pod"
    assert errors == [], errors[:5]
