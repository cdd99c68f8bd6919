"""OpenAI's chat and completions API as llmos reads and writes it: a request body becomes a
`GenerateRequest` (checked then by the same code as the gRPC door's, `servicer.checked_call`), and
a generation's chunks become OpenAI's objects: server-sent events of `chat.completion.chunk` or
`text_completion`, or the whole response; errors become OpenAI's error object with the HTTP status
of their gRPC code. The HTTP server itself is `openai_api`; the pooling routes' shapes are
`openai_pooling`.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import JSONResponse, Response

from llmos.common.convert import Violations
from llmos.common.domain import Chunk, FinishReason, ToolCall
from llmos.common.errors import InvalidArgument, LlmosError, ResourceExhausted
from llmos.common.tools import MAX_TOOLS, tool_from_openai
from llmos.v1 import common_pb2, gateway_pb2

from .generation import Generation

INT32 = 2**31

# OpenAI's default output limit of a completion (a chat's is the model's).
COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_TOP_LOGPROBS = 20
# Most choices (`n`) one request may ask for.
MAX_CHOICES = 16

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
               "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429,
               "CANCELLED": 499, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
              409: "invalid_request_error", 413: "invalid_request_error",
              429: "rate_limit_error", 499: "invalid_request_error", 503: "server_error", 504: "timeout_error"}
FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.TOOL_CALLS: "tool_calls"}
# `GenerateRequest` field paths, as OpenAI's requests name them.
PARAM_NAMES = {"sampling.max_tokens": "max_tokens", "sampling.temperature": "temperature",
               "sampling.top_p": "top_p", "sampling.seed": "seed", "sampling.stop": "stop",
               "sampling.top_logprobs": "top_logprobs", "sampling.top_k": "top_k",
               "sampling.repetition_penalty": "repetition_penalty", "request_id": "x-request-id",
               "sampling.presence_penalty": "presence_penalty", "sampling.frequency_penalty": "frequency_penalty",
               "sampling.logit_bias": "logit_bias",
               "conversation_id": "x-llmos-conversation-id",
               "sampling.response_format": "response_format",
               "sampling.response_format.json_schema": "response_format",
               "sampling.response_format.json_object": "response_format", "tool_choice.function": "tool_choice",
               "tool_choice.mode": "tool_choice", "inputs": "input"}


def error_object(status: int, message: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(error_object(status, message, code), status_code=status)


def _param(field: str) -> str:
    """A request field path as OpenAI's body names it (`inputs[3]` is `input[3]`)."""
    if field in PARAM_NAMES:
        return PARAM_NAMES[field]
    head, bracket, rest = field.partition("[")
    return PARAM_NAMES.get(head, head) + bracket + rest


def error_body(exc: LlmosError) -> tuple[int, dict, dict[str, str]]:
    """The HTTP status, OpenAI's error object and headers of a typed error."""
    status = HTTP_STATUS.get(exc.code, 500)
    violations = getattr(exc, "violations", None) or []
    param = _param(violations[0].field) if violations else None
    message = exc.message
    if violations:
        message = "; ".join(f"{_param(v.field)}: {v.description}" for v in violations)
    headers = {}
    if isinstance(exc, ResourceExhausted) or exc.code == "RESOURCE_EXHAUSTED":
        retry = getattr(exc, "retry_after", None) or float(exc.metadata.get("retry_after_seconds", 1) or 1)
        headers["Retry-After"] = str(max(1, math.ceil(retry)))
    return status, error_object(status, message, exc.reason, param), headers


