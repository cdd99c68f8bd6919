"""A sequence: one request's prompt, its output so far and its state in the engine."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmos.common.domain import Chunk, SamplingParams
from llmos.common.errors import LlmosError

from .lora import Adapter
from .textstream import Detokenizer, StopStrings


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    # Most tokens to generate (max_tokens, or what the model's context has room for).
    max_new: int
    # Called on the driver's thread with each chunk, or with the error that ended it.
    deliver: Callable[[Chunk | LlmosError], None]
    output_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    # Chunks delivered (counted on the driver's thread) and taken by the stream (counted
    # where it is read); past `max_backlog` undelivered the sequence pauses: it keeps its cache
    # blocks, and the engine steps it again once the stream has caught up. 0: no bound.
    delivered: int = 0
    taken: int = 0
    max_backlog: int = 0
    # Its block table (`blocks.py`): the cache blocks holding its positions, in order; empty while
    # it waits. The digests of its full blocks, as far as they were computed.
    blocks: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    cached: int = 0          # positions of this sequence its blocks hold
    reused: int = 0          # of its prompt's positions, those that came from the prefix cache
    # Positions to compute before it decodes: its prompt; after a preemption, everything it
    # held but its newest token (which the next decode step feeds).
    fill_to: int = -1
    preemptions: int = 0
    generator: torch.Generator | None = None
    detok: Detokenizer | None = None
    stops: StopStrings | None = None
    # With a repetition penalty: the prompt and output ids so far, in a buffer of the
    # sequence's full length.
    seen: torch.Tensor | None = None
    # With a presence or frequency penalty: how many times the output holds each token id.
    counts: torch.Tensor | None = None
    # With a logit bias: the token ids and what is added to their logits.
    bias: tuple[torch.Tensor, torch.Tensor] | None = None
    # With a response format: what the next token may be (`structured.Constraint`).
    constraint: Any = None
    # For the telemetry: the request's span (the engine's steps link to it), and when
    # (time.time_ns) it arrived, got its first and latest token, and was cancelled.
    trace_context: Any = None
    arrival_ns: int = field(default_factory=time.time_ns)
    first_token_ns: int = 0
    last_token_ns: int = 0
    cancel_ns: int = 0
    # The LoRA adapter it runs under (loaded for this engine's runner); None: the base model.
    adapter: Adapter | None = None

    def __post_init__(self) -> None:
        if self.fill_to < 0:
            self.fill_to = len(self.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.cached < self.fill_to

    @property
    def plainly_greedy(self) -> bool:
        """Its next token is its logits' argmax: greedy, with no penalty, bias or constraint."""
        return (self.params.greedy and self.seen is None and self.counts is None and self.bias is None
                and self.constraint is None)

    @property
    def running(self) -> bool:
        """It holds cache blocks (it joined and has not left or been preempted)."""
        return bool(self.blocks)

    def tokens(self, start: int, end: int) -> list[int]:
        """The tokens at positions `start` to `end` (prompt, then output)."""
        prompt = len(self.prompt_ids)
        if end <= prompt:
            return self.prompt_ids[start:end]
        if start >= prompt:
            return self.output_ids[start - prompt:end - prompt]
        return self.prompt_ids[start:] + self.output_ids[:end - prompt]

    @property
    def paused(self) -> bool:
        """Its stream is `max_backlog` chunks behind: it waits (not cancelled, not prefilling)."""
        return (self.max_backlog > 0 and not self.cancelled and not self.prefilling
                and self.delivered - self.taken >= self.max_backlog)
