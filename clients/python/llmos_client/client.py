"""The synchronous client."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from ._channel import open_channel
from ._requests import RetryingCall, generate_request
from .errors import LlmosError, from_call
from .v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    identity_pb2_grpc,
    monitor_pb2,
    monitor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    resources_pb2,
    resources_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)


def every_page(method, request, field: str, timeout: float = 10) -> Iterator:
    """Every item of a paged List RPC (AIP-158), asking for one page after another."""
    while True:
        try:
            page = method(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_call(exc) from None
        yield from getattr(page, field)
        if not page.next_page_token:
            return
        request.page_token = page.next_page_token


class GenerateStream(RetryingCall):
    """The responses of one Generate as they arrive. Iterating raises the call's typed error; a
    call that fails UNAVAILABLE before its first response is started again (`retries` times at
    most, backing off, within the deadline). `cancel()` stops it, on the server too."""

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> gateway_pb2.GenerateResponse:
        while True:
            try:
                response = next(self._call)
            except grpc.RpcError as exc:
                error, delay = self._failed(exc)
                if delay is None:
                    raise error from None
                time.sleep(delay)
                self._again()
                continue
            self._received = True
            return response

    def initial_metadata(self):
        return self._call.initial_metadata()

    def trailing_metadata(self):
        return self._call.trailing_metadata()


class Client:
    """Stubs for every llmos service, each channel presenting `api_key`. The gateway (the public
    door: `generate`, `identity`) is reached with `credentials` (plaintext without); the internal
    services with `service_credentials` (mTLS with a client certificate, in a suite that has them)."""

    def __init__(self, gateway: str = "127.0.0.1:50051", registry: str = "127.0.0.1:50053",
                 resources: str = "127.0.0.1:50054", monitor: str = "127.0.0.1:50056", *,
                 api_key: str | None = None, credentials: grpc.ChannelCredentials | None = None,
                 service_credentials: grpc.ChannelCredentials | None = None,
                 scheduler: str = "127.0.0.1:50052", retries: int = 3) -> None:
        self.retries = retries
        self._channels = [open_channel(gateway, api_key=api_key, credentials=credentials)] + [
            open_channel(address, api_key=api_key, credentials=service_credentials)
            for address in (registry, resources, monitor, scheduler)]
        self.gateway = gateway_pb2_grpc.GatewayServiceStub(self._channels[0])
        self.identity = identity_pb2_grpc.IdentityServiceStub(self._channels[0])
        self.registry = registry_pb2_grpc.RegistryServiceStub(self._channels[1])
        self.resources = resources_pb2_grpc.ResourceServiceStub(self._channels[2])
        self.monitor = monitor_pb2_grpc.MonitorServiceStub(self._channels[3])
        self.scheduler = scheduler_pb2_grpc.SchedulerServiceStub(self._channels[4])

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, model: str, *, prompt: str | None = None,
                 messages: list[tuple[str, str] | common_pb2.ChatMessage] | None = None, max_tokens: int = 0,
                 temperature: float = 0.0, seed: int | None = None, ignore_eos: bool = False,
                 request_id: str = "", conversation_id: str = "", timeout: float | None = None,
                 metadata: tuple = (), tools: list[dict] | None = None,
                 tool_choice: str | None = None) -> GenerateStream:
        """Streams the answer to a prompt (raw text) or a conversation of (role, content) turns
        within `timeout` seconds; with `tools`, calls come in the responses' `tool_calls` (see
        `generate_request`)."""
        request = generate_request(model, prompt=prompt, messages=messages, max_tokens=max_tokens,
                                   temperature=temperature, seed=seed, ignore_eos=ignore_eos, request_id=request_id,
                                   conversation_id=conversation_id, tools=tools, tool_choice=tool_choice)
        return self.stream(request, timeout=timeout, metadata=metadata)

    def stream(self, request: gateway_pb2.GenerateRequest, *, timeout: float | None = None,
               metadata: tuple = ()) -> GenerateStream:
        """Streams the answer to a GenerateRequest built by hand."""
        return GenerateStream(self.gateway, request, timeout, metadata, self.retries)

    def _unary(self, method, request, timeout: float):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_call(exc) from None

    def import_model(self, name: str, source: str, tag: str = "", base: str = "", task: str = "",
                     timeout: float = 600) -> registry_pb2.ImportModelResponse:
        """Imports a model (for `task`: generate, embed, classify or score; empty: what its files
        say), or with `base` a LoRA adapter of that model."""
        return self._unary(self.registry.ImportModel, registry_pb2.ImportModelRequest(
            name=name, tag=tag, source=source, base=base, task=task), timeout)

    def embed(self, model: str, inputs: list[str], *, dimensions: int = 0, truncate_prompt_tokens: int = 0,
              timeout: float = 120) -> gateway_pb2.EmbedResponse:
        """One vector per text, in order (`response.embeddings[i].values`)."""
        return self._unary(self.gateway.Embed, gateway_pb2.EmbedRequest(
            model=model, inputs=inputs, dimensions=dimensions, truncate_prompt_tokens=truncate_prompt_tokens), timeout)

    def classify(self, model: str, inputs: list[str], *, timeout: float = 120) -> gateway_pb2.ClassifyResponse:
        """Each text's label probabilities (`response.probabilities[i].values`, in `response.labels` order)."""
        return self._unary(self.gateway.Classify, gateway_pb2.ClassifyRequest(model=model, inputs=inputs), timeout)

    def score(self, model: str, query: str, documents: list[str], *,
              timeout: float = 120) -> gateway_pb2.ScoreResponse:
        """How well each document answers the query (`response.scores`, in order)."""
        return self._unary(self.gateway.Score, gateway_pb2.ScoreRequest(model=model, query=query,
                                                                        documents=documents), timeout)

    def set_alias(self, name: str, targets: dict[str, int] | str, rollback_window: float = 0.0,
                  timeout: float = 600) -> registry_pb2.SetAliasResponse:
        """Points alias `name` at one model, or splits it by weight ({"m:v1": 80, "m:v2": 20}); returns
        once the new versions are warm and the alias flipped."""
        pairs = {targets: 100} if isinstance(targets, str) else targets
        request = registry_pb2.SetAliasRequest(
            name=name, targets=[registry_pb2.AliasTarget(model=m, weight=w) for m, w in pairs.items()])
        if rollback_window:
            request.rollback_window.FromNanoseconds(int(rollback_window * 1e9))
        return self._unary(self.registry.SetAlias, request, timeout)

    def get_alias(self, name: str) -> registry_pb2.Alias:
        return self._unary(self.registry.GetAlias, registry_pb2.GetAliasRequest(name=name), 10).alias

    def list_aliases(self) -> list[registry_pb2.Alias]:
        return list(every_page(self.registry.ListAliases, registry_pb2.ListAliasesRequest(), "aliases"))

    def delete_alias(self, name: str) -> None:
        self._unary(self.registry.DeleteAlias, registry_pb2.DeleteAliasRequest(name=name), 10)

    def load_model(self, name: str, timeout: float = 600, quantize: str = "") -> registry_pb2.LoadModelResponse:
        return self._unary(self.registry.LoadModel, registry_pb2.LoadModelRequest(name=name, quantize=quantize),
                           timeout)

    def unload_model(self, name: str, timeout: float = 120) -> registry_pb2.UnloadModelResponse:
        return self._unary(self.registry.UnloadModel, registry_pb2.UnloadModelRequest(name=name), timeout)

    def get_model(self, name: str) -> common_pb2.Model:
        return self._unary(self.registry.GetModel, registry_pb2.GetModelRequest(name=name), 10).model

    def list_models(self) -> list[common_pb2.Model]:
        return list(every_page(self.registry.ListModels, registry_pb2.ListModelsRequest(), "models"))

    def scheduler_stats(self) -> scheduler_pb2.GetSchedulerStatsResponse:
        return self._unary(self.scheduler.GetSchedulerStats, scheduler_pb2.GetSchedulerStatsRequest(), 10)

    def cluster_health(self) -> monitor_pb2.GetClusterHealthResponse:
        return self._unary(self.monitor.GetClusterHealth, monitor_pb2.GetClusterHealthRequest(), 10)

    def nodes(self) -> list[resources_pb2.Node]:
        return list(every_page(self.resources.ListNodes, resources_pb2.ListNodesRequest(), "nodes"))


__all__ = ["Client", "GenerateStream", "LlmosError", "every_page"]
