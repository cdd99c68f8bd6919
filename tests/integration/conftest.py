"""The whole suite in one process: real grpc.aio servers on 127.0.0.1:0, the tiny model."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio

from llmos.inprocess import start_in_process
from llmos.v1 import (
    gateway_pb2_grpc,
    monitor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2_grpc,
    worker_pb2_grpc,
)


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
    suite = await start_in_process(tmp_path_factory.mktemp("stack"), {
        "registry": {"allowed_roots": (str(tiny_model_dir.parent),)},
        "worker": {"worker_id": "w1", "dtype": "float32", "register_interval_seconds": 0.2},
        "scheduler": {"slots_per_worker": 16, "max_queue": 8},
        "monitor": {"probe_interval_seconds": 0},
    })
    channels = {name: grpc.aio.insecure_channel(address) for name, address in suite.addresses.items()}
    stack = Stack(suite.addresses, channels, suite.metrics)
    await stack.registry.ImportModel(registry_pb2.ImportModelRequest(name="tiny", source=str(tiny_model_dir)))
    await stack.registry.LoadModel(registry_pb2.LoadModelRequest(name="tiny"))
    yield stack
    for channel in channels.values():
        await channel.close()
    await suite.stop(grace=1.0)


@pytest.fixture(scope="session")
def tiny_reference(tiny_model_dir):
    """The tiny model and tokenizer loaded with plain transformers, for reference outputs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)
