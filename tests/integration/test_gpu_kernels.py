"""The engine's GPU kernels (`gpu_kernels.py`: attention over the paged cache, the fused element-wise
work) and its CUDA graphs of decode steps (`graphs.py`), against torch's own operators and transformers'
generate(). On a GPU (`LLMOS_TEST_DEVICE=cuda`) the kernels run compiled and the graphs are captured;
on the CPU Triton's interpreter runs the same kernels and the same static buffers run uncaptured."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from llmos.common.domain import SamplingParams
from llmos.engine import Engine, EngineDriver
from llmos.engine.attention import BLOCK, Part, Step
from llmos.engine.loader import load_model
from tests.integration.test_engine import PROMPTS, Running, reference, submit, wait_all
from tests.support.device import ENGINE_DEVICE

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])


@pytest.fixture
def kernels(monkeypatch):
    """The kernels' module: compiled on a GPU, interpreted on the CPU."""
    if ENGINE_DEVICE.type == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it before Triton is imported"
        monkeypatch.setenv("LLMOS_ENGINE_INTERPRET_GPU_KERNELS", "1")
    return importlib.import_module("llmos.engine.gpu_kernels")


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


def _close(ours: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype) -> None:
    scale = max(1.0, float(theirs.abs().max()))
    assert float((ours.double() - theirs.double()).abs().max()) <= _tolerance(dtype) * scale


