"""gRPC face of the registry."""

from __future__ import annotations

import asyncio
import contextlib

from llmos.common.auth import require_worker
from llmos.common.convert import optional_seconds, timestamp
from llmos.common.errors import InvalidArgument
from llmos.common.names import parse_model_ref
from llmos.common.paging import page
from llmos.v1 import registry_pb2, registry_pb2_grpc

from . import events
from .convert import alias_to_proto, model_to_proto, placement_to_proto
from .models import ModelRegistry
from .rollout import Rollouts

_KINDS = {kind: getattr(registry_pb2.WatchModelsResponse, f"KIND_{kind.upper()}") for kind in events.KINDS}


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """A call that changes something answers once this replica's watchers have its events."""

    def __init__(self, registry: ModelRegistry, rollouts: Rollouts) -> None:
        self.registry = registry
        self.rollouts = rollouts

    async def ImportModel(self, request, context):
        view, created = await self.registry.import_model(request.name, request.tag, request.source, request.base,
                                                         request.task)
        await self.registry.settle()
        return registry_pb2.ImportModelResponse(model=model_to_proto(view), created=created)

    async def GetModel(self, request, context):
        view, alias = await self.registry.route(request.name, request.route_key)
        return registry_pb2.GetModelResponse(model=model_to_proto(view), alias=str(alias) if alias else "")

    async def ListModels(self, request, context):
        views, token = await self.registry.list(request.page_size, request.page_token)
        return registry_pb2.ListModelsResponse(models=[model_to_proto(v) for v in views],
                                               next_page_token=token)

    async def LoadModel(self, request, context):
        keep_alive = optional_seconds(request, "keep_alive")
        if request.hold:
            if keep_alive is None or keep_alive <= 0:
                raise InvalidArgument.field("keep_alive", "a hold needs a keep_alive of more than 0")
            view, placement = await self.registry.load(request.name, request.replicas, hold=keep_alive,
                                                       quantize=request.quantize)
        else:
            view, placement = await self.registry.load(request.name, request.replicas, keep_alive,
                                                       quantize=request.quantize)
        await self.registry.settle()
        return registry_pb2.LoadModelResponse(model=model_to_proto(view),
                                              placement=placement_to_proto(placement))

    async def UnloadModel(self, request, context):
        view = await self.registry.unload(request.name)
        await self.registry.settle()
        return registry_pb2.UnloadModelResponse(model=model_to_proto(view))

    async def DeleteModel(self, request, context):
        await self.registry.delete(request.name)
        await self.registry.settle()
        return registry_pb2.DeleteModelResponse()

    async def RegisterWorker(self, request, context):
        require_worker(request.worker_id)
        await self.registry.register_worker(request.worker_id, request.address, request.node,
                                            request.incarnation, list(request.loaded_models),
                                            request.metrics_address, dict(request.quantizations))
        return registry_pb2.RegisterWorkerResponse()

    async def WatchModels(self, request, context):
        name = str(parse_model_ref(request.name, "name")) if request.name else ""
        events = self.registry.events.watch(name)
        # Subscribed before the client hears that the watch is live (initial metadata): a call it
        # makes after that is seen from its first event on.
        pending = asyncio.ensure_future(anext(events))
        try:
            await asyncio.sleep(0)
            await context.send_initial_metadata(())
            while True:
                event = await pending
                yield registry_pb2.WatchModelsResponse(model=event.model, kind=_KINDS[event.kind],
                                                       worker_id=event.worker_id, reason=event.reason,
                                                       time=timestamp(event.time))
                pending = asyncio.ensure_future(anext(events))
        finally:
            pending.cancel()
            with contextlib.suppress(BaseException):      # (cancelled, or the watch's own error)
                await pending
            await events.aclose()

    async def ListWorkers(self, request, context):
        workers, token = page(self.registry.workers.values(), lambda w: w.worker_id, request.page_size,
                              request.page_token)
        return registry_pb2.ListWorkersResponse(next_page_token=token, workers=[
            registry_pb2.ListWorkersResponse.Worker(worker_id=w.worker_id, address=w.address, node=w.node,
                                                    metrics_address=w.metrics_address) for w in workers])

    async def SetAlias(self, request, context):
        window = optional_seconds(request, "rollback_window") or 0.0
        record, changed = await self.rollouts.set(request.name, [(t.model, t.weight) for t in request.targets],
                                                  window)
        await self.registry.settle()
        return registry_pb2.SetAliasResponse(alias=alias_to_proto(record), changed=changed)

    async def GetAlias(self, request, context):
        return registry_pb2.GetAliasResponse(alias=alias_to_proto(await self.rollouts.get(request.name)))

    async def ListAliases(self, request, context):
        records, token = await self.rollouts.list(request.page_size, request.page_token)
        return registry_pb2.ListAliasesResponse(aliases=[alias_to_proto(r) for r in records], next_page_token=token)

    async def DeleteAlias(self, request, context):
        await self.rollouts.delete(request.name)
        await self.registry.settle()
        return registry_pb2.DeleteAliasResponse()


def register(host, registry: ModelRegistry, rollouts: Rollouts) -> None:
    servicer = RegistryServicer(registry, rollouts)
    host.add(registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
             lambda server: registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server))
