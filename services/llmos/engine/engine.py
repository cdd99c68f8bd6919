"""The inference engine of one loaded model: iteration-level (continuous) batching.

The worker's engine driver runs steps. Before each step, cancelled sequences leave and
waiting ones join while there are free cache slots; each step then advances every
decoding sequence by one token and feeds the next chunk of waiting prompts
(at most `prefill_budget` prompt tokens a step, so long prompts never stall the
running streams). A sequence leaves the batch the step it finishes, and its slot
is free for the next step; what it computed stays in a free slot for a later prompt
that starts the same way (`prefix.py`). Results reach asyncio through the callback
each sequence carries, called on the driver's thread.

A sequence may run under a LoRA adapter (`lora.py`); sequences of different adapters and of
the base model share steps. A step holds at most `max_adapters_per_step` distinct adapters:
when more are running, the adapters take turns (those that waited longest first), and the
others' sequences keep their slots and wait a step or more. Base sequences run every step.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from llmos.common.domain import Chunk, FinishReason, Usage
from llmos.common.errors import Internal, LlmosError, Unavailable

from .attention import PrefillChunk
from .driver import EngineDriver
from .lora import Adapter, LoraBatch, require_adapters
from .prefix import PrefixCache
from .sampling import make_generator, sample, top_logprobs
from .sequence import Sequence
from .textstream import Detokenizer, StopStrings

log = logging.getLogger(__name__)


class Runner(Protocol):
    """A model's batched forward over its slot KV cache: `llama.LlamaRunner` (the lean path) or
    `generic.GenericRunner` (any causal LM through its transformers code)."""

    implementation: str
    device: torch.device
    slots: int
    max_len: int
    vocab_size: int

    @property
    def kv_positions(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def move_slot(self, source: int, target: int, length: int) -> None: ...

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, decode_count: int,
                active: int, prefills: list[PrefillChunk], logit_rows: torch.Tensor) -> torch.Tensor:
        """(A runner whose `supports_adapters` is true takes `lora: lora.LoraBatch` too.)"""


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_tokens_used: int
    kv_tokens_capacity: int
    tokens_generated: int
    max_running: int
    # Positions kept in free slots by the prefix cache (free for any sequence that joins).
    kv_tokens_kept: int = 0


class EngineEvents:
    """What the engine tells its telemetry, on the driver's thread; this base ignores it all.
    Each call must be cheap: they run between and after steps."""

    def step(self, model: str, batch: list[Sequence], prefill_tokens: int, kv_used: int, kv_capacity: int,
             start_ns: int, end_ns: int) -> None:
        """One engine step ran over `batch`, whose sequences held `kv_used` cache positions."""

    def token(self, model: str, seq: Sequence, now_ns: int) -> None:
        """`seq` got a token (its first when `seq.first_token_ns == now_ns`)."""

    def joined(self, model: str, seq: Sequence, now_ns: int) -> None:
        """`seq` left the engine's waiting line for a cache slot, where `seq.reused` of its
        prompt's positions were found in the prefix cache (when the engine has one)."""

    def finished(self, model: str, seq: Sequence, reason: FinishReason, now_ns: int) -> None:
        """`seq` ended with `reason` (its last chunk is delivered)."""

    def released(self, model: str, seq: Sequence, now_ns: int) -> None:
        """`seq` left the engine (its cache slot, if it held one, is free)."""


