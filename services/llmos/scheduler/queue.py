"""The scheduler's core: admission, a bounded priority queue, and routing.

A request is admitted when a worker that serves its model has a free slot (at
most `slots_per_worker` running generations each). Otherwise it waits, higher
priority first and then first come first served, until a slot frees, its
deadline passes, or its caller goes away. Past `max_queue` waiting requests, new
ones are refused at once with an estimate of when to retry.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from llmos.common.errors import AlreadyExists, DeadlineExceeded, ResourceExhausted, Unavailable
from llmos.common.names import parse_model_ref

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    worker_id: str
    address: str


class RegistryPort(Protocol):
    async def ready_endpoints(self, model: str, timeout: float | None) -> tuple[str, list[Endpoint]]:
        """(resolved "name:tag", workers where it is ready); raises NotFound if not in the catalog."""

    async def load(self, model: str, timeout: float | None, keep_alive: float | None = None) -> list[Endpoint]:
        """Loads the model somewhere (cold start), or just sets its keep-alive when it is
        loaded already; returns where it is ready."""


@dataclass(frozen=True)
class Admission:
    request_id: str
    model: str
    endpoint: Endpoint
    queue_seconds: float


@dataclass(order=True)
class _Waiter:
    sort_key: tuple[int, int]
    request_id: str = field(compare=False)
    model: str = field(compare=False)
    endpoints: list[Endpoint] = field(compare=False)
    future: asyncio.Future = field(compare=False)


@dataclass
class _Running:
    model: str
    endpoint: Endpoint
    started: float


class Scheduler:
    def __init__(self, registry: RegistryPort, slots_per_worker: int = 16, max_queue: int = 64,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self.slots_per_worker = slots_per_worker
        self.max_queue = max_queue
        self._clock = clock
        self._running: dict[str, _Running] = {}
        self._busy: dict[str, int] = {}          # worker_id → running generations
        self._waiting: list[_Waiter] = []
        self._order = itertools.count()
        self._mean_seconds = 1.0                 # moving average of generation time
        self.admitted_total = 0
        self.rejected_total = 0

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def admit(self, request_id: str, model: str, priority: int = 0,
                    timeout: float | None = None, keep_alive: float | None = None) -> Admission:
        """Admits a generation, waiting in the queue for at most `timeout` seconds.
        `keep_alive` (seconds, negative: forever) is handed to the registry for the model."""
        started = self._clock()

        def remaining() -> float | None:
            return None if timeout is None else max(0.0, timeout - (self._clock() - started))

        if request_id in self._running or any(w.request_id == request_id for w in self._waiting):
            raise AlreadyExists(f"request {request_id!r} is already admitted",
                                reason="DUPLICATE_REQUEST_ID", metadata={"request_id": request_id})
        parse_model_ref(model)
        resolved, endpoints = await self._registry.ready_endpoints(model, remaining())
        if not endpoints or keep_alive is not None:
            endpoints = await self._registry.load(resolved, remaining(), keep_alive)
            if not endpoints:
                raise Unavailable(f"no worker serves {resolved}", reason="NO_READY_WORKER",
                                  metadata={"model": resolved})
        endpoint = self._free_endpoint(endpoints)
        if endpoint is not None:
            self._busy[endpoint.worker_id] = self._busy.get(endpoint.worker_id, 0) + 1
        else:
            endpoint = await self._wait(request_id, resolved, endpoints, priority, remaining())
        self._running[request_id] = _Running(resolved, endpoint, self._clock())
        self.admitted_total += 1
        return Admission(request_id, resolved, endpoint, self._clock() - started)

    def finish(self, request_id: str) -> bool:
        """Releases the generation's slot and hands it to the next waiter. Idempotent."""
        running = self._running.pop(request_id, None)
        if running is None:
            return False
        self._busy[running.endpoint.worker_id] -= 1
        took = self._clock() - running.started
        self._mean_seconds = 0.9 * self._mean_seconds + 0.1 * took
        self._dispatch()
        return True

    def retry_after(self) -> float:
        """A fair guess of when a slot frees: the queue ahead, served at the measured pace."""
        capacity = max(1, len(self._busy) * self.slots_per_worker)
        return max(0.1, self._mean_seconds * (len(self._waiting) + 1) / capacity)

    def _free_endpoint(self, endpoints: list[Endpoint]) -> Endpoint | None:
        free = [e for e in endpoints if self._busy.get(e.worker_id, 0) < self.slots_per_worker]
        if not free:
            return None
        return min(free, key=lambda e: (self._busy.get(e.worker_id, 0), e.worker_id))

    async def _wait(self, request_id: str, model: str, endpoints: list[Endpoint], priority: int,
                    timeout: float | None) -> Endpoint:
        if len(self._waiting) >= self.max_queue:
            self.rejected_total += 1
            raise ResourceExhausted(
                f"the queue is full ({len(self._waiting)} waiting); retry later",
                retry_after=self.retry_after(), reason="QUEUE_FULL",
                metadata={"waiting": str(len(self._waiting)), "max_queue": str(self.max_queue)})
        for e in endpoints:
            self._busy.setdefault(e.worker_id, 0)
        waiter = _Waiter((-priority, next(self._order)), request_id, model, endpoints,
                         asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._waiting.sort()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except BaseException as exc:
            self._abandon(waiter)
            if isinstance(exc, TimeoutError):
                self.rejected_total += 1
                raise DeadlineExceeded(f"the deadline passed after {timeout:.3f}s in the queue",
                                       reason="DEADLINE_EXCEEDED_IN_QUEUE") from None
            raise

    def _abandon(self, waiter: _Waiter) -> None:
        """The caller gave up: leave the queue, or give back a slot handed over meanwhile."""
        if waiter in self._waiting:
            self._waiting.remove(waiter)
        elif waiter.future.done() and not waiter.future.cancelled():
            self._busy[waiter.future.result().worker_id] -= 1
            self._dispatch()

    def _dispatch(self) -> None:
        """Hands free slots to waiters, highest priority first."""
        for waiter in list(self._waiting):
            endpoint = self._free_endpoint(waiter.endpoints)
            if endpoint is None:
                continue
            self._waiting.remove(waiter)
            self._busy[endpoint.worker_id] += 1        # reserved for the waiter
            waiter.future.set_result(endpoint)
