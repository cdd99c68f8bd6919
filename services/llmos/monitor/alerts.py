"""Alert rules, evaluated by the monitor after each check.

The same rules ship as Prometheus rule files (deploy/prometheus/rules.yml) under
the same names, for clusters that alert through Prometheus and Alertmanager.

- WorkerStuck (critical): a worker is STALLED (running generations, no token).
- ComponentDown (critical): a service or worker is unreachable or not serving for
  `down_hold` seconds (a restart's blink is a health change on Watch, not an alert).
- QueueGrowing (warning): at least `queue_depth` requests wait and more wait now
  than `queue_window` seconds ago.
- KVCacheSaturated (warning): a worker's KV cache for a model is at least
  `kv_ratio` full for `kv_hold` seconds.
- TTFTSLOBurn (warning): over the last `slo_window` seconds, the share of requests
  whose time to first token exceeded `ttft_slo` is more than `burn_rate` times
  the error budget (1 - `slo_target`), with at least `slo_min_requests` requests.
- LeaseLeak (warning): a worker's model lease for `lease_hold` seconds while that
  worker is gone or does not hold the model.
- ProbeFailing (critical): the last two synthetic probes failed.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from llmos.common.names import parse_model_lease_holder

from .health import SERVING, STALLED, UNREACHABLE, ClusterHealth


class Severity(enum.StrEnum):
    WARNING = "warning"
    CRITICAL = "critical"


class AlertState(enum.StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"


WARNING, CRITICAL = Severity
FIRING, RESOLVED = AlertState


@dataclass(frozen=True)
class Alert:
    name: str
    severity: Severity
    subject: str
    summary: str
    state: AlertState = FIRING
    since: float = 0.0          # Unix time it started firing


@dataclass(frozen=True)
class AlertSettings:
    down_hold: float = 5.0
    queue_depth: int = 16
    queue_window: float = 30.0
    kv_ratio: float = 0.95
    kv_hold: float = 30.0
    ttft_slo: float = 2.5
    slo_target: float = 0.99
    burn_rate: float = 10.0
    slo_window: float = 300.0
    slo_min_requests: int = 20
    lease_hold: float = 120.0


@dataclass(frozen=True)
class Observations:
    """What the rules read besides the health: the cluster's TTFT counts so far (all
    requests, and those within the SLO), and the last probes' outcomes."""

    ttft_total: float | None = None
    ttft_within_slo: float | None = None
    probes: tuple[bool, ...] = ()


@dataclass
class AlertRules:
    settings: AlertSettings = field(default_factory=AlertSettings)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.firing: dict[tuple[str, str], Alert] = {}
        self._pending: dict[tuple[str, str], float] = {}      # condition true since (monotonic)
        self._queue: deque[tuple[float, int]] = deque()
        self._ttft: deque[tuple[float, float, float]] = deque()

    def evaluate(self, health: ClusterHealth, seen: Observations = Observations()) -> list[Alert]:
        """Returns the alerts that started firing or resolved with this evaluation."""
        now = self.clock()
        conditions = [*self._components(health), *self._queue_growth(health, now), *self._kv(health),
                      *self._slo(seen, now), *self._leases(health), *self._probe(seen)]
        holding: dict[tuple[str, str], tuple[Alert, float]] = {}
        for alert, hold in conditions:
            holding[(alert.name, alert.subject)] = (alert, hold)
        changes = []
        for key, (alert, hold) in holding.items():
            since = self._pending.setdefault(key, now)
            if key not in self.firing and now - since >= hold:
                self.firing[key] = replace(alert, since=time.time())
                changes.append(self.firing[key])
        for key in [k for k in self._pending if k not in holding]:
            del self._pending[key]
        for key in [k for k in self.firing if k not in holding]:
            changes.append(replace(self.firing.pop(key), state=RESOLVED))
        return changes

    # ---- the rules: (alert, seconds the condition must hold) --------------------------------

    def _components(self, health: ClusterHealth):
        for c in health.components:
            if c.state == STALLED:
                yield Alert("WorkerStuck", CRITICAL, c.component, f"{c.component} is stuck: {c.detail}"), 0.0
            elif c.state != SERVING:
                yield Alert("ComponentDown", CRITICAL, c.component,
                            f"{c.component} is {c.state.replace('_', ' ')}: {c.detail}"), self.settings.down_hold

    def _queue_growth(self, health: ClusterHealth, now: float):
        s = self.settings
        waiting = sum(q.waiting for q in health.queues)
        self._queue.append((now, waiting))
        while len(self._queue) > 1 and now - self._queue[1][0] >= s.queue_window:
            self._queue.popleft()
        then, before = self._queue[0]
        if waiting >= s.queue_depth and now - then >= s.queue_window and waiting > before:
            yield Alert("QueueGrowing", WARNING, "", f"{waiting} requests wait, {before} did "
                        f"{now - then:.0f}s ago"), 0.0

    def _kv(self, health: ClusterHealth):
        for worker, models in health.kv.items():
            for model, (used, capacity) in models.items():
                if capacity and used / capacity >= self.settings.kv_ratio:
                    yield Alert("KVCacheSaturated", WARNING, f"worker/{worker}/{model}",
                                f"KV cache of {model} on {worker} is {used / capacity:.0%} full"), self.settings.kv_hold

    def _slo(self, seen: Observations, now: float):
        s = self.settings
        if seen.ttft_total is None or seen.ttft_within_slo is None:
            return
        self._ttft.append((now, seen.ttft_total, seen.ttft_within_slo))
        while len(self._ttft) > 1 and now - self._ttft[1][0] >= s.slo_window:
            self._ttft.popleft()
        _, total0, good0 = self._ttft[0]
        total, good = seen.ttft_total - total0, seen.ttft_within_slo - good0
        if total < s.slo_min_requests or total <= 0:
            return
        bad = 1.0 - good / total
        if bad > (1.0 - s.slo_target) * s.burn_rate:
            yield Alert("TTFTSLOBurn", WARNING, "", f"{bad:.0%} of {total:.0f} requests waited more than "
                        f"{s.ttft_slo:g}s for their first token"), 0.0

    def _leases(self, health: ClusterHealth):
        if health.leases is None:
            return
        workers = {w.worker_id for w in health.workers}
        reachable = {c.component.removeprefix("worker/") for c in health.components
                     if c.component.startswith("worker/") and c.state != UNREACHABLE}
        for lease in health.leases:
            held = parse_model_lease_holder(lease.holder)
            if held is None:
                continue
            worker, model = held
            if worker not in workers:
                why = f"worker {worker} is not registered"
            elif worker in reachable and model not in health.kv.get(worker, {}):
                why = f"worker {worker} does not hold {model}"
            else:
                continue
            yield Alert("LeaseLeak", WARNING, lease.holder,
                        f"{lease.bytes / 2**20:.0f} MiB leased to {lease.holder}, but {why}"), self.settings.lease_hold

    def _probe(self, seen: Observations):
        if len(seen.probes) >= 2 and not any(seen.probes[-2:]):
            yield Alert("ProbeFailing", CRITICAL, "", "the last two synthetic Generate probes failed"), 0.0
