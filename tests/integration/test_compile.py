"""Building at load: the engine's decode kernel against the uncompiled path, and where a worker keeps
what it built."""

from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from llmos.engine import attention, native
from llmos.engine.attention import BLOCK, LayerShape, PagedCache, Part, Step, attend, can_compile

CPU = torch.device("cpu")
COMPILES = pytest.mark.skipif(not can_compile(), reason="the decode kernel needs a C++ compiler (g++)")


@COMPILES
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
@pytest.mark.parametrize(("softcap", "window"), [(None, None), (30.0, 20)], ids=["plain", "softcap-window"])
@pytest.mark.parametrize(("query_heads", "dim"), [(6, 16), (6, 64), (40, 32)], ids=["any", "fixed", "many"])
def test_the_decode_kernel_attends_as_the_uncompiled_path(softcap, window, dtype, query_heads, dim):
    """Grouped query heads (6 over 2: head sizes the kernel has code for at run time (16) and at
    compile time (64); 40 over 2: more than it fixes), sequences of 1 to 100 positions (tables of 1
    to 8 blocks), alone and together; the kernel computes in float32 from the pool, the uncompiled
    path from a float32 or bf16 copy, so they agree closely, not bit for bit; a sequence's result is
    the same alone and in the batch, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    shape = LayerShape(2, dim, dim)
    compiled = PagedCache([shape], 64, dtype, CPU, compile=True)
    compiled.warm(query_heads)
    plain = PagedCache([shape], 64, dtype, CPU)
    for pool in compiled.keys + compiled.values:
        pool[:, 1:] = torch.randn(pool[:, 1:].shape, generator=generator).to(dtype)
    plain.keys, plain.values = compiled.keys, compiled.values
    lengths = [1, 17, 40, 100, 3]
    tables, first = [], 1
    for length in lengths:
        tables.append(list(range(first, first + -(-length // BLOCK))))
        first += len(tables[-1])
    steps = [[Part(tables[i], lengths[i] - 1, 1, True)] for i in range(len(lengths))]
    steps.append([Part(tables[i], lengths[i] - 1, 1, True) for i in range(len(lengths))])
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    alone = []
    for parts in steps:
        step = Step(parts, CPU)
        q = torch.randn(len(parts), query_heads, dim, generator=generator).to(dtype)
        if len(parts) > 1:
            q = torch.cat([q for q, _ in alone])
        with torch.inference_mode():
            got = attend(step, compiled, 0, q, 0.25, softcap, window)
            assert "groups" not in vars(step), "a step the kernel served built the uncompiled path's groups"
            expected = attend(step, plain, 0, q, 0.25, softcap, window)
        assert compiled.kernel is not None, "the kernel failed and the path fell back"
        assert got.dtype == dtype and got.shape == expected.shape
        assert torch.allclose(got.float(), expected.float(), atol=tolerance, rtol=tolerance), (got - expected).abs()
        if len(parts) == 1:
            alone.append((q, got))
        else:
            assert torch.equal(got, torch.cat([out for _, out in alone]))


@COMPILES
def test_a_worker_keeps_what_it_compiled_in_its_data_directory(tiny_model_dir, tmp_path):
    """In a fresh interpreter, as a worker starts: its data directory holds the built kernel once a
    bf16 model has loaded, and nothing goes where the environment pointed before."""
    script = f"""
