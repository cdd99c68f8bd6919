"""A scheduler taking over the lead: it counts the slots the previous leader's generations hold
(from the workers' reports) and their quota charges (from the store), keeps re-submitted requests
in their places, dispatches only once resumed, and one that stops leading refuses its queue with
NOT_LEADER."""

import asyncio
import time

import pytest

from llmos.common.errors import Unavailable
from llmos.common.keystore import Quota
from llmos.scheduler.admission import AdmissionControl, NotLeader, Ticket
from llmos.scheduler.history import Outcome
from llmos.scheduler.quotas import KeptCharge, QuotaBook, QuotaExceeded
from tests.support.clock import FakeClock
from tests.unit.scheduler.test_admission import W1, FakeRegistry, settle

MODEL = "tiny:latest"


def new_leader(slots=2, **kw) -> AdmissionControl:
    scheduler = AdmissionControl(FakeRegistry({MODEL: [W1]}), slots_per_worker=slots, **kw)
    scheduler.paused = True
    scheduler.update_endpoints(MODEL, [W1], dispatch=False)
    return scheduler


async def test_generations_the_previous_leader_started_hold_their_slots_until_they_end():
    scheduler = new_leader(slots=2)
    scheduler.report("w1", {MODEL: 2}, {"old-1", "old-2"}, {MODEL: ["old-1", "old-2"]})
    scheduler.resume()
    waiting = asyncio.create_task(scheduler.admit(Ticket("new", "tiny")))
    await settle()
    assert not waiting.done() and scheduler.waiting == 1        # both slots are the old leader's
    assert scheduler.finish("old-1", 100, outcome=Outcome.STOP)  # its end, reported here, frees one
    assert (await asyncio.wait_for(waiting, 1)).endpoint == W1


async def test_own_requests_are_not_counted_as_inherited_even_after_they_ended():
    scheduler = new_leader(slots=1)
    scheduler.resume()
    await scheduler.admit(Ticket("mine", "tiny"))
    scheduler.finish("mine", 10, outcome=Outcome.STOP)
    scheduler.report("w1", {MODEL: 1}, {"mine"}, {MODEL: ["mine"]})    # a report that lags its end
    assert (await asyncio.wait_for(scheduler.admit(Ticket("next", "tiny")), 1)).endpoint == W1


async def test_nothing_is_dispatched_before_resume_and_then_in_arrival_order_of_the_first_leader():
    scheduler = new_leader(slots=1)
    late = asyncio.create_task(scheduler.admit(Ticket("arrived-late", "tiny", waited=1.0)))
    await settle()
    early = asyncio.create_task(scheduler.admit(Ticket("arrived-early", "tiny", waited=5.0)))
    await settle()
    assert scheduler.running == 0 and scheduler.waiting == 2          # paused: both queue
    scheduler.resume()
    assert (await asyncio.wait_for(early, 1)).endpoint == W1          # re-submitted second, waited longer
    assert not late.done()
    status = scheduler.status("arrived-early")
    assert status.queue_seconds >= 5.0                                # its wait at the first leader counts


async def test_a_scheduler_that_stops_leading_refuses_its_queue_and_new_requests_with_not_leader():
    scheduler = new_leader(slots=1)
    scheduler.resume()
    await scheduler.admit(Ticket("running", "tiny", tenant="t", quota=Quota(max_concurrent=5)))
    queued = asyncio.create_task(scheduler.admit(Ticket("queued", "tiny", tenant="t", quota=Quota(max_concurrent=5))))
    await settle()
    scheduler.close("10.0.0.2:50052")
    with pytest.raises(NotLeader) as refused:
        await queued
    assert refused.value.metadata == {"leader": "10.0.0.2:50052"} and refused.value.code == "UNAVAILABLE"
    assert scheduler.quotas.usage("t")[0] == 1                       # the queued one's reservation is back
    with pytest.raises(NotLeader):
        await scheduler.admit(Ticket("new", "tiny"))


def test_restored_charges_count_against_the_quota_and_settle_when_their_end_is_reported():
    clock = FakeClock()
    book = QuotaBook(clock)
    now = time.time()
    book.restore([KeptCharge("ended", "t", now - 30, now - 20, 600),
                  KeptCharge("gone", "t", now - 90, now - 70, 5000),       # out of the window
                  KeptCharge("running", "t", now - 5, None, 300)])
    assert book.usage("t") == (1, 2, 900)
    quota = Quota(tokens_per_minute=1000)
    with pytest.raises(QuotaExceeded):
        book.reserve("t", quota, "new", 200)                         # 900 + 200 > 1000
    assert book.settle_inherited("running", 50)                      # it used 50 of its 300
    book.reserve("t", quota, "new", 200)
    assert book.usage("t") == (1, 3, 850)
    assert not book.settle_inherited("running", 50)                  # once


def test_a_resubmitted_request_gives_its_inherited_charge_up_and_is_counted_once():
    book = QuotaBook(FakeClock())
    book.restore([KeptCharge("queued", "t", time.time() - 2, None, 400)])
    quota = Quota(tokens_per_minute=500)
    book.reserve("t", quota, "queued", 400)                          # not 800: the same request
    assert book.usage("t") == (1, 1, 400)
    assert not book.settle_inherited("queued", None)                 # it is this leader's own now
    book.settle("t", "queued", 300)
    assert book.usage("t") == (0, 1, 300)


