"""The inference engine of one loaded model: iteration-level (continuous) batching.

One engine thread runs steps. Before each step, cancelled sequences leave and
waiting ones join while there are free cache slots; each step then advances every
decoding sequence by one token and feeds the next chunk of waiting prompts
(at most `prefill_budget` prompt tokens a step, so long prompts never stall the
running streams). A sequence leaves the batch the step it finishes, and its slot
is free for the next step. Results reach asyncio through the callback each
sequence carries, called on the engine thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmos.common.domain import Chunk, FinishReason, SamplingParams, Usage
from llmos.common.errors import Internal, LlmosError, Unavailable

from .llama import LlamaRunner, PrefillChunk
from .sampling import make_generator, sample
from .textstream import Detokenizer, StopStrings

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    # Most tokens to generate (max_tokens, or what the slot has room for).
    max_new: int
    # Called on the engine thread with each chunk, or with the error that ended it.
    deliver: Callable[[Chunk | LlmosError], None]
    output_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    slot: int = -1
    cached: int = 0          # positions of this sequence held in its cache slot
    generator: torch.Generator | None = None
    detok: Detokenizer | None = None
    stops: StopStrings | None = None
    seen: torch.Tensor | None = None

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt_ids)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_tokens_used: int
    kv_tokens_capacity: int
    tokens_generated: int


class Engine:
    def __init__(self, name: str, runner: LlamaRunner, tokenizer: Any, eos_ids: frozenset[int],
                 prefill_budget: int = 256) -> None:
        self.name = name
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.prefill_budget = prefill_budget
        self._inbox: deque[Sequence] = deque()
        self._running: list[Sequence] = []   # index == cache slot
        self._wake = threading.Condition()
        self._stopping = False
        self.tokens_generated = 0
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    def stats(self) -> EngineStats:
        with self._wake:
            running = list(self._running)
            waiting = sum(1 for s in self._inbox if not s.cancelled)
        return EngineStats(len(running), waiting, sum(s.cached for s in running),
                           self.runner.slots * self.runner.max_len, self.tokens_generated)

    def submit(self, seq: Sequence) -> None:
        with self._wake:
            if self._stopping:
                raise Unavailable(f"model {self.name} is unloading", reason="MODEL_UNLOADING")
            self._inbox.append(seq)
            self._wake.notify()

    def cancel(self, seq: Sequence) -> None:
        """Marks the sequence; it leaves before the next step and frees its slot."""
        seq.cancelled = True
        with self._wake:
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    # the engine thread ---------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._inbox and not self._running:
                    self._wake.wait()
                if self._stopping:
                    for seq in [*self._inbox, *self._running]:
                        seq.deliver(Unavailable(f"model {self.name} was unloaded", reason="MODEL_UNLOADED"))
                    self._inbox.clear()
                    self._running.clear()
                    return
                for seq in [s for s in self._running if s.cancelled]:
                    self._release(seq)
                while self._inbox and len(self._running) < self.runner.slots:
                    seq = self._inbox.popleft()
                    if not seq.cancelled:
                        seq.slot = len(self._running)
                        self._running.append(seq)
                batch = list(self._running)
            if not batch:
                continue
            try:
                self._step(batch)
            except Exception:  # noqa: BLE001 - a failed step fails its sequences, not the engine
                log.exception("engine step failed for %s", self.name)
                with self._wake:
                    for seq in batch:
                        if seq.slot >= 0:
                            seq.deliver(Internal("generation failed"))
                            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Frees the sequence's slot; the last slot's sequence moves into it. Holds the lock."""
        hole, last = seq.slot, len(self._running) - 1
        if hole != last:
            moved = self._running[last]
            self.runner.move_slot(last, hole, moved.cached)
            moved.slot = hole
            self._running[hole] = moved
        self._running.pop()
        seq.slot = -1

    def _step(self, batch: list[Sequence]) -> None:
        device = self.runner.device
        decoding = [s for s in batch if not s.prefilling]
        tokens = [s.output_ids[-1] for s in decoding]
        positions = [s.cached for s in decoding]
        slots = [s.slot for s in decoding]
        lengths = torch.zeros(len(batch), dtype=torch.long)
        for s in decoding:
            lengths[s.slot] = s.cached + 1
        chunks: list[tuple[Sequence, PrefillChunk]] = []
        budget = self.prefill_budget
        for s in batch:
            if s.prefilling and budget > 0:
                if s.cached == 0:
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

        logits = self.runner.forward(
            index(tokens), index(positions), index(slots), index([s.slot for s in decoding]),
            len(batch), lengths.to(device), [c for _, c in chunks], index(rows))
        self.steps += 1
        for s in decoding:
            s.cached += 1
        for s, chunk in chunks:
            s.cached += chunk.length
        finished = [s for row, s in enumerate(sampled) if self._emit(s, logits[row])]
        if finished:
            with self._wake:
                for s in finished:
                    if s.slot >= 0:
                        self._release(s)

    def _begin(self, seq: Sequence) -> None:
        device = self.runner.device
        seq.generator = make_generator(seq.params, device)
        seq.detok = Detokenizer(self.tokenizer, seq.prompt_ids)
        seq.stops = StopStrings(seq.params.stop)
        if seq.params.repetition_penalty != 1.0:
            seq.seen = torch.tensor(seq.prompt_ids, dtype=torch.long, device=device)

    def _emit(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """Samples the sequence's next token and delivers it; returns True when it finished."""
        if seq.cancelled:
            return True
        token, logprob = sample(logits, seq.params, seq.generator, seq.seen)
        seq.output_ids.append(token)
        if seq.seen is not None:
            seq.seen = torch.cat([seq.seen, torch.tensor([token], device=seq.seen.device)])
        self.tokens_generated += 1
        finish, text, stopped = None, "", False
        if token in self.eos_ids and not seq.params.ignore_eos:
            finish = FinishReason.STOP
        else:
            text, stopped = seq.stops.push(seq.detok.push(token))
            if stopped:
                finish = FinishReason.STOP
            elif len(seq.output_ids) >= seq.max_new:
                finish = FinishReason.LENGTH
        if finish is not None and not stopped:
            tail, stopped = seq.stops.push(seq.detok.flush())
            text += tail if stopped else tail + seq.stops.flush()
            if stopped:
                finish = FinishReason.STOP
        chunk = Chunk(text=text, token_ids=[token], logprobs=[logprob] if seq.params.logprobs else [])
        if finish is not None:
            chunk.finish_reason = finish
            chunk.usage = Usage(len(seq.prompt_ids), len(seq.output_ids))
        seq.deliver(chunk)
        return finish is not None
