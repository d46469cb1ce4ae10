"""charts/lawtune-serving: real `helm lint --strict` and `helm template`, strict Kubernetes schemas
for 1.29 and 1.33, and the invariants public vLLM charts get wrong (HPA target, PDB selector,
/dev/shm, secrets by reference, NetworkPolicy), checked on the rendered objects."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import tempfile

import pytest
import yaml

from tests.helm_utils import REPO, RenderError, by_kind, helm_path, render, validate

CHART = "charts/lawtune-serving"
CHART_DIR = REPO / CHART
# Custom resources: kubernetes-validate ships only the core API's schemas, so these are
# checked field by field below instead (test_custom_resources_structure).
CRD_KINDS = {"ServiceMonitor", "ScaledObject"}
RELEASE = "t"

BASE = yaml.safe_load((CHART_DIR / "ci" / "test-values.yaml").read_text())
DEFAULTS = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
INGRESS_PEERS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
PAGE_MODES = {
    "ingress": {"ui": {"auth": "ingress", "ingress": {"identityHeader": "X-Auth-Request-Email", "from": INGRESS_PEERS}}},
    "pasteKey": {"ui": {"auth": "pasteKey"}},
    "loopback": {"ui": {"auth": "loopback"}, "gateway": {"listenAddress": "127.0.0.1"}},
}


VALUE_SETS = [
    pytest.param({}, id="defaults"),
    pytest.param({"autoscaling": {"type": "keda"}, "serviceMonitor": {"enabled": True}}, id="keda"),
    pytest.param({"maintenance": {"enabled": True, "message": "Offline until 10:00 UTC."}}, id="maintenance-on"),
    pytest.param({"maintenance": {"enabled": True, "scaleVllmToZero": True}}, id="maintenance-scale-to-zero"),
    pytest.param({"vllm": {"tensorParallelSize": 2}}, id="tp2-value"),
    pytest.param({"vllm": {"extraArgs": ["--tensor-parallel-size", "2", "--enable-prefix-caching"]}}, id="tp2-extra-args"),
    pytest.param({"vllm": {"extraArgs": ["-tp=4"]}}, id="tp4-short-extra-arg"),
    pytest.param({"vllm": {"extraArgs": ["--pipeline-parallel-size=2"]}}, id="pp2-extra-arg"),
    pytest.param({"modelStorage": {"type": "existingClaim", "existingClaim": "models-rwx"}}, id="existing-claim"),
    pytest.param({"autoscaling": {"enabled": False}, "vllm": {"replicaCount": 3}}, id="autoscaling-off"),
    pytest.param({"ingress": {"enabled": True, "className": "nginx", "tls": [{"secretName": "tls", "hosts": ["a.example.com"]}],
                              "hosts": [{"host": "a.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}]},
                  "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
                  "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
                                                     "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
                                    "extraIngressFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "batch"}}}]},
                  "vllm": {"nodeSelector": {"pool": "h100"}, "runtimeClassName": "nvidia", "priorityClassName": "inference",
                           "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                           "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                               {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}}},
                  "gateway": {"rateLimit": {"key": "apiKey"}, "realIp": {"trustedCidrs": ["10.0.0.0/8"]}},
                  "imagePullSecrets": [{"name": "regcred"}], "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}}},
                 id="everything-on"),
    pytest.param({"ui": {"enabled": True, "auth": "ingress", "ingress": {
        "identityHeader": "X-Auth-Request-Email",
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]}},
        "ingress": {"enabled": True}}, id="page-ingress"),
    pytest.param({"ui": {"enabled": True, "auth": "loopback"}, "gateway": {"listenAddress": "127.0.0.1"}}, id="page-loopback"),
    pytest.param({"ui": {"enabled": True, "auth": "pasteKey"}, "maintenance": {"enabled": True}}, id="page-paste-key-maintenance"),
    pytest.param({"vllm": {"device": "cpu"}}, id="cpu"),
    pytest.param({"vllm": {"device": "cpu", "tensorParallelSize": 2, "cpu": {"threads": 8, "resources": {
        "requests": {"cpu": "16", "memory": "32Gi"}, "limits": {"cpu": "16", "memory": "32Gi"}}}},
        "model": {"version": "v3"}, "autoscaling": {"enabled": False}, "networkPolicy": {"metricsFrom": []}}, id="cpu-tp2-pinned"),
    pytest.param({"vllm": {"image": {"cudaVariant": "cu129"}, "gpuMemoryUtilization": 0.85,
                           "updateStrategy": {"maxSurge": "25%", "maxUnavailable": 0}}}, id="cu129-surge"),
]


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _render(overrides: dict | None = None, **kwargs) -> list[dict]:
    return render(CHART, _merge(BASE, overrides or {}), release=RELEASE, **kwargs)


def _deployment(objects: list[dict], component: str) -> dict:
    (dep,) = [d for d in by_kind(objects, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return dep


def _pod_labels(dep: dict) -> dict:
    return dep["spec"]["template"]["metadata"]["labels"]


def _containers(objects: list[dict]):
    """Every container spec (init containers and the helm test pod included) with its owner."""
    for obj in objects:
        spec = obj["spec"]["template"]["spec"] if obj["kind"] == "Deployment" else obj["spec"] if obj["kind"] == "Pod" else None
        if spec is None:
            continue
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield obj, spec, container


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _flag(args: list[str], name: str) -> str | None:
    for arg in args:
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


@pytest.fixture(scope="module")
def helm_home():
    with tempfile.TemporaryDirectory(prefix="helm-home-") as home:
        yield {**os.environ, "HOME": home, "HELM_CACHE_HOME": f"{home}/c", "HELM_CONFIG_HOME": f"{home}/f", "HELM_DATA_HOME": f"{home}/d"}


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_helm_lint_strict(helm_home, device):
    proc = subprocess.run([str(helm_path()), "lint", "--strict", str(CHART_DIR), "-f", str(CHART_DIR / "ci" / "test-values.yaml"),
                           "--set", f"vllm.device={device}"],
                          capture_output=True, text=True, env=helm_home, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("overrides", VALUE_SETS)
def test_renders_valid_objects_for_1_29_and_1_33(overrides):
    for kube_version in ("1.29.0", "1.33.0"):
        objects = _render(overrides, kube_version=kube_version)
        core = [o for o in objects if o["kind"] not in CRD_KINDS]
        assert validate(core, versions=(kube_version.rsplit(".", 1)[0],)) == []
        names = [o["metadata"]["name"] for o in objects]
        assert all(len(n) <= 63 for n in names), names


@pytest.mark.parametrize("overrides", VALUE_SETS)
def test_rendered_invariants(overrides):
    values = _merge(BASE, overrides)
    objects = _render(overrides)
    vllm, gateway = _deployment(objects, "vllm"), _deployment(objects, "gateway")
    deployments = {d["metadata"]["name"]: d for d in by_kind(objects, "Deployment")}

    # Autoscalers target the vLLM Deployment that is really rendered.
    for scaler in by_kind(objects, "HorizontalPodAutoscaler") + by_kind(objects, "ScaledObject"):
        ref = scaler["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
        assert ref["name"] == vllm["metadata"]["name"] and ref["name"] in deployments
    # With an autoscaler, replicas are the autoscaler's; without, the chart's.
    if by_kind(objects, "HorizontalPodAutoscaler") or by_kind(objects, "ScaledObject"):
        assert "replicas" not in vllm["spec"]

    # Every PDB and Service selects the pods of a rendered Deployment (never nothing).
    for pdb in by_kind(objects, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(_selects(selector, _pod_labels(d)) for d in deployments.values()), pdb["metadata"]["name"]
    for svc in by_kind(objects, "Service"):
        assert any(_selects(svc["spec"]["selector"], _pod_labels(d)) for d in deployments.values())
    for dep in deployments.values():
        assert _selects(dep["spec"]["selector"]["matchLabels"], _pod_labels(dep))

    # Secrets only by reference: nothing rendered carries secret data.
    assert by_kind(objects, "Secret") == []
    secret_names = {values["apiKey"]["existingSecret"], values["artifactStore"]["credentialsSecret"]}
    for _, _, container in _containers(objects):
        for env in container.get("env", []):
            if re.search(r"KEY|SECRET|TOKEN|PASSWORD", env["name"]):
                assert "value" not in env, f"{container['name']} sets {env['name']} as a literal"
                assert env["valueFrom"]["secretKeyRef"]["name"] in secret_names

    # Hardened, pinned containers.
    for owner, spec, container in _containers(objects):
        image = container["image"]
        assert re.match(r"^[^:@]+(:[^:]+)$", image) and not image.endswith(":latest"), image
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "initialDelaySeconds" not in container.get(probe, {}), f"{container['name']}: use a startupProbe"

    # vLLM: probes, /dev/shm exactly when sharded, GPUs per shard, the key from the Secret.
    pod = vllm["spec"]["template"]["spec"]
    server, sidecar = pod["containers"]
    assert (server["name"], sidecar["name"]) == ("vllm", "metrics-proxy")
    args = server["args"]
    extra = [str(a) for a in values.get("vllm", {}).get("extraArgs", [])]
    tp = int(values.get("vllm", {}).get("tensorParallelSize", 1))
    for i, arg in enumerate(extra):
        if arg in ("--tensor-parallel-size", "-tp"):
            tp = int(extra[i + 1])
        elif arg.startswith(("--tensor-parallel-size=", "-tp=")):
            tp = int(arg.split("=", 1)[1])
    pp = int(next((a.split("=", 1)[1] for a in extra if a.startswith("--pipeline-parallel-size=")), 1))
    shm_mounts = [m for m in server["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    shm_volumes = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory" and v["name"] != "keys"]
    assert bool(shm_mounts) == (tp * pp > 1) == bool(shm_volumes)
    if shm_mounts:
        assert shm_mounts[0]["name"] == shm_volumes[0]["name"]
    if values.get("vllm", {}).get("device") == "cpu":
        assert "nvidia.com/gpu" not in json.dumps(server["resources"]) and server["resources"]["limits"]["cpu"]
    else:
        assert server["resources"]["limits"]["nvidia.com/gpu"] == tp * pp
        assert server["resources"]["requests"]["nvidia.com/gpu"] == tp * pp
    tp_in_extra = any(a.startswith(("--tensor-parallel-size", "-tp")) for a in extra)
    # One source of the flag: the value's, unless extraArgs carry it (they pass through as given).
    assert ([f"--tensor-parallel-size={tp}"] if not tp_in_extra else []) == [a for a in args if a.startswith("--tensor-parallel-size=")
                                                                             and a not in extra]
    assert args[-len(extra):] == extra if extra else True
    assert server["startupProbe"]["httpGet"]["path"] == "/health"
    assert server["readinessProbe"]["httpGet"]["path"] == server["livenessProbe"]["httpGet"]["path"] == "/health"
    assert server["lifecycle"]["preStop"]["exec"]["command"][1] == "/etc/lawtune/drain.py"
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert _flag(args, "--served-model-name") == "legal-assistant"
    # The keys reach vLLM in a config file the api-keys init container wrote, never as env or an argument.
    assert "HF_HUB_OFFLINE" in {e["name"] for e in server["env"]} and "VLLM_API_KEY" not in {e["name"] for e in server["env"]}
    assert args[:2] == ["--config", "/etc/lawtune-keys/vllm-api-keys.yaml"]
    fetch, keys = pod["initContainers"]
    assert keys["name"] == "api-keys" and keys["image"] == server["image"]
    assert fetch["command"] == ["python", "-m", "jobs.fetch_model"]
    version = values.get("model", {}).get("version")
    suffix = f"/{version}" if version else ""
    assert fetch["args"] == [f"s3://lawtune/prod/models/legal-assistant{suffix}", f"/models/legal-assistant{suffix}"]
    assert _flag(args, "--model") == fetch["args"][1]
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    if values.get("modelStorage", {}).get("type") == "existingClaim":
        assert models == {"name": "models", "persistentVolumeClaim": {"claimName": "models-rwx"}}
    else:
        assert "emptyDir" in models

    # Only the gateway (and the metrics scraper, on the metrics sidecar's port, and extra peers) reach vLLM.
    (policy,) = [p for p in by_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == vllm["metadata"]["name"]]
    assert policy["spec"]["podSelector"]["matchLabels"] == vllm["spec"]["selector"]["matchLabels"]
    rule, *metrics_rules = policy["spec"]["ingress"]
    peers = rule["from"]
    assert _selects(peers[0]["podSelector"]["matchLabels"], _pod_labels(gateway))
    assert not _selects(peers[0]["podSelector"]["matchLabels"], _pod_labels(vllm))
    assert peers[1:] == values.get("networkPolicy", {}).get("extraIngressFrom", [])
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    metrics_from = values.get("networkPolicy", {}).get("metricsFrom", DEFAULTS["networkPolicy"]["metricsFrom"])
    assert [r["from"] for r in metrics_rules] == ([metrics_from] if metrics_from else [])
    assert all(r["ports"] == [{"port": "metrics", "protocol": "TCP"}] for r in metrics_rules)

    # The gateway mounts the rendered config and the key file written by its init container.
    gw_pod = gateway["spec"]["template"]["spec"]
    (keys_init,) = gw_pod["initContainers"]
    assert keys_init["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "lawtune-api-key", "key": "api-key"}
    config_volume = next(v for v in gw_pod["volumes"] if v["name"] == "config")["configMap"]["name"]
    assert "nginx.conf" in next(c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"] == config_volume)["data"]


@pytest.mark.parametrize(("overrides", "kind", "count"), [
    pytest.param({}, "HorizontalPodAutoscaler", 1, id="hpa-default"),
    pytest.param({"autoscaling": {"type": "keda"}}, "ScaledObject", 1, id="keda"),
    pytest.param({"autoscaling": {"type": "keda"}}, "HorizontalPodAutoscaler", 0, id="keda-no-hpa"),
    pytest.param({"autoscaling": {"enabled": False}}, "HorizontalPodAutoscaler", 0, id="off"),
    pytest.param({"maintenance": {"enabled": True, "scaleVllmToZero": True}}, "HorizontalPodAutoscaler", 0, id="zero-no-hpa"),
    pytest.param({}, "ServiceMonitor", 0, id="servicemonitor-off-by-default"),
    pytest.param({}, "Ingress", 0, id="ingress-off-by-default"),
])
def test_optional_objects(overrides, kind, count):
    assert len(by_kind(_render(overrides), kind)) == count


def test_hpa_scales_on_the_adapter_queue_metric_with_behaviour():
    (hpa,) = by_kind(_render(), "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert set(hpa["spec"]["behavior"]) == {"scaleUp", "scaleDown"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)


def test_custom_resources_structure():
    objects = _render({"autoscaling": {"type": "keda"}, "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}},
                      extra_args=["--namespace", "serving"])
    vllm = _deployment(objects, "vllm")
    (so,) = by_kind(objects, "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (1, 4)
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert meta["query"] == f'sum(vllm:num_requests_waiting{{namespace="serving",service="{vllm["metadata"]["name"]}"}})'
    assert meta["threshold"] == "4" and meta["serverAddress"].startswith("http")
    assert set(so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]) == {"scaleUp", "scaleDown"}
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values must be strings"

    (sm,) = by_kind(objects, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kps"
    (svc,) = [s for s in by_kind(objects, "Service") if s["metadata"]["name"] == vllm["metadata"]["name"]]
    assert _selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["serving"]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]} and endpoint["path"] == "/metrics"
    assert endpoint["port"] == "metrics"  # the sidecar, /metrics only (issue 24 item 5)


def test_maintenance_leaves_vllm_alone_and_rolls_only_the_gateway():
    off, on = _render(), _render({"maintenance": {"enabled": True}})
    assert _deployment(off, "vllm") == _deployment(on, "vllm")
    checksum = lambda objs: _deployment(objs, "gateway")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]  # noqa: E731
    assert checksum(off) != checksum(on)
    assert by_kind(off, "HorizontalPodAutoscaler") == by_kind(on, "HorizontalPodAutoscaler")

    zero = _render({"maintenance": {"enabled": True, "scaleVllmToZero": True}})
    assert _deployment(zero, "vllm")["spec"]["replicas"] == 0


def test_nginx_conf_follows_values():
    conf = lambda objs: next(c for c in by_kind(objs, "ConfigMap") if "nginx.conf" in c["data"])["data"]["nginx.conf"]  # noqa: E731
    default = conf(_render())
    assert f"server {RELEASE}-lawtune-serving-vllm:8000;" in default
    # Valid keys count per client IP, bad or missing keys per IP in a zone of their own.
    assert re.search(r"map \$lawtune_key_ok \$lawtune_client \{\s+1 \$binary_remote_addr;\s+default \"\";", default)
    assert "limit_req_zone $lawtune_client zone=lawtune_api:10m rate=5r/s;" in default
    assert "limit_req zone=lawtune_api burst=10 nodelay;" in default
    assert "limit_req_zone $lawtune_guesser zone=lawtune_invalid_key:10m rate=1r/s;" in default
    assert "limit_req zone=lawtune_invalid_key burst=10 nodelay;" in default
    assert "auth_request /_lawtune_key;" in default
    assert "client_max_body_size 1m;" in default and "proxy_buffering off;" in default
    by_key = conf(_render({"gateway": {"rateLimit": {"key": "apiKey", "requestsPerSecond": 50}, "maxBodySize": "4m"}}))
    assert re.search(r"\$lawtune_client \{\s+1 \$http_authorization;", by_key)
    assert "limit_req_zone $lawtune_client zone=lawtune_api:10m rate=50r/s;" in by_key
    assert "client_max_body_size 4m;" in by_key
    no_limit = conf(_render({"gateway": {"rateLimit": {"enabled": False}}}))
    assert "limit_req " not in no_limit and "auth_request /_lawtune_key;" in no_limit
    maintenance = conf(_render({"maintenance": {"enabled": True, "message": 'Back at "10:00"', "retryAfterSeconds": 60}}))
    assert "add_header Retry-After 60 always;" in maintenance
    body = re.search(r"return 503 '(.*)';", maintenance).group(1).replace("\\\\", "\\")
    assert json.loads(body.replace("\\'", "'"))["error"]["message"] == 'Back at "10:00"'
    assert "proxy_pass" not in maintenance


def test_helm_test_pod_lists_models_and_chats():
    (pod,) = by_kind(_render({"model": {"servedModelName": "lawyer"}}), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["command"][-1]
    assert "/v1/models" in script and "/v1/chat/completions" in script and '"id":"lawyer"' in script
    assert f"http://{RELEASE}-lawtune-serving-gateway:80" in script


def test_long_release_names_are_cut_to_63():
    objects = render(CHART, BASE, release="a" * 53)
    assert all(len(o["metadata"]["name"]) <= 63 for o in objects)
    assert len({o["metadata"]["name"] for o in by_kind(objects, "Deployment")}) == 2


@pytest.mark.parametrize(("overrides", "message"), [
    pytest.param({"apiKey": {"existingSecret": ""}}, "apiKey.existingSecret is required", id="no-api-key-secret"),
    pytest.param({"artifactStore": {"root": ""}}, "artifactStore.root is required", id="no-artifact-root"),
    pytest.param({"modelStorage": {"type": "existingClaim"}}, "modelStorage.existingClaim is required", id="claim-without-name"),
    pytest.param({"vllm": {"tensorParallelSize": 4, "extraArgs": ["--tensor-parallel-size=2"]}}, "contradicts", id="tp-conflict"),
    pytest.param({"vllm": {"extraArgs": ["-tp", "two"]}}, "is not a positive integer", id="tp-not-a-number"),
    pytest.param({"autoscaling": {"minReplicas": 5}}, "autoscaling.minReplicas (5) is above", id="min-above-max"),
    pytest.param({"vllm": {"image": {"tag": "latest"}}}, "vllm.image.tag", id="latest-tag"),
    pytest.param({"gateway": {"rateLimit": {"key": "cookie"}}}, "gateway.rateLimit.key", id="bad-rate-limit-key"),
    pytest.param({"maintenance": {"message": "costs $5"}}, "maintenance.message", id="dollar-in-message"),
    pytest.param({"vllm": {"replicas": 2}}, "replicas", id="unknown-key"),
    pytest.param({"ui": {"enabled": True}}, "ui.auth is required with ui.enabled", id="page-without-auth-mode"),
    pytest.param({"ui": {"enabled": True, "auth": "none"}}, "ui.auth", id="page-unknown-auth-mode"),
    pytest.param({"networkPolicy": {"metricsFrom": []}}, "networkPolicy.metricsFrom is empty while autoscaling", id="autoscaling-without-scraper"),
    pytest.param({"networkPolicy": {"metricsFrom": []}, "autoscaling": {"type": "keda"}}, "networkPolicy.metricsFrom is empty", id="keda-without-scraper"),
    pytest.param({"networkPolicy": {"metricsFrom": []}, "autoscaling": {"enabled": False}, "serviceMonitor": {"enabled": True}},
                 "networkPolicy.metricsFrom is empty", id="servicemonitor-without-scraper"),
    pytest.param({"gateway": {"workerProcesses": "auto"}}, "gateway.workerProcesses", id="worker-processes-auto"),
    pytest.param({"gateway": {"upstreamKeepaliveSeconds": 290}}, "gateway.upstreamKeepaliveSeconds (290) must stay below the drain window",
                 id="keepalive-beyond-drain-window"),
    pytest.param({"vllm": {"device": "tpu"}}, "vllm.device", id="unknown-device"),
    pytest.param({"vllm": {"image": {"cudaVariant": "12.9"}}}, "vllm.image.cudaVariant", id="bad-cuda-variant"),
    # issue 24 item 4: a keyless page proxy only behind the authenticating ingress, or on loopback.
    pytest.param(_merge(PAGE_MODES["ingress"], {"ui": {"enabled": True}, "gateway": {"service": {"type": "LoadBalancer"}}}),
                 "ui.auth=ingress with gateway.service.type=LoadBalancer", id="page-ingress-on-a-load-balancer"),
    pytest.param(_merge(PAGE_MODES["ingress"], {"ui": {"enabled": True, "ingress": {"identityHeader": ""}}}),
                 "ui.ingress.identityHeader is required with ui.auth=ingress", id="page-ingress-without-identity-header"),
    pytest.param(_merge(PAGE_MODES["ingress"], {"ui": {"enabled": True, "ingress": {"from": []}}}),
                 "ui.ingress.from is required with ui.auth=ingress", id="page-ingress-without-peers"),
    pytest.param(_merge(PAGE_MODES["ingress"], {"ui": {"enabled": True, "ingress": {"containerPort": 8080}}}),
                 "ui.ingress.containerPort (8080) must differ", id="page-port-is-the-api-port"),
    pytest.param({"ui": {"enabled": True, "auth": "loopback"}}, "ui.auth=loopback needs gateway.listenAddress on loopback",
                 id="page-loopback-on-all-addresses"),
    pytest.param({"ui": {"enabled": True, "auth": "loopback"}, "gateway": {"listenAddress": "10.0.0.5"}},
                 "ui.auth=loopback needs gateway.listenAddress on loopback", id="page-loopback-on-a-pod-address"),
])
def test_bad_values_fail_naming_the_key(overrides, message):
    with pytest.raises(RenderError, match=re.escape(message)):
        _render(overrides)


def _schema_paths(node: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, sub in node.get("properties", {}).items():
        out.add(prefix + key)
        out |= _schema_paths(sub, f"{prefix}{key}.")
    return out


def _values_paths(node, schema: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in node.items():
        out.add(prefix + key)
        sub = schema.get("properties", {}).get(key, {})
        if isinstance(value, dict) and "properties" in sub:  # free-form objects (resources: ...) hold data, not keys
            out |= _values_paths(value, sub, f"{prefix}{key}.")
    return out


def test_values_and_schema_in_sync_and_every_key_documented():
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert _values_paths(values, schema) == _schema_paths(schema)

    # Each documented key line is preceded by a `# --` comment (helm-docs), at its own indentation.
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    undocumented = []
    documented_paths = _schema_paths(schema)
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][A-Za-z0-9]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        stack = [(d, k) for d, k in stack if d < indent] + [(indent, m.group(2))]
        path = ".".join(k for _, k in stack)
        if path not in documented_paths:
            continue
        prev = lines[i - 1].strip() if i else ""
        if not prev.startswith("# --"):
            undocumented.append(path)
    assert undocumented == []


def _nginx_conf(objects: list[dict]) -> str:
    return next(c for c in by_kind(objects, "ConfigMap") if "nginx.conf" in c["data"])["data"]["nginx.conf"]


def test_page_is_off_by_default():
    objects = _render()
    assert [c for c in by_kind(objects, "ConfigMap") if "index.html" in c["data"]] == []
    conf = _nginx_conf(objects)
    assert "location = / {" not in conf and "/ui/" not in conf and "lawtune_ui" not in conf
    assert "ui-upstream-auth" not in _deployment(objects, "gateway")["spec"]["template"]["spec"]["initContainers"][0]["command"][-1]


@pytest.mark.parametrize("auth", list(PAGE_MODES))
def test_page_files_config_and_auth_mode(auth):
    objects = _render(_merge(PAGE_MODES[auth], {"ui": {"enabled": True, "notice": "Not legal advice.", "statusPollSeconds": 7},
                                                "model": {"version": "v3"}}))
    (page,) = [c for c in by_kind(objects, "ConfigMap") if "index.html" in c["data"]]
    assert set(page["data"]) == {"index.html", "app.js", "app.css", "config.json"}
    config = json.loads(page["data"]["config.json"])
    assert config == {"title": "Legal assistant", "notice": "Not legal advice.", "auth": auth, "model": "legal-assistant",
                      "modelVersion": "v3", "statusPollSeconds": 7, "maxTokens": 512,
                      "apiPath": "/v1/chat/completions" if auth == "pasteKey" else "/ui/api/v1/chat/completions"}
    gateway = _deployment(objects, "gateway")
    pod = gateway["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "ui")["configMap"]["name"] == page["metadata"]["name"]
    assert {"name": "ui", "mountPath": "/etc/nginx/lawtune-ui", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert "checksum/ui" in gateway["spec"]["template"]["metadata"]["annotations"]
    conf = _nginx_conf(objects)
    assert "location = / {" in conf and "location /ui/ {" in conf and "location = /ui/status {" in conf
    script = pod["initContainers"][0]["command"][-1]
    if auth == "pasteKey":
        assert "ui-upstream-auth" not in script and "/ui/api/" not in conf and "lawtune_ui" not in conf
    else:
        # The key reaches nginx through the init container's file, never through values or the page.
        assert 'proxy_set_header Authorization "Bearer %s"' in script
        assert "include /etc/nginx/keys/ui-upstream-auth.conf;" in conf
        assert "limit_req_zone $binary_remote_addr zone=lawtune_ui:10m rate=20r/m;" in conf
        assert "limit_req zone=lawtune_ui burst=5 nodelay;" in conf


def test_ingress_mode_serves_the_page_on_a_port_only_the_ingress_controller_reaches():
    """issue 24 item 4: the keyless page API listens on its own port; the gateway's NetworkPolicy
    admits the ingress controller (ui.ingress.from) there and everyone to the API port; the Service
    and the chart's Ingress carry the page port."""
    objects = _render(_merge(PAGE_MODES["ingress"], {"ui": {"enabled": True}, "ingress": {"enabled": True}}))
    gateway = _deployment(objects, "gateway")
    ports = {p["name"]: p["containerPort"] for p in gateway["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"http": 8080, "page": 8081}
    conf = _nginx_conf(objects)
    api_server, page_server = re.findall(r"\n    server \{\n        listen (\d+);(.*?)\n    \}", conf, re.S)[:2]
    assert api_server[0] == "8080" and "/ui/api/" not in api_server[1] and "location = / {" not in api_server[1]
    assert page_server[0] == "8081" and "location = /ui/api/v1/chat/completions" in page_server[1]
    (svc,) = [s for s in by_kind(objects, "Service") if s["metadata"]["name"] == gateway["metadata"]["name"]]
    assert {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]} == {"http": "http", "page": "page"}
    (ingress,) = by_kind(objects, "Ingress")
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] == {"name": "page"}
    (policy,) = [p for p in by_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == gateway["metadata"]["name"]]
    assert policy["spec"]["podSelector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]
    ingress_ns, other_ns = {"kubernetes.io/metadata.name": "ingress-nginx"}, {"kubernetes.io/metadata.name": "default"}
    assert _admitted(policy, namespace="ingress-nginx", ns_labels=ingress_ns, pod_labels={"app": "controller"}, port="page")
    assert not _admitted(policy, namespace="default", ns_labels=other_ns, pod_labels={"app": "x"}, port="page")
    assert not _admitted(policy, namespace="lawtune", ns_labels={"kubernetes.io/metadata.name": "lawtune"},
                         pod_labels={"app": "x"}, port="page")
    assert _admitted(policy, namespace="default", ns_labels=other_ns, pod_labels={"app": "x"}, port="http")
    # Without the page (or with the other modes) no policy selects the gateway: nothing changes for the API.
    for mode in ("pasteKey", "loopback"):
        names = [p["metadata"]["name"] for p in by_kind(_render(_merge(PAGE_MODES[mode], {"ui": {"enabled": True}})), "NetworkPolicy")]
        assert gateway["metadata"]["name"] not in names


def test_page_changes_roll_only_the_gateway():
    base = {"ui": {"enabled": True, "auth": "pasteKey"}}
    one, two = _render(base), _render(_merge(base, {"ui": {"notice": "Another notice."}}))
    annotations = lambda objs: _deployment(objs, "gateway")["spec"]["template"]["metadata"]["annotations"]  # noqa: E731
    assert annotations(one)["checksum/ui"] != annotations(two)["checksum/ui"]
    assert _deployment(one, "vllm") == _deployment(two, "vllm")


# ---- issue 12: what a real cluster would break ----------------------------------------------

def _matches(selector: dict | None, labels: dict) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels and matchExpressions); {} selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, vals = expr["key"], expr["operator"], expr.get("values", [])
        if (op == "In" and labels.get(key) not in vals) or (op == "NotIn" and key in labels and labels[key] in vals) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def _admitted(policy: dict, *, namespace: str, ns_labels: dict, pod_labels: dict, policy_namespace: str = "lawtune",
              port: str = "http") -> bool:
    """Whether a NetworkPolicy's ingress rules let a pod reach the policed pods' ``port``
    (NetworkPolicyPeer semantics: podSelector alone = same namespace; namespaceSelector [+ podSelector];
    a rule without `from` admits every source)."""
    for rule in policy["spec"].get("ingress", []):
        if not any(p.get("port") == port for p in rule.get("ports", [{"port": port}])):
            continue
        if "from" not in rule:
            return True
        for peer in rule.get("from", []):
            if "namespaceSelector" in peer:
                ns_ok = _matches(peer["namespaceSelector"], ns_labels)
            else:
                ns_ok = namespace == policy_namespace
            if ns_ok and ("podSelector" not in peer or _matches(peer["podSelector"], pod_labels)):
                return True
    return False


