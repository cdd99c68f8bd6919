"""The engine's own bf16 product kernel (`pair_products.cpp`): on a CPU with avx512_bf16 and no AMX, oneDNN's
prepacked bits; on one with AMX, AMX's tiles; on both a row's result its own, and the weights that keep oneDNN's
kernel."""

from __future__ import annotations

import pytest
import torch

from llmos.common.devices import cpu_kind
from llmos.engine import matmul, native
from llmos.engine.attention import can_compile

CPU = torch.device("cpu")
PAIRS_HERE = pytest.mark.skipif(
    cpu_kind() != "avx512_bf16" or not matmul.packs_bf16() or not can_compile(),
    reason="oneDNN's bits are the pair kernel's on a CPU with avx512_bf16 and no AMX (with AMX it takes AMX's tiles), "
           "built with a C++ compiler")
TILES_HERE = pytest.mark.skipif(
    cpu_kind() != "amx" or not can_compile(),
    reason="the pair kernel takes AMX's tiles on a CPU with AMX, built with a C++ compiler")
EITHER_HERE = pytest.mark.skipif(
    cpu_kind() not in ("amx", "avx512_bf16") or not can_compile(),
    reason="the pair kernel runs on a CPU with avx512_bf16, built with a C++ compiler")


def onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's prepacked product, as the engine ran it before (one row padded to two)."""
    packed = matmul.PackedWeight.of(weight, None, matmul.PACKED_BF16_MIN_ROWS)
    return matmul.linear(x, packed)


@PAIRS_HERE
@pytest.mark.parametrize(("n", "k"), [(960, 576), (3072, 576), (576, 1536), (48, 40), (256, 2304), (64, 3072)],
                         ids=["qkv", "gate-up", "down", "small", "three-blocks", "k-3072"])
def test_pair_products_are_onednns_bit_for_bit_whatever_the_rows(n, k):
    """K of one block of the sum (40), two (576: 512 + 64; 1536: 1024 + 512) and three (2304, 3072);
    values of many magnitudes, so a sum in another order would differ in some last bits (it did, in
    hundreds of outputs, before the kernel summed K in oneDNN's blocks)."""
    generator = torch.Generator().manual_seed(n + k)
    weight = (torch.randn(n, k, generator=generator) * 0.05).bfloat16()
    paired = matmul.PairedWeight.of(weight)
    x = (torch.randn(300, k, generator=generator) * torch.rand(300, 1, generator=generator) * 4).bfloat16()
    everything = matmul.linear(x, paired)
    assert torch.equal(everything, onednn(x, weight))
    for rows in (1, 2, 5, 13, 16, 37, 64):
        part = matmul.linear(x[:rows], paired)
        assert torch.equal(part, onednn(x[:rows], weight)), rows
        assert torch.equal(part, everything[:rows]), rows      # a row's result does not depend on the rows
    assert torch.allclose(everything.float(), x.float() @ weight.float().t(), atol=0.05, rtol=0.02)


@PAIRS_HERE
def test_pair_products_take_rows_apart_and_batches_of_rows():
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(64, 96, generator=generator) * 0.1).bfloat16()
    paired = matmul.PairedWeight.of(weight)
    wide = torch.randn(7, 200, generator=generator).bfloat16()
    apart = wide[:, 8:104]                  # rows 200 values apart
    assert torch.equal(matmul.linear(apart, paired), onednn(apart.contiguous(), weight))
    batched = apart.contiguous().view(7, 1, 96).expand(7, 3, 96).contiguous()
    out = matmul.linear(batched, paired)
    assert out.shape == (7, 3, 64) and torch.equal(out[:, 1], onednn(apart.contiguous(), weight))
    assert matmul.linear(torch.empty(0, 96).bfloat16(), paired).shape == (0, 64)
    across = torch.randn(96, 5, generator=generator).bfloat16().t()    # a row's values apart: copied first
    assert torch.equal(matmul.linear(across, paired), onednn(across.contiguous(), weight))


@PAIRS_HERE
def test_the_engine_takes_pairs_for_bias_free_bf16_matrices_only():
    weight = torch.randn(64, 96).bfloat16()
    assert isinstance(matmul.prepare(weight, "", CPU, torch.bfloat16), matmul.PairedWeight)
    # A product with a bias adds it in oneDNN's kernel: that matrix stays there.
    assert isinstance(matmul.prepare(weight, "", CPU, torch.bfloat16, biased=True), matmul.PackedWeight)
    # Columns not a multiple of 16: oneDNN.
    assert isinstance(matmul.prepare(torch.randn(40, 96).bfloat16(), "", CPU, torch.bfloat16), matmul.PackedWeight)
    assert isinstance(matmul.prepare(weight.float(), "", CPU, torch.float32), matmul.PackedWeight)


