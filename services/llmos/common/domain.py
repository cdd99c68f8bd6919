"""Plain data shared by the cores of several services (no grpc, no protobuf)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from llmos.common.errors import InvalidArgument


class FinishReason(enum.Enum):
    """Why a generation ended; mirrors `llmos.v1.FinishReason`."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    TOOL_CALLS = "tool_calls"


@dataclass(frozen=True)
class ToolCall:
    """One call of a function by the model: `arguments` is JSON text (an object)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    # An assistant turn's calls, and a tool turn's answer to one (the id of the call).
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True)
class Tool:
    """A function the model may call; `parameters` is its arguments' JSON Schema as text."""

    name: str
    description: str = ""
    parameters: str = ""


class ToolMode(enum.Enum):
    """Whether the model may, must or must not call tools, or must call one named function."""

    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"
    FUNCTION = "function"


@dataclass(frozen=True)
class Tools:
    """The tools a chat offers and how the model may use them."""

    functions: tuple[Tool, ...]
    mode: ToolMode = ToolMode.AUTO
    # The function the model must call, with ToolMode.FUNCTION.
    function: str = ""
    parallel: bool = True

    @property
    def offered(self) -> bool:
        """Whether the model is shown the tools and may call them."""
        return bool(self.functions) and self.mode is not ToolMode.NONE


class FormatKind(enum.Enum):
    """What a `ResponseFormat` constrains the output to (the proto's `format` oneof)."""

    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    LARK = "lark_grammar"
    GBNF = "gbnf_grammar"
    # Internal: a request's tools as one Lark grammar (`llmos.common.tools`), never from a client.
    TOOLS = "tools"


@dataclass(frozen=True)
class ResponseFormat:
    """A structure the output must match; `spec` is the schema, regex or grammar text."""

    kind: FormatKind
    spec: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings with defaults applied (see `SamplingParams` in the proto)."""

    # None: as many as the default (256) and the context allow.
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    logprobs: bool = False
    ignore_eos: bool = False
    top_logprobs: int = 0
    response_format: ResponseFormat | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias) pairs, in token order.
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# The output limit of a request whose max_tokens is unset (what the worker applies, and what
# admission charges and reserves for it).
DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens whose keys and values came from the prefix cache.
    cached_prompt_tokens: int = 0


# Weight variants a model may be loaded as: "" as stored, "int8" weight-only int8.
# KV cache positions a worker holds per model unless told otherwise (the registry's memory
# estimate counts as many): 68 x 2,048, so 64 sequences of 2,048 positions and more run at once
# with the room the engine keeps for running ones to grow.
DEFAULT_KV_CACHE_TOKENS = 139_264
QUANTIZATIONS = ("", "int8")


def check_quantization(value: str) -> str:
    """`value` if it names a weight variant; else INVALID_ARGUMENT on the field `quantize`."""
    if value not in QUANTIZATIONS:
        raise InvalidArgument.field("quantize", f"must be one of {', '.join(repr(q) for q in QUANTIZATIONS)}")
    return value


@dataclass(frozen=True)
class GenerationInput:
    """What to generate from: exactly one of `prompt` and `messages` is set."""

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] = ()
    tools: Tools | None = None


@dataclass(frozen=True)
class PoolingInput:
    """A pooling call's input: `task` ("embed", "classify", "score"), its texts, for a score the
    second text of each pair, the tokens to keep of each (0: none cut, -1: the model's limit) and
    the size to cut vectors to (0: the model's own)."""

    task: str
    inputs: tuple[str, ...]
    pairs: tuple[str, ...] = ()
    truncate: int = 0
    dimensions: int = 0


@dataclass(frozen=True)
class PoolOutput:
    """What a pooling model computed: one row per input (a vector, label probabilities, or a
    score alone), and for classify the label of each column."""

    rows: list[list[float]]
    labels: list[str] = field(default_factory=list)


@dataclass
class Chunk:
    """A piece of a token stream; the last one has `finish_reason` and `usage`."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    # Per token: the most probable (token id, log-probability) pairs, when asked for.
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # Tools the model called, each whole, in the chunk where its call ended.
    tool_calls: list[ToolCall] = field(default_factory=list)
    # With log-probabilities: the text of each token alone, and of each of its top tokens.
    tokens: list[str] = field(default_factory=list)
    top_tokens: list[list[str]] = field(default_factory=list)
    # A pooling call's whole answer (its one chunk).
    pooled: PoolOutput | None = None


def merge_chunks(first: Chunk, second: Chunk) -> Chunk:
    """One chunk holding both, in order (the second's end, if it is the last)."""
    return Chunk(first.text + second.text, first.token_ids + second.token_ids,
                 first.logprobs + second.logprobs, second.finish_reason, second.usage,
                 first.top_logprobs + second.top_logprobs, first.tool_calls + second.tool_calls,
                 first.tokens + second.tokens, first.top_tokens + second.top_tokens)


@dataclass(frozen=True)
class QueueDepth:
    """Requests waiting in the scheduler for one model, priority band and tenant."""

    model: str
    priority: int
    tenant: str
    waiting: int
