"""Model lifecycle events, fanned out to every watcher (`WatchModels`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from llmos.common.broadcast import Broadcast

IMPORTING, IMPORTED, LOADING, READY = "importing", "imported", "loading", "ready"
UNLOADING, UNLOADED, EVICTED, UNAVAILABLE, FAILED, DELETED = (
    "unloading", "unloaded", "evicted", "unavailable", "failed", "deleted")
# An alias's changes (the event's model is the alias), and a version no alias sends traffic to any more.
ALIAS_SET, ROLLED_BACK, ALIAS_DELETED, DRAINING, DRAINED = (
    "alias_set", "rolled_back", "alias_deleted", "draining", "drained")
KINDS = (IMPORTING, IMPORTED, LOADING, READY, UNLOADING, UNLOADED, EVICTED, UNAVAILABLE, FAILED, DELETED,
         ALIAS_SET, ROLLED_BACK, ALIAS_DELETED, DRAINING, DRAINED)
MAX_BEHIND = 1000


@dataclass(frozen=True)
class ModelEvent:
    model: str
    kind: str
    worker_id: str = ""
    reason: str = ""
    time: float = field(default_factory=time.time)


class EventHub:
    """Events emitted here reach the watchers at once, or with a `sink` (the store's journal:
    `registry.shared`) only once the sink hands them back (`deliver`), in the order every
    replica's watchers see."""

    def __init__(self, sink: Callable[[ModelEvent], None] | None = None) -> None:
        self._broadcast: Broadcast[ModelEvent] = Broadcast(MAX_BEHIND)
        # Called with every event as it is emitted here (the metrics); each must be quick.
        self.listeners: list[Callable[[ModelEvent], None]] = []
        self.sink = sink

    def emit(self, model: str, kind: str, worker_id: str = "", reason: str = "") -> None:
        event = ModelEvent(model, kind, worker_id, reason)
        for listener in self.listeners:
            listener(event)
        if self.sink is not None:
            self.sink(event)
        else:
            self._broadcast.emit(event)

    def deliver(self, event: ModelEvent) -> None:
        """Hands an event (of any replica, in the store's order) to this replica's watchers."""
        self._broadcast.emit(event)

    def pending(self) -> int:
        """Events handed to this replica's watchers that some watch has not sent yet."""
        return self._broadcast.pending()

    async def watch(self, model: str = "") -> AsyncIterator[ModelEvent]:
        """Events from now on, for `model` ("name:tag") or every model."""
        async for event in self._broadcast.subscribe():
            if not model or event.model == model:
                yield event
