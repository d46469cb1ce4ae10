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
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", endpoint)  # what HF_ENDPOINT sets at import
    monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
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


# ---- a stand-in hub serving one model repository --------------------------------------------------
REPO_ID = "some-org/tiny-model"
COMMIT = "c0ffee" * 6 + "c0ff"


def _serve_repo(folder, requests: list[str]):
    """The hub's answers for one repository holding ``folder``'s files, as huggingface_hub 2.4's
    snapshot_download and hf_hub_download ask for them (model info, the file tree, then HEAD and GET
    of each file under /resolve/); every request path is appended to ``requests``."""
    import hashlib
    import json
    from urllib.parse import unquote, urlparse

    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, headers: dict[str, str]):
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _answer(self):
            path = unquote(urlparse(self.path).path)
            requests.append(path)
            as_json = {"Content-Type": "application/json"}
            if path.startswith(f"/api/models/{REPO_ID}/revision/"):
                info = {"id": REPO_ID, "sha": COMMIT, "siblings": [{"rfilename": name} for name in files]}
                return self._send(200, json.dumps(info).encode(), as_json)
            if path.startswith(f"/api/models/{REPO_ID}/tree/"):
                tree = [{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()} for n, b in files.items()]
                return self._send(200, json.dumps(tree).encode(), as_json)
            if path.startswith(f"/{REPO_ID}/resolve/"):
                name = path.split("/resolve/", 1)[1].split("/", 1)[1]
                if name in files:
                    body = files[name]
                    return self._send(200, body, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'})
            return self._send(404, b'{"error": "stand-in hub"}', {"X-Error-Code": "EntryNotFound", **as_json})

        do_GET = do_HEAD = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Points the real huggingface_hub client at a stand-in hub on 127.0.0.1 (the real one cannot be
    reached from here): serve(folder) publishes a model folder as REPO_ID; .requests lists what was asked."""
    state = {"requests": [], "server": None}

    def serve(folder):
        state["server"] = _serve_repo(folder, state["requests"])
        endpoint = f"http://127.0.0.1:{state['server'].server_address[1]}"
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", endpoint)
        monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        return state["requests"]

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    yield serve
    if state["server"]:
        state["server"].shutdown()


def _downloaded(requests: list[str]) -> set[str]:
    return {p.rsplit("/", 1)[1] for p in requests if f"/{REPO_ID}/resolve/" in p}


@pytest.mark.timeout(120)
def test_a_model_needing_remote_code_is_refused_before_any_weight_is_downloaded(hub, tmp_path):
    from shared.core.errors import ConfigError
    from shared.core.settings import Settings
    from shared.train.models import resolve_base_model
    from tests.tiny import remote_code_model_dir

    requests = hub(remote_code_model_dir(tmp_path / "repo"))
    with pytest.raises(ConfigError) as info:
        resolve_base_model(REPO_ID, Settings(cache_dir=tmp_path / "cache"))
    assert "needs its repository's own code (modeling_tiny_remote.TinyRemoteForCausalLM)" in str(info.value)
    assert "trust_remote_code is false" in str(info.value)
    assert _downloaded(requests) == {"config.json"}, f"asked the hub for more than config.json: {requests}"


@pytest.mark.timeout(120)
def test_with_trust_remote_code_the_whole_repository_comes_code_included(hub, tmp_path):
    from shared.core.settings import Settings
    from shared.train.models import resolve_base_model
    from tests.tiny import remote_code_model_dir

    requests = hub(remote_code_model_dir(tmp_path / "repo"))
    path = resolve_base_model(REPO_ID, Settings(cache_dir=tmp_path / "cache"), trust_remote_code=True)
    assert {"model.safetensors", "modeling_tiny_remote.py"} <= {p.name for p in path.iterdir()}
    assert "model.safetensors" in _downloaded(requests)


@pytest.mark.timeout(120)
def test_a_model_transformers_supports_downloads_as_before(hub, tmp_path):
    """The stand-in serves a whole model: the config-first check leaves plain models as they were."""
    from shared.core.settings import Settings
    from shared.train.models import resolve_base_model
    from tests.tiny import tiny_model_dir

    requests = hub(tiny_model_dir(tmp_path / "repo"))
    path = resolve_base_model(REPO_ID, Settings(cache_dir=tmp_path / "cache"))
    assert (path / "model.safetensors").is_file() and "model.safetensors" in _downloaded(requests)
