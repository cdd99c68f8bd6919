"""The gateway's core: admit through the scheduler, stream from the chosen worker.

The scheduler is told how every admitted generation ended (finished, failed or
cancelled, with its token counts), so its slots, queue and tenant charges stay
exact. The remaining client deadline is passed to each downstream call. When the
worker fails (UNAVAILABLE) before the first token, the scheduler is told, takes it
out of rotation, and the request is admitted again, ahead of the queue, on
another worker; once tokens have gone to the client it ends with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from llmos.common.domain import (
    DEFAULT_MAX_TOKENS,
    Chunk,
    FinishReason,
    GenerationInput,
    PoolingInput,
    SamplingParams,
    Usage,
)
from llmos.common.errors import DeadlineExceeded, LlmosError
from llmos.common.keystore import Quota

log = logging.getLogger(__name__)


# A request id or conversation id a client may choose.
REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
# Bytes a chat's tool prompt adds besides the tools' own schemas and descriptions (at most).
TOOLS_PROMPT_BYTES = 1024


@dataclass(frozen=True)
class GenerateCall:
    model: str
    source: GenerationInput
    params: SamplingParams
    priority: int = 0
    request_id: str = ""
    tenant: str = "default"
    # Seconds the model stays loaded without requests after this one; None: unchanged.
    keep_alive: float | None = None
    # True: `keep_alive` only holds the model loaded that long (a user's); False: it is kept
    # for the model (an admin's).
    keep_alive_hold: bool = False
    # The tenant's fair-share weight and limits, from its record.
    weight: float = 1.0
    quota: Quota = Quota()
    # Picks the version of an alias that splits traffic (requests with one id get one version).
    conversation_id: str = ""
    # A pooling call (embed, classify, score): one forward over these inputs, no generation.
    pooling: PoolingInput | None = None

    @functools.cached_property
    def prompt_tokens(self) -> int:
        """An upper bound of the prompt's tokens before it is tokenized: a token covers at least
        one byte, and a chat template adds a few per message and a header."""
        if self.pooling is not None:        # each text with its pair and a few special tokens
            texts = (*self.pooling.inputs, *self.pooling.pairs)
            return min(sum(len(t.encode()) + 4 for t in texts), 2**31 - 1)
        source = self.source
        if source.prompt is not None:
            return min(len(source.prompt.encode()) + 2, 2**31 - 1)
        chat = sum(len(m.content.encode()) + 16 + sum(len(c.arguments.encode()) + len(c.name) + 64
                                                        for c in m.tool_calls) for m in source.messages) + 32
        if source.tools is not None and source.tools.offered:     # as the template (or llmos's prompt) shows them
            chat += TOOLS_PROMPT_BYTES + sum(len(t.parameters.encode()) + len(t.description.encode()) + 128
                                             for t in source.tools.functions)
        return min(chat, 2**31 - 1)

    @functools.cached_property
    def prefix_key(self) -> int:
        """A hash of how the input starts, for the scheduler's prefix affinity: the messages up
        to the first user turn (the system prompt and the opening question), or the first
        `PREFIX_KEY_BYTES` of a prompt; every later turn of a conversation has the same key."""
        source = self.source
        if source.prompt is not None:
            start = source.prompt.encode()[:PREFIX_KEY_BYTES]
        else:
            opening = []
            for m in source.messages:
                opening.append(f"{m.role}\0{m.content}")
                if m.role == "user":
                    break
            start = "\0".join(opening).encode()
        return int.from_bytes(hashlib.blake2b(start, digest_size=8).digest(), "big") or 1

    @property
    def reserved_tokens(self) -> int:
        """What the request may cost at most (prompt + output), as its quota reserves it."""
        if self.pooling is not None:
            return self.prompt_tokens
        return self.prompt_tokens + (self.params.max_tokens or DEFAULT_MAX_TOKENS)


# Bytes of a prompt (not messages) that make its prefix key.
PREFIX_KEY_BYTES = 128

# Admissions of one request after workers failed before its first token.
MAX_REDISPATCH = 3


@dataclass(frozen=True)
class Assignment:
    worker_address: str
    model: str
    worker_id: str = ""
    alias: str = ""             # the alias the call's model name resolved through
    adapter: str = ""           # the LoRA adapter run over `model`
    adapter_path: str = ""

    @property
    def version(self) -> str:
        """The model version that serves the call: the adapter, or the model."""
        return self.adapter or self.model


class SchedulerPort(Protocol):
    async def admit(self, call: GenerateCall, request_id: str, timeout: float | None,
                    redispatch: bool = False) -> Assignment: ...

    async def finish(self, request_id: str, reason: FinishReason | None, usage: Usage | None,
                     worker_failed: bool = False, model_not_loaded: bool = False, tenant: str = "") -> None: ...


class WorkerPort(Protocol):
    def generate(self, assignment: Assignment, request_id: str, call: GenerateCall,
                 timeout: float | None) -> AsyncIterator[Chunk]: ...


class FrontDoor:
    def __init__(self, scheduler: SchedulerPort, workers: WorkerPort) -> None:
        self._scheduler = scheduler
        self._workers = workers
        self._background: set[asyncio.Task] = set()

    async def generate(self, call: GenerateCall, timeout: float | None,
                       routed: Callable[[Assignment, str], None] | None = None) -> AsyncIterator[tuple[str, Chunk]]:
        """Streams (request id, chunk) pairs for one request; `routed` hears of each admission
        (and the call's own id).
        The id is the client's when it chose one; the scheduler and the worker know the call by
        an id of the gateway's own, unique per call, so no client (of this tenant or another) can
        name, finish or cancel another call's accounting with the id it sends."""
        request_id = f"req-{uuid.uuid4().hex}"
        shown = call.request_id or request_id
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else deadline - time.monotonic()

        for attempt in range(MAX_REDISPATCH + 1):
            try:
                assignment = await self._scheduler.admit(call, request_id, remaining(), redispatch=attempt > 0)
            except asyncio.CancelledError:
                # The admission may have been granted as the caller left: release it (idempotent).
                self._report(request_id, FinishReason.CANCELLED, None, False, tenant=call.tenant)
                raise
            if routed is not None:
                routed(assignment, request_id)
            reason: FinishReason | None = None
            usage: Usage | None = None
            produced = worker_failed = model_not_loaded = False
            streamed = 0
            try:
                left = remaining()
                if left is not None and left <= 0:
                    raise DeadlineExceeded("the deadline passed before generation started")
                async for chunk in self._workers.generate(assignment, request_id, call, left):
                    if chunk.finish_reason is not None:
                        reason, usage = chunk.finish_reason, chunk.usage
                    produced = True
                    streamed += len(chunk.token_ids)
                    yield shown, chunk
                return
            except LlmosError as exc:
                if exc.code == "CANCELLED":
                    reason = FinishReason.CANCELLED
                worker_failed = exc.code == "UNAVAILABLE"
                # The registry placed the model on a worker that no longer holds it.
                model_not_loaded = exc.reason == "MODEL_NOT_LOADED"
                if not (worker_failed or model_not_loaded) or produced or attempt == MAX_REDISPATCH:
                    raise
                log.warning("worker %s %s before the first token of %s (%s); admitting it again",
                            assignment.worker_id, "does not hold the model" if model_not_loaded else "failed",
                            request_id, exc.reason)
            except (asyncio.CancelledError, GeneratorExit):   # the caller went away (GeneratorExit:
                reason = FinishReason.CANCELLED               # it closed this stream at a yield)
                raise
            finally:
                if usage is None:   # it ended early: charge what was served (the prompt at most its bound)
                    usage = Usage(call.prompt_tokens, streamed)
                reported = self._report(request_id, reason, usage, worker_failed, model_not_loaded, call.tenant)
            await reported      # the scheduler must know of the failed worker before it admits again

    def _report(self, request_id: str, reason: FinishReason | None, usage: Usage | None,
                worker_failed: bool, model_not_loaded: bool = False, tenant: str = "") -> asyncio.Task:
        # Reported from a task of its own: this one may be cancelled already.
        task = asyncio.get_running_loop().create_task(
            self._scheduler.finish(request_id, reason, usage, worker_failed, model_not_loaded, tenant))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self) -> None:
        """Waits for the pending scheduler reports (at shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
