"""Runs the resource manager: settings → core → servicer → serve."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider

from llmos.common.metrics import OnLoop
from llmos.common.security import Security
from llmos.common.server import Service, ServiceHost, serve_main
from llmos.common.settings import ServiceSettings
from llmos.common.telemetry import make_tracer_provider

from .inventory import node_name, probe_devices
from .manager import ResourceManager
from .observe import resource_metrics
from .servicer import register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResourcesSettings(ServiceSettings):
    listen: str = "127.0.0.1:50054"
    data_dir: str = ".llmos"
    # Most bytes leases may hold on the host; 0 means 90% of its memory.
    cpu_budget_bytes: int = 0
    # Share of each GPU's memory that leases may hold.
    budget_fraction: float = 0.9
    # How often expired leases are reclaimed, seconds.
    reap_interval_seconds: float = 1.0
    grace_seconds: float = 5.0


async def build(settings: ResourcesSettings, provider: TracerProvider | None = None) -> Service:
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    manager = ResourceManager(node_name(), probe_devices, str(Path(settings.data_dir) / "resources.db"),
                              settings.cpu_budget_bytes, settings.budget_fraction)
    host = ServiceHost("resources", settings.listen, provider or make_tracer_provider("resources"),
                       settings.metrics_listen,
                       security=Security.of("resources", settings))
    register(host, manager)
    host.metrics.register(OnLoop(asyncio.get_running_loop(), lambda: resource_metrics(
        manager.nodes(), manager.leases.list(), manager.leases.reclaimed_total)))

    async def reap(address: str) -> None:
        while True:
            for lease in manager.leases.reap():
                log.warning("reclaimed %s of %s: %d bytes on %s/%s, not renewed", lease.name, lease.holder,
                            lease.bytes, lease.node, lease.device)
            await asyncio.sleep(settings.reap_interval_seconds)

    async def close() -> None:
        manager.close()

    return Service(host, background=[reap], cleanups=[close])



if __name__ == "__main__":
    serve_main("resources", ResourcesSettings, build)
