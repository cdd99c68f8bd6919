"""Requests both clients build the same way, and the retry rule they share."""

from __future__ import annotations

import time

import grpc

from .errors import Cancelled, LlmosError, from_call
from .v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

RETRY_BACKOFF_SECONDS = 0.1


def generate_request(model: str, *, prompt: str | None = None, messages: list[tuple[str, str]] | None = None,
                     max_tokens: int = 0, temperature: float = 0.0, seed: int | None = None,
                     ignore_eos: bool = False, request_id: str = "",
                     conversation_id: str = "") -> gateway_pb2.GenerateRequest:
    """A GenerateRequest for a prompt (raw text) or a conversation of (role, content) turns."""
    request = gateway_pb2.GenerateRequest(
        model=model, request_id=request_id, conversation_id=conversation_id,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos))
    if seed is not None:
        request.sampling.seed = seed
    if prompt is not None:
        request.prompt = prompt
    for role, content in messages or ():
        request.messages.add(role=role, content=content)
    return request


class RetryingCall:
    """One Generate and the attempts it takes: the deadline they share, and whether a failure is
    tried again. The sync and asyncio streams read it each their own way."""

    def __init__(self, stub: gateway_pb2_grpc.GatewayServiceStub, request: gateway_pb2.GenerateRequest,
                 timeout: float | None, metadata: tuple, retries: int) -> None:
        self._stub, self._request, self._metadata, self._retries = stub, request, metadata, retries
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._attempt, self._received, self._cancelled = 0, False, False
        self._call = self._start()

    def _remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def _start(self):
        return self._stub.Generate(self._request, timeout=self._remaining(), metadata=self._metadata)

    def _failed(self, exc: grpc.RpcError) -> tuple[LlmosError, float | None]:
        """The typed error of a failed attempt, and how long to wait before the next (None: the
        error is the call's)."""
        error = Cancelled("the call was cancelled") if self._cancelled else from_call(exc)
        delay = None if self._received or self._cancelled else retry_delay(
            error, self._attempt, self._retries, self._remaining())
        return error, delay

    def _again(self) -> None:
        self._attempt += 1
        self._call = self._start()

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    @property
    def attempts(self) -> int:
        """How many times the call was started."""
        return self._attempt + 1


def retry_delay(error: LlmosError, attempt: int, retries: int, remaining: float | None) -> float | None:
    """How long to wait before trying a stream again that failed with `error` before its first
    response, or None when it must not be: only UNAVAILABLE is retried (nothing was generated,
    so nothing is repeated), `retries` times at most, backing off, within the deadline."""
    if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= retries:
        return None
    delay = max(RETRY_BACKOFF_SECONDS * 2 ** attempt, error.retry_after or 0.0)
    if remaining is not None and remaining <= delay:
        return None
    return delay
