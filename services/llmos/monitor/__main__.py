"""Runs the monitor: settings → core → servicer → serve."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.sdk.trace import TracerProvider

from llmos.common.channels import Channels
from llmos.common.server import Service, ServiceHost, serve_main
from llmos.common.telemetry import make_tracer_provider

from .health import HealthMonitor
from .servicer import GrpcProbe, register


@dataclass(frozen=True)
class MonitorSettings:
    listen: str = "127.0.0.1:50056"
    address_file: str = ""
    gateway_address: str = "127.0.0.1:50051"
    scheduler_address: str = "127.0.0.1:50052"
    registry_address: str = "127.0.0.1:50053"
    resources_address: str = "127.0.0.1:50054"
    check_timeout_seconds: float = 2.0
    grace_seconds: float = 5.0
    log_level: str = "INFO"


async def build(settings: MonitorSettings, provider: TracerProvider | None = None) -> Service:
    provider = provider or make_tracer_provider("monitor")
    channels = Channels(provider)
    probe = GrpcProbe(channels, settings.registry_address, settings.check_timeout_seconds, settings.scheduler_address)
    monitor = HealthMonitor(probe, {
        "gateway": settings.gateway_address, "scheduler": settings.scheduler_address,
        "registry": settings.registry_address, "resources": settings.resources_address})
    host = ServiceHost("monitor", settings.listen, provider)
    register(host, monitor)

    async def check_itself_too(address: str) -> None:
        monitor.add_service("monitor", address)

    return Service(host, background=[check_itself_too], cleanups=[channels.close])



if __name__ == "__main__":
    serve_main("monitor", MonitorSettings, build)
