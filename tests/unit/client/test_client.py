"""The Python client against a real gRPC server whose GatewayService fails as the test says:
typed errors from the rich status, the API key on every call, retries of UNAVAILABLE only before
the first response, the deadline kept across retries, and the asyncio client the same."""

from __future__ import annotations

import asyncio
import time
from concurrent import futures

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from llmos_client import Client, errors
from llmos_client.aio import AsyncClient
from llmos_client.v1 import gateway_pb2, gateway_pb2_grpc


class Gateway(gateway_pb2_grpc.GatewayServiceServicer):
    """Fails the first `fail_first` calls UNAVAILABLE (after `responses_before` responses), then
    streams three pieces; records each call's authorization."""

    def __init__(self) -> None:
        self.calls = 0
        self.keys: list[str] = []
        self.fail_first = 0
        self.responses_before = 0
        self.failure = grpc.StatusCode.UNAVAILABLE
        self.cancelled = False
        self.retry_after = 0

    def Generate(self, request, context):
        self.calls += 1
        self.keys.append(dict(context.invocation_metadata()).get("authorization", ""))
        if self.calls <= self.fail_first:
            for _ in range(self.responses_before):
                yield gateway_pb2.GenerateResponse(text="early ")
            status = status_pb2.Status(code=self.failure.value[0], message="the worker went away")
            if self.retry_after:
                status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay={"seconds": self.retry_after}))
            status.details.add().Pack(error_details_pb2.ErrorInfo(reason="WORKER_UNREACHABLE", domain="llmos.dev",
                                                                  metadata={"model": request.model}))
            context.abort_with_status(rpc_status.to_status(status))
        if request.model == "bad":
            status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="sampling.max_tokens: negative")
            status.details.add().Pack(error_details_pb2.ErrorInfo(reason="INVALID_FIELD", domain="llmos.dev"))
            status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="sampling.max_tokens", description="negative")]))
            context.abort_with_status(rpc_status.to_status(status))
        if request.model == "slow":
            yield gateway_pb2.GenerateResponse(text="first ")
            while context.is_active():
                time.sleep(0.05)
            self.cancelled = True
            return
        for word in ("one ", "two ", "three"):
            yield gateway_pb2.GenerateResponse(text=word, request_id=request.request_id)


@pytest.fixture
def gateway():
    servicer = Gateway()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    server.stop(None)


def test_a_stream_carries_the_key_and_an_error_its_type_reason_and_violations(gateway):
    with Client(gateway.address, api_key="k-123") as client:
        assert "".join(r.text for r in client.generate("m", prompt="hi", request_id="r1")) == "one two three"
        with pytest.raises(errors.InvalidArgument) as caught:
            list(client.generate("bad", prompt="hi"))
    assert gateway.keys == ["Bearer k-123", "Bearer k-123"]
    error = caught.value
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.reason, error.domain) == ("INVALID_FIELD", "llmos.dev")
    assert error.details() == "sampling.max_tokens: negative"
    assert error.violations == [errors.FieldViolation("sampling.max_tokens", "negative")]


def test_unavailable_before_the_first_response_is_tried_again(gateway):
    gateway.fail_first = 2
    with Client(gateway.address) as client:
        stream = client.generate("m", prompt="hi", timeout=30)
        assert "".join(r.text for r in stream) == "one two three"
    assert gateway.calls == 3 and stream.attempts == 3


def test_unavailable_after_a_response_is_not_tried_again(gateway):
    gateway.fail_first, gateway.responses_before = 1, 1
    with Client(gateway.address) as client:
        stream = client.generate("m", prompt="hi")
        assert next(stream).text == "early "
        with pytest.raises(errors.Unavailable) as caught:
            next(stream)
    assert caught.value.reason == "WORKER_UNREACHABLE" and caught.value.metadata == {"model": "m"}
    assert gateway.calls == 1


def test_only_unavailable_is_retried_and_only_so_often(gateway):
    gateway.fail_first, gateway.failure = 1, grpc.StatusCode.RESOURCE_EXHAUSTED
    with Client(gateway.address) as client, pytest.raises(errors.ResourceExhausted):
        list(client.generate("m", prompt="hi"))
    assert gateway.calls == 1
    gateway.calls, gateway.fail_first, gateway.failure = 0, 10, grpc.StatusCode.UNAVAILABLE
    with Client(gateway.address, retries=2) as client, pytest.raises(errors.Unavailable):
        list(client.generate("m", prompt="hi"))
    assert gateway.calls == 3


def test_a_retry_the_server_asks_to_wait_for_past_the_deadline_is_not_made(gateway):
    """The attempts share the call's deadline: a RetryInfo delay longer than what is left of it
    ends the call with the server's error at once, rather than a retry that could not finish."""
    gateway.fail_first, gateway.retry_after = 5, 30
    with Client(gateway.address, retries=5) as client, pytest.raises(errors.Unavailable) as caught:
        list(client.generate("m", prompt="hi", timeout=10))
    assert gateway.calls == 1 and caught.value.retry_after == 30


def test_a_server_that_is_not_there_is_unavailable_within_the_deadline():
    with Client("127.0.0.1:1") as client, pytest.raises(errors.LlmosError) as caught:
        list(client.generate("m", prompt="hi", timeout=1))
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_the_asyncio_client_streams_retries_and_raises_the_same(gateway):
    gateway.fail_first = 1
    async with AsyncClient(gateway.address, api_key="k-9") as client:
        stream = client.generate("m", prompt="hi", timeout=30)
        assert [r.text async for r in stream] == ["one ", "two ", "three"]
        assert stream.attempts == 2
        with pytest.raises(errors.InvalidArgument) as caught:
            [r async for r in client.generate("bad", prompt="hi")]
    assert caught.value.reason == "INVALID_FIELD"
    assert gateway.keys == ["Bearer k-9"] * 3


async def test_cancelling_the_task_awaiting_the_next_response_cancels_the_call(gateway):
    async with AsyncClient(gateway.address) as client:
        stream = client.generate("slow", prompt="hi")
        assert (await anext(stream)).text == "first "
        task = asyncio.create_task(anext(stream))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if gateway.cancelled:
                break
            await asyncio.sleep(0.05)
    assert gateway.cancelled, "the server saw the call end"
