import asyncio

import pytest

from llmos.common.errors import AlreadyExists, DeadlineExceeded, NotFound, ResourceExhausted
from llmos.scheduler.queue import Endpoint, Scheduler

W1, W2 = Endpoint("w1", "127.0.0.1:1"), Endpoint("w2", "127.0.0.1:2")


class FakeRegistry:
    def __init__(self, ready=None, loadable=None):
        self.ready = ready if ready is not None else {"tiny:latest": [W1]}
        self.loadable = loadable or {}
        self.loads = []

    async def ready_endpoints(self, model, timeout):
        name = model if ":" in model else f"{model}:latest"
        if name not in self.ready and name not in self.loadable:
            raise NotFound(f"model {name} is not in the catalog", reason="MODEL_NOT_FOUND")
        return name, list(self.ready.get(name, []))

    async def load(self, model, timeout, keep_alive=None):
        self.loads.append(model)
        self.ready[model] = self.loadable[model]
        return self.ready[model]


async def test_admits_to_the_least_loaded_worker():
    scheduler = Scheduler(FakeRegistry({"tiny:latest": [W1, W2]}), slots_per_worker=2)
    first = await scheduler.admit("a", "tiny")
    second = await scheduler.admit("b", "tiny")
    assert {first.endpoint, second.endpoint} == {W1, W2}
    assert first.model == "tiny:latest"
    assert scheduler.running == 2


async def test_waits_for_a_slot_and_gets_it_when_one_finishes():
    scheduler = Scheduler(FakeRegistry(), slots_per_worker=1)
    await scheduler.admit("a", "tiny")
    waiting = asyncio.create_task(scheduler.admit("b", "tiny"))
    await asyncio.sleep(0)
    assert scheduler.waiting == 1 and not waiting.done()
    assert scheduler.finish("a")
    admission = await asyncio.wait_for(waiting, 1)
    assert admission.endpoint == W1 and scheduler.waiting == 0 and scheduler.running == 1


async def test_higher_priority_waiters_go_first_then_arrival_order():
    scheduler = Scheduler(FakeRegistry(), slots_per_worker=1)
    await scheduler.admit("running", "tiny")
    order = []

    async def admit(rid, prio):
        await scheduler.admit(rid, "tiny", priority=prio)
        order.append(rid)

    tasks = [asyncio.create_task(admit(r, p)) for r, p in [("low1", 0), ("high", 5), ("low2", 0)]]
    await asyncio.sleep(0)
    for finished in ["running", "high", "low1"]:
        scheduler.finish(finished)
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert order == ["high", "low1", "low2"]


async def test_full_queue_refuses_at_once_with_retry_after():
    scheduler = Scheduler(FakeRegistry(), slots_per_worker=1, max_queue=1)
    await scheduler.admit("a", "tiny")
    queued = asyncio.create_task(scheduler.admit("b", "tiny"))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted) as caught:
        await scheduler.admit("c", "tiny")
    assert caught.value.reason == "QUEUE_FULL"
    assert caught.value.retry_after > 0
    assert scheduler.rejected_total == 1
    queued.cancel()


async def test_deadline_in_the_queue_gives_deadline_exceeded_and_leaves_the_queue():
    scheduler = Scheduler(FakeRegistry(), slots_per_worker=1)
    await scheduler.admit("a", "tiny")
    with pytest.raises(DeadlineExceeded) as caught:
        await scheduler.admit("b", "tiny", timeout=0.05)
    assert caught.value.reason == "DEADLINE_EXCEEDED_IN_QUEUE"
    assert scheduler.waiting == 0
    scheduler.finish("a")
    assert scheduler.running == 0


async def test_a_caller_that_goes_away_leaves_the_queue_and_holds_no_slot():
    scheduler = Scheduler(FakeRegistry(), slots_per_worker=1)
    await scheduler.admit("a", "tiny")
    waiting = asyncio.create_task(scheduler.admit("b", "tiny"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert scheduler.waiting == 0
    scheduler.finish("a")
    third = await asyncio.wait_for(scheduler.admit("c", "tiny"), 1)
    assert third.endpoint == W1


async def test_duplicate_ids_unknown_models_and_idempotent_finish():
    scheduler = Scheduler(FakeRegistry())
    await scheduler.admit("a", "tiny")
    with pytest.raises(AlreadyExists):
        await scheduler.admit("a", "tiny")
    with pytest.raises(NotFound):
        await scheduler.admit("b", "missing")
    assert scheduler.finish("a") and not scheduler.finish("a")
    assert scheduler.running == 0


async def test_a_model_loaded_nowhere_is_loaded_on_demand():
    registry = FakeRegistry(ready={}, loadable={"cold:latest": [W2]})
    scheduler = Scheduler(registry)
    admission = await scheduler.admit("a", "cold")
    assert registry.loads == ["cold:latest"]
    assert admission.endpoint == W2


async def test_a_keep_alive_is_handed_to_the_registry_even_when_the_model_is_loaded():
    registry = FakeRegistry(loadable={"tiny:latest": [W1]})
    scheduler = Scheduler(registry)
    await scheduler.admit("a", "tiny")
    assert registry.loads == []
    await scheduler.admit("b", "tiny", keep_alive=60.0)
    assert registry.loads == ["tiny:latest"]
