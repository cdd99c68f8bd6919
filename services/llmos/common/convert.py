"""Conversions of the shared messages (sampling, chat, token chunks) with validation.

The gateway validates public input here; the worker validates its own boundary
with the same rules. Violations are collected and raised together as one
INVALID_ARGUMENT with a `BadRequest` listing every field.
"""

from __future__ import annotations

import json
import math
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from llmos.v1 import common_pb2, identity_pb2, scheduler_pb2

from .domain import (
    ChatMessage,
    Chunk,
    FinishReason,
    FormatKind,
    GenerationInput,
    QueueDepth,
    ResponseFormat,
    SamplingParams,
    Tool,
    ToolCall,
    ToolMode,
    Tools,
    Usage,
)
from .errors import FieldViolation, InvalidArgument
from .formats import FormatError, compiled
from .keystore import Quota
from .tools import MAX_TOOLS, NAME, check_tools


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """A Unix time in seconds as a `Timestamp`."""
    value = timestamp_pb2.Timestamp()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def seconds(value: duration_pb2.Duration | timestamp_pb2.Timestamp) -> float:
    return value.ToNanoseconds() / 1e9


# The ranges google.protobuf.Duration and Timestamp document.
_MAX_DURATION_SECONDS = 315_576_000_000
_TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)


def optional_seconds(message: Any, name: str) -> float | None:
    """The `Duration` or `Timestamp` field `name` in seconds, None when it is not set; a value
    outside the range its type documents is INVALID_ARGUMENT."""
    if not message.HasField(name):
        return None
    value = getattr(message, name)
    if isinstance(value, timestamp_pb2.Timestamp):
        valid = _TIMESTAMP_SECONDS[0] <= value.seconds <= _TIMESTAMP_SECONDS[1] and 0 <= value.nanos <= 999_999_999
    else:
        valid = (abs(value.seconds) <= _MAX_DURATION_SECONDS and abs(value.nanos) <= 999_999_999
                 and not (value.seconds and value.nanos and (value.seconds > 0) != (value.nanos > 0)))
    if not valid:
        raise InvalidArgument.field(name, f"is not a valid {type(value).DESCRIPTOR.full_name} "
                                          f"(seconds {value.seconds}, nanos {value.nanos})")
    return seconds(value)


def enum_word(message: Any, field: str) -> str:
    """An enum field's value as a lower-case word, without its enum's prefix: a `state` of
    STATE_NOT_SERVING is "not_serving", a `finish_reason` of FINISH_REASON_STOP is "stop"."""
    enum = message.DESCRIPTOR.fields_by_name[field].enum_type
    value = getattr(message, field)
    known = enum.values_by_number.get(value)
    if known is None:                       # from a newer peer
        return str(value)
    return known.name.removeprefix(enum.values_by_number[0].name.removesuffix("UNSPECIFIED")).lower()


MAX_PROMPT_CHARS = 1 << 20
MAX_MESSAGES = 512
# The chat roles a template knows; anything else (a role smuggling template markup) is refused.
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_NEW_TOKENS = 8192
MAX_STOP_STRINGS = 8
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024

FINISH_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.TOOL_CALLS: common_pb2.FINISH_REASON_TOOL_CALLS,
}
FINISH_FROM_PROTO = {v: k for k, v in FINISH_TO_PROTO.items()}


