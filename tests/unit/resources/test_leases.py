import pytest

from llmos.common.errors import InvalidArgument, NotFound, ResourceExhausted
from llmos.resources.inventory import DeviceInfo, probe_devices
from llmos.resources.manager import ResourceManager
from tests.support.clock import FakeClock

GIB = 2**30


def fake_probe():
    return [DeviceInfo("cpu", "cpu", "test cpu", 10 * GIB, 1 * GIB, 2)]


def test_leases_stay_within_the_budget_and_name_the_sizes(tmp_path):
    manager = ResourceManager("n1", fake_probe, str(tmp_path / "r.db"), cpu_budget_bytes=4 * GIB)
    first = manager.acquire("w/a", "", "", 3 * GIB)
    with pytest.raises(ResourceExhausted) as caught:
        manager.acquire("w/b", "", "cpu", 2 * GIB)
    assert caught.value.reason == "DEVICE_MEMORY_EXHAUSTED"
    assert "2.00 GiB" in caught.value.message and "4.00 GiB" in caught.value.message
    assert manager.release(first.name) and not manager.release(first.name)
    manager.acquire("w/b", "", "cpu", 2 * GIB)
    device = manager.nodes()[0].devices[0]
    assert (device.leased_bytes, device.budget_bytes) == (2 * GIB, 4 * GIB)


def test_leases_survive_a_restart(tmp_path):
    manager = ResourceManager("n1", fake_probe, str(tmp_path / "r.db"))
    lease = manager.acquire("w/a", "", "", GIB)
    manager.close()
    again = ResourceManager("n1", fake_probe, str(tmp_path / "r.db"))
    assert [held.name for held in again.leases.list()] == [lease.name]
    assert again.nodes()[0].devices[0].leased_bytes == GIB
    assert again.nodes()[0].devices[0].budget_bytes == 9 * GIB


def test_bad_lease_requests(tmp_path):
    manager = ResourceManager("n1", fake_probe, str(tmp_path / "r.db"))
    with pytest.raises(InvalidArgument):
        manager.acquire("w/a", "", "", 0)
    with pytest.raises(InvalidArgument):
        manager.acquire("", "", "", 1)
    with pytest.raises(NotFound):
        manager.acquire("w/a", "", "cuda:7", 1)


def test_the_real_probe_reports_this_hosts_memory():
    cpu = probe_devices()[0]
    assert cpu.name == "cpu" and cpu.total_bytes > 0 and 0 <= cpu.used_bytes <= cpu.total_bytes


def test_leases_with_a_ttl_are_reclaimed_unless_renewed(tmp_path):
    from llmos.resources.leases import Budget, LeaseBook

    clock = FakeClock(1000.0)
    book = LeaseBook(str(tmp_path / "l.db"), lambda: [Budget("n1", "cpu", 10 * GIB)], clock)
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


def test_expired_leases_do_not_block_new_ones(tmp_path):
    from llmos.resources.leases import Budget, LeaseBook

    clock = FakeClock(1000.0)
    book = LeaseBook(str(tmp_path / "l.db"), lambda: [Budget("n1", "cpu", 2 * GIB)], clock)
    book.acquire("worker/dead/", "n1", "cpu", 2 * GIB, ttl=5)
    clock.now += 6
    alive = book.acquire("worker/alive/", "n1", "cpu", 2 * GIB, ttl=5)
    assert [lease.name for lease in book.list()] == [alive.name]
    assert book.leased("n1", "cpu") == 2 * GIB


def test_memory_in_use_beyond_the_leases_is_reported_until_its_holder_goes_quiet(tmp_path):
    now = [0.0]
    manager = ResourceManager("n1", fake_probe, str(tmp_path / "r.db"), clock=lambda: now[0], report_ttl=60)
    manager.acquire("worker/w1/model/a", "", "", GIB, ttl=30)
    manager.heartbeat("worker/w1/", in_use_bytes=GIB + 100, device="cpu")
    manager.heartbeat("worker/w2/", in_use_bytes=50, device="cpu")       # holds no lease at all
    manager.heartbeat("worker/w3/", in_use_bytes=GIB // 2, device="cpu")  # no lease either
    assert manager.nodes()[0].devices[0].unexplained_bytes == 100 + 50 + GIB // 2
    manager.heartbeat("worker/w1/", in_use_bytes=GIB // 2, device="cpu")  # within its lease now
    assert manager.unexplained("cpu") == 50 + GIB // 2
    now[0] = 61
    assert manager.unexplained("cpu") == 0


def test_a_lease_that_ran_out_while_no_book_was_open_gets_one_ttl_more(tmp_path):
    """Its holder could not renew while the resource manager was down."""
    from llmos.resources.leases import Budget, LeaseBook

    clock = FakeClock(1000.0)
    budgets = lambda: [Budget("n1", "cpu", 10 * GIB)]   # noqa: E731
    book = LeaseBook(str(tmp_path / "l.db"), budgets, clock)
    lease = book.acquire("worker/w1/model/a", "n1", "cpu", GIB, ttl=3)
    book.close()
    clock.now += 10                                     # down for more than the TTL
    book = LeaseBook(str(tmp_path / "l.db"), budgets, clock)
    assert book.reap() == [] and [held.name for held in book.list()] == [lease.name]
    clock.now += 2
    assert book.renew("worker/w1/") == 1                # the holder is back in time
    clock.now += 2.5
    assert book.reap() == []
    clock.now += 1                                      # ... and then goes quiet
    assert [gone.name for gone in book.reap()] == [lease.name]
