"""The gateway's reports of ends to the scheduler, against a real gRPC server: ends that come
while a report is on its way go together in the next; a scheduler without FinishGenerations is
told of each on its own."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from opentelemetry.sdk.trace import TracerProvider

from llmos.common.channels import Channels
from llmos.common.domain import FinishReason, Usage
from llmos.gateway.peers import GrpcScheduler
from llmos.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc


class OldScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Records each call; knows FinishGeneration only (as a scheduler before FinishGenerations),
    counting the FinishGenerations it was asked and answered UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []        # the request ids of each call, in order
        self.reports: dict[str, scheduler_pb2.FinishGenerationRequest] = {}
        self.asked_batches = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def FinishGenerations(self, request, context):
        self.asked_batches += 1
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")

    async def FinishGeneration(self, request, context):
        self.calls.append([request.request_id])
        self.reports[request.request_id] = request
        await self.gate.wait()
        return scheduler_pb2.FinishGenerationResponse()


class Scheduler(OldScheduler):
    async def FinishGenerations(self, request, context):
        self.calls.append([r.request_id for r in request.generations])
        self.reports.update((r.request_id, r) for r in request.generations)
        await self.gate.wait()
        return scheduler_pb2.FinishGenerationsResponse()


@contextlib.asynccontextmanager
async def _gateway_port(servicer) -> AsyncIterator[GrpcScheduler]:
    """The gateway's port to a real gRPC server run by `servicer`."""
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels = Channels(TracerProvider())
    try:
        yield GrpcScheduler(channels, f"127.0.0.1:{port}")
    finally:
        await channels.close()
        await server.stop(None)


async def _wave(scheduler: GrpcScheduler, servicer: OldScheduler, n: int) -> None:
    """The first of `n` ends is held at the server while the others come."""
    servicer.gate.clear()
    first = asyncio.create_task(scheduler.finish("r0", FinishReason.LENGTH, Usage(5, 3), tenant="acme"))
    while not servicer.calls:
        await asyncio.sleep(0.001)
    rest = [asyncio.create_task(scheduler.finish(f"r{i}", FinishReason.STOP, Usage(i, 1), tenant="acme"))
            for i in range(1, n)]
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in (first, *rest))       # each returns once the scheduler has it
    servicer.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), 10)


def test_ends_that_come_while_a_report_is_on_its_way_go_together_in_the_next():
    async def main() -> None:
        servicer = Scheduler()
        async with _gateway_port(servicer) as scheduler:
            await _wave(scheduler, servicer, 20)
            assert servicer.calls == [["r0"], [f"r{i}" for i in range(1, 20)]]
            assert servicer.reports["r0"].finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert (servicer.reports["r0"].usage.prompt_tokens, servicer.reports["r0"].usage.completion_tokens,
                    servicer.reports["r0"].tenant) == (5, 3, "acme")
            assert servicer.reports["r7"].finish_reason == common_pb2.FINISH_REASON_STOP
            assert servicer.reports["r7"].usage.prompt_tokens == 7
            # Once idle, an end goes at once, alone.
            await scheduler.finish("late", None, None, worker_failed=True)
            assert servicer.calls[-1] == ["late"] and servicer.reports["late"].worker_failed
            assert not servicer.reports["late"].HasField("usage")

    asyncio.run(main())


def test_a_scheduler_without_finish_generations_is_told_of_each_end_on_its_own():
    async def main() -> None:
        servicer = OldScheduler()
        async with _gateway_port(servicer) as scheduler:
            await _wave(scheduler, servicer, 5)
            assert servicer.calls == [["r0"], ["r1"], ["r2"], ["r3"], ["r4"]]
            assert servicer.asked_batches == 1
            await _wave(scheduler, servicer, 3)
            assert servicer.calls[5:] == [["r0"], ["r1"], ["r2"]]
            assert servicer.asked_batches == 1          # it asks no more

    asyncio.run(main())


def test_an_end_the_scheduler_cannot_be_told_of_is_let_go_with_a_warning(caplog):
    async def main() -> None:
        channels = Channels(TracerProvider())
        try:
            scheduler = GrpcScheduler(channels, "127.0.0.1:1", failover_seconds=0.2)
            await asyncio.wait_for(asyncio.gather(*(scheduler.finish(f"r{i}", FinishReason.STOP, None)
                                                    for i in range(3))), 30)
        finally:
            await channels.close()

    asyncio.run(main())
    warned = [r.getMessage() for r in caplog.records if "could not report the end" in r.getMessage()]
    assert warned and all("SCHEDULER_UNREACHABLE" in m or "UNAVAILABLE" in m for m in warned)
