"""The gateway's core: admit through the scheduler, stream from the chosen worker.

The scheduler is told how every admitted generation ended (finished, failed or
cancelled), so its slots and queue stay exact. The remaining client deadline is
passed to each downstream call.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from llmos.common.domain import Chunk, FinishReason, GenerationInput, SamplingParams, Usage
from llmos.common.errors import DeadlineExceeded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateCall:
    model: str
    source: GenerationInput
    params: SamplingParams
    priority: int = 0
    request_id: str = ""
    tenant: str = "default"
    # Seconds the model stays loaded without requests after this one; None: unchanged.
    keep_alive: float | None = None


@dataclass(frozen=True)
class Assignment:
    worker_address: str
    model: str


class SchedulerPort(Protocol):
    async def admit(self, call: GenerateCall, request_id: str, timeout: float | None) -> Assignment: ...

    async def finish(self, request_id: str, reason: FinishReason | None, usage: Usage | None) -> None: ...


class WorkerPort(Protocol):
    def generate(self, address: str, request_id: str, model: str, call: GenerateCall,
                 timeout: float | None) -> AsyncIterator[Chunk]: ...


class FrontDoor:
    def __init__(self, scheduler: SchedulerPort, workers: WorkerPort) -> None:
        self._scheduler = scheduler
        self._workers = workers
        self._background: set[asyncio.Task] = set()

    async def generate(self, call: GenerateCall, timeout: float | None) -> AsyncIterator[tuple[str, Chunk]]:
        """Streams (request id, chunk) pairs for one request."""
        request_id = call.request_id or f"req-{uuid.uuid4().hex}"
        deadline = None if timeout is None else time.monotonic() + timeout
        assignment = await self._scheduler.admit(call, request_id, timeout)
        reason: FinishReason | None = None
        usage: Usage | None = None
        try:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("the deadline passed before generation started")
            async for chunk in self._workers.generate(assignment.worker_address, request_id,
                                                      assignment.model, call, remaining):
                if chunk.finish_reason is not None:
                    reason, usage = chunk.finish_reason, chunk.usage
                yield request_id, chunk
        except asyncio.CancelledError:
            reason = FinishReason.CANCELLED
            raise
        finally:
            # Reported from a task of its own: this one may be cancelled already.
            task = asyncio.get_running_loop().create_task(
                self._scheduler.finish(request_id, reason, usage))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Waits for the pending scheduler reports (at shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
