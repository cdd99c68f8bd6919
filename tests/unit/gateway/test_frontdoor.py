import asyncio

import pytest

from llmos.common.domain import Chunk, FinishReason, GenerationInput, SamplingParams, Usage
from llmos.common.errors import NotFound, Unavailable
from llmos.gateway.frontdoor import Assignment, FrontDoor, GenerateCall


class FakeScheduler:
    def __init__(self, admit_error=None):
        self.admit_error = admit_error
        self.admitted = []
        self.finished = []

    async def admit(self, call, request_id, timeout, redispatch=False):
        if self.admit_error:
            raise self.admit_error
        self.admitted.append((request_id, timeout))
        self.redispatched = getattr(self, "redispatched", []) + [redispatch]
        n = len(self.admitted)
        return Assignment(f"127.0.0.1:{n}", "tiny:latest", f"w{n}")

    async def finish(self, request_id, reason, usage, worker_failed=False, model_not_loaded=False, tenant=""):
        # The gateway's own id of the call ("own"), which every admission of the call used.
        assert all(rid == request_id for rid, _ in self.admitted), (request_id, self.admitted)
        own = "own" if request_id.startswith("req-") else request_id
        self.finished.append((own, reason, usage) + (("worker failed",) if worker_failed else ())
                             + (("model not loaded",) if model_not_loaded else ()))


class FakeWorkers:
    def __init__(self, chunks, error=None, gate=None, dead=(), without_model=()):
        self.chunks = chunks
        self.error = error
        self.gate = gate
        self.dead = set(dead)
        self.without_model = set(without_model)

    async def generate(self, assignment, request_id, call, timeout):
        address, model = assignment.worker_address, assignment.model
        if address in self.dead:
            raise Unavailable("connection refused")
        if address in self.without_model:
            raise NotFound(f"model {model} is not loaded on this worker", reason="MODEL_NOT_LOADED")
        for chunk in self.chunks:
            yield chunk
            if self.gate is not None:
                await self.gate.wait()
        if self.error:
            raise self.error


CALL = GenerateCall("tiny", GenerationInput(prompt="hi"), SamplingParams(), request_id="r1")
DONE = Chunk("b", [2], finish_reason=FinishReason.STOP, usage=Usage(3, 2))


async def _collect(front, call=CALL, timeout=None):
    return [chunk async for _, chunk in front.generate(call, timeout)]


async def test_streams_in_order_and_reports_the_end():
    scheduler = FakeScheduler()
    front = FrontDoor(scheduler, FakeWorkers([Chunk("a", [1]), DONE]))
    chunks = await _collect(front, timeout=5.0)
    await front.drain()
    assert [c.text for c in chunks] == ["a", "b"]
    assert scheduler.finished == [("own", FinishReason.STOP, Usage(3, 2))]
    assert 4.0 < scheduler.admitted[0][1] <= 5.0


async def test_a_worker_failure_still_releases_the_slot():
    scheduler = FakeScheduler()
    front = FrontDoor(scheduler, FakeWorkers([Chunk("a", [1])], error=Unavailable("worker died")))
    with pytest.raises(Unavailable):
        await _collect(front)
    await front.drain()
    # Charged what was served: the prompt's bound ("hi": 2 bytes + 2) and the one token streamed.
    assert scheduler.finished == [("own", None, Usage(4, 1), "worker failed")]
    assert len(scheduler.admitted) == 1          # tokens had gone out: no second try


async def test_a_worker_that_fails_before_the_first_token_is_replaced():
    scheduler = FakeScheduler()
    front = FrontDoor(scheduler, FakeWorkers([Chunk("a", [1]), DONE], dead={"127.0.0.1:1", "127.0.0.1:2"}))
    chunks = await _collect(front)
    await front.drain()
    assert [c.text for c in chunks] == ["a", "b"]
    assert scheduler.redispatched == [False, True, True]
    failed = ("own", None, Usage(4, 0), "worker failed")
    assert scheduler.finished == [failed, failed, ("own", FinishReason.STOP, Usage(3, 2))]


