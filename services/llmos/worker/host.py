"""The worker's core: which models are loaded, their leases, and generation.

A model is loaded only after the resource manager granted a memory lease for it;
the lease is given back when the model is unloaded or its load fails.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import psutil
import torch

from llmos.common import heap
from llmos.common.architectures import CLASSIFY, EMBED, GENERATE, SCORE, TASKS
from llmos.common.domain import (
    DEFAULT_KV_CACHE_TOKENS,
    DEFAULT_MAX_TOKENS,
    Chunk,
    FinishReason,
    FormatKind,
    GenerationInput,
    ResponseFormat,
    SamplingParams,
    check_quantization,
    merge_chunks,
)
from llmos.common.errors import FailedPrecondition, InvalidArgument, LlmosError, NotFound, ResourceExhausted
from llmos.common.names import model_lease_holder, worker_lease_prefix
from llmos.common.tools import CallParser, format_of
from llmos.common.tools import grammar as tool_grammar
from llmos.engine import Engine, EngineDriver, EngineEvents, EngineStats, Sequence
from llmos.engine.loader import LoadedModel, load_model
from llmos.engine.memory import gpu_share
from llmos.engine.pooling import PoolBatcher, PoolingModel, load_pooling_model
from llmos.engine.prompts import prompt_ids
from llmos.engine.structured import Grammars

from .adapter_cache import AdapterCache

log = logging.getLogger(__name__)

# More characters a token than any tokenizer here makes: a prompt longer than this many per token
# of the model's sequence limit is refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 16


class ResourcesPort(Protocol):
    async def acquire(self, holder: str, device: str, nbytes: int, ttl: float) -> str:
        """Leases memory for `ttl` seconds unless renewed; returns the lease name."""

    async def release(self, lease: str) -> None: ...

    async def release_holders(self, holder_prefix: str) -> int:
        """Gives back every lease under the prefix; returns how many."""

    async def renew(self, holder_prefix: str, in_use_bytes: int, device: str) -> int: ...


@dataclass(frozen=True)
class EngineConfig:
    # Most sequences running at once per model (fewer when the KV cache has no blocks for more).
    max_running: int = 256
    # Longest prompt + output per sequence, capped by the model's context.
    max_seq_len: int = 8192
    # Prompt tokens fed per engine step, so long prompts do not stall running streams.
    prefill_budget: int = 256
    # Seconds a memory lease lives without the worker's heartbeat.
    lease_ttl: float = 15.0
    # Chunks a stream may fall behind before its sequence pauses (keeping its slot); 0: no bound.
    max_backlog: int = 64
    # Keep the full blocks of leaving sequences for prompts that start the same way.
    prefix_cache: bool = True
    # Distinct LoRA adapters in one engine step (more take turns), and adapters kept loaded per model.
    max_adapters_per_step: int = 4
    max_loaded_adapters: int = 8
    # KV cache positions per model (blocks of 16), the pool the worker leases with the weights.
    kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS
    # Compile what pays (decode attention in bf16 on the CPU) as each model loads.
    compile: bool = True
    # On a GPU, with `compile`: decode steps of up to `max_running` rows replay CUDA graphs captured at load.
    cuda_graphs: bool = True
    # On a GPU: each model leases what this share of the device leaves, and its KV cache grows to fill it
    # after its weights (0: the registry's estimate and `kv_cache_tokens` there too).
    gpu_memory_fraction: float = 0.9


@dataclass
class Served:
    loaded: LoadedModel
    engine: Engine
    lease: str
    grammars: Grammars
    adapters: AdapterCache
    last_request: float = field(default_factory=time.time)
    # Each token's text alone, as log-probabilities name them (filled as tokens are named).
    token_texts: dict[int, str] = field(default_factory=dict)

    def name_tokens(self, chunk: Chunk) -> Chunk:
        """`chunk` with the text of each of its tokens, and of each of their top tokens."""
        def text(token: int) -> str:
            known = self.token_texts.get(token)
            if known is None:
                known = self.token_texts[token] = self.loaded.tokenizer.decode(
                    [token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            return known
        chunk.tokens = [text(t) for t in chunk.token_ids]
        chunk.top_tokens = [[text(t) for t, _ in top] for top in chunk.top_logprobs]
        return chunk


@dataclass
class Pooled:
    """A model loaded for a pooling task (embed, classify, score)."""

    loaded: PoolingModel
    batcher: PoolBatcher
    lease: str
    last_request: float = field(default_factory=time.time)
    # Tokens it has read: its progress, reported where a generation model reports the tokens it
    # generated (the monitor tells a stuck worker by progress).
    tokens_read: int = 0


@dataclass(frozen=True)
class PoolResult:
    """What `ModelHost.pool` computed: vectors (embed), label probabilities and the labels
    (classify) or scores (score), and the tokens read."""

    rows: list[list[float]]
    labels: list[str]
    prompt_tokens: int


@dataclass(frozen=True)
class ModelStatus:
    model: str
    device: str
    dtype: str
    measured_bytes: int
    stats: EngineStats
    last_request: float
    adapters: list[str] = field(default_factory=list)     # cached LoRA adapters, the most recent first
    adapter_bytes: int = 0


# (name, path, device, dtype, kv_tokens, max_seq_len, quantize, implementation, compile, graphs,
#  memory_fraction)
Loader = Callable[..., LoadedModel]


class Outbox:
    """Hands what the engines deliver to the streams' queues on the event loop. What the driver's
    thread delivers (a step's tokens for every sequence in it) goes over in one wake-up of the loop
    when the driver hands it over (`flush`, a hand-over hook of the driver: as the next step's layers
    begin, or before the driver waits), not one each: a wake-up is a write to the loop's pipe, and a
    loop woken while a step's inputs are built takes the interpreter from it. What another thread
    delivers goes at once."""

    def __init__(self, driver: EngineDriver) -> None:
        self._driver = driver
        self._loop: asyncio.AbstractEventLoop | None = None
        self._items: list[tuple[asyncio.Queue, object]] = []
        self._lock = threading.Lock()
        self._scheduled = False
        driver.on_hand_over.append(self.flush)

    def queue(self) -> asyncio.Queue:
        """A stream's queue, on the running loop."""
        self._loop = asyncio.get_running_loop()
        return asyncio.Queue()

    def put(self, queue: asyncio.Queue, item: object) -> None:
        with self._lock:
            self._items.append((queue, item))
        if threading.current_thread() is not self._driver.thread:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._items or self._scheduled or self._loop is None:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:        # the event loop is gone; nobody is listening
            with self._lock:
                self._items.clear()
                self._scheduled = False

    def _hand_over(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


class ModelHost:
    def __init__(self, worker_id: str, resources: ResourcesPort, device: torch.device,
                 dtype: torch.dtype, driver: EngineDriver, config: EngineConfig = EngineConfig(),
                 loader: Loader = load_model, events: EngineEvents | None = None, settle_heap: bool = False) -> None:
        self.worker_id = worker_id
        self.events = events
        # A model loaded is frozen out of the garbage collector's walks, and unfrozen as it goes (`common.heap`).
        self._settle_heap = settle_heap
        self.driver = driver
        self.device = device
        self.dtype = dtype
        self.config = config
        self._resources = resources
        self._loader = loader
        self._served: dict[str, Served] = {}
        self._pooled: dict[str, Pooled] = {}
        # The generations served now (from their arrival to their end), by request id.
        self.active_requests: Counter[str] = Counter()
        self._request_models: dict[str, str] = {}       # each of them → its model
        self._lock = asyncio.Lock()
        # Set once the leases of this worker's previous incarnation (same id, started again
        # after a crash) are given back: until then it leases nothing.
        self._past_released = asyncio.Event()
        self._baseline_rss = psutil.Process().memory_info().rss
        self._outbox = Outbox(driver)

    @property
    def lease_prefix(self) -> str:
        return worker_lease_prefix(self.worker_id)

    @property
    def loaded_models(self) -> list[str]:
        return sorted([*self._served, *self._pooled])

    @property
    def quantizations(self) -> dict[str, str]:
        """The loaded models with quantized weights, and their variant."""
        return {name: s.loaded.quantization for name, s in self._served.items() if s.loaded.quantization}

    def memory_in_use(self) -> int:
        """What the worker holds for its models: allocated bytes on a GPU, on the CPU the growth
        of its resident memory since it started."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return max(0, psutil.Process().memory_info().rss - self._baseline_rss)

    async def heartbeat(self) -> int:
        """Renews this worker's leases and reports its memory in use; returns the renewals. The
        first one gives back what a previous incarnation of this worker leased (it holds nothing
        of it now): a restarted worker's heartbeat would otherwise keep those leases alive."""
        if not self._past_released.is_set():
            released = await self._resources.release_holders(self.lease_prefix)
            if released:
                log.info("gave back %d lease(s) of this worker's previous incarnation", released)
            self._past_released.set()
        return await self._resources.renew(self.lease_prefix, self.memory_in_use(), self.device_name)

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda:{self.device.index or 0}"
        return "cpu"

    async def start_model(self, model: str, path: str, estimated_bytes: int, quantize: str = "",
                          task: str = GENERATE) -> Served | Pooled:
        check_quantization(quantize)
        if task not in TASKS:
            raise InvalidArgument.field("task", f"must be one of {', '.join(TASKS)}")
        if task != GENERATE:
            return await self._start_pooling(model, path, estimated_bytes, quantize, task)
        async with self._lock:
            if model in self._pooled:
                raise FailedPrecondition(f"{model} is loaded here for {self._pooled[model].loaded.task}; unload it "
                                         "first", reason="MODEL_TASK_MISMATCH", metadata={"model": model})
            served = self._served.get(model)
            if served is not None:
                if served.loaded.quantization != quantize:
                    raise FailedPrecondition(
                        f"{model} is loaded here with {served.loaded.quantization or 'its stored'} weights; "
                        "unload it first", reason="QUANTIZATION_MISMATCH",
                        metadata={"model": model, "loaded": served.loaded.quantization, "asked": quantize})
                return served
            if estimated_bytes <= 0:
                raise InvalidArgument.field("estimated_bytes", "must be greater than 0")
            await self._past_released.wait()      # (the first heartbeat, at start)
            lease, fraction = await self._lease_model(model, estimated_bytes)
            try:
                loaded = await asyncio.wrap_future(self.driver.call(
                    self._loader, model, path, self.device, self.dtype, self.config.kv_cache_tokens,
                    self.config.max_seq_len, quantize, "auto", self.config.compile,
                    self.config.max_running if self.config.cuda_graphs else 0, fraction))
            except BaseException as exc:
                await self._resources.release(lease)
                if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
                    raise ResourceExhausted(f"model {model} ran out of device memory while loading",
                                            reason="DEVICE_MEMORY_EXHAUSTED", metadata={"model": model}) from None
                if isinstance(exc, Exception) and not isinstance(exc, LlmosError):
                    log.exception("loading %s failed", model)
                    first = (str(exc).strip().splitlines() or [""])[0][:300]
                    raise FailedPrecondition(f"model {model} could not be loaded from its files: "
                                             f"{type(exc).__name__}: {first}", reason="MODEL_LOAD_FAILED",
                                             metadata={"model": model}) from None
                raise
            engine = Engine(model, loaded.runner, loaded.tokenizer, loaded.eos_ids, self.driver,
                            self.config.prefill_budget, self.events, self.config.prefix_cache,
                            self.config.max_adapters_per_step, self.config.max_running)
            adapters = AdapterCache(model, path, loaded.runner, self.driver, self._resources, self.worker_id,
                                    self.device_name, self.config.lease_ttl, self.config.max_loaded_adapters)
            served = Served(loaded, engine, lease, Grammars(loaded.tokenizer, loaded.runner.vocab_size, loaded.eos_ids),
                            adapters)
            self._served[model] = served
            await self._heap(heap.settle)
            return served

    async def _start_pooling(self, model: str, path: str, estimated_bytes: int, quantize: str, task: str) -> Pooled:
        if quantize:
            raise InvalidArgument.field("quantize", "pooling models run their weights as stored")
        async with self._lock:
            pooled = self._pooled.get(model)
            if pooled is not None and pooled.loaded.task == task:
                return pooled
            if pooled is not None or model in self._served:
                raise FailedPrecondition(f"{model} is loaded here for another task; unload it first",
                                         reason="MODEL_TASK_MISMATCH", metadata={"model": model, "task": task})
            if estimated_bytes <= 0:
                raise InvalidArgument.field("estimated_bytes", "must be greater than 0")
            await self._past_released.wait()
            lease = await self._resources.acquire(model_lease_holder(self.worker_id, model),
                                                  self.device_name, estimated_bytes, self.config.lease_ttl)
            try:
                loaded = await asyncio.wrap_future(self.driver.call(load_pooling_model, model, path, self.device, task))
            except BaseException:
                await self._resources.release(lease)
                raise
            pooled = self._pooled[model] = Pooled(loaded, PoolBatcher(loaded, self.driver.call), lease)
            await self._heap(heap.settle)
            return pooled

    async def pool(self, request_id: str, model: str, task: str, inputs: list[str], pairs: list[str],
                   truncate: int = 0, dimensions: int = 0) -> PoolResult:
        """Runs a pooling model over `inputs` (for score: each with its `pairs` text) in the
        batches of its batcher: embed, classify or score, as `task` asks."""
        pooled = self._pooled.get(model)
        if pooled is None:
            if model in self._served:
                raise InvalidArgument.field("model", f"{model} generates text; it does not {task}",
                                            reason="MODEL_TASK_MISMATCH")
            raise NotFound(f"model {model} is not loaded on worker {self.worker_id}",
                           reason="MODEL_NOT_LOADED", metadata={"model": model})
        loaded = pooled.loaded
        serves = {EMBED: (EMBED,), CLASSIFY: (CLASSIFY,), SCORE: (SCORE, EMBED)}.get(task, ())
        if loaded.task not in serves:
            raise InvalidArgument.field("model", f"{model} serves {loaded.task}; it does not {task}",
                                        reason="MODEL_TASK_MISMATCH")
        if dimensions and task == EMBED and dimensions not in loaded.spec.matryoshka:
            allowed = ", ".join(map(str, loaded.spec.matryoshka)) or "none (no matryoshka_dimensions in its config)"
            raise InvalidArgument.field("dimensions", f"{model} is trained to be cut to these sizes only: {allowed}",
                                        reason="DIMENSIONS_UNSUPPORTED")
        pooled.last_request = time.time()
        self._enter(request_id, model)
        try:
            cosine = task == SCORE and loaded.task == EMBED
            texts = list(dict.fromkeys([*inputs, *pairs])) if cosine else inputs     # (each text embedded once)
            encoded = await asyncio.to_thread(loaded.encode, texts, [] if cosine else pairs, truncate)
            rows = await pooled.batcher.run(encoded)
            tokens = sum(len(e["input_ids"]) for e in encoded)
            pooled.tokens_read += tokens
            if cosine:          # each pair: the cosine similarity of its two texts' vectors
                vectors = torch.nn.functional.normalize(rows.float(), dim=-1)
                at = {text: i for i, text in enumerate(texts)}
                rows = (vectors[[at[t] for t in inputs]] * vectors[[at[t] for t in pairs]]).sum(dim=-1)
            elif dimensions:
                rows = rows[:, :dimensions]
                if loaded.spec.normalize:
                    rows = torch.nn.functional.normalize(rows, dim=-1)
            values = rows.tolist()
            return PoolResult([[v] for v in values] if task == SCORE else values,
                              loaded.labels if task == CLASSIFY else [], tokens)
        finally:
            self._leave(request_id)

    async def stop_model(self, model: str) -> None:
        async with self._lock:
            pooled = self._pooled.pop(model, None)
            if pooled is not None:
                pooled.batcher.close()
                await self._resources.release(pooled.lease)
                del pooled                  # (nothing here holds the model while the collector looks)
                await self._heap(heap.release)
                log.info("unloaded %s", model)
                return
            served = self._served.pop(model, None)
            if served is None:
                return
            await asyncio.to_thread(served.engine.stop)
            await served.adapters.close()
            await self._resources.release(served.lease)
            del served                      # (nothing here holds the model while the collector looks)
            await self._heap(heap.release)
            log.info("unloaded %s", model)

    async def _heap(self, change: Callable[[], None]) -> None:
        """`heap.settle` or `heap.release` on the driver's thread (between steps), where it is asked for."""
        if self._settle_heap:
            await asyncio.wrap_future(self.driver.call(change))

    async def _lease_model(self, model: str, estimated: int) -> tuple[str, float]:
        """The model's memory lease, and the share of the GPU its KV cache may fill (0.0: a cache of
        `kv_cache_tokens`). On a GPU with `gpu_memory_fraction`, the lease is what that share of the
        device leaves now, taken before anything is allocated so that no two loads size their caches
        from the same free memory; where the resource manager refuses it, the registry's estimate."""
        holder = model_lease_holder(self.worker_id, model)
        fraction = self.config.gpu_memory_fraction
        share = await asyncio.wrap_future(self.driver.call(gpu_share, self.device, fraction))
        if share > estimated:
            try:
                return await self._resources.acquire(holder, self.device_name, share, self.config.lease_ttl), fraction
            except ResourceExhausted as exc:
                log.info("%s: %d bytes of %s are not free to lease (%s); its KV cache holds kv_cache_tokens",
                         model, share, self.device_name, exc.reason)
        return await self._resources.acquire(holder, self.device_name, estimated, self.config.lease_ttl), 0.0

    async def stop_all(self) -> None:
        for model in self.loaded_models:
            await self.stop_model(model)

    def _enter(self, request_id: str, model: str) -> None:
        self.active_requests[request_id] += 1
        self._request_models[request_id] = model

    def _leave(self, request_id: str) -> None:
        self.active_requests[request_id] -= 1
        if not self.active_requests[request_id]:
            del self.active_requests[request_id]
            self._request_models.pop(request_id, None)

    def requests_of(self, model: str) -> list[str]:
        """The ids of the generations (or pooling calls) of `model` served now."""
        return sorted(rid for rid, m in self._request_models.items() if m == model)

    def status(self) -> list[ModelStatus]:
        models = [ModelStatus(name, self.device_name, s.loaded.dtype_name,
                              s.loaded.measured_bytes, s.engine.stats(), s.last_request, s.adapters.names,
                              s.adapters.nbytes)
                  for name, s in self._served.items()]
        models += [ModelStatus(name, self.device_name, p.loaded.dtype_name, p.loaded.measured_bytes,
                               EngineStats(p.batcher.running, 0, 0, 0, p.tokens_read, self.config.max_running),
                               p.last_request)
                   for name, p in self._pooled.items()]
        return sorted(models, key=lambda m: m.model)

    def _prompt_ids(self, loaded: LoadedModel, source: GenerationInput) -> list[int]:
        tokenizer = loaded.tokenizer
        if source.prompt is None and not tokenizer.chat_template:
            raise FailedPrecondition(f"model {loaded.name} has no chat template; send a prompt",
                                     reason="NO_CHAT_TEMPLATE", metadata={"model": loaded.name})
        return prompt_ids(tokenizer, source, loaded.special_strings)

    @staticmethod
    def _check_length(loaded: LoadedModel, source: GenerationInput) -> None:
        """Refuses, without tokenizing it, a prompt that cannot fit: a token covers at most a
        few characters (MAX_CHARS_PER_TOKEN is generous), so longer text is over the limit."""
        chars = len(source.prompt) if source.prompt is not None else sum(len(m.content) for m in source.messages)
        chars += sum(len(t.parameters) + len(t.description) for t in source.tools.functions) if source.tools else 0
        if chars > loaded.max_seq_len * MAX_CHARS_PER_TOKEN:
            raise InvalidArgument.field(
                "prompt", f"is {chars} characters, far more than the {loaded.max_seq_len} tokens this model "
                          "serves per sequence", reason="PROMPT_TOO_LONG")

    @staticmethod
    def _max_new(loaded: LoadedModel, prompt_len: int, params: SamplingParams, token_budget: int = 0) -> int:
        """The output limit; refuses requests that can never fit in a cache slot. Within a
        quota's `token_budget` (prompt + output), the output is cut to what is left of it."""
        if token_budget:
            if prompt_len >= token_budget:
                raise ResourceExhausted(
                    f"the prompt is {prompt_len} tokens, the tenant's quota reserved {token_budget} for the "
                    "whole request", reason="QUOTA_EXCEEDED",
                    metadata={"limit": "tokens_per_minute", "requested": str(prompt_len)})
        room = loaded.max_seq_len - prompt_len
        if room < 1:
            raise InvalidArgument.field(
                "prompt", f"is {prompt_len} tokens; this model serves at most {loaded.max_seq_len} "
                          "tokens of prompt and output together", reason="PROMPT_TOO_LONG")
        if params.max_tokens is None:
            return min(DEFAULT_MAX_TOKENS, room, token_budget - prompt_len if token_budget else room)
        if params.max_tokens > room:
            raise InvalidArgument.field(
                "sampling.max_tokens", f"{params.max_tokens} tokens after a prompt of {prompt_len} "
                f"exceed the {loaded.max_seq_len} tokens this model serves per sequence",
                reason="CONTEXT_LENGTH_EXCEEDED")
        return params.max_tokens if not token_budget else min(params.max_tokens, token_budget - prompt_len)

    async def generate(self, request_id: str, model: str, source: GenerationInput,
                       params: SamplingParams, trace_context: object = None,
                       token_budget: int = 0, adapter: str = "", adapter_path: str = "") -> AsyncIterator[Chunk]:
        """Streams the generation's chunks, under the LoRA adapter `adapter` (in `adapter_path`)
        when one is named. `trace_context`: the request's span context, which the engine's
        spans link to."""
        served = self._served.get(model)
        if served is None and model in self._pooled:
            raise InvalidArgument.field("model", f"{model} serves {self._pooled[model].loaded.task}; it does not "
                                        "generate text", reason="MODEL_TASK_MISMATCH")
        if served is None:
            raise NotFound(f"model {model} is not loaded on worker {self.worker_id}",
                           reason="MODEL_NOT_LOADED", metadata={"model": model})
        if adapter and not adapter_path:
            raise InvalidArgument.field("adapter_path", "is required with an adapter")
        served.last_request = time.time()
        self._enter(request_id, model)      # known here from now until it ends
        lora = None
        try:
            loaded = served.loaded
            if adapter:
                lora, adapter_key = await served.adapters.take(adapter, adapter_path)
            self._check_length(loaded, source)
            prompt_ids = await asyncio.to_thread(self._prompt_ids, loaded, source)  # long prompts: off the loop
            max_new = self._max_new(loaded, len(prompt_ids), params, token_budget)
            if params.logit_bias and params.logit_bias[-1][0] >= loaded.runner.vocab_size:
                raise InvalidArgument.field("sampling.logit_bias", f"names token {params.logit_bias[-1][0]}, outside "
                                            f"this model's vocabulary of {loaded.runner.vocab_size}")
            constraint, calls = None, None
            tools = source.tools if source.tools is not None and source.tools.offered else None
            if params.response_format is not None:        # compiled (or found) off the loop
                constraint = await asyncio.to_thread(served.grammars.constraint, params.response_format)
            elif tools is not None:                        # every call the model opens is whole and valid
                style = format_of(loaded.tokenizer.chat_template)
                constraint = await asyncio.to_thread(served.grammars.constraint,
                                                     ResponseFormat(FormatKind.TOOLS, tool_grammar(tools, style)))
                calls = CallParser(style)
            queue: asyncio.Queue[Chunk | LlmosError] = self._outbox.queue()

            def deliver(item: Chunk | LlmosError) -> None:
                self._outbox.put(queue, item)

            seq = Sequence(request_id, prompt_ids, params, max_new, deliver, trace_context=trace_context,
                           max_backlog=self.config.max_backlog, constraint=constraint, adapter=lora)
            served.engine.submit(seq)
            finished = False
            try:
                while True:
                    item = await queue.get()
                    taken = 1
                    # Tokens that arrived while the stream was busy go out together: fewer,
                    # larger messages exactly when the consumer is behind.
                    while not isinstance(item, LlmosError) and item.finish_reason is None and not queue.empty():
                        following = queue.get_nowait()
                        taken += 1
                        if isinstance(following, LlmosError):
                            item = following
                            break
                        item = merge_chunks(item, following)
                    served.engine.took(seq, taken)
                    if isinstance(item, LlmosError):
                        finished = True
                        raise item
                    finished = item.finish_reason is not None
                    if params.logprobs or params.top_logprobs:
                        served.name_tokens(item)
                    yield item if calls is None else read_calls(calls, item)
                    if finished:
                        return
            finally:
                if not finished:
                    served.engine.cancel(seq)
        finally:
            if lora is not None:
                served.adapters.give_back(adapter_key)
            self._leave(request_id)


def read_calls(parser: CallParser, chunk: Chunk) -> Chunk:
    """`chunk` with the tool calls completed in its text taken out of the text; a generation that
    called tools and stopped ends with TOOL_CALLS."""
    text, calls = parser.push(chunk.text)
    if chunk.finish_reason is not None:
        tail, more = parser.finish()
        text, calls = text + tail, calls + more
        if parser.calls and chunk.finish_reason is FinishReason.STOP:
            chunk.finish_reason = FinishReason.TOOL_CALLS
    chunk.text, chunk.tool_calls = text, calls
    return chunk