def _number(body: dict, name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidArgument.field(name, f"must be a{'n integer' if kind is int else ' number'}")
    if kind is int and not -INT32 <= value < INT32 and name != "seed":
        raise InvalidArgument.field(name, f"must be between {-INT32} and {INT32 - 1}")
    if kind is int and name == "seed" and not -2**63 <= value < 2**64:
        raise InvalidArgument.field(name, "must fit in 64 bits")
    return value


def _refuse_unsupported(body: dict, chat: bool) -> None:
    if not 1 <= _number(body, "n", int, 1) <= MAX_CHOICES:
        raise InvalidArgument.field("n", f"must be between 1 and {MAX_CHOICES}")
    for name in ("functions", "function_call"):
        if body.get(name):
            raise InvalidArgument.field(name, "is OpenAI's deprecated form: send tools and tool_choice")
    if not chat:
        if body.get("echo"):
            raise InvalidArgument.field("echo", "is not supported")
        if body.get("suffix"):
            raise InvalidArgument.field("suffix", "is not supported")
        if _number(body, "best_of", int, 1) != 1:
            raise InvalidArgument.field("best_of", "only best_of=1 is supported")


def _messages(body: dict) -> list[common_pb2.ChatMessage]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument.field("messages", "must be a non-empty array")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgument.field(f"messages[{i}]", "must be an object")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise InvalidArgument.field(f"messages[{i}].content[{j}]",
                                                f"only text parts are supported, got {kind!r}")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None and (message.get("tool_calls") or message.get("role") == "assistant"):
            content = ""
        if not isinstance(content, str):
            raise InvalidArgument.field(f"messages[{i}].content", "must be a string or an array of text parts")
        role = message.get("role")
        if role == "developer":        # OpenAI's newer name for the system role
            role = "system"
        tool_call_id = message.get("tool_call_id") or ""
        if not isinstance(tool_call_id, str):
            raise InvalidArgument.field(f"messages[{i}].tool_call_id", "must be a string")
        out.append(common_pb2.ChatMessage(role=role if isinstance(role, str) else "", content=content,
                                          tool_call_id=tool_call_id,
                                          tool_calls=_calls(message.get("tool_calls"), f"messages[{i}].tool_calls")))
    return out


def _calls(calls: Any, field: str) -> list[common_pb2.ToolCall]:
    """An assistant message's `tool_calls` (arguments as JSON text, as OpenAI sends them)."""
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise InvalidArgument.field(field, "must be an array")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call.get("id"), str):
            raise InvalidArgument.field(f"{field}[{j}]", "must be {\"id\", \"type\": \"function\", \"function\": "
                                                         "{\"name\", \"arguments\"}}")
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments)
        if not isinstance(arguments, str) or not isinstance(function.get("name"), str):
            raise InvalidArgument.field(f"{field}[{j}].function", "needs a name and arguments (JSON text)")
        out.append(common_pb2.ToolCall(id=call["id"], name=function["name"], arguments=arguments))
    return out


