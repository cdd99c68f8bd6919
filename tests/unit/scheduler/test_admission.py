"""The scheduler core with a fake registry, fake workers and, where time matters, a fake clock."""

import asyncio
from collections import Counter

import pytest

from llmos.common.errors import AlreadyExists, Cancelled, DeadlineExceeded, NotFound, ResourceExhausted
from llmos.scheduler.admission import AdmissionControl, Resolution, Ticket
from llmos.scheduler.history import Outcome, Phase
from llmos.scheduler.rotation import Endpoint
from tests.support.clock import FakeClock

W1, W2 = Endpoint("w1", "127.0.0.1:1"), Endpoint("w2", "127.0.0.1:2")


class FakeRegistry:
    def __init__(self, ready=None, loadable=None):
        self.ready = ready if ready is not None else {"tiny:latest": [W1]}
        self.loadable = loadable or {}
        self.loads = []
        self.holds = []

    async def ready_endpoints(self, model, timeout):
        name = model if ":" in model else f"{model}:latest"
        if name not in self.ready and name not in self.loadable:
            raise NotFound(f"model {name} is not in the catalog", reason="MODEL_NOT_FOUND")
        return name, list(self.ready.get(name, []))

    async def resolve(self, name, timeout, route_key=""):
        model, endpoints = await self.ready_endpoints(name, timeout)
        return Resolution(model, endpoints)

    async def load(self, model, timeout, keep_alive=None, hold=False):
        self.loads.append(model)
        self.holds.append(hold)
        self.ready[model] = self.loadable[model]
        return self.ready[model]


def ticket(rid, model="tiny", **fields):
    return Ticket(rid, model, **fields)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_admits_to_the_least_loaded_worker():
    scheduler = AdmissionControl(FakeRegistry({"tiny:latest": [W1, W2]}), slots_per_worker=2)
    first = await scheduler.admit(ticket("a"))
    second = await scheduler.admit(ticket("b"))
    assert {first.endpoint, second.endpoint} == {W1, W2}
    assert first.model == "tiny:latest" and scheduler.running == 2


async def test_capacity_follows_the_workers_reports():
    scheduler = AdmissionControl(FakeRegistry({"tiny:latest": [W1, W2]}), slots_per_worker=16)
    scheduler.update_endpoints("tiny:latest", [W1, W2])
    scheduler.report("w1", {"tiny:latest": 1})
    scheduler.report("w2", {"tiny:latest": 3})
    placed = Counter()
    for i in range(4):
        placed[(await scheduler.admit(ticket(f"r{i}"))).endpoint.worker_id] += 1
    assert placed == {"w1": 1, "w2": 3}
    waiting = asyncio.create_task(scheduler.admit(ticket("r4")))
    await settle()
    assert scheduler.waiting == 1 and not waiting.done()
    scheduler.report("w1", {"tiny:latest": 2})       # the worker grew: the waiter goes there
    assert (await asyncio.wait_for(waiting, 1)).endpoint == W1


async def test_waits_for_a_slot_and_gets_it_when_one_finishes():
    scheduler = AdmissionControl(FakeRegistry(), slots_per_worker=1)
    await scheduler.admit(ticket("a"))
    waiting = asyncio.create_task(scheduler.admit(ticket("b")))
    await settle()
    assert scheduler.waiting == 1 and not waiting.done()
    assert scheduler.status("b").phase is Phase.QUEUED and scheduler.status("b").reason == "NO_FREE_SLOT"
    assert scheduler.finish("a", outcome=Outcome.STOP)
    admission = await asyncio.wait_for(waiting, 1)
    assert admission.endpoint == W1 and scheduler.waiting == 0 and scheduler.running == 1


async def test_bands_first_then_arrival_order():
    scheduler = AdmissionControl(FakeRegistry(), slots_per_worker=1)
    await scheduler.admit(ticket("running"))
    order = []

    async def admit(rid, priority):
        await scheduler.admit(ticket(rid, priority=priority))
        order.append(rid)

    tasks = []
    for rid, priority in [("low1", 0), ("high", 5), ("low2", 0)]:
        tasks.append(asyncio.create_task(admit(rid, priority)))
        await settle()
    assert [scheduler.status(r).position for r in ("high", "low1", "low2")] == [1, 2, 3]
    for finished in ["running", "high", "low1"]:
        scheduler.finish(finished, outcome=Outcome.STOP)
        await settle()
    await asyncio.gather(*tasks)
    assert order == ["high", "low1", "low2"]


