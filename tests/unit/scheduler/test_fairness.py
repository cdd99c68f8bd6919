"""The queue order alone: bands, tenant fairness, deadlines, aging; the clock is a number."""

from collections import Counter

from llmos.scheduler.fairness import FairQueue, Waiting


def drain(queue, now=0.0):
    out = []
    while (item := queue.pop(now)) is not None:
        out.append(item.request_id)
    return out


def test_higher_bands_first_then_arrival_order():
    q = FairQueue()
    for rid, band in [("low1", 0), ("high", 5), ("low2", 0), ("mid", 2)]:
        q.push(Waiting(rid, "t", band, 10, arrival=0.0))
    assert drain(q) == ["high", "mid", "low1", "low2"]


def test_tenants_share_a_band_by_tokens_whatever_their_request_counts():
    q = FairQueue()
    for i in range(100):
        q.push(Waiting(f"a{i}", "a", 0, 100, arrival=0.0))
    for i in range(10):
        q.push(Waiting(f"b{i}", "b", 0, 100, arrival=0.0))
    first = drain(q)[:20]
    assert Counter(r[0] for r in first) == {"a": 10, "b": 10}


def test_weights_split_the_tokens():
    q = FairQueue(weight=lambda tenant: 3.0 if tenant == "gold" else 1.0)
    for i in range(40):
        q.push(Waiting(f"g{i}", "gold", 0, 10, arrival=0.0))
        q.push(Waiting(f"s{i}", "silver", 0, 10, arrival=0.0))
    first = drain(q)[:40]
    assert Counter(r[0] for r in first) == {"g": 30, "s": 10}


def test_cost_in_tokens_not_requests():
    q = FairQueue()
    for i in range(30):
        q.push(Waiting(f"big{i}", "big", 0, 300, arrival=0.0))
        q.push(Waiting(f"small{i}", "small", 0, 100, arrival=0.0))
    first = drain(q)[:20]
    counts = Counter(r.rstrip("0123456789") for r in first)
    assert counts == {"small": 15, "big": 5}


def test_a_correction_after_the_fact_moves_the_share():
    q = FairQueue()
    for i in range(10):
        q.push(Waiting(f"a{i}", "a", 0, 100, arrival=0.0))
        q.push(Waiting(f"b{i}", "b", 0, 100, arrival=0.0))
    assert {q.pop(0).request_id, q.pop(0).request_id} == {"a0", "b0"}
    q.charge("a", 0, 400)             # a's first request really cost 500 tokens
    assert [q.pop(0).request_id for _ in range(4)] == ["b1", "b2", "b3", "b4"]


def test_an_idle_tenant_banks_no_credit():
    q = FairQueue()
    for i in range(50):
        q.push(Waiting(f"a{i}", "a", 0, 100, arrival=0.0))
    for _ in range(40):
        q.pop(0)
    for i in range(5):
        q.push(Waiting(f"b{i}", "b", 0, 100, arrival=0.0))
    # b arrives late: it gets its share from now on, not the 40 requests it "missed".
    assert Counter(r[0] for r in drain(q)[:10]) == {"a": 5, "b": 5}


def test_earliest_deadline_first_within_a_tenant():
    q = FairQueue()
    q.push(Waiting("none", "t", 0, 10, arrival=0.0))
    q.push(Waiting("late", "t", 0, 10, arrival=1.0, deadline=50.0))
    q.push(Waiting("soon", "t", 0, 10, arrival=2.0, deadline=10.0))
    assert drain(q) == ["soon", "late", "none"]


def test_aging_lifts_a_starved_band_but_not_a_fresh_one():
    q = FairQueue(aging_seconds=10.0)
    q.push(Waiting("old-low", "t", 0, 10, arrival=0.0))
    q.push(Waiting("high", "u", 2, 10, arrival=14.0))
    assert q.pop(now=15.0).request_id == "high"        # low stands at 0 + 1.5, high at 2 + 0.1
    q.push(Waiting("high2", "u", 2, 10, arrival=25.0))
    assert q.pop(now=25.0).request_id == "old-low"     # 0 + 2.5 > 2 + 0
    q2 = FairQueue(aging_seconds=10.0)
    q2.push(Waiting("low", "t", 0, 10, arrival=0.0))
    q2.push(Waiting("high", "u", 2, 10, arrival=0.0))
    assert q2.pop(now=5.0).request_id == "high"


def test_removed_requests_are_skipped_and_counted_out():
    q = FairQueue()
    items = [Waiting(f"r{i}", "t", 0, 10, arrival=float(i)) for i in range(4)]
    for item in items:
        q.push(item)
    assert q.remove(items[0]) and q.remove(items[2]) and not q.remove(items[2])
    assert len(q) == 2 and q.depths() == {(0, "t"): 2}
    assert list(q.order(0.0)) == ["r1", "r3"] and len(q) == 2      # order() leaves the queue as it is
    assert drain(q) == ["r1", "r3"] and len(q) == 0
