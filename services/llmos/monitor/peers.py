"""The monitor's ports to what it watches: health checks and status of every service and
worker, the registry's model events relayed to `Watch`, and the synthetic Generate probe.
Failures arrive as typed errors (`LlmosError`) from the channels' interceptor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.common.channels import Channels
from llmos.common.convert import enum_word, queue_depth_from_proto, seconds
from llmos.common.errors import LlmosError
from llmos.common.paging import MAX_PAGE, every_page
from llmos.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    resources_pb2,
    resources_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

from .cluster import ClusterWatch, ModelEvent, ProbeResult
from .health import (
    NOT_SERVING,
    SERVING,
    UNREACHABLE,
    ComponentState,
    Lease,
    SchedulerView,
    WorkerInfo,
    WorkerReport,
)

log = logging.getLogger(__name__)


class GrpcProbe:
    def __init__(self, channels: Channels, timeout: float, registry_address: str, scheduler_address: str = "",
                 resources_address: str = "") -> None:
        self._channels = channels
        self._registry = registry_pb2_grpc.RegistryServiceStub(channels.get(registry_address))
        self._scheduler = (scheduler_pb2_grpc.SchedulerServiceStub(channels.get(scheduler_address))
                           if scheduler_address else None)
        self._resources = (resources_pb2_grpc.ResourceServiceStub(channels.get(resources_address))
                           if resources_address else None)
        self._timeout = timeout

    async def check(self, address: str) -> tuple[ComponentState, str]:
        stub = self._channels.stub(health_pb2_grpc.HealthStub, address)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=self._timeout)
        except LlmosError as exc:
            return UNREACHABLE, f"health check failed: {exc.code}"
        if response.status == health_pb2.HealthCheckResponse.SERVING:
            return SERVING, ""
        return NOT_SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def workers(self) -> list[WorkerInfo]:
        workers = await every_page(self._registry.ListWorkers, registry_pb2.ListWorkersRequest(page_size=MAX_PAGE),
                                   "workers", self._timeout)
        return [WorkerInfo(w.worker_id, w.address, w.metrics_address) for w in workers]

    async def worker_status(self, address: str) -> WorkerReport:
        stub = self._channels.stub(worker_pb2_grpc.WorkerServiceStub, address)
        status = await stub.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest(), timeout=self._timeout)
        return WorkerReport(status.running, status.tokens_generated,
                            {m.model: (m.kv_tokens_used, m.kv_tokens_capacity) for m in status.models})

    async def scheduler(self) -> SchedulerView:
        if self._scheduler is None:
            return SchedulerView([], {})
        try:
            stats = await self._scheduler.GetSchedulerStats(scheduler_pb2.GetSchedulerStatsRequest(),
                                                            timeout=self._timeout)
        except LlmosError as exc:       # a standby: the figures are its leader's
            leader = exc.metadata.get("leader", "") if exc.reason == "NOT_LEADER" else ""
            if not leader:
                raise
            stub = self._channels.stub(scheduler_pb2_grpc.SchedulerServiceStub, leader)
            stats = await stub.GetSchedulerStats(scheduler_pb2.GetSchedulerStatsRequest(), timeout=self._timeout)
        running: dict[str, int] = {}
        for w in stats.workers:
            running[w.worker_id] = running.get(w.worker_id, 0) + w.running
        return SchedulerView([queue_depth_from_proto(q) for q in stats.queues], running)

    async def leases(self) -> list[Lease]:
        if self._resources is None:
            return []
        leases = await every_page(self._resources.ListLeases, resources_pb2.ListLeasesRequest(page_size=MAX_PAGE),
                                  "leases", self._timeout)
        return [Lease(lease.holder, lease.bytes) for lease in leases]


class RegistryEvents:
    """Relays the registry's model lifecycle events into the monitor's `Watch`, reconnecting
    after the registry restarts."""

    def __init__(self, channels: Channels, registry_address: str, watch: ClusterWatch) -> None:
        self._stub = registry_pb2_grpc.RegistryServiceStub(channels.get(registry_address))
        self._watch = watch

    async def run(self, address: str = "") -> None:
        while True:
            try:
                async for e in self._stub.WatchModels(registry_pb2.WatchModelsRequest()):
                    self._watch.model_event(ModelEvent(e.model, enum_word(e, "kind"),
                                                       e.worker_id, e.reason, seconds(e.time)))
            except LlmosError as exc:
                log.debug("model events from the registry interrupted: %s", exc.code)
            await asyncio.sleep(1.0)


class GenerateProbe:
    """A one-token Generate through the gateway, as a client would send it, on `model` or
    else on the first model ready somewhere."""

    def __init__(self, channels: Channels, gateway_address: str, registry_address: str, model: str = "",
                 timeout: float = 30.0, key_file: str = "") -> None:
        self._gateway = gateway_pb2_grpc.GatewayServiceStub(channels.get(gateway_address))
        self._registry = registry_pb2_grpc.RegistryServiceStub(channels.get(registry_address))
        self._model = model
        self._timeout = timeout
        self._key_file = key_file

    @property
    def _metadata(self) -> list[tuple[str, str]]:
        """The probe's key, read afresh each round (it may be rotated)."""
        if not self._key_file:
            return []
        try:
            return [("authorization", "Bearer " + Path(self._key_file).read_text().strip())]
        except OSError as exc:
            log.warning("cannot read the probe's API key: %s", exc)
            return []

    async def _ready_model(self) -> str:
        page = await self._registry.ListModels(registry_pb2.ListModelsRequest(), timeout=5)
        for m in page.models:
            if any(p.state == common_pb2.Model.STATE_READY for p in m.placements):
                return f"{m.name}:{m.tag}"
        return ""

    async def __call__(self) -> ProbeResult | None:
        model = self._model or await self._ready_model()
        if not model:
            return None
        started = time.perf_counter()
        request = gateway_pb2.GenerateRequest(model=model, prompt="Hello",
                                              sampling=common_pb2.SamplingParams(max_tokens=1, temperature=0.0))
        try:
            tokens = 0
            async for response in self._gateway.Generate(request, timeout=self._timeout, metadata=self._metadata):
                tokens += len(response.token_ids)
            ok, detail = tokens > 0, "" if tokens else "no token came back"
        except LlmosError as exc:
            ok, detail = False, f"{exc.code}: {exc.message} [{exc.reason}]"
        return ProbeResult(model, ok, detail, time.perf_counter() - started, time.time())
