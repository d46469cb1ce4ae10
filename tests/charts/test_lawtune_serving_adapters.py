"""charts/lawtune-serving in serving.mode=adapters and with the canary (merged mode: a challenger Deployment).

Real `helm template`, strict Kubernetes 1.29/1.33 schemas, and what each mode must get right: LoRA
flags from values, the base fetched and verified by digest, promotions that do not roll pods, the
agents as sidecars gating readiness, the challenger's pods never selected by the champion's
Service, PDB or autoscaler, and the gateway's njs canary wired into nginx.conf.
"""

from __future__ import annotations

import pytest

from tests.charts.test_lawtune_serving import (
    CHART_DIR, CRD_KINDS, PAGE_MODES, _deployment, _flag, _merge, _nginx_conf, _pod_labels, _render, _selects,
)
from tests.helm_utils import RenderError, by_kind, validate

DIGEST = "ab" * 32
ADAPTERS = {"serving": {"mode": "adapters"}, "adapters": {"baseDigest": DIGEST}}
MERGED_CANARY = {"canary": {"enabled": True, "challengerVersion": "r2-bbbb"}, "model": {"version": "r1-aaaa"}}


@pytest.mark.parametrize("overrides", [
    pytest.param(ADAPTERS, id="adapters"),
    pytest.param(_merge(_merge(ADAPTERS, PAGE_MODES["ingress"]), {"vllm": {"device": "cpu"}, "serviceMonitor": {"enabled": True},
                                                            "ui": {"enabled": True}}), id="adapters-cpu-page-monitor"),
    pytest.param(MERGED_CANARY, id="merged-canary"),
    pytest.param(_merge(MERGED_CANARY, {"serviceMonitor": {"enabled": True}, "autoscaling": {"type": "keda"}}), id="merged-canary-keda"),
])
def test_renders_valid_objects(overrides):
    objects = [o for o in _render(overrides) if o["kind"] not in CRD_KINDS]
    assert validate(objects) == []


