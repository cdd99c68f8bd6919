"""Runs the registry: settings → core → servicer → serve."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider

from llmos.common.channels import Channels
from llmos.common.devices import compute_bytes
from llmos.common.domain import DEFAULT_KV_CACHE_TOKENS
from llmos.common.errors import Unavailable
from llmos.common.security import Security
from llmos.common.server import Service, ServiceHost, serve_main
from llmos.common.settings import ServiceSettings
from llmos.common.store import Leadership, Store, StoreMutex, StoreWatch, off_loop, sqlite_url
from llmos.common.telemetry import make_tracer_provider

from .catalog import Catalog
from .importer import Importer
from .models import ModelRegistry
from .observe import RegistryMetrics
from .peers import GrpcResources, GrpcWorkers
from .rollout import Rollouts
from .servicer import register
from .shared import Shared
from .sources import SourcePolicy
from .weights import KvShape

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistrySettings(ServiceSettings):
    listen: str = "127.0.0.1:50053"
    data_dir: str = ".llmos"
    # The workers' KV cache, counted in each model's memory estimate: positions per model, as the
    # workers' `kv_cache_tokens`.
    kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS
    # The dtype the workers compute in (their `dtype` setting): "auto", "float32", "bfloat16", "float16".
    worker_dtype: str = "auto"
    # Runtime overhead added to each model's memory estimate, bytes. 0: the estimate counts what
    # the worker measures (weight and KV cache tensors); activations at these batch sizes are
    # a few MiB.
    overhead_bytes: int = 0
    resources_address: str = "127.0.0.1:50054"
    load_timeout_seconds: float = 300.0
    # A worker not heard from for this long is dropped with its placements, seconds.
    worker_timeout_seconds: float = 20.0
    # A loaded model that served no request for this long is unloaded, seconds; 0: never.
    keep_alive_seconds: float = 1800.0
    # Directories models may be imported from (comma-separated); empty means the directory the
    # registry runs in. Relative sources are taken inside the first. `bundled:<name>` is always allowed.
    allowed_roots: tuple[str, ...] = ()
    # Where GGUF and pickle conversions are kept for other stores to take (a build cache, e.g.
    # for test runs); "": none, every store converts its own.
    conversion_cache: str = ""
    # Import pickle (.bin/.pt) weights, converted to safetensors in a child process. Off: refused.
    allow_pickle: bool = False
    # The highest rank a LoRA adapter may have; a higher one is refused at import.
    max_adapter_rank: int = 64
    grace_seconds: float = 5.0
    # Replicas share the store (`store_url`): one of them leads (recovers lost workers' models,
    # unloads idle ones, works through drains), renewing this lease; another takes over within it.
    leader_lease_seconds: float = 6.0


async def build(settings: RegistrySettings, provider: TracerProvider | None = None) -> Service:
    data = Path(settings.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    provider = provider or make_tracer_provider("registry")
    security = Security.of("registry", settings)
    channels = Channels(provider, security)
    store = Store(settings.store_url or sqlite_url(data / "registry.db")).ready()
    holder = f"{socket.gethostname()}/{os.getpid()}"
    shared = Shared(store)
    mutex = StoreMutex(store, holder, ttl=settings.leader_lease_seconds)
    catalog = Catalog(store)
    roots = [Path(r) for r in settings.allowed_roots] or [Path.cwd()]
    kv = KvShape(settings.kv_cache_tokens, compute_bytes(settings.worker_dtype))
    cache = Path(settings.conversion_cache) if settings.conversion_cache else None
    registry = ModelRegistry(catalog, Importer(data / "models", SourcePolicy(roots), settings.allow_pickle,
                                               conversion_cache=cache),
                             GrpcWorkers(channels, settings.load_timeout_seconds),
                             kv, settings.overhead_bytes,
                             GrpcResources(channels, settings.resources_address),
                             worker_timeout=settings.worker_timeout_seconds,
                             max_adapter_rank=settings.max_adapter_rank, shared=shared, mutex=mutex)
    host = ServiceHost.of("registry", settings, provider, security)
    registry.events.listeners.append(RegistryMetrics(host.metrics))
    rollouts = Rollouts(registry)
    register(host, registry, rollouts)
    watch = StoreWatch(store, host.set_serving)
    await watch.check()
    ttl = settings.leader_lease_seconds
    leadership = Leadership(store, "registry.leader", holder, ttl=ttl)
    stopping = asyncio.Event()

    async def lead(address: str) -> None:
        while not stopping.is_set():
            try:
                await off_loop(leadership.check, timeout=ttl / 3)
            except Exception:  # noqa: BLE001 - a renewal that did not answer is tried again
                # Not renewed: it may lapse before the next try, so this replica leads no more.
                log.debug("renewing the registry lead did not answer in time")
                leadership.leading = False
            if stopping.is_set():           # handed over while the renewal was on its way
                await asyncio.to_thread(leadership.resign)
            await asyncio.sleep(ttl / 3)

    async def watch_workers(address: str) -> None:
        # Every replica hears the heartbeats of the workers that reach it, and shares them; the
        # lost workers' models are loaded elsewhere, and idle models unloaded, by the leader.
        interval = min(settings.worker_timeout_seconds / 4, 5.0)
        while True:
            await asyncio.sleep(interval)
            if not leadership.leading:
                continue
            try:
                await registry.recover(settings.worker_timeout_seconds)
                if settings.keep_alive_seconds > 0:
                    await registry.evict_idle(settings.keep_alive_seconds, time.time())
            except Unavailable:
                pass                                    # the store watch says so, once
            except Exception:  # noqa: BLE001 - the next round tries again; the loop must not end
                log.exception("watching the workers failed")

    async def tail(address: str) -> None:
        await registry.follow()

    async def journal(address: str) -> None:
        await shared.run()

    async def drains(address: str) -> None:
        await rollouts.run_drains(lambda: leadership.leading)

    async def hand_over() -> None:
        stopping.set()
        await shared.flush()
        await asyncio.to_thread(leadership.resign)

    async def close() -> None:
        await shared.flush()
        shared.close()
        registry.close()
        await channels.close()
        catalog.close()

    return Service(host, background=[journal, lead, tail, watch_workers, drains, watch.run], cleanups=[close],
                   handovers=[hand_over])



if __name__ == "__main__":
    serve_main("registry", RegistrySettings, build)
