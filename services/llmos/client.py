"""A small synchronous client for the llmos suite, used by the CLI and the tests."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from llmos.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    monitor_pb2,
    monitor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    resources_pb2,
    resources_pb2_grpc,
)


class Client:
    def __init__(self, gateway: str = "127.0.0.1:50051", registry: str = "127.0.0.1:50053",
                 resources: str = "127.0.0.1:50054", monitor: str = "127.0.0.1:50056") -> None:
        self._channels = [grpc.insecure_channel(a) for a in (gateway, registry, resources, monitor)]
        self.gateway = gateway_pb2_grpc.GatewayServiceStub(self._channels[0])
        self.registry = registry_pb2_grpc.RegistryServiceStub(self._channels[1])
        self.resources = resources_pb2_grpc.ResourceServiceStub(self._channels[2])
        self.monitor = monitor_pb2_grpc.MonitorServiceStub(self._channels[3])

    @classmethod
    def of_suite(cls, addresses: dict[str, str]) -> Client:
        """A client for a suite started by `llmos.suite.Suite` (its `addresses`)."""
        return cls(gateway=addresses["gateway"], registry=addresses["registry"],
                   resources=addresses["resources"], monitor=addresses["monitor"])

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, model: str, *, prompt: str | None = None,
                 messages: list[tuple[str, str]] | None = None, max_tokens: int = 0,
                 temperature: float = 0.0, seed: int | None = None, ignore_eos: bool = False,
                 request_id: str = "", timeout: float | None = None,
                 metadata: tuple = ()) -> Iterator[gateway_pb2.GenerateResponse]:
        request = gateway_pb2.GenerateRequest(
            model=model, request_id=request_id,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos))
        if seed is not None:
            request.sampling.seed = seed
        if prompt is not None:
            request.prompt = prompt
        for role, content in messages or ():
            request.messages.add(role=role, content=content)
        return self.gateway.Generate(request, timeout=timeout, metadata=metadata)

    def import_model(self, name: str, source: str, tag: str = "",
                     timeout: float = 600) -> registry_pb2.ImportModelResponse:
        return self.registry.ImportModel(registry_pb2.ImportModelRequest(name=name, tag=tag, source=source),
                                         timeout=timeout)

    def load_model(self, name: str, timeout: float = 600) -> registry_pb2.LoadModelResponse:
        return self.registry.LoadModel(registry_pb2.LoadModelRequest(name=name), timeout=timeout)

    def get_model(self, name: str) -> common_pb2.Model:
        return self.registry.GetModel(registry_pb2.GetModelRequest(name=name), timeout=10).model

    def list_models(self) -> list[common_pb2.Model]:
        models, token = [], ""
        while True:
            page = self.registry.ListModels(registry_pb2.ListModelsRequest(page_token=token), timeout=10)
            models.extend(page.models)
            token = page.next_page_token
            if not token:
                return models

    def cluster_health(self) -> monitor_pb2.GetClusterHealthResponse:
        return self.monitor.GetClusterHealth(monitor_pb2.GetClusterHealthRequest(), timeout=10)

    def nodes(self) -> list[resources_pb2.Node]:
        return list(self.resources.ListNodes(resources_pb2.ListNodesRequest(), timeout=10).nodes)