def test_adapters_mode_runs_the_base_with_lora_and_the_adapter_agent():
    objects = _render(_merge(ADAPTERS, {"adapters": {"maxLoras": 8, "maxLoraRank": 64, "maxCpuLoras": 16}}))
    vllm = _deployment(objects, "vllm")
    pod = vllm["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    # vLLM's /metrics only through the metrics sidecar, in adapters mode as in merged mode.
    assert list(containers) == ["vllm", "metrics-proxy", "adapter-agent"]
    server, agent = containers["vllm"], containers["adapter-agent"]
    assert agent["image"] == "ghcr.io/lawtune/fetch-model:0.1.0"
    args = server["args"]
    assert ["--enable-lora", "--max-loras=8", "--max-lora-rank=64", "--max-cpu-loras=16"] == \
        [a for a in args if "lora" in a]
    assert _flag(args, "--served-model-name") == "legal-assistant:base"
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in server["env"]
    # The init container fetches the base by its digest (verified like any published folder) into the model dir.
    fetch = pod["initContainers"][0]
    assert fetch["name"] == "fetch-model"
    assert fetch["args"] == [f"s3://lawtune/prod/bases/{DIGEST}", f"/models/base/{DIGEST[:16]}"]
    assert _flag(args, "--model") == fetch["args"][1]
    # The agent: loads adapters into this replica's vLLM, gates the pod's readiness, has the key from the Secret.
    assert agent["command"] == ["python", "-m", "shared.serve.agent"]
    assert {"--role=adapters", "--vllm-url=http://127.0.0.1:8000", f"--base-dir=/models/base/{DIGEST[:16]}",
            "--adapters-dir=/models/adapters", "--model-name=legal-assistant"} <= set(agent["args"])
    assert agent["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "agent"}
    env = {e["name"]: e for e in agent["env"]}
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "lawtune-api-key"
    assert env["LAWTUNE_ARTIFACT_ROOT"]["value"] == "s3://lawtune/prod"
    assert {m["mountPath"] for m in agent["volumeMounts"]} == {"/models", "/tmp"}
    assert next(m for m in server["volumeMounts"] if m["mountPath"] == "/models")["readOnly"] is True


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_adapters_mode_takes_no_serving_contract_from_the_base_folder(tmp_path, device):
    """issue 26 x 27: the serving contract (lawtune-vllm.yaml, chat template, generation config) belongs to a merged
    version; the shared base in /models/base/<digest> has none, so the api-keys init container, run on a base
    folder, writes the keys and exits 0 (appending the missing file would stop every replica, exit 2)."""
    import subprocess

    pod = _deployment(_render(_merge(ADAPTERS, {"vllm": {"device": device}})), "vllm")["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert not any(a.startswith(("--chat-template", "--generation-config")) for a in args)
    assert _flag(args, "--dtype") == ("bfloat16" if device == "cpu" else None)
    (init,) = [c for c in pod["initContainers"] if c["name"] == "api-keys"]
    keys_file = "/etc/lawtune-keys/vllm-api-keys.yaml"
    script = init["command"][-1].replace(keys_file, str(tmp_path / "keys.yaml"))
    assert "lawtune-vllm.yaml" not in script and all(m["name"] != "models" for m in init["volumeMounts"])
    proc = subprocess.run(["sh", "-c", script], env={"PATH": "/usr/bin:/bin", "LAWTUNE_API_KEY": "k" * 32},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "keys.yaml").read_text() == f"api-key:\n- '{'k' * 32}'\n"


def test_in_adapters_mode_a_promotion_does_not_roll_the_vllm_pods():
    """lawtune deploy pins model.version; in adapters mode the agent follows the store, the pods stay."""
    pods = [_deployment(_render(_merge(ADAPTERS, {"model": {"version": v}})), "vllm")["spec"]["template"] for v in ("r1-a", "r2-b")]
    assert pods[0] == pods[1]
    assert pods[0]["metadata"]["annotations"]["lawtune.io/model-version"] == f"adapters-on-base-{DIGEST[:16]}"


@pytest.mark.parametrize(("overrides", "message"), [
    pytest.param({"serving": {"mode": "adapters"}}, "adapters.baseDigest is required with serving.mode=adapters", id="no-digest"),
    pytest.param({**ADAPTERS, "adapters": {"baseDigest": DIGEST, "maxLoras": 8, "maxCpuLoras": 4}},
                 "adapters.maxCpuLoras (4) must be at least adapters.maxLoras (8)", id="cpu-loras"),
    pytest.param({**ADAPTERS, "adapters": {"baseDigest": DIGEST, "maxLoraRank": 24}}, "maxLoraRank", id="rank-vllm-refuses"),
    pytest.param({"canary": {"enabled": True}}, "model.version is required with canary.enabled in merged mode", id="merged-unpinned"),
    pytest.param({"serving": {"mode": "both"}}, "serving.mode", id="unknown-mode"),
    # issue 24 item 2 x 27: plain helm, GitOps or `lawtune deploy -- --set serving.mode=adapters` never meet deploy's check
    pytest.param({**ADAPTERS, "vllm": {"trustRemoteCode": True}}, "vllm.trustRemoteCode=true with serving.mode=adapters",
                 id="adapters-remote-code"),
])
def test_bad_values_fail_naming_the_key(overrides, message):
    with pytest.raises(RenderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _render(overrides)


@pytest.mark.parametrize("overrides", [pytest.param(ADAPTERS, id="adapters"), pytest.param(MERGED_CANARY, id="merged")])
def test_gateway_runs_the_canary_and_the_agent(overrides):
    objects = _render(_merge(overrides, {"serviceMonitor": {"enabled": True}}))
    conf = _nginx_conf(objects)
    config_map = next(c for c in by_kind(objects, "ConfigMap") if "nginx.conf" in c["data"])
    assert config_map["data"]["canary.js"] == (CHART_DIR / "files" / "canary.js").read_text()
    assert conf.startswith("# Rendered by") and "load_module /usr/lib/nginx/modules/ngx_http_js_module.so;" in conf
    for line in ("js_import lawtune_canary from canary.js;", "js_var $lawtune_routes_file /var/run/lawtune/routes.json;",
                 "set $lawtune_version $lawtune_pick;", "proxy_set_body $lawtune_body;", "error_page 404 = @lawtune_fallback;",
                 "add_header X-Lawtune-Model-Version $lawtune_served always;",
                 "access_log syslog:server=127.0.0.1:5514,tag=lawtune_canary,nohostname lawtune_canary;"):
        assert line in conf, line
    # A pinned model.version names the release's pods, not the answer: the canary's header replaces it.
    assert 'X-Lawtune-Model-Version "' not in conf
    gateway = _deployment(objects, "gateway")
    pod = gateway["spec"]["template"]["spec"]
    nginx, agent = pod["containers"]
    assert {m["name"]: m["mountPath"] for m in nginx["volumeMounts"]}["routes"] == "/var/run/lawtune"
    assert "--routes-file=/var/run/lawtune/routes.json" in agent["args"] and "--role=gateway" in agent["args"]
    assert agent["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gateway["spec"]["template"]["metadata"]["annotations"]["checksum/canary"]
    service = next(s for s in by_kind(objects, "Service") if s["metadata"]["name"].endswith("-gateway"))
    assert {"name": "metrics", "port": 9145, "targetPort": "metrics", "protocol": "TCP"} in service["spec"]["ports"]
    monitors = {m["metadata"]["name"]: m for m in by_kind(objects, "ServiceMonitor")}
    gateway_monitor = monitors["t-lawtune-serving-gateway"]
    assert _selects(gateway_monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert gateway_monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_merged_canary_runs_the_challenger_beside_the_champion_and_nothing_mixes_them():
    objects = _render(_merge(MERGED_CANARY, {"serviceMonitor": {"enabled": True}}))
    champion, challenger = _deployment(objects, "vllm"), _deployment(objects, "vllm-challenger")
    assert challenger["spec"]["replicas"] == 1
    names = {d["metadata"]["name"]: d for d in (champion, challenger)}
    for dep, version in ((champion, "r1-aaaa"), (challenger, "r2-bbbb")):
        server, sidecar = dep["spec"]["template"]["spec"]["containers"]
        assert sidecar["name"] == "metrics-proxy"
        args = server["args"]
        at = args.index("--served-model-name")
        assert args[at + 1:at + 3] == [f"legal-assistant:{version}", "legal-assistant"], "the version first: vLLM names it"
        assert dep["spec"]["template"]["spec"]["initContainers"][0]["args"][0] == f"s3://lawtune/prod/models/legal-assistant/{version}"
    # Every selector that belongs to the champion misses the challenger's pods, and the other way round.
    for obj in by_kind(objects, "Service") + by_kind(objects, "PodDisruptionBudget") + by_kind(objects, "NetworkPolicy"):
        selector = obj["spec"].get("selector", {}).get("matchLabels") or obj["spec"].get("selector") or \
            obj["spec"]["podSelector"]["matchLabels"]
        hits = [n for n, d in names.items() if _selects(selector, _pod_labels(d))]
        assert len(hits) <= 1, (obj["kind"], obj["metadata"]["name"], hits)
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == champion["metadata"]["name"]
    challenger_policy = next(p for p in by_kind(objects, "NetworkPolicy") if p["metadata"]["name"].endswith("-challenger"))
    assert _selects(challenger_policy["spec"]["podSelector"]["matchLabels"], _pod_labels(challenger))
    # The gateway sends the challenger's version to the challenger's Service.
    conf = _nginx_conf(objects)
    assert "server t-lawtune-serving-vllm-challenger:8000;" in conf
    assert '"r2-bbbb" lawtune_vllm_challenger;' in conf and "proxy_pass http://$lawtune_upstream;" in conf
    # The challenger's metrics, like the champion's, only through its metrics sidecar.
    challenger_monitor = next(m for m in by_kind(objects, "ServiceMonitor") if m["metadata"]["name"] == "t-lawtune-serving-vllm-challenger")
    assert [e["port"] for e in challenger_monitor["spec"]["endpoints"]] == ["metrics"]
    challenger_service = next(s for s in by_kind(objects, "Service") if s["metadata"]["name"] == "t-lawtune-serving-vllm-challenger")
    assert {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"} in challenger_service["spec"]["ports"]
    assert {p["port"] for r in challenger_policy["spec"]["ingress"] for p in r["ports"]} == {"http", "metrics"}


def test_the_canary_in_the_hardened_gateway_page_calls_and_network_policy():
    """sec's ui.auth=ingress: page calls are split in the second hop (after the body check, with the key the gateway
    adds, sticky by the user the ingress names), and the gateway's NetworkPolicy admits the scraper to the canary's
    metrics port (and nobody else)."""
    objects = _render(_merge(_merge(ADAPTERS, PAGE_MODES["ingress"]), {"ui": {"enabled": True}, "vllm": {"device": "cpu"}}))
    conf = _nginx_conf(objects)
    hop = conf[conf.index("listen unix:"):]
    assert 'set $lawtune_client_id "u:$http_x_auth_request_email";' in hop
    assert hop.index("set $lawtune_client_id") < hop.index("set $lawtune_version $lawtune_pick;") < hop.index("proxy_set_body $lawtune_body;")
    assert "location @lawtune_ui_fallback" in hop and "error_page 404 = @lawtune_ui_fallback;" in hop
    fallback = hop[hop.index("location @lawtune_ui_fallback"):]
    fallback = fallback[:fallback.index("\n    }")]  # the retry on the version before carries the key, not the page's marks
    assert 'proxy_set_header X-Lawtune-Page-Body "";' in fallback and "/ui-upstream-auth.conf;" in fallback
    assert "proxy_set_header X-Forwarded-For $http_x_forwarded_for;" in fallback
    # The first hop forwards the checked body; the canary does not run there.
    first = conf[:conf.index("listen unix:")]
    page = first[first.index("location = /ui/api/v1/chat/completions"):]
    assert "lawtune_pick" not in page.split("location @ui_rate_limited")[0]
    (policy,) = [p for p in by_kind(objects, "NetworkPolicy") if p["metadata"]["name"].endswith("-gateway")]
    rules = {tuple(p["port"] for p in r["ports"]): r.get("from") for r in policy["spec"]["ingress"]}
    assert rules[("metrics",)] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    gateway = _deployment(objects, "gateway")
    agent = next(c for c in gateway["spec"]["template"]["spec"]["containers"] if c["name"] == "canary-agent")
    assert agent["image"] == "ghcr.io/lawtune/fetch-model:0.1.0-cpu"


@pytest.mark.parametrize(("key", "value"), [
    ("njsModule", "/x.so; load_module /evil.so"), ("scriptDir", "/etc/nginx lawtune"), ("routesDir", "/run/{x}"),
    ("challengerUpstream", "evil:80; server other:81"),
])
def test_canary_values_written_into_nginx_conf_are_refused_unless_plain(key, value):
    with pytest.raises(RenderError, match=f"canary.{key}"):
        _render(_merge(ADAPTERS, {"canary": {key: value}}))


def test_canary_off_renders_no_canary():
    objects = _render({})
    conf = _nginx_conf(objects)
    assert "lawtune_canary" not in conf and "load_module" not in conf and "proxy_pass http://lawtune_vllm;" in conf
    assert not [d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-challenger")]
    assert [c["name"] for c in _deployment(objects, "gateway")["spec"]["template"]["spec"]["containers"]] == ["nginx"]
