"""The monitor's loop: checks the cluster on a period, turns what changed into events
(health changes, alerts firing and resolving, model lifecycle from the registry) for
every `Watch`, and keeps the figures its metrics endpoint serves."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmos.common.broadcast import Broadcast

from .alerts import FIRING, Alert, AlertRules, Observations
from .gather import Gatherer, ttft_counts
from .health import MONITOR, SERVING, STALLED, ClusterHealth, ComponentHealth, ComponentState, HealthMonitor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthEvent:
    previous: ComponentState | None   # None when first seen
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


@dataclass(frozen=True)
class RestartEvent:
    component: str
    previous_start: float
    start: float
    restarts: int
    time: float = field(default_factory=time.time)


Event = HealthEvent | AlertEvent | ModelEvent | RestartEvent


def start_times(families) -> dict[str, float]:
    """Component → when its process started (`process_start_time_seconds`)."""
    for family in families:
        if family.name == "process_start_time_seconds":
            return {s.labels["component"]: s.value for s in family.samples if "component" in s.labels}
    return {}


class ClusterWatch:
    def __init__(self, monitor: HealthMonitor, rules: AlertRules, interval: float = 1.0,
                 scrape_interval: float = 5.0, scrape_timeout: float = 0.5) -> None:
        self.monitor = monitor
        self.rules = rules
        self.interval = interval
        self.scrape_interval = scrape_interval
        self.events: Broadcast[Event] = Broadcast()
        self.gatherer = Gatherer(self.metrics_targets, scrape_timeout)
        # The latest check, the alerts firing after it and the last probe; replaced whole
        # (the metrics thread reads them).
        self.health: ClusterHealth | None = None
        self.alerts: tuple[Alert, ...] = ()
        self.probe: ProbeResult | None = None
        self._probes: deque[bool] = deque(maxlen=10)
        # Component → its process's start time as last seen, and how often it moved on.
        self._starts: dict[str, float] = {}
        self.restarts: dict[str, int] = {}
        self._lock = asyncio.Lock()

    def metrics_targets(self) -> dict[str, str]:
        """Every component's metrics address but the monitor's own: the configured services,
        and the workers as the registry last listed them. Called from the scrape thread."""
        targets = {name: address for name, address in self.monitor.metrics_addresses().items() if name != MONITOR}
        health = self.health
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
            try:
                families = await gathering
            except Exception:  # noqa: BLE001 - the rules run on what there is
                log.exception("cannot gather the metrics")
                families = []
            health = self._note_restarts(health, start_times(families))
            last = {c.component: c for c in self.health.components} if self.health else {}
            for c in health.components:
                before = last.get(c.component)
                if before is None or before.state != c.state:
                    self.events.emit(HealthEvent(before.state if before else None, c))
                    if before is not None:
                        log.warning("%s: %s → %s %s", c.component, before.state, c.state, c.detail)
            self.health = health
            counts = ttft_counts(families, self.rules.settings.ttft_slo)
            seen = Observations(*(counts or (None, None)), tuple(self._probes))
            for alert in self.rules.evaluate(health, seen):
                (log.warning if alert.state == FIRING else log.info)("alert %s %s: %s", alert.name, alert.state,
                                                                      alert.summary)
                self.events.emit(AlertEvent(alert))
            self.alerts = tuple(self.rules.firing.values())
            return health

    def _note_restarts(self, health: ClusterHealth, starts: dict[str, float]) -> ClusterHealth:
        """Counts and announces each component whose process start time moved on, and gives
        every component its start time and restart count."""
        for component, start in starts.items():
            before = self._starts.get(component)
            if before is not None and start > before + 0.5:
                self.restarts[component] = self.restarts.get(component, 0) + 1
                log.warning("%s restarted (its process started %.0f s after the one before)", component,
                            start - before)
                self.events.emit(RestartEvent(component, before, start, self.restarts[component]))
            self._starts[component] = max(start, before or 0.0)
        components = [dataclasses.replace(c, start_time=self._starts.get(c.component),
                                          restarts=self.restarts.get(c.component, 0)) for c in health.components]
        return dataclasses.replace(health, components=components)

    def current(self) -> list[Event]:
        """The state a new watcher starts from: every component, every firing alert."""
        return [*(HealthEvent("", c) for c in (self.health.components if self.health else ())),
                *(AlertEvent(a) for a in self.alerts)]

    def record_probe(self, result: ProbeResult) -> None:
        self.probe = result
        self._probes.append(result.ok)

    def model_event(self, event: ModelEvent) -> None:
        self.events.emit(event)

    async def run(self, address: str = "") -> None:
        while True:
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("cluster check failed")
            await asyncio.sleep(self.interval)


class ClusterGauges(Collector):
    """The monitor's own figures, from the watch's latest check, alerts and probe."""

    def __init__(self, watch: ClusterWatch) -> None:
        self._watch = watch

    def collect(self):
        health, alerts, probe = self._watch.health, self._watch.alerts, self._watch.probe
        healthy = GaugeMetricFamily("llmos_component_healthy", "1 when the component serves and makes "
                                    "progress, 0 otherwise.", labels=["component"])
        stalled = GaugeMetricFamily("llmos_worker_stalled", "1 when a worker has running generations and "
                                    "produced no token for the stall time.", labels=["component"])
        running = GaugeMetricFamily("llmos_worker_running_requests", "Generations running on a worker, as "
                                    "the monitor last saw.", labels=["component"])
        cluster = GaugeMetricFamily("llmos_cluster_healthy", "1 when every component is healthy.")
        if health is not None:
            cluster.add_metric([], 1 if health.healthy else 0)
            for c in health.components:
                healthy.add_metric([c.component], 1 if c.state == SERVING else 0)
                if c.component.startswith("worker/"):
                    stalled.add_metric([c.component], 1 if c.state == STALLED else 0)
                    running.add_metric([c.component], c.running)
        firing = GaugeMetricFamily("llmos_alerts_firing", "Alerts the monitor's rules fire now.",
                                   labels=["alertname", "severity", "subject"])
        for alert in alerts:
            firing.add_metric([alert.name, alert.severity, alert.subject], 1)
        ok = GaugeMetricFamily("llmos_probe_success", "1 when the last synthetic Generate probe got a token "
                               "(no sample before the first probe).")
        seconds = GaugeMetricFamily("llmos_probe_duration_seconds", "How long the last probe took.")
        if probe is not None:
            ok.add_metric([], 1 if probe.ok else 0)
            seconds.add_metric([], probe.seconds)
        yield from (healthy, stalled, running, cluster, firing, ok, seconds)


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