async def test_a_worker_that_no_longer_holds_the_model_is_passed_over_and_the_scheduler_told():
    scheduler = FakeScheduler()
    front = FrontDoor(scheduler, FakeWorkers([DONE], without_model={"127.0.0.1:1"}))
    chunks = await _collect(front)
    await front.drain()
    assert [c.text for c in chunks] == ["b"] and scheduler.redispatched == [False, True]
    assert scheduler.finished == [("own", None, Usage(4, 0), "model not loaded"),
                                  ("own", FinishReason.STOP, Usage(3, 2))]


async def test_redispatch_gives_up_after_a_few_workers():
    scheduler = FakeScheduler()
    front = FrontDoor(scheduler, FakeWorkers([DONE], dead={f"127.0.0.1:{n}" for n in range(1, 10)}))
    with pytest.raises(Unavailable):
        await _collect(front)
    await front.drain()
    assert len(scheduler.admitted) == 4 and all(f[-1] == "worker failed" for f in scheduler.finished)


async def test_cancelling_the_stream_reports_cancelled():
    scheduler = FakeScheduler()
    gate = asyncio.Event()
    front = FrontDoor(scheduler, FakeWorkers([Chunk("a", [1]), DONE], gate=gate))
    task = asyncio.create_task(_collect(front))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await front.drain()
    assert scheduler.finished == [("own", FinishReason.CANCELLED, Usage(4, 1))]


async def test_a_consumer_that_closes_the_stream_reports_cancelled():
    scheduler = FakeScheduler()
    front = FrontDoor(scheduler, FakeWorkers([Chunk("a", [1]), Chunk("b", [2]), DONE]))
    stream = front.generate(CALL, None)
    await anext(stream)
    await stream.aclose()                 # what the server does to a handler whose caller left
    await front.drain()
    assert scheduler.finished == [("own", FinishReason.CANCELLED, Usage(4, 1))]


async def test_admission_errors_pass_through_and_nothing_is_reported():
    scheduler = FakeScheduler(admit_error=NotFound("no such model", reason="MODEL_NOT_FOUND"))
    front = FrontDoor(scheduler, FakeWorkers([]))
    with pytest.raises(NotFound):
        await _collect(front)
    await front.drain()
    assert scheduler.finished == []


async def test_a_request_without_an_id_gets_one():
    scheduler = FakeScheduler()
    front = FrontDoor(scheduler, FakeWorkers([DONE]))
    call = GenerateCall("tiny", GenerationInput(prompt="hi"), SamplingParams())
    ids = [rid async for rid, _ in front.generate(call, None)]
    assert ids[0].startswith("req-") and len(ids[0]) > 10


def test_every_turn_of_a_conversation_has_its_openings_prefix_key():
    from llmos.common.domain import ChatMessage

    def key(*messages, prompt=None):
        source = GenerationInput(prompt=prompt) if prompt is not None else GenerationInput(
            messages=tuple(ChatMessage(role, content) for role, content in messages))
        return GenerateCall("tiny", source, SamplingParams()).prefix_key

    opening = [("system", "Be terse."), ("user", "Name a river.")]
    first = key(*opening)
    assert first == key(*opening, ("assistant", "The Nile."), ("user", "Another?"))
    assert first != key(("system", "Be terse."), ("user", "Name a sea."))
    assert first != key(("system", "Be kind."), ("user", "Name a river."))
    long = "A long shared preamble of a raw prompt. " * 8
    assert key(prompt=long + "Q1") == key(prompt=long + "Q1 A1 Q2") != key(prompt="short")
    assert all(k != 0 for k in (first, key(prompt="")))


async def test_the_client_sees_its_own_id_and_the_scheduler_an_id_of_the_gateways_per_call():
    """A client's id never reaches the scheduler or a worker: another tenant (or a retry) sending
    the same id names another call, and cannot finish or cancel this one's accounting."""
    scheduler, seen = FakeScheduler(), []
    front = FrontDoor(scheduler, FakeWorkers([Chunk("a", [1]), DONE]))
    for _ in range(2):
        seen += [rid async for rid, _ in front.generate(CALL, None)]
    own = [rid for rid, _ in scheduler.admitted]
    assert seen == ["r1"] * 4
    assert len(set(own)) == 2 and "r1" not in own and all(rid.startswith("req-") for rid in own)