async def _share_of_b(weight_b: float = 1.0) -> float:
    """Fake workers (4 slots) and a fake clock: each request runs cost / 100 fake seconds; tenant a
    sends 10x as many requests as b. Returns b's share of the tokens served while both wait."""
    clock = FakeClock()
    scheduler = AdmissionControl(FakeRegistry({"tiny:latest": [W1]}), slots_per_worker=4, max_queue=1000, clock=clock)
    costs, tasks = {}, {}
    for i in range(200):
        costs[f"a{i}"] = 50 + (i * 37) % 200            # a sends 10x as many requests, of varied size
    for i in range(20):
        costs[f"b{i}"] = 150
    for rid, cost in costs.items():
        weight = weight_b if rid[0] == "b" else 1.0
        tasks[rid] = asyncio.create_task(scheduler.admit(ticket(rid, tenant=rid[0], max_tokens=cost, weight=weight)))
    await settle()
    served, running, finished = Counter(), {}, set()
    while any(d.tenant == "b" for d in scheduler.queue_depths()):    # the run: both tenants backlogged
        for rid, task in tasks.items():
            if task.done() and rid not in running and rid not in finished:
                running[rid] = clock.now + costs[rid] / 100
        rid = min(running, key=running.get)
        clock.now = running.pop(rid)
        finished.add(rid)
        served[rid[0]] += costs[rid]
        scheduler.finish(rid, tokens=costs[rid], outcome=Outcome.STOP)
        await settle()
    for task in tasks.values():
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    return served["b"] / (served["a"] + served["b"])


async def test_two_tenants_at_equal_weight_share_the_tokens_when_one_sends_ten_times_more():
    assert 0.4 <= await _share_of_b() <= 0.6


async def test_a_tenant_of_weight_two_gets_about_two_thirds():
    # The weight comes with each request (from the tenant's record), not from a setting.
    assert 0.57 <= await _share_of_b(2.0) <= 0.77


async def test_a_weight_out_of_range_is_refused():
    with pytest.raises(ValueError, match="weight"):
        await AdmissionControl(FakeRegistry()).admit(ticket("w", weight=0.0))


async def test_aging_serves_a_low_band_that_waited_long_enough():
    clock = FakeClock()
    scheduler = AdmissionControl(FakeRegistry(), slots_per_worker=1, aging_seconds=10.0, clock=clock)
    await scheduler.admit(ticket("running"))
    low = asyncio.create_task(scheduler.admit(ticket("low", priority=0)))
    await settle()
    clock.now = 35.0                                      # low has risen 3.5 bands
    high = asyncio.create_task(scheduler.admit(ticket("high", priority=3)))
    await settle()
    scheduler.finish("running", outcome=Outcome.STOP)
    await settle()
    assert low.done() and not high.done()
    scheduler.finish("low", outcome=Outcome.STOP)
    await asyncio.wait_for(high, 1)


async def test_earliest_deadline_first_inside_a_band():
    scheduler = AdmissionControl(FakeRegistry(), slots_per_worker=1)
    await scheduler.admit(ticket("running"))
    relaxed = asyncio.create_task(scheduler.admit(ticket("relaxed"), timeout=30))
    await settle()
    urgent = asyncio.create_task(scheduler.admit(ticket("urgent"), timeout=5))
    await settle()
    scheduler.finish("running", outcome=Outcome.STOP)
    await settle()
    assert urgent.done() and not relaxed.done()
    scheduler.finish("urgent", outcome=Outcome.STOP)
    await asyncio.wait_for(relaxed, 1)


async def test_full_queues_refuse_at_once_with_an_estimate():
    scheduler = AdmissionControl(FakeRegistry({"tiny:latest": [W1], "other:latest": [W2]}), slots_per_worker=1,
                          max_queue=3, max_queue_per_model=2)
    await scheduler.admit(ticket("a"))
    queued = [asyncio.create_task(scheduler.admit(ticket(f"q{i}"))) for i in range(2)]
    await settle()
    with pytest.raises(ResourceExhausted) as caught:
        await scheduler.admit(ticket("c"))
    assert caught.value.reason == "MODEL_QUEUE_FULL" and caught.value.retry_after > 0
    await scheduler.admit(ticket("o1", model="other"))
    queued.append(asyncio.create_task(scheduler.admit(ticket("o2", model="other"))))
    await settle()
    with pytest.raises(ResourceExhausted) as caught:
        await scheduler.admit(ticket("o3", model="other"))
    assert caught.value.reason == "QUEUE_FULL"
    assert scheduler.rejected == {"MODEL_QUEUE_FULL": 1, "QUEUE_FULL": 1}
    assert scheduler.status("c").reason == "MODEL_QUEUE_FULL"
    for task in queued:
        task.cancel()
    await asyncio.gather(*queued, return_exceptions=True)
    assert scheduler.waiting == 0