def _attention_reference(q, keys, values, tables, which, seen, scaling, softcap, window):
    """Each row alone, in float64: its query heads over its positions [start, seen) through its table."""
    n, hq, d = q.shape
    hk = keys.shape[0]
    out = torch.empty(n, hq, values.shape[-1], dtype=torch.float64)
    for r in range(n):
        positions = torch.arange(int(seen[r]))
        if window:
            positions = positions[positions >= int(seen[r]) - window]
        blocks = tables[int(which[r])][positions // BLOCK]
        k = keys[:, blocks, positions % BLOCK].double()          # [hk, L, d]
        v = values[:, blocks, positions % BLOCK].double()
        for h in range(hq):
            scores = k[h // (hq // hk)] @ q[r, h].double() * scaling
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            out[r, h] = torch.softmax(scores, 0) @ v[h // (hq // hk)]
    return out


@DTYPES
@pytest.mark.parametrize("softcap,window", [(None, None), (30.0, 20)], ids=["plain", "softcap-window"])
def test_attention_reads_each_rows_blocks_and_a_row_alone_equals_it_in_a_batch(kernels, dtype, softcap, window):
    generator = torch.Generator().manual_seed(0)
    hk, hq, d, pool = 3, 9, 64, 40
    keys = torch.randn(hk, pool, BLOCK, d, generator=generator).to(dtype)
    values = torch.randn(hk, pool, BLOCK, d, generator=generator).to(dtype)
    q = torch.randn(5, hq, d, generator=generator).to(dtype)
    tables = torch.randint(1, pool, (3, 8), generator=generator)
    which, seen = torch.tensor([0, 1, 2, 2, 2]), torch.tensor([1, 17, 100, 40, 128])
    on = [t.to(ENGINE_DEVICE) for t in (q, keys, values, tables, which, seen)]
    ours = kernels.paged_attention(*on, 0.125, softcap, window).cpu()
    _close(ours, _attention_reference(q, keys, values, tables, which, seen, 0.125, softcap, window), dtype)
    for row in range(5):           # alone, the same bits
        alone = kernels.paged_attention(on[0][row:row + 1], on[1], on[2], on[3], on[4][row:row + 1],
                                        on[5][row:row + 1], 0.125, softcap, window).cpu()
        assert torch.equal(alone, ours[row:row + 1])


@DTYPES
def test_the_element_wise_kernels_compute_what_torchs_operators_do(kernels, dtype):
    generator = torch.Generator().manual_seed(1)
    rows, hidden, eps = 7, 576, 1e-5

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).to(ENGINE_DEVICE)

    x, add, weight = rand(rows, hidden), rand(rows, hidden), rand(hidden)
    summed = x + add
    mine = x.clone()
    normed = kernels.add_rms_norm(mine, add, weight, eps)
    assert torch.equal(mine, summed)                             # x += add, rounded as torch rounds it
    s32 = summed.float()
    _close(normed.cpu(), (weight * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)).cpu(),
           dtype)
    _close(kernels.add_rms_norm(x.clone(), None, weight, eps).cpu(),
           (weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(dtype)).cpu(), dtype)

    gate_up = rand(rows, 2 * 1536)
    gate, up = gate_up.chunk(2, dim=-1)
    _close(kernels.silu_mul(gate_up).cpu(), (F.silu(gate) * up).cpu(), dtype)

    hq, hk, d, length = 9, 3, 64, 200
    qkv = rand(6, (hq + 2 * hk) * d)
    cos, sin = rand(length, d), rand(length, d)
    positions = torch.tensor([0, 5, 17, 100, 150, 199], device=ENGINE_DEVICE)
    slots = torch.tensor([16, 17, 40, 99, 300, 500], device=ENGINE_DEVICE)
    keys = torch.zeros(hk, 40, BLOCK, d, dtype=dtype, device=ENGINE_DEVICE)
    values = torch.zeros_like(keys)
    queries = kernels.rotary_store(qkv, hq, hk, d, cos, sin, positions, slots, keys, values)
    heads = qkv.view(6, hq + 2 * hk, d)
    c, s = cos[positions][:, None], sin[positions][:, None]

    def rope(t):
        return t * c + torch.cat((-t[..., d // 2:], t[..., :d // 2]), dim=-1) * s

    _close(queries.cpu(), rope(heads[:, :hq]).cpu(), dtype)
    _close(keys.view(hk, -1, d)[:, slots].transpose(0, 1).cpu(), rope(heads[:, hq:hq + hk]).cpu(), dtype)
    assert torch.equal(values.view(hk, -1, d)[:, slots].transpose(0, 1), heads[:, hq + hk:])
    untouched = torch.ones(keys.view(hk, -1, d).shape[1], dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert not keys.view(hk, -1, d)[:, untouched.to(ENGINE_DEVICE)].any()


def _graphed(path, slots=8):
    loaded = load_model("m", str(path), ENGINE_DEVICE, torch.float32, slots * 512, 512, compile=True, graphs=slots)
    assert loaded.runner.graphs is not None and loaded.runner.ops.__name__ == "llmos.engine.gpu_kernels"
    return loaded


def test_decode_steps_through_graphs_answer_as_generate_alone(kernels, tiny_model_dir):
    loaded = _graphed(tiny_model_dir)
    driver = EngineDriver()
    driver.start_thread()
    engine = Running(Engine("m", loaded.runner, loaded.tokenizer, loaded.eos_ids, driver, 4, max_running=8), driver)
    try:
        collectors = [submit(engine, loaded.tokenizer, p, SamplingParams(), 12, f"r{i}") for i, p in
                      enumerate(PROMPTS[:6])]
        wait_all(collectors, timeout=600)
        assert [c.ids for c in collectors] == reference(tiny_model_dir, PROMPTS[:6], 12)
        assert loaded.runner.graphs.replays > 0
        assert engine.stats().running == 0 and engine.stats().kv_tokens_used == 0
    finally:
        engine.stop()


def test_a_graphs_padding_rows_write_only_the_scratch_block(kernels, tiny_model_dir):
    """Three rows run in the bucket of four: the fourth writes its key and value in the scratch block
    alone, and the three rows' logits are those of the same step without graphs."""
    loaded = _graphed(tiny_model_dir)
    runner, cache = loaded.runner, loaded.runner.cache
    assert runner.graphs.buckets[:4] == [1, 2, 4, 8]
    generator = torch.Generator().manual_seed(2)
    for keys in cache.keys + cache.values:                # a cache with something in every real block
        keys[:, :cache.blocks].copy_(torch.randn(keys[:, :cache.blocks].shape, generator=generator))
    parts = [Part([1, 2], 20, 1, decode=True), Part([3], 4, 1, decode=True), Part([4, 5, 6], 40, 1, decode=True)]
    tokens = torch.tensor([5, 6, 7], device=ENGINE_DEVICE)
    before = [t.clone() for t in cache.tensors]
    eager = runner._forward(tokens, Step(parts, ENGINE_DEVICE), None, None)
    written = [t.clone() for t in cache.tensors]
    for t, saved in zip(cache.tensors, before, strict=True):
        t.copy_(saved)
    graphed = runner.forward(tokens, Step(parts, ENGINE_DEVICE), torch.arange(3, device=ENGINE_DEVICE))
    assert runner.graphs.replays == 1
    _close(graphed.cpu(), eager.cpu(), torch.float32)
    slots = [1 * BLOCK + 4, 3 * BLOCK + 4, 6 * BLOCK + 8]     # each row's own position
    for t, after in zip(cache.tensors, written, strict=True):
        flat, expected = t.view(t.shape[0], -1, t.shape[-1]), after.view(t.shape[0], -1, t.shape[-1])
        real = cache.blocks * BLOCK
        _close(flat[:, slots].cpu(), expected[:, slots].cpu(), torch.float32)
        others = torch.ones(real, dtype=torch.bool)
        others[slots] = False
        assert torch.equal(flat[:, :real][:, others.to(ENGINE_DEVICE)], expected[:, :real][:, others.to(ENGINE_DEVICE)])
    # The padding row's key went to the scratch block's first slot (zero before the step, on the CPU; what
    # the capture's warm-up put there, on a GPU: the same row, so the same key).
    assert cache.keys[0][:, cache.scratch, 0].abs().sum() > 0
