"""Requests both clients build the same way, and the retry rule they share."""

from __future__ import annotations

import grpc

from .errors import LlmosError
from .v1 import common_pb2, gateway_pb2

RETRY_BACKOFF_SECONDS = 0.1


def generate_request(model: str, *, prompt: str | None = None, messages: list[tuple[str, str]] | None = None,
                     max_tokens: int = 0, temperature: float = 0.0, seed: int | None = None,
                     ignore_eos: bool = False, request_id: str = "") -> gateway_pb2.GenerateRequest:
    """A GenerateRequest for a prompt (raw text) or a conversation of (role, content) turns."""
    request = gateway_pb2.GenerateRequest(
        model=model, request_id=request_id,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos))
    if seed is not None:
        request.sampling.seed = seed
    if prompt is not None:
        request.prompt = prompt
    for role, content in messages or ():
        request.messages.add(role=role, content=content)
    return request


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