async def test_retry_estimate_grows_with_the_queue():
    scheduler = AdmissionControl(FakeRegistry(), slots_per_worker=1, max_queue=10)
    await scheduler.admit(ticket("a"))
    first = scheduler.retry_after("tiny:latest")
    queued = [asyncio.create_task(scheduler.admit(ticket(f"q{i}"))) for i in range(4)]
    await settle()
    assert scheduler.retry_after("tiny:latest") == pytest.approx(first * 5)
    for task in queued:
        task.cancel()
    await asyncio.gather(*queued, return_exceptions=True)


async def test_deadline_in_the_queue_gives_deadline_exceeded_and_leaves_the_queue():
    scheduler = AdmissionControl(FakeRegistry(), slots_per_worker=1)
    await scheduler.admit(ticket("a"))
    with pytest.raises(DeadlineExceeded) as caught:
        await scheduler.admit(ticket("b"), timeout=0.05)
    assert caught.value.reason == "DEADLINE_EXCEEDED_IN_QUEUE"
    assert scheduler.waiting == 0 and scheduler.status("b").phase is Phase.DONE
    scheduler.finish("a", outcome=Outcome.STOP)
    assert scheduler.running == 0 and scheduler.rejected == {"DEADLINE_EXCEEDED_IN_QUEUE": 1}


async def test_a_caller_that_goes_away_leaves_the_queue_and_holds_no_slot():
    scheduler = AdmissionControl(FakeRegistry(), slots_per_worker=1)
    await scheduler.admit(ticket("a"))
    waiting = asyncio.create_task(scheduler.admit(ticket("b")))
    await settle()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert scheduler.waiting == 0 and scheduler.status("b").reason == "CANCELLED_IN_QUEUE"
    scheduler.finish("a", outcome=Outcome.STOP)
    third = await asyncio.wait_for(scheduler.admit(ticket("c")), 1)
    assert third.endpoint == W1 and not scheduler.rejected


async def test_a_failed_worker_leaves_rotation_and_a_redispatch_goes_first_elsewhere():
    scheduler = AdmissionControl(FakeRegistry({"tiny:latest": [W1, W2]}), slots_per_worker=1)
    first = await scheduler.admit(ticket("a"))
    assert first.endpoint == W1 and (await scheduler.admit(ticket("b"))).endpoint == W2
    queued = asyncio.create_task(scheduler.admit(ticket("queued")))
    await settle()
    scheduler.finish("a", outcome=Outcome.WORKER_FAILED, worker_failed=True)
    await settle()
    assert not queued.done()                            # the freed slot is on the failed worker
    loads = {w.endpoint.worker_id: w for w in scheduler.worker_loads()}
    assert not loads["w1"].in_rotation and loads["w2"].in_rotation
    again = asyncio.create_task(scheduler.admit(ticket("a", redispatch=True)))
    await settle()
    scheduler.finish("b", outcome=Outcome.STOP)
    assert (await asyncio.wait_for(again, 1)).endpoint == W2 and not queued.done()
    scheduler.report("w1", {"tiny:latest": 1})          # it answers again
    await asyncio.wait_for(queued, 1)


async def test_a_worker_that_stops_answering_leaves_rotation_after_the_timeout():
    clock = FakeClock()
    scheduler = AdmissionControl(FakeRegistry({"tiny:latest": [W1, W2]}), slots_per_worker=4, report_timeout=2.0,
                          clock=clock)
    scheduler.update_endpoints("tiny:latest", [W1, W2])
    scheduler.report("w1", {"tiny:latest": 4})
    scheduler.report("w2", {"tiny:latest": 4})
    clock.now = 1.0
    scheduler.unreachable("w1")                         # one missed poll: still in
    assert all(w.in_rotation for w in scheduler.worker_loads())
    clock.now = 2.5
    scheduler.unreachable("w1")
    for i in range(3):
        assert (await scheduler.admit(ticket(f"r{i}"))).endpoint == W2


