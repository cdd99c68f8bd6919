"""What this host computes in, known without importing torch (the registry estimates with it)."""

from __future__ import annotations

import functools
from pathlib import Path


def compute_bytes(dtype: str) -> int:
    """Bytes per element of the dtype a worker set to `dtype` computes in ("auto" as the worker
    picks it: bf16 on CUDA and on CPUs with native bf16, float32 otherwise)."""
    if dtype == "auto":
        return 2 if cpu_has_bf16() or Path("/dev/nvidia0").exists() else 4
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


@functools.cache
def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
