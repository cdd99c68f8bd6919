"""Runs the scheduler: settings → core → servicer → serve."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from opentelemetry.sdk.trace import TracerProvider

from llmos.common.channels import Channels
from llmos.common.metrics import OnLoop
from llmos.common.security import Security
from llmos.common.server import Service, ServiceHost, serve_main
from llmos.common.settings import ServiceSettings
from llmos.common.store import Store
from llmos.common.telemetry import make_tracer_provider

from .admission import AdmissionControl
from .observe import SchedulerTelemetry, scheduler_metrics
from .peers import GrpcRegistry
from .replica import Replica
from .reports import WorkerReports
from .servicer import register


@dataclass(frozen=True)
class SchedulerSettings(ServiceSettings):
    listen: str = "127.0.0.1:50052"
    registry_address: str = "127.0.0.1:50053"
    # Most running generations per worker and model before requests queue here (a worker's own
    # `max_running`, as it reports it, when lower; its engine queues what its KV cache has no room for).
    slots_per_worker: int = 256
    # Waiting requests (all models) before new ones are refused with RESOURCE_EXHAUSTED.
    max_queue: int = 64
    # Waiting requests of one model before its new ones are refused; 0: max_queue.
    max_queue_per_model: int = 0
    # A band's waiting requests rise one band per this many seconds of wait.
    aging_seconds: float = 30.0
    # How often each worker's status is polled, and how long without an answer
    # takes it out of rotation.
    report_interval_seconds: float = 0.5
    report_timeout_seconds: float = 2.0
    # How long the registry's word on where a model is ready is reused before asking again.
    placement_ttl_seconds: float = 1.0
    # A running request its worker has not reported for this long (its gateway died before it
    # could say it ended) gets its slot back, seconds.
    orphan_grace_seconds: float = 5.0
    load_timeout_seconds: float = 300.0
    # Prefix affinity: a request goes to the worker its prefix key went to last while that one
    # is at most this share of its slots busier than the least loaded (0: least loaded only).
    affinity_slack: float = 0.25
    # Requests (queued and running) of one tenant at once, when its quota sets no limit of its
    # own: no tenant holds every place a worker has (256 by default): half of them. More are
    # RESOURCE_EXHAUSTED (QUOTA_EXCEEDED); 0: no limit.
    tenant_max_concurrent: int = 128
    # Several schedulers, one leading: a leader lease in the store (`lease_store_url`, or else
    # `store_url`), the others standing by (`llmos.scheduler.replica`).
    leader_election: bool = False
    lease_store_url: str = ""
    # The lease's TTL: a dead leader is replaced within about this long, seconds.
    leader_lease_seconds: float = 3.0
    # How long a new leader waits, its queue filling with the requests re-submitted from the
    # previous leader's, before it dispatches (it also waits for its first look at the workers).
    recovery_seconds: float = 1.0
    # The address the other replicas' callers reach this one at (a pod's IP and port); "": the
    # address it binds.
    advertise_address: str = ""


async def build(settings: SchedulerSettings, provider: TracerProvider | None = None) -> Service:
    provider = provider or make_tracer_provider("scheduler")
    security = Security.of("scheduler", settings)
    channels = Channels(provider, security)
    tracer = provider.get_tracer("llmos.scheduler")
    host = ServiceHost.of("scheduler", settings, provider, security)
    registry = GrpcRegistry(channels, settings.registry_address, settings.load_timeout_seconds, tracer)
    events = SchedulerTelemetry(tracer, host.metrics)

    def admission_control() -> AdmissionControl:
        return AdmissionControl(
            registry, settings.slots_per_worker, settings.max_queue, settings.max_queue_per_model,
            settings.aging_seconds, settings.report_timeout_seconds, settings.placement_ttl_seconds,
            events=events, orphan_grace=settings.orphan_grace_seconds, affinity_slack=settings.affinity_slack,
            tenant_max_concurrent=settings.tenant_max_concurrent)

    store = own_store = None
    if settings.leader_election:
        if settings.lease_store_url:
            store = own_store = Store(settings.lease_store_url).ready()
        elif settings.store_url:        # the suite's store, opened already for the keys
            store = security.store.store
        else:
            raise ValueError("leader_election needs a store: set lease_store_url or store_url")
    reports = WorkerReports(lambda: replica.admission, registry, channels, settings.report_interval_seconds)
    replica = Replica(admission_control, store, settings.leader_lease_seconds, settings.recovery_seconds,
                      settings.advertise_address, learn=reports.learn)

    def metrics():
        admission = replica.admission
        return scheduler_metrics(admission.queue_depths() if admission else [],
                                 admission.worker_loads() if admission else [], replica.leads)

    host.metrics.register(OnLoop(asyncio.get_running_loop(), metrics))
    register(host, replica)

    async def close_store() -> None:
        if own_store is not None:
            own_store.close()

    return Service(host, background=[replica.run, reports.run], handovers=[replica.hand_over],
                   cleanups=[replica.close, channels.close, close_store])


if __name__ == "__main__":
    serve_main("scheduler", SchedulerSettings, build)
