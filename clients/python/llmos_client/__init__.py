"""A typed Python client for llmos.

    from llmos_client import Client
    with Client("127.0.0.1:50051", api_key=key) as client:
        for piece in client.generate("smollm2-135m-instruct", messages=[("user", "Hi")], timeout=30):
            print(piece.text, end="", flush=True)

`llmos_client.aio.AsyncClient` is the asyncio form. Failed calls raise `llmos_client.errors`
types (a subclass per status code, with the ErrorInfo reason); a stream that fails UNAVAILABLE
before its first response is tried again. The generated stubs are `llmos_client.v1`.
"""

from .client import Client, GenerateStream, every_page
from .errors import LlmosError, from_call

__all__ = ["Client", "GenerateStream", "LlmosError", "every_page", "from_call"]
