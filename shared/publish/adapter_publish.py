"""The adapter half of a published version (``publish.artifact: adapter`` or ``both``).

    models/<name>/<version>/adapter/adapter_config.json, adapter_model.safetensors
    bases/<weights digest>/        the base model it is served on, uploaded once per base

A version that carries its adapter is served on a shared base by the serving chart's
``serving.mode=adapters`` (shared/serve/adapter_sync.py loads it into vLLM at runtime). Before
anything is written, ``prepare_adapter`` decides whether vLLM can serve it at all
(shared/publish/adapter_check.py: unsupported features, a rank above the server's
``max_lora_rank``, embedding or head weights, a base whose modules it does not fit) and whether
the base publish resolved is the one finetune trained on (its weights digest). A refused adapter
stops publish with exit 2, naming the reason, and leaves nothing behind.

The version's manifest records, under ``extra.adapter``, the rank, targets and the base's identity
(``base_model``, ``base_model_digest``, ``base``: the folder ``bases/<digest>`` under the artifact
root), which the serving side checks against the base it runs before loading the adapter.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.core.errors import ConfigError
from shared.core.settings import Settings
from shared.publish.adapter_check import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter
from shared.store.artifacts import commit_dir, find_manifest, now_iso, should_skip
from shared.store.lease import Lease
from shared.store.serving import BASES, base_uri, read_promoted
from shared.store.storage import Location, open_location

log = logging.getLogger("lawtune.publish")
ADAPTER_DIR = "adapter"
# Weight formats a served base never needs beside its safetensors (HF repos often ship both).
_DUPLICATE_WEIGHTS = (".bin", ".pt", ".pth")


@dataclass
class PreparedAdapter:
    extra: dict[str, Any]  # the version manifest's extra["adapter"]
    base_dir: Path
    digest: str
    adapter_dir: Path

    def place(self, version_dir: Path) -> None:
        """Lay the adapter out in the version folder (after the merge, which wants a folder of its own)."""
        target = version_dir / ADAPTER_DIR
        target.mkdir(parents=True, exist_ok=True)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(self.adapter_dir / name, target / name)


def prepare_adapter(adapter_dir: Path, base_dir: Path, *, base_ref: str, trained_digest: str | None, max_lora_rank: int,
                    where: str, model_root: Location) -> PreparedAdapter:
    """Check the adapter and the base it is served on; raises ConfigError when vLLM could not serve it."""
    from shared.train.models import weights_digest

    facts = check_adapter(adapter_dir, base_dir, max_lora_rank=max_lora_rank, where=where)
    digest = weights_digest(base_dir)
    if trained_digest and trained_digest != digest:
        raise ConfigError(f"base mismatch: finetune trained the adapter on base weights sha256 {trained_digest[:12]}…, but "
                          f"{base_ref} now resolves to {digest[:12]}… (the model changed upstream?); publish with the base it was "
                          "trained on")
    _check_same_base_as_promoted(model_root, digest)
    extra = {"path": ADAPTER_DIR, **facts.as_dict(), "base_model": base_ref, "base_model_digest": digest,
             "base": f"{BASES}/{digest}", "max_lora_rank_checked": max_lora_rank}
    log.info("adapter: rank %d on %s (%d modules), servable with max_lora_rank %d", facts.max_rank, base_ref, facts.modules,
             max_lora_rank)
    return PreparedAdapter(extra, base_dir, digest, adapter_dir)


def _check_same_base_as_promoted(model_root: Location, digest: str) -> None:
    """One adapters-mode server runs one base: a model's adapters must share the promoted one's."""
    current = read_promoted(model_root)
    manifest = find_manifest(model_root.child(current)) if current else None
    served = ((manifest.extra.get("adapter") or {}).get("base_model_digest")) if manifest else None
    if served and served != digest:
        raise ConfigError(f"base mismatch: {model_root.uri}/{current} (PROMOTED) serves adapters on base sha256 {served[:12]}…, "
                          f"this adapter was trained on {digest[:12]}…; one server runs one base: publish it under another "
                          "--model-name, or with publish.artifact=merged")


def publish_base(settings: Settings, prepared: PreparedAdapter) -> str:
    """Upload the base to ``bases/<digest>/`` unless it is committed there already; returns its URI."""
    uri = base_uri(settings.artifact_root, prepared.digest)
    location = open_location(uri, settings)
    inputs = {"base_model_digest": prepared.digest}
    if should_skip(location, inputs):
        log.info("base %s… is in the store already (%s)", prepared.digest[:12], uri)
        return uri
    lease = Lease(location).acquire()  # two publishes of one new base upload it once
    try:
        if not should_skip(location, inputs):
            location.sweep_temporaries()
            with tempfile.TemporaryDirectory(prefix="base-") as staging:
                _link_servable_files(prepared.base_dir, Path(staging))
                log.info("uploading base %s… to %s (once per base)", prepared.digest[:12], uri)
                commit_dir(Path(staging), location, stage="base", inputs=inputs, started_at=now_iso(),
                           code_version=settings.resolved_code_version, max_workers=settings.s3_max_concurrency)
    finally:
        lease.release()
    return uri


def _link_servable_files(base_dir: Path, staging: Path) -> None:
    """The files vLLM needs (config, safetensors, tokenizer, templates), linked, not copied."""
    files = [f for f in base_dir.iterdir() if f.is_file() and not f.name.startswith(".") and f.suffix != ".gguf"]
    if any(f.suffix == ".safetensors" for f in files):
        files = [f for f in files if f.suffix not in _DUPLICATE_WEIGHTS]
    for f in files:
        (staging / f.name).symlink_to(f.resolve())
