"""Runs the monitor: settings → core → servicer → serve."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from llmos.common.channels import Channels
from llmos.common.server import ServiceHost, run_service
from llmos.common.settings import from_env
from llmos.common.telemetry import make_tracer_provider, setup_logging

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


async def main(settings: MonitorSettings) -> None:
    provider = make_tracer_provider("monitor")
    channels = Channels(provider)
    monitor = HealthMonitor(GrpcProbe(channels, settings.registry_address, settings.check_timeout_seconds), {
        "gateway": settings.gateway_address, "scheduler": settings.scheduler_address,
        "registry": settings.registry_address, "resources": settings.resources_address})
    host = ServiceHost("monitor", settings.listen, provider)
    register(host, monitor)
    await run_service(host, address_file=settings.address_file, grace=settings.grace_seconds,
                      cleanups=[channels.close])


if __name__ == "__main__":
    config = from_env(MonitorSettings, "monitor")
    setup_logging(config.log_level)
    asyncio.run(main(config))
