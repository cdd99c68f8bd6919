"""`GenerateMany` on a real worker (the tiny model), called as the gateway calls it: what each
generation streams is what `GenerateTokens` streams for it; a step's tokens share a message; a
generation that fails, is cancelled or runs past its timeout ends alone; a call that ends takes
its generations with it; a message that neither starts nor cancels is refused."""

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2

from llmos.v1 import common_pb2, worker_pb2

from .test_generate import error_info

pytestmark = pytest.mark.asyncio(loop_scope="module")


def tokens_request(i: int, max_tokens: int = 10, model: str = "tiny:latest") -> worker_pb2.GenerateTokensRequest:
    return worker_pb2.GenerateTokensRequest(
        request_id=f"many-{i}", model=model, prompt=f"Story {i}: once upon a time",
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def start(id_: int, request: worker_pb2.GenerateTokensRequest, timeout: float | None = None):
    message = worker_pb2.GenerateManyRequest(start=worker_pb2.StartGeneration(id=id_, request=request))
    if timeout is not None:
        message.start.timeout.FromMilliseconds(int(timeout * 1000))
    return message


async def drain(call, pieces: dict, messages: list, until_ended: set) -> None:
    """Reads the call until every generation in `until_ended` has had its last piece."""
    async for response in call:
        messages.append(response)
        for piece in response.pieces:
            pieces.setdefault(piece.id, []).append(piece)
            if piece.HasField("error") or piece.chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                until_ended.discard(piece.id)
        if not until_ended:
            return


async def quiet(stack) -> worker_pb2.GetWorkerStatusResponse:
    """The worker's status once it serves nothing and its engine runs nothing (or after two seconds)."""
    for _ in range(100):
        status = await stack.worker.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())
        if not status.request_ids and status.running == 0:
            break
        await asyncio.sleep(0.02)
    return status


async def test_each_generation_streams_what_generate_tokens_streams_and_a_step_shares_a_message(stack):
    alone = {}
    for i in range(4):
        alone[i] = [t async for r in stack.worker.GenerateTokens(tokens_request(i)) for t in r.token_ids]
    call = stack.worker.GenerateMany()
    for i in range(4):
        await call.write(start(i, tokens_request(i)))
    pieces, messages = {}, []
    await asyncio.wait_for(drain(call, pieces, messages, set(range(4))), 60)
    call.cancel()
    for i in range(4):
        assert [t for p in pieces[i] for t in p.chunk.token_ids] == alone[i]
        assert pieces[i][-1].chunk.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert pieces[i][-1].chunk.usage.completion_tokens == 10
    # The four decode together: their tokens travel several to a message.
    assert max(len(m.pieces) for m in messages) > 1
    assert len(messages) < sum(len(p) for p in pieces.values())


async def test_a_generation_that_fails_ends_alone_with_its_status(stack):
    call = stack.worker.GenerateMany()
    await call.write(start(1, tokens_request(1, model="nope:latest")))
    await call.write(start(2, tokens_request(2)))
    await call.write(start(3, worker_pb2.GenerateTokensRequest(model="tiny:latest", prompt="no id")))
    pieces = {}
    await asyncio.wait_for(drain(call, pieces, [], {1, 2, 3}), 60)
    call.cancel()
    (failed,) = pieces[1]
    assert failed.error.code == grpc.StatusCode.NOT_FOUND.value[0] and "nope:latest" in failed.error.message
    info = error_details_pb2.ErrorInfo()
    assert failed.error.details[0].Unpack(info) and info.reason == "MODEL_NOT_LOADED"
    (invalid,) = pieces[3]
    assert invalid.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in invalid.error.details if d.Is(bad.DESCRIPTOR))
    assert [v.field for v in bad.field_violations] == ["request_id"]
    assert pieces[2][-1].chunk.usage.completion_tokens == 10