class Violations:
    """Collects field violations; `raise_if_any` raises them as one InvalidArgument."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            message = "; ".join(f"{v.field}: {v.description}" for v in self.items)
            raise InvalidArgument(message, reason="INVALID_FIELD", violations=self.items,
                                  metadata={"field": self.items[0].field})


def input_from_proto(request: Any, errors: Violations) -> GenerationInput:
    """Reads the `prompt` / `messages` pair of a request (exactly one must be set) and its tools."""
    has_prompt = request.HasField("prompt")
    if has_prompt and request.messages:
        errors.add("prompt", "exactly one of prompt and messages may be set, not both")
        return GenerationInput()
    if not has_prompt and not request.messages:
        errors.add("prompt", "one of prompt and messages is required")
        return GenerationInput()
    tools = tools_from_proto(request, errors)
    if has_prompt:
        if not request.prompt:
            errors.add("prompt", "must not be empty")
        elif len(request.prompt) > MAX_PROMPT_CHARS:
            errors.add("prompt", f"is longer than {MAX_PROMPT_CHARS} characters")
        if tools is not None:
            errors.add("tools", "need messages (a chat), not a prompt")
        return GenerationInput(prompt=request.prompt)
    if len(request.messages) > MAX_MESSAGES:
        errors.add("messages", f"at most {MAX_MESSAGES} messages are allowed")
    total, call_ids, messages = 0, set(), []
    for i, message in enumerate(request.messages):
        if message.role not in CHAT_ROLES:
            errors.add(f"messages[{i}].role", f"must be one of {', '.join(sorted(CHAT_ROLES))}")
        if not message.content and message.role not in ("assistant", "tool"):
            errors.add(f"messages[{i}].content", "must not be empty")
        if message.tool_calls and message.role != "assistant":
            errors.add(f"messages[{i}].tool_calls", "only an assistant turn calls tools")
        if len(message.tool_calls) > MAX_TOOLS:
            errors.add(f"messages[{i}].tool_calls", f"at most {MAX_TOOLS} calls are allowed")
        for j, call in enumerate(message.tool_calls):
            _check_call(call, f"messages[{i}].tool_calls[{j}]", errors)
            call_ids.add(call.id)
            total += len(call.arguments)
        if message.role == "tool" and message.tool_call_id not in call_ids:
            errors.add(f"messages[{i}].tool_call_id", "must be the id of a tool call an earlier assistant turn made"
                       + (f", got {message.tool_call_id[:64]!r}" if message.tool_call_id else ""))
        elif message.role != "tool" and message.tool_call_id:
            errors.add(f"messages[{i}].tool_call_id", "is only for a tool turn")
        total += len(message.content)
        messages.append(ChatMessage(message.role, message.content, tuple(
            ToolCall(c.id, c.name, c.arguments) for c in message.tool_calls), message.tool_call_id))
    if total > MAX_PROMPT_CHARS:
        errors.add("messages", f"hold more than {MAX_PROMPT_CHARS} characters")
    return GenerationInput(messages=tuple(messages), tools=tools)


def _check_call(call: Any, field: str, errors: Violations) -> None:
    if not 1 <= len(call.id) <= 64 or not call.id.isprintable():
        errors.add(f"{field}.id", "must be 1 to 64 printable characters")
    if not NAME.fullmatch(call.name):
        errors.add(f"{field}.name", "must be 1 to 64 letters, digits, '_' or '-'")
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        errors.add(f"{field}.arguments", "must be a JSON object")


_TOOL_MODES = {common_pb2.ToolChoice.MODE_UNSPECIFIED: ToolMode.AUTO, common_pb2.ToolChoice.MODE_AUTO: ToolMode.AUTO,
               common_pb2.ToolChoice.MODE_NONE: ToolMode.NONE, common_pb2.ToolChoice.MODE_REQUIRED: ToolMode.REQUIRED}


def tools_from_proto(request: Any, errors: Violations) -> Tools | None:
    """A request's tools and tool choice, checked (each schema compiled); None without any."""
    which = request.tool_choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    mode = ToolMode.FUNCTION if which == "function" else _TOOL_MODES.get(request.tool_choice.mode)
    if mode is None:
        errors.add("tool_choice.mode", f"unknown mode {request.tool_choice.mode}")
        return None
    if not request.tools and mode in (ToolMode.AUTO, ToolMode.NONE):
        return None
    tools = Tools(tuple(Tool(t.name, t.description, t.parameters) for t in request.tools), mode,
                  request.tool_choice.function if which == "function" else "",
                  request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True)
    check_tools(tools, errors.add)
    if tools.offered and request.sampling.HasField("response_format"):
        errors.add("tools", "cannot be combined with sampling.response_format (the calls are structured already)")
    return tools


def _call_to_proto(call: ToolCall) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(id=call.id, name=call.name, arguments=call.arguments)


def tools_to_proto(tools: Tools, request: Any) -> None:
    request.tools.extend(common_pb2.Tool(name=t.name, description=t.description, parameters=t.parameters)
                         for t in tools.functions)
    if tools.mode is ToolMode.FUNCTION:
        request.tool_choice.function = tools.function
    else:
        request.tool_choice.mode = {v: k for k, v in _TOOL_MODES.items() if k}[tools.mode]
    request.parallel_tool_calls = tools.parallel


def input_to_proto(source: GenerationInput, request: Any) -> None:
    if source.prompt is not None:
        request.prompt = source.prompt
    for message in source.messages:
        request.messages.add(role=message.role, content=message.content, tool_call_id=message.tool_call_id,
                             tool_calls=[_call_to_proto(c) for c in message.tool_calls])
    if source.tools is not None:
        tools_to_proto(source.tools, request)


MAX_POOL_INPUTS = 2048


