"""gRPC face of the scheduler."""

from __future__ import annotations

import asyncio
import logging

import grpc
from opentelemetry import trace

from llmos.common.auth import current_principal
from llmos.common.channels import Channels
from llmos.common.convert import duration, enum_word, optional_seconds, queue_depth_to_proto, timestamp
from llmos.common.errors import InvalidArgument, NotFound
from llmos.common.keystore import Quota, Role
from llmos.common.status import from_rpc_error
from llmos.v1 import (
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

from .queue import Endpoint, Phase, Scheduler, Ticket

log = logging.getLogger(__name__)

_STATE_TO_PROTO = {
    Phase.QUEUED: scheduler_pb2.GetRequestStatusResponse.STATE_QUEUED,
    Phase.RUNNING: scheduler_pb2.GetRequestStatusResponse.STATE_RUNNING,
    Phase.DONE: scheduler_pb2.GetRequestStatusResponse.STATE_DONE,
}


def _within(limit: float, remaining: float | None) -> float:
    """The call's own limit, or less when the caller's deadline is nearer."""
    return limit if remaining is None else min(limit, remaining)


def _ready(model: common_pb2.Model) -> list[Endpoint]:
    return [Endpoint(p.worker_id, p.worker_address) for p in model.placements
            if p.state == common_pb2.Model.STATE_READY]


def _tenant_usage(scheduler: Scheduler, tenant: str, admitted: int) -> scheduler_pb2.TenantUsage:
    in_flight, _, tokens = scheduler.quotas.usage(tenant)
    return scheduler_pb2.TenantUsage(tenant=tenant, admitted=admitted, in_flight=in_flight, window_tokens=tokens)


class GrpcRegistry:
    """The scheduler's port to the registry."""

    def __init__(self, channels: Channels, address: str, load_timeout: float,
                 tracer: trace.Tracer | None = None) -> None:
        self._stub = registry_pb2_grpc.RegistryServiceStub(channels.get(address))
        self._load_timeout = load_timeout
        self._tracer = tracer or trace.NoOpTracer()

    async def ready_endpoints(self, model: str, timeout: float | None) -> tuple[str, list[Endpoint]]:
        try:
            response = await self._stub.GetModel(registry_pb2.GetModelRequest(name=model),
                                                 timeout=_within(5.0, timeout))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return f"{response.model.name}:{response.model.tag}", _ready(response.model)

    async def load(self, model: str, timeout: float | None, keep_alive: float | None = None,
                   hold: bool = False) -> list[Endpoint]:
        request = registry_pb2.LoadModelRequest(name=model, hold=hold)
        if keep_alive is not None:
            request.keep_alive.CopyFrom(duration(keep_alive))
        with self._tracer.start_as_current_span("cold start", attributes={"gen_ai.request.model": model}) as span:
            try:
                response = await self._stub.LoadModel(request, timeout=_within(self._load_timeout, timeout))
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from None
            endpoints = _ready(response.model)
            span.set_attribute("llmos.workers_ready", len(endpoints))
        return endpoints


class WorkerReports:
    """Polls every known worker's status: its slots per model feed the scheduler, and a
    worker that does not answer leaves rotation. Models whose requests wait with no worker
    in rotation get their placements read again from the registry."""

    def __init__(self, scheduler: Scheduler, registry: GrpcRegistry, channels: Channels,
                 interval: float) -> None:
        self._scheduler = scheduler
        self._registry = registry
        self._channels = channels
        self._interval = interval

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(e) for e in self._scheduler.workers()),
                             *(self._refresh(m) for m in self._scheduler.starved_models()))

    async def run(self, address: str = "") -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self._interval)

    async def _poll(self, endpoint: Endpoint) -> None:
        stub = worker_pb2_grpc.WorkerServiceStub(self._channels.get(endpoint.address))
        try:
            status = await stub.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest(),
                                                timeout=max(0.5, self._interval * 2))
        except grpc.aio.AioRpcError:
            self._scheduler.unreachable(endpoint.worker_id)
            return
        if status.worker_id != endpoint.worker_id:      # another worker took the address
            self._scheduler.unreachable(endpoint.worker_id)
            return
        self._scheduler.report(endpoint.worker_id, {m.model: m.max_running for m in status.models})

    async def _refresh(self, model: str) -> None:
        try:
            _, endpoints = await self._registry.ready_endpoints(model, self._interval * 2)
        except Exception as exc:  # the registry may be restarting: the next round tries again
            log.debug("cannot refresh the placements of %s: %s", model, exc)
            return
        self._scheduler.update_endpoints(model, endpoints)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    async def AdmitGeneration(self, request, context: grpc.aio.ServicerContext):
        if not request.request_id or len(request.request_id) > 128:
            raise InvalidArgument.field("request_id", "is required, at most 128 characters")
        keep_alive = optional_seconds(request, "keep_alive")
        if not 0 <= request.tenant_weight <= 1000:
            raise InvalidArgument.field("tenant_weight", "must be between 0 (meaning 1) and 1000")
        q = request.tenant_quota
        ticket = Ticket(request.request_id, request.model, request.tenant or "default", request.priority,
                        max(0, request.prompt_tokens), max(0, request.max_tokens), keep_alive, request.redispatch,
                        request.keep_alive_hold, request.tenant_weight or 1.0,
                        Quota(q.max_concurrent_requests, q.requests_per_minute, q.tokens_per_minute))
        admission = await self.scheduler.admit(ticket, timeout=context.time_remaining())
        if context.cancelled():     # granted as the caller left: nobody will run it
            self.scheduler.finish(ticket.request_id, outcome="CANCELLED")
        return scheduler_pb2.AdmitGenerationResponse(
            worker_id=admission.endpoint.worker_id, worker_address=admission.endpoint.address,
            model=admission.model, queue_time=duration(admission.queue_seconds))

    async def FinishGeneration(self, request, context):
        tokens = None
        if request.HasField("usage"):
            tokens = request.usage.prompt_tokens + request.usage.completion_tokens
        outcome = "WORKER_FAILED" if request.worker_failed else enum_word(request, "finish_reason").upper()
        if outcome == "UNSPECIFIED":
            outcome = "FAILED"
        self.scheduler.finish(request.request_id, tokens, outcome, request.worker_failed)
        return scheduler_pb2.FinishGenerationResponse()

    async def GetSchedulerStats(self, request, context):
        s = self.scheduler
        return scheduler_pb2.GetSchedulerStatsResponse(
            running=s.running, waiting=s.waiting, admitted_total=s.admitted_total,
            rejected_total=s.rejected_total, rejected_by_reason=dict(s.rejected),
            queues=[queue_depth_to_proto(q) for q in s.queue_depths()],
            workers=[scheduler_pb2.WorkerLoad(
                worker_id=w.endpoint.worker_id, worker_address=w.endpoint.address, model=w.model,
                running=w.running, capacity=w.capacity, in_rotation=w.in_rotation) for w in s.worker_loads()],
            tenants=[_tenant_usage(s, tenant, admitted) for tenant, admitted in sorted(s.admitted_by_tenant.items())])

    async def GetRequestStatus(self, request, context):
        status = self.scheduler.status(request.request_id)
        caller = current_principal()
        if status is not None and caller.key_id and caller.role is Role.USER and caller.tenant.name != status.tenant:
            status = None       # another tenant's request: as if unknown
        if status is None:
            raise NotFound(f"no request {request.request_id!r} is known", reason="REQUEST_NOT_FOUND",
                           metadata={"request_id": request.request_id})
        endpoint = status.endpoint
        response = scheduler_pb2.GetRequestStatusResponse(
            request_id=status.request_id, state=_STATE_TO_PROTO[status.phase], model=status.model,
            tenant=status.tenant, priority=status.priority, position=status.position, reason=status.reason,
            worker_id=endpoint.worker_id if endpoint else "", worker_address=endpoint.address if endpoint else "",
            queue_time=duration(status.queue_seconds))
        if status.start_time is not None:
            response.start_time.CopyFrom(timestamp(status.start_time))
        return response


def register(host, scheduler: Scheduler) -> None:
    servicer = SchedulerServicer(scheduler)
    host.add(scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name,
             lambda server: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server))
