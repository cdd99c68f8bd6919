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
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (none where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags")
                     for word in line.split(":", 1)[1].split())


def cpu_has_bf16() -> bool:
    """Native bf16 products: avx512_bf16 (AMD Zen 4 and later, Intel since Cooper Lake) or AMX."""
    return not cpu_flags().isdisjoint({"avx512_bf16", "amx_bf16"})


def cpu_kind() -> str:
    """How this CPU computes bf16, as the engine and the tests tell the kinds apart: "amx", "avx512_bf16" or
    "no native bf16"."""
    flags = cpu_flags()
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "no native bf16"
