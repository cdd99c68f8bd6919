"""Turns a growing list of token ids into text deltas that are always whole.

`Detokenizer` decodes incrementally over a small window (the prefix/read offset
method), so a delta never ends inside a multi-byte character and never loses the
space a SentencePiece or byte-level BPE token carries. `StopStrings` cuts the text
just before a stop string and holds back any tail that might still become one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase, TokenizersBackend

CONTEXT_TOKENS = 5


def decoder_of(tokenizer: Any) -> Callable[[list[int]], str]:
    """The tokenizer's decode of ids to text, without special tokens or clean-up of spaces. Where
    transformers' decode would only hand the ids to the tokenizer's `tokenizers` backend (a fast
    tokenizer whose class changes neither `decode` nor `_decode`), straight to that backend: the same
    text, without transformers' check of every id's type first (two decodes a token, some 70% of
    the engine's work to deliver a token)."""
    kind = type(tokenizer)
    if (isinstance(tokenizer, TokenizersBackend) and kind.decode is PreTrainedTokenizerBase.decode
            and kind._decode is TokenizersBackend._decode):
        backend = tokenizer.backend_tokenizer
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class Detokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int],
                 decode: Callable[[list[int]], str] | None = None) -> None:
        self._decode = decode or decoder_of(tokenizer)
        self._ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes (possibly empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def flush(self) -> str:
        """The text still held back (an incomplete character), once the output is final."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return after[len(before):]


class StopStrings:
    """Accumulates text and releases the part that cannot belong to a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self.text = ""
        self._released = 0

    def push(self, delta: str) -> tuple[str, bool]:
        """Adds text; returns (text safe to emit, whether a stop string was found)."""
        self.text += delta
        if not self._stops:
            out, self._released = self.text[self._released:], len(self.text)
            return out, False
        start = max(0, self._released - max(len(s) for s in self._stops))
        hits = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self._released:cut]
            self.text, self._released = self.text[:cut], cut
            return out, True
        keep = self._held_back()
        end = len(self.text) - keep
        out = self.text[self._released:end] if end > self._released else ""
        self._released = max(self._released, end)
        return out, False

    def flush(self) -> str:
        """The held-back tail, released when the generation ends for another reason."""
        out, self._released = self.text[self._released:], len(self.text)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
