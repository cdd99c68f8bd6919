"""Runs the registry: settings → core → servicer → serve."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from llmos.common.channels import Channels
from llmos.common.server import ServiceHost, run_service
from llmos.common.settings import from_env
from llmos.common.telemetry import make_tracer_provider, setup_logging

from .catalog import Catalog
from .importer import Importer
from .models import ModelRegistry
from .servicer import GrpcWorkers, register


@dataclass(frozen=True)
class RegistrySettings:
    listen: str = "127.0.0.1:50053"
    address_file: str = ""
    data_dir: str = ".llmos"
    # KV cache tokens counted in each model's memory estimate.
    kv_tokens: int = 8192
    # Runtime overhead counted in each model's memory estimate, bytes.
    overhead_bytes: int = 256 << 20
    load_timeout_seconds: float = 300.0
    grace_seconds: float = 5.0
    log_level: str = "INFO"


async def main(settings: RegistrySettings) -> None:
    data = Path(settings.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    provider = make_tracer_provider("registry")
    channels = Channels(provider)
    catalog = Catalog(str(data / "registry.db"))
    registry = ModelRegistry(catalog, Importer(data / "models"),
                             GrpcWorkers(channels, settings.load_timeout_seconds),
                             settings.kv_tokens, settings.overhead_bytes)
    host = ServiceHost("registry", settings.listen, provider)
    register(host, registry)

    async def close() -> None:
        await channels.close()
        catalog.close()

    await run_service(host, address_file=settings.address_file, grace=settings.grace_seconds,
                      cleanups=[close])


if __name__ == "__main__":
    config = from_env(RegistrySettings, "registry")
    setup_logging(config.log_level)
    asyncio.run(main(config))
