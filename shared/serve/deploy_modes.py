"""What `lawtune deploy` adds for the serving chart's adapters mode and merged-mode canary.

- ``serving.mode=adapters`` (in a values file): the promoted version must carry an adapter; its
  base's weights digest goes into ``adapters.baseDigest`` (the init container fetches
  ``bases/<digest>``). Versions then change at runtime through the store; a deploy is needed only
  for another base.
- merged mode with ``canary.enabled``: the challenger in ``models/<name>/CANARY`` (when there is one)
  goes into ``canary.challengerVersion``, which runs it in a Deployment of its own; without a
  canary the value is emptied, so an ended canary's Deployment goes.

The release record (models/<name>/releases/...) then says which mode it runs, and on which base
or beside which challenger, for `lawtune models list` and `lawtune lineage`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from shared.core.errors import ConfigError
from shared.core.settings import Settings
from shared.core.uri import join
from shared.store.artifacts import read_manifest
from shared.store.serving import read_canary
from shared.store.storage import open_location


def chart_values(values_files: list[Path], kept: dict[str, Any] | None = None) -> dict[str, Any]:
    """``serving`` and ``canary`` as the values files set them over ``kept``, the values helm keeps
    from the release (--reset-then-reuse-values); the last file wins, as in helm."""
    merged: dict[str, Any] = {"serving": {}, "canary": {}}
    for doc in [kept or {}, *(yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {} for path in values_files)]:
        for key in merged:
            if isinstance(doc.get(key), dict):
                merged[key].update(doc[key])
    return merged


def mode_settings(settings: Settings, model_name: str, version: str, values_files: list[Path],
                  kept: dict[str, Any] | None = None) -> tuple[list[str], dict[str, Any]]:
    """(helm ``--set-string`` arguments, facts for the release record) for the mode the values choose
    (``kept``: the values the upgrade keeps from the release)."""
    values = chart_values(values_files, kept)
    model_uri = settings.models_uri(model_name)
    if values["serving"].get("mode") == "adapters":
        adapter = read_manifest(open_location(join(model_uri, version), settings)).extra.get("adapter")
        if not adapter:
            raise ConfigError(f"{model_uri}/{version} carries no adapter (publish.artifact=merged), but serving.mode=adapters "
                              "serves adapters on a base: publish with publish.artifact adapter or both, or deploy merged")
        digest = adapter["base_model_digest"]
        return ["--set-string", f"adapters.baseDigest={digest}"], {"mode": "adapters", "base_model_digest": digest}
    if read_manifest(open_location(join(model_uri, version), settings)).extra.get("artifact") == "adapter":
        raise ConfigError(f"{model_uri}/{version} carries only an adapter (publish.artifact=adapter): deploy it with "
                          "serving.mode=adapters in your values, or publish it with publish.artifact merged or both")
    if values["canary"].get("enabled"):
        canary, _ = read_canary(open_location(model_uri, settings))
        challenger = canary.version if canary and canary.version != version else ""
        if challenger:
            manifest = read_manifest(open_location(join(model_uri, challenger), settings))
            if manifest.extra.get("artifact") == "adapter":
                raise ConfigError(f"the canary's challenger {challenger} carries only an adapter: a merged-mode release needs "
                                  "merged weights (publish.artifact merged or both), or serve adapters (serving.mode=adapters)")
        return ["--set-string", f"canary.challengerVersion={challenger}"], {"mode": "merged", "challenger": challenger or None}
    return [], {"mode": "merged"}
