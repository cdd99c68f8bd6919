"""Attention over the paged KV cache, shared by the engine's two forward paths.

The cache of each attention layer is one pool of blocks of `BLOCK` positions: keys
[kv_head, block, position, key_dim] and values [kv_head, block, position, value_dim]. A sequence
holds a list of blocks (its block table, `blocks.py`); position p of it lives at offset p % BLOCK of
its (p // BLOCK)-th block. Block 0 stays zero and pads tables to one length.

One step feeds a flat batch: the newest token of each decoding sequence, then a chunk of each
prefilling prompt (`Part`s, in that order). A `Step` holds what every layer of that step shares
(where each token's key and value go, the block tables, the masks); `attend` then runs the decoding
sequences in groups of like length (each group's tables padded with block 0 to a power of two of
blocks, so one long sequence does not make every short one gather its length), each against the
blocks its table names, and each prefill chunk causally against its own blocks.

Batch-invariant: attention reads every sequence's keys in whole blocks (the positions beyond its
own masked), so the reductions over keys (softmax, probabilities times values) run whole vector
blocks padded with exact zeros and sum in the same order whatever the longest sequence of the batch
is; prompt-chunk products get at least `MIN_ROWS` rows. Where the weights' bf16 products run in
tiles of rows (a CPU with native bf16, `matmul.py`), attention computes in float32, whose kernels
keep their order whatever the batch.

With a kernel (`PagedCache(compile=True)`, on the CPU): the decoding rows of the step, and its
prompt chunks' rows in float32 (`PagedCache.prompts_through_kernel`) and in bf16 without a soft cap,
attend through the engine's own C++ kernel (`native.py`, `paged_attention.cpp`), one call a layer,
which reads each key and value through the block table where it lies (no gathered copy, no float32
copy, no score matrix in memory) and computes each row alone in float32, in one order whatever else
is in the batch and however the prompt was cut into chunks (tested alone against busy, as for the
uncompiled path, and against the uncompiled path). bf16 prompt rows weigh the values as flash
attention does in bf16 (each weight rounded to bf16 before the division by their sum): weighed in
float32 they flipped SmolLM2's first token on 3 of 4 chat prompts whose two best tokens are within
0.1 of each other (it stopped answering "Paris"); weighed as flash does, its answers to 12 chat
questions matched float32's as often as flash attention's did (10 and 9 of 12; transformers' own
bf16 generate: 8). A prompt chunk's attention costs ~20 µs a layer through flash attention whatever
its length, a few through the kernel: a step of 16 chunks of 12 tokens 74 → 58 ms.

Without the kernel, in half precision on the CPU, prompt chunks without a soft cap attend through
torch's flash attention (`scaled_dot_product_attention`) over their gathered blocks
(`PagedCache.flash_prompts`).
"""

from __future__ import annotations

import functools
import logging
import math
import mmap
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import native
from .matmul import MIN_ROWS, tiles_rows

log = logging.getLogger(__name__)

BLOCK = 16


