"""gRPC face of the gateway: Generate and ListAvailableModels."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from llmos.common.auth import current_principal
from llmos.common.convert import (
    Violations,
    fill_chunk,
    input_from_proto,
    optional_seconds,
    sampling_from_proto,
    usage_to_proto,
)
from llmos.common.domain import Chunk, PoolingInput
from llmos.common.errors import InvalidArgument, LlmosError
from llmos.common.keystore import Role, Tenant
from llmos.common.names import parse_model_ref
from llmos.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

from .frontdoor import REQUEST_ID, FrontDoor, GenerateCall
from .generation import STALL_SECONDS, StallGuard, StreamStalled
from .observe import OTHER_MODEL, GatewayTelemetry
from .pooling import ModelTasks, pooling_call, run_pooling

# Trailer saying a request's priority was lowered to its tenant's ceiling: "<asked>-><used>".
PRIORITY_TRAILER = "llmos-priority-lowered"
MAX_KEEP_ALIVE = 30 * 24 * 3600.0
# The longest a user's request may hold a model loaded.
USER_MAX_KEEP_ALIVE = 3600.0


def call_from_proto(request: gateway_pb2.GenerateRequest, tenant: Tenant, admin: bool = False) -> GenerateCall:
    """The call, checked; its tenant, weight, quota and priority ceiling come from the caller's
    key, never from what the client says (a priority above the ceiling is lowered to it)."""
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
    if request.request_id and not REQUEST_ID.fullmatch(request.request_id):
        errors.add("request_id", "must be 1 to 128 printable ASCII characters without spaces")
    if request.conversation_id and not REQUEST_ID.fullmatch(request.conversation_id):
        errors.add("conversation_id", "must be 1 to 128 printable ASCII characters without spaces")
    keep_alive = optional_seconds(request, "keep_alive")
    if keep_alive is not None and admin and abs(keep_alive) > MAX_KEEP_ALIVE:
        errors.add("keep_alive", "must be at most 30 days either way")
    elif keep_alive is not None and not admin and not 0 < keep_alive <= USER_MAX_KEEP_ALIVE:
        errors.add("keep_alive", "with a user key can only keep the model loaded longer: more than 0 and at "
                                 f"most {USER_MAX_KEEP_ALIVE:.0f} s (an admin sets a model's own keep-alive)")
    errors.raise_if_any()
    return GenerateCall(model, source, params, min(request.priority, tenant.priority_ceiling), request.request_id,
                        tenant.name, keep_alive, not admin, tenant.weight, tenant.quota, request.conversation_id)


async def checked_call(request: gateway_pb2.GenerateRequest, tenant: Tenant, admin: bool = False) -> GenerateCall:
    """`call_from_proto`, off the event loop when the request carries a response format or tools:
    compiling a large schema the first time takes long enough to stall every other stream."""
    if request.sampling.HasField("response_format") or request.tools:
        return await asyncio.to_thread(call_from_proto, request, tenant, admin)
    return call_from_proto(request, tenant, admin)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, front: FrontDoor, registry: registry_pb2_grpc.RegistryServiceStub,
                 telemetry: GatewayTelemetry, stall_seconds: float = STALL_SECONDS,
                 tasks: ModelTasks | None = None) -> None:
        self.front = front
        self.registry = registry
        self.telemetry = telemetry
        self.stall_seconds = stall_seconds
        self.tasks = tasks or ModelTasks(registry)

    async def ListAvailableModels(self, request, context: grpc.aio.ServicerContext):
        page = await self.registry.ListModels(registry_pb2.ListModelsRequest(
            page_size=request.page_size, page_token=request.page_token), timeout=context.time_remaining())
        return gateway_pb2.ListAvailableModelsResponse(next_page_token=page.next_page_token, models=[
            gateway_pb2.AvailableModel(
                name=f"{m.name}:{m.tag}", loaded=m.state == common_pb2.Model.STATE_READY,
                context_length=m.context_length, has_chat_template=m.has_chat_template,
                parameter_count=m.parameter_count, architecture=m.architecture, task=m.task or "generate")
            for m in page.models])

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        caller = current_principal()
        admin = caller.role is Role.ADMIN or not caller.key_id     # no key: security is off (loopback)
        try:
            call = await checked_call(request, caller.tenant, admin=admin)
            await self.tasks.check(call.model, "generate")
        except LlmosError as exc:
            self.telemetry.requests.labels(OTHER_MODEL, "", exc.code).inc()
            raise
        if call.priority < request.priority:
            context.set_trailing_metadata(((PRIORITY_TRAILER, f"{request.priority}->{call.priority}"),))
        # Closed as this handler ends, however it ends (a client that leaves closes it at a yield):
        # the front door reports the end to the scheduler then, not when the collector finds it.
        with self.telemetry.start(call, requested_priority=request.priority) as watch:
            async with contextlib.aclosing(self.front.generate(call, context.time_remaining(), watch.routed)) as chunks:
                guard, first = StallGuard(chunks, self.stall_seconds), True
                try:
                    async for request_id, chunk in chunks:
                        watch.chunk(request_id, chunk)
                        response = fill_chunk(gateway_pb2.GenerateResponse(request_id=request_id), chunk)
                        if first:
                            response.model, first = watch.version, False
                        with guard.offering():
                            yield response
                finally:
                    guard.close()
                if guard.stalled:        # the client came back after its generation was ended
                    raise StreamStalled(guard.seconds)


    async def _pool(self, context: grpc.aio.ServicerContext, model: str, pooling: PoolingInput, priority: int,
                    request_id: str, field: str = "inputs") -> tuple[str, str, Chunk]:
        caller = current_principal()
        try:
            call = pooling_call(model, pooling, priority, request_id, caller.tenant, field)
            await self.tasks.check(call.model, pooling.task)
        except LlmosError as exc:
            self.telemetry.requests.labels(OTHER_MODEL, "", exc.code).inc()
            raise
        return await run_pooling(self.front, self.telemetry, call, context.time_remaining())

    async def Embed(self, request, context: grpc.aio.ServicerContext):
        version, request_id, chunk = await self._pool(context, request.model, PoolingInput(
            "embed", tuple(request.inputs), truncate=request.truncate_prompt_tokens, dimensions=request.dimensions),
            request.priority, request.request_id)
        return gateway_pb2.EmbedResponse(embeddings=[common_pb2.Vector(values=r) for r in chunk.pooled.rows],
                                         usage=usage_to_proto(chunk.usage), model=version, request_id=request_id)

    async def Classify(self, request, context: grpc.aio.ServicerContext):
        version, request_id, chunk = await self._pool(context, request.model, PoolingInput(
            "classify", tuple(request.inputs), truncate=request.truncate_prompt_tokens), request.priority,
            request.request_id)
        return gateway_pb2.ClassifyResponse(
            probabilities=[common_pb2.Vector(values=r) for r in chunk.pooled.rows], labels=chunk.pooled.labels,
            usage=usage_to_proto(chunk.usage), model=version, request_id=request_id)

    async def Score(self, request, context: grpc.aio.ServicerContext):
        if not request.query:
            raise InvalidArgument.field("query", "is required")
        documents = tuple(request.documents)
        version, request_id, chunk = await self._pool(context, request.model, PoolingInput(
            "score", (request.query,) * len(documents), documents, truncate=request.truncate_prompt_tokens),
            request.priority, request.request_id, field="documents")
        return gateway_pb2.ScoreResponse(scores=[r[0] for r in chunk.pooled.rows], usage=usage_to_proto(chunk.usage),
                                         model=version, request_id=request_id)


def register(host, front: FrontDoor, registry: registry_pb2_grpc.RegistryServiceStub,
             telemetry: GatewayTelemetry, stall_seconds: float = STALL_SECONDS,
             tasks: ModelTasks | None = None) -> None:
    servicer = GatewayServicer(front, registry, telemetry, stall_seconds, tasks)
    host.add(gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
             lambda server: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server))
