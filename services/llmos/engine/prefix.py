"""The prefix cache: what finished sequences left in the KV cache, kept for the next prompt
that starts the same way (the chat template's header, a shared system prompt, the earlier
turns of a conversation).

When a sequence leaves, its cache slot's contents (every position it had computed: prompt and
output) are kept in a free slot, and the slot is marked with those tokens. A sequence that
joins takes the slot after the running ones; if a kept slot's tokens begin its prompt, those
positions are copied into its slot (nothing to copy when it is that slot) and only the rest of
the prompt is computed. This is llama.cpp's slot cache: a whole prefix is copied, not shared in
blocks, which suits a slot cache whose running sequences form a leading block. A running
sequence's slot serves the same way (the positions it has computed never change), so requests in
flight that share a system prompt compute it once. A kept slot is
only ever a free one, so it never costs a running sequence room: joins overwrite kept slots
from the lowest up, and a leaving sequence is kept in the highest free slot that keeps nothing
(else in the one used least recently).

Keys and values differ under a LoRA adapter, so each kept slot records whose they are (its
`owner`: the adapter's id, None for the base model), and a prompt reuses only its own owner's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share (slice comparisons, so in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n            # a[:low] == b[:low]; a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low


class PrefixCache:
    """Which free slots hold which tokens' keys and values; least recently used first."""

    def __init__(self) -> None:
        self._kept: OrderedDict[int, tuple[Hashable, list[int]]] = OrderedDict()

    @property
    def tokens(self) -> int:
        """Positions kept over all slots."""
        return sum(len(tokens) for _, tokens in self._kept.values())

    def match(self, prompt: list[int], slot: int, running: Iterable[tuple[int, list[int]]] = (),
              owner: Hashable = None) -> tuple[int, int]:
        """The slot sharing the longest prefix with `prompt`, among the ones kept for `owner` and
        `running` (a running sequence's slot and the tokens it has computed, under the same
        owner), and how many positions of it to reuse: at most all but the prompt's last token,
        whose logits the step must compute. On a tie, `slot` itself (nothing to copy), else the
        most recently kept, else a kept one over a running one. (slot, 0): none."""
        best, length = slot, 0
        kept = [(source, tokens) for source, (whose, tokens) in reversed(self._kept.items()) if whose == owner]
        for source, tokens in [*kept, *running]:
            shared = min(common_prefix(tokens, prompt), len(prompt) - 1)
            if shared > length or (shared == length and shared and source == slot):
                best, length = source, shared
        if length and best in self._kept:
            self._kept.move_to_end(best)
        return best, length

    def drop(self, slot: int) -> None:
        """`slot` is a running sequence's now."""
        self._kept.pop(slot, None)

    def place(self, low: int, high: int) -> int | None:
        """Where to keep a leaving sequence among the free slots `low`..`high - 1`: the highest
        that keeps nothing, else the least recently used kept one; None when there are none."""
        for slot in range(high - 1, low - 1, -1):
            if slot not in self._kept:
                return slot
        for slot in self._kept:
            if low <= slot < high:
                return slot
        return None

    def keep(self, slot: int, tokens: list[int], owner: Hashable = None) -> None:
        """`slot`, free now, holds the keys and values of `tokens` computed under `owner`."""
        self._kept.pop(slot, None)
        self._kept[slot] = owner, tokens

    def clear(self) -> None:
        self._kept.clear()
