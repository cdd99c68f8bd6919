"""Runs the gateway: settings → core → servicer → serve."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.sdk.trace import TracerProvider

from llmos.common.channels import Channels
from llmos.common.security import Security
from llmos.common.server import Service, ServiceHost, follow_peer, serve_main
from llmos.common.settings import ServiceSettings
from llmos.common.telemetry import make_tracer_provider
from llmos.v1 import registry_pb2_grpc

from .frontdoor import FrontDoor
from .identity import register as register_identity
from .observe import GatewayTelemetry
from .openai_api import OpenAiDoor
from .peers import GrpcScheduler, GrpcWorkers
from .pooling import ModelTasks
from .servicer import register


@dataclass(frozen=True)
class GatewaySettings(ServiceSettings):
    listen: str = "127.0.0.1:50051"
    # The scheduler, or its replicas separated by commas (a call goes to their leader).
    scheduler_address: str = "127.0.0.1:50052"
    # How long a call keeps looking for a scheduler leader (a failover) before it is UNAVAILABLE.
    scheduler_failover_seconds: float = 15.0
    registry_address: str = "127.0.0.1:50053"
    # The HTTP door in OpenAI's API (`openai_api`); "" serves none. Beyond loopback only with TLS.
    http_listen: str = "127.0.0.1:50057"
    # A stream whose client has read nothing for this long (while chunks wait for it) ends
    # CANCELLED (STREAM_STALLED), and its slot is freed, seconds.
    stall_timeout_seconds: float = 30.0
    # An HTTP connection that has not sent a whole request head this long after it opened (or
    # after its last response) is closed, seconds.
    http_header_timeout_seconds: float = 10.0
    # A worker's generations share one call (`GenerateMany`: a step's tokens in one message); off:
    # a `GenerateTokens` call each, as with a worker that has no `GenerateMany`.
    share_worker_calls: bool = True


async def build(settings: GatewaySettings, provider: TracerProvider | None = None) -> Service:
    provider = provider or make_tracer_provider("gateway")
    security = Security.of("gateway", settings)
    channels = Channels(provider, security)
    workers = GrpcWorkers(channels, provider.get_tracer("llmos.gateway"), settings.share_worker_calls)
    front = FrontDoor(GrpcScheduler(channels, settings.scheduler_address, settings.scheduler_failover_seconds),
                      workers)
    # The public port: clients bring keys, not certificates (plaintext on loopback).
    host = ServiceHost.of("gateway", settings, provider, security, public=True)
    registry = registry_pb2_grpc.RegistryServiceStub(channels.get(settings.registry_address))
    telemetry = GatewayTelemetry(provider.get_tracer("llmos.gateway"), host.metrics)
    tasks = ModelTasks(registry)          # (both doors: one registry client, one view of models' tasks)
    register(host, front, registry, telemetry, settings.stall_timeout_seconds, tasks)
    door = None
    if settings.http_listen:
        door = OpenAiDoor(settings.http_listen, front, registry, telemetry, security.guard,
                          provider.get_tracer("llmos.gateway.http"), security.tls_dir,
                          settings.stall_timeout_seconds, settings.http_header_timeout_seconds, tasks)
    register_identity(host, security.store)
    await host.set_serving(False)       # ready once the scheduler answers: it admits every request

    async def follow_scheduler(address: str) -> None:
        replicas = [a.strip() for a in settings.scheduler_address.split(",") if a.strip()]
        await follow_peer(host, [channels.get(a) for a in replicas], "the scheduler")

    return Service(host, background=[follow_scheduler], cleanups=[front.drain, workers.close, channels.close],
                   door=door)


if __name__ == "__main__":
    serve_main("gateway", GatewaySettings, build)
