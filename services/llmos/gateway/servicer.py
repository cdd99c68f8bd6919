"""gRPC face of the gateway, and its ports to the scheduler and the workers."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator

import grpc

from llmos.common.channels import Channels
from llmos.common.convert import (
    FINISH_TO_PROTO,
    Violations,
    chunk_from_proto,
    duration,
    fill_chunk,
    input_from_proto,
    input_to_proto,
    optional_seconds,
    sampling_from_proto,
    sampling_to_proto,
    usage_to_proto,
)
from llmos.common.domain import Chunk, FinishReason, Usage
from llmos.common.errors import InvalidArgument, LlmosError
from llmos.common.names import parse_model_ref
from llmos.common.status import from_rpc_error
from llmos.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

from .frontdoor import Assignment, FrontDoor, GenerateCall
from .observe import GatewayTelemetry

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
TENANT_HEADER = "x-llmos-tenant"
MAX_KEEP_ALIVE = 30 * 24 * 3600.0


class GrpcScheduler:
    def __init__(self, channels: Channels, address: str) -> None:
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(channels.get(address))

    async def admit(self, call: GenerateCall, request_id: str, timeout: float | None,
                    redispatch: bool = False) -> Assignment:
        try:
            request = scheduler_pb2.AdmitGenerationRequest(
                request_id=request_id, model=call.model, tenant=call.tenant, priority=call.priority,
                max_tokens=call.params.max_tokens or 0, prompt_tokens=estimate_prompt_tokens(call),
                redispatch=redispatch)
            if call.keep_alive is not None:
                request.keep_alive.CopyFrom(duration(call.keep_alive))
            response = await self._stub.AdmitGeneration(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return Assignment(response.worker_address, response.model, response.worker_id)

    async def finish(self, request_id: str, reason: FinishReason | None, usage: Usage | None,
                     worker_failed: bool = False) -> None:
        request = scheduler_pb2.FinishGenerationRequest(request_id=request_id, worker_failed=worker_failed,
                                                        finish_reason=FINISH_TO_PROTO[reason])
        if usage is not None:
            request.usage.CopyFrom(usage_to_proto(usage))
        try:
            await self._stub.FinishGeneration(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            log.warning("could not report the end of %s to the scheduler: %s", request_id, exc.code().name)


def estimate_prompt_tokens(call: GenerateCall) -> int:
    """About four characters a token: the scheduler's first guess at the prompt's cost,
    corrected with the real count when the generation ends."""
    text = call.source.prompt if call.source.prompt is not None else "".join(
        m.content for m in call.source.messages)
    return min(len(text) // 4 + 1, 2**31 - 1)


class GrpcWorkers:
    def __init__(self, channels: Channels) -> None:
        self._channels = channels

    async def generate(self, address: str, request_id: str, model: str, call: GenerateCall,
                       timeout: float | None) -> AsyncIterator[Chunk]:
        request = worker_pb2.GenerateTokensRequest(request_id=request_id, model=model,
                                                   sampling=sampling_to_proto(call.params))
        input_to_proto(call.source, request)
        stub = worker_pb2_grpc.WorkerServiceStub(self._channels.get(address))
        stream = stub.GenerateTokens(request, timeout=timeout)
        try:
            async for response in stream:
                yield chunk_from_proto(response)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            stream.cancel()


def call_from_proto(request: gateway_pb2.GenerateRequest, tenant: str) -> GenerateCall:
    errors = Violations()
    model = request.model
    try:
        parse_model_ref(model)
    except InvalidArgument as exc:
        errors.items.extend(exc.violations)
    source = input_from_proto(request, errors)
    params = sampling_from_proto(request.sampling, errors)
    if not -10 <= request.priority <= 10:
        errors.add("priority", f"must be between -10 and 10, got {request.priority}")
    if request.request_id and not _REQUEST_ID.match(request.request_id):
        errors.add("request_id", "must be 1 to 128 printable ASCII characters without spaces")
    keep_alive = optional_seconds(request, "keep_alive")
    if keep_alive is not None and abs(keep_alive) > MAX_KEEP_ALIVE:
        errors.add("keep_alive", "must be at most 30 days either way")
    errors.raise_if_any()
    return GenerateCall(model, source, params, request.priority, request.request_id, tenant, keep_alive)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, front: FrontDoor, registry: registry_pb2_grpc.RegistryServiceStub,
                 telemetry: GatewayTelemetry) -> None:
        self.front = front
        self.registry = registry
        self.telemetry = telemetry

    async def ListAvailableModels(self, request, context: grpc.aio.ServicerContext):
        try:
            page = await self.registry.ListModels(registry_pb2.ListModelsRequest(
                page_size=request.page_size, page_token=request.page_token), timeout=context.time_remaining())
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return gateway_pb2.ListAvailableModelsResponse(next_page_token=page.next_page_token, models=[
            gateway_pb2.AvailableModel(
                name=f"{m.name}:{m.tag}", loaded=m.state == common_pb2.Model.STATE_READY,
                context_length=m.context_length, has_chat_template=m.has_chat_template,
                parameter_count=m.parameter_count, architecture=m.architecture)
            for m in page.models])

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        metadata = dict(context.invocation_metadata() or ())
        try:
            call = call_from_proto(request, str(metadata.get(TENANT_HEADER, "default")))
        except LlmosError as exc:
            self.telemetry.requests.labels(request.model, exc.code).inc()
            raise
        with self.telemetry.start(call) as watch:
            async for request_id, chunk in self.front.generate(call, context.time_remaining()):
                watch.chunk(request_id, chunk)
                yield fill_chunk(gateway_pb2.GenerateResponse(request_id=request_id), chunk)


def register(host, front: FrontDoor, registry: registry_pb2_grpc.RegistryServiceStub) -> None:
    servicer = GatewayServicer(front, registry, GatewayTelemetry(host.provider.get_tracer("llmos.gateway"),
                                                                 host.metrics))
    host.add(gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
             lambda server: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server))
