"""Runs the gateway: settings → core → servicer → serve."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from llmos.common.channels import Channels
from llmos.common.server import ServiceHost, run_service
from llmos.common.settings import from_env
from llmos.common.telemetry import make_tracer_provider, setup_logging

from .frontdoor import FrontDoor
from .servicer import GrpcScheduler, GrpcWorkers, register


@dataclass(frozen=True)
class GatewaySettings:
    listen: str = "127.0.0.1:50051"
    address_file: str = ""
    scheduler_address: str = "127.0.0.1:50052"
    grace_seconds: float = 10.0
    log_level: str = "INFO"


async def main(settings: GatewaySettings) -> None:
    provider = make_tracer_provider("gateway")
    channels = Channels(provider)
    front = FrontDoor(GrpcScheduler(channels, settings.scheduler_address), GrpcWorkers(channels))
    host = ServiceHost("gateway", settings.listen, provider)
    register(host, front)
    await run_service(host, address_file=settings.address_file, grace=settings.grace_seconds,
                      cleanups=[front.drain, channels.close])


if __name__ == "__main__":
    config = from_env(GatewaySettings, "gateway")
    setup_logging(config.log_level)
    asyncio.run(main(config))
