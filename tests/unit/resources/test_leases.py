"""Leases on the store, SQLite and PostgreSQL alike (each test runs on both)."""

import threading

import pytest

from llmos.common.errors import InvalidArgument, NotFound, ResourceExhausted
from llmos.common.store import Leadership, Store
from llmos.resources.inventory import DeviceInfo, probe_devices
from llmos.resources.leases import LeaseBook
from llmos.resources.manager import ResourceManager
from tests.support.clock import FakeClock

GIB = 2**30
CPU = DeviceInfo("cpu", "cpu", "test cpu", 10 * GIB, 1 * GIB, 2)


def fake_probe():
    return [CPU]


def book_of(store_url, clock, budget=10 * GIB, node="n1"):
    book = LeaseBook(Store(store_url), clock)
    book.publish(node, [(CPU, budget)])
    return book


def test_leases_stay_within_the_budget_and_name_the_sizes(store_url):
    manager = ResourceManager("n1", fake_probe, Store(store_url), cpu_budget_bytes=4 * GIB)
    first = manager.acquire("w/a", "", "", 3 * GIB)
    with pytest.raises(ResourceExhausted) as caught:
        manager.acquire("w/b", "", "cpu", 2 * GIB)
    assert caught.value.reason == "DEVICE_MEMORY_EXHAUSTED"
    assert "2.00 GiB" in caught.value.message and "4.00 GiB" in caught.value.message
    assert manager.release(first.name) and not manager.release(first.name)
    manager.acquire("w/b", "", "cpu", 2 * GIB)
    device = manager.nodes()[0].devices[0]
    assert (device.leased_bytes, device.budget_bytes) == (2 * GIB, 4 * GIB)


def test_leases_survive_a_restart(store_url):
    manager = ResourceManager("n1", fake_probe, Store(store_url))
    lease = manager.acquire("w/a", "", "", GIB)
    manager.close()
    again = ResourceManager("n1", fake_probe, Store(store_url))
    assert [held.name for held in again.leases.list()] == [lease.name]
    assert again.nodes()[0].devices[0].leased_bytes == GIB
    assert again.nodes()[0].devices[0].budget_bytes == 9 * GIB


def test_every_replica_sees_every_node_and_grants_leases_on_it(store_url):
    """Two resource managers on two nodes share one store: each lists both nodes, and a lease
    on a node counts against that node's budget whichever replica granted it."""
    one = ResourceManager("n1", fake_probe, Store(store_url), cpu_budget_bytes=4 * GIB)
    two = ResourceManager("n2", fake_probe, Store(store_url), cpu_budget_bytes=2 * GIB)
    one.publish()
    two.publish()
    assert sorted(n.name for n in one.nodes()) == sorted(n.name for n in two.nodes()) == ["n1", "n2"]
    one.acquire("w/a", "n2", "cpu", GIB)
    with pytest.raises(ResourceExhausted):
        two.acquire("w/b", "", "cpu", 2 * GIB)              # n2 has 1 of its 2 GiB left
    two.acquire("w/b", "", "cpu", GIB)
    assert {n.name: n.devices[0].leased_bytes for n in one.nodes()} == {"n1": 0, "n2": 2 * GIB}


def test_replicas_granting_at_once_never_overcommit_a_device(store_url):
    """Eight threads, each with its own connection (as replicas would be), race for 1 GiB
    leases on a 4 GiB device: exactly four win."""
    book_of(store_url, FakeClock(1000.0), budget=4 * GIB).close()
    books = [LeaseBook(Store(store_url)) for _ in range(8)]
    won, lost = [], []
    start = threading.Barrier(len(books))

    def race(book):
        start.wait()
        try:
            won.append(book.acquire("w/x", "n1", "cpu", GIB, ttl=60))
        except ResourceExhausted:
            lost.append(book)

    threads = [threading.Thread(target=race, args=(book,)) for book in books]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(won), len(lost)) == (4, 4)
    assert books[0].leased("n1", "cpu") == 4 * GIB


def test_bad_lease_requests(store_url):
    manager = ResourceManager("n1", fake_probe, Store(store_url))
    with pytest.raises(InvalidArgument):
        manager.acquire("w/a", "", "", 0)
    with pytest.raises(InvalidArgument):
        manager.acquire("", "", "", 1)
    with pytest.raises(NotFound):
        manager.acquire("w/a", "", "cuda:7", 1)
    with pytest.raises(NotFound):
        manager.acquire("w/a", "elsewhere", "cpu", 1)


def test_the_real_probe_reports_this_hosts_memory():
    cpu = probe_devices()[0]
    assert cpu.name == "cpu" and cpu.total_bytes > 0 and 0 <= cpu.used_bytes <= cpu.total_bytes


