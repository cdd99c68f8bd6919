"""Request status through the real services."""

import asyncio

import grpc
import pytest

from llmos.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2

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



async def test_ends_reported_together_free_every_slot_and_a_bad_report_applies_none(stack):
    # A wave of generations that end in the same step: the gateway reports their ends together.
    reqs = [request(max_tokens=2, ignore_eos=True) for _ in range(12)]
    for i, req in enumerate(reqs):
        req.request_id = f"wave-{i}"

    async def answer(req):
        return [r async for r in stack.gateway.Generate(req)]

    answers = await asyncio.gather(*map(answer, reqs))
    assert all(a[-1].usage.completion_tokens == 2 for a in answers)
    await _idle(stack)
    for i in range(12):
        status = await stack.scheduler.GetRequestStatus(scheduler_pb2.GetRequestStatusRequest(request_id=f"wave-{i}"))
        assert (status.state, status.reason) == (scheduler_pb2.GetRequestStatusResponse.STATE_DONE, "LENGTH")
    stats = await stack.scheduler.GetSchedulerStats(scheduler_pb2.GetSchedulerStatsRequest())
    assert stats.running == 0 and all(w.running == 0 for w in stats.workers)

    # What the scheduler refuses, as the gateway would call it: nothing of the call is applied.
    held = stack.gateway.Generate(request(max_tokens=200, ignore_eos=True))
    await held.read()
    running = (await stack.scheduler.GetSchedulerStats(scheduler_pb2.GetSchedulerStatsRequest())).running
    assert running == 1
    # The scheduler knows it by the gateway's own id, as the worker does.
    [held_id] = (await stack.worker.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())).request_ids
    channel = stack.suite.channel("scheduler", api_key="", tls_as="gateway")
    try:
        finish = scheduler_pb2_grpc.SchedulerServiceStub(channel).FinishGenerations
        bad = [
            (scheduler_pb2.FinishGenerationsRequest(generations=[{"request_id": held_id}] * 1025),
             "generations"),
            (scheduler_pb2.FinishGenerationsRequest(generations=[{"request_id": held_id}, {}]),
             "generations[1].request_id"),
        ]
        for req, field in bad:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await finish(req, timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert [v.field for v in error_info(caught.value)["BadRequest"].field_violations] == [field]
        # Unknown and already finished ids are no error (idempotent), and an empty call does nothing.
        await finish(scheduler_pb2.FinishGenerationsRequest(generations=[{"request_id": "nobody"}]), timeout=5)
        await finish(scheduler_pb2.FinishGenerationsRequest(), timeout=5)
        assert (await stack.scheduler.GetSchedulerStats(scheduler_pb2.GetSchedulerStatsRequest())).running == 1
    finally:
        held.cancel()
        await channel.close()
    await _idle(stack)
