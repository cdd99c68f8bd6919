"""Fan-out of events to every subscriber of a server-streaming Watch RPC.

Each subscriber has a bounded queue; one that falls `max_behind` events behind is
dropped, and its stream ends with RESOURCE_EXHAUSTED, so a slow watcher never holds
memory or slows the publisher.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

from .errors import ResourceExhausted

T = TypeVar("T")
_END = object()


class Broadcast(Generic[T]):
    def __init__(self, max_behind: int = 1000) -> None:
        self.max_behind = max_behind
        self._queues: set[asyncio.Queue] = set()
        self._handed: set[asyncio.Queue] = set()   # subscribers whose consumer has an event not yet done with

    def pending(self) -> int:
        """Events emitted that some subscriber's consumer has not finished with yet: queued, or
        handed out and not yet followed by a request for the next one (a gRPC stream asks for
        the next message once it has sent the one before)."""
        return sum(queue.qsize() for queue in self._queues) + len(self._handed)

    def emit(self, event: T) -> None:
        for queue in list(self._queues):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:           # too far behind: end that stream
                self._queues.discard(queue)
                queue.get_nowait()
                queue.put_nowait(_END)

    async def subscribe(self, first: list[T] | None = None) -> AsyncIterator[T]:
        """`first` (the current state), then every event from now on."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.max_behind)
        self._queues.add(queue)
        try:
            for event in first or ():
                yield event
            while True:
                event = await queue.get()
                if event is _END:
                    raise ResourceExhausted(f"the watcher fell more than {self.max_behind} events behind",
                                            reason="WATCHER_TOO_SLOW", retry_after=0.0)
                self._handed.add(queue)
                yield event
                self._handed.discard(queue)
        finally:
            self._queues.discard(queue)
            self._handed.discard(queue)