def test_prometheus_in_the_monitoring_namespace_reaches_vllm_metrics_by_default():
    """Item 1: with default values the HPA's metric source (Prometheus, which kube-prometheus-stack
    installs into `monitoring`) is admitted to vLLM's port; an arbitrary pod elsewhere is not."""
    (policy,) = by_kind(_render(), "NetworkPolicy")
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    assert _admitted(policy, namespace="monitoring", ns_labels=monitoring, pod_labels=prometheus, port="metrics")
    # issue 24 item 5: the scraper reaches the metrics sidecar, not vLLM's own port (keyless /tokenize, /invocations).
    assert not _admitted(policy, namespace="monitoring", ns_labels=monitoring, pod_labels=prometheus, port="http")
    gateway = _pod_labels(_deployment(_render(), "gateway"))
    assert _admitted(policy, namespace="lawtune", ns_labels={"kubernetes.io/metadata.name": "lawtune"}, pod_labels=gateway)
    assert not _admitted(policy, namespace="default", ns_labels={"kubernetes.io/metadata.name": "default"}, pod_labels={"app": "x"})
    assert not _admitted(policy, namespace="lawtune", ns_labels={"kubernetes.io/metadata.name": "lawtune"}, pod_labels={"app": "x"})
    # Autoscaling off: an empty metricsFrom is allowed and then nothing but the gateway gets in.
    (closed,) = by_kind(_render({"autoscaling": {"enabled": False}, "networkPolicy": {"metricsFrom": []}}), "NetworkPolicy")
    assert not _admitted(closed, namespace="monitoring", ns_labels=monitoring, pod_labels=prometheus, port="metrics")


