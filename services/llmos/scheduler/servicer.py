"""gRPC face of the scheduler."""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2

from llmos.common.channels import Channels
from llmos.common.errors import InvalidArgument
from llmos.common.status import from_rpc_error
from llmos.v1 import common_pb2, registry_pb2, registry_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from .queue import Endpoint, Scheduler


def _within(limit: float, remaining: float | None) -> float:
    """The call's own limit, or less when the caller's deadline is nearer."""
    return limit if remaining is None else min(limit, remaining)


def _ready(model: common_pb2.Model) -> list[Endpoint]:
    return [Endpoint(p.worker_id, p.worker_address) for p in model.placements
            if p.state == common_pb2.Model.STATE_READY]


class GrpcRegistry:
    """The scheduler's port to the registry."""

    def __init__(self, channels: Channels, address: str, load_timeout: float) -> None:
        self._stub = registry_pb2_grpc.RegistryServiceStub(channels.get(address))
        self._load_timeout = load_timeout

    async def ready_endpoints(self, model: str, timeout: float | None) -> tuple[str, list[Endpoint]]:
        try:
            response = await self._stub.GetModel(registry_pb2.GetModelRequest(name=model),
                                                 timeout=_within(5.0, timeout))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return f"{response.model.name}:{response.model.tag}", _ready(response.model)

    async def load(self, model: str, timeout: float | None, keep_alive: float | None = None) -> list[Endpoint]:
        request = registry_pb2.LoadModelRequest(name=model)
        if keep_alive is not None:
            request.keep_alive.FromNanoseconds(int(keep_alive * 1e9))
        try:
            response = await self._stub.LoadModel(request, timeout=_within(self._load_timeout, timeout))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return _ready(response.model)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    async def AdmitGeneration(self, request, context: grpc.aio.ServicerContext):
        if not request.request_id or len(request.request_id) > 128:
            raise InvalidArgument.field("request_id", "is required, at most 128 characters")
        keep_alive = request.keep_alive.ToNanoseconds() / 1e9 if request.HasField("keep_alive") else None
        admission = await self.scheduler.admit(request.request_id, request.model, request.priority,
                                               timeout=context.time_remaining(), keep_alive=keep_alive)
        waited = duration_pb2.Duration()
        waited.FromNanoseconds(int(admission.queue_seconds * 1e9))
        return scheduler_pb2.AdmitGenerationResponse(
            worker_id=admission.endpoint.worker_id, worker_address=admission.endpoint.address,
            model=admission.model, queue_time=waited)

    async def FinishGeneration(self, request, context):
        self.scheduler.finish(request.request_id)
        return scheduler_pb2.FinishGenerationResponse()

    async def GetSchedulerStats(self, request, context):
        s = self.scheduler
        return scheduler_pb2.GetSchedulerStatsResponse(
            running=s.running, waiting=s.waiting, admitted_total=s.admitted_total,
            rejected_total=s.rejected_total)


def register(host, scheduler: Scheduler) -> None:
    servicer = SchedulerServicer(scheduler)
    host.add(scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name,
             lambda server: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server))
