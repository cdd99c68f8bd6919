"""The attention kernel's rows of bf16 prompt chunks (`paged_attention.cpp`'s `attend_chunk`, where the CPU
has AVX-512; through AMX's tiles where it has AMX, and then built without AMX too): up to 16 consecutive rows
of a prompt share each block of keys and values they read. A row's result must be what attention computes
(against float64), the same bits whichever rows share its work (alone, in any cut of its prompt, beside other
sequences), and its positions outside its sight must weigh nothing."""

from __future__ import annotations

import ctypes
import math
import os
import subprocess

import pytest
import torch

from llmos.engine import native
from llmos.engine.attention import BLOCK, blocks_for, can_compile

COMPILES = pytest.mark.skipif(not can_compile(), reason="the attention kernel needs a C++ compiler (g++)")


@pytest.fixture(scope="module")
def without_tiles(tmp_path_factory):
    """The kernels built as this CPU builds them but without AMX (what a CPU with AVX-512 and no AMX runs), or
    None where the engine's own build uses no tiles (it is that path already)."""
    if not can_compile() or native.pair_product_kind(64) != "amx":
        return None
    directory = tmp_path_factory.mktemp("without-tiles")
    objects = []
    for source in native.SOURCES:
        target = directory / f"{source.stem}.o"
        command = [os.environ.get("CXX", "g++"), *native.COMPILE, *native.OWN_FLAGS.get(source.name, ()),
                   "-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8", str(source), "-o", str(target)]
        built = subprocess.run(command, capture_output=True, text=True)
        assert built.returncode == 0, built.stderr
        objects.append(str(target))
    library = directory / "kernels.so"
    linked = subprocess.run([os.environ.get("CXX", "g++"), *native.LINK, *objects, "-o", str(library)],
                            capture_output=True, text=True)
    assert linked.returncode == 0, linked.stderr
    lib = ctypes.CDLL(str(library))
    lib.llmos_paged_attention_bf16.argtypes = native.library().llmos_paged_attention_bf16.argtypes
    lib.llmos_paged_attention_bf16.restype = ctypes.c_int
    lib.llmos_pair_product_kind_bf16.argtypes = [ctypes.c_int64]
    lib.llmos_pair_product_kind_bf16.restype = ctypes.c_int
    assert lib.llmos_pair_product_kind_bf16(64) == 1          # built without tiles: vdpbf16ps
    return lib


@pytest.fixture(params=["as-built", "avx512-without-amx"])
def kernels(request, without_tiles, monkeypatch):
    """Each test once with the engine's kernels and once, on a CPU with AMX, with them built without AMX."""
    if request.param == "avx512-without-amx":
        if without_tiles is None:
            pytest.skip("this CPU's build uses no AMX tiles: the first run is that path")
        monkeypatch.setattr(native, "library", lambda: without_tiles)
    return request.param