async def test_status_says_where_a_request_is():
    scheduler = AdmissionControl(FakeRegistry(), slots_per_worker=1)
    await scheduler.admit(ticket("a", tenant="t1", priority=2))
    running = scheduler.status("a")
    assert (running.phase, running.endpoint, running.tenant, running.priority) == (Phase.RUNNING, W1, "t1", 2)
    assert running.start_time is not None
    queued = asyncio.create_task(scheduler.admit(ticket("q")))
    await settle()
    assert scheduler.status("q").start_time is None
    queued.cancel()
    await asyncio.gather(queued, return_exceptions=True)
    assert scheduler.status("q").start_time is None            # it never ran
    scheduler.finish("a", tokens=10, outcome=Outcome.STOP)
    done = scheduler.status("a")
    assert (done.phase, done.reason) == (Phase.DONE, "STOP")
    assert scheduler.status("never") is None


async def test_queue_depths_per_model_band_and_tenant():
    scheduler = AdmissionControl(FakeRegistry(), slots_per_worker=1)
    await scheduler.admit(ticket("a"))
    queued = [asyncio.create_task(scheduler.admit(ticket(r, tenant=t, priority=p)))
              for r, t, p in [("q1", "x", 0), ("q2", "x", 0), ("q3", "y", 1)]]
    await settle()
    assert {(d.model, d.priority, d.tenant, d.waiting) for d in scheduler.queue_depths()} == {
        ("tiny:latest", 0, "x", 2), ("tiny:latest", 1, "y", 1)}
    for task in queued:
        task.cancel()
    await asyncio.gather(*queued, return_exceptions=True)


async def test_duplicate_ids_unknown_models_and_idempotent_finish():
    scheduler = AdmissionControl(FakeRegistry())
    await scheduler.admit(ticket("a"))
    with pytest.raises(AlreadyExists):
        await scheduler.admit(ticket("a"))
    with pytest.raises(NotFound):
        await scheduler.admit(ticket("b", model="missing"))
    assert scheduler.finish("a", outcome=Outcome.STOP) and not scheduler.finish("a", outcome=Outcome.STOP)
    assert scheduler.running == 0 and scheduler.rejected == {"MODEL_NOT_FOUND": 1}


async def test_a_model_loaded_nowhere_is_loaded_on_demand():
    registry = FakeRegistry(ready={}, loadable={"cold:latest": [W2]})
    scheduler = AdmissionControl(registry)
    admission = await scheduler.admit(ticket("a", model="cold"))
    assert registry.loads == ["cold:latest"] and admission.endpoint == W2


async def test_a_keep_alive_is_handed_to_the_registry_even_when_the_model_is_loaded():
    registry = FakeRegistry(loadable={"tiny:latest": [W1]})
    scheduler = AdmissionControl(registry)
    await scheduler.admit(ticket("a"))
    assert registry.loads == []
    await scheduler.admit(ticket("b", keep_alive=60.0))
    assert registry.loads == ["tiny:latest"] and registry.holds == [False]
    await scheduler.admit(ticket("c", keep_alive=60.0, keep_alive_hold=True))    # a user's: only a hold
    assert registry.holds == [False, True]


async def test_a_full_queue_makes_room_for_a_higher_band_or_a_less_served_tenant():
    scheduler = AdmissionControl(FakeRegistry(), slots_per_worker=1, max_queue=3)
    await scheduler.admit(ticket("running"))
    flood = {f"a{i}": asyncio.create_task(scheduler.admit(ticket(f"a{i}", tenant="a"))) for i in range(3)}
    await settle()
    with pytest.raises(ResourceExhausted) as caught:
        await scheduler.admit(ticket("a3", tenant="a"))          # same tenant: refused, nothing moves
    assert caught.value.reason == "QUEUE_FULL"
    b = asyncio.create_task(scheduler.admit(ticket("b0", tenant="b")))
    await settle()
    assert flood["a2"].done() and isinstance(flood["a2"].exception(), ResourceExhausted)
    assert flood["a2"].exception().reason == "QUEUE_FULL_DISPLACED"
    with pytest.raises(ResourceExhausted):
        await scheduler.admit(ticket("b1", tenant="b"))          # a 2 vs b 1: not two more
    high = asyncio.create_task(scheduler.admit(ticket("high", tenant="b", priority=5)))
    await settle()
    assert flood["a1"].exception().reason == "QUEUE_FULL_DISPLACED"
    assert scheduler.waiting == 3 and scheduler.status("high").position == 1
    assert scheduler.rejected == {"QUEUE_FULL": 2, "QUEUE_FULL_DISPLACED": 2}
    for task in (flood["a0"], b, high):
        task.cancel()
    await asyncio.gather(flood["a0"], b, high, return_exceptions=True)
    assert scheduler.waiting == 0


