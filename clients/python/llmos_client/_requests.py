"""Requests both clients build the same way, and the retry rule they share."""

from __future__ import annotations

import json
import time

import grpc

from .errors import Cancelled, LlmosError, from_call
from .v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

RETRY_BACKOFF_SECONDS = 0.1


_TOOL_MODES = {"auto": common_pb2.ToolChoice.MODE_AUTO, "none": common_pb2.ToolChoice.MODE_NONE,
               "required": common_pb2.ToolChoice.MODE_REQUIRED}


def generate_request(model: str, *, prompt: str | None = None,
                     messages: list[tuple[str, str] | common_pb2.ChatMessage] | None = None,
                     max_tokens: int = 0, temperature: float = 0.0, seed: int | None = None,
                     ignore_eos: bool = False, request_id: str = "", conversation_id: str = "",
                     tools: list[dict] | None = None, tool_choice: str | None = None) -> gateway_pb2.GenerateRequest:
    """A GenerateRequest for a prompt (raw text) or a conversation of (role, content) turns (or
    `ChatMessage`s: an assistant turn's `tool_calls`, a tool's answer with its `tool_call_id`).
    `tools` are OpenAI's function tools ({"type": "function", "function": {"name", "description",
    "parameters"}}); `tool_choice` is "auto", "none", "required" or the name of one of them."""
    request = gateway_pb2.GenerateRequest(
        model=model, request_id=request_id, conversation_id=conversation_id,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos))
    if seed is not None:
        request.sampling.seed = seed
    if prompt is not None:
        request.prompt = prompt
    for message in messages or ():
        if isinstance(message, common_pb2.ChatMessage):
            request.messages.append(message)
        else:
            request.messages.add(role=message[0], content=message[1])
    for tool in tools or ():
        function = tool.get("function", tool)
        request.tools.add(name=function["name"], description=function.get("description", ""),
                          parameters=json.dumps(function["parameters"]) if "parameters" in function else "")
    if tool_choice in _TOOL_MODES:
        request.tool_choice.mode = _TOOL_MODES[tool_choice]
    elif tool_choice:
        request.tool_choice.function = tool_choice
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
