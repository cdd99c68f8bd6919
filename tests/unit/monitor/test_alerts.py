from llmos.common.domain import QueueDepth
from llmos.monitor.alerts import FIRING, RESOLVED, AlertRules, AlertSettings, Observations
from llmos.monitor.health import (
    SERVING,
    STALLED,
    UNREACHABLE,
    ClusterHealth,
    ComponentHealth,
    Lease,
    WorkerInfo,
)
from tests.support.clock import FakeClock


def health(components=(), queues=(), kv=None, leases=None, workers=()):
    components = list(components) or [ComponentHealth("gateway", "g", SERVING)]
    return ClusterHealth(all(c.state == SERVING for c in components), components, 0.0, list(queues),
                         kv or {}, leases, list(workers))


def names(alerts):
    return [(a.name, a.state, a.subject) for a in alerts]


def test_a_stalled_worker_fires_worker_stuck_and_resolves_when_it_moves_again():
    rules = AlertRules(clock=FakeClock())
    stuck = health([ComponentHealth("worker/w1", "w", STALLED, "2 running, no token for 5.0s")])
    assert names(rules.evaluate(stuck)) == [("WorkerStuck", FIRING, "worker/w1")]
    assert rules.evaluate(stuck) == []                # fires once
    assert names(rules.evaluate(health([ComponentHealth("worker/w1", "w", SERVING)]))) == [
        ("WorkerStuck", RESOLVED, "worker/w1")]


def test_a_component_unreachable_for_the_hold_time_fires_component_down():
    clock = FakeClock()
    rules = AlertRules(AlertSettings(down_hold=5.0), clock)
    down = health([ComponentHealth("scheduler", "s", UNREACHABLE, "DEADLINE_EXCEEDED")])
    assert rules.evaluate(down) == []
    clock.now = 3
    assert rules.evaluate(health()) == []          # back within the hold: a blink, no alert
    clock.now = 4
    assert rules.evaluate(down) == []
    clock.now = 9
    changes = rules.evaluate(down)
    assert names(changes) == [("ComponentDown", FIRING, "scheduler")]
    assert "DEADLINE_EXCEEDED" in changes[0].summary


def test_queue_growing_needs_depth_and_growth_over_the_window():
    clock = FakeClock()
    rules = AlertRules(AlertSettings(queue_depth=10, queue_window=30.0), clock)

    def at(t, waiting):
        clock.now = t
        return names(rules.evaluate(health(queues=[QueueDepth("m", 0, "a", waiting)])))

    assert at(0, 5) == []
    assert at(15, 12) == []          # deep, but not for a whole window yet
    assert at(31, 20) == [("QueueGrowing", FIRING, "")]
    assert at(70, 20) == [("QueueGrowing", RESOLVED, "")]   # deep but steady
    assert at(120, 3) == []


def test_kv_saturation_must_hold():
    clock = FakeClock()
    rules = AlertRules(AlertSettings(kv_ratio=0.9, kv_hold=30.0), clock)
    full = health(kv={"w1": {"m:latest": (95, 100)}})
    assert rules.evaluate(full) == []
    clock.now = 29
    assert rules.evaluate(full) == []
    clock.now = 31
    assert names(rules.evaluate(full)) == [("KVCacheSaturated", FIRING, "worker/w1/m:latest")]
    clock.now = 32
    assert names(rules.evaluate(health(kv={"w1": {"m:latest": (10, 100)}}))) == [
        ("KVCacheSaturated", RESOLVED, "worker/w1/m:latest")]


def test_ttft_slo_burn_counts_only_the_window():
    clock = FakeClock()
    rules = AlertRules(AlertSettings(slo_target=0.99, burn_rate=10.0, slo_window=300.0, slo_min_requests=20), clock)
    assert rules.evaluate(health(), Observations(1000, 1000)) == []
    clock.now = 60
    assert rules.evaluate(health(), Observations(1100, 1095)) == []      # 5% slow: within 10x the budget
    clock.now = 120
    changes = rules.evaluate(health(), Observations(1200, 1150))         # 50 of 200 slow: 25%
    assert names(changes) == [("TTFTSLOBurn", FIRING, "")]
    assert "25% of 200 requests" in changes[0].summary
    clock.now = 500                                                      # the slow ones left the window
    assert names(rules.evaluate(health(), Observations(1400, 1350))) == [("TTFTSLOBurn", RESOLVED, "")]


def test_a_lease_of_a_gone_worker_or_an_unloaded_model_leaks_after_the_hold():
    clock = FakeClock()
    rules = AlertRules(AlertSettings(lease_hold=30.0), clock)
    leases = [Lease("worker/w1/model/m:latest", 2**30), Lease("worker/w2/model/m:latest", 2**30),
              Lease("worker/w1/model/n:latest", 2**20), Lease("someone/else", 1)]
    state = health([ComponentHealth("worker/w1", "w", SERVING)], kv={"w1": {"m:latest": (0, 100)}},
                   leases=leases, workers=[WorkerInfo("w1", "w")])
    assert rules.evaluate(state) == []
    clock.now = 31
    assert sorted(names(rules.evaluate(state))) == [("LeaseLeak", FIRING, "worker/w1/model/n:latest"),
                                                    ("LeaseLeak", FIRING, "worker/w2/model/m:latest")]


def test_probe_failing_after_two_failures():
    rules = AlertRules(clock=FakeClock())
    assert rules.evaluate(health(), Observations(probes=(True, False))) == []
    assert names(rules.evaluate(health(), Observations(probes=(True, False, False)))) == [
        ("ProbeFailing", FIRING, "")]
    assert names(rules.evaluate(health(), Observations(probes=(False, False, True)))) == [
        ("ProbeFailing", RESOLVED, "")]
