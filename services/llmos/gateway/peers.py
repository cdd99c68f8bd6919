"""The gateway's ports to its peers: the scheduler (admission and its accounting) and the
workers (token streams). Failures arrive as typed errors (`LlmosError`) from the channels'
interceptor.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from llmos.common.channels import Channels
from llmos.common.convert import (
    FINISH_TO_PROTO,
    chunk_from_proto,
    duration,
    input_to_proto,
    quota_to_proto,
    sampling_to_proto,
    usage_to_proto,
)
from llmos.common.domain import Chunk, FinishReason, PoolingInput, PoolOutput, Usage
from llmos.common.errors import LlmosError
from llmos.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

from .frontdoor import Assignment, GenerateCall

log = logging.getLogger(__name__)


class GrpcScheduler:
    def __init__(self, channels: Channels, address: str) -> None:
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(channels.get(address))

    async def admit(self, call: GenerateCall, request_id: str, timeout: float | None,
                    redispatch: bool = False) -> Assignment:
        request = scheduler_pb2.AdmitGenerationRequest(
            request_id=request_id, model=call.model, tenant=call.tenant, priority=call.priority,
            max_tokens=call.params.max_tokens or 0, prompt_tokens=call.prompt_tokens,
            redispatch=redispatch, keep_alive_hold=call.keep_alive_hold, tenant_weight=call.weight,
            tenant_quota=quota_to_proto(call.quota), prefix_key=call.prefix_key,
            conversation_id=call.conversation_id, client_request_id=call.request_id)
        if call.keep_alive is not None:
            request.keep_alive.CopyFrom(duration(call.keep_alive))
        response = await self._stub.AdmitGeneration(request, timeout=timeout)
        return Assignment(response.worker_address, response.model, response.worker_id, response.alias,
                          response.adapter, response.adapter_path)

    async def finish(self, request_id: str, reason: FinishReason | None, usage: Usage | None,
                     worker_failed: bool = False, model_not_loaded: bool = False) -> None:
        request = scheduler_pb2.FinishGenerationRequest(request_id=request_id, worker_failed=worker_failed,
                                                        model_not_loaded=model_not_loaded,
                                                        finish_reason=FINISH_TO_PROTO[reason])
        if usage is not None:
            request.usage.CopyFrom(usage_to_proto(usage))
        try:
            await self._stub.FinishGeneration(request, timeout=10)
        except LlmosError as exc:
            log.warning("could not report the end of %s to the scheduler: %s (%s)", request_id, exc.code, exc.reason)


class GrpcWorkers:
    def __init__(self, channels: Channels) -> None:
        self._channels = channels

    async def generate(self, assignment: Assignment, request_id: str, call: GenerateCall,
                       timeout: float | None) -> AsyncIterator[Chunk]:
        if call.pooling is not None:
            yield await self._pool(assignment, request_id, call.pooling, timeout)
            return
        request = worker_pb2.GenerateTokensRequest(
            request_id=request_id, model=assignment.model, sampling=sampling_to_proto(call.params),
            token_budget=call.reserved_tokens if call.quota.tokens_per_minute else 0,
            adapter=assignment.adapter, adapter_path=assignment.adapter_path)
        input_to_proto(call.source, request)
        stub = worker_pb2_grpc.WorkerServiceStub(self._channels.get(assignment.worker_address))
        stream = stub.GenerateTokens(request, timeout=timeout)
        try:
            async for response in stream:
                yield chunk_from_proto(response)
        finally:
            stream.cancel()

    async def _pool(self, assignment: Assignment, request_id: str, pooling: PoolingInput,
                    timeout: float | None) -> Chunk:
        """A pooling call's answer as one last chunk."""
        stub = worker_pb2_grpc.WorkerServiceStub(self._channels.get(assignment.worker_address))
        response = await stub.Pool(worker_pb2.PoolRequest(
            request_id=request_id, model=assignment.model, inputs=pooling.inputs, pairs=pooling.pairs,
            truncate_prompt_tokens=pooling.truncate, dimensions=pooling.dimensions, task=pooling.task),
            timeout=timeout)
        if pooling.task == "score":
            rows = [[s] for s in response.scores]
        else:
            vectors = response.embeddings if pooling.task == "embed" else response.probabilities
            rows = [list(v.values) for v in vectors]
        return Chunk(finish_reason=FinishReason.STOP, usage=Usage(response.usage.prompt_tokens, 0),
                     pooled=PoolOutput(rows, list(response.labels)))