async def test_a_finish_that_overtakes_its_admission_gives_the_slot_back():
    scheduler = AdmissionControl(FakeRegistry(), slots_per_worker=1)
    await scheduler.admit(ticket("a"))
    queued = asyncio.create_task(scheduler.admit(ticket("b")))
    await settle()
    assert not scheduler.finish("b", outcome=Outcome.CANCELLED)     # the caller left while b was queued
    assert scheduler.waiting == 0
    assert scheduler.finish("a", outcome=Outcome.STOP)        # the same tick: the slot must not go to b
    assert scheduler.running == 0
    with pytest.raises(Cancelled):          # a typed error: its RPC ends at once, not at its deadline
        await queued
    await scheduler.admit(ticket("a"))
    scheduler.finish("x", outcome=Outcome.CANCELLED)                # before its admission even arrived
    with pytest.raises(Cancelled):
        await scheduler.admit(ticket("x"))
    scheduler.finish("a", outcome=Outcome.STOP)
    assert scheduler.running == 0 and scheduler.waiting == 0
    assert (await scheduler.admit(ticket("c"))).endpoint == W1


async def test_a_slot_its_worker_no_longer_knows_comes_back_after_the_grace():
    clock = FakeClock()
    scheduler = AdmissionControl(FakeRegistry(), slots_per_worker=2, clock=clock, orphan_grace=5.0)
    await scheduler.admit(ticket("lost"))        # its gateway will die without a word
    await scheduler.admit(ticket("kept"))
    waiting = asyncio.create_task(scheduler.admit(ticket("next")))
    await settle()
    assert scheduler.running == 2 and not waiting.done()
    scheduler.report("w1", {"tiny:latest": 2}, {"kept"})       # "lost" is missing from now
    clock.now = 4.9
    scheduler.report("w1", {"tiny:latest": 2}, {"kept"})
    assert scheduler.running == 2, "not before the grace"
    clock.now = 5.0
    scheduler.report("w1", {"tiny:latest": 2}, {"kept"})
    await settle()
    assert waiting.done() and scheduler.status("lost").reason == "ORPHANED"
    assert scheduler.status("kept").phase is Phase.RUNNING
    # A request that shows up again before the grace is over keeps its slot.
    clock.now = 6.0
    scheduler.report("w1", {"tiny:latest": 2}, {"kept"})      # "next" not yet there
    clock.now = 10.0
    scheduler.report("w1", {"tiny:latest": 2}, {"kept", "next"})
    clock.now = 20.0
    scheduler.report("w1", {"tiny:latest": 2}, {"kept", "next"})
    assert scheduler.status("next").phase is Phase.RUNNING


async def test_a_worker_that_reports_without_a_model_gets_none_of_its_requests_whatever_the_registry_says():
    """The registry may still list a placement the worker has lost (until its next heartbeat);
    the worker's own report wins: no slots there, so nothing is sent there to fail."""
    clock = FakeClock()
    scheduler = AdmissionControl(FakeRegistry({"tiny:latest": [W1, W2]}), slots_per_worker=4, clock=clock)
    scheduler.update_endpoints("tiny:latest", [W1, W2])
    clock.now = 1.0
    scheduler.report("w1", {})                         # w1 no longer holds it
    scheduler.report("w2", {"tiny:latest": 4})
    clock.now = 2.0
    scheduler.update_endpoints("tiny:latest", [W1, W2])  # the registry has not noticed yet
    placed = {(await scheduler.admit(ticket(f"r{i}"))).endpoint.worker_id for i in range(4)}
    assert placed == {"w2"}
    # Listed again after its report (it loaded the model anew): slots until it reports.
    scheduler.update_endpoints("tiny:latest", [W2])
    clock.now = 3.0
    scheduler.update_endpoints("tiny:latest", [W1, W2])
    assert (await scheduler.admit(ticket("r4"))).endpoint == W1


