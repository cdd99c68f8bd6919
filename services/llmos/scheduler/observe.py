"""The scheduler's telemetry: the queue-wait and routing spans, and Prometheus metrics.

Spans, under the caller's `Admit` span: `queue wait` from the request's arrival to
the moment it got a slot (or was refused), with its band, tenant, the queue it
found and the outcome; `route` at the moment of the decision, with the worker
picked, its use and capacity, and how many workers were in rotation.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode, Tracer
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from llmos.common.domain import QueueDepth
from llmos.common.metrics import LATENCY_BUCKETS

from .admission import Request, SchedulerEvents
from .history import CANCELLED_IN_QUEUE, Outcome
from .rotation import WorkerLoad


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


# The model label of requests refused before their model was resolved (unknown names included).
UNRESOLVED_MODEL = "other"


class SchedulerTelemetry(SchedulerEvents):
    def __init__(self, tracer: Tracer, registry: CollectorRegistry) -> None:
        self._tracer = tracer
        self.queue_time = Histogram("llmos_scheduler_queue_time_seconds", "Time from a request's arrival at "
                                    "the scheduler to its slot on a worker (model resolution and cold "
                                    "start included).", ["model_name", "priority"], registry=registry,
                                    buckets=LATENCY_BUCKETS)
        self.admitted_total = Counter("llmos_scheduler_admitted", "Requests given a slot.",
                                      ["model_name", "priority", "tenant"], registry=registry)
        self.rejections = Counter("llmos_scheduler_rejections", "Requests that never ran, by reason "
                                  "(QUEUE_FULL, DEADLINE_EXCEEDED_IN_QUEUE, CANCELLED_IN_QUEUE, ...).",
                                  ["model_name", "reason"], registry=registry)
        self.finished_total = Counter("llmos_scheduler_finished", "Requests that ran and ended, by outcome "
                                      f"({', '.join(o.value for o in Outcome)}).", ["model_name", "outcome"],
                                      registry=registry)

    def admitted(self, request: Request) -> None:
        t = request.ticket
        waited = request.started - request.arrival
        self.queue_time.labels(request.model, str(t.priority)).observe(waited)
        self.admitted_total.labels(request.model, str(t.priority), t.tenant).inc()
        start = _ns(request.arrival_wall)
        end = start + _ns(waited)
        span = self._span(request, start)
        span.set_attribute("llmos.queue.outcome", "ADMITTED")
        span.set_attribute("llmos.worker.id", request.endpoint.worker_id)
        span.end(end_time=end)
        used, capacity, in_rotation = request.route
        route = self._tracer.start_span("route", start_time=end, context=trace.set_span_in_context(span),
                                        attributes={"llmos.worker.id": request.endpoint.worker_id,
                                                    "llmos.worker.address": request.endpoint.address,
                                                    "llmos.worker.slots_used": used,
                                                    "llmos.worker.slots": capacity,
                                                    "llmos.workers_in_rotation": in_rotation})
        route.end(end_time=end)

    def refused(self, request: Request, reason: str) -> None:
        # Only a model the registry resolved names a label: a caller's unknown name would grow
        # the metrics without bound.
        self.rejections.labels(request.model or UNRESOLVED_MODEL, reason).inc()
        span = self._span(request, _ns(request.arrival_wall))
        span.set_attribute("llmos.queue.outcome", reason)
        if reason != CANCELLED_IN_QUEUE:
            span.set_status(Status(StatusCode.ERROR, reason))
        span.end()

    def finished(self, request: Request, outcome: Outcome) -> None:
        self.finished_total.labels(request.model, outcome.value).inc()

    def _span(self, request: Request, start: int) -> trace.Span:
        t = request.ticket
        return self._tracer.start_span("queue wait", start_time=start, attributes={
            "gen_ai.request.model": request.model or t.model, "llmos.request.id": t.request_id,
            "llmos.priority": t.priority, "llmos.band": t.band,
            "llmos.tenant": t.tenant, "llmos.redispatch": t.redispatch,
            "llmos.queue.depth_on_arrival": request.depth_on_arrival,
            "llmos.queue.position_on_arrival": request.depth_on_arrival + 1,
            "llmos.queue.reason": request.reason})


def scheduler_metrics(depths: list[QueueDepth], loads: list[WorkerLoad], leads: bool = True) -> list[Metric]:
    """Queue depths and worker loads, and whether this replica leads, for one scrape."""
    waiting = GaugeMetricFamily("llmos_scheduler_queue_requests", "Requests waiting in the scheduler's "
                                "queue.", labels=["model_name", "priority", "tenant"])
    for q in depths:
        waiting.add_metric([q.model, str(q.priority), q.tenant], q.waiting)
    running = GaugeMetricFamily("llmos_scheduler_running_requests", "Requests the scheduler sent to a "
                                "worker that have not ended.", labels=["model_name", "worker"])
    slots = GaugeMetricFamily("llmos_scheduler_worker_slots", "Slots of a worker for a model.",
                              labels=["model_name", "worker"])
    rotation = GaugeMetricFamily("llmos_scheduler_worker_in_rotation", "1 when the worker is given "
                                 "requests, 0 when it is out of rotation.", labels=["worker"])
    seen = set()
    for w in loads:
        running.add_metric([w.model, w.endpoint.worker_id], w.running)
        slots.add_metric([w.model, w.endpoint.worker_id], w.capacity)
        if w.endpoint.worker_id not in seen:
            seen.add(w.endpoint.worker_id)
            rotation.add_metric([w.endpoint.worker_id], 1 if w.in_rotation else 0)
    leader = GaugeMetricFamily("llmos_scheduler_leader", "1 while this scheduler leads (admits), 0 while "
                               "it stands by.")
    leader.add_metric([], 1 if leads else 0)
    return [waiting, running, slots, rotation, leader]