def check_pool_inputs(inputs: Any, pairs: Any, task: str, errors: Violations, field: str = "inputs",
                      pairs_field: str = "pairs") -> None:
    """The inputs of a pooling call: 1 to MAX_POOL_INPUTS texts, none empty, within the size a
    prompt may have; for a score, a pair text for each."""
    if task not in ("embed", "classify", "score"):
        errors.add("task", "must be embed, classify or score")
    if not inputs:
        errors.add(field, "must hold at least one text")
    elif len(inputs) > MAX_POOL_INPUTS:
        errors.add(field, f"at most {MAX_POOL_INPUTS} texts are allowed, got {len(inputs)}")
    else:
        for name, texts in ((field, inputs), (pairs_field, pairs)):
            empty = next((i for i, text in enumerate(texts) if not text), None)
            if empty is not None:
                errors.add(f"{name}[{empty}]", "must not be empty")
        if sum(len(text) for text in inputs) + sum(len(text) for text in pairs) > MAX_PROMPT_CHARS:
            errors.add(field, f"hold more than {MAX_PROMPT_CHARS} characters")
    if (task == "score") != bool(pairs) or (pairs and len(pairs) != len(inputs)):
        errors.add("pairs", "a score needs one pair text per input; nothing else takes them")


def sampling_from_proto(p: common_pb2.SamplingParams, errors: Violations,
                        prefix: str = "sampling") -> SamplingParams:
    """Validates `SamplingParams` and applies its defaults."""
    if p.max_tokens < 0 or p.max_tokens > MAX_NEW_TOKENS:
        errors.add(f"{prefix}.max_tokens", f"must be between 0 and {MAX_NEW_TOKENS}, got {p.max_tokens}")
    if not (math.isfinite(p.temperature) and 0.0 <= p.temperature <= 2.0):
        errors.add(f"{prefix}.temperature", f"must be between 0 and 2, got {p.temperature}")
    if not (math.isfinite(p.top_p) and 0.0 <= p.top_p <= 1.0):
        errors.add(f"{prefix}.top_p", f"must be in (0, 1] (0 means the default), got {p.top_p}")
    if p.top_k < 0:
        errors.add(f"{prefix}.top_k", f"must not be negative, got {p.top_k}")
    if len(p.stop) > MAX_STOP_STRINGS:
        errors.add(f"{prefix}.stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed")
    for i, stop in enumerate(p.stop):
        if not 1 <= len(stop) <= 256:
            errors.add(f"{prefix}.stop[{i}]", "must be 1 to 256 characters")
    if not 0 <= p.top_logprobs <= MAX_TOP_LOGPROBS:
        errors.add(f"{prefix}.top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {p.top_logprobs}")
    penalty = p.repetition_penalty
    if not (math.isfinite(penalty) and (penalty == 0.0 or 0.1 <= penalty <= 10.0)):
        errors.add(f"{prefix}.repetition_penalty", f"must be 0 or between 0.1 and 10, got {penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        if not (math.isfinite(value) and -2.0 <= value <= 2.0):
            errors.add(f"{prefix}.{name}", f"must be between -2 and 2, got {value}")
    if len(p.logit_bias) > MAX_LOGIT_BIAS:
        errors.add(f"{prefix}.logit_bias", f"at most {MAX_LOGIT_BIAS} tokens are allowed, got {len(p.logit_bias)}")
    for token, bias in sorted(p.logit_bias.items()):
        if token < 0:
            errors.add(f"{prefix}.logit_bias", f"names token {token}, which is not a token id")
            break
        if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
            errors.add(f"{prefix}.logit_bias", f"the bias of token {token} must be between -100 and 100, got {bias}")
            break
    fmt = format_from_proto(p, errors, prefix)
    return SamplingParams(
        max_tokens=p.max_tokens or None,
        temperature=float(p.temperature),
        top_p=float(p.top_p) or 1.0,
        top_k=int(p.top_k),
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        repetition_penalty=float(penalty) or 1.0,
        logprobs=p.logprobs,
        ignore_eos=p.ignore_eos,
        top_logprobs=p.top_logprobs,
        response_format=fmt,
        presence_penalty=float(p.presence_penalty),
        frequency_penalty=float(p.frequency_penalty),
        logit_bias=tuple(sorted((int(t), float(b)) for t, b in p.logit_bias.items())),
    )


def format_from_proto(p: common_pb2.SamplingParams, errors: Violations, prefix: str) -> ResponseFormat | None:
    """The response format, compiled once to check it (a format that does not compile is a
    violation of its field, with the compiler's message)."""
    which = p.response_format.WhichOneof("format") if p.HasField("response_format") else None
    if which is None:
        if p.HasField("response_format"):
            errors.add(f"{prefix}.response_format", "set one of json_schema, json_object, regex, lark_grammar, "
                                                    "gbnf_grammar")
        return None
    kind = FormatKind(which)
    fmt = ResponseFormat(kind, "" if kind is FormatKind.JSON_OBJECT else getattr(p.response_format, which))
    if kind is FormatKind.JSON_OBJECT and not p.response_format.json_object:
        errors.add(f"{prefix}.response_format.json_object", "must be true when set")
        return None
    try:
        compiled(fmt)
    except FormatError as exc:
        errors.add(f"{prefix}.response_format.{which}", str(exc))
        return None
    return fmt


def format_to_proto(fmt: ResponseFormat) -> common_pb2.ResponseFormat:
    if fmt.kind is FormatKind.JSON_OBJECT:
        return common_pb2.ResponseFormat(json_object=True)
    return common_pb2.ResponseFormat(**{fmt.kind.value: fmt.spec})


def sampling_to_proto(s: SamplingParams) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams(
        max_tokens=s.max_tokens or 0, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        stop=list(s.stop), repetition_penalty=s.repetition_penalty, logprobs=s.logprobs,
        ignore_eos=s.ignore_eos, top_logprobs=s.top_logprobs, presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty, logit_bias=dict(s.logit_bias))
    if s.seed is not None:
        p.seed = s.seed
    if s.response_format is not None:
        p.response_format.CopyFrom(format_to_proto(s.response_format))
    return p


def usage_to_proto(usage: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                            cached_prompt_tokens=usage.cached_prompt_tokens)


def fill_chunk(message: Any, chunk: Chunk) -> Any:
    """Copies a chunk into a `GenerateResponse` or `GenerateTokensResponse`. (Every token of every stream
    passes here: the fields a plain token leaves empty are not touched.)"""
    message.text = chunk.text
    message.token_ids.extend(chunk.token_ids)
    if chunk.logprobs:
        message.logprobs.extend(chunk.logprobs)
    if chunk.finish_reason is not None:
        message.finish_reason = FINISH_TO_PROTO[chunk.finish_reason]
    if chunk.usage is not None:
        message.usage.CopyFrom(usage_to_proto(chunk.usage))
    if chunk.top_logprobs:
        texts = chunk.top_tokens or [[] for _ in chunk.top_logprobs]
        for top, text in zip(chunk.top_logprobs, texts, strict=True):
            message.top_logprobs.add(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top], tokens=text)
    if chunk.tokens:
        message.tokens.extend(chunk.tokens)
    if chunk.tool_calls:
        message.tool_calls.extend(_call_to_proto(c) for c in chunk.tool_calls)
    return message


