"""Attention over the slot KV cache, shared by the engine's two forward paths.

The cache holds `slots` sequences of up to `max_len` tokens, per layer: K transposed
([slot, kv_head, head_dim, position]) and V as is ([slot, kv_head, position, head_dim]), so
the decode batch's K^T and V are strided matrices the matmuls read in place. Sequences occupy
slots 0..n-1 (the engine moves the last into a hole), so the decoding batch is a leading block
of the cache and needs no gather.

One step feeds a flat batch: the newest token of each decoding sequence, then a chunk of each
prefilling prompt. A `Step` holds what every layer of that step shares (where each token's key
and value go, the masks); `attend` then runs all decoding sequences together against the cache
(padded to the longest, masked) and each prefill chunk causally against its own slot.

Batch-invariant: attention reads every sequence's keys to a length rounded up to `KEY_BLOCK`
positions (the ones beyond its own masked), so the reductions over keys (softmax, probabilities
times values) run whole vector blocks padded with exact zeros and sum in the same order whatever
the longest sequence of the batch is; prompt-chunk products get at least `MIN_ROWS` rows.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

KEY_BLOCK = 16
MIN_ROWS = 4


def key_length(positions: int) -> int:
    """Keys an attention reads for `positions` held: whole blocks of `KEY_BLOCK`."""
    return -(-positions // KEY_BLOCK) * KEY_BLOCK


def rows_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` over batches of matrices, `a` given at least `MIN_ROWS` rows (zeros appended; the
    extra rows of the product are to be dropped): float32 products of one to three rows take
    another kernel than four or more, so a prompt chunk of one token would reduce otherwise
    than the same position in a longer chunk."""
    if a.shape[-2] < MIN_ROWS:
        a = torch.cat([a, a.new_zeros(*a.shape[:-2], MIN_ROWS - a.shape[-2], a.shape[-1])], dim=-2)
    return torch.matmul(a, b)


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On the CPU it lives in anonymous memory, which the kernel hands out
    zero-filled page by page on first touch: no memset of the whole cache at load, and a
    cache that is never filled costs only its address space."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    size = count * torch.empty((), dtype=dtype).element_size()
    if size == 0:
        return torch.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(memory, dtype=dtype, count=count).view(shape)


@dataclass(frozen=True)
class PrefillChunk:
    """`length` prompt tokens of the sequence in `slot`, starting at position `start`."""

    slot: int
    start: int
    length: int


@dataclass(frozen=True)
class LayerShape:
    """One attention layer's cached heads: `kv_heads` keys of `key_dim` and values of `value_dim`."""

    kv_heads: int
    key_dim: int
    value_dim: int


