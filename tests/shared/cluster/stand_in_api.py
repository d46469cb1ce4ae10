"""A stand-in for the Kubernetes API server that records what the driver asks of it.

No API server runs here (tests/kind runs the driver against a real one where Docker and kind
exist). This one answers the real ``shared.cluster.k8s.Cluster`` over HTTP, through the real
``kubernetes`` client: discovery, server-side apply, Jobs, Pods and pod logs, with the status
of each Job taken from the recorded fixtures in tests/fixtures/k8s (as ``ReplayCluster`` does).
Every request is logged, and ``rbac_calls()`` turns the log into (apiGroup, resource, verb) the
way the API server's request-info resolver does before it asks RBAC:

    GET  .../jobs/<name> -> get      GET    .../jobs -> list (watch=true: watch)
    POST .../jobs        -> create   DELETE .../jobs/<name> -> delete (.../jobs -> deletecollection)
    PUT  -> update                   PATCH  -> patch, and create too when an apply creates the object
    .../pods/<name>/log  -> the pods/log subresource

Discovery (/version, /api, /apis and the group-version lists) is left out: every authenticated
user may read it (the system:discovery ClusterRole).
"""

from __future__ import annotations

import copy
import http.server
import json
import re
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import yaml

Obj = dict[str, Any]

RESOURCES = {
    "/api/v1": [("configmaps", "ConfigMap"), ("serviceaccounts", "ServiceAccount"), ("services", "Service"), ("pods", "Pod"),
                ("pods/log", "Pod")],
    "/apis/batch/v1": [("jobs", "Job")],
}
_PATH = re.compile(r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
                   r"/namespaces/(?P<ns>[^/]+)/(?P<resource>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$")
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


class RecordingApiServer:
    """Serves the objects a test puts in ``objects`` ({(resource, name): obj}); ``on_create(job)``
    gives a created Job its status and pods (a fixture); ``pods`` and ``logs`` are by Job name."""

    def __init__(self, on_create: Callable[[Obj], None] | None = None):
        self.objects: dict[tuple[str, str], Obj] = {}
        self.pods: dict[str, list[Obj]] = {}
        self.logs: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]], bool]] = []  # method, path, query, created
        self.on_create = on_create or (lambda job: None)
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, payload, ctype = outer.handle(self.command, url.path, parse_qs(url.query), body,
                                                      self.headers.get("Content-Type", ""))
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, folder: Path, namespace: str) -> Path:
        path = folder / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": self.url}}],
            "users": [{"name": "u", "user": {"token": "stand-in"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": namespace}}]}))
        return path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------ requests

    def handle(self, method: str, path: str, query: dict, body: bytes, ctype: str) -> tuple[int, Any, str]:
        discovery = self._discovery(path)
        if discovery is not None:
            return 200, discovery, "application/json"
        match = _PATH.match(path)
        if not match:
            return 404, _status(404, f"no route for {path}"), "application/json"
        resource, name, sub = match["resource"], match["name"], match["sub"]
        with self.lock:
            key = (resource, name)
            created = method == "PATCH" and key not in self.objects
            self.requests.append((method, path, query, created))
            if sub == "log":
                return 200, ("\n".join(self.logs.get(_job_of(self.pods, name), [])) + "\n").encode(), "text/plain"
            if method == "GET" and name is None:
                items = [o for (r, _), o in self.objects.items() if r == resource] if resource != "pods" else self._pods(query)
                items = [o for o in items if _selected(o, query)]
                return 200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": _quantities_as_strings(items)}, "application/json"
            if method == "GET":
                obj = self.objects.get(key)
                return (200, _quantities_as_strings(obj), "application/json") if obj else (404, _status(404, f"{resource} {name} not found"), "application/json")
            if method == "POST":
                obj = _quantities_as_strings(json.loads(body))
                obj["metadata"].setdefault("uid", f"uid-{len(self.requests)}")
                self.objects[(resource, obj["metadata"]["name"])] = obj
                if resource == "jobs":
                    self.on_create(obj)
                return 201, copy.deepcopy(obj), "application/json"
            if method == "PATCH":  # server-side apply (application/apply-patch+yaml): create or update
                obj = _quantities_as_strings(yaml.safe_load(body))
                self.objects[key] = obj
                return (201 if created else 200), copy.deepcopy(obj), "application/json"
            if method == "DELETE":
                obj = self.objects.pop(key, None)
                self.pods.pop(name, None)
                return (200, obj, "application/json") if obj else (404, _status(404, f"{resource} {name} not found"), "application/json")
        return 405, _status(405, f"{method} not served"), "application/json"

    def _pods(self, query: dict) -> list[Obj]:
        wanted = dict(term.split("=", 1) for term in query.get("labelSelector", [""])[0].split(",") if "=" in term)
        return list(self.pods.get(wanted.get("job-name", ""), []))

    def _discovery(self, path: str) -> Any:
        if path == "/version":
            return {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            groups = [p.split("/")[2:4] for p in RESOURCES if p.startswith("/apis/")]
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                 "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}} for g, v in groups]}
        if path in RESOURCES:
            return {"kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": path.removeprefix("/api/").removeprefix("/apis/"),
                    "resources": [{"name": n, "singularName": "", "namespaced": True, "kind": k,
                                   "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                                  for n, k in RESOURCES[path]]}
        return None

    # ------------------------------------------------------------ what RBAC saw

    def rbac_calls(self) -> set[tuple[str, str, str]]:
        """(apiGroup, resource, verb) of every resource request, as the API server authorizes it."""
        calls = set()
        for method, path, query, created in self.requests:
            match = _PATH.match(path)
            group = match["group"] or ""
            resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
            if method == "GET":
                verb = "get" if match["name"] else ("watch" if query.get("watch") == ["true"] else "list")
            elif method == "DELETE":
                verb = "delete" if match["name"] else "deletecollection"
            else:
                verb = _VERBS[method]
            calls.add((group, resource, verb))
            if created:  # an apply that creates the object is authorized for create as well
                calls.add((group, resource, "create"))
        return calls


def _quantities_as_strings(node: Any) -> Any:
    """Resource quantities as the API server returns them: strings ("1", "64Gi"), never numbers."""
    if isinstance(node, dict):
        return {k: ({q: str(v) for q, v in value.items()} if k in ("requests", "limits") and isinstance(value, dict)
                    else _quantities_as_strings(value)) for k, value in node.items()}
    if isinstance(node, list):
        return [_quantities_as_strings(item) for item in node]
    return node


def _status(code: int, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": "NotFound" if code == 404 else "MethodNotAllowed", "code": code}


def _selected(obj: Obj, query: dict) -> bool:
    selector = query.get("labelSelector", [""])[0]
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in (t.split("=", 1) for t in selector.split(",") if "=" in t))


def _job_of(pods: dict[str, list[Obj]], pod_name: str | None) -> str:
    return next((job for job, items in pods.items() if any(p["metadata"]["name"] == pod_name for p in items)), "")
