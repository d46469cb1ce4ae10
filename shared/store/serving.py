"""What serving should run for a model, read from the store: the champion, a challenger and its weight.

    models/<name>/PROMOTED      the champion (shared/publish/registry.py moves it)
    models/<name>/CANARY        {"version", "weight", "sticky", "at", "actor"}: the challenger and the
                                percent of traffic it gets (`lawtune models canary`); {"version": null}
                                or absent: no canary
    bases/<digest>/             a base model that adapter versions are served on, named after its
                                weights digest (shared/publish/adapter_publish.py writes it)

The serving agents (shared/serve/agent.py) poll these two small objects: the one beside vLLM loads
the versions' adapters, the one beside the gateway writes the routes nginx splits traffic by. A
change therefore reaches every replica within one poll interval, without a restart.

CANARY moves by compare-and-swap like PROMOTED (``Location.write_if``), so two operators cannot
silently overwrite each other. Lives in ``shared.store`` because its writer (``jobs/models.py``
through shared/publish) and its readers (shared/serve) sit on one rank and may not import each other.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from shared.core.errors import ConfigError, LawtuneError
from shared.core.uri import join
from shared.store.artifacts import now_iso
from shared.store.paths import check_version
from shared.store.releases import actor
from shared.store.storage import Location

PROMOTED = "PROMOTED"
CANARY = "CANARY"
HISTORY = "history"
BASES = "bases"
STICKY = ("apiKey", "conversation")
# How a served version is named to vLLM and to clients: `<model>:<version>` (the base is `<model>:base`).
SEPARATOR = ":"


class CanaryConflict(LawtuneError):
    """Someone changed CANARY between our read and our write."""


def served_name(model: str, version: str) -> str:
    return f"{model}{SEPARATOR}{version}"


def base_uri(artifact_root: str, digest: str) -> str:
    return join(artifact_root.rstrip("/"), BASES, digest)


@dataclass(frozen=True)
class Canary:
    version: str
    weight: int  # percent of requests the challenger answers, 0-100
    sticky: str = "apiKey"  # what keeps a client on one side: its API key, or its conversation (X-Lawtune-Conversation)
    at: str = ""
    actor: str = ""


def read_canary(model_root: Location) -> tuple[Canary | None, str | None]:
    """The current canary (None when there is none) and the store's token for a swap."""
    data, token = model_root.read_with_token(CANARY)
    if data is None:
        return None, token
    try:
        doc = json.loads(data)
        if doc.get("version") is None:
            return None, token
        # The version becomes a local folder beside vLLM (the adapter agent): checked like PROMOTED's.
        version = check_version(str(doc["version"]), f"{model_root.uri}/{CANARY}")
        return Canary(version, int(doc["weight"]), str(doc.get("sticky", "apiKey")), doc.get("at", ""),
                      doc.get("actor", "")), token
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{model_root.uri}/{CANARY} is not a canary record ({exc}); rewrite it with lawtune models canary") from None


def write_canary(model_root: Location, canary: Canary | None, token: str | None) -> Canary | None:
    """Swap CANARY from what ``token`` names to ``canary`` (None ends the canary); CanaryConflict when it moved."""
    if canary is not None:
        if not 0 <= canary.weight <= 100:
            raise ConfigError(f"--weight {canary.weight}: expected a percent of traffic, 0-100")
        if canary.sticky not in STICKY:
            raise ConfigError(f"--sticky {canary.sticky!r}: expected one of {', '.join(STICKY)}")
        canary = Canary(canary.version, canary.weight, canary.sticky, now_iso(), actor())
    body = json.dumps(asdict(canary) if canary else {"version": None, "at": now_iso(), "actor": actor()}) + "\n"
    if not model_root.write_if(CANARY, body.encode("utf-8"), token):
        raise CanaryConflict(f"{model_root.uri}/{CANARY} changed while this command was deciding; run it again")
    return canary


def record_event(model_root: Location, event: dict[str, Any]) -> dict[str, Any]:
    """One history object per event, as shared/publish/registry.py writes promotions."""
    record = {"at": now_iso(), "actor": actor(), **event}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    model_root.write_text(f"{HISTORY}/{stamp}-{uuid.uuid4().hex[:8]}.json", json.dumps(record, ensure_ascii=False) + "\n")
    return record


@dataclass(frozen=True)
class ServingState:
    """Which versions a model's serving runs now, and how requests split between them."""

    model: str
    champion: str | None
    challenger: str | None = None
    weight: int = 0  # percent to the challenger
    sticky: str = "apiKey"
    # The champion before this one: kept loaded while a change settles, and where a request goes when the
    # replica that got it has not loaded its version yet (the gateway retries there instead of failing).
    previous: str | None = None

    def versions(self) -> list[str]:
        """The versions every replica must hold, champion first."""
        out: list[str] = []
        for v in (self.champion, self.challenger, self.previous):
            if v and v not in out:
                out.append(v)
        return out

    def weights(self) -> dict[str, int]:
        """Percent of requests each version answers."""
        if not self.champion:
            return {}
        if not self.challenger or self.challenger == self.champion:
            return {self.champion: 100}
        return {self.champion: 100 - self.weight, self.challenger: self.weight}

    def routes(self) -> dict[str, Any]:
        """What the gateway splits by (charts/lawtune-serving/files/canary.js reads this document)."""
        challenger = self.challenger if self.challenger != self.champion else None
        return {"model": self.model, "champion": self.champion, "challenger": challenger,
                "weight": self.weight if challenger else 0, "sticky": self.sticky, "previous": self.previous,
                # Salted with the challenger, so each new canary samples other clients.
                "salt": challenger or ""}


def read_promoted(model_root: Location) -> str | None:
    if not model_root.exists(PROMOTED):
        return None
    return check_version(model_root.read_text(PROMOTED).strip(), f"{model_root.uri}/{PROMOTED}")


def last_promotion(model_root: Location, champion: str | None) -> tuple[str | None, str | None]:
    """(the version PROMOTED named before ``champion``, when it moved), from the newest history event that moved it."""
    names = sorted(n for n in model_root.child(HISTORY).list_files() if n.endswith(".json"))
    for name in reversed(names):
        event = json.loads(model_root.child(HISTORY).read_text(name))
        if event.get("to") == champion and event.get("from") != champion:
            before = event.get("from")
            return (check_version(str(before), f"{model_root.uri}/{HISTORY}/{name}") if before else None), event.get("at")
    return None, None


def serving_state(model: str, model_root: Location, previous: str | None = None, *, with_history: bool = False) -> ServingState:
    """The state now. ``previous`` is what the caller last saw as champion; ``with_history`` looks it up instead."""
    champion = read_promoted(model_root)
    canary, _ = read_canary(model_root)
    if with_history:
        previous = last_promotion(model_root, champion)[0]
    if previous == champion:
        previous = None
    return ServingState(model, champion, canary.version if canary else None, canary.weight if canary else 0,
                        canary.sticky if canary else "apiKey", previous)
