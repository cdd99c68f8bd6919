"""Structured output on the worker: a request's format compiled against its model's tokenizer by
llguidance, and the mask of the tokens that keep the output matchable, applied before each
sample.

`Grammars` belongs to one loaded model: its llguidance tokenizer (made at the first constrained
request) and compiled matchers by format (LRU, bounded in bytes: each counted as the memory the
process grew by while it was built, at least its grammar's size), each request getting its own
copy, so a schema sent again is not compiled again. Every matcher runs under
`formats.parser_limits()`; a format that passes them fails its own request only, with
INVALID_ARGUMENT `RESPONSE_FORMAT_TOO_COMPLEX` (the engine ends that one sequence).

A `Constraint` follows one sequence: `mask` the logits, `advance` with the sampled token, and
`complete` once the structure is whole (the engine then ends the sequence with STOP). Compiling
runs off the worker's event loop and off the engine's thread; each step's masks are computed on
a thread of their own while the step's forward runs (the next token's mask depends only on the
tokens so far), for the sequences that have a format only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np
import torch

from llmos.common.domain import FormatKind, ResponseFormat
from llmos.common.errors import InvalidArgument
from llmos.common.formats import FormatError, compiled, hit_a_limit, parser_limits

# Bytes of compiled formats kept per model (and at most this many formats).
CACHED_FORMAT_BYTES = 256 * 1024 * 1024
CACHED_FORMATS = 64


def format_failed(message: str, field: str = "sampling.response_format") -> InvalidArgument:
    """The error of a format the compiler or a matcher gave up on."""
    if hit_a_limit(message):
        return InvalidArgument.field(field, f"is too complex to match within llmos's limits: {message[:300]}",
                                     reason="RESPONSE_FORMAT_TOO_COMPLEX")
    return InvalidArgument.field(field, message[:300], reason="RESPONSE_FORMAT_FAILED")


def _probe(template: Any) -> str:
    """The first steps of a fresh copy: the first mask, the tokens the format forces, the mask
    after them. A format whose lexer blows a limit there (a regex of one byte after another a
    million times) is refused before its request starts. Returns the error, or "". """
    probe = template.deep_copy()
    probe.compute_bitmask()
    forced = [] if probe.is_error() else probe.compute_ff_tokens()
    if forced and probe.consume_tokens(forced):
        probe.compute_bitmask()
    return probe.get_error() if probe.is_error() else ""


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class Constraint:
    """One sequence's matcher; `given_up` is called when a limit stopped it (its format is then
    not kept for later requests)."""

    def __init__(self, matcher: Any, given_up: Any = None) -> None:
        self._matcher = matcher
        self._next: Future | None = None
        self._given_up = given_up

    def _failed(self, message: str) -> InvalidArgument:
        error = format_failed(message)
        if error.reason == "RESPONSE_FORMAT_TOO_COMPLEX" and self._given_up is not None:
            self._given_up()
        return error

    def _allowed(self) -> np.ndarray:
        """One bool per token of the tokenizer: may it come next."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)   # (llguidance drops the GIL)
        if self._matcher.is_error():
            raise self._failed(self._matcher.get_error())
        return np.unpackbits(bits, bitorder="little").astype(bool)

    def prepare(self, pool: Executor) -> None:
        """Starts computing the next token's mask on `pool` (while the step's forward runs)."""
        self._next = pool.submit(self._allowed)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (one row) with every token the format does not allow next at -inf."""
        allowed = self._next.result() if self._next is not None else self._allowed()
        self._next = None
        allowed = allowed[:logits.shape[-1]]
        if allowed.shape[0] < logits.shape[-1]:          # rows past the tokenizer's vocabulary
            allowed = np.pad(allowed, (0, logits.shape[-1] - allowed.shape[0]))
        return logits.masked_fill(~torch.from_numpy(allowed).to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise self._failed(self._matcher.get_error() or f"the format refused token {token}")

    @property
    def complete(self) -> bool:
        """The structure is whole: nothing but its end may follow."""
        return self._matcher.is_stopped()


class Grammars:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self._hf = tokenizer
        self._vocab = vocab_size
        self._eos = sorted(eos_ids)
        self._tokenizer: Any = None
        self._matchers: OrderedDict[ResponseFormat, tuple[Any, int]] = OrderedDict()   # and its bytes
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """What the kept formats are counted as."""
        return sum(size for _, size in self._matchers.values())

    def _llg_tokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab,
                                                           eos_token=self._eos or None)
        return self._tokenizer

    def constraint(self, fmt: ResponseFormat) -> Constraint:
        """A fresh matcher of `fmt` for one sequence; INVALID_ARGUMENT when it does not compile
        against this model's tokenizer. Blocking (run it off the event loop)."""
        from llguidance import LLMatcher

        field = "tools" if fmt.kind is FormatKind.TOOLS else f"sampling.response_format.{fmt.kind.value}"
        with self._lock:
            kept = self._matchers.get(fmt)
            if kept is not None:
                self._matchers.move_to_end(fmt)
                template = kept[0]
            else:
                try:
                    grammar = compiled(fmt)
                except FormatError as exc:
                    raise format_failed(str(exc), field) from None
                tokenizer = self._llg_tokenizer()
                before = _rss()
                template = LLMatcher(tokenizer, grammar, log_level=0, limits=parser_limits())
                error = template.get_error() if template.is_error() else _probe(template)
                if error:                       # (copies share the template's lexer: it is spoilt)
                    raise format_failed(error, field)
                self._matchers[fmt] = template, max(len(grammar), _rss() - before)
                while len(self._matchers) > CACHED_FORMATS or (len(self._matchers) > 1
                                                               and self.nbytes > CACHED_FORMAT_BYTES):
                    self._matchers.popitem(last=False)
            return Constraint(template.deep_copy(), lambda: self.forget(fmt))

    def forget(self, fmt: ResponseFormat) -> None:
        """Drops a kept format (one a matcher gave up on: its next request compiles it again)."""
        with self._lock:
            self._matchers.pop(fmt, None)
