"""The asyncio client: the same calls as `llmos_client.Client`, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from ._channel import open_aio_channel
from ._requests import RetryingCall, generate_request
from .errors import from_call
from .v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, registry_pb2, registry_pb2_grpc


class AsyncGenerateStream(RetryingCall):
    """The responses of one Generate, for `async for`; the same retry rule as the sync stream
    (UNAVAILABLE before the first response only). Cancelling the task while it awaits the next
    response, or `cancel()`, stops the generation on the server too."""

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> gateway_pb2.GenerateResponse:
        while True:
            try:
                response = await self._call.read()
            except asyncio.CancelledError:
                self.cancel()
                raise
            except grpc.RpcError as exc:
                error, delay = self._failed(exc)
                if delay is None:
                    raise error from None
                await asyncio.sleep(delay)
                self._again()
                continue
            if response is grpc.aio.EOF:
                raise StopAsyncIteration
            self._received = True
            return response


class AsyncClient:
    """The gateway (and the registry, for model management) over asyncio channels that present
    `api_key` on every call."""

    def __init__(self, gateway: str = "127.0.0.1:50051", registry: str = "127.0.0.1:50053", *,
                 api_key: str | None = None, credentials: grpc.ChannelCredentials | None = None,
                 service_credentials: grpc.ChannelCredentials | None = None, retries: int = 3) -> None:
        self.retries = retries
        self._channels = [open_aio_channel(gateway, api_key=api_key, credentials=credentials),
                          open_aio_channel(registry, api_key=api_key, credentials=service_credentials)]
        self.gateway = gateway_pb2_grpc.GatewayServiceStub(self._channels[0])
        self.registry = registry_pb2_grpc.RegistryServiceStub(self._channels[1])

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def generate(self, model: str, *, prompt: str | None = None,
                 messages: list[tuple[str, str] | common_pb2.ChatMessage] | None = None, max_tokens: int = 0,
                 temperature: float = 0.0, seed: int | None = None, ignore_eos: bool = False,
                 request_id: str = "", conversation_id: str = "", timeout: float | None = None,
                 metadata: tuple = (), tools: list[dict] | None = None,
                 tool_choice: str | None = None) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        request = generate_request(model, prompt=prompt, messages=messages, max_tokens=max_tokens,
                                   temperature=temperature, seed=seed, ignore_eos=ignore_eos, request_id=request_id,
                                   conversation_id=conversation_id, tools=tools, tool_choice=tool_choice)
        return self.stream(request, timeout=timeout, metadata=metadata)

    def stream(self, request: gateway_pb2.GenerateRequest, *, timeout: float | None = None,
               metadata: tuple = ()) -> AsyncGenerateStream:
        return AsyncGenerateStream(self.gateway, request, timeout, metadata, self.retries)

    async def _unary(self, method, request, timeout: float):
        try:
            return await method(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_call(exc) from None

    async def import_model(self, name: str, source: str, tag: str = "",
                           timeout: float = 600) -> registry_pb2.ImportModelResponse:
        return await self._unary(self.registry.ImportModel,
                                 registry_pb2.ImportModelRequest(name=name, tag=tag, source=source), timeout)

    async def load_model(self, name: str, timeout: float = 600) -> registry_pb2.LoadModelResponse:
        return await self._unary(self.registry.LoadModel, registry_pb2.LoadModelRequest(name=name), timeout)

    async def embed(self, model: str, inputs: list[str], *, dimensions: int = 0, truncate_prompt_tokens: int = 0,
                    timeout: float = 120) -> gateway_pb2.EmbedResponse:
        """One vector per text, in order (`response.embeddings[i].values`)."""
        return await self._unary(self.gateway.Embed, gateway_pb2.EmbedRequest(
            model=model, inputs=inputs, dimensions=dimensions, truncate_prompt_tokens=truncate_prompt_tokens), timeout)

    async def get_model(self, name: str) -> common_pb2.Model:
        return (await self._unary(self.registry.GetModel, registry_pb2.GetModelRequest(name=name), 10)).model
