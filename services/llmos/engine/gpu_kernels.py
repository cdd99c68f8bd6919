"""The engine's kernels on a GPU, in Triton: attention over the paged KV cache, the residual add with
the RMS norm, the rotary embedding storing keys and values, and SiLU times the up projection.

They take the arguments of the CPU kernels in `native.py` (the lean forward calls either through the
same four names), so a decode step is nine kernels a layer instead of ~30 of torch's operators, and
a CUDA graph (`graphs.py`) replays a few hundred kernels instead of a thousand.

Attention is batch-invariant, as the CPU kernel is: each program computes one row's query heads of
one KV head alone, over its own keys in tiles of `TILE_BLOCKS` blocks, in one order whatever else is
in the step and however its prompt was cut into chunks. The element-wise kernels round to the model's
dtype where torch's operators round, and compute in float32 between; on a GPU, whose exponential,
division and fused multiply-adds are not torch's, that float32 may differ from torch's in its last bits.

Triton runs these under its interpreter on the CPU (`TRITON_INTERPRET=1`, `attention.gpu_kernels`), which
is how the tests check them where no GPU is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import BLOCK

# Blocks of keys (of BLOCK positions) each attention program reads at a time.
TILE_BLOCKS = 2


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x (float32, finite) rounded to `dtype` to the nearest, ties to even, as torch rounds. bf16 by its
    bits: what the GPU's conversion does, and what Triton's interpreter (which truncates) then does too."""
    out = x
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif dtype == tl.float16:
        out = x.to(tl.float16)
    return out


