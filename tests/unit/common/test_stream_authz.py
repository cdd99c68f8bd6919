"""Calls that stream their requests (client streaming, bidirectional) meet the same
authorization and error mapping as the others, on a real gRPC server with the services'
interceptors: refused without their rule or without a key their rule allows, answered with one."""

import asyncio

import grpc
import pytest

from llmos.common import authz
from llmos.common.auth import Authenticator, AuthInterceptor, Guard
from llmos.common.keystore import KeyStore, Role, Tenant
from llmos.common.status import ErrorInterceptor, from_rpc_error
from llmos.common.store import Store, sqlite_url

# "Orphan" has no rule: refused whoever calls.
TABLE = {"/test.Streams/Chat": authz.Rule(Role.USER), "/test.Streams/Collect": authz.Rule(Role.USER)}


async def _chat(requests, context):
    async for request in requests:
        yield request.upper()


async def _collect(requests, context):
    return b"".join([request async for request in requests])


def test_calls_that_stream_their_requests_are_decided_by_the_table_too(tmp_path):
    store = Store(sqlite_url(tmp_path / "store.db"))
    store.migrate()
    keys = KeyStore(store)
    keys.create_tenant(Tenant("acme"))
    key = keys.create_key("acme", Role.USER)[1]
    handlers = grpc.method_handlers_generic_handler("test.Streams", {
        "Chat": grpc.stream_stream_rpc_method_handler(_chat),
        "Collect": grpc.stream_unary_rpc_method_handler(_collect),
        "Orphan": grpc.stream_stream_rpc_method_handler(_chat)})

    async def main() -> None:
        server = grpc.aio.server(interceptors=[ErrorInterceptor(), AuthInterceptor(Guard(Authenticator(keys),
                                                                                         table=TABLE))])
        server.add_generic_rpc_handlers((handlers,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                def bearer(k: str) -> tuple:
                    return (("authorization", f"Bearer {k}"),) if k else ()

                # (A refused call sends no requests: a request still being sent when the server has
                # already answered fails on the client's side as INTERNAL, whatever the answer.)
                async def chat(name: str, k: str, requests: tuple = ()) -> list[bytes]:
                    return [r async for r in channel.stream_stream(f"/test.Streams/{name}")(
                        iter(requests), metadata=bearer(k), timeout=10)]

                async def collect(k: str, requests: tuple = ()) -> bytes:
                    return await channel.stream_unary("/test.Streams/Collect")(iter(requests), metadata=bearer(k),
                                                                               timeout=10)

                assert await chat("Chat", key, (b"a", b"b")) == [b"A", b"B"]
                assert await collect(key, (b"a", b"b")) == b"ab"
                refusals = [(chat("Chat", ""), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING"),
                            (collect(""), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING"),
                            (chat("Orphan", key), grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")]
                for refused, code, reason in refusals:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await refused
                    assert caught.value.code() == code
                    assert from_rpc_error(caught.value).reason == reason
        finally:
            await server.stop(None)

    try:
        asyncio.run(main())
    finally:
        keys.close()
