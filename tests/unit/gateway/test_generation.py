import asyncio

import pytest

from llmos.common.domain import Chunk
from llmos.common.errors import LlmosError
from llmos.gateway.generation import QUEUED_CHUNKS, Generation, StallGuard


class FakeWatch:
    def __init__(self):
        self.chunks, self.ended = 0, None

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        self.ended = exc

    def chunk(self, request_id, chunk):
        self.chunks += 1


async def endless(closed: list):
    try:
        while True:
            yield "r1", Chunk("a", [1])
            await asyncio.sleep(0)
    finally:
        closed.append(True)          # the front door's finally: the scheduler is told, the worker stops


async def test_a_stream_nobody_reads_ends_stalled_after_the_timeout_and_lets_go_of_its_generation():
    closed, watch = [], FakeWatch()
    generation = Generation(watch, endless(closed), stall_seconds=0.2)
    assert (await generation.next())[0] == "r1"          # the client read one chunk, then nothing
    await asyncio.sleep(0.6)
    assert closed == [True]
    assert isinstance(watch.ended, LlmosError) and watch.ended.reason == "STREAM_STALLED"
    assert watch.chunks == QUEUED_CHUNKS + 2             # read one, queued 16, held one it could not put
    # What was queued is still read, then the error.
    for _ in range(QUEUED_CHUNKS):
        await generation.next()
    with pytest.raises(LlmosError) as ended:
        await generation.next()
    assert ended.value.code == "CANCELLED" and ended.value.reason == "STREAM_STALLED"


async def test_a_reader_that_keeps_up_is_never_stalled():
    closed, watch = [], FakeWatch()
    generation = Generation(watch, endless(closed), stall_seconds=0.05)
    for _ in range(200):
        await generation.next()
        await asyncio.sleep(0.001)
    await generation.cancel()
    assert closed == [True]                              # cancelled by its door, not stalled
    assert not isinstance(watch.ended, LlmosError)


async def test_the_grpc_door_ends_a_stream_once_one_chunk_waited_the_timeout_not_when_quick_chunks_add_up_to_it():
    """The gRPC door's guard: chunks taken at once for three times the timeout leave the stream alone (its one
    timer fires meanwhile and waits again); one chunk not taken for the timeout closes the generation."""
    closed = []
    chunks = endless(closed)
    await anext(chunks)
    guard = StallGuard(chunks, 0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < 0.3:
        with guard.offering():
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.15)                            # nothing on offer: nothing to stall
    assert not guard.stalled and closed == []
    with guard.offering():
        await asyncio.sleep(0.25)                        # the client reads nothing
    await asyncio.sleep(0.01)
    assert guard.stalled and closed == [True]
    guard.close()
