"""Channels that present an API key on every call (`authorization: Bearer <key>`)."""

from __future__ import annotations

import grpc

# Generations and model listings can be large; llmos's servers take messages of this size.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def _with_key(details, key: str):
    return details._replace(metadata=[*(details.metadata or ()), ("authorization", f"Bearer {key}")])


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, key: str) -> None:
        self._key = key

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_key(details, self._key), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_key(details, self._key), request)


class _AsyncBearerUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, key: str) -> None:
        self._key = key

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_key(details, self._key), request)


class _AsyncBearerStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, key: str) -> None:
        self._key = key

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_key(details, self._key), request)


def open_channel(address: str, *, api_key: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A channel to `address`: TLS with `credentials` (plaintext without), every call carrying
    `api_key`."""
    channel = (grpc.secure_channel(address, credentials, options=_OPTIONS) if credentials is not None
               else grpc.insecure_channel(address, options=_OPTIONS))
    return grpc.intercept_channel(channel, _Bearer(api_key)) if api_key else channel


def open_aio_channel(address: str, *, api_key: str | None = None,
                     credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """The asyncio form of `open_channel`."""
    interceptors = [_AsyncBearerUnary(api_key), _AsyncBearerStream(api_key)] if api_key else None
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=_OPTIONS, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=_OPTIONS, interceptors=interceptors)
