"""gRPC face of the registry."""

from __future__ import annotations

import grpc

from llmos.common.channels import Channels
from llmos.common.convert import optional_seconds, seconds, timestamp
from llmos.common.errors import InvalidArgument
from llmos.common.names import parse_model_ref
from llmos.common.status import from_rpc_error
from llmos.v1 import registry_pb2, registry_pb2_grpc, resources_pb2, resources_pb2_grpc, worker_pb2, worker_pb2_grpc

from . import events
from .convert import model_to_proto, placement_to_proto
from .models import ModelRegistry

_KINDS = {kind: getattr(registry_pb2.WatchModelsResponse, f"KIND_{kind.upper()}") for kind in events.KINDS}


class GrpcWorkers:
    """The registry's port to workers, over gRPC."""

    def __init__(self, channels: Channels, load_timeout: float) -> None:
        self._channels = channels
        self._timeout = load_timeout

    async def start_model(self, address: str, model: str, path: str, estimated_bytes: int) -> int:
        stub = worker_pb2_grpc.WorkerServiceStub(self._channels.get(address))
        try:
            response = await stub.StartModel(
                worker_pb2.StartModelRequest(model=model, path=path, estimated_bytes=estimated_bytes),
                timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return response.measured_bytes

    async def stop_model(self, address: str, model: str) -> None:
        stub = worker_pb2_grpc.WorkerServiceStub(self._channels.get(address))
        try:
            await stub.StopModel(worker_pb2.StopModelRequest(model=model), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def activity(self, address: str) -> dict[str, tuple[int, float]]:
        stub = worker_pb2_grpc.WorkerServiceStub(self._channels.get(address))
        try:
            status = await stub.GetWorkerStatus(worker_pb2.GetWorkerStatusRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return {m.model: (m.running + m.waiting, seconds(m.last_request_time)) for m in status.models}


class GrpcResources:
    """The registry's port to the resource manager."""

    def __init__(self, channels: Channels, address: str) -> None:
        self._stub = resources_pb2_grpc.ResourceServiceStub(channels.get(address))

    async def largest_budget(self) -> tuple[int, str]:
        try:
            response = await self._stub.ListNodes(resources_pb2.ListNodesRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return max(((d.budget_bytes, f"{n.name}/{d.name}") for n in response.nodes for d in n.devices),
                   default=(0, "none"))


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def ImportModel(self, request, context):
        view, created = await self.registry.import_model(request.name, request.tag, request.source)
        return registry_pb2.ImportModelResponse(model=model_to_proto(view), created=created)

    async def GetModel(self, request, context):
        return registry_pb2.GetModelResponse(model=model_to_proto(self.registry.get(request.name)))

    async def ListModels(self, request, context):
        views, token = self.registry.list(request.page_size, request.page_token)
        return registry_pb2.ListModelsResponse(models=[model_to_proto(v) for v in views],
                                               next_page_token=token)

    async def LoadModel(self, request, context):
        keep_alive = optional_seconds(request, "keep_alive")
        if request.hold:
            if keep_alive is None or keep_alive <= 0:
                raise InvalidArgument.field("keep_alive", "a hold needs a keep_alive of more than 0")
            view, placement = await self.registry.load(request.name, request.replicas, hold=keep_alive)
        else:
            view, placement = await self.registry.load(request.name, request.replicas, keep_alive)
        return registry_pb2.LoadModelResponse(model=model_to_proto(view),
                                              placement=placement_to_proto(placement))

    async def UnloadModel(self, request, context):
        return registry_pb2.UnloadModelResponse(model=model_to_proto(await self.registry.unload(request.name)))

    async def DeleteModel(self, request, context):
        self.registry.delete(request.name)
        return registry_pb2.DeleteModelResponse()

    async def RegisterWorker(self, request, context):
        self.registry.register_worker(request.worker_id, request.address, request.node,
                                      request.incarnation, list(request.loaded_models), request.metrics_address)
        return registry_pb2.RegisterWorkerResponse()

    async def WatchModels(self, request, context):
        name = str(parse_model_ref(request.name, "name")) if request.name else ""
        async for event in self.registry.events.watch(name):
            yield registry_pb2.WatchModelsResponse(model=event.model, kind=_KINDS[event.kind],
                                                   worker_id=event.worker_id, reason=event.reason,
                                                   time=timestamp(event.time))

    async def ListWorkers(self, request, context):
        return registry_pb2.ListWorkersResponse(workers=[
            registry_pb2.ListWorkersResponse.Worker(worker_id=w.worker_id, address=w.address, node=w.node,
                                                    metrics_address=w.metrics_address)
            for w in sorted(self.registry.workers.values(), key=lambda w: w.worker_id)])


def register(host, registry: ModelRegistry) -> None:
    servicer = RegistryServicer(registry)
    host.add(registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
             lambda server: registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server))