class Engine:
    def __init__(self, name: str, runner: Runner, tokenizer: Any, eos_ids: frozenset[int],
                 driver: EngineDriver, prefill_budget: int = 256, events: EngineEvents | None = None,
                 prefix_cache: bool = True, max_adapters_per_step: int = 4) -> None:
        if max_adapters_per_step < 1:
            raise ValueError("max_adapters_per_step must be at least 1")
        self.name = name
        self.events = events or EngineEvents()
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.prefill_budget = prefill_budget
        self.max_adapters_per_step = max_adapters_per_step
        # When each running adapter last had its turn (by the count of turns taken).
        self._turns: dict[Adapter, int] = {}
        self._turns_taken = 0
        self._driver = driver
        self._wake = driver.wake
        self._inbox: deque[Sequence] = deque()
        self._running: list[Sequence] = []   # index == cache slot
        self.prefix = PrefixCache() if prefix_cache else None
        self.closing = False
        self._closed = False
        self.tokens_generated = 0
        self._window = [0, 0.0, 0.0]   # steps, seconds in steps, seconds in the forward pass
        # Computes the masks of constrained sequences while a step's forward runs (made at the first).
        self._masks: ThreadPoolExecutor | None = None
        driver.add(self)

    def stats(self) -> EngineStats:
        with self._wake:           # the driver's thread changes all of these
            running = list(self._running)
            waiting = sum(1 for s in self._inbox if not s.cancelled)
            kept = self.prefix.tokens if self.prefix else 0
        return EngineStats(len(running), waiting, sum(s.cached for s in running),
                           self.runner.kv_positions, self.tokens_generated, self.runner.slots, kept)

    def submit(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            require_adapters(self.runner, seq.adapter.name, self.name)
        with self._wake:
            if self.closing:
                raise Unavailable(f"model {self.name} is unloading", reason="MODEL_UNLOADING")
            self._inbox.append(seq)
            self._wake.notify_all()

    def cancel(self, seq: Sequence) -> None:
        """Marks the sequence; it leaves before the next step and frees its slot."""
        seq.cancel_ns = time.time_ns()
        seq.cancelled = True
        with self._wake:
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
        """Something a step would do: a waiting sequence with a free slot to join (or cancelled,
        to leave), or a running one that is not paused."""
        joinable = bool(self._inbox) and (len(self._running) < self.runner.slots
                                          or any(s.cancelled for s in self._inbox))
        return self.closing or joinable or any(not s.paused for s in self._running)

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
        self._running.clear()
        if self.prefix:
            self.prefix.clear()
        if self._masks is not None:
            self._masks.shutdown(wait=False, cancel_futures=True)
        self._closed = True
        self._wake.notify_all()

    # on the driver's thread ------------------------------------------------

    def step(self) -> None:
        """Lets cancelled sequences leave and waiting ones join, then runs one step."""
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
            while self._inbox and len(self._running) < self.runner.slots:
                seq = self._inbox.popleft()
                seq.slot = len(self._running)
                self._reuse_prefix(seq)
                self._running.append(seq)
                self.events.joined(self.name, seq, time.time_ns())
            batch = self._take_turns([s for s in self._running if not s.paused])
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
                    if seq.slot >= 0:
                        seq.deliver(Internal("generation failed"))
                        self._release(seq, keep=False)
        else:
            self.events.step(self.name, batch, prefill_tokens, sum(s.cached for s in batch),
                             self.runner.kv_positions, start_ns, time.time_ns())
        window = self._window
        window[0] += 1
        window[1] += time.perf_counter() - started
        if window[0] == 200:
            log.debug("%s: %.1f ms a step, %.1f ms of it in the forward pass, over the last 200 steps",
                      self.name, window[1] / 200 * 1e3, window[2] / 200 * 1e3)
            self._window = [0, 0.0, 0.0]

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

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Gives a joining sequence the longest prefix of its prompt that the cache keeps or a
        running sequence has computed (requests in flight with the same system prompt)."""
        if self.prefix is None:
            return
        owner = _owner(seq)
        source, length = self.prefix.match(
            seq.prompt_ids, seq.slot, ((s.slot, s.computed) for s in self._running
                                       if s.cached and _owner(s) == owner), owner)
        self.prefix.drop(seq.slot)
        if length:
            if source != seq.slot:
                self.runner.move_slot(source, seq.slot, length)
            seq.cached = seq.reused = length

    def _release(self, seq: Sequence, keep: bool = True) -> None:
        """Frees the sequence's slot; the last slot's sequence moves into it. What the sequence
        computed is kept in a free slot for the prefix cache (unless its step failed). Holds
        the lock."""
        hole, last = seq.slot, len(self._running) - 1
        if self.prefix is not None and keep and seq.cached:
            # Free after this: the slots above the running ones, and the hole when it is the last.
            target = self.prefix.place(last if hole == last else last + 1, self.runner.slots)
            if target is not None:
                if target != hole:
                    self.runner.move_slot(hole, target, seq.cached)
                self.prefix.keep(target, seq.computed, _owner(seq))
        if hole != last:
            moved = self._running[last]
            self.runner.move_slot(last, hole, moved.cached)
            moved.slot = hole
            self._running[hole] = moved
        self._running.pop()
        seq.slot = -1
        self.events.released(self.name, seq, time.time_ns())

    def _step(self, batch: list[Sequence]) -> int:
        """Runs one step over `batch`; returns the prompt tokens it fed."""
        device = self.runner.device
        decoding = [s for s in batch if not s.prefilling]
        tokens = [s.output_ids[-1] for s in decoding]
        positions = [s.cached for s in decoding]
        slots = [s.slot for s in decoding]
        chunks: list[tuple[Sequence, PrefillChunk]] = []
        budget = self.prefill_budget
        for s in batch:
            if s.prefilling and budget > 0:
                if s.detok is None:
                    self._begin(s)
                n = min(budget, len(s.prompt_ids) - s.cached)
                budget -= n
                chunks.append((s, PrefillChunk(s.slot, s.cached, n)))
                tokens.extend(s.prompt_ids[s.cached:s.cached + n])
                positions.extend(range(s.cached, s.cached + n))
                slots.extend([s.slot] * n)
        rows, sampled = list(range(len(decoding))), list(decoding)
        offset = len(decoding)
        for s, chunk in chunks:
            offset += chunk.length
            if chunk.start + chunk.length == len(s.prompt_ids):
                rows.append(offset - 1)
                sampled.append(s)
        def index(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        lora = None
        if any(s.adapter is not None for s in batch):
            adapters = tuple(sorted({s.adapter for s in batch if s.adapter is not None}, key=lambda a: a.uid))
            which = {a: i for i, a in enumerate(adapters)}
            adapter_rows = [which.get(s.adapter, -1) for s in decoding]
            for s, chunk in chunks:
                adapter_rows.extend([which.get(s.adapter, -1)] * chunk.length)
            lora = LoraBatch(adapters, adapter_rows)

        constrained = [s for s in sampled if s.constraint is not None]
        if constrained:
            if self._masks is None:
                self._masks = ThreadPoolExecutor(1, thread_name_prefix=f"masks-{self.name}")
            for s in constrained:
                s.constraint.prepare(self._masks)
        started = time.perf_counter()
        # Every slot in use takes part (a paused sequence's slot too: it is just not fed).
        arguments = (index(tokens), index(positions), index(slots), len(decoding), len(self._running),
                     [c for _, c in chunks], index(rows))
        logits = self.runner.forward(*arguments) if lora is None else self.runner.forward(*arguments, lora=lora)
        self._window[2] += time.perf_counter() - started
        for s in decoding:
            s.cached += 1
        for s, chunk in chunks:
            s.cached += chunk.length
        finished, failed = [], []
        for row, s in enumerate(sampled):
            try:
                if self._emit(s, logits[row]):
                    finished.append(s)
            except Exception as exc:  # noqa: BLE001 - one sequence's sampling or format fails it alone
                failed.append((s, exc))
        if finished or failed:
            with self._wake:
                for s in finished:
                    if s.slot >= 0:
                        self._release(s)
                for s, exc in failed:
                    self._fail(s, exc)
        return self.prefill_budget - budget

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        """Ends one sequence with `exc` (typed errors as they are, anything else INTERNAL) and frees
        its slot; the others in its step go on. Holds the lock."""
        if isinstance(exc, LlmosError):
            log.info("sequence %s of %s ended: %s (%s)", seq.request_id, self.name, exc.code, exc.reason)
            error = exc
        else:
            log.error("sequence %s of %s failed", seq.request_id, self.name, exc_info=exc)
            error = Internal("generation failed", reason="SEQUENCE_FAILED")
        seq.deliver(error)
        if seq.slot >= 0:
            self._release(seq, keep=False)

    def _begin(self, seq: Sequence) -> None:
        device = self.runner.device
        seq.generator = make_generator(seq.params, device)
        seq.detok = Detokenizer(self.tokenizer, seq.prompt_ids)
        seq.stops = StopStrings(seq.params.stop)
        if seq.params.repetition_penalty != 1.0:
            # Every token the sequence will hold, filled as they come: no allocation per token.
            seq.seen = torch.empty(len(seq.prompt_ids) + seq.max_new, dtype=torch.long, device=device)
            seq.seen[:len(seq.prompt_ids)] = torch.tensor(seq.prompt_ids, dtype=torch.long)

    def _emit(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """Samples the sequence's next token and delivers it; returns True when it finished."""
        if seq.cancelled:
            return True
        now = time.time_ns()
        if not seq.output_ids:
            seq.first_token_ns = now
        held = len(seq.prompt_ids) + len(seq.output_ids)
        seen = None if seq.seen is None else seq.seen[:held]
        if seq.constraint is not None:
            logits = seq.constraint.mask(logits)
        token, logprob = sample(logits, seq.params, seq.generator, seen)
        seq.output_ids.append(token)
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
