"""gRPC face of the scheduler."""

from __future__ import annotations

import grpc

from llmos.common.auth import current_principal
from llmos.common.convert import (
    duration,
    optional_seconds,
    queue_depth_to_proto,
    quota_from_proto,
    timestamp,
)
from llmos.common.errors import InvalidArgument, NotFound
from llmos.common.keystore import Role
from llmos.v1 import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

from .admission import AdmissionControl, Ticket
from .history import Outcome, Phase
from .replica import Replica

_STATE_TO_PROTO = {
    Phase.QUEUED: scheduler_pb2.GetRequestStatusResponse.STATE_QUEUED,
    Phase.RUNNING: scheduler_pb2.GetRequestStatusResponse.STATE_RUNNING,
    Phase.DONE: scheduler_pb2.GetRequestStatusResponse.STATE_DONE,
}


# The one mapping from FinishGeneration to how a request ended (a worker that broke the stream
# overrides whatever finish reason came with it; UNSPECIFIED is an error on the worker).
_OUTCOME_OF_FINISH = {
    common_pb2.FINISH_REASON_STOP: Outcome.STOP,
    common_pb2.FINISH_REASON_LENGTH: Outcome.LENGTH,
    common_pb2.FINISH_REASON_CANCELLED: Outcome.CANCELLED,
}


def outcome_of_finish(finish_reason: int, worker_failed: bool) -> Outcome:
    return Outcome.WORKER_FAILED if worker_failed else _OUTCOME_OF_FINISH.get(finish_reason, Outcome.FAILED)


# The most ends one FinishGenerations call reports.
MAX_FINISHED = 1024


def _finish(scheduler: AdmissionControl, request: scheduler_pb2.FinishGenerationRequest) -> None:
    tokens = None
    if request.HasField("usage"):
        tokens = request.usage.prompt_tokens + request.usage.completion_tokens
    outcome = outcome_of_finish(request.finish_reason, request.worker_failed)
    scheduler.finish(request.request_id, tokens, outcome=outcome, worker_failed=request.worker_failed,
                     model_not_loaded=request.model_not_loaded, tenant=request.tenant)


def _tenant_usage(scheduler: AdmissionControl, tenant: str, admitted: int) -> scheduler_pb2.TenantUsage:
    in_flight, _, tokens = scheduler.quotas.usage(tenant)
    return scheduler_pb2.TenantUsage(tenant=tenant, admitted=admitted, in_flight=in_flight, window_tokens=tokens)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Every call goes to the leader's admission control; a standby answers NOT_LEADER."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    async def AdmitGeneration(self, request, context: grpc.aio.ServicerContext):
        if not request.request_id or len(request.request_id) > 128:
            raise InvalidArgument.field("request_id", "is required, at most 128 characters")
        keep_alive = optional_seconds(request, "keep_alive")
        if len(request.conversation_id) > 128:
            raise InvalidArgument.field("conversation_id", "at most 128 characters")
        if len(request.client_request_id) > 128:
            raise InvalidArgument.field("client_request_id", "at most 128 characters")
        if not 0 <= request.tenant_weight <= 1000:
            raise InvalidArgument.field("tenant_weight", "must be between 0 (meaning 1) and 1000")
        ticket = Ticket(request.request_id, request.model, request.tenant or "default", request.priority,
                        max(0, request.prompt_tokens), max(0, request.max_tokens), keep_alive, request.redispatch,
                        request.keep_alive_hold, request.tenant_weight or 1.0,
                        quota_from_proto(request.tenant_quota), request.prefix_key, request.conversation_id,
                        request.client_request_id, max(0.0, optional_seconds(request, "waited") or 0.0))
        scheduler = self.replica.current()
        admission = await scheduler.admit(ticket, timeout=context.time_remaining())
        if context.cancelled():     # granted as the caller left: nobody will run it
            scheduler.finish(ticket.request_id, outcome=Outcome.CANCELLED)
        return scheduler_pb2.AdmitGenerationResponse(
            worker_id=admission.endpoint.worker_id, worker_address=admission.endpoint.address,
            model=admission.model, queue_time=duration(admission.queue_seconds), alias=admission.alias,
            adapter=admission.adapter, adapter_path=admission.adapter_path)

    async def FinishGeneration(self, request, context):
        _finish(self.replica.current(), request)
        return scheduler_pb2.FinishGenerationResponse()

    async def FinishGenerations(self, request, context):
        reports = request.generations
        if len(reports) > MAX_FINISHED:
            raise InvalidArgument.field("generations", f"at most {MAX_FINISHED} a call, got {len(reports)}")
        for i, report in enumerate(reports):
            if not report.request_id:
                raise InvalidArgument.field(f"generations[{i}].request_id", "is required")
        scheduler = self.replica.current()
        for report in reports:
            _finish(scheduler, report)
        return scheduler_pb2.FinishGenerationsResponse()

    async def GetSchedulerStats(self, request, context):
        s = self.replica.current()
        return scheduler_pb2.GetSchedulerStatsResponse(
            running=s.running, waiting=s.waiting, admitted_total=s.admitted_total,
            rejected_total=s.rejected_total, rejected_by_reason=dict(s.rejected),
            queues=[queue_depth_to_proto(q) for q in s.queue_depths()],
            workers=[scheduler_pb2.WorkerLoad(
                worker_id=w.endpoint.worker_id, worker_address=w.endpoint.address, model=w.model,
                running=w.running, capacity=w.capacity, in_rotation=w.in_rotation) for w in s.worker_loads()],
            tenants=[_tenant_usage(s, tenant, admitted) for tenant, admitted in sorted(s.admitted_by_tenant.items())])

    async def GetRequestStatus(self, request, context):
        if not request.request_id or len(request.request_id) > 128:
            raise InvalidArgument.field("request_id", "is required, at most 128 characters")
        caller = current_principal()
        # A user names its own tenant's ids (a client's ids are unique within its tenant only).
        user = bool(caller.key_id) and caller.role is Role.USER
        status = self.replica.current().status(request.request_id, caller.tenant.name if user else None)
        if status is not None and user and caller.tenant.name != status.tenant:
            status = None       # another tenant's request: as if unknown
        if status is None:
            raise NotFound(f"no request {request.request_id!r} is known", reason="REQUEST_NOT_FOUND",
                           metadata={"request_id": request.request_id})
        endpoint = status.endpoint
        response = scheduler_pb2.GetRequestStatusResponse(
            request_id=status.client_id or status.request_id, state=_STATE_TO_PROTO[status.phase], model=status.model,
            tenant=status.tenant, priority=status.priority, position=status.position, reason=status.reason,
            worker_id=endpoint.worker_id if endpoint else "", worker_address=endpoint.address if endpoint else "",
            queue_time=duration(status.queue_seconds))
        if status.start_time is not None:
            response.start_time.CopyFrom(timestamp(status.start_time))
        return response


def register(host, replica: Replica) -> None:
    servicer = SchedulerServicer(replica)
    host.add(scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name,
             lambda server: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server))
