"""gRPC face of the resource manager."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc

from llmos.common.auth import require_worker
from llmos.common.convert import duration, optional_seconds, timestamp
from llmos.common.errors import InvalidArgument
from llmos.common.names import lease_holder_worker
from llmos.common.paging import page
from llmos.common.store import off_loop
from llmos.v1 import resources_pb2, resources_pb2_grpc

from .leases import Lease
from .manager import NodeView, ResourceManager

_KINDS = {"cpu": resources_pb2.Device.KIND_CPU, "gpu": resources_pb2.Device.KIND_GPU}


def _require_holder(holder: str) -> None:
    """A worker holds, renews and releases only leases under its own prefix ("worker/<id>/")."""
    require_worker(lease_holder_worker(holder))


def lease_to_proto(lease: Lease) -> resources_pb2.Lease:
    message = resources_pb2.Lease(name=lease.name, holder=lease.holder, node=lease.node,
                                  device=lease.device, bytes=lease.bytes,
                                  create_time=timestamp(lease.create_time))
    if lease.ttl:
        message.ttl.CopyFrom(duration(lease.ttl))
        message.expire_time.CopyFrom(timestamp(lease.expire_time))
    return message


def node_to_proto(node: NodeView) -> resources_pb2.Node:
    return resources_pb2.Node(name=node.name, devices=[
        resources_pb2.Device(name=d.info.name, kind=_KINDS[d.info.kind], product=d.info.product,
                             total_bytes=d.info.total_bytes, used_bytes=d.info.used_bytes,
                             leased_bytes=d.leased_bytes, budget_bytes=d.budget_bytes,
                             cores=d.info.cores, unexplained_bytes=d.unexplained_bytes)
        for d in node.devices])


def _lease_key(lease) -> str:
    """Creation time (fixed width, so strings sort as times), then the name."""
    return f"{lease.create_time:020.6f}/{lease.name}"


class ResourceServicer(resources_pb2_grpc.ResourceServiceServicer):
    def __init__(self, manager: ResourceManager) -> None:
        self.manager = manager
        # The manager's store calls, off the event loop, one at a time in the order they came.
        self._store = ThreadPoolExecutor(1, thread_name_prefix="llmos-resources-store")

    async def _call(self, fn, *args):
        return await off_loop(fn, *args, executor=self._store)

    async def ListNodes(self, request, context: grpc.aio.ServicerContext):
        nodes = await self._call(self.manager.nodes)
        nodes, token = page(nodes, lambda n: n.name, request.page_size, request.page_token)
        return resources_pb2.ListNodesResponse(nodes=[node_to_proto(n) for n in nodes], next_page_token=token)

    async def AcquireLease(self, request, context: grpc.aio.ServicerContext):
        _require_holder(request.holder)
        ttl = optional_seconds(request, "ttl")
        if ttl is None or ttl <= 0:     # a lease nobody renews must end: no permanent leases
            raise InvalidArgument.field("ttl", "is required: more than 0, at most a day")
        lease = await self._call(self.manager.acquire, request.holder, request.node, request.device, request.bytes,
                                 ttl)
        return resources_pb2.AcquireLeaseResponse(lease=lease_to_proto(lease))

    async def ReleaseLease(self, request, context: grpc.aio.ServicerContext):
        if bool(request.name) == bool(request.holder_prefix):
            raise InvalidArgument.field("name", "exactly one of name and holder_prefix is required")
        if request.holder_prefix:
            if not request.holder_prefix.endswith("/"):      # "worker/w1" would take w10's leases too
                raise InvalidArgument.field("holder_prefix", "must end with '/'")
            _require_holder(request.holder_prefix)
            released = await self._call(self.manager.release_holders, request.holder_prefix)
            return resources_pb2.ReleaseLeaseResponse(released=released)
        lease = await self._call(self.manager.leases.get, request.name)
        if lease is not None:
            _require_holder(lease.holder)
        released = await self._call(self.manager.release, request.name)
        return resources_pb2.ReleaseLeaseResponse(released=int(released))

    async def RenewLeases(self, request, context: grpc.aio.ServicerContext):
        _require_holder(request.holder_prefix)
        renewed = await self._call(self.manager.heartbeat, request.holder_prefix, request.in_use_bytes,
                                   request.device)
        return resources_pb2.RenewLeasesResponse(renewed=renewed)

    async def ListLeases(self, request, context: grpc.aio.ServicerContext):
        leases = await self._call(self.manager.leases.list)
        leases, token = page(leases, _lease_key, request.page_size, request.page_token)
        return resources_pb2.ListLeasesResponse(leases=[lease_to_proto(lease) for lease in leases],
                                                next_page_token=token)


def register(host, manager: ResourceManager) -> None:
    servicer = ResourceServicer(manager)
    host.add(resources_pb2.DESCRIPTOR.services_by_name["ResourceService"].full_name,
             lambda server: resources_pb2_grpc.add_ResourceServiceServicer_to_server(servicer, server))
