"""Runs the resource manager: settings → core → servicer → serve."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider

from llmos.common.errors import Unavailable
from llmos.common.metrics import OffLoop
from llmos.common.server import Service, ServiceHost, serve_main
from llmos.common.settings import ServiceSettings
from llmos.common.store import Leadership, Store, StoreWatch, sqlite_url
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
    # The node it accounts for (its devices are probed here); "" is the host name. On
    # Kubernetes, the node's name (the pod's spec.nodeName).
    node_name: str = ""
    # How often expired leases are reclaimed, seconds.
    reap_interval_seconds: float = 1.0
    grace_seconds: float = 5.0


async def build(settings: ResourcesSettings, provider: TracerProvider | None = None) -> Service:
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    store = Store(settings.store_url or sqlite_url(Path(settings.data_dir) / "resources.db")).ready()
    manager = ResourceManager(settings.node_name or node_name(), probe_devices, store,
                              settings.cpu_budget_bytes, settings.budget_fraction)
    host = ServiceHost.of("resources", settings, provider or make_tracer_provider("resources"))
    register(host, manager)
    host.metrics.register(OffLoop(lambda: resource_metrics(
        manager.nodes(), manager.leases.list(), manager.leases.reclaimed_total)))

    watch = StoreWatch(store, host.set_serving)
    await watch.check()
    leadership: list[Leadership] = []

    async def reap(address: str) -> None:
        # Every replica publishes its node's devices; one at a time reclaims expired leases.
        leader = Leadership(store, "resources.reaper", f"{manager.node}/{address}",
                            ttl=max(10.0, 5 * settings.reap_interval_seconds))
        leadership.append(leader)
        grace_due = False
        while True:
            try:
                grace_due = await asyncio.to_thread(reap_once, leader, grace_due)
            except Unavailable:                         # the store watch says so, once
                grace_due = True                        # a round that failed may have owed it
            except Exception:  # noqa: BLE001 - the next round tries again; the loop must not end
                log.exception("reclaiming leases failed")
                grace_due = True
            await asyncio.sleep(settings.reap_interval_seconds)

    def reap_once(leader: Leadership, grace_due: bool) -> bool:
        """One round; returns whether the grace is still due (it failed before it was given).
        A store outage loses the lead (holders could not renew meanwhile either): taking it
        again gives every lease one more TTL before anything is reclaimed."""
        leads, took = leader.check()
        grace_due = grace_due or took
        if leads and grace_due:
            extended = manager.leases.grant_grace()
            if extended:
                log.info("took up reclaiming: %d leases get one TTL to be renewed", extended)
            grace_due = False
        manager.publish()
        if leads:
            for lease in manager.leases.reap():
                log.warning("reclaimed %s of %s: %d bytes on %s/%s, not renewed", lease.name, lease.holder,
                            lease.bytes, lease.node, lease.device)
        return grace_due

    async def close() -> None:
        for lead in leadership:
            await asyncio.to_thread(lead.resign)
        manager.close()

    return Service(host, background=[reap, watch.run], cleanups=[close])



if __name__ == "__main__":
    serve_main("resources", ResourcesSettings, build)
