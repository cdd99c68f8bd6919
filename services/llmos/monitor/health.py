"""The monitor's core: checks every service and worker, tracks each worker's progress,
and sums up the cluster.

A worker is judged by what it does, not only by what its health check says: one with
running generations (its own count, or the scheduler's when it does not answer) that
produced no token for `stall_seconds` is STALLED, however it answers. A frozen
process, a wedged engine thread and a deadlocked step all look like this.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from llmos.common.domain import QueueDepth


class ComponentState(enum.StrEnum):
    """A component's state in a health report (and ComponentHealth.State in the proto)."""

    SERVING = "serving"
    NOT_SERVING = "not_serving"
    UNREACHABLE = "unreachable"
    STALLED = "stalled"


SERVING, NOT_SERVING, UNREACHABLE, STALLED = ComponentState
# The monitor's own component name: it checks itself, but does not gather its own metrics.
MONITOR = "monitor"


@dataclass(frozen=True)
class ComponentHealth:
    component: str
    address: str
    state: ComponentState
    detail: str = ""
    running: int = 0
    last_progress: float | None = None       # Unix time of its last token (workers)
    metrics_address: str = ""
    start_time: float | None = None          # Unix time its process started, from its metrics
    restarts: int = 0                        # how often the monitor saw it start again


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    address: str
    metrics_address: str = ""


@dataclass(frozen=True)
class WorkerReport:
    """A worker's answer to its status poll."""

    running: int
    tokens_generated: int
    # model → (KV positions used, KV positions in all)
    kv: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class SchedulerView:
    queues: list[QueueDepth]
    running: dict[str, int]         # worker id → generations the scheduler sent there, not ended


@dataclass(frozen=True)
class Lease:
    holder: str
    bytes: int


@dataclass(frozen=True)
class ClusterHealth:
    healthy: bool
    components: list[ComponentHealth]
    check_time: float
    queues: list[QueueDepth]
    # What the rules read beyond the components: each worker's KV use per model, the leases,
    # and which models each reachable worker holds.
    kv: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    leases: list[Lease] | None = None
    workers: list[WorkerInfo] = field(default_factory=list)


class ProbePort(Protocol):
    async def check(self, address: str) -> tuple[ComponentState, str]:
        """(state, detail) of the gRPC health check at `address`."""

    async def workers(self) -> list[WorkerInfo]:
        """Every registered worker."""

    async def worker_status(self, address: str) -> WorkerReport:
        """The worker's status; raises when it does not answer."""

    async def scheduler(self) -> SchedulerView:
        """The scheduler's queues and running generations per worker."""

    async def leases(self) -> list[Lease]:
        """Every memory lease held."""


@dataclass
class _Progress:
    tokens: int = -1
    since: float = 0.0              # monotonic: when it last made progress (or had nothing to do)
    wall: float | None = None       # Unix time of its last token seen


class HealthMonitor:
    def __init__(self, probe: ProbePort, services: dict[str, str], stall_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, metrics: dict[str, str] | None = None) -> None:
        self._probe = probe
        self._services = dict(services)
        # Service → where it serves its Prometheus metrics (workers report theirs to the registry).
        self._metrics = dict(metrics or {})
        self.stall_seconds = stall_seconds
        self._clock = clock
        self._progress: dict[str, _Progress] = {}

    def add_service(self, name: str, address: str, metrics_address: str = "") -> None:
        self._services[name] = address
        if metrics_address:
            self._metrics[name] = metrics_address

    def metrics_addresses(self) -> dict[str, str]:
        """Service → its metrics address, as configured (the monitor's own included)."""
        return dict(self._metrics)

    async def cluster_health(self) -> ClusterHealth:
        services = list(self._services.items())
        workers_task = asyncio.ensure_future(self._probe.workers())
        scheduler_task = asyncio.ensure_future(self._probe.scheduler())
        leases_task = asyncio.ensure_future(self._probe.leases())
        service_checks = await asyncio.gather(*(self._probe.check(address) for _, address in services))
        components = [ComponentHealth(name, address, state, detail, metrics_address=self._metrics.get(name, ""))
                      for (name, address), (state, detail) in zip(services, service_checks, strict=True)]
        try:
            workers = sorted(await workers_task, key=lambda w: w.worker_id)
        except Exception as exc:  # noqa: BLE001 - the registry's own check reports why
            workers = []
            components.append(ComponentHealth("workers", "", UNREACHABLE,
                                              f"cannot list workers: {exc.__class__.__name__}"))
        worker_checks = await asyncio.gather(*(self._check_worker(w) for w in workers))
        scheduler = await _or_none(scheduler_task)
        leases = await _or_none(leases_task)
        kv = {}
        for worker, (state, detail, report) in zip(workers, worker_checks, strict=True):
            components.append(self._judge(worker, state, detail, report, scheduler))
            if report is not None:
                kv[worker.worker_id] = report.kv
        live = {w.worker_id for w in workers}
        for gone in set(self._progress) - live:
            del self._progress[gone]
        return ClusterHealth(all(c.state == SERVING for c in components), components, time.time(),
                             scheduler.queues if scheduler else [], kv, leases, workers)

    async def _check_worker(self, worker: WorkerInfo) -> tuple[str, str, WorkerReport | None]:
        state, detail = await self._probe.check(worker.address)
        report = None
        if state != UNREACHABLE:
            try:
                report = await self._probe.worker_status(worker.address)
            except Exception:  # noqa: BLE001 - judged by its progress below
                report = None
        return state, detail, report

    def _judge(self, worker: WorkerInfo, state: ComponentState, detail: str, report: WorkerReport | None,
               scheduler: SchedulerView | None) -> ComponentHealth:
        """The worker's health, with its progress: running generations and no new token for
        `stall_seconds` make it STALLED whatever its health check said."""
        now = self._clock()
        progress = self._progress.setdefault(worker.worker_id, _Progress(since=now))
        if report is not None:
            running = report.running
            if report.tokens_generated != progress.tokens:
                if progress.tokens >= 0:
                    progress.wall = time.time()
                progress.tokens, progress.since = report.tokens_generated, now
        else:
            running = scheduler.running.get(worker.worker_id, 0) if scheduler else 0
        if running == 0:
            progress.since = now
        stalled_for = now - progress.since
        if running > 0 and stalled_for >= self.stall_seconds:
            why = f"{running} running, no token for {stalled_for:.1f}s"
            state, detail = STALLED, why + (f"; {detail}" if detail else "")
        return ComponentHealth(f"worker/{worker.worker_id}", worker.address, state, detail, running,
                               progress.wall, worker.metrics_address)


async def _or_none(task: asyncio.Future):
    try:
        return await task
    except Exception:  # noqa: BLE001 - that service's own check says why
        return None
