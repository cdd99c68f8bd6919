"""The inference engine of one loaded model: iteration-level (continuous) batching over a paged
KV cache.

The worker's engine driver runs steps. Before each step, cancelled sequences leave, decoding
sequences that cross into a new block get one, and waiting ones join in arrival order while the
cache has blocks for their prompts (less what the prefix cache already holds, `blocks.py`) and
fewer than `max_running` run; each step then advances every decoding sequence by one token and
feeds the next chunk of waiting prompts (at most `prefill_budget` prompt tokens a step, so long
prompts never stall the running streams; on a CPU fewer when many short prompts wait, see
`Engine.prompt_share`). A sequence leaves the batch the step it finishes, and
its blocks go back to the pool; its full blocks stay in the prefix cache for a later prompt that
starts the same way. Results reach asyncio through the callback each sequence carries, called on
the driver's thread.

When a decoding sequence needs a block and none is free, the sequence that joined last is
preempted: its blocks go back (its full ones stay in the prefix cache), and it waits at the head of
the line to compute again what it held, then goes on where it stopped. Its client sees nothing but
a pause: the computation is batch-invariant, so its output is the one it would have had.

A sequence may run under a LoRA adapter (`lora.py`); sequences of different adapters and of
the base model share steps. A step holds at most `max_adapters_per_step` distinct adapters:
when more are running, the adapters take turns (those that waited longest first), and the
others' sequences keep their blocks and wait a step or more. Base sequences run every step.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from llmos.common.domain import Chunk, FinishReason, Usage
from llmos.common.errors import Internal, LlmosError, Unavailable

from .attention import BLOCK, PagedCache, Part, Step, blocks_for
from .blocks import BlockManager, block_digest
from .driver import EngineDriver
from .lora import Adapter, LoraBatch, require_adapters
from .sampling import greedy_picks, logprob_of, make_generator, sample, top_logprobs
from .sequence import Sequence
from .textstream import Detokenizer, StopStrings, decoder_of

log = logging.getLogger(__name__)

# A CPU engine step's own cost, in the prompt tokens that cost as much: SmolLM2-135M in bf16 on two
# cores with AMX, a step of one 16-token prompt 10.4 ms and one of 15 prompts (180 tokens) 47 ms, so
# 0.22 ms a token and 6.9 ms a step (`Engine.prompt_share`).
CPU_STEP_TOKENS = 32


class Runner(Protocol):
    """A model's batched forward over its paged KV cache: `llama.LlamaRunner` (the lean path) or
    `generic.GenericRunner` (any causal LM through its transformers code)."""

    implementation: str
    device: torch.device
    max_len: int
    vocab_size: int
    cache: PagedCache

    @property
    def nbytes(self) -> int: ...

    def forward(self, tokens: torch.Tensor, step: Step, logit_rows: torch.Tensor,
                begin: Callable[[], None] | None = None) -> torch.Tensor:
        """The logits of the rows `logit_rows` of the step's flat batch, in float32 or the model's
        dtype. Calls `begin` (when given) once the step's inputs are built, as its layers begin. (A
        runner whose `supports_adapters` is true takes `lora: lora.LoraBatch` too.)"""


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_tokens_used: int
    kv_tokens_capacity: int
    tokens_generated: int
    max_running: int
    # Positions in blocks no sequence holds that the prefix cache keeps (free for any sequence).
    kv_tokens_kept: int = 0
    blocks_total: int = 0
    blocks_free: int = 0
    block_size: int = BLOCK
    preemptions: int = 0


class EngineEvents:
    """What the engine tells its telemetry, on the driver's thread; this base ignores it all.
    Each call must be cheap: they run between and after steps."""

    def step(self, model: str, batch: list[Sequence], prefill_tokens: int, kv_used: int, kv_capacity: int,
             start_ns: int, end_ns: int) -> None:
        """One engine step ran over `batch`, whose sequences held `kv_used` cache positions."""

    def token(self, model: str, seq: Sequence, now_ns: int) -> None:
        """`seq` got a token (its first when `seq.first_token_ns == now_ns`)."""

    def joined(self, model: str, seq: Sequence, now_ns: int) -> None:
        """`seq` left the engine's waiting line for the batch, where `seq.reused` of its prompt's
        positions were found in the prefix cache (when the engine has one)."""

    def preempted(self, model: str, seq: Sequence, now_ns: int) -> None:
        """`seq` gave its blocks back to let an older sequence grow; it will compute them again."""

    def finished(self, model: str, seq: Sequence, reason: FinishReason, now_ns: int) -> None:
        """`seq` ended with `reason` (its last chunk is delivered)."""

    def released(self, model: str, seq: Sequence, now_ns: int) -> None:
        """`seq` left the engine (its blocks, if it held any, are back in the pool)."""


class Engine:
    def __init__(self, name: str, runner: Runner, tokenizer: Any, eos_ids: frozenset[int],
                 driver: EngineDriver, prefill_budget: int = 256, events: EngineEvents | None = None,
                 prefix_cache: bool = True, max_adapters_per_step: int = 4, max_running: int = 256,
                 step_tokens: int | None = None) -> None:
        if max_adapters_per_step < 1:
            raise ValueError("max_adapters_per_step must be at least 1")
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        self.name = name
        self.events = events or EngineEvents()
        self.runner = runner
        self.tokenizer = tokenizer
        self._decode = decoder_of(tokenizer)
        self.eos_ids = eos_ids
        self.prefill_budget = prefill_budget
        # A step's own cost in prompt tokens (`prompt_share`); 0: every step feeds `prefill_budget`.
        self.step_tokens = (CPU_STEP_TOKENS if runner.device.type == "cpu" else 0) if step_tokens is None \
            else step_tokens
        self.max_adapters_per_step = max_adapters_per_step
        self.max_running = max_running
        self.blocks = BlockManager(runner.cache.blocks, BLOCK)
        self.prefix_cache = prefix_cache
        # Blocks kept free for running sequences to grow into when one joins (1% of the pool).
        self._headroom = max(1, self.blocks.total // 100)
        self.preemptions = 0
        # When each running adapter last had its turn (by the count of turns taken).
        self._turns: dict[Adapter, int] = {}
        self._turns_taken = 0
        self._driver = driver
        self._wake = driver.wake
        self._inbox: deque[Sequence] = deque()
        self._running: list[Sequence] = []   # in the order they joined
        self.closing = False
        self._closed = False
        self.tokens_generated = 0
        self._window = [0, 0.0, 0.0]   # steps, seconds in steps, seconds in the forward pass
        # Computes the masks of constrained sequences while a step's forward runs (made at the first).
        self._masks: ThreadPoolExecutor | None = None
        driver.add(self)

    def stats(self) -> EngineStats:
        with self._wake:           # the driver's thread changes all of these
            running = len(self._running)
            waiting = sum(1 for s in self._inbox if not s.cancelled)
            used, kept, free = self.blocks.used, self.blocks.kept, self.blocks.available
        return EngineStats(running, waiting, used * BLOCK, self.blocks.total * BLOCK, self.tokens_generated,
                           self.max_running, kept * BLOCK, self.blocks.total, free, BLOCK, self.preemptions)

    def submit(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            require_adapters(self.runner, seq.adapter.name, self.name)
        if len(seq.prompt_ids) + seq.max_new > self.blocks.total * BLOCK:
            raise ValueError(f"a sequence of {len(seq.prompt_ids) + seq.max_new} positions cannot fit "
                             f"{self.blocks.total * BLOCK}")
        with self._wake:
            if self.closing:
                raise Unavailable(f"model {self.name} is unloading", reason="MODEL_UNLOADING")
            self._inbox.append(seq)
            self._wake.notify_all()

    def cancel(self, seq: Sequence) -> None:
        """Marks the sequence; it leaves before the next step and frees its blocks."""
        with self._wake:              # never between the step's checks and its batch
            seq.cancel_ns = time.time_ns()
            seq.cancelled = True
            self._wake.notify_all()

    def stop(self) -> None:
        """Ends every sequence with UNAVAILABLE and waits until the driver let go of the engine."""
        with self._wake:
            self.closing = True
            self._wake.notify_all()
            if not self._driver.running:
                self.close()
            while not self._closed:
                self._wake.wait()

    def has_work(self) -> bool:
        """Something a step would do: a waiting sequence that can join (or is cancelled, to leave),
        or a running one that is not paused."""
        if self.closing or any(not s.paused for s in self._running):
            return True
        return bool(self._inbox) and (self._can_join(self._inbox[0]) is not None
                                      or any(s.cancelled for s in self._inbox))

    def took(self, seq: Sequence, chunks: int) -> None:
        """The stream took `chunks` of the sequence's chunks; a paused sequence goes on."""
        with self._wake:            # with the driver's lock: it cannot fall asleep on a stale pause
            was_paused = seq.paused
            seq.taken += chunks
            if was_paused and not seq.paused:
                self._wake.notify_all()

    def close(self) -> None:
        """Called holding the lock, between steps."""
        if self._closed:
            return
        for seq in [*self._inbox, *self._running]:
            seq.deliver(Unavailable(f"model {self.name} was unloaded", reason="MODEL_UNLOADED"))
        self._inbox.clear()
        for seq in self._running:
            self.blocks.release(seq.blocks)
            seq.blocks = []
        self._running.clear()
        self.blocks.clear()
        if self._masks is not None:
            self._masks.shutdown(wait=False, cancel_futures=True)
        self._closed = True
        self._wake.notify_all()

    # on the driver's thread ------------------------------------------------

    def step(self) -> None:
        """Lets cancelled sequences leave, running ones grow and waiting ones join, then runs one step."""
        with self._wake:
            if self.closing:
                return
            for seq in [s for s in self._running if s.cancelled]:
                self._release(seq)
            if any(s.cancelled for s in self._inbox):
                now = time.time_ns()
                for seq in [s for s in self._inbox if s.cancelled]:
                    self._inbox.remove(seq)
                    self.events.released(self.name, seq, now)
            self._grow()
            self._join()
            batch = self._take_turns([s for s in self._running if not s.paused and not s.cancelled])
        if not batch:
            return
        started = time.perf_counter()
        start_ns = time.time_ns()
        try:
            prefill_tokens = self._step(batch)
        except Exception:  # noqa: BLE001 - a failed step fails its sequences, not the engine
            log.exception("engine step failed for %s", self.name)
            with self._wake:
                for seq in batch:
                    if seq.running:
                        seq.deliver(Internal("generation failed"))
                        self._release(seq)
        else:
            self.events.step(self.name, batch, prefill_tokens, sum(s.cached for s in batch), self.blocks.total * BLOCK,
                             start_ns, time.time_ns())
        window = self._window
        window[0] += 1
        window[1] += time.perf_counter() - started
        if window[0] == 200:
            log.debug("%s: %.1f ms a step, %.1f ms of it in the forward pass, over the last 200 steps",
                      self.name, window[1] / 200 * 1e3, window[2] / 200 * 1e3)
            self._window = [0, 0.0, 0.0]

    def _grow(self) -> None:
        """Gives each decoding sequence whose next position starts a block that block, preempting
        the sequences that joined last while none is free. Holds the lock."""
        for seq in list(self._running):
            if (not seq.running or seq.cancelled or seq.paused or seq.prefilling
                    or seq.cached < len(seq.blocks) * BLOCK):
                continue
            while not self.blocks.available:
                # The last to join goes first; sequences whose streams stopped reading last of all.
                victims = [s for s in self._running if not s.paused] or self._running
                self._preempt(victims[-1])
            if seq.running:
                seq.blocks += self.blocks.allocate(1)

    def _preempt(self, seq: Sequence) -> None:
        """Gives the sequence's blocks back and puts it at the head of the waiting line, to compute
        again what it held. Holds the lock."""
        self._running.remove(seq)
        held = len(seq.blocks)
        self.blocks.release(seq.blocks)
        seq.blocks = []
        seq.cached = 0
        seq.fill_to = len(seq.prompt_ids) + max(0, len(seq.output_ids) - 1)
        seq.preemptions += 1
        self.preemptions += 1
        self._inbox.appendleft(seq)
        self.events.preempted(self.name, seq, time.time_ns())
        log.info("preempted %s of %s, holding %d blocks", seq.request_id, self.name, held)

    def _digests(self, seq: Sequence, full: int) -> list[bytes]:
        """The digests of the sequence's first `full` full blocks (computed once)."""
        owner = _owner(seq)
        while len(seq.digests) < full:
            i = len(seq.digests)
            previous = seq.digests[-1] if seq.digests else b""
            seq.digests.append(block_digest(previous, seq.tokens(i * BLOCK, (i + 1) * BLOCK), owner))
        return seq.digests[:full]

    def _can_join(self, seq: Sequence) -> tuple[list[int], int] | None:
        """The blocks the prefix cache holds for the sequence's start and how many more it needs,
        when it may join now: fewer than `max_running` run and the pool has those blocks (and room
        for the running ones to grow). None when it must wait."""
        if len(self._running) >= self.max_running:
            return None
        shared: list[int] = []
        if self.prefix_cache:
            # A new prompt computes at least its last position (its logits); a preempted sequence's
            # next decode step computes what comes next.
            usable = seq.fill_to // BLOCK if seq.output_ids else (seq.fill_to - 1) // BLOCK
            shared = self.blocks.lookup(self._digests(seq, usable))
        # (A preempted sequence decodes at once when its blocks were all found: room for that too.)
        fresh = blocks_for(seq.fill_to + (1 if seq.output_ids else 0)) - len(shared)
        headroom = self._headroom if self._running else 0
        if self.blocks.cost(shared, fresh) > self.blocks.available - headroom:
            return None
        return shared, fresh

    def _join(self) -> None:
        """Lets waiting sequences join in arrival order while they can. Holds the lock."""
        while self._inbox:
            seq = self._inbox[0]
            plan = self._can_join(seq)
            if plan is None:
                return
            self._inbox.popleft()
            shared, fresh = plan
            self.blocks.share(shared)
            seq.blocks = shared + self.blocks.allocate(fresh)
            seq.cached = len(shared) * BLOCK
            self._running.append(seq)
            if not seq.preemptions:
                seq.reused = seq.cached
                self.events.joined(self.name, seq, time.time_ns())

    def _take_turns(self, batch: list[Sequence]) -> list[Sequence]:
        """`batch` with the sequences of at most `max_adapters_per_step` adapters: the ones whose
        last turn is the oldest (an adapter new to the batch first, then in batch order)."""
        adapters = list(dict.fromkeys(s.adapter for s in batch if s.adapter is not None))
        if not adapters and not self._turns:
            return batch
        last = self._turns
        chosen = sorted(adapters, key=lambda a: last.get(a, 0))[:self.max_adapters_per_step]
        self._turns = {a: last.get(a, 0) for a in adapters}
        for adapter in chosen:            # each turn stamped apart: no ties among adapters that ran
            self._turns_taken += 1
            self._turns[adapter] = self._turns_taken
        if len(chosen) == len(adapters):
            return batch
        return [s for s in batch if s.adapter is None or s.adapter in chosen]

    def _release(self, seq: Sequence) -> None:
        """Gives the sequence's blocks back (its full ones stay in the prefix cache); it leaves.
        Holds the lock."""
        self._running.remove(seq)
        self.blocks.release(seq.blocks)
        seq.blocks = []
        self.events.released(self.name, seq, time.time_ns())

    def _register(self, seq: Sequence, before: int) -> None:
        """Names the blocks the sequence filled this step (from `before` positions held) in the
        prefix cache."""
        full = seq.cached // BLOCK
        if not self.prefix_cache or full == before // BLOCK:
            return
        digests = self._digests(seq, full)
        for i in range(before // BLOCK, full):
            self.blocks.register(seq.blocks[i], digests[i])

    def prompt_share(self, prefilling: list[Sequence], decoding: int) -> int:
        """The prompt tokens a step feeds of `prefilling` (the waiting prompts, in order) beside
        `decoding` decoding rows.

        At most `prefill_budget`. Where a step costs as much as `step_tokens` prompt tokens besides
        the rows it runs (a CPU's: the weights read once a step), it feeds about the square root of
        (`step_tokens` + `decoding`) times the tokens that wait, and never less than the first
        prompt's rest: of prompts that arrive together, those fed first get their first token a
        step or two before the last are fed, where one step of them all makes each wait for all.
        Feeding k tokens a step, the prompts' mean wait is about (W / k + 1) / 2 steps of
        (`step_tokens` + `decoding` + k) tokens' time (W: what waits), least at
        k = sqrt((`step_tokens` + `decoding`) x W). The prompts after the first are fed whole or
        wait for the next step: a prompt cut at the share would give no token for the tokens fed,
        and a cut is where a row's bits may change on a path that is not chunk-invariant (bf16
        prompts through torch's attention when the engine's kernel is off)."""
        if not self.step_tokens or not prefilling:
            return self.prefill_budget
        waiting = sum(s.fill_to - s.cached for s in prefilling)
        first = prefilling[0].fill_to - prefilling[0].cached
        return min(self.prefill_budget, max(first, math.isqrt((self.step_tokens + decoding) * waiting)))

    def _step(self, batch: list[Sequence]) -> int:
        """Runs one step over `batch`; returns the prompt tokens it fed."""
        device = self.runner.device
        decoding = [s for s in batch if not s.prefilling]
        tokens = [s.output_ids[-1] for s in decoding]
        parts = [Part(s.blocks, s.cached, 1, decode=True) for s in decoding]
        fed: list[tuple[Sequence, int]] = []
        budget = self.prompt_share([s for s in batch if s.prefilling], len(decoding))
        for s in batch:
            if s.prefilling and budget > 0:
                if fed and self.step_tokens and s.fill_to - s.cached > budget:
                    break               # (with a share, prompts after the first go whole or wait)
                if s.detok is None:
                    self._begin(s)
                n = min(budget, s.fill_to - s.cached)
                budget -= n
                fed.append((s, n))
                parts.append(Part(s.blocks, s.cached, n))
                tokens.extend(s.tokens(s.cached, s.cached + n))
        # Prompt tokens fed (a preempted sequence's recomputation is not counted again).
        prompt_fed = sum(n for s, n in fed if not s.preemptions)
        rows, sampled = list(range(len(decoding))), list(decoding)
        offset = len(decoding)
        for s, n in fed:
            offset += n
            if s.cached + n == s.fill_to and not s.output_ids:     # a prompt's end: its first token
                rows.append(offset - 1)
                sampled.append(s)

        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        lora = None
        if any(s.adapter is not None for s in batch):
            adapters = tuple(sorted({s.adapter for s in batch if s.adapter is not None}, key=lambda a: a.uid))
            which = {a: i for i, a in enumerate(adapters)}
            adapter_rows = [which.get(s.adapter, -1) for s in decoding]
            for s, n in fed:
                adapter_rows.extend([which.get(s.adapter, -1)] * n)
            lora = LoraBatch(adapters, adapter_rows)

        constrained = [s for s in sampled if s.constraint is not None]
        if constrained:
            if self._masks is None:
                self._masks = ThreadPoolExecutor(1, thread_name_prefix=f"masks-{self.name}")
            for s in constrained:
                s.constraint.prepare(self._masks)
        started = time.perf_counter()
        arguments = (index(tokens), Step(parts, device), index(rows))
        # The last step's tokens go to their streams as this step's layers begin (`EngineDriver.hand_over`).
        begin = self._driver.hand_over
        logits = (self.runner.forward(*arguments, begin=begin) if lora is None
                  else self.runner.forward(*arguments, lora=lora, begin=begin))
        self._window[2] += time.perf_counter() - started
        for s in decoding:
            s.cached += 1
            self._register(s, s.cached - 1)
        for s, n in fed:
            s.cached += n
            self._register(s, s.cached - n)
        finished, failed = [], []
        plain = [row for row, s in enumerate(sampled) if s.plainly_greedy]
        picks = dict(zip(plain, greedy_picks(logits, plain), strict=True))
        for row, s in enumerate(sampled):
            try:
                if self._emit(s, logits[row], picks.get(row)):
                    finished.append(s)
            except Exception as exc:  # noqa: BLE001 - one sequence's sampling or format fails it alone
                failed.append((s, exc))
        if finished or failed:
            with self._wake:
                for s in finished:
                    if s.running:
                        self._release(s)
                for s, exc in failed:
                    self._fail(s, exc)
        return prompt_fed

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        """Ends one sequence with `exc` (typed errors as they are, anything else INTERNAL) and frees
        its blocks; the others in its step go on. Holds the lock."""
        if isinstance(exc, LlmosError):
            log.info("sequence %s of %s ended: %s (%s)", seq.request_id, self.name, exc.code, exc.reason)
            error = exc
        else:
            log.error("sequence %s of %s failed", seq.request_id, self.name, exc_info=exc)
            error = Internal("generation failed", reason="SEQUENCE_FAILED")
        seq.deliver(error)
        if seq.running:
            self._release(seq)

    def _begin(self, seq: Sequence) -> None:
        device = self.runner.device
        seq.generator = make_generator(seq.params, device)
        seq.detok = Detokenizer(self.tokenizer, seq.prompt_ids, self._decode)
        seq.stops = StopStrings(seq.params.stop)
        if seq.params.repetition_penalty != 1.0:
            # Every token the sequence will hold, filled as they come: no allocation per token.
            seq.seen = torch.empty(len(seq.prompt_ids) + seq.max_new, dtype=torch.long, device=device)
            seq.seen[:len(seq.prompt_ids)] = torch.tensor(seq.prompt_ids, dtype=torch.long)
        if seq.params.presence_penalty or seq.params.frequency_penalty:
            seq.counts = torch.zeros(self.runner.vocab_size, dtype=torch.float32, device=device)
        if seq.params.logit_bias:
            ids, values = zip(*seq.params.logit_bias, strict=True)
            seq.bias = (torch.tensor(ids, dtype=torch.long, device=device),
                        torch.tensor(values, dtype=torch.float32, device=device))

    def _emit(self, seq: Sequence, logits: torch.Tensor, picked: int | None = None) -> bool:
        """Samples the sequence's next token (`picked` when the step picked it already) and delivers
        it; returns True when it finished."""
        if seq.cancelled:
            return True
        if picked is None or seq.params.logprobs or seq.params.top_logprobs:
            logits = logits.float()     # (a bf16 model's: widened exactly, only where they are read)
        now = time.time_ns()
        if not seq.output_ids:
            seq.first_token_ns = now
        held = len(seq.prompt_ids) + len(seq.output_ids)
        seen = None if seq.seen is None else seq.seen[:held]
        if seq.constraint is not None:
            logits = seq.constraint.mask(logits)
        if picked is None:
            token, logprob = sample(logits, seq.params, seq.generator, seen, seq.counts, seq.bias)
        else:
            token, logprob = picked, logprob_of(logits, picked, seq.params.logprobs)
        seq.output_ids.append(token)
        if seq.counts is not None:
            seq.counts[token] += 1
        if seq.seen is not None:
            seq.seen[held] = token
        self.tokens_generated += 1
        finish, text, stopped = None, "", False
        complete = False
        if seq.constraint is not None:
            seq.constraint.advance(token)
            complete = seq.constraint.complete
        if token in self.eos_ids and (not seq.params.ignore_eos or seq.constraint is not None):
            finish = FinishReason.STOP
        else:
            text, stopped = seq.stops.push(seq.detok.push(token))
            if stopped or complete:      # a structure ends where it is complete
                finish = FinishReason.STOP
            elif len(seq.output_ids) >= seq.max_new:
                finish = FinishReason.LENGTH
        if finish is not None and not stopped:
            tail, stopped = seq.stops.push(seq.detok.flush())
            text += tail if stopped else tail + seq.stops.flush()
            if stopped:
                finish = FinishReason.STOP
        chunk = Chunk(text=text, token_ids=[token], logprobs=[logprob] if seq.params.logprobs else [])
        if seq.params.top_logprobs:
            chunk.top_logprobs = [top_logprobs(logits, seq.params.top_logprobs)]
        if finish is not None:
            chunk.finish_reason = finish
            chunk.usage = Usage(len(seq.prompt_ids), len(seq.output_ids), seq.reused)
        seq.delivered += 1
        seq.deliver(chunk)
        self.events.token(self.name, seq, now)
        if finish is not None:
            self.events.finished(self.name, seq, finish, now)
        return finish is not None


def _owner(seq: Sequence) -> int | None:
    """Whose keys and values a sequence computes: its adapter's (by its id), or the base model's."""
    return None if seq.adapter is None else seq.adapter.uid
