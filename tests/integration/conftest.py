"""The whole suite in one process: real grpc.aio servers on 127.0.0.1:0, the tiny model."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio

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
from llmos.v1 import (
    gateway_pb2_grpc,
    monitor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2_grpc,
    worker_pb2_grpc,
)
from llmos.worker.__main__ import WorkerSettings
from llmos.worker.__main__ import build as build_worker

LISTEN = "127.0.0.1:0"


@dataclass
class Stack:
    addresses: dict[str, str]
    channels: dict[str, grpc.aio.Channel]
    metrics: dict[str, str]

    @property
    def gateway(self):
        return gateway_pb2_grpc.GatewayServiceStub(self.channels["gateway"])

    @property
    def registry(self):
        return registry_pb2_grpc.RegistryServiceStub(self.channels["registry"])

    @property
    def scheduler(self):
        return scheduler_pb2_grpc.SchedulerServiceStub(self.channels["scheduler"])

    @property
    def worker(self):
        return worker_pb2_grpc.WorkerServiceStub(self.channels["worker"])

    @property
    def monitor(self):
        return monitor_pb2_grpc.MonitorServiceStub(self.channels["monitor"])


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory, tiny_model_dir):
    data = tmp_path_factory.mktemp("stack")
    services, addresses = {}, {}

    async def up(name, service):
        services[name] = service
        addresses[name] = await service.start()

    await up("resources", await build_resources(ResourcesSettings(listen=LISTEN, data_dir=str(data))))
    await up("registry", await build_registry(RegistrySettings(
        listen=LISTEN, data_dir=str(data), allowed_roots=(str(tiny_model_dir.parent),),
        resources_address=addresses["resources"])))
    await up("worker", await build_worker(WorkerSettings(
        listen=LISTEN, worker_id="w1", resources_address=addresses["resources"],
        registry_address=addresses["registry"], dtype="float32", register_interval_seconds=0.2)))
    await up("scheduler", await build_scheduler(SchedulerSettings(
        listen=LISTEN, registry_address=addresses["registry"], slots_per_worker=16, max_queue=8)))
    await up("gateway", await build_gateway(GatewaySettings(listen=LISTEN, scheduler_address=addresses["scheduler"],
                                                            registry_address=addresses["registry"])))
    await up("monitor", await build_monitor(MonitorSettings(
        listen=LISTEN, metrics_listen=LISTEN, gateway_address=addresses["gateway"],
        scheduler_address=addresses["scheduler"], registry_address=addresses["registry"],
        resources_address=addresses["resources"], probe_interval_seconds=0,
        metrics_targets=",".join(f"{name}={services[name].metrics_address}" for name in services
                                 if name != "worker"))))
    channels = {name: grpc.aio.insecure_channel(address) for name, address in addresses.items()}
    stack = Stack(addresses, channels, {name: service.metrics_address for name, service in services.items()})
    for _ in range(50):  # the worker announces itself right after it starts
        workers = await stack.registry.ListWorkers(registry_pb2.ListWorkersRequest())
        if workers.workers:
            break
        import asyncio
        await asyncio.sleep(0.05)
    await stack.registry.ImportModel(registry_pb2.ImportModelRequest(name="tiny", source=str(tiny_model_dir)))
    await stack.registry.LoadModel(registry_pb2.LoadModelRequest(name="tiny"))
    yield stack
    for channel in channels.values():
        await channel.close()
    for name in reversed(list(services)):
        await services[name].stop(grace=1.0)


@pytest.fixture(scope="session")
def tiny_reference(tiny_model_dir):
    """The tiny model and tokenizer loaded with plain transformers, for reference outputs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)
