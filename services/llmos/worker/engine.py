"""The inference engine of one loaded model.

One engine thread runs the model; requests join between steps and leave the step
they finish or are cancelled. Each step advances every running sequence by one
token (a newcomer's first step is its prefill). Results reach asyncio through a
callback given with each sequence, called from the engine thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmos.common.domain import Chunk, FinishReason, SamplingParams, Usage
from llmos.common.errors import Internal, LlmosError, Unavailable

from .loader import LoadedModel
from .sampling import make_generator, sample
from .textstream import Detokenizer, StopStrings

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    # Called on the engine thread with each chunk, or with the error that ended it.
    deliver: Callable[[Chunk | LlmosError], None]
    output_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    cache: Any = None
    generator: torch.Generator | None = None
    detok: Detokenizer | None = None
    stops: StopStrings | None = None
    seen: torch.Tensor | None = None


class Engine:
    def __init__(self, loaded: LoadedModel, max_running: int = 64) -> None:
        self.loaded = loaded
        self.max_running = max_running
        self._inbox: list[Sequence] = []
        self._running: list[Sequence] = []
        self._wake = threading.Condition()
        self._stopping = False
        self.tokens_generated = 0
        self._thread = threading.Thread(target=self._loop, name=f"engine-{loaded.name}", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        with self._wake:
            return len(self._running) + len(self._inbox)

    def submit(self, seq: Sequence) -> None:
        with self._wake:
            if self._stopping:
                raise Unavailable(f"model {self.loaded.name} is unloading", reason="MODEL_UNLOADING")
            self._inbox.append(seq)
            self._wake.notify()

    def cancel(self, seq: Sequence) -> None:
        """Marks the sequence; the engine drops it before its next step."""
        seq.cancelled = True
        with self._wake:
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._inbox and not self._running:
                        self._wake.wait()
                    if self._stopping:
                        for seq in self._inbox + self._running:
                            seq.deliver(Unavailable(f"model {self.loaded.name} was unloaded",
                                                    reason="MODEL_UNLOADED"))
                        self._inbox, self._running = [], []
                        return
                    room = max(0, self.max_running - len(self._running))
                    self._running.extend(self._inbox[:room])
                    del self._inbox[:room]
                    running = list(self._running)
                for seq in running:
                    if not seq.cancelled:
                        try:
                            if self._step(seq):
                                continue
                        except Exception as exc:  # noqa: BLE001 - one bad sequence must not stop the rest
                            log.exception("step failed for request %s", seq.request_id)
                            seq.deliver(exc if isinstance(exc, LlmosError) else Internal("generation failed"))
                    with self._wake:
                        self._running.remove(seq)
                    seq.cache = None

    def _step(self, seq: Sequence) -> bool:
        """Advances one sequence by one token; returns False when it has finished."""
        model = self.loaded.model
        device = self.loaded.device
        if seq.cache is None:
            seq.generator = make_generator(seq.params, device)
            seq.detok = Detokenizer(self.loaded.tokenizer, seq.prompt_ids)
            seq.stops = StopStrings(seq.params.stop)
            seq.seen = torch.tensor(seq.prompt_ids, dtype=torch.long, device=device)
            inputs = seq.seen.unsqueeze(0)
        else:
            inputs = torch.tensor([[seq.output_ids[-1]]], dtype=torch.long, device=device)
        out = model(input_ids=inputs, cache=seq.cache, use_cache=True)
        seq.cache = out.cache
        token, logprob = sample(out.logits[0, -1], seq.params, seq.generator, seq.seen)
        seq.output_ids.append(token)
        seq.seen = torch.cat([seq.seen, torch.tensor([token], device=device)])
        self.tokens_generated += 1

        finish = None
        text, stopped = "", False
        if token in self.loaded.eos_ids:
            finish = FinishReason.STOP
        else:
            text, stopped = seq.stops.push(seq.detok.push(token))
            if stopped:
                finish = FinishReason.STOP
            elif (len(seq.output_ids) >= seq.params.max_tokens
                  or len(seq.prompt_ids) + len(seq.output_ids) >= self.loaded.context_length):
                finish = FinishReason.LENGTH
        if finish is not None and not stopped:
            text += seq.stops.flush()
        chunk = Chunk(text=text, token_ids=[token],
                      logprobs=[logprob] if seq.params.logprobs else [])
        if finish is not None:
            chunk.finish_reason = finish
            chunk.usage = Usage(len(seq.prompt_ids), len(seq.output_ids))
        seq.deliver(chunk)
        return finish is None
