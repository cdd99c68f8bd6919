"""The whole suite in one process: each service's real `grpc.aio` server on
127.0.0.1:0, wired to the others as `llmos.cli.launcher` wires processes.

For the integration tests and for benchmarks that must see every hop in one process
(`benchmarks/telemetry.py`). `overrides` sets any service's settings by field name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from opentelemetry.sdk.trace import TracerProvider

from llmos.cli.launcher import NEEDS, SERVICES
from llmos.common.bootstrap import CLI, SuiteIdentity, prepare
from llmos.common.channels import open_aio_channel
from llmos.common.server import Service
from llmos.v1 import registry_pb2, registry_pb2_grpc

LISTEN = "127.0.0.1:0"


def _builders() -> dict:
    """Each service's settings type and build function."""
    from llmos.gateway.__main__ import GatewaySettings
    from llmos.gateway.__main__ import build as build_gateway
    from llmos.monitor.__main__ import MonitorSettings
    from llmos.monitor.__main__ import build as build_monitor
    from llmos.registry.__main__ import RegistrySettings
    from llmos.registry.__main__ import build as build_registry
    from llmos.resources.__main__ import ResourcesSettings
    from llmos.resources.__main__ import build as build_resources
    from llmos.scheduler.__main__ import SchedulerSettings
    from llmos.scheduler.__main__ import build as build_scheduler
    from llmos.worker.__main__ import WorkerSettings
    from llmos.worker.__main__ import build as build_worker

    return {"resources": (ResourcesSettings, build_resources), "registry": (RegistrySettings, build_registry),
            "worker": (WorkerSettings, build_worker), "scheduler": (SchedulerSettings, build_scheduler),
            "gateway": (GatewaySettings, build_gateway), "monitor": (MonitorSettings, build_monitor)}


@dataclass
class InProcessSuite:
    services: dict[str, Service] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    # Where each serves its Prometheus metrics.
    metrics: dict[str, str] = field(default_factory=dict)
    # The gateway's HTTP door (OpenAI's API), once started.
    http_address: str = ""
    identity: SuiteIdentity | None = None
    # Where its services keep their state (and the CLI finds their certificates and admin key).
    data_dir: Path | None = None

    def channel(self, name: str, api_key: str | None = None, tls_as: str = CLI) -> grpc.aio.Channel:
        """A channel to service `name` with the certificate of `tls_as` (the CLI's by default, or a
        service's) and `api_key` (default: the local admin key; "" sends none)."""
        key = self.identity.admin_key() if api_key is None else api_key
        secure = bool(self.services[name].host.security.tls_dir)     # plaintext when started so
        return open_aio_channel(self.addresses[name], str(self.identity.tls_dir(tls_as)) if secure else None,
                                key or None, public=name == "gateway")

    async def stop(self, grace: float = 1.0) -> None:
        for name in reversed(list(self.services)):
            await self.services[name].stop(grace)


async def start_in_process(data_dir: str | Path, overrides: dict[str, dict] | None = None,
                           provider: TracerProvider | None = None,
                           services: tuple[str, ...] = SERVICES) -> InProcessSuite:
    """Starts `services` in dependency order (a tracer provider shared by all, or one each)
    and returns once the worker has registered with the registry."""
    suite, builders = InProcessSuite(data_dir=Path(data_dir)), _builders()
    worker_id = (overrides or {}).get("worker", {}).get("worker_id") or f"{socket.gethostname()}-worker"
    suite.identity = prepare(data_dir, [(name, name, worker_id if name == "worker" else name) for name in services])
    try:
        for name in services:
            settings_type, build = builders[name]
            fields = {f.name for f in dataclasses.fields(settings_type)}
            values: dict[str, object] = {"listen": LISTEN, "metrics_listen": LISTEN}
            if "http_listen" in fields:
                values["http_listen"] = LISTEN
            if "data_dir" in fields:
                values["data_dir"] = str(data_dir)
            if "compile_cache_dir" in fields and os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
                # (a worker points the process's compile cache where it is told: here where the run's is)
                values["compile_cache_dir"] = os.environ["TORCHINDUCTOR_CACHE_DIR"]
            values |= {k: v for k, v in suite.identity.settings(name, name).items() if k in fields}
            values |= {f"{other}_address": suite.addresses[other] for other in NEEDS[name]
                       if other in suite.addresses}
            if name == "monitor":
                values["metrics_targets"] = {other: suite.metrics[other] for other in NEEDS[name]
                                             if other in suite.metrics}
            values |= (overrides or {}).get(name, {})
            service = await build(settings_type(**values), provider)
            suite.services[name] = service
            suite.addresses[name] = await service.start()
            suite.metrics[name] = service.metrics_address
            suite.http_address = suite.http_address or service.http_address
        if "worker" in suite.services and "registry" in suite.services:
            await _registered(suite.channel("registry"))
    except BaseException:
        await suite.stop()
        raise
    return suite


async def _registered(channel: grpc.aio.Channel, timeout: float = 10.0) -> None:
    """Waits until the registry lists a worker (workers announce themselves once serving)."""
    async with channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        for _ in range(int(timeout / 0.05)):
            if (await stub.ListWorkers(registry_pb2.ListWorkersRequest(), timeout=timeout)).workers:
                return
            await asyncio.sleep(0.05)
    raise TimeoutError(f"no worker registered with the registry in {timeout:.0f}s")
