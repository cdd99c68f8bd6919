"""The registry's ports to its peers: the workers it places models on, and the resource manager.

Failures arrive as typed errors (`LlmosError`) from the channels' interceptor.
"""

from __future__ import annotations

from llmos.common.channels import Channels
from llmos.common.convert import seconds
from llmos.common.paging import MAX_PAGE, every_page
from llmos.v1 import resources_pb2, resources_pb2_grpc, worker_pb2, worker_pb2_grpc


class GrpcWorkers:
    """The registry's port to workers, over gRPC."""

    def __init__(self, channels: Channels, load_timeout: float) -> None:
        self._channels = channels
        self._timeout = load_timeout

    async def start_model(self, address: str, model: str, path: str, estimated_bytes: int,
                          quantize: str = "", task: str = "generate") -> int:
        stub = self._channels.stub(worker_pb2_grpc.WorkerServiceStub, address)
        response = await stub.StartModel(
            worker_pb2.StartModelRequest(model=model, path=path, estimated_bytes=estimated_bytes, quantize=quantize,
                                         task=task),
            timeout=self._timeout)
        return response.measured_bytes

    async def stop_model(self, address: str, model: str) -> None:
        stub = self._channels.stub(worker_pb2_grpc.WorkerServiceStub, address)
        await stub.StopModel(worker_pb2.StopModelRequest(model=model), timeout=self._timeout)

    async def activity(self, address: str) -> dict[str, tuple[int, float]]:
        stub = self._channels.stub(worker_pb2_grpc.WorkerServiceStub, address)
        status = await stub.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest(), timeout=5)
        return {m.model: (m.running + m.waiting, seconds(m.last_request_time)) for m in status.models}


class GrpcResources:
    """The registry's port to the resource manager."""

    def __init__(self, channels: Channels, address: str) -> None:
        self._stub = resources_pb2_grpc.ResourceServiceStub(channels.get(address))

    async def largest_budget(self) -> tuple[int, str]:
        nodes = await every_page(self._stub.ListNodes, resources_pb2.ListNodesRequest(page_size=MAX_PAGE), "nodes", 5)
        return max(((d.budget_bytes, f"{n.name}/{d.name}") for n in nodes for d in n.devices),
                   default=(0, "none"))