def _tools(body: dict, request: gateway_pb2.GenerateRequest) -> None:
    """OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` into the request."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None:
        if not isinstance(tools, list):
            raise InvalidArgument.field("tools", "must be an array")
        if len(tools) > MAX_TOOLS:
            raise InvalidArgument.field("tools", f"at most {MAX_TOOLS} tools are allowed, got {len(tools)}")
        errors = Violations()
        for i, entry in enumerate(tools):
            tool = tool_from_openai(entry, i, errors.add)
            if tool is not None:
                request.tools.add(name=tool.name, description=tool.description, parameters=tool.parameters)
        errors.raise_if_any()
    if choice is not None:
        if isinstance(choice, str) and choice in _CHOICES:
            request.tool_choice.mode = _CHOICES[choice]
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
                and isinstance(choice["function"].get("name"), str):
            request.tool_choice.function = choice["function"]["name"]
        else:
            raise InvalidArgument.field("tool_choice", 'must be "auto", "none", "required" or '
                                                       '{"type": "function", "function": {"name": ...}}')
    parallel = body.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise InvalidArgument.field("parallel_tool_calls", "must be true or false")
        request.parallel_tool_calls = parallel


_CHOICES = {"auto": common_pb2.ToolChoice.MODE_AUTO, "none": common_pb2.ToolChoice.MODE_NONE,
            "required": common_pb2.ToolChoice.MODE_REQUIRED}


def _response_format(fmt: Any, sampling: common_pb2.SamplingParams) -> None:
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        sampling.response_format.json_object = True
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidArgument.field("response_format", "json_schema.schema must be a JSON Schema object")
        sampling.response_format.json_schema = json.dumps(schema)
    elif kind != "text":
        raise InvalidArgument.field("response_format", "type must be text, json_object or json_schema")


def request_from_json(body: dict, chat: bool) -> tuple[gateway_pb2.GenerateRequest, dict]:
    """A `GenerateRequest` from an OpenAI request body, and what shapes the answer
    (stream, include_usage, logprobs wanted)."""
    if not isinstance(body, dict):
        raise InvalidArgument.field("body", "must be a JSON object")
    _refuse_unsupported(body, chat)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument.field("model", "is required")
    request = gateway_pb2.GenerateRequest(model=model)
    if chat:
        request.messages.extend(_messages(body))
        _tools(body, request)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidArgument.field("prompt", "must be a string (one prompt; token arrays are not supported)")
        request.prompt = prompt
    sampling = request.sampling
    limit = _number(body, "max_completion_tokens", int) if chat else None
    limit = limit if limit is not None else _number(body, "max_tokens", int)
    if limit is None and not chat:
        limit = COMPLETION_DEFAULT_MAX_TOKENS
    if limit is not None:
        if limit < 1:
            raise InvalidArgument.field("max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                             "must be at least 1")
        sampling.max_tokens = limit
    sampling.temperature = _number(body, "temperature", float, 1.0)
    sampling.top_p = _number(body, "top_p", float, 1.0)
    seed = _number(body, "seed", int)
    if seed is not None:
        if seed < 0:
            raise InvalidArgument.field("seed", "must not be negative")
        sampling.seed = seed % 2**64
    # vLLM's extensions of the sampling fields.
    sampling.top_k = _number(body, "top_k", int, 0)
    sampling.repetition_penalty = _number(body, "repetition_penalty", float, 1.0)
    sampling.ignore_eos = bool(body.get("ignore_eos"))
    sampling.presence_penalty = _number(body, "presence_penalty", float, 0.0)
    sampling.frequency_penalty = _number(body, "frequency_penalty", float, 0.0)
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise InvalidArgument.field("logit_bias", "must be an object of token ids to numbers")
    for token, value in bias.items():
        if not (isinstance(token, str) and token.lstrip("-").isdigit() and abs(int(token)) < INT32):
            raise InvalidArgument.field("logit_bias", f"keys must be token ids, got {token[:32]!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument.field("logit_bias", f"the bias of token {token} must be a number")
        sampling.logit_bias[int(token)] = float(value)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidArgument.field("stop", "must be a string or an array of strings")
        sampling.stop.extend(s for s in stop if s)
    if chat:
        wanted = bool(body.get("logprobs"))
        top = _number(body, "top_logprobs", int, 0)
        if top and not wanted:
            raise InvalidArgument.field("top_logprobs", "needs logprobs: true")
    else:
        top = _number(body, "logprobs", int)
        wanted, top = top is not None, top or 0
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InvalidArgument.field("top_logprobs" if chat else "logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
    sampling.logprobs, sampling.top_logprobs = wanted, top
    _response_format(body.get("response_format"), sampling)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidArgument.field("stream_options", "must be an object")
    shape = {"stream": bool(body.get("stream")), "include_usage": bool(options.get("include_usage")),
             "logprobs": wanted, "n": _number(body, "n", int, 1)}
    return request, shape


def _logprobs(chunk: Chunk, chat: bool) -> dict | None:
    """OpenAI's logprobs of a chunk's tokens, named by their text (`token_id:<id>` where the worker
    sent none), with their UTF-8 bytes where the text is whole."""
    names = chunk.tokens or [f"token_id:{t}" for t in chunk.token_ids]
    top_names = chunk.top_tokens or [[f"token_id:{t}" for t, _ in top] for top in chunk.top_logprobs]
    tops = [list(zip(n, (lp for _, lp in top), strict=True)) for n, top in zip(top_names, chunk.top_logprobs,
                                                                                strict=True)]
    tops = tops or [[] for _ in names]
    if chat:
        return {"content": [{"token": name, "logprob": lp, "bytes": _bytes(name),
                             "top_logprobs": [{"token": n, "logprob": v, "bytes": _bytes(n)} for n, v in top]}
                            for name, lp, top in zip(names, chunk.logprobs, tops, strict=False)]}
    return {"tokens": names, "token_logprobs": list(chunk.logprobs),
            "top_logprobs": [dict(top) for top in tops] if chunk.top_logprobs else None, "text_offset": []}


def _bytes(name: str) -> list[int] | None:
    return None if "\ufffd" in name or name.startswith("token_id:") else list(name.encode())


def _usage(lasts: list[Chunk | None]) -> dict | None:
    """The usage of a request's choices (their last chunks): the prompt once, every choice's output."""
    usages = [c.usage for c in lasts if c is not None and c.usage is not None]
    if not usages:
        return None
    prompt, generated = usages[0].prompt_tokens, sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": usages[0].cached_prompt_tokens}}


def _call(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}



def choices(request: gateway_pb2.GenerateRequest, n: int) -> list[gateway_pb2.GenerateRequest]:
    """The requests of `n` choices: choice i as the request with seed `seed + i` (mod 2^64) when
    it has a seed, and request id `<id>-<i>` when it has an id (choice 0 is the request itself)."""
    out = [request]
    for i in range(1, n):
        copy = gateway_pb2.GenerateRequest()
        copy.CopyFrom(request)
        if request.sampling.HasField("seed"):
            copy.sampling.seed = (request.sampling.seed + i) % 2**64
        if request.request_id:
            copy.request_id = f"{request.request_id[:120]}-{i}"
        out.append(copy)
    return out



async def _items(firsts: list, generations: list[Generation]) -> AsyncIterator[tuple[int, tuple[str, Chunk]]]:
    """(choice index, (request id, chunk)) of every generation as they come (one: in order, with
    nothing between; several: each read by a task of its own)."""
    if len(generations) == 1:
        item = firsts[0]
        while item is not None:
            yield 0, item
            item = await generations[0].next()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int) -> None:
        item = firsts[index]
        try:
            while item is not None:
                await queue.put((index, item))
                item = await generations[index].next()
        except BaseException as exc:  # noqa: BLE001 - said where they are read
            await queue.put((index, exc))
            return
        await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(generations))]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                running -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Answer:
    """OpenAI's objects for one request's chunks (of each of its `n` choices): events of a
    stream, or the whole response."""

    def __init__(self, model: str, chat: bool, shape: dict) -> None:
        self.model, self.chat, self.shape = model, chat, shape
        self.kind = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())

    def _head(self, request_id: str, streamed: bool) -> dict:
        kind = self.kind + (".chunk" if streamed and self.chat else "")
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + request_id, "object": kind, "created": self.created,
                "model": self.model}

    async def events(self, firsts: list, generations: list[Generation]) -> AsyncIterator[str]:
        """The stream's server-sent events; those ready together go out in one write."""
        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

        n = len(generations)
        rid, last, started, calls = firsts[0][0], [None] * n, [False] * n, [0] * n
        # Every chunk event is this head, its one choice and this tail.
        head = json.dumps(self._head(rid, True), separators=(",", ":"))[:-1] + ',"choices":['
        tail = "]" + (',"usage":null' if self.shape["include_usage"] else "") + "}\n\n"
        out: list[str] = []
        try:
            async for index, (_, chunk) in _items(firsts, generations):
                last[index] = chunk
                if started[index] and not (chunk.text or chunk.tool_calls or chunk.finish_reason
                                           or self.shape["logprobs"]):    # (a token held back: nothing to say)
                    continue
                choice: dict[str, Any] = {"index": index}
                if self.chat:
                    choice["delta"] = {"content": chunk.text} if started[index] else {"role": "assistant",
                                                                                      "content": chunk.text}
                    if chunk.tool_calls:
                        choice["delta"]["tool_calls"] = [{**_call(c), "index": calls[index] + k}
                                                         for k, c in enumerate(chunk.tool_calls)]
                        calls[index] += len(chunk.tool_calls)
                else:
                    choice["text"] = chunk.text
                wanted = self.shape["logprobs"] and chunk.token_ids
                choice["logprobs"] = _logprobs(chunk, self.chat) if wanted else None
                choice["finish_reason"] = FINISH.get(chunk.finish_reason)
                out.append(f"data: {head}{json.dumps(choice, separators=(',', ':'))}{tail}")
                started[index] = True
                if not any(g.ready for g in generations):
                    yield "".join(out)
                    out.clear()
            if self.shape["include_usage"]:
                out.append(event({**self._head(rid, True), "choices": [], "usage": _usage(last)}))
            out.append("data: [DONE]\n\n")
            yield "".join(out)
        except LlmosError as exc:
            yield "".join(out) + event(error_body(exc)[1])

    async def whole(self, firsts: list, generations: list[Generation]) -> Response:
        chunks: list[list[Chunk]] = [[] for _ in generations]
        async for index, (_, chunk) in _items(firsts, generations):
            chunks[index].append(chunk)
        return JSONResponse({**self._head(firsts[0][0], False), "usage": _usage([c[-1] for c in chunks if c]),
                             "choices": [self._choice(i, c) for i, c in enumerate(chunks)]})

    def _choice(self, index: int, chunks: list[Chunk]) -> dict:
        last = chunks[-1] if chunks else None
        merged = Chunk(token_ids=[t for c in chunks for t in c.token_ids],
                       logprobs=[p for c in chunks for p in c.logprobs],
                       top_logprobs=[t for c in chunks for t in c.top_logprobs])
        text = "".join(c.text for c in chunks)
        choice: dict[str, Any] = {"index": index, "finish_reason": FINISH.get(last.finish_reason) if last else None,
                                  "logprobs": _logprobs(merged, self.chat) if self.shape["logprobs"] else None}
        if self.chat:
            calls = [_call(t) for c in chunks for t in c.tool_calls]
            choice["message"] = {"role": "assistant", "content": text if text or not calls else None}
            if calls:
                choice["message"]["tool_calls"] = calls
        else:
            choice["text"] = text
        return choice


