import asyncio

from opentelemetry.sdk.trace import TracerProvider

from llmos.common.channels import Channels
from llmos.v1 import scheduler_pb2_grpc, worker_pb2_grpc


def test_a_stub_is_made_once_per_channel_and_service_and_forgotten_with_the_channels():
    async def main() -> None:
        channels = Channels(TracerProvider())
        stub = channels.stub(worker_pb2_grpc.WorkerServiceStub, "127.0.0.1:1")
        assert channels.stub(worker_pb2_grpc.WorkerServiceStub, "127.0.0.1:1") is stub
        assert channels.stub(worker_pb2_grpc.WorkerServiceStub, "127.0.0.1:2") is not stub
        assert isinstance(channels.stub(scheduler_pb2_grpc.SchedulerServiceStub, "127.0.0.1:1"),
                          scheduler_pb2_grpc.SchedulerServiceStub)
        await channels.close()
        assert channels.stub(worker_pb2_grpc.WorkerServiceStub, "127.0.0.1:1") is not stub
        await channels.close()

    asyncio.run(main())
