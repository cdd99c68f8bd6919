"""A worker that stops with a `GenerateMany` call open (the gateway's, which never ends on its own):
a generation started while it stops is refused UNAVAILABLE / WORKER_STOPPING (the gateway sends it to
another worker), the call ends once the generations it ran have, and the worker's stop returns then,
not at the end of its grace (ten minutes here). A suite of its own: this one's worker stops."""

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2

from llmos.v1 import common_pb2, registry_pb2, registry_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.support.inprocess import start_in_process

pytestmark = pytest.mark.asyncio(loop_scope="function")


def start(id_: int, window: int = 0) -> worker_pb2.GenerateManyRequest:
    return worker_pb2.GenerateManyRequest(start=worker_pb2.StartGeneration(
        id=id_, window=window, request=worker_pb2.GenerateTokensRequest(
            request_id=f"stop-{id_}", model="tiny:latest", prompt="Once upon a time",
            sampling=common_pb2.SamplingParams(max_tokens=200, ignore_eos=True))))


async def test_a_stopping_worker_refuses_new_generations_on_an_open_call_and_ends_it(tmp_path, tiny_model_dir):
    suite = await start_in_process(tmp_path, {
        "registry": {"allowed_roots": (str(tiny_model_dir.parent),), "worker_dtype": "float32"},
        "worker": {"worker_id": "w1", "dtype": "float32", "register_interval_seconds": 0.2},
        "monitor": {"probe_interval_seconds": 0},
    })
    channels = [suite.channel("registry"), suite.channel("worker", tls_as="gateway")]
    try:
        registry = registry_pb2_grpc.RegistryServiceStub(channels[0])
        await registry.ImportModel(registry_pb2.ImportModelRequest(name="tiny", source=str(tiny_model_dir)))
        await registry.LoadModel(registry_pb2.LoadModelRequest(name="tiny"))
        call = worker_pb2_grpc.WorkerServiceStub(channels[1]).GenerateMany()
        await call.write(start(1, window=1))        # one piece, then it waits (and stays running) for its reader
        pieces, arrived = [], asyncio.Event()

        async def read():
            async for response in call:
                pieces.extend(response.pieces)
                arrived.set()

        reader = asyncio.create_task(read())
        await asyncio.wait_for(arrived.wait(), 30)
        worker = suite.services["worker"]
        stopping = asyncio.create_task(worker.stop(600.0))
        await asyncio.wait_for(worker.host.stopping.wait(), 5)
        arrived.clear()
        await call.write(start(2))
        await asyncio.wait_for(arrived.wait(), 10)
        (refused,) = [p for p in pieces if p.id == 2]
        assert refused.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        info = error_details_pb2.ErrorInfo()
        assert refused.error.details[0].Unpack(info) and info.reason == "WORKER_STOPPING"
        assert not reader.done()                    # generation 1 still runs: the call stays
        await call.write(worker_pb2.GenerateManyRequest(cancel=1))
        await asyncio.wait_for(reader, 10)          # its last generation gone, the call ends, OK
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 120)       # (a stop that waited out its grace would hang here)
    finally:
        for channel in channels:
            await channel.close()
        await suite.stop(grace=1.0)