@PAIRS_HERE
def test_a_shape_whose_products_differ_from_onednns_stays_with_onednn(monkeypatch, caplog):
    """The check at load: were the kernel's sums ever to differ from oneDNN's (another oneDNN, another
    CPU), the engine would keep oneDNN's kernel for that shape and say so."""
    real = native.pair_product

    def off_by_one_bit(x, pairs):
        out = real(x, pairs)
        out.view(torch.int16)[..., 0] ^= 1
        return out

    monkeypatch.setattr(native, "pair_product", off_by_one_bit)
    matmul.pairs_match_onednn.cache_clear()
    try:
        weight = torch.randn(32, 64).bfloat16()
        assert isinstance(matmul.prepare(weight, "", CPU, torch.bfloat16), matmul.PackedWeight)
        assert "differs from oneDNN's for a [32, 64] matrix" in caplog.text
    finally:
        matmul.pairs_match_onednn.cache_clear()


@EITHER_HERE
def test_bad_operands_are_refused():
    pairs = matmul.PairedWeight.of(torch.randn(32, 64).bfloat16()).pairs
    with pytest.raises(ValueError, match="bf16"):
        native.pair_product(torch.randn(3, 64), pairs)              # float32
    with pytest.raises(ValueError, match="contiguous rows"):
        native.pair_product(torch.randn(64, 3).bfloat16().t(), pairs)
    with pytest.raises(ValueError):
        native.pair_product(torch.randn(3, 62).bfloat16(), pairs)   # another K
    with pytest.raises(ValueError, match="no bias"):                 # never dropped silently
        matmul.linear(torch.randn(3, 64).bfloat16(), matmul.PairedWeight(pairs), torch.ones(32).bfloat16())


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@TILES_HERE
@pytest.mark.parametrize(("n", "k"), [(960, 576), (3072, 576), (576, 1536), (48, 64), (16, 32), (64, 3072)],
                         ids=["qkv", "gate-up", "down", "odd-groups", "one-tile", "k-3072"])
def test_amx_pair_products_are_the_products_and_a_rows_own_whatever_the_rows(n, k):
    """AMX's tiles: each output within bf16's rounding of the exact product (float64), and every row's bits
    the same alone, in any number of rows (tails of 1 to 31 rows past the tiles of 16 and 32), and where it
    sits among them. Outlier channels, as activations have, so another order of the sums would show."""
    assert native.pair_product_kind(k) == "amx"
    generator = torch.Generator().manual_seed(n + k)
    weight = (torch.randn(n, k, generator=generator) * 0.05).bfloat16()
    paired = matmul.PairedWeight.of(weight)
    x = torch.randn(300, k, generator=generator) * torch.rand(300, 1, generator=generator) * 4
    x[:, torch.randint(0, k, (4,), generator=generator)] *= 30
    x = x.bfloat16()
    everything = matmul.linear(x, paired)
    exact = x.double() @ weight.double().t()
    assert ((everything.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-3).all()
    for rows in (1, 2, 5, 15, 16, 17, 31, 32, 33, 47, 64, 65, 100):
        assert torch.equal(bits(matmul.linear(x[:rows], paired)), bits(everything[:rows])), rows
    for row in (0, 17, 150, 299):
        assert torch.equal(bits(matmul.linear(x[row:row + 1], paired)), bits(everything[row:row + 1])), row
    apart = torch.randn(7, k + 64, generator=generator).bfloat16()[:, 32:32 + k]       # rows k + 64 values apart
    assert torch.equal(bits(matmul.linear(apart, paired)), bits(matmul.linear(apart.contiguous(), paired)))


@TILES_HERE
def test_with_amx_the_engine_takes_tiles_for_bias_free_bf16_matrices_whose_k_is_a_multiple_of_32():
    weight = torch.randn(64, 96).bfloat16()
    assert matmul.pairs_take_tiles(64, 96)
    assert isinstance(matmul.prepare(weight, "", CPU, torch.bfloat16), matmul.PairedWeight)
    # A bias, K not a multiple of 32, or N not of 16: oneDNN's prepacked kernel, in tiles of 16 rows.
    for shape, biased in (((64, 96), True), ((64, 40), False), ((40, 96), False)):
        kept = matmul.prepare(torch.randn(*shape).bfloat16(), "", CPU, torch.bfloat16, biased=biased)
        assert isinstance(kept, matmul.PackedWeight) and kept.tile == matmul.ROW_TILE, shape
    assert native.pair_product_kind(40) == "avx512_bf16"
