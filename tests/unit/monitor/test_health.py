from llmos.common.domain import QueueDepth
from llmos.monitor.health import (
    NOT_SERVING,
    SERVING,
    STALLED,
    UNREACHABLE,
    HealthMonitor,
    SchedulerView,
    WorkerInfo,
    WorkerReport,
)
from tests.support.clock import FakeClock


class FakeProbe:
    def __init__(self, states, workers=None, fail_workers=False, queues=None, reports=None, running=None):
        self.states = states
        self._workers = [WorkerInfo(wid, address) for wid, address in workers or []]
        self.fail_workers = fail_workers
        self._queues = queues
        self.reports = reports or {}
        self.running = running or {}

    async def check(self, address):
        return self.states.get(address, (UNREACHABLE, "no answer"))

    async def workers(self):
        if self.fail_workers:
            raise ConnectionError("registry down")
        return self._workers

    async def worker_status(self, address):
        if address not in self.reports:
            raise ConnectionError("no answer")
        return self.reports[address]

    async def scheduler(self):
        if self._queues is None:
            raise ConnectionError("scheduler down")
        return SchedulerView(self._queues, self.running)

    async def leases(self):
        return []


async def test_all_serving_is_healthy_with_workers_listed():
    probe = FakeProbe({"g": (SERVING, ""), "w": (SERVING, "")}, workers=[("w1", "w")])
    health = await HealthMonitor(probe, {"gateway": "g"}).cluster_health()
    assert health.healthy
    assert [(c.component, c.state) for c in health.components] == [("gateway", SERVING), ("worker/w1", SERVING)]


async def test_one_unreachable_or_draining_component_makes_the_cluster_unhealthy():
    probe = FakeProbe({"g": (SERVING, ""), "s": (NOT_SERVING, "NOT_SERVING")})
    health = await HealthMonitor(probe, {"gateway": "g", "scheduler": "s", "registry": "r"}).cluster_health()
    assert not health.healthy
    assert [c.state for c in health.components] == [SERVING, NOT_SERVING, UNREACHABLE]


async def test_a_registry_that_cannot_list_workers_is_reported():
    probe = FakeProbe({"g": (SERVING, "")}, fail_workers=True)
    health = await HealthMonitor(probe, {"gateway": "g"}).cluster_health()
    assert not health.healthy
    assert health.components[-1].component == "workers"
    assert "ConnectionError" in health.components[-1].detail


async def test_the_schedulers_queue_depths_come_with_the_health():
    depths = [QueueDepth("tiny:latest", 0, "a", 5), QueueDepth("tiny:latest", 3, "b", 1)]
    health = await HealthMonitor(FakeProbe({"g": (SERVING, "")}, queues=depths), {"gateway": "g"}).cluster_health()
    assert health.queues == depths
    health = await HealthMonitor(FakeProbe({"g": (SERVING, "")}), {"gateway": "g"}).cluster_health()
    assert health.queues == [] and health.healthy      # a silent scheduler shows in its own check


async def test_a_serving_worker_with_running_requests_and_no_new_token_is_stalled():
    clock = FakeClock(100.0)
    probe = FakeProbe({"w": (SERVING, "")}, workers=[("w1", "w")], reports={"w": WorkerReport(2, 10)})
    monitor = HealthMonitor(probe, {}, stall_seconds=5.0, clock=clock)
    assert (await monitor.cluster_health()).healthy
    clock.now += 3
    probe.reports["w"] = WorkerReport(2, 14)         # progress: the stall clock restarts
    assert (await monitor.cluster_health()).healthy
    clock.now += 4.9
    assert (await monitor.cluster_health()).healthy
    clock.now += 0.2                                 # 5.1 s without a token, 2 running
    health = await monitor.cluster_health()
    worker = health.components[-1]
    assert not health.healthy and worker.state == STALLED and worker.running == 2
    assert "no token for 5.1s" in worker.detail
    probe.reports["w"] = WorkerReport(2, 15)
    assert (await monitor.cluster_health()).healthy


async def test_an_idle_worker_is_never_stalled():
    clock = FakeClock(100.0)
    probe = FakeProbe({"w": (SERVING, "")}, workers=[("w1", "w")], reports={"w": WorkerReport(0, 10)})
    monitor = HealthMonitor(probe, {}, stall_seconds=5.0, clock=clock)
    for _ in range(3):
        clock.now += 60
        assert (await monitor.cluster_health()).healthy


async def test_a_frozen_worker_is_judged_by_the_schedulers_count_of_its_requests():
    clock = FakeClock(100.0)
    probe = FakeProbe({"w": (SERVING, "")}, workers=[("w1", "w")], reports={"w": WorkerReport(3, 50)},
                      queues=[], running={"w1": 3})
    monitor = HealthMonitor(probe, {}, stall_seconds=5.0, clock=clock)
    await monitor.cluster_health()
    probe.states["w"] = (UNREACHABLE, "health check failed: DEADLINE_EXCEEDED")
    del probe.reports["w"]
    clock.now += 2
    assert (await monitor.cluster_health()).components[-1].state == UNREACHABLE
    clock.now += 3.5
    worker = (await monitor.cluster_health()).components[-1]
    assert worker.state == STALLED and worker.running == 3
    assert "DEADLINE_EXCEEDED" in worker.detail


async def test_a_component_whose_process_started_again_is_counted_and_announced():
    """The monitor reads each component's `process_start_time_seconds`: when it moves on, the
    component runs as a new process (restarted by `llmos up`, a kubelet, an operator)."""
    from prometheus_client.core import GaugeMetricFamily

    from llmos.monitor.alerts import AlertRules, AlertSettings
    from llmos.monitor.cluster import ClusterWatch, RestartEvent

    def families(**starts):
        family = GaugeMetricFamily("process_start_time_seconds", "start", labels=["component"])
        for component, start in starts.items():
            family.add_metric([component.replace("_", "/")], start)
        return [family]

    watch = ClusterWatch(HealthMonitor(FakeProbe({"r": (SERVING, ""), "s": (SERVING, "")}),
                                       {"registry": "r", "scheduler": "s"}), AlertRules(AlertSettings()))
    emitted = []
    watch.events.emit = emitted.append
    health = await watch.monitor.cluster_health()
    first = watch._note_restarts(health, {"registry": 1000.0, "scheduler": 1000.0})
    assert [(c.component, c.start_time, c.restarts) for c in first.components] == [
        ("registry", 1000.0, 0), ("scheduler", 1000.0, 0)]
    assert emitted == []
    again = watch._note_restarts(health, {"registry": 1000.0, "scheduler": 1030.0})
    assert [(e.component, e.previous_start, e.start, e.restarts) for e in emitted
            if isinstance(e, RestartEvent)] == [("scheduler", 1000.0, 1030.0, 1)]
    assert {c.component: c.restarts for c in again.components} == {"registry": 0, "scheduler": 1}
    # A scrape that misses it, then one from a stale cache: no new restart.
    watch._note_restarts(health, {"registry": 1000.0})
    watch._note_restarts(health, {"registry": 1000.0, "scheduler": 1000.0})
    assert len(emitted) == 1
    from llmos.monitor.cluster import start_times

    assert start_times(families(registry=5.0, worker_w1=6.0)) == {"registry": 5.0, "worker/w1": 6.0}
