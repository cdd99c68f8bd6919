"""The engine's greedy picks on the CPU (`picks.cpp`): torch.argmax's ids for every row asked for, of float32
and of bf16 logits, ties, NaN, infinities and a vocabulary that is no multiple of the vector width included."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

from llmos.engine import native, sampling
from llmos.engine.attention import can_compile

BUILDS = pytest.mark.skipif(not can_compile(), reason="the kernel needs a C++ compiler (g++)")


def argmax(logits: torch.Tensor, rows: list[int]) -> list[int]:
    return [int(torch.argmax(logits[row])) for row in rows]


def hard_logits(vocab: int) -> torch.Tensor:
    """40 rows of `vocab` logits, the first nine each a case argmax must rank as torch does."""
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(40, vocab, generator=generator) * 5
    logits[1, :] = 2.0                                  # all equal: the first
    logits[2, vocab // 2] = logits[2, -1] = 1e9         # a tie: the first of the two
    logits[3, -1] = 1e9                                 # the maximum in the last, partial vector
    logits[4, :] = float("-inf")                        # nothing but -inf: the first
    logits[5, vocab // 3] = float("inf")
    logits[6, vocab - 1] = float("nan")                 # NaN beats any number
    logits[6, 0] = float("inf")
    logits[7, [vocab // 2, vocab - 1]] = float("nan")   # the first NaN
    logits[8, :] = 0.0
    logits[8, vocab - 1] = -0.0                         # -0 equals 0: the first
    return logits


VOCABS = [49152, 1000, 17, 3]


@BUILDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", VOCABS)
def test_picks_are_torchs_argmax(vocab, dtype):
    logits = hard_logits(vocab).to(dtype)       # in bf16: ties rounding made, as a bf16 LM head makes them
    rows = list(range(40))
    assert native.greedy_picks(logits, rows) == argmax(logits, rows) == torch.argmax(logits, -1).tolist()
    some = [39, 6, 6, 0, 17]                            # any rows, in any order, repeated
    assert native.greedy_picks(logits, some) == argmax(logits, some)
    assert native.greedy_picks(logits, []) == []
    wide = torch.randn(5, vocab + 40, generator=torch.Generator().manual_seed(1)).to(dtype)[:, 8:8 + vocab]  # apart
    assert native.greedy_picks(wide, [0, 4]) == argmax(wide, [0, 4])


@BUILDS
def test_picks_built_for_a_cpu_without_avx512_are_torchs_argmax(tmp_path):
    """The scalar path a CPU without AVX-512 builds (some CPUs without native bf16): the kernel's source alone,
    built for x86-64-v3 (AVX2, no AVX-512), on the same cases."""
    if platform.machine() != "x86_64":
        pytest.skip("built for an x86-64 level")
    library = tmp_path / "picks.so"
    source = Path(native.__file__).with_name("picks.cpp")
    built = subprocess.run([os.environ.get("CXX", "g++"), "-O2", "-march=x86-64-v3", "-fopenmp", "-fPIC", "-shared",
                            "-std=c++17", str(source), "-o", str(library)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        kernel = getattr(ctypes.CDLL(str(library)), f"llmos_greedy_picks_{name}")
        kernel.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_void_p]
        for vocab in VOCABS:
            logits = hard_logits(vocab).to(dtype)
            rows = torch.tensor([*range(40), 6, 0], dtype=torch.int64)
            out = torch.empty(len(rows), dtype=torch.int64)
            kernel(logits.data_ptr(), logits.stride(0), rows.data_ptr(), len(rows), vocab, out.data_ptr())
            assert out.tolist() == argmax(logits, rows.tolist()), (dtype, vocab)


@BUILDS
def test_the_engines_greedy_picks_take_the_kernel_once_it_is_built(monkeypatch):
    native.library()
    taken = []
    real = native.greedy_picks
    monkeypatch.setattr(native, "greedy_picks", lambda logits, rows: taken.append(rows) or real(logits, rows))
    logits = torch.randn(6, 300)
    assert sampling.greedy_picks(logits, [5, 1]) == argmax(logits, [5, 1])
    assert taken == [[5, 1]]
    assert sampling.greedy_picks(logits.bfloat16(), [2]) == argmax(logits.bfloat16(), [2])
    assert taken == [[5, 1], [2]]
    assert sampling.greedy_picks(logits.half(), [3]) == argmax(logits.half(), [3])     # torch's
    assert taken == [[5, 1], [2]]


@BUILDS
def test_bad_logits_are_refused():
    with pytest.raises(ValueError, match="float32 or bf16"):
        native.greedy_picks(torch.randn(2, 8).half(), [0])
    with pytest.raises(ValueError, match="contiguous"):
        native.greedy_picks(torch.randn(8, 2).t(), [0])
    with pytest.raises(ValueError, match="past"):
        native.greedy_picks(torch.randn(2, 8), [2])
