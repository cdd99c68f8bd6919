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