async def test_cancelled_timed_out_and_call_ended_generations_leave_nothing_running(stack):
    call = stack.worker.GenerateMany()
    await call.write(start(1, tokens_request(1, max_tokens=200)))
    await call.write(start(2, tokens_request(2, max_tokens=200)))
    await call.write(start(3, tokens_request(3, max_tokens=200), timeout=0.001))
    pieces, cancelled_at = {}, None
    async for response in call:
        for piece in response.pieces:
            pieces.setdefault(piece.id, []).append(piece)
        if cancelled_at is None and 1 in pieces:
            await call.write(worker_pb2.GenerateManyRequest(cancel=1))
            cancelled_at = len(pieces[1])
        if cancelled_at is not None and 3 in pieces and (pieces[3][-1].HasField("error")
                                                          or pieces[3][-1].chunk.finish_reason):
            break
    # The timed-out one ended with DEADLINE_EXCEEDED; the cancelled one stopped within a step or two,
    # with no last piece.
    assert pieces[3][-1].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "timeout" in pieces[3][-1].error.message
    assert len(pieces[1]) <= cancelled_at + 2
    assert not any(p.HasField("error") or p.chunk.finish_reason for p in pieces[1])
    call.cancel()           # the caller goes: what it still ran goes with it
    status = await quiet(stack)
    assert not status.request_ids and status.running == 0 and status.models[0].kv_tokens_used == 0
    await asyncio.sleep(0.2)
    again = (await stack.worker.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())).models[0]
    assert again.tokens_generated == status.models[0].tokens_generated, "a generation kept generating"


async def test_a_message_that_neither_starts_nor_cancels_or_reuses_a_running_id_is_refused(stack):
    call = stack.worker.GenerateMany()
    await call.write(worker_pb2.GenerateManyRequest())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error_info(caught.value)["BadRequest"].field_violations] == ["action"]

    call = stack.worker.GenerateMany()
    await call.write(start(7, tokens_request(7, max_tokens=200)))
    await call.write(start(7, tokens_request(8)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error_info(caught.value)["BadRequest"].field_violations] == ["start.id"]
    assert not (await quiet(stack)).request_ids       # the call's failure ended its running generation


async def test_a_caller_done_sending_gets_every_generation_then_the_end(stack):
    async def requests():
        for i in range(3):
            yield start(i, tokens_request(i, max_tokens=5))

    pieces = {}
    async for response in stack.worker.GenerateMany(requests()):
        for piece in response.pieces:
            pieces.setdefault(piece.id, []).append(piece)
    assert sorted(pieces) == [0, 1, 2]
    assert all(p[-1].chunk.usage.completion_tokens == 5 for p in pieces.values())


async def test_a_generation_its_caller_does_not_read_waits_at_its_window_and_pauses_then_ends_whole(stack):
    before = (await stack.worker.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())).models[0].tokens_generated
    call = stack.worker.GenerateMany()
    message = start(5, tokens_request(5, max_tokens=200))
    message.start.window = 1
    await call.write(message)
    pieces = []
    arrived = asyncio.Event()

    async def read():       # (a read cancelled by a timeout would cancel the call: grpc.aio's way)
        async for response in call:
            pieces.extend(response.pieces)
            arrived.set()

    reader = asyncio.create_task(read())
    await asyncio.wait_for(arrived.wait(), 30)
    await asyncio.sleep(0.5)
    assert len(pieces) == 1                     # its window is full: nothing more comes
    status = await stack.worker.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())
    generated = status.models[0].tokens_generated - before
    await asyncio.sleep(0.3)
    again = (await stack.worker.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest())).models[0]
    # Still served, and paused: the engine stopped once the worker's own backlog bound (64 chunks) was
    # reached behind the one piece sent.
    assert "many-5" in status.request_ids and again.tokens_generated - before == generated < 200
    while not pieces[-1].chunk.finish_reason:
        arrived.clear()
        await call.write(worker_pb2.GenerateManyRequest(taken=worker_pb2.PiecesTaken(ids=[5], pieces=[1])))
        await asyncio.wait_for(arrived.wait(), 30)
    call.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert len(pieces) < 200        # what waited went out merged
    assert sum(len(p.chunk.token_ids) for p in pieces) == 200
    assert pieces[-1].chunk.usage.completion_tokens == 200
