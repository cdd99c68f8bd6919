"""The registry's Prometheus metrics, counted from its lifecycle events: model loads
(with how long each took, from LOADING to READY or FAILED) and evictions."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from llmos.common.metrics import LATENCY_BUCKETS

from . import events
from .events import ModelEvent


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.loads = Counter("llmos_model_loads", "Model loads that ended, by outcome (ready, failed).",
                             ["model_name", "outcome"], registry=registry)
        self.load_time = Histogram("llmos_model_load_seconds", "Time from a load's start to the model being "
                                   "ready on a worker.", ["model_name"], registry=registry, buckets=LATENCY_BUCKETS)
        self.evictions = Counter("llmos_model_evictions", "Models evicted from a worker (idle, or to make "
                                 "room).", ["model_name"], registry=registry)
        self.transitions = Counter("llmos_model_lifecycle_events", "Model lifecycle events, by kind.",
                                   ["model_name", "kind"], registry=registry)
        self._loading: dict[tuple[str, str], float] = {}

    def __call__(self, event: ModelEvent) -> None:
        self.transitions.labels(event.model, event.kind).inc()
        key = (event.model, event.worker_id)
        if event.kind == events.LOADING:
            self._loading[key] = time.perf_counter()
        elif event.kind in (events.READY, events.FAILED) and key in self._loading:
            started = self._loading.pop(key)
            self.loads.labels(event.model, event.kind).inc()
            if event.kind == events.READY:
                self.load_time.labels(event.model).observe(time.perf_counter() - started)
        elif event.kind == events.EVICTED:
            self.evictions.labels(event.model).inc()
