"""Beside each vLLM replica (serving.mode=adapters): load the versions the store names, retire the others.

One base model runs with ``--enable-lora``; every published version that carries an adapter is
served under its own model name, ``<model>:<version>``. Each ``sync()``:

1. reads the serving state (champion, challenger, the previous champion while a change settles:
   shared/serve/state_tracker.py);
2. for each such version vLLM does not list yet: checks that its adapter was published for the
   base this replica runs (``extra.adapter.base_model_digest``), downloads the adapter files and
   verifies each against the version's manifest (``fetch_dir``: all or nothing), and loads it
   through vLLM's runtime API (``POST /v1/load_lora_adapter``; the server runs with
   ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), no restart;
3. unloads (``/v1/unload_lora_adapter``) versions the state no longer names, once they have been
   out of it for ``settle_seconds`` (vLLM's unload only drops the name: requests already running
   on it finish).

A version that cannot be served here (no adapter, another base, vLLM refuses it) is logged once
and retried after ``retry_refused_seconds``; the gateway meanwhile answers its share from the
champion (charts/lawtune-serving/files/canary.js). The store being unreachable changes nothing
that is loaded. ``ready`` turns true once every servable version is loaded: the pod's readiness,
so a new replica takes traffic only with every adapter in place.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from shared.core.errors import LawtuneError
from shared.core.settings import Settings
from shared.core.uri import join
from shared.serve.state_tracker import StateTracker
from shared.store.artifacts import MANIFEST, Manifest, fetch_dir, read_manifest
from shared.store.paths import check_version, inside
from shared.store.serving import served_name
from shared.store.storage import open_location

log = logging.getLogger("lawtune.serve.adapters")


class VLLMError(LawtuneError):
    """vLLM answered a runtime LoRA call with an error."""


@dataclass
class VLLMAdmin:
    """vLLM's model list and runtime LoRA API, with the server's API key."""

    url: str
    api_key: str
    timeout: float = 60.0

    def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(f"{self.url}{path}", method=method, data=json.dumps(body).encode() if body else None,
                                         headers={"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def adapters(self) -> dict[str, str]:
        """Loaded adapters: name -> path (the base model is not one)."""
        status, body = self._call("GET", "/v1/models")
        if status != 200:
            raise VLLMError(f"GET {self.url}/v1/models answered {status}: {body[:200]!r}")
        return {m["id"]: m.get("root", "") for m in json.loads(body)["data"] if m.get("parent")}

    def load(self, name: str, path: Path) -> None:
        status, body = self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        if status != 200:
            raise VLLMError(f"vLLM refused to load {name} from {path} ({status}): {body[:300].decode(errors='replace')}")

    def unload(self, name: str) -> None:
        status, body = self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status not in (200, 404):  # 404: gone already (a restarted server)
            raise VLLMError(f"vLLM refused to unload {name} ({status}): {body[:300].decode(errors='replace')}")


@dataclass
class SyncReport:
    wanted: list[str]
    loaded: list[str]
    refused: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


class AdapterSync:
    def __init__(self, settings: Settings, model: str, admin: VLLMAdmin, adapters_dir: Path, base_digest: str, *,
                 settle_seconds: float = 600.0, retry_refused_seconds: float = 60.0, clock=time.time):
        self.settings, self.model, self.admin, self.adapters_dir = settings, model, admin, Path(adapters_dir)
        self.base_digest, self.settle_seconds, self.retry_refused_seconds, self.clock = (
            base_digest, settle_seconds, retry_refused_seconds, clock)
        self.model_uri = settings.models_uri(model)
        self.tracker = StateTracker(model, open_location(self.model_uri, settings), settle_seconds, clock)
        self._refused: dict[str, tuple[str, float]] = {}
        self._unwanted_since: dict[str, float] = {}
        self.ready = False
        self.last: SyncReport | None = None

    def sync(self) -> SyncReport:
        started = self.clock()
        state = self.tracker.poll()
        wanted = state.versions()
        prefix = served_name(self.model, "")
        loaded = {name.removeprefix(prefix): path for name, path in self.admin.adapters().items() if name.startswith(prefix)}
        for version in wanted:
            if version not in loaded and self._may_try(version):
                try:
                    self._load(version)
                    loaded[version] = str(self._adapter_path(version))
                    self._refused.pop(version, None)
                except (LawtuneError, OSError) as exc:
                    log.error("cannot serve %s: %s", served_name(self.model, version), exc)
                    self._refused[version] = (str(exc), self.clock())
        now = self.clock()
        for version in [v for v in loaded if v not in wanted]:
            since = self._unwanted_since.setdefault(version, now)
            if now - since >= self.settle_seconds:
                self.admin.unload(served_name(self.model, version))
                try:  # a name vLLM lists becomes a path only when it is a version name
                    shutil.rmtree(self._version_dir(version), ignore_errors=True)
                except LawtuneError as exc:
                    log.warning("%s", exc)
                self._unwanted_since.pop(version, None)
                del loaded[version]
                log.info("unloaded %s (out of the serving state for %.0f s)", served_name(self.model, version), now - since)
        for version in wanted:
            self._unwanted_since.pop(version, None)
        refused = {v: reason for v, (reason, _) in self._refused.items() if v in wanted}
        self.ready = all(v in loaded or v in refused for v in wanted)
        self.last = SyncReport(wanted, sorted(loaded), refused, self.clock() - started)
        return self.last

    def _may_try(self, version: str) -> bool:
        refused = self._refused.get(version)
        return refused is None or self.clock() - refused[1] >= self.retry_refused_seconds

    def _version_dir(self, version: str) -> Path:
        """``<adapters_dir>/<version>``, refused unless it stays inside adapters_dir (the versions come from the store)."""
        check_version(version, f"{self.model_uri} (PROMOTED, CANARY or history)")
        return inside(self.adapters_dir, version, f"{self.model_uri}/{version}")

    def _adapter_path(self, version: str) -> Path:
        return self._version_dir(version) / "adapter"

    def _load(self, version: str) -> None:
        location = open_location(join(self.model_uri, version), self.settings)
        manifest = read_manifest(location)
        adapter = manifest.extra.get("adapter") or {}
        if not adapter:
            raise LawtuneError(f"{location.uri} carries no adapter (published with publish.artifact="
                               f"{manifest.extra.get('artifact', 'merged')}); publish it with adapter or both")
        if adapter.get("base_model_digest") != self.base_digest:
            raise LawtuneError(f"{location.uri}'s adapter was trained on base {str(adapter.get('base_model_digest'))[:12]}…, "
                               f"this server runs base {self.base_digest[:12]}…")
        target = self._version_dir(version)
        if not _holds(target, manifest):
            started = self.clock()
            fetch_dir(location, target, max_workers=self.settings.s3_max_concurrency,
                      only=[f.path for f in manifest.files if f.path.startswith(f"{adapter.get('path', 'adapter')}/")])
            log.info("fetched and verified %s's adapter in %.2f s", version, self.clock() - started)
        started = self.clock()
        self.admin.load(served_name(self.model, version), self._adapter_path(version))
        log.info("loaded %s in %.2f s", served_name(self.model, version), self.clock() - started)


def _holds(target: Path, manifest: Manifest) -> bool:
    """``target`` was fetched from this very manifest (a restarted agent does not download again)."""
    try:
        return Manifest.model_validate_json((target / MANIFEST).read_bytes()).digest == manifest.digest
    except (OSError, ValueError):
        return False


def base_digest_of(base_dir: Path) -> str:
    """The weights digest a fetched base folder was published under (bases/<digest>/MANIFEST.json)."""
    manifest = Manifest.model_validate_json((Path(base_dir) / MANIFEST).read_bytes())
    digest = manifest.inputs.get("base_model_digest")
    if not digest:
        raise LawtuneError(f"{base_dir}/{MANIFEST} is not a published base (no base_model_digest in its inputs)")
    return digest
