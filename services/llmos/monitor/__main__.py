"""Runs the monitor: settings → core → servicer → serve."""

from __future__ import annotations

from dataclasses import dataclass, field

from opentelemetry.sdk.trace import TracerProvider

from llmos.common.channels import Channels
from llmos.common.security import Security
from llmos.common.server import Service, ServiceHost, serve_main
from llmos.common.settings import ServiceSettings
from llmos.common.telemetry import make_tracer_provider

from .alerts import AlertRules, AlertSettings
from .cluster import ClusterGauges, ClusterWatch, probe_loop
from .health import MONITOR, HealthMonitor
from .peers import GenerateProbe, GrpcProbe, RegistryEvents
from .servicer import register


@dataclass(frozen=True)
class MonitorSettings(ServiceSettings):
    listen: str = "127.0.0.1:50056"
    # Where the cluster's Prometheus metrics (the monitor's own and every service's,
    # gathered) are served over HTTP at /metrics; the one address to scrape.
    metrics_listen: str = "127.0.0.1:9464"
    # The services' own metrics endpoints, "gateway=host:port,scheduler=host:port,...";
    # workers' are learned from the registry.
    metrics_targets: dict[str, str] = field(default_factory=dict)
    gateway_address: str = "127.0.0.1:50051"
    scheduler_address: str = "127.0.0.1:50052"
    registry_address: str = "127.0.0.1:50053"
    resources_address: str = "127.0.0.1:50054"
    check_timeout_seconds: float = 2.0
    # How often everything is checked and the alert rules run, seconds.
    check_interval_seconds: float = 1.0
    # How often the services' metrics are read for the rules, seconds (a scrape of the
    # monitor's endpoint always reads them afresh), and how long one may take: a component
    # that does not answer in time is left out of that scrape (llmos_scrape_up 0), so the
    # monitor's endpoint answers within it even while a worker is frozen.
    scrape_interval_seconds: float = 5.0
    scrape_timeout_seconds: float = 0.5
    # A worker with running generations and no new token for this long is STALLED.
    stall_seconds: float = 5.0
    # Synthetic Generate probe: every this many seconds (0: off), on this model (empty:
    # the first model ready somewhere), failing after this long.
    probe_interval_seconds: float = 30.0
    probe_model: str = ""
    probe_timeout_seconds: float = 30.0
    # File holding the API key the probe presents (a user key of tenant "llmos-probe").
    probe_key_file: str = ""
    # Alert thresholds (see llmos.monitor.alerts).
    ttft_slo_seconds: float = 2.5
    slo_target: float = 0.99
    queue_alert_depth: int = 16
    kv_alert_ratio: float = 0.95
    grace_seconds: float = 5.0


async def build(settings: MonitorSettings, provider: TracerProvider | None = None) -> Service:
    provider = provider or make_tracer_provider("monitor")
    security = Security.of("monitor", settings)
    channels = Channels(provider, security, public=(settings.gateway_address,))
    probe = GrpcProbe(channels, settings.check_timeout_seconds, settings.registry_address,
                      settings.scheduler_address, settings.resources_address)
    for name, address in settings.metrics_targets.items():
        if ":" not in address:
            raise ValueError(f"metrics target {name}={address!r} must be name=host:port")
    monitor = HealthMonitor(probe, {
        "gateway": settings.gateway_address, "scheduler": settings.scheduler_address,
        "registry": settings.registry_address, "resources": settings.resources_address},
        settings.stall_seconds, metrics=settings.metrics_targets)
    rules = AlertRules(AlertSettings(queue_depth=settings.queue_alert_depth, kv_ratio=settings.kv_alert_ratio,
                                     ttft_slo=settings.ttft_slo_seconds, slo_target=settings.slo_target))
    host = ServiceHost.of("monitor", settings, provider, security)
    watch = ClusterWatch(monitor, rules, settings.check_interval_seconds,
                         settings.scrape_interval_seconds, settings.scrape_timeout_seconds)
    host.metrics.register(ClusterGauges(watch))
    host.metrics.register(watch.gatherer)
    register(host, watch)
    background = [watch.run, RegistryEvents(channels, settings.registry_address, watch).run]
    if settings.probe_interval_seconds > 0:
        generate = GenerateProbe(channels, settings.gateway_address, settings.registry_address,
                                 settings.probe_model, settings.probe_timeout_seconds, settings.probe_key_file)

        async def probing(address: str) -> None:
            await probe_loop(watch, generate, settings.probe_interval_seconds)

        background.append(probing)

    async def check_itself_too(address: str) -> None:
        monitor.add_service(MONITOR, address, service.metrics_address)

    async def close() -> None:
        watch.gatherer.close()

    service = Service(host, background=[check_itself_too, *background], cleanups=[channels.close, close])
    return service


if __name__ == "__main__":
    serve_main("monitor", MonitorSettings, build)