async def test_a_worker_that_refused_a_request_for_want_of_the_model_gets_no_more_until_it_reports_it():
    clock = FakeClock()
    scheduler = AdmissionControl(FakeRegistry({"tiny:latest": [W1, W2]}), slots_per_worker=2, clock=clock)
    scheduler.update_endpoints("tiny:latest", [W1, W2])
    first = await scheduler.admit(ticket("a"))
    assert scheduler.finish("a", model_not_loaded=True, outcome=Outcome.STOP)
    clock.now = 1.0
    scheduler.update_endpoints("tiny:latest", [W1, W2])        # still listed by the registry
    placed = {(await scheduler.admit(ticket(f"r{i}"))).endpoint for i in range(2)}
    assert placed == {W1, W2} - {first.endpoint}
    scheduler.report(first.endpoint.worker_id, {"tiny:latest": 2})  # loaded there again
    assert (await scheduler.admit(ticket("r2"))).endpoint == first.endpoint



async def test_a_prefix_key_goes_back_to_its_worker_while_it_is_not_much_busier():
    scheduler = AdmissionControl(FakeRegistry({"tiny:latest": [W1, W2]}), slots_per_worker=4, affinity_slack=0.25)
    home = (await scheduler.admit(ticket("c1", prefix_key=7))).endpoint
    other = W2 if home == W1 else W1
    # One slot in four busier than the idle other worker: within the slack, the key goes home.
    assert (await scheduler.admit(ticket("c2", prefix_key=7))).endpoint == home
    # Two slots busier: the least loaded wins, and the key follows it there.
    assert (await scheduler.admit(ticket("c3", prefix_key=7))).endpoint == other
    scheduler.finish("c1", outcome=Outcome.STOP)
    scheduler.finish("c2", outcome=Outcome.STOP)
    assert (await scheduler.admit(ticket("c4", prefix_key=7))).endpoint == other   # not the idle one
    assert (await scheduler.admit(ticket("plain"))).endpoint == home               # no key: least loaded
    assert (await scheduler.admit(ticket("new", prefix_key=8))).endpoint == home   # a new key: least loaded


async def test_without_slack_a_prefix_key_changes_nothing():
    scheduler = AdmissionControl(FakeRegistry({"tiny:latest": [W1, W2]}), slots_per_worker=4, affinity_slack=0.0)
    first = (await scheduler.admit(ticket("c1", prefix_key=7))).endpoint
    assert (await scheduler.admit(ticket("c2", prefix_key=7))).endpoint != first


async def test_a_clients_id_is_unique_within_its_tenant_only_and_names_its_own_request():
    scheduler = AdmissionControl(FakeRegistry(), slots_per_worker=4)
    await scheduler.admit(ticket("req-a", tenant="acme", client_id="job-1"))
    await scheduler.admit(ticket("req-b", tenant="umbrella", client_id="job-1"))    # another tenant's: fine
    with pytest.raises(AlreadyExists) as refused:
        await scheduler.admit(ticket("req-c", tenant="acme", client_id="job-1"))
    assert refused.value.reason == "DUPLICATE_REQUEST_ID"
    assert scheduler.running == 2
    assert scheduler.status("job-1", "acme").request_id == "req-a"
    assert scheduler.status("job-1", "umbrella").request_id == "req-b"
    # Umbrella's end of its job-1 says nothing about acme's.
    assert scheduler.finish("req-b", outcome=Outcome.CANCELLED)
    assert scheduler.status("job-1", "acme").phase is Phase.RUNNING
    assert scheduler.status("job-1", "umbrella").phase is Phase.DONE
    # Once acme's job-1 ended, the id may be used again at once, and names the new request.
    assert scheduler.finish("req-a", outcome=Outcome.STOP)
    await scheduler.admit(ticket("req-d", tenant="acme", client_id="job-1"))
    assert scheduler.status("job-1", "acme").request_id == "req-d"
    # A late finish of an abandoned call never touches the call that reused its client's id.
    assert not scheduler.finish("req-c", outcome=Outcome.CANCELLED)
    assert scheduler.status("job-1", "acme").phase is Phase.RUNNING
