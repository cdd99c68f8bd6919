"""Pooling calls at the gateway (embed, classify, score): the checks both doors share, the task a
model serves (a call for another task is refused before it is queued), and the call run through
the same admission, worker and accounting as a generation (`FrontDoor.generate`), its answer
one chunk."""

from __future__ import annotations

import time

from llmos.common.architectures import GENERATE
from llmos.common.convert import Violations, check_pool_inputs
from llmos.common.domain import Chunk, GenerationInput, PoolingInput, SamplingParams
from llmos.common.errors import Internal, InvalidArgument, LlmosError
from llmos.common.keystore import Tenant
from llmos.common.names import parse_model_ref
from llmos.v1 import registry_pb2, registry_pb2_grpc

from .frontdoor import REQUEST_ID, FrontDoor, GenerateCall
from .observe import GatewayTelemetry

# How long a model's task is remembered (a model's task never changes; a name may be imported
# again as another model after it was removed).
TASK_SECONDS = 10.0
# What each call may be answered by: a score by a cross-encoder or by an embedding model.
SERVED_BY = {"generate": ("generate",), "embed": ("embed",), "classify": ("classify",), "score": ("score", "embed")}


def pooling_call(model: str, pooling: PoolingInput, priority: int, request_id: str, tenant: Tenant,
                 field: str = "inputs") -> GenerateCall:
    """A pooling call, checked: a model name, 1 to 2,048 texts (a score: a query and documents),
    a priority within the tenant's ceiling, a well-formed request id."""
    errors = Violations()
    try:
        parse_model_ref(model)
    except InvalidArgument as exc:
        errors.items.extend(exc.violations)
    check_pool_inputs(pooling.inputs, pooling.pairs, pooling.task, errors, field, field)
    if pooling.truncate < -1:
        errors.add("truncate_prompt_tokens", "must be -1 (the model's limit), 0 (none) or a number of tokens")
    if pooling.dimensions < 0:
        errors.add("dimensions", "must not be negative")
    if not -10 <= priority <= 10:
        errors.add("priority", f"must be between -10 and 10, got {priority}")
    if request_id and not REQUEST_ID.fullmatch(request_id):
        errors.add("request_id", "must be 1 to 128 printable ASCII characters without spaces")
    errors.raise_if_any()
    return GenerateCall(model, source=GenerationInput(), params=SamplingParams(),
                        priority=min(priority, tenant.priority_ceiling), request_id=request_id, tenant=tenant.name,
                        weight=tenant.weight, quota=tenant.quota, pooling=pooling)


class ModelTasks:
    """The task of each model name, from the registry (kept TASK_SECONDS): a call the model does
    not serve is INVALID_ARGUMENT (reason MODEL_TASK_MISMATCH) before it is queued. A name the
    registry cannot tell about now (unknown, or the registry unreachable) passes: the scheduler
    and the worker say what is wrong with it."""

    def __init__(self, registry: registry_pb2_grpc.RegistryServiceStub) -> None:
        self._registry = registry
        self._known: dict[str, tuple[float, str]] = {}

    async def check(self, model: str, wanted: str) -> None:
        now = time.monotonic()
        known = self._known.get(model)
        if known is None or now - known[0] > TASK_SECONDS:
            try:
                response = await self._registry.GetModel(registry_pb2.GetModelRequest(name=model), timeout=5.0)
            except LlmosError:
                return
            if len(self._known) > 4096:
                self._known.clear()
            known = self._known[model] = (now, response.model.task or GENERATE)
        if known[1] not in SERVED_BY[wanted]:
            does = {"generate": "generate text", "embed": "embed", "classify": "classify", "score": "score"}[wanted]
            raise InvalidArgument.field("model", f"{model} serves {known[1]}; it does not {does}",
                                        reason="MODEL_TASK_MISMATCH")


async def run_pooling(front: FrontDoor, telemetry: GatewayTelemetry, call: GenerateCall,
                      timeout: float | None) -> tuple[str, str, Chunk]:
    """Runs a pooling call: (the version that served it, the request's id, its one chunk)."""
    with telemetry.start(call) as watch:
        async for request_id, chunk in front.generate(call, timeout, watch.routed):
            watch.chunk(request_id, chunk)
            if chunk.pooled is not None:
                return watch.version, request_id, chunk
    raise Internal("the worker sent no answer", reason="POOLING_FAILED")
