"""Per-tenant quotas with a fake clock: reserved at admission, refunded at the end, never passed."""

import random

import pytest

from llmos.common.keystore import Quota
from llmos.scheduler.quotas import WINDOW, QuotaBook, QuotaExceeded
from tests.support.clock import FakeClock


def test_tokens_are_reserved_and_the_unused_part_refunded_at_once():
    clock = FakeClock()
    book = QuotaBook(clock)
    quota = Quota(tokens_per_minute=1000)
    book.reserve("a", quota, "r1", 600)
    with pytest.raises(QuotaExceeded) as caught:
        book.reserve("a", quota, "r2", 600)
    assert caught.value.reason == "QUOTA_EXCEEDED"
    assert caught.value.metadata["limit"] == "tokens_per_minute" and caught.value.metadata["value"] == "1000"
    book.settle("a", "r1", 100)        # cancelled after 100 tokens: 500 come back now
    book.reserve("a", quota, "r2", 600)
    assert book.usage("a") == (1, 2, 700)


def test_the_retry_delay_is_when_enough_charges_leave_the_window():
    clock = FakeClock()
    book = QuotaBook(clock)
    quota = Quota(tokens_per_minute=1000)
    book.reserve("a", quota, "r1", 400)
    clock.now = 5.0
    book.settle("a", "r1", 400)        # counted until 5 + 60
    clock.now = 10.0
    book.reserve("a", quota, "r2", 500)
    clock.now = 12.0
    book.settle("a", "r2", 500)        # counted until 12 + 60
    clock.now = 20.0
    with pytest.raises(QuotaExceeded) as caught:
        book.reserve("a", quota, "r3", 300)     # 900 counted: fits once r1's 400 leave, at 65
    assert caught.value.retry_after == pytest.approx(45.0)
    clock.now = 65.0
    book.reserve("a", quota, "r3", 300)


def test_a_running_request_counts_until_a_window_after_its_end():
    clock = FakeClock()
    book = QuotaBook(clock)
    quota = Quota(tokens_per_minute=100)
    book.reserve("a", quota, "long", 100)
    clock.now = 500.0                   # still running: nothing expires
    with pytest.raises(QuotaExceeded):
        book.reserve("a", quota, "next", 1)
    book.settle("a", "long", 100)
    clock.now = 500.0 + WINDOW - 0.001
    with pytest.raises(QuotaExceeded):
        book.reserve("a", quota, "next", 1)
    clock.now = 500.0 + WINDOW
    book.reserve("a", quota, "next", 1)


def test_concurrency_and_requests_per_minute():
    clock = FakeClock()
    book = QuotaBook(clock)
    book.reserve("a", Quota(max_concurrent=2), "1", 10)
    book.reserve("a", Quota(max_concurrent=2), "2", 10)
    with pytest.raises(QuotaExceeded) as caught:
        book.reserve("a", Quota(max_concurrent=2), "3", 10)
    assert caught.value.metadata["limit"] == "max_concurrent_requests" and caught.value.retry_after > 0
    book.release("a", "1")              # refused in the queue: nothing charged
    book.reserve("a", Quota(max_concurrent=2), "3", 10)
    rpm = Quota(requests_per_minute=3)
    for i in range(3):
        book.reserve("b", rpm, f"b{i}", 1)
        clock.now += 1
        book.settle("b", f"b{i}", 1)
    with pytest.raises(QuotaExceeded) as caught:
        book.reserve("b", rpm, "b3", 1)
    assert caught.value.retry_after == pytest.approx(1 + WINDOW - clock.now)
    assert book.rejected == {("a", "max_concurrent_requests"): 1, ("b", "requests_per_minute"): 1}


def test_tenants_without_quota_are_not_tracked_and_other_tenants_are_apart():
    book = QuotaBook(FakeClock())
    for i in range(100):
        book.reserve("free", Quota(), f"f{i}", 10**6)
    assert book.usage("free") == (0, 0, 0)
    book.reserve("a", Quota(tokens_per_minute=10), "a1", 10)
    book.reserve("b", Quota(tokens_per_minute=10), "b1", 10)


def test_a_random_flood_never_serves_more_than_the_limit_in_any_window():
    """Requests of random size arrive, run and end (some cut short); the tokens they serve,
    spread over their run, never pass the limit in any 60 s window."""
    rng, clock = random.Random(7), FakeClock()
    book, limit = QuotaBook(clock), 2000
    running: dict[str, tuple[float, float, int]] = {}       # id → (start, end, tokens it will use)
    served: list[tuple[float, float, int]] = []
    for i in range(3000):
        clock.now += rng.uniform(0, 1.0)
        for rid, (start, end, used) in list(running.items()):
            if end <= clock.now:
                book.settle("a", rid, used)
                served.append((start, end, used))
                del running[rid]
        reserve = rng.randint(10, 400)
        try:
            book.reserve("a", Quota(tokens_per_minute=limit), f"r{i}", reserve)
        except QuotaExceeded:
            continue
        used = reserve if rng.random() < 0.7 else rng.randint(0, reserve)    # cancelled mid-stream
        running[f"r{i}"] = (clock.now, clock.now + rng.uniform(0.1, 20), used)
    for a in range(0, int(clock.now), 5):
        # Tokens of a request are served between its start and end; count the whole request in
        # any window it overlaps (the worst case).
        total = sum(used for start, end, used in served if end >= a and start <= a + WINDOW)
        assert total <= limit, (a, total)
