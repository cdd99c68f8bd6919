"""The weights' matrix products: as stored, prepacked for oneDNN (float32 on the CPU, bfloat16 on a
CPU with native bf16), in pairs for the engine's own kernel (bfloat16 on a CPU with avx512_bf16, on AMX's
tiles where it has them), in tiles of rows (oneDNN's bfloat16 with AMX, where the pairs do not fit), or int8.

In float32 on the CPU a matrix reordered once at load into oneDNN's blocked layout and multiplied
by its prepacked kernel is 14% faster at batch 1, 23% at 16 and 20% in prefill than `F.linear`
on SmolLM2 (its LM head alone twice as fast), and keeps a row's reduction order whatever the
number of rows (the plain kernels switch to a matrix-vector product at one row).

In bfloat16 on a CPU with native bf16 the matrices are prepacked too: on SmolLM2's layers (30 of
them, weights read from memory as in a step) 2.2x faster than `F.linear` at 1 to 4 rows, 1.4x to
1.8x at 16 to 64, and faster than float32's prepacked products (1.7x at 1 row). oneDNN picks its
kernel, and with it the order of each row's reduction, by the number of rows on some CPUs: with
AMX every product oneDNN multiplies runs in tiles of exactly `ROW_TILE` rows (the last padded with zeros), so every
call has one shape and a row's output depends on that row alone; an AMX tile holds 16 rows, so a
decode step of one sequence costs about what it did. With avx512_bf16 and no AMX the prepacked
kernel keeps every row's order whatever the rows but for a single row (measured: each row of 2 to
512 rows equal to itself in any other count, on SmolLM2's shapes and on its own activations; one row
takes another kernel, whose results differ on those activations though not on random ones), so
products get at least `PACKED_BF16_MIN_ROWS` (two) rows and run whole: a row padded to two gave the
same bits as in 64 rows for every one of 7,681 rows of SmolLM2's activations, and two rows cost
0.6 ms less a token than four over the model's products. Where oneDNN has no bf16 kernels the tiles
multiply the weights as stored (tests force that path on any CPU).

On such a CPU (avx512_bf16, no AMX) the engine multiplies most bf16 matrices with its own kernel
instead (`PairedWeight`, `pair_products.cpp`): the same bits as oneDNN's prepacked kernel (checked
for each shape at load against oneDNN itself; a shape that differed would stay with oneDNN), a row's
result its own whatever the rows, and 1.4x to 1.6x quicker at a decode step's 1 to 32 rows, where
oneDNN reads the weights from memory and then multiplies them instead of both at once.

With AMX the same kernel multiplies the same paired layout with AMX's tiles (where K is a multiple of
32): a row's result is its own sequence of tile products, so one call takes every row of a step where
oneDNN needed a call for each 16 rows (its whole calls change a row's bits between 32 and 33 rows). On
SmolLM2's products (Xeon with AMX, 2 cores): at most one 16-row oneDNN tile's time at 1 to 16 rows,
2.2x to 3.2x quicker than the tiles at 64 rows; and the layers run in one native call, as above.

An int8 matrix keeps one float scale per output row (weight-only, symmetric) and is multiplied by
torch's `_weight_int8pack_mm`, which reads the int8 weights directly. Its fast kernels take
bfloat16 activations, so float32 activations are cast to bfloat16 for those products (and back).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmos.common.devices import cpu_has_bf16, cpu_kind

from . import native

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Weight:
    """A [out, in] matrix as int8 rows and one bfloat16 scale per row."""

    values: torch.Tensor
    scales: torch.Tensor

    @staticmethod
    def of(weight: torch.Tensor) -> Int8Weight:
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        values = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8).contiguous()
        return Int8Weight(values, scales.to(torch.bfloat16))

    def numel(self) -> int:
        return self.values.numel() + self.scales.numel()


@dataclass(frozen=True)
class PackedWeight:
    """A [out, in] float32 or bfloat16 matrix reordered once into oneDNN's blocked layout for its
    matmul (the layout inductor's CPU weight prepacking uses), multiplied `tile` rows at a time
    where set, else whole with at least `least` rows."""

    packed: torch.Tensor
    tile: int | None = None
    least: int = 1

    @staticmethod
    def of(weight: torch.Tensor, tile: int | None = None, least: int = 1) -> PackedWeight:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), tile or 16)
        return PackedWeight(packed, tile, least)

    def numel(self) -> int:
        return self.packed.numel()


@dataclass(frozen=True)
class PairedWeight:
    """A bf16 [out, in] matrix in pairs of columns, [out / 16, in / 2, 16, 2], for the engine's own
    product kernel on a CPU with avx512_bf16 (`native.pair_product`)."""

    pairs: torch.Tensor

    @staticmethod
    def of(weight: torch.Tensor) -> PairedWeight:
        n, k = weight.shape
        return PairedWeight(weight.detach().reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous())

    def numel(self) -> int:
        return self.pairs.numel()


@functools.cache
def pairs_take_tiles(n: int, k: int) -> bool:
    """Whether the pair kernel multiplies an [n, k] bf16 matrix with AMX's tiles on this CPU (built with a C++
    compiler, allowed the tiles, n a multiple of 16 and k of 32)."""
    if n % 16 or k % 32:
        return False
    try:
        return native.pair_product_kind(k) == "amx"
    except (ValueError, RuntimeError, OSError):     # not built at all
        return False


@functools.cache
def pairs_match_onednn(n: int, k: int) -> bool:
    """Whether the pair kernel gives oneDNN's prepacked bits for an [n, k] bf16 matrix on this CPU (random
    values of many magnitudes; one row against oneDNN's two, as the prepacked products pad one row)."""
    if n % 16 or k % 2:
        return False
    generator = torch.Generator().manual_seed(n * 7919 + k)
    weight = (torch.randn(n, k, generator=generator) * 0.05).bfloat16()
    packed, pairs = PackedWeight.of(weight), PairedWeight.of(weight)
    for rows in (2, 7, 16, 64, min(max(262144 // n, 64), 512)):
        x = (torch.randn(rows, k, generator=generator) * torch.rand(rows, 1, generator=generator) * 4).bfloat16()
        expected = torch.ops.mkldnn._linear_pointwise(x, packed.packed, None, "none", [], "")
        try:
            if not torch.equal(native.pair_product(x, pairs.pairs), expected) or not torch.equal(
                    native.pair_product(x[:1], pairs.pairs), expected[:1]):
                log.warning("the pair product differs from oneDNN's for a [%d, %d] matrix: oneDNN multiplies it", n, k)
                return False
        except (ValueError, RuntimeError, OSError):     # not built for this CPU, or not at all
            return False
    return True


ROW_TILE = 16
# The fewest rows a product (or attention's prompt-chunk product) is given: one to three rows take
# other kernels than four or more.
MIN_ROWS = 4
# The fewest rows of a prepacked bf16 product on a CPU with avx512_bf16 and no AMX (see above).
PACKED_BF16_MIN_ROWS = 2


@dataclass(frozen=True)
class TiledWeight:
    """A [out, in] matrix multiplied `tile` rows at a time, or whole with at least `MIN_ROWS` rows
    (`tile` None)."""

    weight: torch.Tensor
    tile: int | None = ROW_TILE

    def numel(self) -> int:
        return self.weight.numel()


def tiles_rows(device: torch.device, dtype: torch.dtype) -> bool:
    """bfloat16 on a CPU whose bf16 products go through oneDNN's native kernels."""
    return device.type == "cpu" and dtype == torch.bfloat16 and cpu_has_bf16()


def _tiled(x: torch.Tensor, weight: torch.Tensor, tile: int | None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    padded = -(-m // tile) * tile if tile else max(m, MIN_ROWS)
    if padded != m:
        rows = torch.cat([rows, rows.new_zeros(padded - m, rows.shape[1])])
    if tile is None:
        out = torch.mm(rows, weight.t())
    else:
        out = rows.new_empty(padded, weight.shape[0])
        transposed = weight.t()
        for start in range(0, padded, tile):
            torch.mm(rows[start:start + tile], transposed, out=out[start:start + tile])
    return out[:m].view(*x.shape[:-1], weight.shape[0])


def packs_bf16() -> bool:
    """oneDNN has bf16 kernels on this CPU."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def packs_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Float32 on the CPU multiplies by oneDNN's prepacked weights."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


Weight = torch.Tensor | Int8Weight | PackedWeight | PairedWeight | TiledWeight


def _packed(rows: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    tile, m = weight.tile, rows.shape[0]
    if tile is None and m >= weight.least:
        return torch.ops.mkldnn._linear_pointwise(rows, weight.packed, bias, "none", [], "")
    padded = max(-(-m // tile) * tile, tile) if tile else weight.least      # (no rows: one tile of zeros)
    if padded != m:
        rows = torch.cat([rows, rows.new_zeros(padded - m, rows.shape[1])])
    step = tile or padded
    if step == padded:                  # one call: no tiles to put together
        return torch.ops.mkldnn._linear_pointwise(rows, weight.packed, bias, "none", [], "")[:m]
    tiles = [torch.ops.mkldnn._linear_pointwise(rows[start:start + step], weight.packed, bias, "none", [], "")
             for start in range(0, padded, step)]
    return torch.cat(tiles)[:m]


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(weight, PairedWeight):
        if bias is not None:
            raise ValueError("a paired weight takes no bias: `prepare` keeps a biased product with oneDNN")
        rows = x.reshape(-1, x.shape[-1])
        out = native.pair_product(rows if rows.stride(-1) == 1 else rows.contiguous(), weight.pairs)
        return out.view(*x.shape[:-1], out.shape[-1])
    if isinstance(weight, PackedWeight):
        out = _packed(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], out.shape[-1])
    if isinstance(weight, TiledWeight):
        out = _tiled(x, weight.weight, weight.tile)
        return out if bias is None else out + bias
    if isinstance(weight, Int8Weight):
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch._weight_int8pack_mm(rows, weight.values, weight.scales).to(x.dtype)
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def prepare(weight: torch.Tensor, quantize: str, device: torch.device, dtype: torch.dtype,
            biased: bool = False) -> Weight:
    """`weight` as the engine multiplies it: int8 when asked, else prepacked where that pays (`biased`:
    the product adds a bias)."""
    if quantize == "int8":
        return Int8Weight.of(weight)
    if packs_weights(device, dtype):
        return PackedWeight.of(weight)
    if tiles_rows(device, dtype):
        tile = ROW_TILE if cpu_kind() == "amx" else None
        if packs_bf16() and cpu_kind() == "avx512_bf16" and not biased and pairs_match_onednn(*weight.shape):
            return PairedWeight.of(weight)
        if cpu_kind() == "amx" and not biased and pairs_take_tiles(*weight.shape):
            return PairedWeight.of(weight)
        if packs_bf16():
            return PackedWeight.of(weight, tile, PACKED_BF16_MIN_ROWS if cpu_kind() == "avx512_bf16" else MIN_ROWS)
        return TiledWeight(weight.detach().contiguous(), tile)
    return weight


def tensors_of(weight: Weight | None) -> tuple[torch.Tensor, ...]:
    """The tensors holding `weight`'s memory."""
    if isinstance(weight, Int8Weight):
        return weight.values, weight.scales
    if isinstance(weight, PackedWeight):
        return (weight.packed,)
    if isinstance(weight, PairedWeight):
        return (weight.pairs,)
    if isinstance(weight, TiledWeight):
        return (weight.weight,)
    return () if weight is None else (weight,)


def unique_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of `tensors`, each counted once however often it appears."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
