"""Runs a worker: settings → core → servicer → serve, then announces itself to the registry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from dataclasses import dataclass

import grpc
import torch
from opentelemetry.sdk.trace import TracerProvider

from llmos.common.channels import Channels
from llmos.common.server import Service, ServiceHost, serve_main
from llmos.common.telemetry import make_tracer_provider
from llmos.v1 import registry_pb2, registry_pb2_grpc

from .host import EngineConfig, ModelHost
from .loader import pick_device, pick_dtype
from .servicer import GrpcResources, register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    listen: str = "127.0.0.1:50055"
    # Address the other services reach this worker at; empty means the bound address.
    advertise_address: str = ""
    address_file: str = ""
    # Stable id; empty means "<hostname>-worker".
    worker_id: str = ""
    resources_address: str = "127.0.0.1:50054"
    registry_address: str = "127.0.0.1:50053"
    # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    # "auto" (bf16 where the hardware has it), "float32", "bfloat16", "float16".
    dtype: str = "auto"
    # Torch threads; 0 leaves torch's default (one per core).
    threads: int = 0
    # Sequences running at once per model: the KV cache holds this many.
    max_running: int = 16
    # Longest prompt + output of one sequence, tokens (capped by the model's context).
    max_seq_len: int = 2048
    # Prompt tokens fed per engine step (chunked prefill).
    prefill_budget: int = 256
    # How often the worker announces itself to the registry, seconds.
    register_interval_seconds: float = 10.0
    grace_seconds: float = 10.0
    log_level: str = "INFO"


async def announce(stub: registry_pb2_grpc.RegistryServiceStub, request: registry_pb2.RegisterWorkerRequest,
                   interval: float) -> None:
    """Registers with the registry now and then again every `interval` (survives its restarts)."""
    while True:
        try:
            await stub.RegisterWorker(request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            log.warning("cannot register with the registry: %s", exc.code().name)
            await asyncio.sleep(min(interval, 1.0))
            continue
        await asyncio.sleep(interval)


async def build(settings: WorkerSettings, provider: TracerProvider | None = None) -> Service:
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    device = pick_device(settings.device)
    worker_id = settings.worker_id or f"{socket.gethostname()}-worker"
    provider = provider or make_tracer_provider("worker")
    channels = Channels(provider)
    model_host = ModelHost(worker_id, GrpcResources(channels, settings.resources_address), device,
                           pick_dtype(settings.dtype, device),
                           EngineConfig(settings.max_running, settings.max_seq_len, settings.prefill_budget))
    host = ServiceHost("worker", settings.listen, provider)
    register(host, model_host)
    tasks: list[asyncio.Task] = []

    async def started(address: str) -> None:
        stub = registry_pb2_grpc.RegistryServiceStub(channels.get(settings.registry_address))
        request = registry_pb2.RegisterWorkerRequest(worker_id=worker_id,
                                                     address=settings.advertise_address or address,
                                                     node=socket.gethostname(),
                                                     incarnation=uuid.uuid4().hex)
        tasks.append(asyncio.create_task(announce(stub, request, settings.register_interval_seconds)))

    async def close() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await model_host.stop_all()
        await channels.close()

    return Service(host, on_started=started, cleanups=[close])



if __name__ == "__main__":
    serve_main("worker", WorkerSettings, build)
