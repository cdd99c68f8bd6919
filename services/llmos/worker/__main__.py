"""Runs a worker: settings → core → servicer → serve, then announces itself to the registry."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from opentelemetry.sdk.trace import TracerProvider

from llmos.common.channels import Channels
from llmos.common.domain import DEFAULT_KV_CACHE_TOKENS
from llmos.common.errors import LlmosError
from llmos.common.security import Security
from llmos.common.server import Service, ServiceHost, die_with_parent, run_loop, run_service
from llmos.common.settings import ServiceSettings, from_env
from llmos.common.telemetry import make_tracer_provider, setup_logging
from llmos.engine import EngineDriver
from llmos.engine.loader import pick_device, pick_dtype
from llmos.v1 import registry_pb2, registry_pb2_grpc

from .host import EngineConfig, ModelHost
from .observe import EngineTelemetry, WorkerGauges
from .peers import GrpcResources
from .servicer import register

log = logging.getLogger(__name__)

# Seconds a thread waiting for the interpreter lets the holder run before asking for it (Python's
# default: 5 ms). The engine driver's thread needs the lock back as each native call of a step
# returns, while the event loop's thread holds it to relay the last step's tokens to their streams:
# at 64 streams through the gateway, 1,463-1,497 tok/s with the default, 1,519-1,536 with this.
SWITCH_INTERVAL = 0.0005


@dataclass(frozen=True)
class WorkerSettings(ServiceSettings):
    listen: str = "127.0.0.1:50055"
    # Address the other services reach this worker at; empty means the bound address.
    advertise_address: str = ""
    # Stable id; empty means "<hostname>-worker".
    worker_id: str = ""
    # The node it runs on, as its resource manager names it; "" is the host name.
    node_name: str = ""
    resources_address: str = "127.0.0.1:50054"
    registry_address: str = "127.0.0.1:50053"
    # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    # "auto" (bf16 where the hardware has it), "float32", "bfloat16", "float16".
    dtype: str = "auto"
    # Torch threads; 0 leaves torch's default (one per core).
    threads: int = 0
    # Most sequences running at once per model; fewer run when the KV cache has no blocks for more.
    max_running: int = 256
    # KV cache positions per model, in blocks of 16 (at least one sequence of max_seq_len); leased
    # with the weights. Prompts that start the same way share their full blocks.
    kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS
    # Longest prompt + output of one sequence, tokens (capped by the model's context).
    max_seq_len: int = 8192
    # Prompt tokens fed per engine step (chunked prefill).
    prefill_budget: int = 256
    # How often the worker announces itself to the registry (its heartbeat there), seconds.
    register_interval_seconds: float = 5.0
    # Seconds a memory lease lives without renewal; renewed every third of it.
    lease_ttl_seconds: float = 15.0
    # Chunks a stream may fall behind (a client that stops reading) before its sequence
    # pauses, holding its cache blocks but no more memory; it goes on once the stream has
    # caught up. 0: no bound.
    max_backlog: int = 64
    # Prefix caching: the full cache blocks of a request stay (until their memory is needed), and
    # a prompt that starts with those tokens shares them (llmos_prefix_cache_* metrics).
    prefix_cache: bool = True
    # Distinct LoRA adapters one engine step runs (sequences of more take turns), and the adapters
    # each model keeps loaded (the least recently used idle one makes room; each is leased).
    max_adapters_per_step: int = 4
    max_loaded_adapters: int = 8
    # Build what pays with the system's C++ compiler (g++, once per machine and source): decode
    # attention on the CPU through the engine's own kernel. Off, it runs as written.
    compile: bool = True
    # On a GPU (with `compile`): the engine's Triton kernels, and decode steps of up to `max_running`
    # sequences as CUDA graphs captured as each model loads. Off, decode steps launch their kernels one
    # by one.
    cuda_graphs: bool = True
    # On a GPU: the share of its memory this worker's models fill (vLLM's gpu_memory_utilization). A model
    # loading leases what the share leaves free of the device (others' memory counts against it) and its KV
    # cache grows from `kv_cache_tokens` to fill it after its weights, less 2 GiB for CUDA graphs and
    # activations: the first model takes most of it. Where the resource manager refuses that lease, the
    # registry's estimate and `kv_cache_tokens`. 0: those always.
    gpu_memory_fraction: float = 0.9
    # Where this worker keeps what lasts across its restarts; `llmos up` gives each its data directory.
    data_dir: str = ""
    # The compile cache (inductor's, and the engine's kernel under llmos-kernels/), so a second start
    # reads what the first built: "" is "inductor" in the data directory (torch's default without one).
    compile_cache_dir: str = ""


def keep_compiled(settings: WorkerSettings) -> str | None:
    """Points inductor's cache where the settings say (inductor reads TORCHINDUCTOR_CACHE_DIR as it
    compiles; torch sets it to its default once asked, so it is set here whatever it holds);
    returns the directory, None for torch's default."""
    directory = settings.compile_cache_dir or (str(Path(settings.data_dir) / "inductor") if settings.data_dir else "")
    if directory:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
    return directory or None