@triton.jit
def _tanh(x):
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, which_ptr, seen_ptr, out_ptr, scaling, softcap, window,
                      q_row, q_head, k_head, k_block, v_head, v_block, t_row, o_row, o_head,
                      GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                      DV: tl.constexpr, DVP: tl.constexpr, BLOCK_: tl.constexpr, TILE: tl.constexpr,
                      CAPPED: tl.constexpr, WINDOWED: tl.constexpr):
    row = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    part = tl.load(which_ptr + row).to(tl.int64)
    seen = tl.load(seen_ptr + row).to(tl.int32)
    g = tl.arange(0, GP)
    dd = tl.arange(0, DP)
    dv = tl.arange(0, DVP)
    kk = tl.arange(0, TILE * BLOCK_)
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + row.to(tl.int64) * q_row + heads[:, None] * q_head + dd[None, :],
                mask=(g[:, None] < GROUP) & (dd[None, :] < D), other=0.0).to(tl.float32)
    m = tl.full([GP], float("-inf"), tl.float32)
    total = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DVP], tl.float32)
    start = 0
    if WINDOWED:
        start = tl.maximum(seen - window, 0) // (TILE * BLOCK_)
    for tile in range(start, tl.cdiv(seen, TILE * BLOCK_)):
        position = tile * TILE * BLOCK_ + kk
        inside = position < seen
        block = tl.load(tables_ptr + part * t_row + position // BLOCK_, mask=inside, other=0).to(tl.int64)
        offset = (position % BLOCK_).to(tl.int64)
        k = tl.load(k_ptr + kvh * k_head + block[:, None] * k_block + offset[:, None] * D + dd[None, :],
                    mask=inside[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scaling
        if CAPPED:
            scores = _tanh(scores / softcap) * softcap
        visible = inside
        if WINDOWED:
            visible = visible & (position >= seen - window)
        scores = tl.where(visible[None, :], scores, float("-inf"))
        best = tl.maximum(m, tl.max(scores, axis=1))
        scale = tl.exp(m - best)
        p = tl.exp(scores - best[:, None])
        total = total * scale + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kvh * v_head + block[:, None] * v_block + offset[:, None] * DV + dv[None, :],
                    mask=inside[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)
        acc = acc * scale[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = best
    out = acc / total[:, None]
    tl.store(out_ptr + row.to(tl.int64) * o_row + heads[:, None] * o_head + dv[None, :],
             _rounded(out, out_ptr.dtype.element_ty), mask=(g[:, None] < GROUP) & (dv[None, :] < DV))


def paged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                    which: torch.Tensor, seen: torch.Tensor, scaling: float, softcap: float | None,
                    window: int | None, rounded_from: int | None = None) -> torch.Tensor:
    """`native.paged_attention` on a GPU: the query rows q [n, hq, d] over the pool `keys` [hk, pool,
    BLOCK, d] and `values` [hk, pool, BLOCK, dv]; row r reads the block table `tables[which[r]]` up to
    position `seen[r]` (exclusive); returns [n, hq, dv] in q's dtype. Every row weighs its values in
    float32 (`rounded_from` is the CPU kernel's and means nothing here)."""
    n, hq, d = q.shape
    hk, _, block, dv = values.shape
    if (q.stride(2) != 1 or not keys.is_contiguous() or not values.is_contiguous() or block != BLOCK
            or hq % hk or keys.shape[-1] != d):
        raise ValueError("paged_attention: q's heads must be contiguous, the pool contiguous in blocks of "
                         f"{BLOCK}, and the query heads a multiple of the KV heads")
    out = q.new_empty(n, hq, dv)
    if n == 0:
        return out
    group = hq // hk
    _attention_kernel[(n, hk)](
        q, keys, values, tables, which, seen, out, scaling, float(softcap or 1.0), int(window or 0),
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GP=triton.next_power_of_2(group), D=d, DP=triton.next_power_of_2(d), DV=dv,
        DVP=triton.next_power_of_2(dv), BLOCK_=BLOCK, TILE=TILE_BLOCKS, CAPPED=bool(softcap),
        WINDOWED=bool(window), num_warps=4)
    return out


@triton.jit
def _add_rms_norm_kernel(x_ptr, add_ptr, w_ptr, out_ptr, hidden, eps, x_row, add_row, out_row,
                         HP: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, HP)
    inside = i < hidden
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_row + i, mask=inside, other=0.0).to(tl.float32)
    if ADD:
        x = _rounded(x + tl.load(add_ptr + row * add_row + i, mask=inside, other=0.0).to(tl.float32), dtype)
        tl.store(x_ptr + row * x_row + i, x, mask=inside)
        x = x.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / hidden
    normed = _rounded(x / tl.sqrt(variance + eps), dtype).to(tl.float32)
    w = tl.load(w_ptr + i, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row + i, _rounded(w * normed, dtype), mask=inside)


def add_rms_norm(x: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`native.add_rms_norm` on a GPU: x [rows, hidden] += add (in place, when given); returns
    weight * x / rms(x), the norm in float32, rounded as torch's operators round."""
    rows, hidden = x.shape
    if weight.shape != (hidden,) or (add is not None and add.shape != x.shape) or x.stride(1) != 1 or (
            add is not None and add.stride(1) != 1):
        raise ValueError("add_rms_norm: shapes do not match")
    out = torch.empty_like(x)
    if rows:
        _add_rms_norm_kernel[(rows,)](x, x if add is None else add, weight, out, hidden, eps, x.stride(0),
                                      0 if add is None else add.stride(0), out.stride(0),
                                      HP=triton.next_power_of_2(hidden), ADD=add is not None,
                                      num_warps=4 if hidden <= 4096 else 8)
    return out


@triton.jit
def _rotary_store_kernel(qkv_ptr, cos_ptr, sin_ptr, positions_ptr, slots_ptr, q_ptr, k_ptr, v_ptr, qkv_row,
                         k_head, v_head, HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                         DP: tl.constexpr, DVP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    base = qkv_ptr + row * qkv_row
    if head < HQ + HK:
        i = tl.arange(0, DP)
        inside = i < D
        half = D // 2
        dtype = q_ptr.dtype.element_ty
        position = tl.load(positions_ptr + row).to(tl.int64)
        x = tl.load(base + head * D + i, mask=inside, other=0.0).to(tl.float32)
        partner = tl.load(base + head * D + (i + half) % D, mask=inside, other=0.0).to(tl.float32)
        rotated = tl.where(i < half, -partner, partner)
        c = tl.load(cos_ptr + position * D + i, mask=inside, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + position * D + i, mask=inside, other=0.0).to(tl.float32)
        out = _rounded(_rounded(x * c, dtype).to(tl.float32) + _rounded(rotated * s, dtype).to(tl.float32), dtype)
        if head < HQ:
            tl.store(q_ptr + (row * HQ + head) * D + i, out, mask=inside)
        else:
            slot = tl.load(slots_ptr + row).to(tl.int64)
            tl.store(k_ptr + (head - HQ) * k_head + slot * D + i, out, mask=inside)
    else:
        j = tl.arange(0, DVP)
        in_value = j < DV
        slot = tl.load(slots_ptr + row).to(tl.int64)
        kv = head - HQ - HK
        value = tl.load(base + (HQ + HK) * D + kv * DV + j, mask=in_value, other=0.0)
        tl.store(v_ptr + kv * v_head + slot * DV + j, value, mask=in_value)


def rotary_store(qkv: torch.Tensor, hq: int, hk: int, d: int, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor) -> torch.Tensor:
    """`native.rotary_store` on a GPU: the rotary embedding (halves rotated) of the q and k heads of each
    row of qkv at `positions`, the keys and values stored in the cache at each row's slot; returns
    the rotated queries [rows, hq, d]."""
    rows = qkv.shape[0]
    dv = values.shape[-1]
    if (qkv.dim() != 2 or qkv.stride(1) != 1 or qkv.shape[1] < (hq + hk) * d + hk * dv or d % 2
            or not keys.is_contiguous() or not values.is_contiguous() or not cos.is_contiguous()
            or not sin.is_contiguous() or cos.shape[-1] != d or sin.shape != cos.shape or keys.shape[0] != hk
            or keys.shape[-1] != d or values.shape[0] != hk or positions.shape != (rows,) or slots.shape != (rows,)
            or positions.is_floating_point() or slots.is_floating_point() or keys.dtype != qkv.dtype
            or len({t.device for t in (qkv, cos, sin, positions, slots, keys, values)}) != 1):
        raise ValueError("rotary_store: qkv must be [rows, at least (hq + hk) * d + hk * dv] with contiguous rows, "
                         "d even, the cache [hk, blocks, BLOCK, d] and the tables [positions, d] contiguous, a "
                         "position and a slot a row, all on one device")
    q = qkv.new_empty(rows, hq, d)
    if rows:
        _rotary_store_kernel[(rows, hq + 2 * hk)](
            qkv, cos, sin, positions, slots, q, keys, values, qkv.stride(0), keys.stride(0), values.stride(0),
            HQ=hq, HK=hk, D=d, DV=dv, DP=triton.next_power_of_2(d), DVP=triton.next_power_of_2(dv), num_warps=1)
    return q


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, inner, gate_up_row, out_row, TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * TILE + tl.arange(0, TILE)
    inside = i < inner
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * gate_up_row + i, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * gate_up_row + inner + i, mask=inside, other=0.0).to(tl.float32)
    silu = _rounded(gate / (1.0 + tl.exp(-gate)), dtype).to(tl.float32)
    tl.store(out_ptr + row * out_row + i, _rounded(silu * up, dtype), mask=inside)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`native.silu_mul` on a GPU: SiLU(gate) * up of gate_up [rows, 2 * inner]; returns [rows, inner]."""
    rows, both = gate_up.shape
    if gate_up.stride(1) != 1 or both % 2:
        raise ValueError("silu_mul: gate_up must be [rows, 2 * inner] with contiguous rows")
    out = gate_up.new_empty(rows, both // 2)
    if rows:
        tile = 1024
        _silu_mul_kernel[(rows, triton.cdiv(both // 2, tile))](gate_up, out, both // 2, gate_up.stride(0),
                                                                out.stride(0), TILE=tile, num_warps=4)
    return out