def reference(q, keys, values, table, seen, scaling, softcap, window):
    """Each row's attention in float64 over the positions it sees, through its block table."""
    hk, d = keys.shape[0], keys.shape[-1]
    g = q.shape[1] // hk
    k = keys[:, table].reshape(hk, -1, d).double()
    v = values[:, table].reshape(hk, -1, values.shape[-1]).double()
    out = torch.empty(q.shape[0], q.shape[1], values.shape[-1], dtype=torch.float64)
    for i, end in enumerate(seen.tolist()):
        start = max(0, end - window) if window else 0
        for h in range(q.shape[1]):
            scores = k[h // g, start:end] @ q[i, h].double() * scaling
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            out[i, h] = torch.softmax(scores, 0) @ v[h // g, start:end]
    return out


def pools(hk, blocks, d, seed):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(hk, blocks, BLOCK, d, generator=generator).bfloat16()
    values = torch.randn(hk, blocks, BLOCK, d, generator=generator).bfloat16()
    return keys, values, generator


def attend(q, keys, values, tables, which, seen, softcap=None, window=None, rounded_from=0):
    return native.paged_attention(q, keys, values, tables, which, seen, 0.125, softcap, window,
                                  rounded_from=rounded_from)


@COMPILES
@pytest.mark.parametrize(("hq", "hk", "d"), [(9, 3, 64), (8, 1, 64), (4, 4, 128), (16, 2, 128)],
                         ids=["smollm2", "group-8", "no-groups", "d128"])
@pytest.mark.parametrize(("softcap", "window"), [(None, None), (30.0, 20), (None, 37)],
                         ids=["plain", "softcap-window", "window"])
def test_prompt_rows_attend_as_float64_whichever_rows_share_their_work(hq, hk, d, softcap, window, kernels):
    """A prompt of 61 rows after 44 cached positions (its blocks scattered in the pool), in one call, then
    cut into chunks of 1, 7, 16 and 37 rows beside a decoding sequence and another prompt's rows."""
    keys, values, generator = pools(hk, 20, d, seed=3)
    table = torch.tensor([17, 3, 11, 6, 1, 14, 9], dtype=torch.long)             # 105 positions: 7 blocks
    q = (torch.randn(61, hq, d, generator=generator) * 2).bfloat16()
    seen = torch.arange(45, 106)
    whole = attend(q, keys, values, table[None], torch.zeros(61, dtype=torch.long), seen, softcap, window)
    expected = reference(q, keys, values, table, seen, 0.125, softcap, window)
    assert (whole.double() - expected).abs().max() < 3e-2
    assert (whole.double() - expected).abs().mean() < 3e-3

    other = torch.tensor([[2, 5, 8, 0, 0, 0, 0]], dtype=torch.long)
    q_decode = torch.randn(1, hq, d, generator=generator).bfloat16()
    q_other = torch.randn(5, hq, d, generator=generator).bfloat16()
    tables = torch.cat([other, table[None], other])
    start = 0
    cut = []
    for length in (1, 7, 16, 37):
        rows = torch.cat([q_decode, q[start:start + length], q_other])
        which = torch.tensor([0] + [1] * length + [2] * 5)
        sees = torch.cat([torch.tensor([40]), seen[start:start + length], torch.arange(30, 35)])
        out = attend(rows, keys, values, tables, which, sees, softcap, window, rounded_from=1)
        cut.append(out[1:1 + length])
        start += length
    assert torch.equal(torch.cat(cut), whole)
    # Each row alone, as in a chunk of its own.
    for i in (0, 8, 9, 33, 60):
        alone = attend(q[i:i + 1], keys, values, table[None], torch.zeros(1, dtype=torch.long), seen[i:i + 1],
                       softcap, window)
        assert torch.equal(alone, whole[i:i + 1])


@COMPILES
def test_positions_a_row_does_not_see_weigh_nothing_whatever_they_hold(kernels):
    """Positions after a row's own and, with a window, before it, hold NaN and infinities here: no row's
    result is touched by them."""
    keys, values, generator = pools(2, 8, 64, seed=4)
    table = torch.tensor([[4, 2, 6, 7]], dtype=torch.long)                     # 64 positions
    seen = torch.arange(23, 43)
    q = torch.randn(20, 6, 64, generator=generator).bfloat16()
    which = torch.zeros(20, dtype=torch.long)
    clean = attend(q, keys, values, table, which, seen, window=16)
    poisoned_keys, poisoned_values = keys.clone(), values.clone()
    flat = [(b, o) for b in table[0].tolist() for o in range(BLOCK)]
    for position in list(range(0, 6)) + list(range(43, 64)):            # before every row's window, after all
        block, offset = flat[position]
        poisoned_keys[:, block, offset] = math.nan if position % 2 else math.inf
        poisoned_values[:, block, offset] = -math.inf if position % 2 else math.nan
    assert torch.equal(attend(q, poisoned_keys, poisoned_values, table, which, seen, window=16), clean)
    assert torch.isfinite(clean.float()).all()


@COMPILES
def test_decoding_rows_keep_the_row_at_a_time_path(kernels):
    """Rows before `rounded_from` (decoding sequences) are computed one at a time as before: the same bits
    whatever prompt rows follow them, and equal to the call without rounded rows."""
    keys, values, generator = pools(3, 12, 64, seed=5)
    tables = torch.tensor([[1, 4, 9, 0], [2, 3, 5, 7]], dtype=torch.long)
    q = torch.randn(12, 9, 64, generator=generator).bfloat16()
    which = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    seen = torch.tensor([10, 30, 45, 47, 50, 51, 52, 53, 54, 55, 56, 57])
    decoding_alone = attend(q[:4], keys, values, tables, which[:4], seen[:4], rounded_from=4)
    mixed = attend(q, keys, values, tables, which, seen, rounded_from=4)
    assert torch.equal(mixed[:4], decoding_alone)
    assert torch.equal(mixed[4:], attend(q[4:], keys, values, tables, which[4:], seen[4:]))


@COMPILES
@pytest.mark.parametrize(("hq", "hk", "d"), [(9, 3, 64), (8, 1, 64), (4, 4, 128), (16, 2, 128), (14, 2, 64)],
                         ids=["smollm2", "group-8", "no-groups", "d128", "group-7"])
@pytest.mark.parametrize(("softcap", "window"), [(None, None), (30.0, 20), (None, 37)],
                         ids=["plain", "softcap-window", "window"])
def test_decoding_rows_attend_as_float64_and_weigh_nothing_they_do_not_see(hq, hk, d, softcap, window, kernels):
    """Decoding rows (before `rounded_from`; where AVX-512 is, scored a block of keys at a time) seeing 1 to 105
    positions through a table of scattered blocks: each as float64 computes it, and the same bits alone with the
    positions of its first and last blocks that it does not see holding NaN and infinities."""
    keys, values, generator = pools(hk, 20, d, seed=11)
    table = torch.tensor([17, 3, 11, 6, 1, 14, 9], dtype=torch.long)             # 112 positions: 7 blocks
    seen = torch.tensor([1, 5, 16, 17, 40, 63, 64, 65, 99, 105])
    q = (torch.randn(len(seen), hq, d, generator=generator) * 2).bfloat16()
    together = attend(q, keys, values, table[None], torch.zeros(len(seen), dtype=torch.long), seen, softcap, window,
                      rounded_from=len(seen))
    expected = reference(q, keys, values, table, seen, 0.125, softcap, window)
    assert (together.double() - expected).abs().max() < 3e-2
    assert (together.double() - expected).abs().mean() < 3e-3
    for i, end in enumerate(seen.tolist()):
        start = max(0, end - window) if window else 0
        unseen = list(range(start // BLOCK * BLOCK, start)) + list(range(end, (end - 1) // BLOCK * BLOCK + BLOCK))
        poisoned_keys, poisoned_values = keys.clone(), values.clone()
        for position in unseen:
            block, offset = int(table[position // BLOCK]), position % BLOCK
            poisoned_keys[:, block, offset] = math.nan if position % 2 else math.inf
            poisoned_values[:, block, offset] = -math.inf if position % 2 else math.nan
        alone = attend(q[i:i + 1], poisoned_keys, poisoned_values, table[None], torch.zeros(1, dtype=torch.long),
                       seen[i:i + 1], softcap, window, rounded_from=1)
        assert torch.equal(alone, together[i:i + 1]), f"row {i}, seeing {start} to {end}"


@COMPILES
@pytest.mark.parametrize("seed", range(6))
def test_random_prompts_cut_at_random_give_the_same_bits_and_attend_as_float64(seed, kernels):
    """Random shapes (query heads per KV head 1-8, head size 64 or 128, with or without a window), a prompt of
    random length after a random cached prefix, cut at random into chunks (block edges included), each chunk
    in a step with random other sequences before and after it."""
    rng = torch.Generator().manual_seed(100 + seed)

    def pick(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=rng))

    hk, g, d = pick(1, 3), pick(1, 8), (64, 128)[pick(0, 1)]
    window = (None, pick(1, 90))[pick(0, 1)]
    cached, length = pick(0, 70), pick(1, 150)
    blocks = blocks_for(cached + length)
    keys, values, generator = pools(hk, blocks + 8, d, seed=200 + seed)
    table = torch.randperm(blocks + 7, generator=rng)[:blocks] + 1
    q = torch.randn(length, hk * g, d, generator=generator).bfloat16()
    seen = torch.arange(cached + 1, cached + length + 1)
    whole = attend(q, keys, values, table[None], torch.zeros(length, dtype=torch.long), seen, window=window)
    expected = reference(q, keys, values, table, seen, 0.125, None, window)
    assert (whole.double() - expected).abs().max() < 3e-2

    other = torch.randint(1, blocks + 8, (1, blocks), generator=rng)
    tables = torch.cat([other, table[None], other])
    pieces, start = [], 0
    while start < length:
        n = min(length - start, pick(1, 40))
        before, after = pick(0, 3), pick(0, 3)
        rows = torch.cat([torch.randn(before, hk * g, d, generator=generator).bfloat16(), q[start:start + n],
                          torch.randn(after, hk * g, d, generator=generator).bfloat16()])
        which = torch.tensor([0] * before + [1] * n + [2] * after)
        sees = torch.cat([torch.randint(1, 17 * blocks, (before,), generator=rng).clamp(max=16 * blocks),
                          seen[start:start + n], torch.randint(1, 16 * blocks + 1, (after,), generator=rng)])
        out = attend(rows, keys, values, tables, which, sees, window=window, rounded_from=before)
        pieces.append(out[before:before + n])
        start += n
    assert torch.equal(torch.cat(pieces), whole)
