"""Client channels to other llmos services, traced, one per address."""

from __future__ import annotations

import grpc
from opentelemetry.sdk.trace import TracerProvider

from .server import MAX_MESSAGE_BYTES
from .telemetry import client_interceptors


class Channels:
    """A cache of traced `grpc.aio` channels keyed by address."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                address, interceptors=client_interceptors(self._provider),
                options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                         ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
