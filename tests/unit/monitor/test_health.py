from llmos.monitor.health import NOT_SERVING, SERVING, UNREACHABLE, HealthMonitor, QueueDepth


class FakeProbe:
    def __init__(self, states, workers=None, fail_workers=False, queues=None):
        self.states = states
        self._workers = workers or []
        self.fail_workers = fail_workers
        self._queues = queues

    async def check(self, address):
        return self.states.get(address, (UNREACHABLE, "no answer"))

    async def workers(self):
        if self.fail_workers:
            raise ConnectionError("registry down")
        return self._workers

    async def queues(self):
        if self._queues is None:
            raise ConnectionError("scheduler down")
        return self._queues


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
