"""The monitor's core: checks every service and worker and sums up the cluster."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

SERVING, NOT_SERVING, UNREACHABLE = "serving", "not_serving", "unreachable"


@dataclass(frozen=True)
class ComponentHealth:
    component: str
    address: str
    state: str
    detail: str = ""


@dataclass(frozen=True)
class QueueDepth:
    model: str
    priority: int
    tenant: str
    waiting: int


@dataclass(frozen=True)
class ClusterHealth:
    healthy: bool
    components: list[ComponentHealth]
    check_time: float
    queues: list[QueueDepth]


class ProbePort(Protocol):
    async def check(self, address: str) -> tuple[str, str]:
        """(state, detail) of the gRPC health check at `address`."""

    async def workers(self) -> list[tuple[str, str]]:
        """(worker id, address) of every registered worker."""

    async def queues(self) -> list[QueueDepth]:
        """The scheduler's waiting requests per model, band and tenant."""


class HealthMonitor:
    def __init__(self, probe: ProbePort, services: dict[str, str]) -> None:
        self._probe = probe
        self._services = dict(services)

    def add_service(self, name: str, address: str) -> None:
        self._services[name] = address

    async def cluster_health(self) -> ClusterHealth:
        targets = list(self._services.items())
        try:
            targets += [(f"worker/{wid}", address) for wid, address in sorted(await self._probe.workers())]
        except Exception as exc:  # noqa: BLE001 - the registry's own check reports why
            targets.append(("workers", ""))
            workers_error = f"cannot list workers: {exc.__class__.__name__}"
        else:
            workers_error = ""
        queues_task = asyncio.ensure_future(self._probe.queues())
        results = await asyncio.gather(*(self._probe.check(address) for _, address in targets
                                         if address))
        try:
            queues = await queues_task
        except Exception:  # noqa: BLE001 - the scheduler's own check says why
            queues = []
        components = []
        checked = iter(results)
        for name, address in targets:
            if not address:
                components.append(ComponentHealth(name, address, UNREACHABLE, workers_error))
                continue
            state, detail = next(checked)
            components.append(ComponentHealth(name, address, state, detail))
        return ClusterHealth(all(c.state == SERVING for c in components), components, time.time(), queues)