class SlotCache:
    """The KV cache of every attention layer: `slots` sequences of up to `max_len` positions."""

    def __init__(self, layers: list[LayerShape], slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.layers, self.slots, self.max_len = layers, slots, max_len
        self.length = key_length(max_len)
        self.keys = [zeroed((slots, s.kv_heads, s.key_dim, self.length), dtype, device) for s in layers]
        self.values = [zeroed((slots, s.kv_heads, self.length, s.value_dim), dtype, device) for s in layers]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return self.keys + self.values

    def move(self, source: int, target: int, length: int) -> None:
        """Copies the first `length` cached positions of `source` into `target`."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :, :length] = keys[source, :, :, :length]
            values[target, :, :length] = values[source, :, :length]

    def write(self, step: Step, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores the step's keys [T, kv_heads, key_dim] and values [T, kv_heads, value_dim]."""
        k_index, v_index = step.write_indices(self.layers[layer], self.length)
        self.keys[layer].view(-1).index_copy_(0, k_index, k.reshape(-1))
        self.values[layer].view(-1).index_copy_(0, v_index, v.reshape(-1))


class Step:
    """What every attention layer of one step shares.

    Each token of the flat batch has its position and its cache slot. The batch starts with the
    newest token of each of `decode_count` decoding sequences, in ascending slot order; the
    prefill chunks follow, in `prefills` order. Slots 0..active-1 are in use.
    """

    def __init__(self, positions: torch.Tensor, slots: torch.Tensor, decode_count: int, active: int,
                 prefills: list[PrefillChunk]) -> None:
        self.positions, self.slots = positions, slots
        self.device = positions.device
        self.decode_count, self.active, self.prefills = decode_count, active, prefills
        self.decode_slots = slots[:decode_count]
        self.dense = decode_count == active
        self.longest = 0
        if decode_count:
            # Every active slot takes part in the decode attention; rows of slots that are
            # still prefilling see one position only and their output is dropped.
            self.seen = torch.ones(active, dtype=torch.long, device=self.device)
            self.seen[self.decode_slots] = positions[:decode_count] + 1   # positions held after this step
            self.longest = key_length(int(self.seen.max()))
        self._biases: dict[int | None, tuple[torch.Tensor | None, list[torch.Tensor]]] = {}
        self._indices: dict[tuple[LayerShape, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def write_indices(self, shape: LayerShape, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices into one layer's K and V caches for each (token, head, dim) written."""
        key = (shape, length)
        if key not in self._indices:
            hk, m = shape.kv_heads, length
            heads = self.slots[:, None] * hk + torch.arange(hk, device=self.device)[None, :]      # [T, hk]
            dk = torch.arange(shape.key_dim, device=self.device)
            dv = torch.arange(shape.value_dim, device=self.device)
            k_index = ((heads[:, :, None] * shape.key_dim + dk) * m + self.positions[:, None, None]).reshape(-1)
            v_index = ((heads * m + self.positions[:, None])[:, :, None] * shape.value_dim + dv).reshape(-1)
            self._indices[key] = k_index, v_index
        return self._indices[key]

    def biases(self, window: int | None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The decode batch's mask [active, 1, 1, longest] and each chunk's [c, key_length(end)]:
        0 where a query may see a key, -inf where it may not (later, or `window` or more
        positions back)."""
        if window not in self._biases:
            decode = None
            if self.decode_count:
                keys = torch.arange(self.longest, device=self.device)[None, :]
                hidden = keys >= self.seen[:, None]
                if window:
                    hidden |= keys < self.seen[:, None] - window
                decode = torch.zeros(self.active, 1, 1, self.longest, device=self.device).masked_fill_(
                    hidden.view(self.active, 1, 1, self.longest), float("-inf"))
            self._biases[window] = decode, [self._causal_bias(c, window) for c in self.prefills]
        return self._biases[window]

    def _causal_bias(self, chunk: PrefillChunk, window: int | None) -> torch.Tensor:
        end = chunk.start + chunk.length
        keys = torch.arange(key_length(end), device=self.device)[None, :]
        queries = torch.arange(chunk.start, end, device=self.device)[:, None]
        hidden = keys > queries
        if window:
            hidden |= keys <= queries - window
        return torch.zeros(chunk.length, keys.shape[1], device=self.device).masked_fill_(hidden, float("-inf"))


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if not softcap else torch.tanh(scores / softcap) * softcap


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scaling: float,
                      softcap: float | None) -> torch.Tensor:
    """One query per row: plain batched matmuls beat the flash kernel at this shape.

    q: [n, hq, 1, d]; k: [n, hk, d, L] (transposed); v: [n, hk, L, dv]; bias: [n, 1, 1, L] (0 or -inf). The query
    heads sharing a KV head are grouped, so K and V are never repeated.
    """
    n, hq, _, d = q.shape
    hk = k.shape[1]
    qg = q.view(n, hk, hq // hk, d)
    scores = _capped(torch.matmul(qg, k).float() * scaling, softcap) + bias
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(n, hq, 1, v.shape[-1])


def _chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scaling: float,
                     softcap: float | None) -> torch.Tensor:
    """Causal attention of one prompt chunk against its slot: q [hq, c, d]; k [hk, d, L]
    (transposed); v [hk, L, dv]."""
    hq, c, d = q.shape
    hk = k.shape[0]
    rows = (hq // hk) * c
    qg = q.reshape(hk, rows, d)                        # query heads grouped by their KV head
    scores = _capped(rows_matmul(qg, k)[:, :rows].float().reshape(hk, hq // hk, c, -1) * scaling, softcap)
    probs = torch.softmax(scores + bias, dim=-1).to(v.dtype).view(hk, rows, -1)
    return rows_matmul(probs, v)[:, :rows].reshape(hq, c, v.shape[-1])


def attend(step: Step, cache: SlotCache, layer: int, q: torch.Tensor, scaling: float,
           softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    """Attention of the step's queries q [T, hq, d] against `layer`'s cache (the step's keys and
    values written already); returns [T, hq, value_dim]."""
    total, hq, d = q.shape
    keys, values = cache.keys[layer], cache.values[layer]
    decode_bias, chunk_biases = step.biases(window)
    out = q.new_empty(total, hq, values.shape[-1])
    n, active, longest = step.decode_count, step.active, step.longest
    if n:
        if step.dense:
            qd = q[:n].unsqueeze(2)
        else:
            qd = q.new_zeros(active, hq, 1, d)
            qd[step.decode_slots, :, 0] = q[:n]
        od = _decode_attention(qd, keys[:active, :, :, :longest], values[:active, :, :longest], decode_bias,
                               scaling, softcap)
        out[:n] = od.squeeze(2) if step.dense else od[step.decode_slots, :, 0]
    offset = n
    for chunk, bias in zip(step.prefills, chunk_biases, strict=True):
        end = key_length(chunk.start + chunk.length)
        qp = q[offset:offset + chunk.length].transpose(0, 1)          # [hq, c, d]
        op = _chunk_attention(qp, keys[chunk.slot, :, :, :end], values[chunk.slot, :, :end], bias, scaling, softcap)
        out[offset:offset + chunk.length] = op.transpose(0, 1)
        offset += chunk.length
    return out
