"""The public port's stream limit serves a client that uses many streams of one connection at once
while the server's event loop lags (grpc-core counts a stream against the limit until the server
has released its call, after the client saw it end)."""

import asyncio
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.common.server import PUBLIC_STREAMS_PER_CONNECTION, server_options

CONCURRENCY = 100        # the old limit: a client using every stream it was allowed
ROUNDS = 20


class _OneMessage(health_pb2_grpc.HealthServicer):
    async def Watch(self, request, context):
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _serve_with_a_busy_loop(ready: threading.Event, state: dict) -> None:
    async def main() -> None:
        server = grpc.aio.server(options=server_options(public=True))
        health_pb2_grpc.add_HealthServicer_to_server(_OneMessage(), server)
        state["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        state["stop"] = asyncio.Event()

        async def busy() -> None:           # 30 ms of work on the loop every 10 ms, as a loaded gateway's
            while not state["stop"].is_set():
                time.sleep(0.03)
                await asyncio.sleep(0.01)

        task = asyncio.ensure_future(busy())
        state["loop"] = asyncio.get_running_loop()
        ready.set()
        await state["stop"].wait()
        await task
        await server.stop(None)

    asyncio.run(main())


def test_a_client_at_100_streams_whose_streams_end_and_reopen_together_is_never_refused():
    assert PUBLIC_STREAMS_PER_CONNECTION >= 2 * CONCURRENCY
    ready, state = threading.Event(), {}
    thread = threading.Thread(target=_serve_with_a_busy_loop, args=(ready, state), daemon=True)
    thread.start()
    assert ready.wait(10)
    errors: list[str] = []

    async def client() -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{state['port']}") as channel:
            await channel.channel_ready()
            stub = health_pb2_grpc.HealthStub(channel)
            served = 0

            async def one() -> None:
                nonlocal served
                for _ in range(ROUNDS):
                    try:
                        async for _ in stub.Watch(health_pb2.HealthCheckRequest(), timeout=30):
                            served += 1
                    except grpc.RpcError as exc:
                        errors.append(f"{exc.code().name}: {exc.details()}")

            await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
            return served

    try:
        served = asyncio.run(client())
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)
    # (With the limit at 100, this client had about 1% of its streams refused: UNAVAILABLE, "Stream
    # removed (RST_STREAM with error code 7)".)
    assert errors == []
    assert served == CONCURRENCY * ROUNDS
