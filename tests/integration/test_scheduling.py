"""Request status through the real services."""

import asyncio

import grpc
import pytest

from llmos.v1 import scheduler_pb2

from .test_generate import _idle, error_info, request

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_request_status_follows_a_request_from_running_to_done(stack):
    req = request(max_tokens=200, ignore_eos=True)
    req.request_id = "status-1"
    # The tenant is the key's: a header naming another is ignored.
    acme = stack.gateway_as(await stack.user_key("acme"))
    call = acme.Generate(req, metadata=(("x-llmos-tenant", "other"),))
    await call.read()
    running = await stack.scheduler.GetRequestStatus(scheduler_pb2.GetRequestStatusRequest(request_id="status-1"))
    assert running.state == scheduler_pb2.GetRequestStatusResponse.STATE_RUNNING
    assert (running.tenant, running.model, running.worker_id) == ("acme", "tiny:latest", "w1")
    # Charged to its own tenant in the scheduler's per-tenant figures; "other" was never seen.
    tenants = {t.tenant: t for t in (await stack.scheduler.GetSchedulerStats(
        scheduler_pb2.GetSchedulerStatsRequest())).tenants}
    assert tenants["acme"].admitted == 1 and "other" not in tenants
    call.cancel()
    await _idle(stack)
    for _ in range(100):
        done = await stack.scheduler.GetRequestStatus(scheduler_pb2.GetRequestStatusRequest(request_id="status-1"))
        if done.state == scheduler_pb2.GetRequestStatusResponse.STATE_DONE:
            break
        await asyncio.sleep(0.01)
    assert (done.state, done.reason) == (scheduler_pb2.GetRequestStatusResponse.STATE_DONE, "CANCELLED")
    # A generation that ran to its token limit is done "LENGTH" (how the gateway reported it).
    req = request(max_tokens=3, ignore_eos=True)
    req.request_id = "status-2"
    [response async for response in stack.gateway.Generate(req)]
    for _ in range(100):
        done = await stack.scheduler.GetRequestStatus(scheduler_pb2.GetRequestStatusRequest(request_id="status-2"))
        if done.state == scheduler_pb2.GetRequestStatusResponse.STATE_DONE:
            break
        await asyncio.sleep(0.01)
    assert (done.state, done.reason) == (scheduler_pb2.GetRequestStatusResponse.STATE_DONE, "LENGTH")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.scheduler.GetRequestStatus(scheduler_pb2.GetRequestStatusRequest(request_id="nobody"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value)["ErrorInfo"].reason == "REQUEST_NOT_FOUND"

