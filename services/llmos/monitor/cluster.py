"""The monitor's loop: checks the cluster on a period, turns what changed into events
(health changes, alerts firing and resolving, model lifecycle from the registry) for
every `Watch`, and keeps the figures its metrics endpoint serves."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from llmos.common.broadcast import Broadcast

from .alerts import FIRING, Alert, AlertRules, Observations
from .gather import ClusterGauges, Gatherer, ttft_counts
from .health import ClusterHealth, ComponentHealth, HealthMonitor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthEvent:
    previous: str           # "" when first seen
    health: ComponentHealth
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class AlertEvent:
    alert: Alert
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ModelEvent:
    model: str
    kind: str
    worker_id: str
    reason: str
    time: float


@dataclass(frozen=True)
class ProbeResult:
    model: str
    ok: bool
    detail: str
    seconds: float
    time: float


Event = HealthEvent | AlertEvent | ModelEvent


class ClusterWatch:
    def __init__(self, monitor: HealthMonitor, rules: AlertRules, gatherer: Gatherer, gauges: ClusterGauges,
                 service_metrics: dict[str, str], interval: float = 1.0, scrape_interval: float = 5.0) -> None:
        self.monitor = monitor
        self.rules = rules
        self.gatherer = gatherer
        self.gauges = gauges
        self.interval = interval
        self.scrape_interval = scrape_interval
        self.events: Broadcast[Event] = Broadcast()
        self.probe: ProbeResult | None = None
        self._probes: deque[bool] = deque(maxlen=10)
        self._service_metrics = dict(service_metrics)
        self._last: dict[str, ComponentHealth] = {}
        self._health: ClusterHealth | None = None
        self._lock = asyncio.Lock()

    def metrics_targets(self) -> dict[str, str]:
        """Every component's metrics address: the configured services, and the workers as
        the registry last listed them. Called from the scrape thread."""
        targets = dict(self._service_metrics)
        health = self._health
        for worker in health.workers if health else ():
            if worker.metrics_address:
                targets[f"worker/{worker.worker_id}"] = worker.metrics_address
        return targets

    async def check(self) -> ClusterHealth:
        """Checks everything now; emits what changed; returns the health."""
        async with self._lock:
            # The metrics are read (when due) beside the checks, not after them: a frozen
            # worker costs each of them a timeout, and the two should not add up.
            gathering = asyncio.ensure_future(asyncio.to_thread(self.gatherer.families, self.scrape_interval))
            health = await self.monitor.cluster_health()
            for c in health.components:
                before = self._last.get(c.component)
                if before is None or before.state != c.state:
                    self.events.emit(HealthEvent(before.state if before else "", c))
                    if before is not None:
                        log.warning("%s: %s → %s %s", c.component, before.state, c.state, c.detail)
            self._last = {c.component: c for c in health.components}
            self._health = health
            try:
                families = await gathering
            except Exception:  # noqa: BLE001 - the rules run on what there is
                log.exception("cannot gather the metrics")
                families = []
            counts = ttft_counts(families, self.rules.settings.ttft_slo)
            seen = Observations(*(counts or (None, None)), tuple(self._probes))
            for alert in self.rules.evaluate(health, seen):
                (log.warning if alert.state == FIRING else log.info)("alert %s %s: %s", alert.name, alert.state,
                                                                      alert.summary)
                self.events.emit(AlertEvent(alert))
            self.gauges.health, self.gauges.alerts = health, list(self.rules.firing.values())
            return health

    def current(self) -> list[Event]:
        """The state a new watcher starts from: every component, every firing alert."""
        return [*(HealthEvent("", c) for c in self._last.values()),
                *(AlertEvent(a) for a in self.rules.firing.values())]

    def record_probe(self, result: ProbeResult) -> None:
        self.probe = result
        self._probes.append(result.ok)
        self.gauges.probe = (result.ok, result.seconds)

    def model_event(self, event: ModelEvent) -> None:
        self.events.emit(event)

    async def run(self, address: str = "") -> None:
        while True:
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("cluster check failed")
            await asyncio.sleep(self.interval)


async def probe_loop(watch: ClusterWatch, probe: Callable[[], Awaitable[ProbeResult | None]],
                     interval: float) -> None:
    """Runs the synthetic probe every `interval` seconds (None: nothing to probe yet)."""
    while True:
        try:
            result = await probe()
        except Exception:  # noqa: BLE001 - a probe that cannot run is reported by its next try
            log.exception("synthetic probe failed to run")
            result = None
        if result is not None:
            watch.record_probe(result)
            if not result.ok:
                log.warning("synthetic probe of %s failed: %s", result.model, result.detail)
        await asyncio.sleep(interval)
