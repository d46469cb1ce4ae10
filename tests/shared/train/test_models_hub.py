"""shared/train/models.py against the real huggingface_hub client and a stand-in hub on 127.0.0.1.

The Hugging Face hub cannot be reached from these machines, so a small local HTTP server answers
what the hub answers (status codes and its ``X-Error-Code`` header) and ``HF_ENDPOINT`` points the
client at it: the client's own error classes decide, as they would against the real hub.
"""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from shared.core.errors import EXIT_CONFIG, EXIT_RETRY, LawtuneError


def _serve(status: int, error_code: str | None):
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(status)
            if error_code:
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", f"{error_code} (stand-in hub)")
            self.send_header("Content-Type", "application/json")
            body = b'{"error": "stand-in hub"}'
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_HEAD = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("status", "error_code", "exit_code"),
    [
        pytest.param(404, "RepoNotFound", EXIT_CONFIG, id="not-found"),
        pytest.param(401, "GatedRepo", EXIT_CONFIG, id="gated"),
        pytest.param(404, "RevisionNotFound", EXIT_CONFIG, id="bad-revision"),
        pytest.param(503, None, EXIT_RETRY, id="hub-5xx"),
        pytest.param(429, None, EXIT_RETRY, id="rate-limited"),
        pytest.param(None, None, EXIT_RETRY, id="network-down"),
    ],
)
@pytest.mark.timeout(120)
def test_only_what_a_retry_cannot_change_is_a_config_error(status, error_code, exit_code, tmp_path, monkeypatch):
    from shared.train import models

    server = _serve(status, error_code) if status else None
    endpoint = f"http://127.0.0.1:{server.server_address[1] if server else _closed_port()}"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", endpoint)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    try:
        with pytest.raises(LawtuneError) as info:
            models._from_hf_hub("some-org/some-model")
    finally:
        if server:
            server.shutdown()
    assert info.value.exit_code == exit_code, str(info.value)
    assert "some-org/some-model" in str(info.value) and "\n" not in str(info.value)
