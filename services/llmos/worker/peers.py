"""The worker's ports to its peers: the resource manager (memory leases) and the registry
(its heartbeat). Failures arrive as typed errors (`LlmosError`) from the channels' interceptor.
"""

from __future__ import annotations

from llmos.common.channels import Channels
from llmos.common.convert import duration
from llmos.v1 import resources_pb2, resources_pb2_grpc


class GrpcResources:
    """The worker's port to the resource manager."""

    def __init__(self, channels: Channels, address: str) -> None:
        self._stub = resources_pb2_grpc.ResourceServiceStub(channels.get(address))

    async def acquire(self, holder: str, device: str, nbytes: int, ttl: float) -> str:
        request = resources_pb2.AcquireLeaseRequest(holder=holder, device=device, bytes=nbytes, ttl=duration(ttl))
        response = await self._stub.AcquireLease(request, timeout=10)
        return response.lease.name

    async def renew(self, holder_prefix: str, in_use_bytes: int, device: str) -> int:
        response = await self._stub.RenewLeases(resources_pb2.RenewLeasesRequest(
            holder_prefix=holder_prefix, in_use_bytes=in_use_bytes, device=device), timeout=5)
        return response.renewed

    async def release(self, lease: str) -> None:
        await self._stub.ReleaseLease(resources_pb2.ReleaseLeaseRequest(name=lease), timeout=10)

    async def release_holders(self, holder_prefix: str) -> int:
        response = await self._stub.ReleaseLease(resources_pb2.ReleaseLeaseRequest(holder_prefix=holder_prefix),
                                                 timeout=10)
        return response.released
