"""Compiling at load: the decode kernel against the uncompiled path, and where a worker keeps what
it compiled."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llmos.engine.attention import BLOCK, LayerShape, PagedCache, Part, Step, attend, can_compile

CPU = torch.device("cpu")
COMPILES = pytest.mark.skipif(not can_compile(), reason="inductor's CPU code needs g++ and Python's headers")


@COMPILES
@pytest.mark.parametrize(("softcap", "window"), [(None, None), (30.0, 20)], ids=["plain", "softcap-window"])
def test_the_decode_kernel_attends_as_the_uncompiled_path(softcap, window):
    """Grouped query heads (6 over 2), sequences of 1 to 100 positions (tables of 1 to 8 blocks, so
    several groups and the padded widths), alone and together; the kernel computes in float32 from
    the bf16 pool, the uncompiled path from a float32 or bf16 copy, so they agree closely, not bit
    for bit."""
    generator = torch.Generator().manual_seed(0)
    shape = LayerShape(2, 16, 16)
    compiled = PagedCache([shape], 64, torch.bfloat16, CPU, compile=True)
    compiled.warm(6)
    plain = PagedCache([shape], 64, torch.bfloat16, CPU)
    for pool in compiled.keys + compiled.values:
        pool[:, 1:] = torch.randn(pool[:, 1:].shape, generator=generator).bfloat16()
    plain.keys, plain.values = compiled.keys, compiled.values
    lengths = [1, 17, 40, 100, 3]
    tables, first = [], 1
    for length in lengths:
        tables.append(list(range(first, first + -(-length // BLOCK))))
        first += len(tables[-1])
    steps = [[Part(tables[i], lengths[i] - 1, 1, True)] for i in range(len(lengths))]
    steps.append([Part(tables[i], lengths[i] - 1, 1, True) for i in range(len(lengths))])
    for parts in steps:
        step = Step(parts, CPU)
        q = torch.randn(len(parts), 6, 16, generator=generator).bfloat16()
        with torch.inference_mode():
            got = attend(step, compiled, 0, q, 0.25, softcap, window)
            expected = attend(step, plain, 0, q, 0.25, softcap, window)
        assert compiled.kernel is not None, "the kernel failed and the path fell back"
        assert got.dtype == torch.bfloat16 and got.shape == expected.shape
        assert torch.allclose(got.float(), expected.float(), atol=2e-2, rtol=2e-2), (got - expected).abs().max()


@COMPILES
def test_a_worker_keeps_what_it_compiled_in_its_data_directory(tiny_model_dir, tmp_path):
    """In a fresh interpreter (this one may have compiled the kernel already, and would not again),
    as a worker starts: its data directory holds inductor's cache once a bf16 model has loaded, and
    nothing goes where the environment pointed before."""
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
