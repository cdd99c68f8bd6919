"""One `GenerateMany` call's bookkeeping on the worker (`ManyGenerations`), with generations that
put what the test tells them to: a stopping worker refuses starts and ends the call once its
generations have; a cancelled generation's waiting pieces are dropped; a caller done sending lets
every generation run to its end; an action of a later version is passed over; a message carries a
bounded number of pieces."""

from __future__ import annotations

import asyncio

from llmos.v1 import common_pb2, worker_pb2
from llmos.worker.many import PIECES_A_MESSAGE, ManyGenerations


def start(id_: int, window: int = 0) -> worker_pb2.GenerateManyRequest:
    return worker_pb2.GenerateManyRequest(start=worker_pb2.StartGeneration(
        id=id_, request=worker_pb2.GenerateTokensRequest(request_id=f"r{id_}"), window=window))


def piece(id_: int, last: bool = False) -> worker_pb2.GenerationPiece:
    chunk = worker_pb2.GenerateTokensResponse(token_ids=[id_])
    if last:
        chunk.finish_reason = common_pb2.FINISH_REASON_LENGTH
    return worker_pb2.GenerationPiece(id=id_, chunk=chunk)


class Requests:
    """The caller's side: messages sent when the test says, and done sending when it says."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def send(self, message) -> None:
        self.queue.put_nowait(message)

    def done(self) -> None:
        self.queue.put_nowait(None)

    async def __aiter__(self):
        while (message := await self.queue.get()) is not None:
            yield message


class Generations:
    """Generations that put `n` pieces each (the last one last), one a tick, waiting at their window."""

    def __init__(self, n: int, tick: float = 0.005) -> None:
        self.n, self.tick = n, tick
        self.cancelled: set[int] = set()

    async def run_one(self, start_: worker_pb2.StartGeneration, out: ManyGenerations) -> None:
        try:
            for i in range(self.n):
                await asyncio.sleep(self.tick)
                out.put(piece(start_.id, last=i == self.n - 1))
                if i < self.n - 1 and out.full(start_.id):
                    await out.room(start_.id)
        except asyncio.CancelledError:
            self.cancelled.add(start_.id)
            raise


async def collect(stream, pieces: list) -> None:
    async for response in stream:
        pieces.extend(response.pieces)


async def test_a_stopping_worker_refuses_starts_and_ends_the_call_once_its_generations_have():
    requests, generations, stopping = Requests(), Generations(5), asyncio.Event()
    many = ManyGenerations(requests, generations.run_one, stopping)
    pieces: list = []
    streaming = asyncio.create_task(collect(many.stream(), pieces))
    requests.send(start(1))
    await asyncio.sleep(0.01)
    stopping.set()
    requests.send(start(2))
    await asyncio.wait_for(streaming, 5)        # the call ends though its caller has not finished sending
    assert [p.chunk.token_ids[0] for p in pieces if p.id == 1] == [1] * 5 and pieces[-1].id in (1, 2)
    (refused,) = [p for p in pieces if p.id == 2]
    assert refused.error.code == 14 and "stopping" in refused.error.message      # UNAVAILABLE
    assert not generations.cancelled


async def test_a_cancelled_generations_waiting_pieces_are_dropped_and_it_stops():
    requests, generations = Requests(), Generations(1000, tick=0.001)
    many = ManyGenerations(requests, generations.run_one, asyncio.Event())
    requests.send(start(1, window=3))
    requests.send(start(2, window=3))
    stream = many.stream()
    first = await anext(stream)         # the first pieces; then both wait at their window, unread
    await asyncio.sleep(0.05)
    requests.send(worker_pb2.GenerateManyRequest(cancel=1))
    requests.send(worker_pb2.GenerateManyRequest(taken=worker_pb2.PiecesTaken(ids=[2], pieces=[3])))
    rest = await asyncio.wait_for(anext(stream), 5)
    await stream.aclose()
    assert 1 in generations.cancelled
    pieces = [*first.pieces, *rest.pieces]
    assert len([p for p in pieces if p.id == 1]) <= 3 and all(p.id == 2 for p in rest.pieces)
    assert len([p for p in pieces if p.id == 2]) <= 6


async def test_a_caller_done_sending_lifts_the_windows_and_gets_every_generation_whole():
    requests, generations = Requests(), Generations(40, tick=0.001)
    many = ManyGenerations(requests, generations.run_one, asyncio.Event())
    for i in range(3):
        requests.send(start(i, window=2))
    requests.send(worker_pb2.GenerateManyRequest.FromString(b"\x22\x00"))   # field 4: a later version's action
    requests.done()
    pieces: list = []
    await asyncio.wait_for(collect(many.stream(), pieces), 10)
    assert {i: len([p for p in pieces if p.id == i]) for i in range(3)} == {0: 40, 1: 40, 2: 40}


async def test_a_message_carries_at_most_its_bound_of_pieces():
    requests = Requests()

    async def burst(start_: worker_pb2.StartGeneration, out: ManyGenerations) -> None:
        for i in range(PIECES_A_MESSAGE * 2 + 1):
            out.put(piece(start_.id, last=i == PIECES_A_MESSAGE * 2))

    many = ManyGenerations(requests, burst, asyncio.Event())
    requests.send(start(1))
    requests.done()
    sizes = [len(r.pieces) async for r in many.stream()]
    assert sizes == [PIECES_A_MESSAGE, PIECES_A_MESSAGE, 1]