async def announce(stub: registry_pb2_grpc.RegistryServiceStub,
                   request: Callable[[], registry_pb2.RegisterWorkerRequest], interval: float,
                   ready: Callable[[bool], Awaitable[None]] | None = None) -> None:
    """Registers with the registry now and then again every `interval`: the registry's
    heartbeat, which also tells a restarted registry which models are loaded here. The
    first registration makes the worker ready (`ready(True)`)."""
    registered = False
    while True:
        try:
            await stub.RegisterWorker(request(), timeout=5)
        except LlmosError as exc:
            log.warning("cannot register with the registry: %s (%s)", exc.code, exc.reason)
            await asyncio.sleep(min(interval, 1.0))
            continue
        if not registered and ready is not None:
            await ready(True)
        registered = True
        await asyncio.sleep(interval)


async def renew_leases(model_host: ModelHost, interval: float) -> None:
    """The resource manager's heartbeat: renews this worker's leases every `interval`."""
    while True:
        try:
            await model_host.heartbeat()
        except LlmosError as exc:
            log.warning("cannot renew leases: %s", exc.code)
        except Exception:  # noqa: BLE001 - the heartbeat must outlive any one failure
            log.exception("renewing leases failed")
        await asyncio.sleep(interval)


async def build(settings: WorkerSettings, provider: TracerProvider | None = None,
                driver: EngineDriver | None = None, settle_heap: bool = False) -> Service:
    """The worker service. Its engines run on `driver`; without one, on a thread of their own. With
    `settle_heap` (the worker's own process), each model it loads is frozen out of the garbage
    collector's walks, and unfrozen as it is unloaded (`common.heap`)."""
    if not 0 <= settings.gpu_memory_fraction <= 1:
        raise ValueError("LLMOS_WORKER_GPU_MEMORY_FRACTION must be between 0 and 1, "
                         f"not {settings.gpu_memory_fraction}")
    own_driver = driver is None
    if driver is None:
        driver = EngineDriver()
        driver.start_thread()
    keep_compiled(settings)
    if settings.threads > 0:
        # OpenMP's thread count belongs to the thread that sets it: set it where torch runs.
        driver.call(torch.set_num_threads, settings.threads)
    device = pick_device(settings.device)
    worker_id = settings.worker_id or f"{socket.gethostname()}-worker"
    provider = provider or make_tracer_provider("worker")
    security = Security.of("worker", settings)
    channels = Channels(provider, security)
    host = ServiceHost.of("worker", settings, provider, security)
    model_host = ModelHost(worker_id, GrpcResources(channels, settings.resources_address), device,
                           pick_dtype(settings.dtype, device), driver,
                           EngineConfig(settings.max_running, settings.max_seq_len, settings.prefill_budget,
                                        settings.lease_ttl_seconds, settings.max_backlog, settings.prefix_cache,
                                        settings.max_adapters_per_step, settings.max_loaded_adapters,
                                        settings.kv_cache_tokens, settings.compile, settings.cuda_graphs,
                                        settings.gpu_memory_fraction),
                           events=EngineTelemetry(provider.get_tracer("llmos.engine.engine"), host.metrics),
                           settle_heap=settle_heap)
    host.metrics.register(WorkerGauges(worker_id, model_host.status, model_host.memory_in_use))
    await host.set_serving(False)       # ready once registered: before that no one sends it work
    register(host, model_host)
    stub = registry_pb2_grpc.RegistryServiceStub(channels.get(settings.registry_address))
    incarnation = uuid.uuid4().hex

    def advertised(metrics_address: str) -> str:
        """The metrics address on the advertised host, when the worker advertises one."""
        if not metrics_address or not settings.advertise_address:
            return metrics_address
        return f"{settings.advertise_address.rsplit(':', 1)[0]}:{metrics_address.rsplit(':', 1)[1]}"

    async def announce_loop(address: str) -> None:
        def request() -> registry_pb2.RegisterWorkerRequest:
            return registry_pb2.RegisterWorkerRequest(
                worker_id=worker_id, address=settings.advertise_address or address,
                node=settings.node_name or socket.gethostname(),
                incarnation=incarnation, loaded_models=model_host.loaded_models,
                quantizations=model_host.quantizations,
                metrics_address=advertised(service.metrics_address))

        await announce(stub, request, settings.register_interval_seconds, ready=host.set_serving)

    async def renew_loop(address: str) -> None:
        await renew_leases(model_host, settings.lease_ttl_seconds / 3)

    async def close() -> None:
        await model_host.stop_all()
        await channels.close()
        if own_driver:
            driver.stop()

    service = Service(host, background=[announce_loop, renew_loop], cleanups=[close])
    return service

def main() -> int:
    """Serves gRPC on a thread of its own and runs the engines on the main thread."""
    die_with_parent()
    settings = from_env(WorkerSettings, "worker")
    setup_logging(settings.log_level)
    sys.setswitchinterval(SWITCH_INTERVAL)
    driver = EngineDriver()
    control: dict = {}
    ready = threading.Event()

    def serve() -> None:
        async def run() -> None:
            control["loop"], control["stop"] = asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            await run_service(await build(settings, driver=driver, settle_heap=True),
                              address_file=settings.address_file, grace=settings.grace_seconds,
                              stop=control["stop"], settle=True)

        try:
            run_loop(run())
        except BaseException:
            control["failed"] = True
            log.exception("worker failed")
        finally:
            ready.set()
            driver.stop()

    thread = threading.Thread(target=serve, name="grpc")
    thread.start()
    ready.wait()

    def on_signal(*_: object) -> None:
        if "loop" in control:
            control["loop"].call_soon_threadsafe(control["stop"].set)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    driver.run()
    thread.join()
    return 1 if control.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
