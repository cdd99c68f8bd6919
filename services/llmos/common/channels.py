"""Client channels to other llmos services: traced, over mTLS with this service's
certificate when it has one, one per address. A peer's failure reaches the caller as the
typed error it was (`LlmosError`, its code, reason and details kept) from one interceptor,
so no outbound adapter catches `AioRpcError` itself. The one exception is the gateway's token
stream from a worker, read on a bare channel (`traced=False`) whose caller traces the call and
types its errors itself (`telemetry.client_span`, `status.from_rpc_error`)."""

from __future__ import annotations

import json
from typing import TypeVar

import grpc
from opentelemetry.sdk.trace import TracerProvider

from .security import Security
from .server import MAX_MESSAGE_BYTES
from .status import from_rpc_error
from .telemetry import client_interceptors

S = TypeVar("S")


class _TypedUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """A failed unary call raises the peer's typed error."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        call = await continuation(client_call_details, request)
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, client_call_details.method) from None


class _TypedStream(grpc.aio.UnaryStreamClientInterceptor):
    """A failed server stream raises the peer's typed error where it is read."""

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        call = await continuation(client_call_details, request)

        async def responses():
            try:
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc, client_call_details.method) from None

        return responses()


def typed_errors() -> list:
    return [_TypedUnary(), _TypedStream()]


# A peer that went away is usually back within seconds (restarted by its supervisor): try it
# again every 0.2 s growing to 2 s at most, not gRPC's default of up to 120 s, during which
# every call on the channel fails at once.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                     ("grpc.max_reconnect_backoff_ms", 2000)]
# A bare channel carries calls that stay open as long as the gateway runs (`GenerateMany`): a
# keepalive ping every 90 s while one is open (servers allow one a minute), so a peer gone without a
# word (its host lost, no reset) fails the call within two minutes instead of never.
KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 90_000), ("grpc.keepalive_timeout_ms", 20_000),
                     ("grpc.keepalive_permit_without_calls", 0)]


class Channels:
    """A cache of traced `grpc.aio` channels keyed by address."""

    def __init__(self, provider: TracerProvider, security: Security | None = None,
                 public: tuple[str, ...] = ()) -> None:
        self._provider = provider
        self._security = security or Security("client")
        self._public = set(public)      # gateway addresses: their public port
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[grpc.aio.Channel, type], object] = {}

    def get(self, address: str, authority: str = "", traced: bool = True) -> grpc.aio.Channel:
        """The channel to `address`; `authority`: the name its certificate is checked against
        when that is not the address's own (a replica reached at its pod's IP, named by its
        service's name). `traced=False`: a channel of its own without interceptors, for a hot
        stream whose every message would otherwise pass through two more generators (the tracing
        interceptor's and the typed errors'): its caller makes the client span and types errors."""
        key = f"{address}#{authority}" if authority else address
        if not traced:
            key += "#bare"
        channel = self._channels.get(key)
        if channel is None:
            target, replicas = replicas_target(address)
            channel = self._security.channel(
                target, address in self._public,
                interceptors=[*typed_errors(), *client_interceptors(self._provider)] if traced else [],
                options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                         ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                         *RECONNECT_OPTIONS, *replicas, *([] if traced else KEEPALIVE_OPTIONS),
                         *([("grpc.ssl_target_name_override", authority)] if authority else [])])
            self._channels[key] = channel
        return channel

    def stub(self, stub_class: type[S], address: str, authority: str = "", traced: bool = True) -> S:
        """A `stub_class` stub over the channel to `address` (see `get`), made once per channel: a stub
        makes a callable for every method of its service, too much to do for each call."""
        channel = self.get(address, authority, traced)
        stub = self._stubs.get((channel, stub_class))
        if stub is None:
            stub = self._stubs[channel, stub_class] = stub_class(channel)
        return stub

    async def close(self) -> None:
        self._stubs.clear()
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


# Replicas that each serve any call (registries) named as one comma-separated list of IP
# addresses: one channel over all of them, on one replica at a time (pick_first, so a client's
# calls and its watches meet the same replica) moving to the next when it goes away. A call that
# never reached a replica is retried by gRPC itself; one that found it going away (UNAVAILABLE)
# is tried again only if it changes nothing (reads and heartbeats): a load or a flip is not
# repeated behind its caller's back.
IDEMPOTENT = {"llmos.v1.RegistryService": ("GetModel", "ListModels", "ListWorkers", "GetAlias", "ListAliases",
                                           "RegisterWorker")}
REPLICAS_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"pick_first": {}}],
    "methodConfig": [{"name": [{"service": service, "method": method} for service, methods in IDEMPOTENT.items()
                               for method in methods],
                      "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "0.5s",
                                      "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]})


def replicas_target(address: str) -> tuple[str, list[tuple[str, str | int]]]:
    """(the gRPC target for `address`, the channel options it needs): "a:1,b:2" is one target over
    both addresses, whose certificates are checked against the first's host."""
    if "," not in address:
        return address, []
    addresses = [a.strip() for a in address.split(",") if a.strip()]
    scheme = "ipv6" if addresses[0].startswith("[") else "ipv4"
    return f"{scheme}:{','.join(addresses)}", [("grpc.service_config", REPLICAS_SERVICE_CONFIG),
                                               ("grpc.default_authority", addresses[0])]


class _Bearer:
    """Adds `authorization: Bearer <key>` to every call of a `grpc.aio` channel."""

    def __init__(self, key: str) -> None:
        self._entry = ("authorization", f"Bearer {key}")

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(d.metadata or ()), self._entry)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


class _BearerUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _BearerStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    """(grpc.aio files each interceptor under one kind of call only.)"""

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _BearerStreamingRequests(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _BearerBothWays(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def bearer_interceptors(key: str) -> list:
    """The key on calls of every kind (`GenerateMany` streams its requests)."""
    return [_BearerUnary(key), _BearerStream(key), _BearerStreamingRequests(key), _BearerBothWays(key)]


def open_aio_channel(address: str, tls_dir: str | None = None, api_key: str | None = None,
                     public: bool = False) -> grpc.aio.Channel:
    """A channel as a client outside the suite opens one: mTLS with the certificate in `tls_dir`
    (plaintext to a public port on loopback), every call carrying `api_key`."""
    security = Security("client", tls_dir or "")
    return security.channel(address, public, interceptors=bearer_interceptors(api_key) if api_key else None)