def blocks_for(positions: int) -> int:
    """Blocks that hold `positions` positions."""
    return -(-positions // BLOCK)


def key_length(positions: int) -> int:
    """Keys an attention reads for `positions` held: whole blocks of `BLOCK`."""
    return blocks_for(positions) * BLOCK


def pool_blocks(kv_tokens: int, max_len: int) -> int:
    """Blocks of a pool for `kv_tokens` positions: at least one sequence of `max_len`, and block 0."""
    return max(blocks_for(kv_tokens), blocks_for(max_len)) + 1


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
class Part:
    """One sequence's share of a step: `length` tokens from position `start`, over its block table
    `blocks` (which covers them); a decoding sequence feeds one token."""

    blocks: list[int]
    start: int
    length: int
    decode: bool = False


@dataclass(frozen=True)
class LayerShape:
    """One attention layer's cached heads: `kv_heads` keys of `key_dim` and values of `value_dim`."""

    kv_heads: int
    key_dim: int
    value_dim: int


class PagedCache:
    """The KV cache of every attention layer: `blocks` blocks of `BLOCK` positions. With `compile`,
    decoding sequences attend through the engine's kernel where it builds (`compiles_attention`)."""

    def __init__(self, layers: list[LayerShape], blocks: int, dtype: torch.dtype, device: torch.device,
                 compile: bool = False, spare: bool = False) -> None:
        self.layers, self.blocks = layers, blocks
        # With `spare`, one block more than `blocks`, `scratch`, which no sequence is given: where the
        # padding rows of a CUDA graph's step write their keys and values (`graphs.py`).
        self.scratch = blocks if spare else None
        size = blocks + 1 if spare else blocks
        self.keys = [zeroed((s.kv_heads, size, BLOCK, s.key_dim), dtype, device) for s in layers]
        self.values = [zeroed((s.kv_heads, size, BLOCK, s.value_dim), dtype, device) for s in layers]
        self.kernel = attention_kernel(device, dtype) if compile else None
        # Prompt chunks through the kernel as it weighs decoding rows: in float32, and on a GPU (in bf16
        # on the CPU with its weights rounded as flash attention rounds them: `attend`, and the module's notes).
        self.prompts_through_kernel = dtype == torch.float32 or (
            self.kernel is not None and self.kernel is not native.paged_attention)
        # Elsewhere in half precision on the CPU, prompt chunks without a soft cap go through torch's flash
        # attention over their gathered blocks (no float32 copy, no score matrix in memory): a 1,008-token
        # prompt of SmolLM2 in bf16 took 613 ms against 773 ms with the batched float32 products, with the
        # same answers (`benchmarks/prefill.py`, BENCHMARKS.md). Neither path gives a row the same bits
        # however its prompt is cut (the kernel does).
        self.flash_prompts = device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)

    def rounds_prompts(self, softcap: float | None = None) -> bool:
        """Whether half-precision prompt chunks go through the kernel, their values weighed as flash
        attention weighs them (without a soft cap; with one, through the batched products)."""
        return self.flash_prompts and not softcap and self.kernel is native.paged_attention

    def warm(self, query_heads: int | None = None) -> None:
        """Builds (or finds built) the attention kernel now, a load's time and not the first request's,
        and runs it once a layer over block 0, which stays zero, with `query_heads` (each layer's KV
        heads when not given). Where it does not build, or has no code for these heads, decoding
        runs as written (logged)."""
        if self.kernel is None:
            return
        try:
            with torch.inference_mode():
                for keys, values in zip(self.keys, self.values, strict=True):
                    self.kernel(keys.new_zeros(2, query_heads or keys.shape[0], keys.shape[-1]), keys, values,
                                torch.zeros(1, 1, dtype=torch.long, device=keys.device),
                                torch.zeros(2, dtype=torch.long, device=keys.device),
                                torch.ones(2, dtype=torch.long, device=keys.device), 1.0, None, None)
        except Exception as exc:  # noqa: BLE001 - a compiler missing or failing costs speed, not the model
            log.warning("attention has no kernel here (%s); it runs uncompiled", first_line(exc))
            self.kernel = None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return self.keys + self.values

    def write(self, step: Step, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores the step's keys [T, kv_heads, key_dim] and values [T, kv_heads, value_dim]."""
        keys, values = self.keys[layer], self.values[layer]
        keys.view(keys.shape[0], -1, keys.shape[-1]).index_copy_(1, step.slots, k.transpose(0, 1))
        values.view(values.shape[0], -1, values.shape[-1]).index_copy_(1, step.slots, v.transpose(0, 1))

    def clear(self, blocks: list[int]) -> None:
        """Zeroes `blocks` (a check's scratch space)."""
        for t in self.tensors:
            t[:, blocks] = 0


@dataclass(frozen=True)
class DecodeGroup:
    """Decoding sequences whose keys fit `length` positions: their rows in the flat batch, their
    block tables (flat, `length // BLOCK` each) and the positions each holds after the step."""

    rows: torch.Tensor
    tables: torch.Tensor
    seen: torch.Tensor
    length: int


@dataclass(frozen=True)
class PrefillChunk:
    """A chunk of `length` prompt tokens from position `start`, over the blocks `blocks` holding
    positions 0 to start + length."""

    blocks: torch.Tensor
    start: int
    length: int


class Step:
    """What every attention layer of one step shares, built from its `Part`s: decoding ones first."""

    def __init__(self, parts: list[Part], device: torch.device) -> None:
        with torch.inference_mode():        # read by forwards in inference mode only
            self._build(parts, device)

    def _build(self, parts: list[Part], device: torch.device) -> None:
        self.device = device
        self._given = parts            # the rows' order (decoding parts first, as the engine feeds them)
        self._decoding = [p for p in parts if p.decode]
        self.decode_count = len(self._decoding)
        self.prefills = [PrefillChunk(torch.tensor(p.blocks[:blocks_for(p.start + p.length)], dtype=torch.long,
                                                   device=device), p.start, p.length)
                         for p in parts if not p.decode]
        self._decode_biases: dict[int | None, list[torch.Tensor]] = {}
        self._chunk_biases: dict[int | None, list[torch.Tensor]] = {}
        self._chunk_masks: dict[int | None, list[torch.Tensor]] = {}
        # Decoding parts first, then the chunks: the order of the flat batch's rows.
        self._parts = self._decoding + [p for p in parts if not p.decode]
        self._rows: tuple[torch.Tensor, ...] | None = None

    @property
    def decoding(self) -> list[Part]:
        """The decoding sequences' parts, in the order of their rows (the first of the step)."""
        return self._decoding

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """Each row's position [rows] (built when first asked: a step a CUDA graph runs needs none)."""
        with torch.inference_mode():
            return torch.tensor([p for part in self._given for p in range(part.start, part.start + part.length)],
                                dtype=torch.long, device=self.device)

    @functools.cached_property
    def slots(self) -> torch.Tensor:
        """Where each row's key and value go in the pool [rows]: block * BLOCK + offset."""
        with torch.inference_mode():
            return torch.tensor([part.blocks[p // BLOCK] * BLOCK + p % BLOCK for part in self._given
                                 for p in range(part.start, part.start + part.length)],
                                dtype=torch.long, device=self.device)

    @functools.cached_property
    def groups(self) -> list[DecodeGroup]:
        """The decoding sequences in groups of like length, for the uncompiled path (built when first
        asked: a step the kernel serves needs none). Each sequence's keys are read in whole blocks, as
        many as the next power of two of its blocks."""
        decoding = self._decoding
        widths: dict[int, list[int]] = {}
        for row, part in enumerate(decoding):
            widths.setdefault(1 << (blocks_for(part.start + 1) - 1).bit_length(), []).append(row)
        groups = []
        with torch.inference_mode():
            for width, rows in sorted(widths.items()):
                tables: list[int] = []
                for row in rows:
                    held = blocks_for(decoding[row].start + 1)
                    tables += decoding[row].blocks[:held] + [0] * (width - held)
                groups.append(DecodeGroup(torch.tensor(rows, dtype=torch.long, device=self.device),
                                          torch.tensor(tables, dtype=torch.long, device=self.device),
                                          torch.tensor([decoding[r].start + 1 for r in rows], dtype=torch.long,
                                                       device=self.device), width * BLOCK))
        return groups

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the kernel reads for every row of the step (built once a step): the block table of
        each part [parts, widest] (padded with block 0), each row's part [rows] and the positions
        each row sees the end of (its own position + 1) [rows]."""
        if self._rows is None:
            held = [blocks_for(p.start + p.length) for p in self._parts]
            width = max(held, default=1)
            tables = [p.blocks[:h] + [0] * (width - h) for p, h in zip(self._parts, held, strict=True)]
            which: list[int] = []
            seen: list[int] = []
            for i, p in enumerate(self._parts):
                which += [i] * p.length
                seen += range(p.start + 1, p.start + p.length + 1)
            self._rows = tuple(torch.tensor(v, dtype=torch.long, device=self.device) for v in (tables, which, seen))
        return self._rows

    def decode_biases(self, window: int | None) -> list[torch.Tensor]:
        """Each decode group's mask [1, m, 1, length]: 0 where a query may see a key, -inf where it
        may not (later, or `window` or more positions back)."""
        if window not in self._decode_biases:
            masks = []
            for group in self.groups:
                m = group.rows.shape[0]
                keys = torch.arange(group.length, device=self.device)[None, :]
                hidden = keys >= group.seen[:, None]
                if window:
                    hidden |= keys < group.seen[:, None] - window
                masks.append(torch.zeros(1, m, 1, group.length, device=self.device).masked_fill_(
                    hidden.view(1, m, 1, group.length), float("-inf")))
            self._decode_biases[window] = masks
        return self._decode_biases[window]

    def chunk_biases(self, window: int | None) -> list[torch.Tensor]:
        """Each prompt chunk's mask [c, its blocks' positions], as `decode_biases`."""
        if window not in self._chunk_biases:
            self._chunk_biases[window] = [self._causal_bias(c, window) for c in self.prefills]
        return self._chunk_biases[window]

    def chunk_masks(self, window: int | None) -> list[torch.Tensor]:
        """Each prompt chunk's mask [c, its blocks' positions] for flash attention: True where a query
        may see a key."""
        if window not in self._chunk_masks:
            self._chunk_masks[window] = [~self._hidden(c, window) for c in self.prefills]
        return self._chunk_masks[window]

    def _hidden(self, chunk: PrefillChunk, window: int | None) -> torch.Tensor:
        """[c, its blocks' positions]: True where a query of the chunk may not see a key (a later one,
        or `window` or more positions back)."""
        end = chunk.start + chunk.length
        keys = torch.arange(key_length(end), device=self.device)[None, :]
        queries = torch.arange(chunk.start, end, device=self.device)[:, None]
        hidden = keys > queries
        if window:
            hidden |= keys <= queries - window
        return hidden

    def _causal_bias(self, chunk: PrefillChunk, window: int | None) -> torch.Tensor:
        hidden = self._hidden(chunk, window)
        return torch.zeros(hidden.shape, device=self.device).masked_fill_(hidden, float("-inf"))


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if not softcap else torch.tanh(scores / softcap) * softcap


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scaling: float,
                      softcap: float | None) -> torch.Tensor:
    """One query per row: plain batched matmuls beat the flash kernel at this shape.

    q: [n, hq, d]; k: [hk, n, L, d]; v: [hk, n, L, dv]; bias: [1, n, 1, L] (0 or -inf). The query heads
    sharing a KV head are grouped, so K and V are never repeated.
    """
    n, hq, d = q.shape
    hk = k.shape[0]
    qg = q.view(n, hk, hq // hk, d).transpose(0, 1)
    scores = _capped(torch.matmul(qg, k.transpose(-1, -2)).float() * scaling, softcap) + bias
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).transpose(0, 1).reshape(n, hq, v.shape[-1])


def first_line(exc: Exception) -> str:
    """"Type: first line of the message" (a compiler's errors run to pages)."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def compiles_attention(device: torch.device, dtype: torch.dtype) -> bool:
    """Where the engine's attention kernel runs: on the CPU, in bf16 or float32, with a C++ compiler to
    build it (`can_compile`); against gathering the blocks for batched products, SmolLM2's layer,
    bf16 on avx512_bf16: 7x at one sequence, 4x at 16, 3x at 64 (see BENCHMARKS.md). On a GPU, in
    Triton (`gpu_kernels.py`), where Triton is installed (torch's CUDA builds bring it)."""
    return attention_kernel(device, dtype) is not None


def attention_kernel(device: torch.device, dtype: torch.dtype):  # noqa: ANN201 - one of two functions
    """The attention kernel for this device and dtype (`native.paged_attention` on the CPU,
    `gpu_kernels.paged_attention` on a GPU), or None where none runs."""
    kernels = gpu_kernels(device, dtype)
    if kernels is not None:
        return kernels.paged_attention
    if device.type == "cpu":
        return native.paged_attention if dtype in (torch.bfloat16, torch.float32) and can_compile() else None
    return None


def triton_interpreted() -> bool:
    """Whether the engine's GPU kernels run on the CPU, under Triton's interpreter: asked for with
    `LLMOS_ENGINE_INTERPRET_GPU_KERNELS=1`, with `TRITON_INTERPRET=1` set before Triton was first
    imported. It is how the tests check the GPU's kernels where no GPU is, far slower than the CPU's own."""
    return os.environ.get("LLMOS_ENGINE_INTERPRET_GPU_KERNELS") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def gpu_kernels(device: torch.device, dtype: torch.dtype):  # noqa: ANN201 - a module
    """The module of the engine's Triton kernels (`gpu_kernels.py`) where they run for this device and
    dtype (a GPU, or the CPU under Triton's interpreter), else None (no Triton, or a dtype they do not take)."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32) or not (
            device.type == "cuda" or (device.type == "cpu" and triton_interpreted())):
        return None
    try:
        from . import gpu_kernels as kernels
    except ImportError as exc:
        log.warning("no Triton here (%s); the engine runs torch's operators on %s", exc, device)
        return None
    return kernels


@functools.cache
def can_compile() -> bool:
    """The kernel builds here: a C++ compiler (g++, or $CXX)."""
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def _chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scaling: float,
                     softcap: float | None) -> torch.Tensor:
    """Causal attention of one prompt chunk against its blocks: q [hq, c, d]; k [hk, d, L]
    (transposed); v [hk, L, dv]."""
    hq, c, d = q.shape
    hk = k.shape[0]
    rows = (hq // hk) * c
    qg = q.reshape(hk, rows, d)                        # query heads grouped by their KV head
    scores = _capped(rows_matmul(qg, k)[:, :rows].float().reshape(hk, hq // hk, c, -1) * scaling, softcap)
    probs = torch.softmax(scores + bias, dim=-1).to(v.dtype).view(hk, rows, -1)
    return rows_matmul(probs, v)[:, :rows].reshape(hq, c, v.shape[-1])


def attend(step: Step, cache: PagedCache, layer: int, q: torch.Tensor, scaling: float,
           softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    """Attention of the step's queries q [T, hq, d] against `layer`'s cache (the step's keys and
    values written already); returns [T, hq, value_dim]."""
    total, hq, d = q.shape
    keys, values = cache.keys[layer], cache.values[layer]
    hk, dk, dv = keys.shape[0], keys.shape[-1], values.shape[-1]
    upcast = tiles_rows(q.device, q.dtype)

    def gather(pool: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        out = pool.index_select(1, blocks)
        return out.float() if upcast else out

    n = step.decode_count
    out = q.new_empty(total, hq, dv)
    decoded = False                         # the decoding rows, by the kernel
    rounded = cache.rounds_prompts(softcap)
    if cache.kernel is not None and (n or cache.prompts_through_kernel or rounded):
        every = cache.prompts_through_kernel or not step.prefills or rounded
        tables, which, seen = step.rows()
        try:
            if every:
                return cache.kernel(q, keys, values, tables, which, seen, scaling, softcap, window,
                                    n if rounded else None)
            out[:n] = cache.kernel(q[:n], keys, values, tables, which[:n], seen[:n], scaling, softcap, window)
            decoded = True
        except Exception as exc:  # noqa: BLE001 - a kernel that fails goes on uncompiled, not its step
            log.warning("the attention kernel failed (%s); this model attends uncompiled from now on",
                        first_line(exc))
            cache.kernel = None
    queries = q.float() if upcast else q
    for group, bias in zip(step.groups, step.decode_biases(window), strict=True) if not decoded else ():
        m = group.rows.shape[0]
        k = gather(keys, group.tables).view(hk, m, group.length, dk)
        v = gather(values, group.tables).view(hk, m, group.length, dv)
        rows = queries[:n] if m == n else queries.index_select(0, group.rows)
        result = _decode_attention(rows, k, v, bias, scaling, softcap)
        if m == n:
            out[:n] = result
        else:
            out.index_copy_(0, group.rows, result.to(out.dtype))
    offset = n
    if cache.flash_prompts and not softcap:
        for chunk, allowed in zip(step.prefills, step.chunk_masks(window), strict=True):
            shape = (1, hk, chunk.blocks.shape[0] * BLOCK)
            k = keys.index_select(1, chunk.blocks).view(*shape, dk)
            v = values.index_select(1, chunk.blocks).view(*shape, dv)
            qp = q[offset:offset + chunk.length].transpose(0, 1)[None]          # [1, hq, c, d]
            out[offset:offset + chunk.length] = F.scaled_dot_product_attention(
                qp, k, v, attn_mask=allowed, scale=scaling, enable_gqa=hq != hk)[0].transpose(0, 1)
            offset += chunk.length
        return out
    for chunk, bias in zip(step.prefills, step.chunk_biases(window), strict=True):
        length = chunk.blocks.shape[0] * BLOCK
        k = gather(keys, chunk.blocks).view(hk, length, dk).transpose(1, 2)
        v = gather(values, chunk.blocks).view(hk, length, dv)
        qp = queries[offset:offset + chunk.length].transpose(0, 1)          # [hq, c, d]
        out[offset:offset + chunk.length] = _chunk_attention(qp, k, v, bias, scaling, softcap).transpose(0, 1)
        offset += chunk.length
    return out
