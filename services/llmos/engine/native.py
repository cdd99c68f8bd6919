"""The engine's own C++ kernel (`paged_attention.cpp`): attention of each query row (a decoding
sequence's token, or a prompt chunk's, causally) reading the paged cache in place. Built once per
CPU kind and source with the system's C++ compiler into the compile cache (inductor's directory:
`TORCHINDUCTOR_CACHE_DIR`, which the worker points at its data directory), loaded with ctypes and
called with the tensors' pointers: a call costs a few microseconds, where a compiled graph's
wrappers cost tens.

OpenMP: the library is linked against `libgomp.so.1`, the name of the runtime torch itself loads,
so its parallel loops run on torch's threads (one pool, not two fighting for the cores).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from llmos.common.devices import cpu_kind

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.cpp")
# -ffast-math compiles the source only: on the link line, g++ adds a start-up routine that switches
# the whole process to flushing denormals to zero (torch's arithmetic included).
COMPILE = ("-O3", "-march=native", "-fopenmp", "-ffast-math", "-fPIC", "-std=c++17", "-c")
LINK = ("-shared", "-fopenmp")
_I64, _F32, _P = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


def cache_dir() -> Path:
    """Where built kernels are kept: beside inductor's code."""
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(Path(tempfile.gettempdir()) / f"llmos-{os.getuid()}")
    return Path(root) / "llmos-kernels"


@functools.cache
def library() -> ctypes.CDLL:
    """The built kernel, loaded (built first when this source, compiler flags and CPU kind have no
    build yet). Raises when it cannot be built."""
    compiler = os.environ.get("CXX", "g++")
    source = SOURCE.read_bytes()
    # -march=native: a build is for the CPU kind it was made on (a data directory may move).
    key = hashlib.sha256(source + repr((compiler, COMPILE, LINK, cpu_kind(), _cpu_flags())).encode()).hexdigest()[:16]
    target = cache_dir() / f"paged_attention-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial, objects = target.with_suffix(f".{os.getpid()}.tmp"), target.with_suffix(f".{os.getpid()}.o")
        try:
            for command in ([compiler, *COMPILE, str(SOURCE), "-o", str(objects)],
                            [compiler, *LINK, str(objects), "-o", str(partial)]):
                done = subprocess.run(command, capture_output=True, text=True, timeout=300)
                if done.returncode != 0:
                    raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:2000]}")
            os.replace(partial, target)     # whole or absent, with several workers building at once
        finally:
            partial.unlink(missing_ok=True)
            objects.unlink(missing_ok=True)
        log.info("built the attention kernel: %s", target)
    lib = ctypes.CDLL(str(target))
    for name in ("llmos_paged_attention_bf16", "llmos_paged_attention_f32"):
        fn = getattr(lib, name)
        fn.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _F32, _F32, _I64]
        fn.restype = ctypes.c_int
    return lib


@functools.cache
def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def paged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                    which: torch.Tensor, seen: torch.Tensor, scaling: float, softcap: float | None,
                    window: int | None) -> torch.Tensor:
    """Attention of the query rows q [n, hq, d] over the pool `keys` [hk, pool, BLOCK, d] and `values`
    [hk, pool, BLOCK, dv]: row r reads the block table `tables[which[r]]` ([sequences, width], int64
    block ids) up to position `seen[r]` (int64, exclusive); returns [n, hq, dv] in q's dtype. bf16
    or float32, on the CPU."""
    n, hq, d = q.shape
    hk, pool, _, dv = values.shape
    if not (q.dtype == keys.dtype == values.dtype and q.dtype in (torch.bfloat16, torch.float32)
            and keys.is_contiguous() and values.is_contiguous() and q.device.type == "cpu"):
        raise ValueError("the attention kernel takes a contiguous pool and queries of one dtype, bf16 or float32, "
                         "on the CPU")
    q, tables, which, seen = q.contiguous(), tables.contiguous(), which.contiguous(), seen.contiguous()
    out = q.new_empty(n, hq, dv)
    lib = library()
    fn = lib.llmos_paged_attention_bf16 if q.dtype == torch.bfloat16 else lib.llmos_paged_attention_f32
    if fn(q.data_ptr(), keys.data_ptr(), values.data_ptr(), tables.data_ptr(), which.data_ptr(), seen.data_ptr(),
          out.data_ptr(), n, hq, hk, d, dv, pool, tables.shape[1], scaling, softcap or 0.0, window or 0):
        raise ValueError(f"no attention kernel for {hq // hk} query heads a KV head of sizes {d} and {dv}")
    return out
