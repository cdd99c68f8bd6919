"""gRPC face of the worker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from llmos.common.architectures import GENERATE
from llmos.common.convert import (
    Violations,
    check_pool_inputs,
    fill_chunk,
    input_from_proto,
    sampling_from_proto,
    seconds,
    timestamp,
)
from llmos.common.domain import Chunk
from llmos.common.errors import DeadlineExceeded, InvalidArgument
from llmos.common.generate_many import METHOD as GENERATE_MANY
from llmos.common.telemetry import server_span, span_failed
from llmos.v1 import common_pb2, worker_pb2, worker_pb2_grpc

from .host import ModelHost
from .many import CAPABILITY, ManyGenerations


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, host: ModelHost, tracer: trace.Tracer, stopping: asyncio.Event | None = None) -> None:
        self.host = host
        self.tracer = tracer
        self._stopping = stopping or asyncio.Event()       # set as the worker stops

    async def StartModel(self, request, context):
        if not request.model or not request.path:
            raise InvalidArgument.field("model" if not request.model else "path", "is required")
        with self.tracer.start_as_current_span("load model", attributes={
                "gen_ai.request.model": request.model, "llmos.model.estimated_bytes": request.estimated_bytes,
                "llmos.model.cold": request.model not in self.host.loaded_models}) as span:
            served = await self.host.start_model(request.model, request.path, request.estimated_bytes,
                                                 request.quantize, request.task or GENERATE)
            span.set_attributes({"llmos.model.measured_bytes": served.loaded.measured_bytes,
                                 "llmos.model.dtype": served.loaded.dtype_name,
                                 "llmos.model.quantization": served.loaded.quantization,
                                 "llmos.model.implementation": served.loaded.implementation,
                                 "llmos.device": self.host.device_name})
        return worker_pb2.StartModelResponse(
            measured_bytes=served.loaded.measured_bytes, device=self.host.device_name,
            dtype=served.loaded.dtype_name)

    async def StopModel(self, request, context):
        await self.host.stop_model(request.model)
        return worker_pb2.StopModelResponse()

    async def GenerateTokens(self, request, context):
        async for chunk in self._generation(request, trace.get_current_span()):
            yield fill_chunk(worker_pb2.GenerateTokensResponse(), chunk)

    async def GenerateMany(self, request_iterator, context):
        await context.send_initial_metadata((CAPABILITY,))
        async for response in ManyGenerations(request_iterator, self._run_one, self._stopping).stream():
            yield response

    async def _run_one(self, start: worker_pb2.StartGeneration, out: ManyGenerations) -> None:
        """One generation of a `GenerateMany` call, under a span of its own: its pieces to `out`, a
        failure as its last piece. Where its window is full it waits for the caller before it takes
        the next chunk, so its stream falls behind and the engine pauses it, as it pauses a
        `GenerateTokens` stream nobody reads."""
        span = server_span(self.tracer, GENERATE_MANY, start.trace_context)
        try:
            timeout = seconds(start.timeout) if start.HasField("timeout") else None
            with trace.use_span(span, end_on_exit=False):
                try:
                    async with asyncio.timeout(timeout), contextlib.aclosing(
                            self._generation(start.request, span)) as chunks:
                        async for chunk in chunks:
                            out.put(worker_pb2.GenerationPiece(
                                id=start.id, chunk=fill_chunk(worker_pb2.GenerateTokensResponse(), chunk)))
                            if chunk.finish_reason is None and out.full(start.id):
                                await out.room(start.id)
                except TimeoutError:
                    raise DeadlineExceeded(f"the generation ran past its timeout of {timeout:g} s",
                                           reason="DEADLINE_EXCEEDED") from None
        except asyncio.CancelledError:
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.CANCELLED.value[0])
            raise
        except Exception as exc:        # noqa: BLE001 (any failure ends this generation alone)
            status = out.fail(start.id, exc)
            span_failed(span, status.code, status.message)
        finally:
            span.end()

    async def _generation(self, request: worker_pb2.GenerateTokensRequest, span: trace.Span) -> AsyncIterator[Chunk]:
        """A generation's chunks, its request checked first; `span` is the request's."""
        errors = Violations()
        if not request.request_id:
            errors.add("request_id", "is required")
        if request.tools:                                       # each schema compiled: off the loop
            source = await asyncio.to_thread(input_from_proto, request, errors)
        else:
            source = input_from_proto(request, errors)
        if request.sampling.HasField("response_format"):       # compiling may take a while: off the loop
            params = await asyncio.to_thread(sampling_from_proto, request.sampling, errors)
        else:
            params = sampling_from_proto(request.sampling, errors)
        if request.token_budget < 0:
            errors.add("token_budget", "must be 0 (no limit) or more")
        errors.raise_if_any()
        span.set_attributes({"gen_ai.request.model": request.model, "llmos.request.id": request.request_id})
        if request.adapter:
            span.set_attribute("llmos.adapter", request.adapter)
        async for chunk in self.host.generate(request.request_id, request.model, source, params,
                                              span.get_span_context() if span.is_recording() else None,
                                              token_budget=request.token_budget, adapter=request.adapter,
                                              adapter_path=request.adapter_path):
            if chunk.finish_reason is not None:
                span.set_attributes({"gen_ai.response.finish_reasons": [chunk.finish_reason.name.lower()],
                                     "gen_ai.usage.input_tokens": chunk.usage.prompt_tokens,
                                     "gen_ai.usage.output_tokens": chunk.usage.completion_tokens})
            yield chunk

    async def Pool(self, request, context):
        errors = Violations()
        if not request.request_id:
            errors.add("request_id", "is required")
        check_pool_inputs(request.inputs, request.pairs, request.task, errors)
        errors.raise_if_any()
        trace.get_current_span().set_attributes({"gen_ai.request.model": request.model,
                                                 "llmos.request.id": request.request_id,
                                                 "gen_ai.operation.name": request.task})
        result = await self.host.pool(request.request_id, request.model, request.task, list(request.inputs),
                                      list(request.pairs), request.truncate_prompt_tokens, request.dimensions)
        response = worker_pb2.PoolResponse(usage=common_pb2.Usage(prompt_tokens=result.prompt_tokens),
                                           labels=result.labels)
        if request.task == "score":
            response.scores.extend(row[0] for row in result.rows)
        else:
            field = response.embeddings if request.task == "embed" else response.probabilities
            field.extend(common_pb2.Vector(values=row) for row in result.rows)
        return response

    async def GetWorkerStatus(self, request, context):
        models = [worker_pb2.LoadedModel(
            model=s.model, device=s.device, dtype=s.dtype, measured_bytes=s.measured_bytes,
            running=s.stats.running, waiting=s.stats.waiting, kv_tokens_used=s.stats.kv_tokens_used,
            kv_tokens_capacity=s.stats.kv_tokens_capacity, tokens_generated=s.stats.tokens_generated,
            last_request_time=timestamp(s.last_request), max_running=s.stats.max_running, adapters=s.adapters,
            adapter_bytes=s.adapter_bytes, request_ids=self.host.requests_of(s.model))
            for s in self.host.status()]
        return worker_pb2.GetWorkerStatusResponse(
            worker_id=self.host.worker_id, models=models,
            running=sum(m.running for m in models), waiting=sum(m.waiting for m in models),
            tokens_generated=sum(m.tokens_generated for m in models), request_ids=sorted(self.host.active_requests))


def register(host, model_host: ModelHost) -> None:
    servicer = WorkerServicer(model_host, host.provider.get_tracer("llmos.worker"), host.stopping)
    host.add(worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
             lambda server: worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server))
