"""`llmos bench`'s trace of one stream: the time to first token runs to the first text, as the HTTP client (which
sees only text) measures it, so the gRPC doors and an OpenAI peer are measured alike."""

import asyncio

import grpc

from llmos.cli.bench import Trace, run_suite
from llmos.v1 import gateway_pb2, gateway_pb2_grpc


def test_a_first_token_without_text_does_not_end_the_time_to_first_token():
    trace = Trace(started=10.0, arrivals=[(10.02, 1), (10.03, 1), (10.04, 1)], shown=10.03)
    assert abs(trace.ttft - 0.03) < 1e-9
    assert trace.tokens == 3, "every token still counts"
    assert len(trace.gaps()) == 2


def test_without_text_seen_the_first_token_ends_it():
    assert abs(Trace(started=1.0, arrivals=[(1.5, 2)]).ttft - 0.5) < 1e-9


def test_through_a_grpc_door_the_first_token_without_text_is_counted_but_does_not_end_it():
    """A real gRPC server whose stream gives a token without text (a special token) first, then text 50 ms later:
    the bench counts both tokens, and its time to first token runs to the text."""
    class Door(gateway_pb2_grpc.GatewayServiceServicer):
        async def Generate(self, request, context):
            yield gateway_pb2.GenerateResponse(token_ids=[2], text="")
            await asyncio.sleep(0.05)
            yield gateway_pb2.GenerateResponse(token_ids=[5], text="Hi")

    async def main():
        server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(Door(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await run_suite("door", "gateway", f"127.0.0.1:{port}", "m", [("p", 2)], 1)
        finally:
            await server.stop(None)

    result = asyncio.run(main())
    assert result.tokens == 2
    assert result.ttft[0] >= 0.05