def test_vllm_env_gives_a_user_name_to_a_uid_without_passwd_entry(tmp_path):
    """Item 2: the upstream vLLM image has no passwd entry for the chart's uid, and
    getpass.getuser() (Triton's and Inductor's cache paths) raises KeyError there. Run it with the
    rendered container env as a uid this machine has no entry for either."""
    import pwd

    uid = next(u for u in range(54321, 60000) if not _has_passwd_entry(pwd, u))
    vllm = _deployment(_render({"vllm": {"podSecurityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid}}}), "vllm")
    server = vllm["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in server["env"] if "value" in e}
    env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as a uid without a passwd entry")
    ctx = vllm["spec"]["template"]["spec"]["securityContext"]
    proc = subprocess.run(["python3", "-c", "import getpass, os; print(getpass.getuser(), os.path.expanduser('~'))"],
                          env=env, user=ctx["runAsUser"], group=ctx["runAsGroup"], extra_groups=[], cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    user, home = proc.stdout.split()
    assert user and home == env["HOME"]


def _has_passwd_entry(pwd, uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


@pytest.mark.parametrize(("overrides", "image"), [
    pytest.param({}, "vllm/vllm-openai:v0.32.0", id="cuda13-default"),
    pytest.param({"vllm": {"image": {"cudaVariant": "cu129"}}}, "vllm/vllm-openai:v0.32.0-cu129", id="cuda12-one-value"),
    pytest.param({"vllm": {"device": "cpu"}}, "vllm/vllm-openai-cpu:v0.32.0", id="cpu-same-release"),
    pytest.param({"vllm": {"device": "cpu", "image": {"tag": "v0.33.1"}}}, "vllm/vllm-openai-cpu:v0.33.1", id="cpu-follows-the-tag"),
])
def test_vllm_image_per_device_and_cuda_variant(overrides, image):
    """Item 3 and issue 19: the CUDA-12 build is one value; CPU mode serves the same release's CPU image."""
    server = _deployment(_render(overrides), "vllm")["spec"]["template"]["spec"]["containers"][0]
    assert server["image"] == image
    assert DEFAULTS["vllm"]["image"]["tag"] == f"v{yaml.safe_load((CHART_DIR / 'Chart.yaml').read_text())['appVersion'].lstrip('v')}"


def test_rollout_needs_no_spare_gpu_by_default():
    """Item 4: the default 25% surge would need a spare GPU on a full pool; the default replaces in place."""
    strategy = _deployment(_render(), "vllm")["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    surge = _deployment(_render({"vllm": {"updateStrategy": {"maxSurge": 1, "maxUnavailable": 0}}}), "vllm")["spec"]["strategy"]
    assert surge["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def _pod_template(objects: list[dict], component: str) -> dict:
    return _deployment(objects, component)["spec"]["template"]


def test_model_version_and_api_key_roll_every_pod_and_show_to_clients():
    """Item 5: a pinned version reaches the fetch, vLLM's model path (/v1/models' `root`), a pod
    annotation and the gateway's response header; a new version or key revision changes the pod
    templates (so every pod rolls) and nothing else changes them."""
    v1, v2 = _render({"model": {"version": "sample-aaaa"}}), _render({"model": {"version": "sample-bbbb"}})
    vllm = _pod_template(v1, "vllm")
    assert vllm["metadata"]["annotations"]["lawtune.io/model-version"] == "sample-aaaa"
    server = vllm["spec"]["containers"][0]
    assert _flag(server["args"], "--model") == "/models/legal-assistant/sample-aaaa"
    assert _flag(server["args"], "--served-model-name") == "legal-assistant"
    assert vllm["spec"]["initContainers"][0]["args"][0].endswith("/models/legal-assistant/sample-aaaa")
    conf = next(c for c in by_kind(v1, "ConfigMap") if "nginx.conf" in c["data"])["data"]["nginx.conf"]
    assert 'add_header X-Lawtune-Model-Version "sample-aaaa" always;' in conf
    assert _pod_template(v1, "vllm") != _pod_template(v2, "vllm")
    assert _pod_template(v1, "gateway") != _pod_template(v2, "gateway")  # its config carries the header

    # A key rotation: same Secret name, new revision -> both Deployments roll.
    rotated = _render({"model": {"version": "sample-aaaa"}, "apiKey": {"revision": "2"}})
    for component in ("vllm", "gateway"):
        before = _pod_template(v1, component)["metadata"]["annotations"]["checksum/api-key"]
        after = _pod_template(rotated, component)["metadata"]["annotations"]["checksum/api-key"]
        assert before != after, component
    assert _pod_template(_render({"model": {"version": "sample-aaaa"}}), "vllm") == vllm  # stable across renders
    floating = _pod_template(_render(), "vllm")["metadata"]["annotations"]["lawtune.io/model-version"]
    assert floating == "PROMOTED-at-pod-start"


@pytest.mark.parametrize(("cpu", "workers"), [
    pytest.param("100m", 1, id="100m"), pytest.param("1", 1, id="1"), pytest.param("2500m", 2, id="2500m"),
    pytest.param(4, 4, id="4-int"), pytest.param(None, 1, id="no-request"),
])
def test_gateway_workers_follow_the_cpu_request(cpu, workers):
    """Item 7: `auto` counts the node's cores; the count now follows the pod's CPU request."""
    requests = {"memory": "64Mi"} | ({"cpu": cpu} if cpu is not None else {})
    objects = _render({"gateway": {"resources": {"requests": requests, "limits": {"memory": "256Mi"}}}})
    conf = next(c for c in by_kind(objects, "ConfigMap") if "nginx.conf" in c["data"])["data"]["nginx.conf"]
    assert re.search(r"^worker_processes (\S+);", conf, re.M).group(1) == str(workers)
    pinned = _render({"gateway": {"workerProcesses": 3}})
    assert "worker_processes 3;" in next(c for c in by_kind(pinned, "ConfigMap") if "nginx.conf" in c["data"])["data"]["nginx.conf"]


def test_drain_waits_for_the_gateway_keepalive_bound():
    """Item 6 (render side): the gateway retires upstream connections within upstreamKeepaliveSeconds,
    and vLLM's preStop waits the endpoint delay plus that bound before it trusts zero in-flight
    (tests/charts/test_lawtune_serving_drain.py runs it with real nginx)."""
    objects = _render({"gateway": {"upstreamKeepaliveSeconds": 7}, "vllm": {"preStopDelaySeconds": 4}})
    conf = next(c for c in by_kind(objects, "ConfigMap") if "nginx.conf" in c["data"])["data"]["nginx.conf"]
    upstream = re.search(r"upstream lawtune_vllm \{(.*?)\}", conf, re.S).group(1)
    assert "keepalive_time 7s;" in upstream and "keepalive_timeout 7s;" in upstream
    server = _deployment(objects, "vllm")["spec"]["template"]["spec"]["containers"][0]
    assert server["lifecycle"]["preStop"]["exec"]["command"][2:] == ["8000", "11", "290"]


# ---- issue 26: the serving contract ------------------------------------------------------------

@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_vllm_gets_the_contracts_template_and_generation_config(device):
    """fetch-model verified the version against its serving contract; vLLM is told to use exactly its files."""
    pod = _pod_template(_render({"vllm": {"device": device}}), "vllm")["spec"]
    args = pod["containers"][0]["args"]
    folder = "/models/legal-assistant"
    assert args.count("--config") == 1 and not any(a.startswith("--config=") for a in args), "vLLM reads one --config file"
    assert _flag(args, "--chat-template") == f"{folder}/chat_template.jinja"
    assert _flag(args, "--generation-config") == folder, "its eos_token_id lists the stop tokens"
    assert _flag(args, "--dtype") is None, "a --dtype flag would override the contract's"
    (keys,) = [c for c in pod["initContainers"] if c["name"] == "api-keys"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in keys["volumeMounts"]
    explicit = _pod_template(_render({"vllm": {"device": device, "dtype": "float16"}}), "vllm")["spec"]["containers"][0]["args"]
    assert _flag(explicit, "--dtype") == "float16"
    legacy = _pod_template(_render({"vllm": {"device": device, "servingContract": False}}), "vllm")["spec"]
    assert not any(a.startswith(("--chat-template", "--generation-config")) for a in legacy["containers"][0]["args"])
    assert _flag(legacy["containers"][0]["args"], "--dtype") == ("bfloat16" if device == "cpu" else None)
    (keys,) = [c for c in legacy["initContainers"] if c["name"] == "api-keys"]
    assert "lawtune-vllm.yaml" not in keys["command"][-1] and all(m["name"] != "models" for m in keys["volumeMounts"])


def _vllm_args_after_init(tmp_path, values: dict, contract_file: str | None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the vLLM pod's api-keys init script on a model folder under tmp_path (holding ``contract_file`` as its
    lawtune-vllm.yaml, if any) and return it with the vLLM container's args pointing at the file it wrote."""
    pod = _pod_template(_render(values), "vllm")["spec"]
    (init,) = [c for c in pod["initContainers"] if c["name"] == "api-keys"]
    keys_file, folder = "/etc/lawtune-keys/vllm-api-keys.yaml", "/models/legal-assistant"
    (tmp_path / "model").mkdir()
    if contract_file is not None:
        (tmp_path / "model" / "lawtune-vllm.yaml").write_text(contract_file, encoding="utf-8")
    script = init["command"][-1].replace(keys_file, str(tmp_path / "keys.yaml")).replace(folder, str(tmp_path / "model"))
    proc = subprocess.run(["sh", "-c", script], env={"PATH": "/usr/bin:/bin", "LAWTUNE_API_KEY": "k" * 32},
                          capture_output=True, text=True, timeout=30)
    args = [str(tmp_path / "keys.yaml") if a == keys_file else a.replace(folder, str(tmp_path / "model"))
            for a in pod["containers"][0]["args"]]
    return proc, args


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_vllm_parses_the_contracts_dtype_and_decoding_beside_the_keys(tmp_path, device):
    """vLLM's own argument parser, on the pod's args after its init containers ran: the keys and the version's
    lawtune-vllm.yaml arrive through the one --config file vLLM reads (a second --config is refused by vLLM,
    and a --config=<path> form is not read at all)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from shared.store.serving_contract import vllm_config

    contract = {"dtype": "float32", "generation": {"do_sample": False, "repetition_penalty": 1.1}}
    proc, args = _vllm_args_after_init(tmp_path, {"vllm": {"device": device}}, yaml.safe_dump(vllm_config(contract)))
    assert proc.returncode == 0, proc.stderr
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(args)
    assert parsed.api_key == ["k" * 32]
    assert parsed.dtype == "float32", "the evaluated dtype"
    assert parsed.override_generation_config == {"repetition_penalty": 1.1, "temperature": 0.0}, "evaluate's decoding"


def test_a_version_without_engine_settings_stops_the_pod_naming_the_switch(tmp_path):
    proc, _ = _vllm_args_after_init(tmp_path, {}, None)
    assert proc.returncode == 2 and "has no lawtune-vllm.yaml" in proc.stderr and "vllm.servingContract=false" in proc.stderr


# ---- issue 19: CPU mode -----------------------------------------------------------------------

def test_cpu_mode_runs_the_engine_settings_of_make_serve():
    """vllm.device=cpu: the CPU image, CPU/memory resources, no GPU request, no GPU memory
    fraction, and the flags and environment shared/serve/serve_local.py uses for `make serve`."""
    from shared.serve.serve_local import CPU_SERVER_ARGS

    objects = _render({"vllm": {"device": "cpu"}})
    pod = _pod_template(objects, "vllm")["spec"]
    server, sidecar = pod["containers"]
    assert (server["name"], sidecar["name"]) == ("vllm", "metrics-proxy")
    args = server["args"]
    local = dict(zip(CPU_SERVER_ARGS[::2], CPU_SERVER_ARGS[1::2]))
    for flag, value in local.items():
        if flag != "--dtype":  # the version's evaluated dtype, from its serving contract (below)
            assert _flag(args, flag) == value, flag
    assert _flag(args, "--dtype") is None, "the contract's dtype, through the --config file"
    assert not any(a.startswith("--gpu-memory-utilization") for a in args)
    env = {e["name"]: e.get("value") for e in server["env"]}
    cpu = DEFAULTS["vllm"]["cpu"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == str(cpu["kvCacheSpaceGiB"])
    assert env["VLLM_USE_AOT_COMPILE"] == "0" and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env["OMP_NUM_THREADS"] == "4" == str(cpu["resources"]["limits"]["cpu"])
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # a 4-core pod: the uni executor, as make serve on small hosts
    assert server["resources"] == cpu["resources"]
    assert "tolerations" not in pod and "runtimeClassName" not in pod
    # A bigger pod keeps vLLM's multiprocessing; vllm.cpu.threads overrides the count.
    big = _pod_template(_render({"vllm": {"device": "cpu", "cpu": {"resources": {"requests": {"cpu": "16", "memory": "32Gi"},
                                                                                  "limits": {"cpu": "16", "memory": "32Gi"}}}}}), "vllm")
    big_env = {e["name"]: e.get("value") for e in big["spec"]["containers"][0]["env"]}
    assert big_env["OMP_NUM_THREADS"] == "16" and "VLLM_ENABLE_V1_MULTIPROCESSING" not in big_env
    threads = _pod_template(_render({"vllm": {"device": "cpu", "cpu": {"threads": 6}}}), "vllm")["spec"]["containers"][0]["env"]
    assert {e["name"]: e.get("value") for e in threads}["OMP_NUM_THREADS"] == "6"
    # GPU mode is unchanged by the CPU block.
    gpu_server = _pod_template(_render(), "vllm")["spec"]["containers"][0]
    assert gpu_server["resources"]["limits"]["nvidia.com/gpu"] == 1 and "VLLM_CPU_KVCACHE_SPACE" not in str(gpu_server["env"])


def _gpu_only_cases() -> list:
    return [
        pytest.param({"gpuMemoryUtilization": 0.8}, "vllm.gpuMemoryUtilization", id="gpu-memory-fraction"),
        pytest.param({"gpu": {"count": 2}}, "vllm.gpu.count", id="gpu-count"),
        pytest.param({"gpu": {"resourceName": "cpu"}}, "vllm.gpu.resourceName", id="resource-name-trick"),
        pytest.param({"image": {"cudaVariant": "cu129"}}, "vllm.image.cudaVariant", id="cuda-variant"),
        pytest.param({"runtimeClassName": "nvidia"}, "vllm.runtimeClassName", id="nvidia-runtime"),
        pytest.param({"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
                     "vllm.tolerations.0.key", id="gpu-toleration"),
    ]


@pytest.mark.parametrize(("vllm", "key"), _gpu_only_cases())
def test_cpu_mode_rejects_gpu_only_values_naming_them(vllm, key):
    with pytest.raises(RenderError, match=re.escape(key)) as err:
        _render({"vllm": {"device": "cpu", **vllm}})
    assert "GPU-only" in str(err.value) or "Must not validate" in str(err.value)
    _render({"vllm": vllm})  # the same value is fine on GPU


def gpu_only_paths() -> set[str]:
    """The vllm.* keys the schema refuses in CPU mode (its `if device=cpu then` clause)."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    (rule,) = schema["properties"]["vllm"]["allOf"]
    assert rule["if"]["properties"]["device"] == {"const": "cpu"}
    return {p for p in _schema_paths(rule["then"], "vllm.") if not any(q.startswith(p + ".") for q in _schema_paths(rule["then"], "vllm."))}


def test_every_gpu_only_key_is_refused_in_cpu_mode():
    assert gpu_only_paths() == {"vllm.gpuMemoryUtilization", "vllm.gpu.count", "vllm.gpu.resourceName", "vllm.image.cudaVariant",
                                "vllm.runtimeClassName", "vllm.tolerations"}


# ---- issue 24 item 8: values written raw into nginx.conf cannot carry directives ------------

INJECTION = "location /open {proxy_pass http://lawtune_vllm/;}#"  # no ": " or " #", so the YAML around it still parses
RAW_VALUES = [
    pytest.param({"gateway": {"realIp": {"trustedCidrs": ["10.0.0.0/8"], "header": f"X-Forwarded-For;{INJECTION}"}}},
                 "gateway.realIp.header", id="real-ip-header"),
    pytest.param({"gateway": {"realIp": {"trustedCidrs": [f"10.0.0.0/8;{INJECTION}"]}}}, "gateway.realIp.trustedCidrs", id="trusted-cidr"),
    pytest.param({"gateway": {"listenAddress": f"0.0.0.0:9999;{INJECTION}"}}, "gateway.listenAddress", id="listen-address"),
    pytest.param({"gateway": {"runtimeDir": f"/tmp/nginx;{INJECTION}"}}, "gateway.runtimeDir", id="runtime-dir"),
    pytest.param({"gateway": {"apiKeysFile": f"/etc/nginx/keys/k.map;{INJECTION}"}}, "gateway.apiKeysFile", id="api-keys-file"),
    pytest.param({"ui": {"enabled": True, "auth": "pasteKey", "filesDir": f"/ui;{INJECTION}"}}, "ui.filesDir", id="ui-files-dir"),
    pytest.param(_merge(PAGE_MODES["ingress"], {"ui": {"enabled": True, "ingress": {"identityHeader": f"X-User = \"\") {{ }} if ($a{INJECTION}"}}}),
                 "ui.ingress.identityHeader", id="identity-header"),
    pytest.param({"ui": {"enabled": True, "auth": "loopback"}, "gateway": {"listenAddress": "127.0.0.1"},
                  "model": {"servedModelName": f"m\",\"n\":9}}';{INJECTION}"}}, "model.servedModelName", id="served-model-name"),
]


@pytest.mark.parametrize(("overrides", "key"), RAW_VALUES)
def test_values_that_would_inject_nginx_directives_fail_the_schema_naming_the_key(overrides, key):
    """Each value above lands in nginx.conf as it is. Without the schema's pattern (helm's
    --skip-schema-validation) the payload's `location /open`, a keyless proxy to vLLM, is in the
    rendered config; with it, helm refuses the values file and names the key."""
    unchecked = _nginx_conf(_render(overrides, extra_args=["--skip-schema-validation", "--show-only", "templates/gateway-configmap.yaml"]))
    assert "location /open {proxy_pass http://lawtune_vllm/;}" in unchecked
    with pytest.raises(RenderError, match=re.escape(key)):
        _render(overrides)


@pytest.mark.parametrize("overrides", [
    pytest.param({"gateway": {"realIp": {"trustedCidrs": ["10.0.0.0/8", "192.168.1.7", "fd00::/8", "::1"], "header": "X-Real-IP"}}}, id="cidrs"),
    pytest.param({"gateway": {"listenAddress": "::1"}}, id="ipv6-listen"),
    pytest.param({"gateway": {"listenAddress": "[::]"}}, id="ipv6-any-bracketed"),
    pytest.param({"model": {"servedModelName": "Qwen/Qwen2.5-7B-Instruct"}}, id="hub-style-name"),
])
def test_ordinary_values_still_render(overrides):
    conf = _nginx_conf(_render(overrides))
    if "listenAddress" in overrides.get("gateway", {}):
        assert re.search(r"listen \[::1?\]:8080;", conf)


# ---- issue 25: second review --------------------------------------------------------------------

@pytest.mark.parametrize(
    ("vllm", "threads"),
    [
        pytest.param({"tensorParallelSize": 2}, "4", id="tp2-of-8-cores"),
        pytest.param({"extraArgs": ["-tp", "4"]}, "2", id="tp4-from-extra-args"),
        pytest.param({"tensorParallelSize": 2, "extraArgs": ["--pipeline-parallel-size", "2"]}, "2", id="tp2-pp2"),
        pytest.param({"tensorParallelSize": 16}, "1", id="more-workers-than-cores"),
        pytest.param({}, "8", id="one-worker"),
    ],
)
def test_cpu_threads_are_shared_among_the_parallel_workers(vllm, threads):
    """Each tensor/pipeline-parallel worker inherits OMP_NUM_THREADS and, with threads unbound,
    vLLM sets no per-worker count (ompmultiprocessing.py skips it for `nobind`): the pod's cores
    are divided among the workers instead of each taking them all."""
    eight = {"requests": {"cpu": "8", "memory": "16Gi"}, "limits": {"cpu": "8", "memory": "16Gi"}}
    pod = _pod_template(_render({"vllm": {"device": "cpu", "cpu": {"resources": eight}, **vllm}}), "vllm")["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["OMP_NUM_THREADS"] == threads
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env  # 8 cores, or several workers: vLLM's own processes


def test_vllm_gets_no_service_links_that_vllm_refuses(monkeypatch):
    """Kubernetes injects <SERVICE>_PORT=tcp://... for every Service in the namespace; one named
    `vllm` gives VLLM_PORT, which vLLM's own settings refuse at start. The vLLM pod turns the
    links off (nothing in it uses them)."""
    import importlib

    monkeypatch.setenv("VLLM_PORT", "tcp://10.96.0.12:8000")  # what a Service named vllm injects
    envs = importlib.import_module("vllm.envs")
    with pytest.raises(ValueError, match="appears to be a URI"):
        envs.get_vllm_port()
    for overrides in ({}, {"vllm": {"device": "cpu"}}):
        assert _pod_template(_render(overrides), "vllm")["spec"]["enableServiceLinks"] is False


@pytest.mark.parametrize(
    ("overrides", "warned"),
    [
        pytest.param({}, True, id="floating-with-autoscaling"),
        pytest.param({"model": {"version": "legal-001-3f9c2a1b7e"}}, False, id="pinned"),
        pytest.param({"autoscaling": {"enabled": False}}, False, id="floating-fixed-replicas"),
        pytest.param({"maintenance": {"enabled": True, "scaleVllmToZero": True}}, False, id="scaled-to-zero"),
    ],
)
def test_a_floating_version_with_autoscaling_is_warned_where_gitops_shows_it(overrides, warned):
    """Argo CD never shows NOTES.txt and Flux keeps them in the release: the warning is an
    annotation on the vLLM Deployment (and in NOTES.txt for helm, tested below)."""
    vllm = _deployment(_render(_merge({"model": {"version": ""}}, overrides)), "vllm")
    warning = vllm["metadata"].get("annotations", {}).get("lawtune.io/warning", "")
    assert ("model.version is empty while autoscaling is on" in warning) is warned


@pytest.mark.integration
def test_helm_prints_the_floating_version_warning_in_its_notes():
    from tests.charts.test_lawtune_serving_key_rotation import ServingApiServer
    from tests.helm_utils import helm_install_dry_run_server

    notes = {}
    for name, extra in (("floating", ()), ("pinned", ("--set-string", "model.version=legal-001-3f9c2a1b7e"))):
        api = ServingApiServer({})
        try:
            release = helm_install_dry_run_server(api.server.server_address[1], "assistant", CHART_DIR,
                                                  "-f", str(CHART_DIR / "ci" / "test-values.yaml"), *extra)
        finally:
            api.close()
        notes[name] = release["info"]["notes"]
    assert "WARNING: model.version is empty while autoscaling is on" in notes["floating"]
    assert "WARNING" not in notes["pinned"] and "model.version is empty" not in notes["pinned"]
