"""Runs the gateway: settings → core → servicer → serve."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.sdk.trace import TracerProvider

from llmos.common.channels import Channels
from llmos.common.server import Service, ServiceHost, serve_main
from llmos.common.telemetry import make_tracer_provider
from llmos.v1 import registry_pb2_grpc

from .frontdoor import FrontDoor
from .servicer import GrpcScheduler, GrpcWorkers, register


@dataclass(frozen=True)
class GatewaySettings:
    listen: str = "127.0.0.1:50051"
    address_file: str = ""
    # Where Prometheus metrics are served over HTTP ("host:port", port 0 picks one; "" serves none).
    metrics_listen: str = "127.0.0.1:0"
    scheduler_address: str = "127.0.0.1:50052"
    registry_address: str = "127.0.0.1:50053"
    grace_seconds: float = 10.0
    log_level: str = "INFO"


async def build(settings: GatewaySettings, provider: TracerProvider | None = None) -> Service:
    provider = provider or make_tracer_provider("gateway")
    channels = Channels(provider)
    front = FrontDoor(GrpcScheduler(channels, settings.scheduler_address), GrpcWorkers(channels))
    host = ServiceHost("gateway", settings.listen, provider, settings.metrics_listen)
    register(host, front, registry_pb2_grpc.RegistryServiceStub(channels.get(settings.registry_address)))
    return Service(host, cleanups=[front.drain, channels.close])



if __name__ == "__main__":
    serve_main("gateway", GatewaySettings, build)
