"""Where a published model version came from, link by link, each with its URI and digest.

    input file (sha256) -> data manifest -> finetune (base model + digest, config digest, best step)
      -> evaluate (gate) -> published version (promotions) -> serving releases (those `lawtune deploy` recorded)

Every link is read from a committed manifest. A link records the digest its parent saw; when
the artifact at that URI now has another digest, the link says ``changed`` instead of silently
describing different content (runs of a published run id refuse to be overwritten:
shared/store/stage.py, so this only shows for stores edited by hand or versions published
before that rule).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.core.errors import ConfigError
from shared.core.settings import Settings
from shared.core.uri import join
from shared.publish import registry
from shared.store.artifacts import Manifest, find_manifest, read_manifest
from shared.store.releases import RELEASES, release_name, releases
from shared.store.serving import serving_state
from shared.store.storage import open_location


@dataclass
class Link:
    kind: str  # input, data, finetune, evaluate, version, serving
    uri: str | None
    digest: str | None = None
    status: str = "ok"  # ok | changed (content differs from what the next link recorded) | missing | not recorded | not deployed
    facts: dict[str, Any] = field(default_factory=dict)


def _sibling(uri: str, name: str) -> str:
    return f"{uri.rstrip('/').rsplit('/', 1)[0]}/{name}"


def _follow(settings: Settings, kind: str, uri: str | None, expected: str | None) -> tuple[Link, Manifest | None]:
    if not uri:
        return Link(kind, None, expected, "not recorded"), None
    manifest = find_manifest(open_location(uri, settings))
    if manifest is None:
        return Link(kind, uri, expected, "missing"), None
    status = "ok" if expected in (None, manifest.digest) else "changed"
    return Link(kind, uri, manifest.digest, status), manifest


def trace(settings: Settings, version_uri: str) -> list[Link]:
    """The chain behind ``models/<name>/<version>``, input first."""
    parts = version_uri.rstrip("/").split("/")
    if len(parts) < 3 or parts[-3] != "models":
        raise ConfigError(f"{version_uri}: expected the URI of a published version, <artifact_root>/models/<name>/<version>")
    model_uri, version = "/".join(parts[:-1]), parts[-1]
    model_root = open_location(model_uri, settings)
    manifest = find_manifest(model_root.child(version))
    if manifest is None:
        known = [v.name for v in registry.versions(model_root)]
        raise ConfigError(f"{version_uri} is not a published version; known versions of {model_uri}: {', '.join(known) or '<none>'}")

    recorded = manifest.extra.get("lineage") or {}
    if not recorded:  # versions published before lineage was recorded: the provenance file names the URIs
        prov = json.loads(model_root.child(version).read_text("lawtune-model.json"))
        recorded = {"finetune": {"uri": prov.get("finetune")}, "evaluate": {"uri": prov.get("evaluate")}}
    ft_link, ft = _follow(settings, "finetune", recorded["finetune"].get("uri"), manifest.inputs.get("finetune"))
    ev_link, ev = _follow(settings, "evaluate", recorded["evaluate"].get("uri"), manifest.inputs.get("evaluate"))

    data_uri = (ft.extra.get("data_uri") if ft else None) or (_sibling(ft_link.uri, "data") if ft_link.uri else None)
    data_link, data = _follow(settings, "data", data_uri, ft.inputs.get("data") if ft else None)
    source = (data.inputs.get("input") or {}) if data else {}
    input_link = Link("input", data.extra.get("input_uri") if data else None, source.get("sha256"),
                      "ok" if source.get("sha256") else "not recorded", {"name": source.get("name")})
    if data:
        data_link.facts = {"splits": data.extra.get("splits"), "preprocess_config_digest": data.inputs.get("preprocess_config")}
    if ft:
        ft_link.facts = {"base_model": ft.extra.get("base_model"), "base_model_digest": ft.extra.get("base_model_digest"),
                         "config_digest": ft.inputs.get("config"), "best_step": ft.extra.get("best_step"),
                         "trained_at": ft.finished_at}
    if ev:
        gate = ev.extra.get("gate") or {}
        ev_link.facts = {"gate": "PASSED" if gate.get("passed") is True else "FAILED", "compared_with_promoted": gate.get("promoted"),
                         "report": join(ev_link.uri, "report.html")}
    events = [e for e in registry.history(model_root) if e.get("to") == version]
    pointer = registry.read_pointer(model_root)
    version_link = Link("version", version_uri, manifest.digest, "ok", {
        "published_at": manifest.finished_at, "promoted_now": pointer.version == version,
        "promotions": [{k: e.get(k) for k in ("at", "kind", "from", "actor")} for e in events]})
    return [input_link, data_link, ft_link, ev_link, version_link, _serving(model_root, version)]


def _serves(release: dict, version: str, weights: dict[str, int]) -> int | None:
    """The percent of ``release``'s traffic ``version`` answers (None: it does not serve it).

    An adapters-mode release serves what the store names now (champion, challenger); a merged one
    the versions deploy put in it, split by the canary's weights when it runs a challenger."""
    if release.get("mode") == "adapters":
        return weights.get(version)
    deployed = [release.get("version"), release.get("challenger")]
    if version not in deployed:
        return None
    return weights.get(version, 0) if release.get("challenger") else 100


def _serving(model_root, version: str) -> Link:
    """The releases `lawtune deploy` last pointed at this version (with its share of their traffic); the others
    say what they run instead."""
    recorded = releases(model_root)
    if not recorded:
        return Link("serving", None, None, "not recorded",
                    {"note": "no release of this model was deployed with `lawtune deploy` (a plain helm install records none)"})
    weights = serving_state(model_root.uri.rstrip("/").rsplit("/", 1)[-1], model_root).weights()
    running = [(r, share) for r in recorded if (share := _serves(r, version, weights)) is not None]
    keys = ("cluster", "namespace", "release", "status", "helm_revision", "deployed_at", "actor")
    facts = {"releases": [{**{k: r.get(k) for k in keys if k in r or k not in ("cluster", "status")},
                           "mode": r.get("mode", "merged"), "traffic_percent": share} for r, share in running]}
    serving_names = {release_name(r) for r, _ in running}
    others = {release_name(r): r.get("version") for r in recorded if release_name(r) not in serving_names}
    if others:
        facts["other_releases"] = others
    uri = join(model_root.uri, RELEASES)
    return Link("serving", uri, None, "ok" if running else "not deployed", facts)


def as_json(links: list[Link]) -> str:
    return json.dumps([asdict(link) for link in links], indent=2, ensure_ascii=False)


def as_text(links: list[Link]) -> list[str]:
    lines = []
    for i, link in enumerate(links):
        head = f"{'  ' * 0}{'└─ ' if i else ''}{link.kind:<9} {link.uri or '-'}"
        lines.append(head + (f"  [{link.status}]" if link.status != "ok" else ""))
        if link.digest:
            lines.append(f"   {'':9} sha256 {link.digest}")
        for key, value in link.facts.items():
            if value not in (None, [], {}):
                lines.append(f"   {'':9} {key}: {value if not isinstance(value, (dict, list)) else json.dumps(value, ensure_ascii=False)}")
    return lines
