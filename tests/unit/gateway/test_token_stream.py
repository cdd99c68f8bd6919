"""The gateway's token stream from a worker, against a real gRPC server that has no GenerateMany (an older
worker: each generation a GenerateTokens call of its own): it reads a channel
without interceptors, so the client span, the trace context the worker continues and the typed
errors are the gateway's own work, checked here as the interceptors would have made them."""

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmos.common.channels import Channels
from llmos.common.domain import FinishReason, GenerationInput, SamplingParams
from llmos.common.errors import FailedPrecondition, LlmosError
from llmos.common.generate_many import METHOD as GENERATE_MANY
from llmos.common.status import to_status
from llmos.gateway.frontdoor import Assignment, GenerateCall
from llmos.gateway.peers import GENERATE_TOKENS, MAX_SHARED_REQUEST_BYTES, GrpcWorkers
from llmos.v1 import common_pb2, worker_pb2, worker_pb2_grpc

CALL = GenerateCall("tiny", GenerationInput(prompt="hi"), SamplingParams(), request_id="r1")


class Worker(worker_pb2_grpc.WorkerServiceServicer):
    """Two chunks, then the end; or, for model "fails", a typed error after the first."""

    def __init__(self) -> None:
        self.traceparents: list[str] = []

    async def GenerateTokens(self, request, context):
        self.traceparents.append(dict(context.invocation_metadata()).get("traceparent", ""))
        yield worker_pb2.GenerateTokensResponse(text="Par", token_ids=[7])
        if request.model == "fails":
            error = FailedPrecondition("the adapter went away", reason="ADAPTER_GONE", metadata={"adapter": "a1"})
            await context.abort_with_status(rpc_status.to_status(to_status(error)))
        yield worker_pb2.GenerateTokensResponse(text="is", token_ids=[8], finish_reason=common_pb2.FINISH_REASON_STOP,
                                                usage=common_pb2.Usage(prompt_tokens=2, completion_tokens=2))


@contextlib.asynccontextmanager
async def _workers(servicer: Worker, exporter: InMemorySpanExporter
                   ) -> AsyncIterator[tuple[GrpcWorkers, str, trace.Tracer]]:
    """The gateway's port to a real gRPC server run by `servicer`, its spans in `exporter`."""
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    channels = Channels(provider)
    try:
        tracer = provider.get_tracer("test")
        yield GrpcWorkers(channels, tracer), f"127.0.0.1:{port}", tracer
    finally:
        await channels.close()
        await server.stop(None)


async def _read(workers: GrpcWorkers, address: str, model: str, tracer: trace.Tracer) -> list:
    chunks = []
    with tracer.start_as_current_span("inference") as parent:
        try:
            async for chunk in workers.generate(Assignment(address, model), "r1", CALL, 10.0):
                chunks.append(chunk)
        finally:
            chunks.append(parent.get_span_context())
    return chunks


def test_the_token_stream_is_a_client_span_under_the_callers_whose_context_the_worker_receives():
    async def main() -> None:
        servicer, exporter = Worker(), InMemorySpanExporter()
        async with _workers(servicer, exporter) as (workers, address, tracer):
            *chunks, parent = await _read(workers, address, "tiny:latest", tracer)
            assert [c.text for c in chunks] == ["Par", "is"]
            assert chunks[-1].finish_reason is FinishReason.STOP and chunks[-1].usage.completion_tokens == 2
            span = next(s for s in exporter.get_finished_spans() if s.name == GENERATE_TOKENS)
            assert span.kind is trace.SpanKind.CLIENT
            assert span.attributes["rpc.system"] == "grpc"
            assert span.attributes["rpc.service"] == "llmos.v1.WorkerService"
            assert span.attributes["rpc.method"] == "GenerateTokens"
            assert span.attributes["rpc.grpc.status_code"] == 0
            assert span.status.status_code is trace.StatusCode.UNSET
            assert span.parent.span_id == parent.span_id and span.context.trace_id == parent.trace_id
            # The worker continues the client span's trace, its server span's parent the client span.
            _, trace_id, span_id, _ = servicer.traceparents[0].split("-")
            assert int(trace_id, 16) == span.context.trace_id and int(span_id, 16) == span.context.span_id
    asyncio.run(main())


def test_a_workers_error_mid_stream_is_its_typed_error_and_fails_the_client_span():
    async def main() -> None:
        servicer, exporter = Worker(), InMemorySpanExporter()
        async with _workers(servicer, exporter) as (workers, address, _):
            chunks = []
            with pytest.raises(LlmosError) as caught:
                async for chunk in workers.generate(Assignment(address, "fails"), "r1", CALL, 10.0):
                    chunks.append(chunk)
            assert [c.text for c in chunks] == ["Par"]
            assert caught.value.code == "FAILED_PRECONDITION" and caught.value.message == "the adapter went away"
            assert caught.value.reason == "ADAPTER_GONE" and caught.value.metadata == {"adapter": "a1"}
            (span,) = [s for s in exporter.get_finished_spans() if s.name == GENERATE_TOKENS]
            assert span.status.status_code is trace.StatusCode.ERROR
            assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    asyncio.run(main())


def test_an_unreachable_worker_is_named_and_its_span_ends():
    async def main() -> None:
        exporter = InMemorySpanExporter()
        async with _workers(Worker(), exporter) as (workers, _, _):
            with socket_closed() as address, pytest.raises(LlmosError) as caught:
                async for _chunk in workers.generate(Assignment(address, "tiny:latest"), "r1", CALL, 5.0):
                    pass
            assert caught.value.code == "UNAVAILABLE" and caught.value.reason == "WORKER_UNREACHABLE"
            (span,) = exporter.get_finished_spans()
            assert span.status.status_code is trace.StatusCode.ERROR
    asyncio.run(main())


@contextlib.contextmanager
def socket_closed():
    """An address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    yield address


def test_a_worker_without_generate_many_is_asked_once_then_streamed_a_call_a_generation():
    async def main() -> None:
        servicer, exporter = Worker(), InMemorySpanExporter()
        async with _workers(servicer, exporter) as (workers, address, tracer):
            for _ in range(2):
                *chunks, _parent = await _read(workers, address, "tiny:latest", tracer)
                assert [c.text for c in chunks] == ["Par", "is"]
            assert len(servicer.traceparents) == 2
            names = [s.name for s in exporter.get_finished_spans() if s.name != "inference"]
            assert names == [GENERATE_MANY, GENERATE_TOKENS, GENERATE_TOKENS]
            (attempt,) = [s for s in exporter.get_finished_spans() if s.name == GENERATE_MANY]
            assert attempt.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]
    asyncio.run(main())


def test_a_request_too_large_to_share_a_call_goes_on_a_call_of_its_own():
    async def main() -> None:
        servicer, exporter = Worker(), InMemorySpanExporter()
        big = GenerateCall("tiny", GenerationInput(prompt="x" * (MAX_SHARED_REQUEST_BYTES + 1)), SamplingParams(),
                           request_id="r1")
        async with _workers(servicer, exporter) as (workers, address, _):
            chunks = [c async for c in workers.generate(Assignment(address, "tiny:latest"), "r1", big, 10.0)]
            assert [c.text for c in chunks] == ["Par", "is"]
            assert [s.name for s in exporter.get_finished_spans()] == [GENERATE_TOKENS]     # no shared call tried
    asyncio.run(main())
