"""charts/lawtune-pipeline on upgrade: a stage whose Job already completed with the same spec is
left out, so `helm upgrade` (and Flux) request no GPU for it.

That decision is Helm's `lookup` of the existing Job, which only runs against an API server. None
runs here, so a stand-in on 127.0.0.1 answers the few requests `helm install --dry-run=server`
makes (version and discovery, the release history Secrets, GET of each Job) with the objects a
test gives it; the real helm renders the real chart against it.
"""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from tests.helm_utils import REPO, render

CHART = REPO / "charts" / "lawtune-pipeline"
CONFIG = REPO / "configs" / "smollm2-135m-cpu.yaml"
SETS = "runId=sample,artifactRoot=s3://lawtune/artifacts,input.uri=s3://lawtune/in.csv"
RESOURCES = {
    "/api/v1": [("configmaps", "ConfigMap"), ("secrets", "Secret"), ("serviceaccounts", "ServiceAccount"),
                ("services", "Service"), ("pods", "Pod")],
    "/apis/batch/v1": [("jobs", "Job")],
    "/apis/rbac.authorization.k8s.io/v1": [("roles", "Role"), ("rolebindings", "RoleBinding")],
}


class StandInApiServer:
    """Answers discovery and GETs from ``objects`` ({path: object}); everything else is 404."""

    def __init__(self, objects: dict[str, dict]):
        self.objects, self.seen = objects, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                outer.seen.append(path)
                body = outer.answer(path)
                self.send_response(200 if body else 404)
                data = json.dumps(body or {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str) -> dict | None:
        if path == "/version":
            return {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            groups = [p.split("/")[2:4] for p in RESOURCES if p.startswith("/apis/")]
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                 "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}} for g, v in groups]}
        if path in RESOURCES:
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": path.removeprefix("/api/").removeprefix("/apis/"),
                    "resources": [{"name": n, "singularName": "", "namespaced": True, "kind": k,
                                   "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]} for n, k in RESOURCES[path]]}
        if path == "/api/v1/namespaces/lawtune/secrets":  # Helm's release history: none
            return {"kind": "SecretList", "apiVersion": "v1", "metadata": {}, "items": []}
        return self.objects.get(path)

    def close(self):
        self.server.shutdown()


def _helm_install_dry_run(objects: dict[str, dict], *extra: str) -> list[str]:
    """Names of the stage Jobs `helm install --dry-run=server` would create."""
    import yaml

    from tests.helm_utils import helm_install_dry_run_server

    api = StandInApiServer(objects)
    try:
        release = helm_install_dry_run_server(api.server.server_address[1], "lawtune", CHART, "--set", SETS,
                                              "--set-file", f"config={CONFIG}", *extra)
    finally:
        api.close()
    docs = [d for h in release.get("hooks", []) for d in yaml.safe_load_all(h["manifest"]) if d]
    docs += [d for d in yaml.safe_load_all(release["manifest"]) if d]
    return sorted(d["metadata"]["labels"]["lawtune.io/stage"] for d in docs
                  if d["kind"] == "Job" and "lawtune.io/stage" in d["metadata"]["labels"])


def _existing(stage: str, condition: str, spec_hash: str | None = None) -> dict[str, dict]:
    (job,) = [o for o in render(CHART, {"runId": "sample", "artifactRoot": "s3://lawtune/artifacts", "input": {"uri": "s3://lawtune/in.csv"}},
                                set_files={"config": CONFIG}, release="lawtune")
              if o["kind"] == "Job" and o["metadata"]["labels"].get("lawtune.io/stage") == stage]
    if spec_hash is not None:
        job["metadata"]["annotations"]["lawtune.io/spec-hash"] = spec_hash
    job["status"] = {"conditions": [{"type": condition, "status": "True"}]}
    return {f"/apis/batch/v1/namespaces/lawtune/jobs/{job['metadata']['name']}": job}


STAGES = ["evaluate", "finetune", "preprocess", "publish"]


@pytest.mark.parametrize(
    ("existing", "extra", "rendered"),
    [
        pytest.param({}, (), STAGES, id="first-install"),
        pytest.param({"finetune": ("Complete", None)}, (), ["evaluate", "preprocess", "publish"], id="completed-same-spec-left-out"),
        pytest.param({"finetune": ("Complete", "0" * 16)}, (), STAGES, id="completed-other-spec-runs"),
        pytest.param({"finetune": ("Failed", None)}, (), STAGES, id="failed-runs-again"),
        pytest.param({"finetune": ("Complete", None)}, ("--set", "rerunCompleted=true"), STAGES, id="forced"),
        pytest.param({"finetune": ("Complete", None)}, ("--set", "hooks.enabled=false"), STAGES, id="plain-mode-keeps-its-resources"),
        # Values no pod runs (and the log level, read from the ConfigMap) leave a completed stage alone.
        pytest.param({"finetune": ("Complete", None)}, ("--set", "cleanup.enabled=false"), ["evaluate", "preprocess", "publish"],
                     id="cleanup-toggled"),
        pytest.param({"finetune": ("Complete", None)}, ("--set", "driverRbac.create=true"), ["evaluate", "preprocess", "publish"],
                     id="driver-rbac-toggled"),
        pytest.param({"finetune": ("Complete", None)}, ("--set", "logLevel=DEBUG"), ["evaluate", "preprocess", "publish"],
                     id="log-level-changed"),
        pytest.param({"finetune": ("Complete", None)}, ("--set", "stages.finetune.backoffLimit=5"), STAGES, id="its-spec-changed"),
    ],
)
def test_an_upgrade_requests_no_gpu_for_a_stage_that_completed_with_this_spec(existing, extra, rendered):
    objects = {}
    for stage, (condition, spec_hash) in existing.items():
        objects |= _existing(stage, condition, spec_hash)
    assert _helm_install_dry_run(objects, *extra) == rendered
