"""Runs the scheduler: settings → core → servicer → serve."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.sdk.trace import TracerProvider

from llmos.common.channels import Channels
from llmos.common.server import Service, ServiceHost, serve_main
from llmos.common.telemetry import make_tracer_provider

from .queue import Scheduler
from .servicer import GrpcRegistry, register


@dataclass(frozen=True)
class SchedulerSettings:
    listen: str = "127.0.0.1:50052"
    address_file: str = ""
    registry_address: str = "127.0.0.1:50053"
    # Running generations per worker before requests queue.
    slots_per_worker: int = 16
    # Waiting requests before new ones are refused with RESOURCE_EXHAUSTED.
    max_queue: int = 64
    load_timeout_seconds: float = 300.0
    grace_seconds: float = 10.0
    log_level: str = "INFO"


async def build(settings: SchedulerSettings, provider: TracerProvider | None = None) -> Service:
    provider = provider or make_tracer_provider("scheduler")
    channels = Channels(provider)
    scheduler = Scheduler(GrpcRegistry(channels, settings.registry_address, settings.load_timeout_seconds),
                          settings.slots_per_worker, settings.max_queue)
    host = ServiceHost("scheduler", settings.listen, provider)
    register(host, scheduler)
    return Service(host, cleanups=[channels.close])



if __name__ == "__main__":
    serve_main("scheduler", SchedulerSettings, build)
