"""The serving state as an agent follows it: the store's champion and canary, plus the champion before.

Each poll reads ``PROMOTED`` and ``CANARY`` (two small objects; shared/store/serving.py). When the
champion changes, the one it replaced stays in the state as ``previous`` for ``settle_seconds``:
replicas keep it loaded, and the gateway sends a request there when the replica that got it has
not loaded the new champion yet. At start, the history says whether the last promotion is still
that recent.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from shared.store.serving import ServingState, last_promotion, serving_state
from shared.store.storage import Location

log = logging.getLogger("lawtune.serve.state")


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class StateTracker:
    def __init__(self, model: str, model_root: Location, settle_seconds: float, clock=time.time):
        self.model, self.model_root, self.settle_seconds, self.clock = model, model_root, settle_seconds, clock
        self._champion: str | None = None
        self._previous: str | None = None
        self._changed_at = 0.0
        self._started = False

    def poll(self) -> ServingState:
        state = serving_state(self.model, self.model_root)
        now = self.clock()
        if not self._started:
            self._started = True
            previous, at = last_promotion(self.model_root, state.champion)
            moved = _epoch(at)
            if previous and moved is not None and now - moved < self.settle_seconds:
                self._previous, self._changed_at = previous, moved
            self._champion = state.champion
        elif state.champion != self._champion:
            log.info("champion %s -> %s", self._champion or "<none>", state.champion or "<none>")
            self._previous, self._changed_at, self._champion = self._champion, now, state.champion
        if self._previous and now - self._changed_at >= self.settle_seconds:
            self._previous = None
        previous = self._previous if self._previous != state.champion else None
        return ServingState(state.model, state.champion, state.challenger, state.weight, state.sticky, previous)
