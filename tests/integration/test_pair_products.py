"""The engine's own bf16 product kernel on a CPU with avx512_bf16 and no AMX (`pair_products.cpp`): oneDNN's
prepacked bits, a row's result its own, and the weights that keep oneDNN's kernel."""

from __future__ import annotations

import pytest
import torch

from llmos.common.devices import cpu_kind
from llmos.engine import matmul, native
from llmos.engine.attention import can_compile

CPU = torch.device("cpu")
PAIRS_HERE = pytest.mark.skipif(
    cpu_kind() != "avx512_bf16" or not matmul.packs_bf16() or not can_compile(),
    reason="the pair kernel is taken on a CPU with avx512_bf16 and no AMX (with AMX oneDNN multiplies in tiles), "
           "built with a C++ compiler")


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


@PAIRS_HERE
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
