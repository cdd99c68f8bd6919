"""The CLI's progress lines against a real gRPC registry whose watch hands its events over only after the
call they belong to has answered: the lines still show every phase, and a call that says it changed
nothing does not wait for one."""

from __future__ import annotations

import io
import threading
import time
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest

from llmos.cli import Progress
from llmos.v1 import registry_pb2, registry_pb2_grpc

Kind = registry_pb2.WatchModelsResponse


class Registry(registry_pb2_grpc.RegistryServiceServicer):
    """LoadModel answers at once; the watch sends "loading" and "ready" `late` seconds after that."""

    def __init__(self, late: float) -> None:
        self.late = late
        self.answered = threading.Event()

    def WatchModels(self, request, context):
        context.send_initial_metadata(())
        self.answered.wait(10)
        time.sleep(self.late)
        yield Kind(model=request.name, kind=Kind.KIND_LOADING, worker_id="w1")
        time.sleep(self.late)
        yield Kind(model=request.name, kind=Kind.KIND_READY, worker_id="w1")
        while context.is_active():
            time.sleep(0.02)

    def LoadModel(self, request, context):
        self.answered.set()
        return registry_pb2.LoadModelResponse()


@pytest.fixture
def registry():
    def serve(late: float):
        servicer = Registry(late)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, channel))
        return SimpleNamespace(registry=registry_pb2_grpc.RegistryServiceStub(channel))
    started: list = []
    yield serve
    for server, channel in started:
        channel.close()
        server.stop(None)


def test_events_that_arrive_after_the_answer_are_all_shown(registry):
    client = registry(late=0.2)
    out = io.StringIO()
    with Progress(client, "m", "loading", out=out):
        client.registry.LoadModel(registry_pb2.LoadModelRequest(name="m"), timeout=10)
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["loading m: loading on w1", "loading m: ready on w1"], lines


def test_a_call_that_changed_nothing_does_not_wait_for_a_phase(registry):
    client = registry(late=3.0)
    out = io.StringIO()
    with Progress(client, "m", "loading", out=out) as progress:
        client.registry.LoadModel(registry_pb2.LoadModelRequest(name="m"), timeout=10)
        progress.changed = False
        answered = time.monotonic()
    waited = time.monotonic() - answered
    assert out.getvalue() == ""
    # Not told, it would wait a second for a phase to begin (the watch's first event is 3 s away).
    assert waited < 0.9, waited
