"""The block manager: which blocks of the paged KV cache each sequence holds, and the prefix cache.

The cache is one pool of fixed-size blocks (`attention.BLOCK` positions each) per model; a
sequence holds a list of them (its block table), one more each time it crosses a block boundary.
Block 0 is never handed out: it stays zero, and pads the block tables of a step to one length.

A full block is named by the digest of its tokens, the tokens of every block before it (the digest
chains) and whose keys and values they are (the LoRA adapter's id, or none for the base model). A
sequence that joins looks its prompt's full blocks up by digest and shares the ones found (their
reference counts go up; nothing is copied), so the prompts in flight that start the same way (a
chat template's header, a system prompt, the earlier turns of a conversation) compute that start
once. A block whose last holder leaves stays in the cache, unreferenced, until its memory is
needed: then the least recently released goes first. A sequence's blocks are released last first,
so a block outlives the blocks that continue it.

Digests are BLAKE2b over the token ids: a prompt cannot be made to collide with another tenant's.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Hashable
from hashlib import blake2b


def block_digest(previous: bytes, tokens: list[int], owner: Hashable = None) -> bytes:
    """The name of a full block of `tokens` that follows the block named `previous` (b"" for the
    first), computed under `owner` (None: the base model)."""
    h = blake2b(previous, digest_size=16)
    h.update(b"-" if owner is None else repr(owner).encode())
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    """Reference counts, the free list and the prefix cache's digests of one pool of `blocks`
    blocks of `size` positions (block 0 reserved)."""

    def __init__(self, blocks: int, size: int) -> None:
        if blocks < 2:
            raise ValueError("a KV cache needs at least 2 blocks")
        self.total, self.size = blocks - 1, size
        self._refs = [0] * blocks
        self._digest: list[bytes | None] = [None] * blocks
        self._cached: dict[bytes, int] = {}
        # Unreferenced blocks: without a digest (free), and with one (kept, least recently released first).
        self._free = list(range(blocks - 1, 0, -1))
        self._kept: OrderedDict[int, None] = OrderedDict()
        self.evicted = 0             # kept blocks taken for other keys and values, in all

    @property
    def available(self) -> int:
        """Blocks a sequence could take now: free ones and kept ones (evicted when taken)."""
        return len(self._free) + len(self._kept)

    @property
    def used(self) -> int:
        """Blocks some sequence holds."""
        return self.total - self.available

    @property
    def kept(self) -> int:
        """Unreferenced blocks the prefix cache keeps."""
        return len(self._kept)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def lookup(self, digests: list[bytes]) -> list[int]:
        """The cached blocks named by the leading `digests`, up to the first not cached."""
        found = []
        for digest in digests:
            block = self._cached.get(digest)
            if block is None:
                break
            found.append(block)
        return found

    def cost(self, shared: list[int], fresh: int) -> int:
        """Available blocks that sharing `shared` and allocating `fresh` more would use up."""
        return fresh + sum(1 for b in shared if b in self._kept)

    def share(self, blocks: list[int]) -> None:
        """One more reference to each of `blocks` (found by `lookup`)."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._kept[block]
            self._refs[block] += 1

    def allocate(self, count: int) -> list[int]:
        """`count` blocks for one holder: free ones first, then the least recently released kept
        ones (forgotten by the prefix cache). The caller checks `available` first."""
        if count > self.available:
            raise RuntimeError(f"{count} blocks asked, {self.available} available")
        out = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._kept.popitem(last=False)
                del self._cached[self._digest[block]]
                self._digest[block] = None
                self.evicted += 1
            self._refs[block] = 1
            out.append(block)
        return out

    def register(self, block: int, digest: bytes) -> None:
        """`block`, now full, holds the keys and values `digest` names. When another block holds
        them already, this one stays unnamed (it is freed, not kept, when released)."""
        if self._digest[block] is None and digest not in self._cached:
            self._digest[block] = digest
            self._cached[digest] = block

    def release(self, blocks: list[int]) -> None:
        """Drops one holder's reference to each of `blocks`, the last first."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] < 0:
                raise RuntimeError(f"block {block} released more often than taken")
            if self._refs[block] == 0:
                if self._digest[block] is None:
                    self._free.append(block)
                else:
                    self._kept[block] = None

    def clear(self) -> None:
        """Forgets every kept block (held ones keep their references)."""
        for block in list(self._kept):
            del self._cached[self._digest[block]]
            self._digest[block] = None
            self._free.append(block)
        self._kept.clear()