async def test_an_inherited_charge_no_worker_serves_ends_at_its_reservation_after_the_grace():
    clock = FakeClock()
    scheduler = AdmissionControl(FakeRegistry({MODEL: [W1]}), clock=clock, orphan_grace=5.0)
    scheduler.update_endpoints(MODEL, [W1], dispatch=False)
    scheduler.quotas.restore([KeptCharge("served", "t", time.time(), None, 100),
                              KeptCharge("lost", "t", time.time(), None, 100)])
    scheduler.report("w1", {MODEL: 4}, {"served"}, {MODEL: ["served"]})
    scheduler.forget_inherited_charges()
    clock.now += 5.0
    scheduler.forget_inherited_charges()
    assert scheduler.quotas.inherited == {"served"}
    assert scheduler.quotas.usage("t") == (1, 2, 200)               # "lost" counts at its reservation


async def test_a_charge_the_previous_leader_died_before_writing_is_counted_when_its_end_comes():
    scheduler = new_leader(slots=4)
    scheduler.quotas.restore([])
    scheduler.report("w1", {MODEL: 4}, {"unwritten"}, {MODEL: ["unwritten"]})
    scheduler.resume()
    assert scheduler.finish("unwritten", 168, outcome=Outcome.LENGTH, tenant="t")
    assert scheduler.quotas.usage("t") == (0, 1, 168)
    scheduler.finish("unwritten", 168, outcome=Outcome.LENGTH, tenant="t")     # a retried report: once
    assert scheduler.quotas.usage("t") == (0, 1, 168)


async def test_while_the_registry_cannot_be_reached_a_known_model_is_admitted_where_it_was_ready():
    from llmos.common.errors import RemoteError

    clock = FakeClock()
    registry = FakeRegistry({MODEL: [W1]})
    scheduler = AdmissionControl(registry, slots_per_worker=4, clock=clock, placement_ttl=1.0)
    await scheduler.admit(Ticket("before", "tiny"))

    async def unreachable(*args, **kwargs):
        raise RemoteError("UNAVAILABLE", "the registry cannot be reached", reason="REGISTRY_UNREACHABLE", metadata={})

    registry.resolve = unreachable
    clock.now += 5.0                                        # past the placement TTL: it would ask
    assert (await scheduler.admit(Ticket("during", "tiny"))).endpoint == W1
    with pytest.raises(RemoteError):
        await scheduler.admit(Ticket("unknown", "other"))    # nothing known of it: the error stands

    # A new leader never asked about the name: its first look at the placements serves it.
    fresh = AdmissionControl(registry, slots_per_worker=4)
    fresh.update_endpoints(MODEL, [W1], dispatch=False)
    assert (await fresh.admit(Ticket("first", "tiny"))).endpoint == W1


def test_only_charges_of_windowed_limits_are_written_down_each_once_in_order():
    class Log:
        def __init__(self):
            self.ops = []

        def reserved(self, request_id, tenant, start, tokens):
            self.ops.append(("reserved", request_id, tokens))

        def settled(self, request_id, end, tokens):
            self.ops.append(("settled", request_id, tokens))

        def released(self, request_id):
            self.ops.append(("released", request_id))

    log = Log()
    book = QuotaBook(FakeClock(), log)
    book.reserve("c", Quota(max_concurrent=4), "concurrency-only", 100)
    book.settle("c", "concurrency-only", 50)
    book.reserve("w", Quota(tokens_per_minute=1000), "ran", 100)
    book.reserve("w", Quota(tokens_per_minute=1000), "never-ran", 100)
    book.release("w", "never-ran")
    book.settle("w", "ran", 60)
    book.settle("w", "ran", 60)
    assert log.ops == [("reserved", "ran", 100), ("reserved", "never-ran", 100), ("released", "never-ran"),
                       ("settled", "ran", 60)]


async def test_a_registry_just_restarted_that_lists_no_worker_yet_does_not_hide_the_workers_reports():
    registry = FakeRegistry({MODEL: [W1]}, loadable={MODEL: []})
    scheduler = AdmissionControl(registry, slots_per_worker=4, placement_ttl=0.0)
    await scheduler.admit(Ticket("before", "tiny"))
    scheduler.report("w1", {MODEL: 4})                     # the worker says it holds the model
    registry.ready[MODEL] = []                             # the registry, restarted, knows no worker
    assert (await scheduler.admit(Ticket("during", "tiny"))).endpoint == W1
    assert registry.loads == []                            # no cold start sent to a registry with no workers
    scheduler.report("w1", {})                             # the worker lost it: now it is loaded again
    scheduler.finish("before", outcome=Outcome.STOP)
    scheduler.finish("during", outcome=Outcome.STOP)
    with pytest.raises(Unavailable, match="no worker serves"):
        await scheduler.admit(Ticket("after", "tiny"))     # (the fake registry has nowhere to load it)
    assert registry.loads == [MODEL]
