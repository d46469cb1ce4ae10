"""The model registry on the artifact store: which version is PROMOTED, how it got there, what exists.

    models/<name>/<version>/MANIFEST.json   a published version (jobs/publish.py)
    models/<name>/PROMOTED                  the version serving pulls (its name, nothing else)
    models/<name>/history/<time>-<id>.json  one object per promotion, forced promotion or rollback
    models/<name>/history/pending/<time>-<id>.json  a promotion's record while its swap is under way

PROMOTED only moves by compare-and-swap (``Location.write_if``): a writer names the content it
read, and the store refuses the write when someone else moved PROMOTED in between. On S3 that
is a conditional PUT (If-Match on the ETag read, If-None-Match for the first promotion); on
file:// an atomic rename under a lock. Of two racing promotions exactly one wins; the other
gets ``PromotionConflict`` (exit 1) naming the winner. Events are one object each, so writers
never append to a shared file; one is written after its swap won, so history never names a
promotion that did not happen.

The swap and its record are two writes, and a writer can die between them. So the record is
written first as an intent under ``history/pending/``, then PROMOTED is swapped, then the
record is written to ``history/`` and the intent removed. ``repair_history`` (run before every
move, and by a re-run of publish or ``lawtune models``) finds PROMOTED naming a version the
history does not end with, and records the intent that put it there: without it, a kill after
the swap left PROMOTED moved with no history, and a rollback went to the wrong version.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from shared.core.errors import ConfigError, LawtuneError
from shared.core.failpoints import failpoint
from shared.store.artifacts import Manifest, find_manifest, now_iso
from shared.store.paths import check_version
from shared.store.releases import actor
from shared.store.storage import Location

PROMOTED = "PROMOTED"
HISTORY = "history"
PENDING = "pending"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class PromotionConflict(LawtuneError):
    """Another promotion moved PROMOTED between our read and our write (retry decides again)."""


@dataclass(frozen=True)
class Pointer:
    version: str | None  # what PROMOTED names (None: nothing promoted yet)
    token: str | None  # the store's name for that exact content, for the swap


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"model name {name!r}: expected 1-63 lowercase letters, digits, '.', '_' or '-'")
    return name


def read_pointer(model_root: Location) -> Pointer:
    data, token = model_root.read_with_token(PROMOTED)
    if data is None:
        return Pointer(None, token)
    return Pointer(check_version(data.decode("utf-8").strip(), f"{model_root.uri}/{PROMOTED}"), token)


def move_pointer(model_root: Location, expected: Pointer, to: str, event: dict[str, Any]) -> dict[str, Any]:
    """Swap PROMOTED from ``expected`` to ``to`` and record the event; PromotionConflict when it moved first."""
    if find_manifest(model_root.child(to)) is None:
        from shared.core.errors import IntegrityError

        raise IntegrityError(f"{model_root.uri}/{to} has no manifest; refusing to promote an incomplete version")
    repair_history(model_root)  # a move recorded late goes before this one
    record = {"at": now_iso(), "from": expected.version, "to": to, "actor": actor(), **event}
    name = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}.json"
    body = json.dumps(record, ensure_ascii=False) + "\n"
    intent = f"{HISTORY}/{PENDING}/{name}"
    model_root.write_text(intent, body)
    if not model_root.write_if(PROMOTED, to.encode("utf-8"), expected.token):
        model_root.delete(intent)
        winner = read_pointer(model_root).version
        raise PromotionConflict(
            f"{model_root.uri}/{PROMOTED} moved to {winner or '<none>'} while this promotion of {to} was deciding "
            f"(it read {expected.version or '<none>'}); the other promotion won")
    failpoint("promote:swapped")
    model_root.write_text(f"{HISTORY}/{name}", body)
    model_root.delete(intent)
    _drop_dead_intents(model_root, to)
    return record


def history(model_root: Location) -> list[dict[str, Any]]:
    """Every recorded event, oldest first (object names start with a UTC time stamp)."""
    names = [n for n in model_root.child(HISTORY).list_files() if n.endswith(".json") and "/" not in n]
    return [json.loads(model_root.child(HISTORY).read_text(n)) for n in sorted(names)]


def _intents(model_root: Location) -> list[tuple[str, dict[str, Any]]]:
    pending = model_root.child(HISTORY).child(PENDING)
    return [(n, json.loads(pending.read_text(n))) for n in sorted(pending.list_files()) if n.endswith(".json") and "/" not in n]


def repair_history(model_root: Location) -> dict[str, Any] | None:
    """Record the move that put PROMOTED where it is when its writer died before recording it; the event.

    The writer's intent says what it was (kind, gate, actor, its time): it is recorded as it was
    meant, under its own name (so in its place in time), marked ``recovered_at``."""
    pointer = read_pointer(model_root)
    # Only moves of PROMOTED count: the history also holds canary events (lawtune models canary), which move nothing.
    moves = [e for e in history(model_root) if "to" in e]
    last = moves[-1]["to"] if moves else None
    if pointer.version is None or pointer.version == last:
        return None
    for name, intent in reversed(_intents(model_root)):
        if intent.get("to") == pointer.version and intent.get("from") == last:
            record = {**intent, "recovered_at": now_iso()}
            model_root.write_text(f"{HISTORY}/{name}", json.dumps(record, ensure_ascii=False) + "\n")
            model_root.delete(f"{HISTORY}/{PENDING}/{name}")
            _drop_dead_intents(model_root, pointer.version)
            return record
    return None


def _drop_dead_intents(model_root: Location, current: str) -> None:
    """Intents that can no longer swap (they expected another PROMOTED than ``current``): a writer killed
    before its swap, or one that lost. One that expects ``current`` may be a live promotion: kept."""
    for name, intent in _intents(model_root):
        if intent.get("from") != current:
            model_root.delete(f"{HISTORY}/{PENDING}/{name}")


def rollback_target(events: list[dict[str, Any]]) -> str | None:
    """The version promoted before the current one, skipping versions that were rolled back."""
    stack: list[str] = []
    for e in events:
        if e.get("kind") == "rollback":
            while stack and stack[-1] != e["to"]:
                stack.pop()
        elif e.get("to") and (not stack or stack[-1] != e["to"]):  # a move to what is on top moved nothing
            stack.append(e["to"])
    return stack[-2] if len(stack) >= 2 else None


@dataclass
class Version:
    name: str
    manifest: Manifest

    @property
    def created(self) -> str:
        return self.manifest.finished_at

    @property
    def gate(self) -> dict[str, Any]:
        return self.manifest.extra.get("gate") or {}

    @property
    def trained_at(self) -> str:
        return self.manifest.extra.get("trained_at") or ""


def versions(model_root: Location) -> list[Version]:
    """Published (committed) versions, oldest first."""
    names = sorted({f.split("/", 1)[0] for f in model_root.list_files() if f.endswith("/MANIFEST.json") and f.count("/") == 1})
    found = [Version(n, m) for n in names if (m := find_manifest(model_root.child(n))) is not None]
    return sorted(found, key=lambda v: (v.created, v.name))


def known_models(models_root: Location) -> list[str]:
    return sorted({f.split("/", 1)[0] for f in models_root.list_files() if f.endswith("/MANIFEST.json") and f.count("/") == 2})


def require_version(model_root: Location, name: str, version: str) -> Version:
    found = {v.name: v for v in versions(model_root)}
    if version not in found:
        raise ConfigError(f"model {name!r} has no version {version!r}; known: {', '.join(found) or '<none>'}")
    return found[version]
