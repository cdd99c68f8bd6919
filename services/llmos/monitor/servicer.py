"""gRPC face of the monitor, and its probe over gRPC health checks."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.common.channels import Channels
from llmos.common.convert import timestamp
from llmos.v1 import (
    monitor_pb2,
    monitor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

from .health import NOT_SERVING, SERVING, UNREACHABLE, HealthMonitor, QueueDepth

_STATES = {SERVING: monitor_pb2.ComponentHealth.STATE_SERVING,
           NOT_SERVING: monitor_pb2.ComponentHealth.STATE_NOT_SERVING,
           UNREACHABLE: monitor_pb2.ComponentHealth.STATE_UNREACHABLE}


class GrpcProbe:
    def __init__(self, channels: Channels, registry_address: str, timeout: float,
                 scheduler_address: str = "") -> None:
        self._channels = channels
        self._registry = registry_pb2_grpc.RegistryServiceStub(channels.get(registry_address))
        self._scheduler = (scheduler_pb2_grpc.SchedulerServiceStub(channels.get(scheduler_address))
                           if scheduler_address else None)
        self._timeout = timeout

    async def check(self, address: str) -> tuple[str, str]:
        stub = health_pb2_grpc.HealthStub(self._channels.get(address))
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            return UNREACHABLE, f"health check failed: {exc.code().name}"
        if response.status == health_pb2.HealthCheckResponse.SERVING:
            return SERVING, ""
        return NOT_SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def workers(self) -> list[tuple[str, str]]:
        response = await self._registry.ListWorkers(registry_pb2.ListWorkersRequest(),
                                                    timeout=self._timeout)
        return [(w.worker_id, w.address) for w in response.workers]

    async def queues(self) -> list[QueueDepth]:
        if self._scheduler is None:
            return []
        stats = await self._scheduler.GetSchedulerStats(scheduler_pb2.GetSchedulerStatsRequest(),
                                                        timeout=self._timeout)
        return [QueueDepth(q.model, q.priority, q.tenant, q.waiting) for q in stats.queues]


class MonitorServicer(monitor_pb2_grpc.MonitorServiceServicer):
    def __init__(self, monitor: HealthMonitor) -> None:
        self.monitor = monitor

    async def GetClusterHealth(self, request, context):
        health = await self.monitor.cluster_health()
        return monitor_pb2.GetClusterHealthResponse(
            healthy=health.healthy, check_time=timestamp(health.check_time),
            components=[monitor_pb2.ComponentHealth(component=c.component, address=c.address,
                                                    state=_STATES[c.state], detail=c.detail)
                        for c in health.components],
            queues=[scheduler_pb2.QueueDepth(model=q.model, priority=q.priority, tenant=q.tenant, waiting=q.waiting)
                    for q in health.queues])


def register(host, monitor: HealthMonitor) -> None:
    servicer = MonitorServicer(monitor)
    host.add(monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"].full_name,
             lambda server: monitor_pb2_grpc.add_MonitorServiceServicer_to_server(servicer, server))