def chunk_from_proto(message: Any) -> Chunk:
    """The chunk a `GenerateTokensResponse` carries. (Every token of every stream passes here: a plain token,
    without log-probabilities, tool calls or an end, takes the short way.)"""
    if not (message.finish_reason or message.logprobs or message.top_logprobs or message.tool_calls
            or message.tokens or message.HasField("usage")):
        return Chunk(text=message.text, token_ids=list(message.token_ids))
    usage = None
    if message.HasField("usage"):
        usage = Usage(message.usage.prompt_tokens, message.usage.completion_tokens,
                      message.usage.cached_prompt_tokens)
    return Chunk(text=message.text, token_ids=list(message.token_ids),
                 logprobs=list(message.logprobs),
                 finish_reason=FINISH_FROM_PROTO.get(message.finish_reason), usage=usage,
                 top_logprobs=[list(zip(top.token_ids, top.logprobs, strict=True))
                               for top in message.top_logprobs],
                 tool_calls=[ToolCall(c.id, c.name, c.arguments) for c in message.tool_calls],
                 tokens=list(message.tokens), top_tokens=[list(top.tokens) for top in message.top_logprobs]
                 if any(top.tokens for top in message.top_logprobs) else [])


def queue_depth_to_proto(q: QueueDepth) -> scheduler_pb2.QueueDepth:
    return scheduler_pb2.QueueDepth(model=q.model, priority=q.priority, tenant=q.tenant, waiting=q.waiting)


def queue_depth_from_proto(q: scheduler_pb2.QueueDepth) -> QueueDepth:
    return QueueDepth(q.model, q.priority, q.tenant, q.waiting)


def quota_to_proto(q: Quota) -> identity_pb2.TenantQuota:
    return identity_pb2.TenantQuota(max_concurrent_requests=q.max_concurrent, requests_per_minute=q.requests_per_minute,
                                    tokens_per_minute=q.tokens_per_minute)


def quota_from_proto(q: identity_pb2.TenantQuota) -> Quota:
    return Quota(q.max_concurrent_requests, q.requests_per_minute, q.tokens_per_minute)