import torch
from llmos.engine.loader import load_model
from llmos.worker.__main__ import WorkerSettings, keep_compiled
print(keep_compiled(WorkerSettings(data_dir={str(tmp_path)!r})))
loaded = load_model("m", {str(tiny_model_dir)!r}, torch.device("cpu"), torch.bfloat16, 4096, 256, compile=True)
print(loaded.compiled)
"""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "elsewhere")}   # torch's, or a test run's
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.split() == [str(tmp_path / "inductor"), "True"]
    kept = [p for p in (tmp_path / "inductor").rglob("*") if p.is_file()]
    assert kept, "nothing compiled was kept"
    # (torch makes the directory the environment names as it is imported; nothing is compiled there)
    assert not [p for p in (tmp_path / "elsewhere").rglob("*") if p.is_file()]


@COMPILES
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
@pytest.mark.parametrize(("softcap", "window"), [(None, None), (30.0, 20)], ids=["plain", "softcap-window"])
def test_prompt_chunks_attend_through_the_kernel_as_uncompiled_and_however_they_are_cut(softcap, window, dtype):
    """A prompt of 70 positions (after 5 cached ones) beside a decoding sequence: each row sees its
    own position and those before it, as the uncompiled path's causal chunk attention does (closely:
    another order of sums), in steps with and without a decoding row. The prompt goes through the
    kernel in float32, and in bf16 without a soft cap (its values weighed as flash attention weighs
    them, as the uncompiled path's flash attention does), and a row's result is the same bit for bit
    whether the prompt went in one chunk or in three of 7, 33 and 30, with or without the decoding
    sequence beside it; in bf16 with a soft cap the prompt goes through the batched products, the
    decoding row through the kernel."""
    generator = torch.Generator().manual_seed(1)
    shape = LayerShape(2, 64, 64)
    compiled = PagedCache([shape], 32, dtype, CPU, compile=True)
    compiled.warm(6)
    plain = PagedCache([shape], 32, dtype, CPU)
    plain.flash_prompts = False                 # the reference: the batched products
    for pool in compiled.keys + compiled.values:
        pool[:, 1:] = torch.randn(pool[:, 1:].shape, generator=generator).to(dtype)
    plain.keys, plain.values = compiled.keys, compiled.values
    prompt, other = list(range(1, 6)), list(range(6, 10))      # 75 positions: 5 blocks; 60: 4
    q = torch.randn(70, 6, 64, generator=generator).to(dtype)
    q_other = torch.randn(1, 6, 64, generator=generator).to(dtype)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5

    def run(cache, cuts, beside):
        outs, start = [], 5
        for length in cuts:
            parts = ([Part(other, 59, 1, True)] if beside else []) + [Part(prompt, start, length)]
            rows = torch.cat([q_other, q[start - 5:start - 5 + length]]) if beside else q[start - 5:start - 5 + length]
            with torch.inference_mode():
                out = attend(Step(parts, CPU), cache, 0, rows, 0.125, softcap, window)
            outs.append(out[1:] if beside else out)
            start += length
        return torch.cat(outs)

    flash = torch.nn.functional.scaled_dot_product_attention
    with mock.patch.object(attention.F, "scaled_dot_product_attention", wraps=flash) as flashed:
        whole = run(compiled, [70], beside=False)
    assert not flashed.called
    assert compiled.kernel is not None, "the kernel failed and the path fell back"
    assert compiled.prompts_through_kernel == (dtype == torch.float32)
    expected = run(plain, [70], beside=False)
    assert torch.allclose(whole.float(), expected.float(), atol=tolerance, rtol=tolerance), (whole - expected).abs()
    if dtype == torch.bfloat16 and not softcap:     # and as flash attention, uncompiled
        plain.flash_prompts = True
        with mock.patch.object(attention.F, "scaled_dot_product_attention", wraps=flash) as flashed:
            flashed_out = run(plain, [70], beside=False)
        assert flashed.called
        assert torch.allclose(whole.float(), flashed_out.float(), atol=tolerance, rtol=tolerance)
    cut = run(compiled, [7, 33, 30], beside=True)
    if dtype == torch.float32 or not softcap:
        assert torch.equal(cut, whole)
    else:
        assert torch.allclose(cut.float(), expected.float(), atol=tolerance, rtol=tolerance), (cut - expected).abs()


@COMPILES
def test_rows_weighed_as_flash_attention_are_nearer_flash_attention():
    """The kernel's rows from `rounded_from` on round each weight to bf16 before weighing the values,
    as flash attention does in bf16: nearer its output than the same rows weighed in float32."""
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(2, 8, BLOCK, 64, generator=generator).bfloat16()
    values = torch.randn(2, 8, BLOCK, 64, generator=generator).bfloat16()
    q = (torch.randn(40, 6, 64, generator=generator) * 3).bfloat16()
    tables = torch.arange(8).view(1, 8)
    which, seen = torch.zeros(40, dtype=torch.long), torch.arange(89, 129)    # causal rows of one prompt
    rounded = native.paged_attention(q, keys, values, tables, which, seen, 0.125, None, None, rounded_from=0)
    plain = native.paged_attention(q, keys, values, tables, which, seen, 0.125, None, None)
    allowed = torch.arange(128)[None] < seen[:, None]
    flashed = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.view(1, 2, 128, 64), values.view(1, 2, 128, 64), attn_mask=allowed,
        scale=0.125, enable_gqa=True)[0].transpose(0, 1)
    assert not torch.equal(rounded, plain)
    assert (rounded.float() - flashed.float()).abs().mean() < (plain.float() - flashed.float()).abs().mean()
    # The rows before `rounded_from` as without it.
    assert torch.equal(native.paged_attention(q, keys, values, tables, which, seen, 0.125, None, None,
                                              rounded_from=25)[:25], plain[:25])


@COMPILES
def test_loading_the_kernel_leaves_the_process_arithmetic_as_it_was(tmp_path):
    """The kernel is compiled with -ffast-math, which on a link line makes g++ add a start-up routine
    that switches the whole process to flushing denormal numbers to zero. Loaded in a fresh
    interpreter (with a fresh build), torch's arithmetic keeps its denormals."""
    script = """
import torch
tiny = torch.tensor([1e-40], dtype=torch.float32)
from llmos.engine import native
native.library()
print((tiny * 1).item() > 0)
"""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True"]
    assert list((tmp_path / "llmos-kernels").glob("*.so")), "nothing was built"


@COMPILES
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
def test_the_fused_kernels_compute_what_the_operators_they_replace_do_row_by_row(dtype):
    """The residual add with the RMS norm, the rotary embedding (its keys and values stored in the cache)
    and SiLU(gate) * up against the torch operators of the unfused forward: the rotary embedding, the
    stored keys and values and the residual add bit for bit (the same roundings), the norm and SiLU
    within a bf16 step (their sums and exponentials in another order); and each row the same whatever
    rows are beside it (one row alone, 5 rows, 300 rows: the last past the size from which rows are
    shared among threads)."""
    from llmos.engine import native

    generator = torch.Generator().manual_seed(3)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    hidden, d, inner, eps = 576, 64, 1536, 1e-5
    weight, cos, sin = randn(hidden), randn(4096, d), randn(4096, d)
    for rows in (1, 5, 300):
        x, add = randn(rows, hidden, scale=3.0), randn(rows, hidden)
        summed = x + add
        x32 = summed.float()
        expected = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        normed = native.add_rms_norm(x, add, weight, eps)
        assert torch.equal(x, summed)                               # added in place, rounded as torch rounds
        assert torch.allclose(normed.float(), expected.float(), rtol=tolerance, atol=tolerance)
        assert torch.equal(native.add_rms_norm(x[:1].clone(), None, weight, eps), normed[:1])

        # 9 query heads, 3 key heads and 3 value heads a row (with room after them, as a fused product's
        # rows may have); the keys and values go to scattered slots of a pool of 40 blocks.
        hq, hk = 9, 3
        qkv = randn(rows, (hq + 2 * hk) * d + 8)[:, :(hq + 2 * hk) * d]
        positions = torch.randint(0, 4096, (rows,), generator=generator)
        pool = 40
        slots = torch.randperm(pool * BLOCK, generator=generator)[:rows]
        qk = qkv[:, :(hq + hk) * d].view(rows, hq + hk, d)
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        expected = qk * c + torch.cat((-qk[..., d // 2:], qk[..., :d // 2]), dim=-1) * s
        keys, values = randn(hk, pool, BLOCK, d), randn(hk, pool, BLOCK, d)
        expected_keys, expected_values = keys.clone(), values.clone()
        expected_keys.view(hk, -1, d).index_copy_(1, slots, expected[:, hq:].transpose(0, 1))
        expected_values.view(hk, -1, d).index_copy_(1, slots, qkv[:, (hq + hk) * d:].view(rows, hk, d).transpose(0, 1))
        rotated = native.rotary_store(qkv, hq, hk, d, cos, sin, positions, slots, keys, values)
        assert torch.equal(rotated, expected[:, :hq])
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
        alone = native.rotary_store(qkv[:1], hq, hk, d, cos, sin, positions[:1], slots[:1], keys, values)
        assert torch.equal(alone, rotated[:1]) and torch.equal(keys, expected_keys)

        gate_up = randn(rows, 2 * inner, scale=4.0)
        expected = torch.nn.functional.silu(gate_up[:, :inner]) * gate_up[:, inner:]
        product = native.silu_mul(gate_up)
        assert torch.allclose(product.float(), expected.float(), rtol=tolerance, atol=tolerance)
        assert torch.equal(native.silu_mul(gate_up[:1].contiguous()), product[:1])
    with pytest.raises(ValueError, match="contiguous"):
        native.silu_mul(randn(4, 2 * inner)[:, :inner])
