"""The whole suite in one process: real grpc.aio servers on 127.0.0.1:0, the tiny model."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio

from llmos.v1 import (
    gateway_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    monitor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    resources_pb2_grpc,
    scheduler_pb2_grpc,
    worker_pb2_grpc,
)
from tests.support.inprocess import InProcessSuite, start_in_process


@dataclass
class Stack:
    addresses: dict[str, str]
    channels: dict[str, grpc.aio.Channel]
    metrics: dict[str, str]
    suite: InProcessSuite

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
    def resources(self):
        return resources_pb2_grpc.ResourceServiceStub(self.channels["resources"])

    @property
    def identity(self):
        return identity_pb2_grpc.IdentityServiceStub(self.channels["gateway"])

    async def user_key(self, tenant: str, **fields) -> str:
        """A new user key of `tenant` (created, with `fields`, if it does not exist)."""
        try:
            await self.identity.CreateTenant(identity_pb2.CreateTenantRequest(
                tenant=identity_pb2.Tenant(name=tenant, **fields)))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        response = await self.identity.CreateApiKey(identity_pb2.CreateApiKeyRequest(
            tenant=tenant, role=identity_pb2.ROLE_USER, label="test"))
        return response.secret

    def gateway_as(self, key: str):
        """The gateway as a client holding `key` sees it (the channel closes with the stack)."""
        channel = self.suite.channel("gateway", api_key=key)
        self.channels[f"gateway-{len(self.channels)}"] = channel
        return gateway_pb2_grpc.GatewayServiceStub(channel)

    @property
    def monitor(self):
        return monitor_pb2_grpc.MonitorServiceStub(self.channels["monitor"])


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory, tiny_model_dir):
    suite = await start_in_process(tmp_path_factory.mktemp("stack"), {
        "registry": {"allowed_roots": (str(tiny_model_dir.parent),), "worker_dtype": "float32"},
        "worker": {"worker_id": "w1", "dtype": "float32", "register_interval_seconds": 0.2},
        "scheduler": {"slots_per_worker": 16, "max_queue": 8},
        "monitor": {"probe_interval_seconds": 0},
    })
    # Every call as the local admin (the CLI's certificate and the admin key); the worker's
    # token streams as the gateway opens them (its certificate).
    channels = {name: suite.channel(name) for name in suite.addresses}
    channels["worker"] = suite.channel("worker", tls_as="gateway")
    stack = Stack(suite.addresses, channels, suite.metrics, suite)
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
