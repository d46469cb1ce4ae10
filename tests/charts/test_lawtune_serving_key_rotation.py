"""charts/lawtune-serving: a rotated API key rolls the vLLM and gateway pods on `helm upgrade`.

The key's checksum comes from Helm's `lookup` of the Secret, which only runs against an API
server. None runs here, so the pipeline chart's stand-in (tests/charts/test_lawtune_pipeline_upgrade.py)
answers `helm install --dry-run=server` with the Secret a test gives it, and the real helm
renders the real chart against it.
"""

from __future__ import annotations

import base64

import pytest
import yaml

from tests.charts.test_lawtune_pipeline_upgrade import StandInApiServer
from tests.helm_utils import REPO, helm_install_dry_run_server, helm_path

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


def _install(api_key: str | None, resource_version: str = "1001") -> dict:
    """`helm install --dry-run=server` against a stand-in API server holding the key's Secret (or none)."""
    objects = {}
    if api_key is not None:
        objects["/api/v1/namespaces/lawtune/secrets/lawtune-api-key"] = {
            "kind": "Secret", "apiVersion": "v1", "type": "Opaque",
            "metadata": {"name": "lawtune-api-key", "namespace": "lawtune", "uid": "6f1c0c52-1d2e-4c9a-9a57-0d7d3c1e2f00",
                         "resourceVersion": resource_version},
            "data": {"api-key": base64.b64encode(api_key.encode()).decode()}}
    api = ServingApiServer(objects)
    try:
        release = helm_install_dry_run_server(api.server.server_address[1], "assistant", CHART,
                                              "-f", str(CHART / "ci" / "test-values.yaml"))
    finally:
        api.close()
    assert "/api/v1/namespaces/lawtune/secrets/lawtune-api-key" in api.seen, "the chart should look the Secret up"
    return release


def _checksums(api_key: str | None, resource_version: str = "1001") -> dict[str, str]:
    """checksum/api-key of both Deployments as `helm install --dry-run=server` renders them."""
    docs = [d for d in yaml.safe_load_all(_install(api_key, resource_version)["manifest"]) if d]
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


@pytest.mark.integration
def test_a_short_key_fails_the_install_naming_the_secret():
    """issue 24 item 6: where Helm can read the Secret (helm install/upgrade, lawtune deploy) a key
    under 32 characters fails the install; elsewhere the gateway's init container refuses it."""
    helm_path()
    with pytest.raises(Exception, match=r"the key in Secret lawtune-api-key \(key api-key\) is 12 characters; at least 32"):
        _install("sk-short-key")
