"""The shared server bootstrap."""

import pytest
from opentelemetry.sdk.trace import TracerProvider

from llmos.common.server import Service, ServiceHost


async def test_a_port_in_use_is_refused_not_shared():
    first = Service(ServiceHost("one", "127.0.0.1:0", TracerProvider()))
    address = await first.start()
    second = Service(ServiceHost("two", address, TracerProvider()))
    with pytest.raises(OSError, match="two cannot listen"):
        await second.start()
    await first.stop(grace=0.5)



async def test_the_plain_health_port_tells_readiness_and_liveness_and_serves_nothing_else(tmp_path):
    """For a kubelet, which cannot present a client certificate: the main port speaks mTLS,
    the health port only health, in plaintext. "" is readiness; "liveness" stays SERVING
    while the process serves at all."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from llmos.common.security import Security
    from llmos.common.tls import LocalCA

    LocalCA(tmp_path / "ca").issue(tmp_path / "registry", "registry", "registry", ("127.0.0.1",))
    host = ServiceHost("registry", "127.0.0.1:0", TracerProvider(),
                       security=Security("registry", str(tmp_path / "registry")), health_listen="127.0.0.1:0")
    service = Service(host)
    address = await service.start()
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        async with grpc.aio.insecure_channel(host.health_address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(name=""):
                return (await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status

            assert (await status(), await status("liveness")) == (SERVING, SERVING)
            await host.set_serving(False)                   # e.g. its store went away
            assert (await status(), await status("liveness")) == (NOT_SERVING, SERVING)
            await host.set_serving(True)
            assert await status() == SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                        list_services="")]), timeout=5):
                    pass
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(address) as plain:       # the main port wants mTLS
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await service.stop(grace=0.5)
