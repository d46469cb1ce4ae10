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


def _checksums(api_key: str | None) -> dict[str, str]:
    """checksum/api-key of both Deployments as `helm install --dry-run=server` renders them."""
    objects = {}
    if api_key is not None:
        objects["/api/v1/namespaces/lawtune/secrets/lawtune-api-key"] = {
            "kind": "Secret", "apiVersion": "v1", "metadata": {"name": "lawtune-api-key", "namespace": "lawtune"},
            "type": "Opaque", "data": {"api-key": base64.b64encode(api_key.encode()).decode()}}
    api = ServingApiServer(objects)
    try:
        release = helm_install_dry_run_server(api.server.server_address[1], "assistant", CHART,
                                              "-f", str(CHART / "ci" / "test-values.yaml"))
    finally:
        api.close()
    assert "/api/v1/namespaces/lawtune/secrets/lawtune-api-key" in api.seen, "the chart should look the Secret up"
    docs = [d for d in yaml.safe_load_all(release["manifest"]) if d]
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["metadata"]["annotations"]["checksum/api-key"]
            for d in docs if d["kind"] == "Deployment"}


@pytest.mark.integration
def test_a_rotated_key_changes_both_deployments_and_the_same_key_changes_nothing():
    helm_path()
    before, same, rotated = _checksums("sk-first-key"), _checksums("sk-first-key"), _checksums("sk-second-key")
    assert set(before) == {"vllm", "gateway"}
    assert before == same
    assert rotated["vllm"] != before["vllm"] and rotated["gateway"] != before["gateway"]
    assert _checksums(None) != before  # a Secret that appears later rolls the pods too