def test_leases_with_a_ttl_are_reclaimed_unless_renewed(store_url):
    clock = FakeClock(1000.0)
    book = book_of(store_url, clock)
    kept = book.acquire("worker/w_1/model/a", "n1", "cpu", GIB, ttl=10)
    lost = book.acquire("worker/w2/model/b", "n1", "cpu", GIB, ttl=10)
    forever = book.acquire("admin", "n1", "cpu", GIB)
    clock.now += 8
    assert book.renew("worker/w_1/") == 1
    assert book.renew("worker/w%") == 0, "the prefix is literal, not a pattern"
    clock.now += 5
    assert [lease.name for lease in book.reap()] == [lost.name]
    assert {lease.name for lease in book.list()} == {kept.name, forever.name}
    assert book.leased("n1", "cpu") == 2 * GIB
    clock.now += 100
    assert [lease.name for lease in book.reap()] == [kept.name]
    assert [lease.name for lease in book.list()] == [forever.name]
    assert book.reclaimed_total == 2


def test_expired_leases_do_not_block_new_ones(store_url):
    clock = FakeClock(1000.0)
    book = book_of(store_url, clock, budget=2 * GIB)
    dead = book.acquire("worker/dead/", "n1", "cpu", 2 * GIB, ttl=5)
    clock.now += 6
    alive = book.acquire("worker/alive/", "n1", "cpu", 2 * GIB, ttl=5)   # reclaims the dead one first
    assert book.leased("n1", "cpu") == 2 * GIB
    assert [lease.name for lease in book.list()] == [alive.name] and book.reclaimed_total == 1
    # Gone for good: no late renewal or reclaimer's grace brings it back over the budget.
    assert book.renew("worker/dead/") == 0
    book.grant_grace()
    assert book.leased("n1", "cpu") == 2 * GIB and dead.name not in {lease.name for lease in book.list()}


def test_memory_in_use_beyond_the_leases_is_reported_until_its_holder_goes_quiet(store_url):
    now = [0.0]
    manager = ResourceManager("n1", fake_probe, Store(store_url), clock=lambda: now[0], report_ttl=60)
    manager.acquire("worker/w1/model/a", "", "", GIB, ttl=30)
    manager.heartbeat("worker/w1/", in_use_bytes=GIB + 100, device="cpu")
    manager.heartbeat("worker/w2/", in_use_bytes=50, device="cpu")       # holds no lease at all
    manager.heartbeat("worker/w3/", in_use_bytes=GIB // 2, device="cpu")  # no lease either
    assert manager.nodes()[0].devices[0].unexplained_bytes == 100 + 50 + GIB // 2
    manager.heartbeat("worker/w1/", in_use_bytes=GIB // 2, device="cpu")  # within its lease now
    assert manager.unexplained("cpu") == 50 + GIB // 2
    now[0] = 61
    assert manager.unexplained("cpu") == 0


def test_a_lease_that_ran_out_while_nobody_reclaimed_gets_one_ttl_more(store_url):
    """Its holder could not renew while the resource manager was down: the replica that takes
    up reclaiming gives every lease one TTL first."""
    clock = FakeClock(1000.0)
    book = book_of(store_url, clock)
    lease = book.acquire("worker/w1/model/a", "n1", "cpu", GIB, ttl=3)
    book.close()
    clock.now += 10                                     # down for more than the TTL
    book = LeaseBook(Store(store_url), clock)
    assert book.grant_grace() == 1
    assert book.reap() == [] and [held.name for held in book.list()] == [lease.name]
    clock.now += 2
    assert book.renew("worker/w1/") == 1                # the holder is back in time
    clock.now += 2.5
    assert book.reap() == []
    clock.now += 1                                      # ... and then goes quiet
    assert [gone.name for gone in book.reap()] == [lease.name]


def test_one_replica_leads_at_a_time_and_another_takes_over_when_it_stops(store_url):
    store = Store(store_url)
    a, b = Leadership(store, "resources.reaper", "a", ttl=30), Leadership(Store(store_url), "resources.reaper", "b", 30)
    assert a.check() == (True, True) and b.check() == (False, False)
    assert a.check() == (True, False), "the leader keeps its lead"
    a.resign()
    assert b.check() == (True, True)
    assert a.check() == (False, False)
    # A leader that stops renewing loses the lead once its TTL has passed.
    assert store.lead("resources.reaper", "a", 30, now=10**10)


def test_a_store_outage_loses_the_lead_and_taking_it_again_says_so():
    """So the reclaimer gives every lease its grace again: holders could not renew either."""
    from llmos.common.errors import Unavailable

    class FlakyStore:
        down = False

        def lead(self, name, holder, ttl):
            if self.down:
                raise Unavailable("the store cannot be reached", reason="STORE_UNAVAILABLE")
            return True

    store = FlakyStore()
    leader = Leadership(store, "resources.reaper", "a", ttl=10)
    assert leader.check() == (True, True) and leader.check() == (True, False)
    store.down = True
    assert leader.check() == (False, False)
    store.down = False
    assert leader.check() == (True, True)
