"""Model lifecycle events, fanned out to every watcher (`WatchModels`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llmos.common.errors import ResourceExhausted

IMPORTING, IMPORTED, LOADING, READY = "importing", "imported", "loading", "ready"
UNLOADING, UNLOADED, EVICTED, UNAVAILABLE, FAILED, DELETED = (
    "unloading", "unloaded", "evicted", "unavailable", "failed", "deleted")
MAX_BEHIND = 1000


@dataclass(frozen=True)
class ModelEvent:
    model: str
    kind: str
    worker_id: str = ""
    reason: str = ""
    time: float = field(default_factory=time.time)


class EventHub:
    def __init__(self) -> None:
        self._watchers: set[asyncio.Queue] = set()

    def emit(self, model: str, kind: str, worker_id: str = "", reason: str = "") -> None:
        event = ModelEvent(model, kind, worker_id, reason)
        for queue in list(self._watchers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:           # too far behind: end that stream
                self._watchers.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)

    async def watch(self, model: str = "") -> AsyncIterator[ModelEvent]:
        """Events from now on, for `model` ("name:tag") or every model."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=MAX_BEHIND)
        self._watchers.add(queue)
        try:
            while True:
                event = await queue.get()
                if event is None:
                    raise ResourceExhausted(f"the watcher fell more than {MAX_BEHIND} events behind",
                                            reason="WATCHER_TOO_SLOW", retry_after=0.0)
                if not model or event.model == model:
                    yield event
        finally:
            self._watchers.discard(queue)
